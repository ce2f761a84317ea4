//! vsock benchmark: microagent-vhost-vsock against rust-vmm's vhost-device-vsock (same
//! hybrid protocol), through the same host-side frontend playing the guest driver.
//!
//! cargo install vhost-device-vsock --version 0.3.0 --locked --root /var/lib/microagent/tools
//! cargo build --release --workspace
//! cargo run --release -p microagent-integration --example bench_vsock -- [PEER_BINARY] [ROUNDS]
//!
//! Workloads: host → guest and guest → host stream throughput (128 MiB, credit-based
//! flow control, 64 KiB packets) and connection set-up latency (host CONNECT → guest
//! REQUEST → RESPONSE → "OK"). Rounds alternate which daemon goes first; medians shown.
//! Both daemons buffer the same per connection: ours advertises [`BUF_ALLOC`] to the
//! guest, the peer is started with `--tx-buffer-size` of the same size (its default is
//! 64 KiB); the table's header reports both.

use microagent_integration::daemon::binary;
use microagent_integration::process::ChildGuard;
use microagent_integration::vsock_guest::{pkt, Guest};
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

/// Starts our daemon (`peer` None) or vhost-device-vsock on `socket`, host side `uds`.
fn start(peer: Option<&Path>, socket: &Path, uds: &Path) -> ChildGuard {
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(uds);
    let mut cmd = match peer {
        None => {
            let mut cmd = Command::new(binary("microagent-vhost-vsock").unwrap());
            cmd.arg("--socket-path")
                .arg(socket)
                .args(["--guest-cid", "3", "--uds-path"])
                .arg(uds);
            cmd
        }
        Some(binary) => {
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
    cmd.env("RUST_LOG", "error").stdout(Stdio::null());
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
    let mut client = UnixStream::connect(uds).unwrap();
    writeln!(client, "CONNECT {port}").unwrap();
    client
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

/// Guest → host MiB/s.
fn guest_to_host(guest: &mut Guest, uds: &Path) -> f64 {
    let listener = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    guest.send(pkt(600, 6000, OP_REQUEST, 0, GUEST_BUF, 0), &[]);
    let resp = recv_where(guest, |p| p.dst_port == 600);
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
        let credit = peer_buf.wrapping_sub((sent as u32).wrapping_sub(peer_fwd)) as usize;
        if credit < chunk.len() {
            guest.send(pkt(600, 6000, OP_CREDIT_REQUEST, 0, GUEST_BUF, 0), &[]);
            let mut next = Some(guest.recv());
            while let Some((p, _)) = next {
                if p.dst_port == 600 && (p.op == OP_CREDIT_UPDATE || p.op == OP_RW) {
                    peer_buf = p.buf_alloc;
                    peer_fwd = p.fwd_cnt;
                }
                next = guest.try_recv(Duration::ZERO);
            }
            continue;
        }
        guest.send(
            pkt(600, 6000, OP_RW, chunk.len() as u32, GUEST_BUF, 0),
            &chunk,
        );
        sent += chunk.len();
    }
    reader.join().unwrap();
    let rate = TOTAL as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64();
    guest.send(pkt(600, 6000, OP_RST, 0, 0, 0), &[]);
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

fn measure(peer: Option<&Path>, dir: &Path) -> [f64; 3] {
    let socket = dir.join("bench.sock");
    let uds = dir.join("bench.vsock");
    let _daemon = start(peer, &socket, &uds);
    let mut guest = Guest::new(&socket);
    let a = host_to_guest(&mut guest, &uds);
    let b = guest_to_host(&mut guest, &uds);
    let c = connect_latency(&mut guest, &uds);
    let _ = std::fs::remove_file(format!("{}_6000", uds.display()));
    [a, b, c]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let peer = PathBuf::from(
        args.get(1)
            .cloned()
            .unwrap_or_else(|| "/var/lib/microagent/tools/bin/vhost-device-vsock".into()),
    );
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            ours.push(measure(None, dir.path()));
            theirs.push(measure(Some(&peer), dir.path()));
        } else {
            theirs.push(measure(Some(&peer), dir.path()));
            ours.push(measure(None, dir.path()));
        }
    }
    let col = |v: &[[f64; 3]], i: usize| median(v.iter().map(|r| r[i]).collect());
    println!(
        "vhost-user-vsock: microagent-vhost-vsock vs vhost-device-vsock 0.3.0, {rounds} rounds; \
         per-connection buffer: microagent {} KiB (BUF_ALLOC), vhost-device-vsock {} KiB \
         (--tx-buffer-size)",
        BUF_ALLOC >> 10,
        BUF_ALLOC >> 10
    );
    println!("| workload | microagent | vhost-device-vsock | ratio (higher is better for us) |");
    println!("|---|---|---|---|");
    for (i, name) in ["host → guest MiB/s", "guest → host MiB/s"]
        .iter()
        .enumerate()
    {
        let (a, b) = (col(&ours, i), col(&theirs, i));
        println!("| {name} | {a:.0} | {b:.0} | {:.2} |", a / b);
    }
    let (a, b) = (col(&ours, 2), col(&theirs, 2));
    println!("| connection set-up µs | {a:.0} | {b:.0} | {:.2} |", b / a);
}
