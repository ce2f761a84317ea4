//! A generated image with one large layer (default 1 GiB: one file of pseudo-random
//! bytes, gzip with stored blocks) to a workspace's ext4 root disk, from the same
//! local registry, fresh caches each round, same disk size:
//!
//! - microagent: `microagent create --no-agent --net none --disk-size 2G` (the release
//!   binary: pull with every blob fsynced, unpack from the blob file, `mke2fs -d`, and
//!   the disk copied into the workspace with `cp --reflink=auto --sparse=always`);
//! - peers: `skopeo copy` + `sync` of the blobs + `umoci raw unpack` + `mke2fs -d` +
//!   the same `cp`.
//!
//! Wall time and peak RSS (`wait4`'s `ru_maxrss`; for the peers the largest of their
//! processes). Rounds alternate which side goes first; medians.
//!
//! cargo build --release -p microagent-cli
//! cargo run --release -p microagent-integration --example bench_image_large [-- MIB ROUNDS]

use microagent_integration::process::run_with_peak_rss;
use microagent_integration::registry::Registry;
use microagent_integration::registry_push::push_large_image;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DISK_SIZE: &str = "2G";
const DISK_BYTES: u64 = 2 << 30;

/// Runs a step to its end; returns its peak RSS in KiB.
fn step(cmd: &mut Command) -> u64 {
    cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
    let (status, rss) = run_with_peak_rss(cmd, Duration::from_secs(1800)).unwrap();
    assert!(status.success(), "{cmd:?}: {status}");
    rss
}

fn microagent() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/microagent");
    assert!(
        path.is_file(),
        "{} is missing: cargo build --release -p microagent-cli",
        path.display()
    );
    path
}

/// (seconds, peak RSS KiB)
fn ours(image: &str, work: &Path) -> (f64, u64) {
    let kernel = work.join("kernel");
    std::fs::write(&kernel, b"not booted").unwrap();
    let start = Instant::now();
    let rss = step(
        Command::new(microagent())
            .arg("--home")
            .arg(work.join("home"))
            .args([
                "create",
                "big",
                "--image",
                image,
                "--no-agent",
                "--net",
                "none",
            ])
            .args(["--disk-size", DISK_SIZE, "--kernel"])
            .arg(&kernel)
            .env("MICROAGENT_RUNTIME_DIR", work.join("run")),
    );
    (start.elapsed().as_secs_f64(), rss)
}

fn theirs(image: &str, work: &Path) -> (f64, u64) {
    let start = Instant::now();
    let layout = work.join("oci");
    let mut peak = step(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{image}"))
            .arg(format!("oci:{}:v1", layout.display())),
    );
    let blobs: Vec<_> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    peak = peak.max(step(Command::new("sync").args(&blobs)));
    let rootfs = work.join("rootfs");
    peak = peak.max(step(
        Command::new("umoci")
            .args(["raw", "unpack", "--rootless", "--image"])
            .arg(format!("{}:v1", layout.display()))
            .arg(&rootfs),
    ));
    let disk = work.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    peak = peak.max(step(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&rootfs)
            .arg(&disk),
    ));
    peak = peak.max(step(
        Command::new("cp")
            .args(["--reflink=auto", "--sparse=always"])
            .arg(&disk)
            .arg(work.join("rootfs.ext4")),
    ));
    (start.elapsed().as_secs_f64(), peak)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|x, y| x.total_cmp(y));
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let image = push_large_image(dir.path(), &registry, "bench/large", mib << 20).reference;
    let (mut ta, mut tb, mut ra, mut rb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let work = dir.path().join(format!("round-{round}"));
        let (wa, wb) = (work.join("ours"), work.join("theirs"));
        std::fs::create_dir_all(&wa).unwrap();
        std::fs::create_dir_all(&wb).unwrap();
        let (a, b) = if round % 2 == 0 {
            let a = ours(&image, &wa);
            (a, theirs(&image, &wb))
        } else {
            let b = theirs(&image, &wb);
            (ours(&image, &wa), b)
        };
        eprintln!(
            "round {round}: microagent {:.2} s {} KiB, peers {:.2} s {} KiB",
            a.0, a.1, b.0, b.1
        );
        ta.push(a.0);
        ra.push(a.1 as f64);
        tb.push(b.0);
        rb.push(b.1 as f64);
        let _ = std::fs::remove_dir_all(&work);
    }
    let (ma, mb) = (median(ta), median(tb));
    let (pa, pb) = (median(ra), median(rb));
    println!(
        "image → workspace root disk, one {mib} MiB layer (generated, gzip stored blocks), local registry, disk {DISK_SIZE}, {rounds} rounds (medians)\n"
    );
    println!("| | microagent create (pull + unpack + mke2fs -d + cp) | skopeo copy + sync + umoci raw unpack + mke2fs -d + cp | ratio (theirs / ours) |");
    println!("|---|---|---|---|");
    println!("| time | {ma:.2} s | {mb:.2} s | {:.2} |", mb / ma);
    println!(
        "| peak RSS | {:.0} KiB | {:.0} KiB | {:.2} |",
        pa,
        pb,
        pb / pa
    );
}
