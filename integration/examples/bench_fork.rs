//! `microagent create NEW --from-snapshot SRC:TAG` until the fork runs, for idle test
//! guests (`scenario=halt`, 1 vCPU, `--no-agent`) of 256 MiB and 4 GiB, and 16 forks
//! in a row of a 1 GiB guest: wall time of the CLI command (it returns once the VMM
//! answers with the vCPUs running) and the host memory each fork's processes use
//! (VmRSS of the VMM and its daemons: blk, and net with the default user network; the
//! VMM's and blk daemon's count the guest memfd pages they map).
//!
//! cargo build --release -p microagent-cli -p microagent-vmm -p microagent-vhost-blk
//! cargo run --release -p microagent-integration --example bench_fork [-- RUNS]

use microagent_integration::cli::Cli;
use microagent_integration::registry::{push, write_layout, Registry};
use microagent_integration::vmm::test_guest;
use std::fs;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A running source of `memory`, snapshotted as `base`.
fn source(cli: &Cli, image: &str, name: &str, memory: &str) {
    cli.ok(&[
        "create",
        name,
        "--image",
        image,
        "--no-agent",
        "--memory",
        memory,
        "--cpus",
        "1",
        "--kernel",
        test_guest().to_str().unwrap(),
        "--cmdline",
        "scenario=halt",
    ]);
    cli.ok(&["start", name]);
    cli.ok(&["snapshot", "create", name, "--tag", "base"]);
    cli.ok(&["halt", name]);
}

/// Forks `count` workspaces from `src:base`, one after another; (ms, KiB) of each.
fn forks(cli: &Cli, src: &str, count: usize) -> Vec<(f64, u64)> {
    let from = format!("{src}:base");
    let mut out = Vec::new();
    for i in 0..count {
        let name = format!("{src}-f{i}");
        let start = Instant::now();
        cli.ok(&["create", &name, "--from-snapshot", &from]);
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let kib = cli.pids(&name).into_iter().map(rss_kib).sum();
        out.push((ms, kib));
    }
    out
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let layout = dir.path().join("layout");
    write_layout(&layout);
    push(&layout, &registry, "bench/img:v1");
    let image = format!("{}/bench/img:v1", registry.addr);
    let cli = Cli::new(dir.path());

    println!("| guest | forks | median fork ms (CLI to running) | max ms | median KiB per fork (VMM + daemons' RSS) |");
    println!("|---|---|---|---|---|");
    for (name, memory, count) in [
        ("m256", "256M", runs),
        ("m4096", "4G", runs),
        ("m1024", "1G", 16),
    ] {
        source(&cli, &image, name, memory);
        let results = forks(&cli, name, count);
        let ms: Vec<f64> = results.iter().map(|r| r.0).collect();
        let max = ms.iter().copied().fold(0.0, f64::max);
        let kib = median(results.iter().map(|r| r.1 as f64).collect());
        println!(
            "| {memory} | {count} | {:.1} | {max:.1} | {kib:.0} |",
            median(ms)
        );
        for i in 0..count {
            cli.ok(&["delete", &format!("{name}-f{i}"), "--yes", "--force"]);
        }
        cli.ok(&["delete", name, "--yes", "--force"]);
    }
}
