//! Hostile images (issue 19): whiteouts for `..`, digests that are paths, blobs that are
//! FIFOs or devices, setuid bits, gzip bombs, stale temporary trees, configs that are
//! not JSON. Each case checks what a user would see (the error code and the entry it
//! names) and that the image store is intact afterwards.

use microagent_image::pull::{root_disk, PullOptions};
use microagent_image::source::{fetch, Source};
use microagent_image::store::Store;
use microagent_integration::daemon::binary;
use microagent_integration::ext4::debugfs;
use microagent_integration::process::ChildGuard;
use microagent_integration::registry::{
    digest, header, write_image_layout, write_image_layout_with_config, write_layout,
};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;
use tar::{Builder, EntryType};

/// Every file under `dir` with its identity: inode, size and modification time (a
/// deleted, replaced or rewritten file changes it; hashing the sparse disks is slow).
fn files(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                let meta = entry.metadata().unwrap();
                let id = format!(
                    "{}:{}:{}.{}",
                    meta.ino(),
                    meta.len(),
                    meta.mtime(),
                    meta.mtime_nsec()
                );
                out.insert(path.strip_prefix(dir).unwrap().to_owned(), id);
            }
        }
    }
    out
}

/// A store holding one good image with its cached root disk; returns the store's files.
fn populated_store(dir: &Path) -> (Store, BTreeMap<PathBuf, String>) {
    let store = Store::new(dir.join("images"));
    let layout = dir.join("good");
    write_layout(&layout);
    let source = Source::parse(&format!("oci:{}:v1", layout.display())).unwrap();
    let image = fetch(&store, &source, &PullOptions::default()).unwrap();
    root_disk(&store, &image, None).unwrap();
    let before = files(store.root());
    assert!(before.contains_key(Path::new("refs.json")), "{before:?}");
    assert!(
        before.keys().any(|p| p.starts_with("rootfs")),
        "no cached disk: {before:?}"
    );
    assert!(before.keys().any(|p| p.starts_with("blobs")), "{before:?}");
    (store, before)
}

/// Every file the store had is still there with the same content (`refs.json` may
/// have gained names, but still holds every one it had).
fn assert_survived(store: &Store, before: &BTreeMap<PathBuf, String>, case: &str) {
    let after = files(store.root());
    let refs: serde_json::Value =
        serde_json::from_slice(&fs::read(store.root().join("refs.json")).unwrap()).unwrap();
    let good = refs
        .as_object()
        .unwrap()
        .keys()
        .any(|name| name.contains("/good:v1"));
    assert!(good, "{case}: refs.json lost the good image: {refs}");
    for (path, hash) in before {
        if path == Path::new("refs.json") {
            continue;
        }
        assert_eq!(
            after.get(path),
            Some(hash),
            "{case}: {} lost or changed",
            path.display()
        );
    }
}

/// A tar of whiteout entries (and a directory for the nested one).
fn whiteout_tar(name: &str) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    b.append(&header("sub/", EntryType::Directory, 0o755, 0), &[][..])
        .unwrap();
    b.append(&header(name, EntryType::Regular, 0o644, 0), &[][..])
        .unwrap();
    b.into_inner().unwrap()
}

const BAD_WHITEOUTS: [&str; 4] = [".wh...", ".wh..", ".wh.", "sub/.wh..."];

/// The CLI's JSON error for `image pull SOURCE` against `home`.
fn cli_pull_error(home: &Path, source: &str) -> serde_json::Value {
    let out = Command::new(binary("microagent").unwrap())
        .args(["--json", "--home"])
        .arg(home)
        .args(["image", "pull", source])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    reply["error"].clone()
}

