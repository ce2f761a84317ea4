//! Network benchmark: guest TCP throughput each way and TCP connection set-up rate
//! through `microagent-vhost-net` against QEMU's built-in user network (libslirp) and
//! against passt (`-netdev stream`), same kernel, guest and QEMU (TCG).
//!
//! cargo build --release --workspace
//! cargo run --release -p microagent-integration --example bench_net [-- MIB ROUNDS CONNS]
//!
//! Each round boots one guest per network, rotating which goes first. The guest
//! makes CONNS short TCP connections to the host in a row from one process
//! (`tcp-connect`: connect, read the host's one byte to EOF, close), then downloads MIB
//! MiB with `wget` from a host server on 127.0.0.1 (through 10.0.2.2) and uploads them
//! with `nc`.
//! The host times each transfer from accept to the last byte, and the connections from
//! the first accept to the last. The table shows medians and the ratios ours / peer.

use microagent_integration::daemon::Daemon;
use microagent_integration::net_services::pattern;
use microagent_integration::process::ChildGuard;
use microagent_integration::qemu::start_busybox_guest;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
bound|renew)
  ifconfig "$interface" "$ip" netmask "$subnet" up
  for r in $router; do route add default gw "$r" dev "$interface"; done
  ;;
esac
"#;

/// Serves `body` once per connection after the request head; sends the time taken.
fn timed_http(body: Vec<u8>) -> (u16, Receiver<Duration>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut byte = [0u8];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let start = Instant::now();
            let reply = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            let _ = stream.write_all(reply.as_bytes());
            let _ = stream.write_all(&body);
            let _ = stream.shutdown(std::net::Shutdown::Write);
            // Until the guest closed: everything was delivered.
            let _ = stream.read(&mut byte);
            let _ = tx.send(start.elapsed());
        }
    });
    (port, rx)
}

/// Reads each connection to EOF; sends the time taken and the byte count.
fn timed_sink() -> (u16, Receiver<(Duration, usize)>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0;
            let mut start = None;
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                start.get_or_insert_with(Instant::now);
                total += n;
            }
            let _ = stream.write_all(b"done\n");
            let _ = tx.send((start.map(|s| s.elapsed()).unwrap_or_default(), total));
        }
    });
    (port, rx)
}

/// Accepts `count` connections, answers each with one byte and closes it; sends the
/// time from the first accept to the last.
fn timed_connections(count: usize) -> (u16, Receiver<Duration>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut first = None;
        for (i, mut stream) in listener.incoming().flatten().enumerate() {
            let start = *first.get_or_insert_with(Instant::now);
            let _ = stream.write_all(b".");
            drop(stream);
            if i + 1 == count {
                let _ = tx.send(start.elapsed());
                break;
            }
        }
    });
    (port, rx)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Ours,
    Slirp,
    Passt,
}

const PEERS: [Peer; 3] = [Peer::Ours, Peer::Slirp, Peer::Passt];

