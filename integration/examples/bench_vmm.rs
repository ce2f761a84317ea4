//! microagent-vmm start-up cost: CPU time and peak RSS of a whole run of the test guest's
//! banner scenario (start, boot, print, i8042 reset, exit), and the wall time to the
//! guest's first line on the serial console.
//!
//! The VMM is started as a workspace starts it: a vhost-user-blk root disk and a
//! vhost-user-vsock device (our daemons, started before the clock) and its API socket.
//! Every figure is the median over the runs.
//!
//! cargo build --release --workspace
//! cargo run --release -p microagent-integration --example bench_vmm [-- RUNS]

use microagent_integration::daemon::{binary, Daemon};
use microagent_integration::vmm::test_guest;
use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Run {
    cpu_ms: f64,
    wall_ms: f64,
    first_line_ms: f64,
    max_rss_kib: i64,
}

fn run_once(dir: &std::path::Path) -> Run {
    let serial = dir.join("serial.log");
    let disk = dir.join("root.img");
    let (blk, vsock, api) = (
        dir.join("blk.sock"),
        dir.join("vsock.sock"),
        dir.join("api.sock"),
    );
    for path in [&serial, &blk, &vsock, &api] {
        let _ = fs::remove_file(path);
    }
    fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let _blk = Daemon::start(
        "microagent-vhost-blk",
        &blk,
        ["--disk", disk.to_str().unwrap()],
    )
    .unwrap();
    let uds = dir.join("vsock");
    let _vsock = Daemon::start(
        "microagent-vhost-vsock",
        &vsock,
        ["--guest-cid", "3", "--uds-path", uds.to_str().unwrap()],
    )
    .unwrap();
    let start = Instant::now();
    // Reaped by wait4 below, which also returns the child's resource usage.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(binary("microagent-vmm").unwrap())
        .arg("--kernel")
        .arg(test_guest())
        .args([
            "--cmdline",
            "scenario=banner",
            "--memory",
            "128",
            "--serial",
        ])
        .arg(&serial)
        .arg("--blk")
        .arg(&blk)
        .arg("--vsock")
        .arg(&vsock)
        .arg("--api-socket")
        .arg(&api)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first complete line on the console, polled while the guest runs.
    let first_line_ms = loop {
        let text = fs::read(&serial).unwrap_or_default();
        if text.contains(&b'\n') {
            break start.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no console line within 30 s"
        );
        std::thread::sleep(Duration::from_micros(200));
    };
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid out-pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    assert!(fs::read_to_string(&serial)
        .unwrap()
        .contains("TEST-GUEST-DONE"));
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    Run {
        cpu_ms: ms(usage.ru_utime) + ms(usage.ru_stime),
        wall_ms,
        first_line_ms,
        max_rss_kib: usage.ru_maxrss,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let results: Vec<Run> = (0..runs).map(|_| run_once(dir.path())).collect();
    println!(
        "microagent-vmm, test guest banner run, 128 MiB guest with blk, vsock and API \
         socket, {runs} runs (medians)\n"
    );
    println!("| wall ms to first console line | CPU ms (user+sys), whole run | wall ms, whole run | peak RSS |");
    println!("|---|---|---|---|");
    println!(
        "| {:.1} | {:.1} | {:.1} | {:.0} KiB |",
        median(results.iter().map(|r| r.first_line_ms).collect()),
        median(results.iter().map(|r| r.cpu_ms).collect()),
        median(results.iter().map(|r| r.wall_ms).collect()),
        median(results.iter().map(|r| r.max_rss_kib as f64).collect()),
    );
}