#[test]
fn whiteouts_for_dot_dot_in_archives_are_refused_and_the_store_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (store, before) = populated_store(dir.path());
    for kind in ["oci-archive", "docker-archive"] {
        for name in BAD_WHITEOUTS {
            let archive = dir.path().join("evil.tar");
            fs::write(&archive, whiteout_tar(name)).unwrap();
            let text = format!("{kind}:{}", archive.display());
            let err = fetch(
                &store,
                &Source::parse(&text).unwrap(),
                &PullOptions::default(),
            )
            .unwrap_err();
            let case = format!("{kind} {name}");
            assert_eq!(err.code(), "image.unsafe_entry", "{case}: {err}");
            assert!(
                err.to_string().contains(&format!("{name:?}")),
                "{case}: the error does not name the entry: {err}"
            );
            assert_survived(&store, &before, &case);
            // What a user sees from the CLI.
            let shown = cli_pull_error(store.root().parent().unwrap(), &text);
            assert_eq!(shown["code"], "image.unsafe_entry", "{case}: {shown}");
            assert!(
                shown["message"].as_str().unwrap().contains(name),
                "{case}: {shown}"
            );
            assert_survived(&store, &before, &case);
        }
    }
}

#[test]
fn whiteouts_for_dot_dot_in_an_oci_layout_layer_are_refused_and_the_store_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (store, before) = populated_store(dir.path());
    for (i, name) in BAD_WHITEOUTS.iter().enumerate() {
        let layout = dir.path().join(format!("evil-{i}"));
        write_image_layout(&layout, &[(whiteout_tar(name), true)]);
        let image = fetch(
            &store,
            &Source::parse(&format!("oci:{}:v1", layout.display())).unwrap(),
            &PullOptions::default(),
        )
        .unwrap();
        let err = root_disk(&store, &image, None).unwrap_err();
        assert_eq!(err.code(), "image.unsafe_entry", "{name}: {err}");
        assert!(
            err.to_string().contains(&format!("{name:?}")),
            "{name}: {err}"
        );
        assert_survived(&store, &before, name);
        let leftovers: Vec<_> = fs::read_dir(store.root().join("rootfs"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{name}: {leftovers:?}");
    }
}

/// A layout whose index names `manifest` (a descriptor's JSON).
fn layout_with_index_entry(layout: &Path, descriptor: &str) {
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    fs::write(
        layout.join("index.json"),
        format!(r#"{{"schemaVersion":2,"manifests":[{descriptor}]}}"#),
    )
    .unwrap();
}

/// Runs `f` on a thread and fails the test if it takes more than 10 s.
fn promptly<T: Send + 'static>(case: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{case}: not refused within 10 s"))
}

#[test]
fn digests_that_are_paths_and_blobs_that_are_not_files_are_refused_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let (store, before) = populated_store(dir.path());
    let real = "0123456789abcdef".repeat(4);
    let manifest = |d: &str, size: u64| {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":{size}}}"#
        )
    };
    // A secret outside the layout, and a blob that is bigger than declared.
    let secret = dir.path().join("secret");
    fs::write(&secret, b"secret").unwrap();
    let secret_digest = digest(b"secret");
    let big = vec![7u8; 1 << 20];
    let big_digest = digest(&big);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "dev-zero",
            manifest("sha256:/dev/zero", 10),
            "image.bad_digest",
        ),
        (
            "shadow",
            manifest("sha256:../../../etc/shadow", 10),
            "image.bad_digest",
        ),
        (
            "uppercase",
            manifest(&format!("sha256:{}", real.to_uppercase()), 10),
            "image.bad_digest",
        ),
        (
            "sha512",
            manifest(&format!("sha512:{real}{real}"), 10),
            "image.unsupported_digest",
        ),
        (
            "fifo",
            manifest(&format!("sha256:{real}"), 10),
            "image.unsafe_path",
        ),
        (
            "symlink-to-dev-zero",
            manifest(&format!("sha256:{real}"), 10),
            "image.unsafe_path",
        ),
        (
            "symlink-outside",
            manifest(&secret_digest, 6),
            "image.unsafe_path",
        ),
        (
            "bigger-than-declared",
            manifest(&big_digest, 100),
            "image.blob_size_mismatch",
        ),
    ];
    for (case, descriptor, code) in cases {
        let layout = dir.path().join(case);
        layout_with_index_entry(&layout, &descriptor);
        let blobs = layout.join("blobs/sha256");
        match case {
            "fifo" => {
                let path =
                    std::ffi::CString::new(blobs.join(&real).into_os_string().into_encoded_bytes())
                        .unwrap();
                // SAFETY: mkfifo with a NUL-terminated path.
                assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
            }
            "symlink-to-dev-zero" => {
                std::os::unix::fs::symlink("/dev/zero", blobs.join(&real)).unwrap()
            }
            "symlink-outside" => {
                std::os::unix::fs::symlink(&secret, blobs.join(&secret_digest[7..])).unwrap()
            }
            "bigger-than-declared" => fs::write(blobs.join(&big_digest[7..]), &big).unwrap(),
            _ => {}
        }
        let (store2, text) = (store.clone(), format!("oci:{}", layout.display()));
        let err = promptly(case, move || {
            fetch(
                &store2,
                &Source::parse(&text).unwrap(),
                &PullOptions::default(),
            )
            .unwrap_err()
        });
        assert_eq!(err.code(), code, "{case}: {err}");
        assert_survived(&store, &before, case);
        assert!(
            !store
                .root()
                .join("blobs/sha256")
                .join(&big_digest[7..])
                .exists()
                && !store
                    .root()
                    .join("blobs/sha256")
                    .join(&secret_digest[7..])
                    .exists(),
            "{case}: a refused blob entered the store"
        );
    }
}

