//! Network benchmark: guest TCP throughput each way through `microagent-vhost-net`
//! against QEMU's built-in user network (libslirp), same kernel, guest and QEMU (TCG).
//!
//! cargo build --release --workspace
//! cargo run --release -p microagent-integration --example bench_net [-- MIB ROUNDS]
//!
//! Each round boots one guest per network, alternating which goes first. The guest
//! downloads MIB MiB with `wget` from a host server on 127.0.0.1 (through 10.0.2.2),
//! then uploads them with `nc`; the host times each transfer from accept to the last
//! byte. The table shows medians and the ratio ours / slirp.

use microagent_integration::daemon::Daemon;
use microagent_integration::net_services::pattern;
use microagent_integration::qemu::start_busybox_guest;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
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

/// (download MiB/s, upload MiB/s) for one boot.
fn measure(ours: bool, mib: usize, dir: &Path) -> [f64; 2] {
    let (http_port, downloads) = timed_http(pattern(mib << 20));
    let (sink_port, uploads) = timed_sink();
    let script = format!(
        "mkdir -p /tmp
ifconfig eth0 up
udhcpc -i eth0 -s /bin/udhcpc-script -f -q -n -t 5 -T 3
wget -q -O /tmp/blob http://10.0.2.2:{http_port}/blob
nc 10.0.2.2 {sink_port} < /tmp/blob
echo BENCH-DONE
reboot -f
"
    );
    let socket = dir.join("net.sock");
    let _daemon = ours.then(|| {
        Daemon::start("microagent-vhost-net", &socket, ["--dns", "127.0.0.1:53"]).unwrap()
    });
    let mut qemu = start_busybox_guest(
        dir,
        &script,
        &[("bin/udhcpc-script", UDHCPC_SCRIPT.as_bytes())],
        |config| {
            if ours {
                config.net = Some(socket.clone());
            } else {
                config.user_net = true;
            }
        },
    )
    .unwrap();
    qemu.wait_for("BENCH-DONE", Duration::from_secs(900))
        .unwrap();
    qemu.finish().unwrap();
    let down = downloads.recv_timeout(Duration::from_secs(5)).unwrap();
    let (up, bytes) = uploads.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(bytes, mib << 20, "upload came back short");
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    [rate(down), rate(up)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(32);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let (mut ours, mut slirp) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            ours.push(measure(true, mib, dir.path()));
            slirp.push(measure(false, mib, dir.path()));
        } else {
            slirp.push(measure(false, mib, dir.path()));
            ours.push(measure(true, mib, dir.path()));
        }
    }
    let col = |v: &[[f64; 2]], i: usize| median(v.iter().map(|r| r[i]).collect());
    println!("guest TCP through microagent-vhost-net vs QEMU user network (libslirp), {mib} MiB, {rounds} rounds");
    println!("| transfer | microagent | libslirp | ratio (higher is better for us) |");
    println!("|---|---|---|---|");
    for (i, name) in ["host → guest (wget) MiB/s", "guest → host (nc) MiB/s"]
        .iter()
        .enumerate()
    {
        let (a, b) = (col(&ours, i), col(&slirp, i));
        println!("| {name} | {a:.1} | {b:.1} | {:.2} |", a / b);
    }
}
