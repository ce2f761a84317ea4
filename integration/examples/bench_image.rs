//! Image to root disk: microagent's pull + unpack + ext4 build against
//! `skopeo copy` + `umoci unpack` + `mke2fs -d`, from the same local registry, fresh
//! caches each round, same disk size.
//!
//! Both sides do the same work: every blob is fsynced (microagent's store does it on
//! import; `sync FILE…` does it for skopeo's layout) and nothing hashes the unpacked
//! files (`umoci raw unpack`, which writes no mtree manifest, instead of `umoci unpack`,
//! which hashes every file). Rounds alternate which side goes first. umoci comes from
//! `scripts/install-deps.sh`.
//!
//! cargo run --release -p microagent-integration --example bench_image [-- ROUNDS]

use microagent_image::pull::{root_disk, PullOptions};
use microagent_image::source::{fetch, Source};
use microagent_image::store::Store;
use microagent_integration::registry::{push, write_image_layout, Registry};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// A tar of `count` files of `size` bytes each under `dir/`. The contents are
/// pseudo-random: a repeating pattern would compress past the unpacker's expansion ratio
/// limit (`image.layer_too_large`) and measure nothing real.
fn layer(dir: &str, count: usize, size: usize, seed: u8) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed);
    for i in 0..count {
        let data: Vec<u8> = (0..size)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut h = tar::Header::new_gnu();
        h.set_path(format!("{dir}/f{i:05}")).unwrap();
        h.set_size(size as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        tar.append(&h, &data[..]).unwrap();
    }
    tar.into_inner().unwrap()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ours(image: &str, work: &Path) -> f64 {
    let start = Instant::now();
    let store = Store::new(work.join("store"));
    let pulled = fetch(
        &store,
        &Source::parse(image).unwrap(),
        &PullOptions::default(),
    )
    .unwrap();
    root_disk(&store, &pulled, Some(512 << 20)).unwrap();
    start.elapsed().as_secs_f64()
}

fn theirs(image: &str, work: &Path) -> f64 {
    let start = Instant::now();
    let layout = work.join("oci");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{image}"))
        .arg(format!("oci:{}:v1", layout.display())));
    let blobs: Vec<_> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    run(Command::new("sync").args(&blobs));
    let rootfs = work.join("rootfs");
    run(Command::new("umoci")
        .args(["raw", "unpack", "--rootless", "--image"])
        .arg(format!("{}:v1", layout.display()))
        .arg(&rootfs));
    let disk = work.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&rootfs)
        .arg(&disk));
    start.elapsed().as_secs_f64()
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let layout = dir.path().join("layout");
    // Small files, large files, and a top layer: about 60 MiB uncompressed.
    let layers = [
        (layer("small", 3000, 3000, 7), true),
        (layer("large", 24, 2 << 20, 13), true),
        (layer("top", 200, 1000, 3), true),
    ];
    write_image_layout(&layout, &layers);
    push(&layout, &registry, "bench/img:v1");
    let image = format!("{}/bench/img:v1", registry.addr);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let work = dir.path().join(format!("round-{round}"));
        let (wa, wb) = (work.join("ours"), work.join("theirs"));
        std::fs::create_dir_all(&wa).unwrap();
        std::fs::create_dir_all(&wb).unwrap();
        if round % 2 == 0 {
            a.push(ours(&image, &wa));
            b.push(theirs(&image, &wb));
        } else {
            b.push(theirs(&image, &wb));
            a.push(ours(&image, &wa));
        }
        let _ = std::fs::remove_dir_all(&work);
    }
    a.sort_by(|x, y| x.total_cmp(y));
    b.sort_by(|x, y| x.total_cmp(y));
    let (ma, mb) = (a[rounds / 2], b[rounds / 2]);
    println!("image → ext4 root disk, ~60 MiB image (3 gzip layers), local registry, {rounds} rounds (medians)\n");
    println!("| microagent (pull + unpack + mke2fs -d) | skopeo copy + sync + umoci raw unpack + mke2fs -d | ratio (time theirs / ours) |");
    println!("|---|---|---|");
    println!("| {ma:.2} s | {mb:.2} s | {:.2} |", mb / ma);
}