#[test]
fn docker_archive_paths_out_of_the_archive_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, before) = populated_store(dir.path());
    for (case, config, link) in [
        ("dot-dot", "../../../etc/passwd", None),
        ("absolute", "/etc/passwd", None),
        ("symlink-out", "config.json", Some("/etc/passwd")),
        ("symlink-device", "config.json", Some("/dev/zero")),
    ] {
        let mut b = Builder::new(Vec::new());
        let manifest = format!(r#"[{{"Config":"{config}","Layers":[]}}]"#);
        b.append(
            &header(
                "manifest.json",
                EntryType::Regular,
                0o644,
                manifest.len() as u64,
            ),
            manifest.as_bytes(),
        )
        .unwrap();
        if let Some(target) = link {
            let mut h = header("config.json", EntryType::Symlink, 0o777, 0);
            h.set_link_name(target).unwrap();
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
        }
        let archive = dir.path().join(format!("{case}.tar"));
        fs::write(&archive, b.into_inner().unwrap()).unwrap();
        let text = format!("docker-archive:{}", archive.display());
        let err = promptly(case, {
            let store = store.clone();
            move || {
                fetch(
                    &store,
                    &Source::parse(&text).unwrap(),
                    &PullOptions::default(),
                )
                .unwrap_err()
            }
        });
        assert_eq!(err.code(), "image.unsafe_path", "{case}: {err}");
        assert!(err.to_string().contains(config), "{case}: {err}");
        assert_survived(&store, &before, case);
    }
}

#[test]
fn setuid_setgid_and_file_capabilities_survive_onto_the_ext4_root_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Builder::new(Vec::new());
    let mut entry = |path: &str, kind: EntryType, mode: u32, uid: u64, gid: u64| {
        let mut h = header(path, kind, mode, 2);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_cksum();
        let data: &[u8] = if kind == EntryType::Directory {
            h.set_size(0);
            h.set_cksum();
            &[]
        } else {
            b"x\n"
        };
        b.append(&h, data).unwrap();
    };
    entry("bin/", EntryType::Directory, 0o755, 0, 0);
    entry("bin/su", EntryType::Regular, 0o4755, 0, 0);
    entry("bin/wall", EntryType::Regular, 0o2755, 0, 5);
    entry("bin/mine", EntryType::Regular, 0o4750, 1000, 1000);
    entry("shared/", EntryType::Directory, 0o2775, 0, 100);
    // ping as Debian ships it: CAP_NET_RAW as a file capability (VFS_CAP_REVISION_2,
    // effective), which a chown after it would clear like setuid.
    let mut capability = 0x0200_0001u32.to_le_bytes().to_vec();
    capability.extend_from_slice(&(1u32 << 13).to_le_bytes());
    capability.extend_from_slice(&[0; 12]);
    b.append_pax_extensions([("SCHILY.xattr.security.capability", &capability[..])])
        .unwrap();
    b.append(
        &header("bin/ping", EntryType::Regular, 0o755, 2),
        &b"x\n"[..],
    )
    .unwrap();
    let layer = b.into_inner().unwrap();
    let layout = dir.path().join("layout");
    write_image_layout(&layout, &[(layer, true)]);
    let store = Store::new(dir.path().join("images"));
    let image = fetch(
        &store,
        &Source::parse(&format!("oci:{}:v1", layout.display())).unwrap(),
        &PullOptions::default(),
    )
    .unwrap();
    let disk = root_disk(&store, &image, None).unwrap();
    for (path, mode, uid, gid) in [
        ("/bin/su", "04755", 0, 0),
        ("/bin/wall", "02755", 0, 5),
        ("/bin/mine", "04750", 1000, 1000),
        ("/shared", "02775", 0, 100),
    ] {
        let stat = debugfs(&disk, &format!("stat {path}"));
        assert!(stat.contains(&format!("Mode:  {mode}")), "{path}: {stat}");
        assert!(
            stat.contains(&format!("User: {uid:>5}")) && stat.contains(&format!("Group: {gid:>5}")),
            "{path}: {stat}"
        );
    }
    let attrs = debugfs(&disk, "ea_list /bin/ping");
    assert!(
        attrs.contains("security.capability (20) = 01 00 00 02 00 20 00 00"),
        "{attrs}"
    );
}

