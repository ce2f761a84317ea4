//! Boot to exec-ready of a Linux workspace against Firecracker booting the same guest:
//! the same kernel, initramfs (the agent as /init), root disk, command line, vCPU count
//! and memory, with a vsock device on both sides.
//!
//! - microagent: `microagent start WORKSPACE`, timed from spawn to its exit, which is
//!   when the agent has answered; that includes starting the blk and vsock daemons, the
//!   VMM, the boot, and the agent's hello, secrets and identity. Then `microagent halt`.
//! - Firecracker: `firecracker --no-api --config-file` with a copy of the workspace's
//!   disk and its own vsock socket, timed from spawn until the agent answers its hello
//!   over Firecracker's vsock socket (the same CONNECT protocol). Then the agent is asked
//!   to shut down (the guest resets and Firecracker exits), so the disk stays clean.
//!
//! Each side also reports the guest's own uptime (`/proc/uptime`, read through the agent
//! right after it answered): how much of the wall time the guest spent booting, and how
//! much was the host side's.
//!
//! Rounds alternate which side goes first; figures are medians. Runs where this host's
//! KVM runs Linux guests: here that is the nested rig's L1
//! (`scripts/bench-boot-nested.sh FIRECRACKER [ROUNDS]` creates the workspace there).
//!
//! cargo run --release -p microagent-integration --example bench_boot -- \
//!     FIRECRACKER ROUNDS WORKSPACE      (MICROAGENT_HOME names the workspace's home)

use microagent_agent_protocol::client::Connection;
use microagent_cli::home::Home;
use microagent_cli::workspace;
use microagent_integration::daemon::binary;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(180);

fn usage() -> ! {
    eprintln!("usage: bench_boot FIRECRACKER ROUNDS WORKSPACE (with MICROAGENT_HOME set)");
    std::process::exit(2);
}

/// Runs the CLI; its stdout and the wall time.
fn microagent(args: &[&str]) -> (String, f64) {
    let start = Instant::now();
    let out = Command::new(binary("microagent").expect("microagent built (release)"))
        .args(args)
        .output()
        .expect("run microagent");
    let ms = start.elapsed().as_secs_f64() * 1e3;
    assert!(
        out.status.success(),
        "microagent {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (String::from_utf8_lossy(&out.stdout).into_owned(), ms)
}

/// Seconds since the guest's kernel started, from `/proc/uptime`'s first field.
fn uptime_ms(text: &str) -> f64 {
    let seconds: f64 = text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not /proc/uptime: {text:?}"));
    seconds * 1e3
}

/// A boot: wall time from spawn to the agent's answer, and the guest's uptime then.
struct Boot {
    wall_ms: f64,
    guest_ms: f64,
}

/// One workspace start: `microagent start`, the guest's uptime, `microagent halt`.
fn ours(name: &str) -> Boot {
    let (_, wall_ms) = microagent(&["start", name]);
    let (uptime, _) = microagent(&["exec", name, "--", "cat", "/proc/uptime"]);
    microagent(&["halt", name]);
    Boot {
        wall_ms,
        guest_ms: uptime_ms(&uptime),
    }
}

/// One Firecracker boot: spawn to the agent's hello, the guest's uptime, then a clean
/// shutdown.
fn firecracker(peer: &Path, config: &Path, uds: &Path, console: &Path) -> Boot {
    let _ = fs::remove_file(uds);
    let start = Instant::now();
    let mut child = Command::new(peer)
        .arg("--no-api")
        .arg("--config-file")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(fs::File::create(console).expect("console log"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start firecracker");
    let agent = Connection::open(uds, READY_TIMEOUT).unwrap_or_else(|e| {
        let _ = child.kill();
        let log = fs::read_to_string(console).unwrap_or_default();
        panic!("Firecracker's guest agent did not answer: {e}\nconsole:\n{log}")
    });
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    drop(agent);
    let uptime = Connection::open(uds, READY_TIMEOUT)
        .and_then(|agent| agent.read_file("/proc/uptime", 4096))
        .expect("read the guest's uptime");
    let _ = Connection::open(uds, READY_TIMEOUT).and_then(Connection::shutdown);
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("Firecracker did not exit after the guest shut down");
        }
        sleep(Duration::from_millis(20));
    }
    Boot {
        wall_ms,
        guest_ms: uptime_ms(&String::from_utf8_lossy(&uptime)),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [peer, rounds, name] = args.as_slice() else {
        usage()
    };
    let rounds: usize = rounds.parse().unwrap_or_else(|_| usage());
    let home = Home::from_env().expect("MICROAGENT_HOME");
    let config = workspace::load(&home, name).expect("the workspace exists");
    let dir = tempfile::tempdir().expect("scratch dir");
    let disk = dir.path().join("root.img");
    workspace::copy_disk(&workspace::rootfs(&home, name), &disk).expect("copy the disk");
    let uds = dir.path().join("vsock.sock");
    let fc_config = dir.path().join("firecracker.json");
    let json = serde_json::json!({
        "boot-source": {
            "kernel_image_path": config.kernel,
            "initrd_path": config.initrd,
            "boot_args": config.cmdline,
        },
        "drives": [{
            "drive_id": "root",
            "path_on_host": disk,
            "is_root_device": false,
            "is_read_only": false,
        }],
        "machine-config": {"vcpu_count": config.cpus, "mem_size_mib": config.memory_mib},
        "vsock": {"guest_cid": 3, "uds_path": uds},
    });
    fs::write(&fc_config, json.to_string()).expect("write the Firecracker config");
    let console = dir.path().join("firecracker-console.log");
    let peer = PathBuf::from(peer);

    println!(
        "boot to exec-ready: {} vCPUs, {} MiB, kernel {}, {rounds} rounds",
        config.cpus,
        config.memory_mib,
        config.kernel.display()
    );
    let mut runs: [Vec<Boot>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let (a, b) = if round % 2 == 0 {
            let a = ours(name);
            (a, firecracker(&peer, &fc_config, &uds, &console))
        } else {
            let b = firecracker(&peer, &fc_config, &uds, &console);
            (ours(name), b)
        };
        println!(
            "round {}: microagent {:.0} ms (guest up {:.0} ms), Firecracker {:.0} ms (guest up {:.0} ms)",
            round + 1,
            a.wall_ms,
            a.guest_ms,
            b.wall_ms,
            b.guest_ms
        );
        runs[0].push(a);
        runs[1].push(b);
    }
    let medians = |boots: &[Boot]| {
        (
            median(boots.iter().map(|b| b.wall_ms).collect()),
            median(boots.iter().map(|b| b.guest_ms).collect()),
        )
    };
    let ((a, a_guest), (b, b_guest)) = (medians(&runs[0]), medians(&runs[1]));
    println!(
        "median: microagent {a:.0} ms (guest up {a_guest:.0} ms), Firecracker {b:.0} ms \
         (guest up {b_guest:.0} ms); ratio (Firecracker / microagent) {:.2}",
        b / a
    );
    if std::env::var_os("BENCH_BOOT_CONSOLE").is_some_and(|v| !v.is_empty()) {
        let log = fs::read_to_string(&console).unwrap_or_default();
        println!("--- Firecracker's guest console, last run ---\n{log}");
    }
}
