//! vsock benchmark: microagent-vhost-vsock against rust-vmm's vhost-device-vsock (same
//! hybrid protocol), through the same host-side frontend playing the guest driver.
//!
//! cargo install vhost-device-vsock --version 0.3.0 --locked --root /var/lib/microagent/tools
//! cargo build --release --workspace
//! cargo run --release -p microagent-integration --example bench_vsock -- [PEER_BINARY] [ROUNDS] \
//!     [--baseline OLD_MICROAGENT_VHOST_VSOCK]
//!
//! Workloads: host → guest and guest → host stream throughput (128 MiB, credit-based
//! flow control, 64 KiB packets) and connection set-up latency (host CONNECT → guest
//! REQUEST → RESPONSE → "OK"). Guest → host runs twice: one packet per kick, waiting for
//! it to be used, and up to 4 packets per kick within credit (Linux's send worker queues
//! every packet it has, then kicks once); both take the credit updates the daemon sends
//! on its own and ask (CREDIT_REQUEST) only when out of credit. Rounds rotate which
//! daemon goes first; medians shown.
//! `--baseline` adds another build of our daemon (e.g. an earlier commit's, kept outside
//! the repository) to the same rounds. `BENCH_VSOCK_LOG` sets `RUST_LOG` for the daemons
//! (default `error`).
//! Both daemons buffer the same per connection: ours advertises [`BUF_ALLOC`] to the
//! guest, the peer is started with `--tx-buffer-size` of the same size (its default is
//! 64 KiB); the table's header reports both.

use microagent_integration::daemon::binary;
use microagent_integration::process::ChildGuard;
use microagent_integration::vsock_guest::{self, pkt, Guest};
use microagent_vhost_vsock::config::DEFAULT_BUSY_POLL_US;
use microagent_vhost_vsock::muxer::BUF_ALLOC;
use microagent_vhost_vsock::packet::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOTAL: usize = 128 << 20;
const GUEST_BUF: u32 = 256 << 10;
const CONNECTS: usize = 200;

/// A daemon under test.
enum Side {
    /// A build of microagent-vhost-vsock, with extra flags.
    Ours(PathBuf, &'static [&'static str]),
    /// vhost-device-vsock.
    Peer(PathBuf),
}

/// Starts a daemon on `socket`, host side `uds`.
fn start(side: &Side, socket: &Path, uds: &Path) -> ChildGuard {
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(uds);
    let mut cmd = match side {
        Side::Ours(binary, flags) => {
            let mut cmd = Command::new(binary);
            cmd.arg("--socket-path")
                .arg(socket)
                .args(["--guest-cid", "3", "--uds-path"])
                .arg(uds)
                .args(*flags);
            cmd
        }
        Side::Peer(binary) => {
            let mut cmd = Command::new(binary);
            cmd.args(["--guest-cid", "3", "--socket"])
                .arg(socket)
                .arg("--uds-path")
                .arg(uds)
                .arg("--tx-buffer-size")
                .arg(BUF_ALLOC.to_string());
            cmd
        }
    };
    let log = std::env::var("BENCH_VSOCK_LOG").unwrap_or_else(|_| "error".into());
    cmd.env("RUST_LOG", log).stdout(Stdio::null());
    let mut child = ChildGuard::spawn(&mut cmd).unwrap();
    child
        .wait_for_path(socket, Duration::from_secs(10))
        .unwrap();
    child
}

/// The next packet matching `want`, skipping leftovers of earlier connections.
fn recv_where(guest: &mut Guest, want: impl Fn(&Packet) -> bool) -> Packet {
    loop {
        let (p, _) = guest.recv();
        if want(&p) {
            return p;
        }
    }
}

fn connect_line(uds: &Path, port: u32) -> UnixStream {
    vsock_guest::connect_line(uds, port).unwrap()
}

fn read_ok(client: &mut UnixStream) {
    let mut line = String::new();
    BufReader::new(client).read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
}