/// One file of `size` zero bytes in a tar, gzip-compressed as tightly as gzip can.
fn gzip_bomb(size: usize) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(header("zeros", EntryType::Regular, 0o644, size as u64).as_bytes())
        .unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..size / chunk.len() {
        gz.write_all(&chunk).unwrap();
    }
    gz.write_all(&[0u8; 1024]).unwrap();
    gz.finish().unwrap()
}

#[test]
fn a_gzip_bomb_is_stopped_by_the_expansion_limit_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // 32 MiB of zeros compress to about 32 KiB: a ratio near 1000, far past the
    // limit (100 times the compressed size, at least 16 MiB).
    let bomb = gzip_bomb(32 << 20);
    assert!(bomb.len() < 64 << 10, "{}", bomb.len());
    let layout = dir.path().join("layout");
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    // write_image_layout compresses itself: store the bomb as an already-gzipped blob.
    write_gzipped_layout(&layout, &bomb);
    let store = Store::new(dir.path().join("images"));
    let image = fetch(
        &store,
        &Source::parse(&format!("oci:{}:v1", layout.display())).unwrap(),
        &PullOptions::default(),
    )
    .unwrap();
    let err = root_disk(&store, &image, None).unwrap_err();
    assert_eq!(err.code(), "image.layer_too_large", "{err}");
    assert!(err.to_string().contains(&digest(&bomb)), "{err}");
    let rootfs: Vec<_> = fs::read_dir(store.root().join("rootfs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(rootfs.is_empty(), "left behind: {rootfs:?}");
}

/// A layout (tag v1) of one layer given as its gzip blob.
fn write_gzipped_layout(layout: &Path, blob: &[u8]) {
    let put = |data: &[u8]| {
        let d = digest(data);
        fs::write(layout.join("blobs/sha256").join(&d[7..]), data).unwrap();
        (d, data.len())
    };
    let (l, ls) = put(blob);
    let config = br#"{"architecture":"amd64","os":"linux","config":{}}"#;
    let (c, cs) = put(config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{cs}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{l}","size":{ls}}}]}}"#
    );
    let (m, ms) = put(manifest.as_bytes());
    fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{m}","size":{ms},"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}]}}"#
        ),
    )
    .unwrap();
}