/// passt on a unix socket for QEMU's `-netdev stream`, giving the guest the same plan
/// as the others (10.0.2.15/24, gateway 10.0.2.2 mapped to the host's loopback).
/// Started as root, passt becomes `nobody` before it binds the socket: its directory
/// must be writable for that user.
fn start_passt(socket: &Path, log: &Path) -> ChildGuard {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    let log = std::fs::File::create(log).unwrap();
    let mut passt = ChildGuard::spawn(
        Command::new("passt")
            .args(["--foreground", "--ipv4-only", "--socket"])
            .arg(socket)
            .args(["--address", "10.0.2.15", "--netmask", "24"])
            .args(["--gateway", "10.0.2.2"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    )
    .unwrap();
    passt
        .wait_for_path(socket, Duration::from_secs(10))
        .unwrap();
    passt
}

/// (download MiB/s, upload MiB/s, connections/s) for one boot.
fn measure(peer: Peer, mib: usize, conns: usize, dir: &Path) -> [f64; 3] {
    let (http_port, downloads) = timed_http(pattern(mib << 20));
    let (sink_port, uploads) = timed_sink();
    let (conn_port, connections) = timed_connections(conns);
    let script = format!(
        "mkdir -p /tmp
ifconfig eth0 up
udhcpc -i eth0 -s /bin/udhcpc-script -f -q -n -t 5 -T 3
/bin/tcp-connect 10.0.2.2 {conn_port} {conns}
wget -q -O /tmp/blob http://10.0.2.2:{http_port}/blob
nc 10.0.2.2 {sink_port} < /tmp/blob
echo BENCH-DONE
reboot -f
"
    );
    let socket = dir.join("net.sock");
    let _ = std::fs::remove_file(&socket);
    // The last boot's console must not answer this boot's wait for BENCH-DONE.
    let _ = std::fs::remove_file(dir.join("console.log"));
    let _daemon = (peer == Peer::Ours).then(|| {
        Daemon::start("microagent-vhost-net", &socket, ["--dns", "127.0.0.1:53"]).unwrap()
    });
    let passt_socket = dir.join("passt").join("passt.sock");
    let _passt = (peer == Peer::Passt).then(|| {
        let _ = std::fs::create_dir(dir.join("passt"));
        let _ = std::fs::remove_file(&passt_socket);
        start_passt(&passt_socket, &dir.join("passt.log"))
    });
    let tcp_connect = std::fs::read(env!("MICROAGENT_TCP_CONNECT")).unwrap();
    let mut qemu = start_busybox_guest(
        dir,
        &script,
        &[
            ("bin/udhcpc-script", UDHCPC_SCRIPT.as_bytes()),
            ("bin/tcp-connect", &tcp_connect),
        ],
        |config| match peer {
            Peer::Ours => config.net = Some(socket.clone()),
            Peer::Slirp => config.user_net = true,
            Peer::Passt => config.stream_net = Some(passt_socket.clone()),
        },
    )
    .unwrap();
    let console = qemu
        .wait_for("CONNECT-DONE", Duration::from_secs(900))
        .unwrap();
    assert!(
        console.contains(&format!("CONNECT-DONE ok={conns}")),
        "{peer:?}: connections failed:\n{console}"
    );
    // The host's figures, not the guest's end: with passt the guest's `nc` sometimes
    // never sees the sink's close (QEMU is killed when dropped).
    let wait = Duration::from_secs(900);
    let down = downloads.recv_timeout(wait).unwrap();
    let (up, bytes) = uploads.recv_timeout(wait).unwrap();
    assert_eq!(bytes, mib << 20, "{peer:?}: upload came back short");
    let connecting = connections.recv_timeout(Duration::from_secs(5)).unwrap();
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    [
        rate(down),
        rate(up),
        (conns - 1) as f64 / connecting.as_secs_f64(),
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(32);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let conns: usize = args
        .get(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
        .max(2);
    let dir = tempfile::tempdir().unwrap();
    let mut results: [Vec<[f64; 3]>; 3] = Default::default();
    for round in 0..rounds {
        // Rotate which network boots first.
        for k in 0..PEERS.len() {
            let i = (round + k) % PEERS.len();
            results[i].push(measure(PEERS[i], mib, conns, dir.path()));
        }
    }
    let col = |v: &[[f64; 3]], i: usize| median(v.iter().map(|r| r[i]).collect());
    println!(
        "guest TCP through microagent-vhost-net vs QEMU user network (libslirp) vs passt, \
         {mib} MiB, {conns} connections, {rounds} rounds"
    );
    println!("| measure | microagent | libslirp | passt | ours / slirp | ours / passt |");
    println!("|---|---|---|---|---|---|");
    for (i, name) in [
        "host → guest (wget) MiB/s",
        "guest → host (nc) MiB/s",
        "guest → host connections/s",
    ]
    .iter()
    .enumerate()
    {
        let [a, b, c] = [0, 1, 2].map(|p| col(&results[p], i));
        println!(
            "| {name} | {a:.1} | {b:.1} | {c:.1} | {:.2} | {:.2} |",
            a / b,
            a / c
        );
    }
}
