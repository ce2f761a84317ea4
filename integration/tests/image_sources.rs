//! The same image from a registry, an OCI layout, an OCI archive and a docker-archive
//! (written by skopeo) gives the same root filesystem; a multi-arch index resolves to
//! linux/amd64 from a registry and from a layout.

use microagent_image::pull::{root_disk, PullOptions};
use microagent_image::source::{fetch, Source};
use microagent_image::store::Store;
use microagent_integration::ext4::debugfs;
use microagent_integration::registry::{push, write_layout, write_multi_arch_layout, Registry};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn skopeo(from: &str, to: &str, all: bool) {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    if all {
        cmd.arg("--all");
    }
    let out = cmd.arg(from).arg(to).output().unwrap();
    assert!(
        out.status.success(),
        "skopeo {from} {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every path in a root disk with its type, mode and content (or link target).
fn tree(disk: &Path, scratch: &Path) -> BTreeMap<String, String> {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch).unwrap();
    debugfs(disk, &format!("rdump / {}", scratch.display()));
    let mut entries = BTreeMap::new();
    let mut stack = vec![scratch.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(scratch).unwrap().display().to_string();
            if rel == "lost+found" {
                continue;
            }
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                stack.push(path.clone());
                format!("dir {mode:o}")
            } else {
                format!(
                    "file {mode:o} {:x}",
                    Sha256::digest(fs::read(&path).unwrap())
                )
            };
            entries.insert(rel, what);
        }
    }
    entries
}

#[test]
fn registry_oci_layout_oci_archive_and_docker_archive_give_the_same_root_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let layout = dir.path().join("layout");
    write_layout(&layout);
    push(&layout, &registry, "test/img:v1");
    let docker_archive = dir.path().join("docker.tar");
    let oci_archive = dir.path().join("oci.tar");
    let oci = format!("oci:{}:v1", layout.display());
    skopeo(
        &oci,
        &format!("docker-archive:{}:test/img:v1", docker_archive.display()),
        false,
    );
    skopeo(
        &oci,
        &format!("oci-archive:{}:v1", oci_archive.display()),
        false,
    );

    let sources = [
        format!("{}/test/img:v1", registry.addr),
        oci.clone(),
        format!("oci-archive:{}", oci_archive.display()),
        format!("docker-archive:{}", docker_archive.display()),
    ];
    let mut trees = Vec::new();
    for (i, text) in sources.iter().enumerate() {
        // A separate store each, so no source benefits from another's blobs.
        let store = Store::new(dir.path().join(format!("store-{i}")));
        let image = fetch(
            &store,
            &Source::parse(text).unwrap(),
            &PullOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{text}: {e}"));
        let disk = root_disk(&store, &image, None).unwrap();
        trees.push((
            text.clone(),
            tree(&disk, &dir.path().join(format!("rdump-{i}"))),
        ));
    }
    let (first_name, first) = &trees[0];
    assert!(
        first.contains_key("data/c") && !first.contains_key("etc/old.conf"),
        "{first:?}"
    );
    for (name, t) in &trees[1..] {
        assert_eq!(t, first, "{name} differs from {first_name}");
    }
}

#[test]
fn a_multi_arch_index_resolves_to_linux_amd64() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let layout = dir.path().join("multi");
    let amd64 = write_multi_arch_layout(&layout);
    skopeo(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/test/multi:v1", registry.addr),
        true,
    );
    for (i, text) in [
        format!("{}/test/multi:v1", registry.addr),
        format!("oci:{}:v1", layout.display()),
    ]
    .iter()
    .enumerate()
    {
        let store = Store::new(dir.path().join(format!("store-{i}")));
        let image = fetch(
            &store,
            &Source::parse(text).unwrap(),
            &PullOptions::default(),
        )
        .unwrap();
        if text.starts_with("oci:") {
            assert_eq!(
                image.manifest_digest.as_str(),
                amd64,
                "{text} did not pick linux/amd64"
            );
        }
        // (skopeo recompresses layers on push, so registry digests differ from the
        // layout's: there the content tells which image was picked.)
        let disk = root_disk(&store, &image, None).unwrap();
        let t = tree(&disk, &dir.path().join(format!("rdump-{i}")));
        assert!(
            t.contains_key("arch-amd64") && !t.contains_key("arch-arm64"),
            "{text}: {t:?}"
        );
    }
}