#[test]
fn temporary_trees_of_killed_processes_are_removed_on_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path().join("images"));
    let mut killed = Command::new("sleep").arg("60").spawn().unwrap();
    let dead = killed.id();
    killed.kill().unwrap();
    killed.wait().unwrap();
    let live = ChildGuard::spawn(Command::new("sleep").arg("60")).unwrap();
    let live = live.id().unwrap();
    let hex = "ab".repeat(32);
    let rootfs = store.root().join("rootfs");
    let stale = [
        rootfs.join(format!(".tree-{hex}-{dead}")),
        rootfs.join(format!(".disk-{hex}-{dead}")),
        store.root().join(format!(".import-{dead}")),
        store.root().join(format!("blobs/sha256/.tmp-0-{dead}")),
    ];
    let busy = rootfs.join(format!(".tree-{hex}-{live}"));
    for path in stale.iter().chain([&busy]) {
        if path.file_name().unwrap().to_string_lossy().contains("tree")
            || path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .contains("import")
        {
            fs::create_dir_all(path.join("usr/lib")).unwrap();
            fs::write(path.join("usr/lib/big"), vec![1u8; 1 << 20]).unwrap();
        } else {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, vec![1u8; 1 << 20]).unwrap();
        }
    }
    let layout = dir.path().join("layout");
    write_layout(&layout);
    let image = fetch(
        &store,
        &Source::parse(&format!("oci:{}:v1", layout.display())).unwrap(),
        &PullOptions::default(),
    )
    .unwrap();
    root_disk(&store, &image, None).unwrap();
    for path in &stale {
        assert!(!path.exists(), "{} was not cleaned", path.display());
    }
    assert!(
        busy.join("usr/lib/big").exists(),
        "the tree of a live process was removed"
    );
}

#[test]
fn a_config_that_is_not_json_is_refused_before_a_root_disk_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let (store, before) = populated_store(dir.path());
    let home = store.root().parent().unwrap().to_owned();
    let kernel = dir.path().join("vmlinux");
    fs::write(&kernel, b"not a kernel, never booted").unwrap();
    for (case, config) in [
        ("not json", &b"this is not json"[..]),
        ("not an object", &b"[1, 2, 3]"[..]),
    ] {
        let layout = dir.path().join(case.replace(' ', "-"));
        let (one, _) = microagent_integration::registry::whiteout_layers();
        write_image_layout_with_config(&layout, &[(one, true)], Some(config));
        let text = format!("oci:{}:v1", layout.display());
        let out = Command::new(binary("microagent").unwrap())
            .args(["--json", "--home"])
            .arg(&home)
            .args(["create", "ws", "--no-agent", "--image", &text, "--kernel"])
            .arg(&kernel)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125), "{case}: {out:?}");
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            reply["error"]["code"], "image.bad_config",
            "{case}: {reply}"
        );
        assert!(
            reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&digest(config)),
            "{case}: the error does not name the config: {reply}"
        );
        // No root disk, no name, no blob of it, no workspace: only what was there before.
        let after = files(store.root());
        let new: Vec<_> = after.keys().filter(|p| !before.contains_key(*p)).collect();
        assert!(new.is_empty(), "{case}: left behind {new:?}");
        assert!(!home.join("workspaces/ws").exists(), "{case}");
        assert!(
            !fs::read_to_string(store.root().join("refs.json"))
                .unwrap()
                .contains(&layout.display().to_string()),
            "{case}"
        );
    }
}

#[test]
fn a_layer_larger_than_half_the_free_space_is_refused_before_the_disk_fills() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB of incompressible bytes and 30 MiB of zeros: about 1 MiB compressed, so the
    // ratio allows 100 MiB; the 40 MiB filesystem it is unpacked on does not.
    let mut tar = header("data", EntryType::Regular, 0o644, 31 << 20)
        .as_bytes()
        .to_vec();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..(1 << 20) / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        tar.extend_from_slice(&x.to_le_bytes());
    }
    tar.resize(tar.len() + (30 << 20) + 1024, 0);
    let layout = dir.path().join("layout");
    write_image_layout(&layout, &[(tar, true)]);
    let kernel = dir.path().join("vmlinux");
    fs::write(&kernel, b"never booted").unwrap();
    let home = dir.path().join("home");
    fs::create_dir(&home).unwrap();
    // The home on a 40 MiB tmpfs in a private mount namespace (gone with the process).
    let script = format!(
        "mount -t tmpfs -o size=40m tmpfs {home} && exec {cli} --json --home {home} create ws --no-agent --kernel {kernel} --image oci:{layout}:v1",
        home = home.display(),
        cli = binary("microagent").unwrap().display(),
        kernel = kernel.display(),
        layout = layout.display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("mount") && !stderr.contains("unshare"),
        "this test needs root (CAP_SYS_ADMIN) for a tmpfs in a mount namespace: {stderr}"
    );
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Free space, not the layer's expansion ratio, is the limit here.
    assert_eq!(reply["error"]["code"], "image.no_space", "{reply}");
}