/// Host → guest MiB/s.
fn host_to_guest(guest: &mut Guest, uds: &Path) -> f64 {
    let mut client = connect_line(uds, 5000);
    let req = recv_where(guest, |p| p.op == OP_REQUEST && p.dst_port == 5000);
    let host_port = req.src_port;
    guest.send(pkt(5000, host_port, OP_RESPONSE, 0, GUEST_BUF, 0), &[]);
    read_ok(&mut client);
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..TOTAL >> 20 {
            client.write_all(&chunk).unwrap();
        }
        client
    });
    let (mut received, mut fwd) = (0usize, 0u32);
    while received < TOTAL {
        let (p, data) = guest.recv();
        if p.op != OP_RW {
            continue;
        }
        received += data.len();
        if (received as u32).wrapping_sub(fwd) >= GUEST_BUF / 2 {
            fwd = received as u32;
            guest.send(
                pkt(5000, host_port, OP_CREDIT_UPDATE, 0, GUEST_BUF, fwd),
                &[],
            );
        }
    }
    let rate = TOTAL as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64();
    drop(writer.join().unwrap());
    guest.send(pkt(5000, host_port, OP_RST, 0, 0, 0), &[]);
    rate
}

/// Guest → host MiB/s, with up to `in_flight` packets queued per kick (within credit).
fn guest_to_host(guest: &mut Guest, uds: &Path, in_flight: usize) -> f64 {
    let listener = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    let port = 600 + in_flight as u32;
    guest.send(pkt(port, 6000, OP_REQUEST, 0, GUEST_BUF, 0), &[]);
    let resp = recv_where(guest, |p| p.dst_port == port);
    assert_eq!(resp.op, OP_RESPONSE, "{resp:?}");
    let (mut host, _) = listener.accept().unwrap();
    let start = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        while total < TOTAL {
            total += host.read(&mut buf).unwrap();
        }
    });
    let (mut peer_buf, mut peer_fwd) = (resp.buf_alloc, resp.fwd_cnt);
    let chunk = vec![0xa5u8; 64 << 10];
    let mut sent = 0usize;
    while sent < TOTAL {
        // Credit updates the daemon sent on its own, as a driver takes them from RX; when
        // none gives enough credit, ask for one and wait.
        let mut next = guest.try_recv(Duration::ZERO);
        let credit = loop {
            while let Some((p, _)) = next {
                if p.dst_port == port && (p.op == OP_CREDIT_UPDATE || p.op == OP_RW) {
                    peer_buf = p.buf_alloc;
                    peer_fwd = p.fwd_cnt;
                }
                next = guest.try_recv(Duration::ZERO);
            }
            let credit = peer_buf.wrapping_sub((sent as u32).wrapping_sub(peer_fwd)) as usize;
            if credit >= chunk.len() {
                break credit;
            }
            guest.send(pkt(port, 6000, OP_CREDIT_REQUEST, 0, GUEST_BUF, 0), &[]);
            next = Some(guest.recv());
        };
        let batch = (credit / chunk.len())
            .min(in_flight)
            .min((TOTAL - sent).div_ceil(chunk.len()));
        let packet = pkt(port, 6000, OP_RW, chunk.len() as u32, GUEST_BUF, 0);
        guest.send_batch(&vec![(packet, chunk.as_slice()); batch]);
        sent += batch * chunk.len();
    }
    reader.join().unwrap();
    let rate = TOTAL as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64();
    guest.send(pkt(port, 6000, OP_RST, 0, 0, 0), &[]);
    rate
}

/// Median connection set-up time in microseconds.
fn connect_latency(guest: &mut Guest, uds: &Path) -> f64 {
    let mut times = Vec::with_capacity(CONNECTS);
    for i in 0..CONNECTS {
        let port = 7000 + i as u32;
        let start = Instant::now();
        let mut client = connect_line(uds, port);
        let req = recv_where(guest, |p| p.op == OP_REQUEST && p.dst_port == port);
        guest.send(pkt(port, req.src_port, OP_RESPONSE, 0, GUEST_BUF, 0), &[]);
        read_ok(&mut client);
        times.push(start.elapsed().as_secs_f64() * 1e6);
        guest.send(pkt(port, req.src_port, OP_RST, 0, 0, 0), &[]);
    }
    median(times)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// CPU time (user + system) a process has used so far, in ms, from /proc.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 * 1000.0 / hz
}

