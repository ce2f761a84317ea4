//! VMM start-up and exit against Firecracker: a whole run of a guest whose first
//! instruction resets through the i8042 (`guest/reset-guest/reset.S`), so the guest
//! costs nothing and each run is the VMM's own start (KVM VM, guest memory, vCPU, boot
//! set-up) and exit (teardown of all of it). 1 vCPU, no devices, no API socket on either
//! side: `microagent-vmm --kernel reset.elf --memory M`, against `firecracker --no-api
//! --config-file` with the same kernel, vCPU count and memory.
//!
//! Wall time is spawn to `wait4`; CPU time and peak RSS come from `wait4`'s rusage.
//! Every round runs each side once per memory size, rotating which side goes first;
//! every figure is a median.
//!
//! cargo build --release -p microagent-vmm -p microagent-integration --examples
//! cargo run --release -p microagent-integration --example bench_vmm_start -- \
//!     FIRECRACKER ROUNDS [--baseline OLD_MICROAGENT_VMM] [MIB...]
//!
//! FIRECRACKER `none` leaves the peer out. `--baseline PATH` (repeatable) adds another microagent-vmm binary, e.g. one built
//! before a change, as a further side, labelled with its file name: a before/after
//! comparison then comes from the same alternating runs.

use microagent_integration::daemon::binary;
use microagent_integration::vmm::reset_guest;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Microagent,
    Firecracker,
}

struct Side {
    label: String,
    kind: Kind,
    path: PathBuf,
}

struct Run {
    wall_ms: f64,
    cpu_ms: f64,
    max_rss_kib: f64,
}

fn command(side: &Side, mib: u64, dir: &Path) -> Command {
    let mut cmd = Command::new(&side.path);
    match side.kind {
        Kind::Microagent => {
            cmd.arg("--kernel")
                .arg(reset_guest())
                .args(["--cmdline", "console=ttyS0", "--cpus", "1", "--memory"])
                .arg(mib.to_string())
                .arg("--serial")
                .arg(dir.join("serial.log"))
                .env("RUST_LOG", "warn");
        }
        Kind::Firecracker => {
            let config = dir.join(format!("firecracker-{mib}.json"));
            let json = serde_json::json!({
                "boot-source": {
                    "kernel_image_path": reset_guest(),
                    "boot_args": "console=ttyS0",
                },
                "machine-config": {"vcpu_count": 1, "mem_size_mib": mib},
                "drives": [],
            });
            fs::write(&config, json.to_string()).unwrap();
            cmd.arg("--no-api").arg("--config-file").arg(config);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn run_once(side: &Side, mib: u64, dir: &Path) -> Run {
    let mut cmd = command(side, mib, dir);
    let start = Instant::now();
    // Reaped by wait4 below, which also returns the child's resource usage.
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid out-pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(pid, child.id() as i32);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{} with {mib} MiB did not exit cleanly (wait status {status:#x}); run it by hand: \
         {cmd:?}",
        side.label
    );
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    Run {
        wall_ms,
        cpu_ms: ms(usage.ru_utime) + ms(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss as f64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn usage() -> ! {
    eprintln!("usage: bench_vmm_start FIRECRACKER ROUNDS [--baseline OLD_MICROAGENT_VMM] [MIB...]");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(peer), Some(rounds)) = (args.next(), args.next()) else {
        usage()
    };
    let Ok(rounds) = rounds.parse::<usize>() else {
        usage()
    };
    let mut sides = vec![Side {
        label: "microagent-vmm".into(),
        kind: Kind::Microagent,
        path: binary("microagent-vmm").unwrap(),
    }];
    let mut sizes = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "--baseline" {
            let Some(path) = args.next() else { usage() };
            let path = PathBuf::from(path);
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            sides.push(Side {
                label: format!("baseline {name}"),
                kind: Kind::Microagent,
                path,
            });
        } else {
            let Ok(mib) = arg.parse::<u64>() else { usage() };
            sizes.push(mib);
        }
    }
    if peer != "none" {
        sides.push(Side {
            label: "Firecracker".into(),
            kind: Kind::Firecracker,
            path: peer.into(),
        });
    }
    if sizes.is_empty() {
        sizes = vec![16, 128, 1024];
    }
    let dir = tempfile::tempdir().unwrap();
    // results[size][side]
    let mut results: Vec<Vec<Vec<Run>>> = sizes
        .iter()
        .map(|_| sides.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..rounds {
        for (s, &mib) in sizes.iter().enumerate() {
            for k in 0..sides.len() {
                let i = (k + round) % sides.len();
                results[s][i].push(run_once(&sides[i], mib, dir.path()));
            }
        }
    }

    println!(
        "VMM start-up and exit: a guest that resets at its first instruction, 1 vCPU, no \
         devices, no API socket, {rounds} rounds (medians; the ratio is the side's wall \
         time over microagent-vmm's, so above 1 means microagent-vmm is faster)\n"
    );
    println!("| guest memory | VMM | wall ms | ratio | CPU ms (user+sys) | peak RSS |");
    println!("|---|---|---|---|---|---|");
    for (s, mib) in sizes.iter().enumerate() {
        let ours = median(results[s][0].iter().map(|r| r.wall_ms).collect());
        for (i, side) in sides.iter().enumerate() {
            let runs = &results[s][i];
            let wall = median(runs.iter().map(|r| r.wall_ms).collect());
            println!(
                "| {mib} MiB | {} | {wall:.1} | {:.2} | {:.1} | {:.0} KiB |",
                side.label,
                wall / ours,
                median(runs.iter().map(|r| r.cpu_ms).collect()),
                median(runs.iter().map(|r| r.max_rss_kib).collect()),
            );
        }
    }
}
