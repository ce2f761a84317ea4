//! microagent-vmm snapshot create and restore for idle test guests of several sizes.
//!
//! Create: wall time of the `snapshot` request on the control socket (pause, save vCPU
//! and VM state, write populated memory, fsync, rename, resume). Restore: wall time from
//! spawning `microagent-vmm --restore` to its control socket answering `status` with the
//! vCPUs running (polled every 0.2 ms). Peer in the same run: writing every byte of guest memory to a file
//! and fsyncing it (what a full-memory snapshot such as Firecracker's does).
//!
//! cargo build --release -p microagent-vmm
//! cargo run --release -p microagent-integration --example bench_snapshot [-- RUNS]

use microagent_integration::daemon::binary;
use microagent_integration::process::ChildGuard;
use microagent_integration::vmm::{Vmm, VmmArgs};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Writes `bytes` of non-zero data and fsyncs: a full-memory dump's cost.
fn full_dump(path: &Path, bytes: u64) -> f64 {
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut file = File::create(path).unwrap();
    for _ in 0..bytes >> 20 {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    drop(file);
    fs::remove_file(path).unwrap();
    ms
}

/// Spawns `microagent-vmm --restore` and retries `status` every 0.2 ms until it
/// answers; returns the wall time and the reply. The process is killed afterwards.
fn restore_until_status(snap: &Path, run_dir: &Path) -> (f64, serde_json::Value) {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    let socket = run_dir.join("api.sock");
    let start = Instant::now();
    let mut child = ChildGuard::spawn(
        Command::new(binary("microagent-vmm").unwrap())
            .arg("--restore")
            .arg(snap)
            .arg("--serial")
            .arg(run_dir.join("serial.log"))
            .arg("--api-socket")
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    loop {
        if let Ok(mut stream) = UnixStream::connect(&socket) {
            stream.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).unwrap();
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            assert!(child.try_status().unwrap().is_none());
            return (ms, serde_json::from_str(&line).unwrap());
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no control socket"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    println!("| guest | populated written | create ms | restore ms | full dump ms (peer) | create ratio (peer / ours) |");
    println!("|---|---|---|---|---|---|");
    for mib in [128u32, 1024, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        let mut args = VmmArgs::test_guest("scenario=halt");
        args.memory_mib = mib;
        let vmm = Vmm::start(&args, &src).unwrap();
        vmm.wait_for("HALTING", Duration::from_secs(30)).unwrap();
        let (mut create, mut restore, mut peer) = (Vec::new(), Vec::new(), Vec::new());
        let mut populated = 0;
        for run in 0..runs {
            let snap = dir.path().join(format!("snap{run}"));
            let request = serde_json::json!({"cmd": "snapshot", "dir": snap}).to_string();
            let start = Instant::now();
            let reply = vmm.api(&request).unwrap();
            create.push(start.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(reply["ok"], true, "{reply}");
            populated = reply["snapshot"]["memory_populated"].as_u64().unwrap();

            let run_dir = dir.path().join(format!("restore{run}"));
            fs::create_dir(&run_dir).unwrap();
            let (ms, status) = restore_until_status(&snap, &run_dir);
            restore.push(ms);
            assert_eq!(status["state"], "running", "{status}");
            fs::remove_dir_all(&snap).unwrap();

            peer.push(full_dump(
                &dir.path().join("full.bin"),
                u64::from(mib) << 20,
            ));
        }
        let (c, r, p) = (median(create), median(restore), median(peer));
        println!(
            "| {mib} MiB | {} KiB | {c:.1} | {r:.1} | {p:.1} | {:.0} |",
            populated >> 10,
            p / c
        );
    }
}