/// The four workloads, the daemon's CPU ms for all four, and the RX buffers the daemon
/// returned without a header.
fn measure(side: &Side, dir: &Path) -> ([f64; 5], usize) {
    let socket = dir.join("bench.sock");
    let uds = dir.join("bench.vsock");
    let daemon = start(side, &socket, &uds);
    let mut guest = Guest::new(&socket);
    let cpu_before = daemon.id().map(cpu_ms).unwrap_or_default();
    let a = host_to_guest(&mut guest, &uds);
    let b = guest_to_host(&mut guest, &uds, 1);
    let _ = std::fs::remove_file(format!("{}_6000", uds.display()));
    let b4 = guest_to_host(&mut guest, &uds, 4);
    let c = connect_latency(&mut guest, &uds);
    let cpu = daemon.id().map(cpu_ms).unwrap_or_default() - cpu_before;
    let _ = std::fs::remove_file(format!("{}_6000", uds.display()));
    ([a, b, b4, c, cpu], guest.unwritten_rx)
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let baseline = match args.iter().position(|a| a == "--baseline") {
        Some(i) if i + 1 < args.len() => {
            let path = PathBuf::from(args.remove(i + 1));
            args.remove(i);
            Some(path)
        }
        Some(_) => panic!("--baseline needs a path"),
        None => None,
    };
    let peer = PathBuf::from(
        args.first()
            .cloned()
            .unwrap_or_else(|| "/var/lib/microagent/tools/bin/vhost-device-vsock".into()),
    );
    let rounds: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let ours = binary("microagent-vhost-vsock").unwrap();
    let mut sides = vec![
        ("microagent".to_owned(), Side::Ours(ours.clone(), &[])),
        (
            "microagent, --busy-poll-us 0".to_owned(),
            Side::Ours(ours, &["--busy-poll-us", "0"]),
        ),
    ];
    if let Some(path) = baseline {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        sides.push((format!("baseline {name}"), Side::Ours(path, &[])));
    }
    sides.push(("vhost-device-vsock".to_owned(), Side::Peer(peer)));
    let dir = tempfile::tempdir().unwrap();
    let mut results: Vec<Vec<[f64; 5]>> = sides.iter().map(|_| Vec::new()).collect();
    let mut unwritten = vec![0usize; sides.len()];
    for round in 0..rounds {
        for k in 0..sides.len() {
            let i = (round + k) % sides.len();
            let (r, u) = measure(&sides[i].1, dir.path());
            results[i].push(r);
            unwritten[i] += u;
        }
    }
    let col = |v: &[[f64; 5]], i: usize| median(v.iter().map(|r| r[i]).collect());
    println!(
        "vhost-user-vsock: microagent-vhost-vsock vs vhost-device-vsock 0.3.0, {rounds} rounds \
         (rotating which side goes first, medians); per-connection buffer: microagent {} KiB \
         (BUF_ALLOC), vhost-device-vsock {} KiB (--tx-buffer-size); microagent busy-polls for \
         up to {} µs before its worker sleeps (its default; also shown with polling off, \
         --busy-poll-us 0), vhost-device-vsock has no polling",
        BUF_ALLOC >> 10,
        BUF_ALLOC >> 10,
        DEFAULT_BUSY_POLL_US
    );
    let names: Vec<&str> = sides.iter().map(|(n, _)| n.as_str()).collect();
    println!(
        "| workload | {} | ratio, microagent against vhost-device-vsock (above 1: microagent better) |",
        names.join(" | ")
    );
    println!("|---|{}---|", "---|".repeat(names.len()));
    let peer = sides.len() - 1;
    for (w, name) in [
        "host → guest MiB/s",
        "guest → host MiB/s, 1 packet in flight",
        "guest → host MiB/s, up to 4 packets per kick",
        "connection set-up µs",
        "daemon CPU ms, all four workloads",
    ]
    .iter()
    .enumerate()
    {
        let values: Vec<f64> = results.iter().map(|r| col(r, w)).collect();
        let cells: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
        // Throughput: higher is better; set-up time and CPU time: lower is better.
        let ratio = if w >= 3 {
            values[peer] / values[0]
        } else {
            values[0] / values[peer]
        };
        println!("| {name} | {} | {ratio:.2} |", cells.join(" | "));
    }
    for (i, (name, _)) in sides.iter().enumerate() {
        if unwritten[i] > 0 {
            println!(
                "\n{name} returned {} RX buffers without writing a header into them (skipped)",
                unwritten[i]
            );
        }
    }
}
