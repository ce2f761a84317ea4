//! Layers applied in order, with whiteouts, into an ext4 disk checked with debugfs;
//! and layers that try to escape the root.

use microagent_image::rootfs::build_ext4;
use microagent_image::unpack::{apply_layer, apply_layer_auto, Error};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use tar::{EntryType, Header};

use microagent_integration::ext4::debugfs;
use microagent_integration::registry::whiteout_layers as layers;

#[test]
fn whiteouts_delete_and_replace_and_the_ext4_disk_has_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let (one, two) = layers();
    apply_layer(&root, &one[..], u64::MAX).unwrap();
    // The second layer gzip-compressed, as registries serve them.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&two).unwrap();
    apply_layer_auto(&root, &gz.finish().unwrap()[..], u64::MAX).unwrap();
    // A third layer, zstd-compressed, as newer registries serve them.
    let mut three = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("etc/zstd.conf").unwrap();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    three.append(&h, &b"zstd\n"[..]).unwrap();
    let three = zstd::encode_all(&three.into_inner().unwrap()[..], 3).unwrap();
    apply_layer_auto(&root, &three[..], u64::MAX).unwrap();
    assert_eq!(fs::read(root.join("etc/zstd.conf")).unwrap(), b"zstd\n");

    assert!(!root.join("etc/old.conf").exists());
    assert_eq!(fs::read(root.join("etc/keep.conf")).unwrap(), b"keep\n");
    let mut data: Vec<_> = fs::read_dir(root.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    data.sort();
    assert_eq!(data, ["c"]);
    assert_eq!(
        fs::metadata(root.join("etc/keep.conf"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o600
    );
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("tool")
    );
    assert_eq!(
        fs::metadata(root.join("bin/tool")).unwrap().ino(),
        fs::metadata(root.join("bin/tool-hard")).unwrap().ino()
    );

    let disk = dir.path().join("root.img");
    let size = build_ext4(&root, &disk, None).unwrap();
    let meta = fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), size);
    assert!(meta.blocks() * 512 < size / 2, "the disk is not sparse");
    let debugfs = |request: &str| debugfs(&disk, request);
    let listing = debugfs("ls -l /data");
    assert!(
        listing.contains(" c") && !listing.contains(" a") && !listing.contains(" b"),
        "{listing}"
    );
    assert!(
        debugfs("stat /etc/old.conf").is_empty(),
        "deleted file still in the image"
    );
    assert!(debugfs("stat /etc/keep.conf").contains("Mode:  0600"));
    assert!(debugfs("stat /data/c").contains("Mode:  0640"));
    assert!(debugfs("stat /bin/sh").contains("Fast link dest: \"tool\""));
    assert_eq!(debugfs("cat /bin/tool"), "#!/bin/sh\necho tool\n");
}

/// A tar entry with a raw name, bypassing the tar crate's own path checks.
fn raw_entry(name: &str, kind: EntryType, link: Option<&str>, data: &[u8]) -> Vec<u8> {
    let mut h = Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(link) = link {
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

fn tar_of(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn entries_that_escape_the_root_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let outside = dir.path().join("evil");

    let cases = [
        (
            "dot-dot",
            tar_of(&[raw_entry("../evil", EntryType::Regular, None, b"x")]),
        ),
        (
            "absolute",
            tar_of(&[raw_entry("/tmp/evil", EntryType::Regular, None, b"x")]),
        ),
        (
            "through a symlink",
            tar_of(&[
                raw_entry(
                    "escape",
                    EntryType::Symlink,
                    Some(dir.path().to_str().unwrap()),
                    b"",
                ),
                raw_entry("escape/evil", EntryType::Regular, None, b"x"),
            ]),
        ),
        (
            "hard link out",
            tar_of(&[raw_entry(
                "h",
                EntryType::Link,
                Some("../../etc/passwd"),
                b"",
            )]),
        ),
    ];
    for (name, layer) in cases {
        let err = apply_layer(&root, &layer[..], u64::MAX).unwrap_err();
        match (&err, name) {
            (Error::Escape { entry, .. }, "dot-dot") => assert_eq!(entry, "../evil"),
            (Error::Escape { entry, .. }, "absolute") => assert_eq!(entry, "/tmp/evil"),
            (Error::ThroughSymlink { entry, .. }, "through a symlink") => {
                assert_eq!(entry, "escape/evil")
            }
            (Error::Escape { entry, .. }, "hard link out") => assert_eq!(entry, "h"),
            _ => panic!("{name}: unexpected {err}"),
        }
        assert!(!outside.exists(), "{name}: wrote outside the root");
    }
}

#[test]
fn a_disk_size_below_the_content_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("big"), vec![1u8; 8 << 20]).unwrap();
    let err = build_ext4(&root, &dir.path().join("d.img"), Some(4 << 20)).unwrap_err();
    assert!(
        err.to_string().contains("smaller than the image content"),
        "{err}"
    );
    assert!(!dir.path().join("d.img").exists());
}

#[test]
fn a_tree_of_100000_small_files_fits_on_its_root_disk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    // 100,000 files of 10 bytes: by size mke2fs's default (one inode per 16 KiB) would
    // give the disk about 46,000 inodes ("Could not allocate inode").
    for d in 0..100 {
        let sub = root.join(format!("many/{d}"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..1000 {
            fs::write(sub.join(f.to_string()), b"0123456789").unwrap();
        }
    }
    let disk = dir.path().join("many.img");
    build_ext4(&root, &disk, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(debugfs(&disk, "cat /many/99/999"), "0123456789");
    let stats = debugfs(&disk, "stats");
    let free_inodes: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Free inodes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(
        free_inodes >= 16 << 10,
        "no room left for the workspace: {free_inodes}"
    );
}
