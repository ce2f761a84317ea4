//! microagent-image against a real registry (Debian's docker-registry on loopback, fed
//! by skopeo): by tag and by digest, cached blobs not fetched again, a corrupted blob
//! refused with nothing left in the store, and a registry that is down.

use microagent_image::digest::Digest;
use microagent_image::pull::{pull, root_disk, Error, PullOptions};
use microagent_image::reference::Reference;
use microagent_image::store::Store;
use microagent_integration::ext4::debugfs;
use microagent_integration::registry::{push, write_layout, Registry};
use std::fs;
use std::net::TcpListener;

#[test]
fn pull_by_tag_and_digest_builds_the_root_disk_once_and_caches_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let layout = dir.path().join("layout");
    write_layout(&layout);
    push(&layout, &registry, "test/img:v1");

    let store = Store::new(dir.path().join("images"));
    let reference: Reference = format!("{}/test/img:v1", registry.addr).parse().unwrap();
    let image = pull(&store, &reference, &PullOptions::default()).unwrap();
    assert_eq!(image.layers.len(), 2);
    assert_eq!(image.downloaded, 3, "config and two layers");
    let again = pull(&store, &reference, &PullOptions::default()).unwrap();
    assert_eq!(again.downloaded, 0, "a second pull downloaded something");

    let by_digest: Reference = format!("{}/test/img@{}", registry.addr, image.manifest_digest)
        .parse()
        .unwrap();
    let pinned = pull(&store, &by_digest, &PullOptions::default()).unwrap();
    assert_eq!(pinned.manifest_digest, image.manifest_digest);

    let disk = root_disk(&store, &image, None).unwrap();
    let debugfs = |request: &str| debugfs(&disk, request);
    let listing = debugfs("ls -l /data");
    assert!(
        listing.contains(" c") && !listing.contains(" a"),
        "{listing}"
    );
    assert!(debugfs("stat /etc/old.conf").is_empty(), "whiteout ignored");
    assert!(debugfs("stat /etc/keep.conf").contains("Mode:  0600"));
    assert!(debugfs("stat /bin/sh").contains("Fast link dest: \"tool\""));
    let busybox = debugfs("stat /bin/busybox");
    assert!(busybox.contains("Mode:  0755"), "{busybox}");
    let size = std::fs::metadata("/bin/busybox").unwrap().len();
    assert!(busybox.contains(&format!("Size: {size}")), "{busybox}");
    let built = fs::metadata(&disk).unwrap().modified().unwrap();
    assert_eq!(root_disk(&store, &pinned, None).unwrap(), disk);
    assert_eq!(
        fs::metadata(&disk).unwrap().modified().unwrap(),
        built,
        "rebuilt the disk"
    );
}

#[test]
fn a_blob_served_with_wrong_bytes_is_refused_and_the_store_stays_clean() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let layout = dir.path().join("layout");
    write_layout(&layout);
    push(&layout, &registry, "test/bad:v1");
    // Flip a byte of every stored layer blob (gzip: skopeo compresses layers on push)
    // behind the registry's back.
    let blobs = registry.storage.join("docker/registry/v2/blobs/sha256");
    // The registry names each blob's directory by its sha256 (blobs/sha256/ab/abcd…).
    let mut corrupted = Vec::new();
    for prefix in fs::read_dir(&blobs).unwrap().flatten() {
        for blob in fs::read_dir(prefix.path()).unwrap().flatten() {
            let data = blob.path().join("data");
            let mut bytes = fs::read(&data).unwrap();
            if bytes.starts_with(&[0x1f, 0x8b]) {
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0xff;
                fs::write(&data, bytes).unwrap();
                corrupted.push(blob.file_name());
            }
        }
    }
    assert!(
        !corrupted.is_empty(),
        "no layer blob found in the registry's storage"
    );
    let store = Store::new(dir.path().join("images"));
    let reference: Reference = format!("{}/test/bad:v1", registry.addr).parse().unwrap();
    let err = pull(&store, &reference, &PullOptions::default()).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("igest"), "not a digest error: {message}");
    // Whatever the store keeps, it is a whole, verified blob: neither a corrupted layer
    // (under its digest or any other name) nor a partial download.
    let stored: Vec<_> = fs::read_dir(store.root().join("blobs/sha256"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for path in &stored {
        let name = path.file_name().unwrap_or_default();
        assert!(
            !corrupted.iter().any(|c| c == name),
            "corrupted blob stored: {}",
            path.display()
        );
        let bytes = fs::read(path).unwrap();
        let digest = Digest::of(&bytes);
        assert_eq!(
            name.to_string_lossy(),
            digest.hex(),
            "stored blob does not match its name"
        );
    }
}

#[test]
fn a_registry_that_is_down_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = Store::new(dir.path().join("images"));
    let reference: Reference = format!("127.0.0.1:{port}/test/img:v1").parse().unwrap();
    let err = pull(&store, &reference, &PullOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Registry { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}
