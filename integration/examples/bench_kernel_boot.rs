//! Boot time of two guest kernels in the QEMU agent rig (TCG, our blk + vsock daemons,
//! the agent as /init on a busybox root disk): from kernel start to the agent being
//! ready, as the agent reports it (CLOCK_BOOTTIME, the printk clock), and the wall time
//! from starting QEMU to the agent's ready line. Rounds alternate which kernel boots
//! first; medians, and the second kernel's as a ratio of the first's.
//!
//! make agent && cargo build --release --workspace
//! cargo run --release -p microagent-integration --example bench_kernel_boot -- \
//!     OLD_VMLINUX NEW_VMLINUX [ROUNDS]

use microagent_integration::agent::{busybox_root_disk, AgentVm};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const READY: &str = "microagent-agent: ready on vsock port ";

/// One boot: (guest seconds from kernel start to ready, wall seconds from QEMU start).
fn boot(dir: &Path, disk: &Path, kernel: &Path, tag: &str) -> (f64, f64) {
    let start = Instant::now();
    let mut vm = AgentVm::boot_with(dir, Some(disk), tag, |c| c.kernel = kernel.to_owned());
    let console = vm
        .qemu
        .wait_for(" s after kernel start", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{}: {e}", kernel.display()));
    let wall = start.elapsed().as_secs_f64();
    let line = console
        .lines()
        .find_map(|l| l.split(READY).nth(1))
        .unwrap_or_else(|| panic!("no ready line:\n{console}"));
    // "1024 1.234 s after kernel start"
    let guest = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unreadable ready line {line:?}"));
    (guest, wall)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [old, new] =
        [0, 1].map(|i| {
            PathBuf::from(args.get(i).unwrap_or_else(|| {
                panic!("usage: bench_kernel_boot OLD_VMLINUX NEW_VMLINUX [ROUNDS]")
            }))
        });
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    let disk = busybox_root_disk(dir.path(), 64).unwrap();

    let kernels = [&old, &new];
    let mut guest = [Vec::new(), Vec::new()];
    let mut wall = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let (g, w) = boot(dir.path(), &disk, kernels[k], &format!("r{round}k{k}"));
            guest[k].push(g);
            wall[k].push(w);
        }
    }
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len()) as f64 / 1e6;
    let [g0, g1] = guest.map(median);
    let [w0, w1] = wall.map(median);
    println!("guest kernel boot under the QEMU agent rig (TCG, 256 MiB, 1 vCPU), median of {rounds} alternating rounds");
    println!("| kernel | vmlinux | kernel start to agent ready | QEMU start to agent ready |");
    println!("|---|---|---|---|");
    println!(
        "| old `{}` | {:.1} MB | {:.3} s | {:.3} s |",
        old.display(),
        size(&old),
        g0,
        w0
    );
    println!(
        "| new `{}` | {:.1} MB | {:.3} s | {:.3} s |",
        new.display(),
        size(&new),
        g1,
        w1
    );
    println!(
        "| new / old | {:.2}x | {:.2}x | {:.2}x |",
        size(&new) / size(&old),
        g1 / g0,
        w1 / w0
    );
}
