//! Exec through the whole stack: host client → microagent-vhost-vsock → QEMU (TCG, the
//! frontend) → Linux virtio-vsock → microagent-agent → a command in the workspace.
//! Reports the median round trip of `true` and stdout throughput of 100 MiB.
//!
//! make agent && cargo build --release --workspace
//! cargo run --release -p microagent-integration --example bench_exec [-- RUNS]
//!
//! The guest runs under software emulation here, so these figures bound the agent and
//! daemons from below; on hardware virtualization the guest side is far faster.

use microagent_integration::agent::{argv_request, busybox_root_disk, AgentVm};
use std::io::{self, Write};
use std::time::Instant;

/// Counts bytes instead of keeping them.
struct Count(usize);

impl Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let disk = busybox_root_disk(dir.path(), 64).unwrap();
    let mut vm = AgentVm::boot(dir.path(), Some(&disk), "bench");
    vm.run(&["true"]); // waits for the agent

    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            vm.run(&["true"]);
            start.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));

    let start = Instant::now();
    let mut out = Count(0);
    let exit = vm
        .connect()
        .exec(
            argv_request(&["dd", "if=/dev/zero", "bs=1048576", "count=100"]),
            io::empty(),
            &mut out,
            &mut io::sink(),
        )
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!((exit.code(), out.0), (0, 100 << 20));

    println!("exec through the stack (QEMU TCG guest, our blk + vsock daemons, agent as /init)");
    println!("| exec round trip of `true` (median of {runs}) | 100 MiB stdout throughput |");
    println!("|---|---|");
    println!("| {:.1} ms | {:.0} MiB/s |", times[runs / 2], 100.0 / secs);
}