/// A registry that serves one hand-written manifest (`test/img:v1`) and the blobs it is
/// given, over plain HTTP on loopback, recording every path asked for. Its thread
/// ends with the test process.
struct FakeRegistry {
    addr: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeRegistry {
    fn start(manifest: String, blobs: Vec<Vec<u8>>) -> Self {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        let blobs: BTreeMap<String, Vec<u8>> = blobs.into_iter().map(|b| (digest(&b), b)).collect();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) <= 2 {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                seen.lock().unwrap().push(path.clone());
                let (status, kind, body) = if path == "/v2/" {
                    ("200 OK", "application/json", b"{}".to_vec())
                } else if path.ends_with("/manifests/v1") {
                    (
                        "200 OK",
                        "application/vnd.oci.image.manifest.v1+json",
                        manifest.as_bytes().to_vec(),
                    )
                } else if let Some(blob) =
                    path.rsplit_once("/blobs/").and_then(|(_, d)| blobs.get(d))
                {
                    ("200 OK", "application/octet-stream", blob.clone())
                } else {
                    ("404 Not Found", "application/json", b"{}".to_vec())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nDocker-Content-Digest: {}\r\nConnection: close\r\n\r\n",
                    body.len(),
                    digest(&body)
                );
                let mut out = &stream;
                let _ = out.write_all(head.as_bytes());
                let _ = out.write_all(&body);
            }
        });
        Self { addr, requests }
    }

    fn blob_requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.contains("/blobs/"))
            .cloned()
            .collect()
    }
}

fn manifest_of(config: (&str, i64), layer: (&str, i64)) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        config.0, config.1, layer.0, layer.1
    )
}

#[test]
fn a_registry_cannot_name_paths_or_make_the_client_read_past_declared_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let config = br#"{"architecture":"amd64","os":"linux","config":{}}"#.to_vec();
    let big = vec![1u8; 1 << 20];
    let (c, cs) = (digest(&config), config.len() as i64);
    let cases = [
        (
            "layer digest that is a path",
            manifest_of((&c, cs), ("sha256:../../../../etc/passwd", 10)),
            "image.bad_digest",
        ),
        (
            // Refused by the free-space check before any blob is fetched.
            "config declared as 1 EiB",
            manifest_of((&c, 1 << 60), (&digest(&big), 1 << 20)),
            "image.no_space",
        ),
        (
            "layer longer than declared",
            manifest_of((&c, cs), (&digest(&big), 10)),
            "image.blob_size_mismatch",
        ),
        (
            "negative size",
            manifest_of((&c, cs), (&digest(&big), -1)),
            "image.blob_size_mismatch",
        ),
    ];
    for (i, (case, manifest, code)) in cases.into_iter().enumerate() {
        let registry = FakeRegistry::start(manifest, vec![config.clone(), big.clone()]);
        let store = Store::new(dir.path().join(format!("store-{i}")));
        let text = format!("{}/test/img:v1", registry.addr);
        let err = promptly(case, {
            let store = store.clone();
            move || {
                fetch(
                    &store,
                    &Source::parse(&text).unwrap(),
                    &PullOptions::default(),
                )
                .unwrap_err()
            }
        });
        assert_eq!(err.code(), code, "{case}: {err}");
        if code == "image.bad_digest" || code == "image.no_space" || case == "negative size" {
            assert!(
                registry.blob_requests().is_empty(),
                "{case}: blobs fetched before the manifest was checked: {:?}",
                registry.blob_requests()
            );
        }
        let blobs = store.root().join("blobs/sha256");
        let kept: Vec<_> = fs::read_dir(&blobs)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            !kept.iter().any(|n| n.to_string_lossy().starts_with('.')),
            "{case}: temporary files left: {kept:?}"
        );
        assert!(
            !blobs.join(&digest(&big)[7..]).exists(),
            "{case}: a refused blob entered the store"
        );
    }
}
