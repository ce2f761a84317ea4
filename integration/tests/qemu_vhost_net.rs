//! `microagent-vhost-net` under a real Linux guest, QEMU as the frontend: the guest gets
//! its address by DHCP, pings the gateway, resolves a name through 10.0.2.3 (a DNS
//! server on the host's loopback), downloads from and uploads to servers on the host's
//! loopback through 10.0.2.2 (sha256 checked both ways), and a published host port
//! reaches a server in the guest. Two guests with the same MAC and address at once.

use microagent_integration::daemon::Daemon;
use microagent_integration::net_services::{
    dns_server, free_port, http_server, pattern, sha256_hex, sha_sink,
};
use microagent_integration::qemu::{start_busybox_guest, Qemu};
use std::io::Read;
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(180);
const TRANSFER: Duration = Duration::from_secs(900);
const DNS_NAME: &str = "probe.microagent.test";
const DNS_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);

/// udhcpc's script: configure the interface, the default route and resolv.conf.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
bound|renew)
  ifconfig "$interface" "$ip" netmask "$subnet" up
  for r in $router; do route add default gw "$r" dev "$interface"; done
  : > /etc/resolv.conf
  for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
  echo "DHCP-BOUND ip=$ip router=$router dns=$dns"
  ;;
deconfig)
  ifconfig "$interface" 0.0.0.0 up
  ;;
esac
"#;

/// The network part every guest runs first.
const NET_UP: &str = "mkdir -p /etc /tmp
ifconfig lo 127.0.0.1 up
ifconfig eth0 up
udhcpc -i eth0 -s /bin/udhcpc-script -f -q -n -t 5 -T 3 || echo DHCP-FAILED
";

fn daemon(dir: &Path, name: &str, args: &[String]) -> (Daemon, std::path::PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    let log = dir.join(format!("{name}.log"));
    let daemon = Daemon::start_logged("microagent-vhost-net", &socket, args, &log).unwrap();
    (daemon, socket)
}

fn boot(dir: &Path, script: &str, socket: &Path) -> Qemu {
    let socket = socket.to_owned();
    start_busybox_guest(
        dir,
        &format!("{NET_UP}{script}"),
        &[("bin/udhcpc-script", UDHCPC_SCRIPT.as_bytes())],
        |config| config.net = Some(socket),
    )
    .unwrap()
}

/// The value after `key` on the console (up to the end of its line).
fn field<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|line| line.split_once(key).map(|(_, rest)| rest.trim()))
        .unwrap_or_else(|| panic!("{key:?} not on the console:\n{console}"))
}

#[test]
fn linux_guest_gets_dhcp_pings_resolves_transfers_both_ways_and_is_reachable_when_published() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 << 20;
    let blob = pattern(size);
    let want = sha256_hex(&blob);
    let http = http_server(blob);
    let sink = sha_sink();
    let dns = dns_server(DNS_NAME, DNS_ANSWER);
    let published = free_port();
    let (mut daemon, socket) = daemon(
        dir.path(),
        "net",
        &[
            "--dns".into(),
            dns.to_string(),
            "--publish".into(),
            format!("127.0.0.1:{published}:8080"),
        ],
    );
    let script = format!(
        "ping -c 2 -W 5 10.0.2.2 && echo PING-OK
echo \"RESOLVED $(nslookup {DNS_NAME} | tr '\\n' ' ')\"
wget -q -O /tmp/blob http://10.0.2.2:{http_port}/blob && echo \"GET-SHA $(sha256sum /tmp/blob)\"
echo \"PUT $(nc 10.0.2.2 {sink_port} < /tmp/blob)\"
(echo published-hello | nc -l -p 8080) &
sleep 1
echo PUBLISH-READY
wait
echo NET-DONE
reboot -f
",
        http_port = http.port(),
        sink_port = sink.port(),
    );
    let mut qemu = boot(dir.path(), &script, &socket);

    qemu.wait_for("PUBLISH-READY", BOOT + TRANSFER).unwrap();
    // A host client on the published port reaches `nc -l` in the guest.
    let deadline = Instant::now() + Duration::from_secs(60);
    let greeting = loop {
        let mut got = String::new();
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", published)) {
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut buf = [0u8; 64];
            while !got.contains('\n') {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        }
        if got.contains('\n') || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let log = || std::fs::read_to_string(dir.path().join("net.log")).unwrap_or_default();
    assert_eq!(
        greeting,
        "published-hello\n",
        "console:\n{}\ndaemon log:\n{}",
        qemu.console(),
        log()
    );

    let console = qemu.wait_for("NET-DONE", TRANSFER).unwrap();
    let context = format!("console:\n{console}\ndaemon log:\n{}", log());
    assert!(
        console.contains("DHCP-BOUND ip=10.0.2.15 router=10.0.2.2 dns=10.0.2.3"),
        "{context}"
    );
    assert!(console.contains("PING-OK"), "{context}");
    assert!(
        field(&console, "RESOLVED").contains(&DNS_ANSWER.to_string()),
        "{context}"
    );
    assert!(field(&console, "GET-SHA").starts_with(&want), "{context}");
    assert_eq!(
        field(&console, "PUT "),
        format!("{size} {want}"),
        "{context}"
    );
    qemu.finish().unwrap();
    assert!(daemon.wait_exit(Duration::from_secs(10)).unwrap().success());
}

#[test]
fn two_guests_with_the_same_mac_and_address_both_fetch_at_once() {
    let size = 8 << 20;
    let blob = pattern(size);
    let want = sha256_hex(&blob);
    let http = http_server(blob);
    let sink = sha_sink();
    let dns = dns_server(DNS_NAME, DNS_ANSWER);
    let script = format!(
        "wget -q -O /tmp/blob http://10.0.2.2:{http_port}/blob && echo \"GET-SHA $(sha256sum /tmp/blob)\"
echo \"PUT $(nc 10.0.2.2 {sink_port} < /tmp/blob)\"
echo \"RESOLVED $(nslookup {DNS_NAME} | tr '\\n' ' ')\"
echo TWO-DONE
reboot -f
",
        http_port = http.port(),
        sink_port = sink.port(),
    );
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut guests: Vec<_> = dirs
        .iter()
        .map(|dir| {
            let (daemon, socket) = daemon(dir.path(), "net", &["--dns".into(), dns.to_string()]);
            // Both QEMUs give the guest the same default MAC, 52:54:00:12:34:56.
            (daemon, boot(dir.path(), &script, &socket))
        })
        .collect();
    for (i, (daemon, qemu)) in guests.iter_mut().enumerate() {
        let console = qemu.wait_for("TWO-DONE", BOOT + TRANSFER).unwrap();
        let context = format!("guest {i} console:\n{console}");
        assert!(
            console.contains("DHCP-BOUND ip=10.0.2.15 router=10.0.2.2 dns=10.0.2.3"),
            "{context}"
        );
        assert!(field(&console, "GET-SHA").starts_with(&want), "{context}");
        assert_eq!(
            field(&console, "PUT "),
            format!("{size} {want}"),
            "{context}"
        );
        assert!(
            field(&console, "RESOLVED").contains(&DNS_ANSWER.to_string()),
            "{context}"
        );
        qemu.finish().unwrap();
        assert!(daemon.wait_exit(Duration::from_secs(10)).unwrap().success());
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_thousand_short_connections_leave_the_daemon_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let http = http_server(b"tiny\n".to_vec());
    let (daemon, socket) = daemon(dir.path(), "net", &["--dns".into(), "127.0.0.1:9".into()]);
    let pid = daemon.pid().unwrap();
    let fetches = |n: u32, marker: &str| {
        format!(
            "i=0; while [ $i -lt {n} ]; do wget -q -O /dev/null http://10.0.2.2:{port}/ || echo FETCH-FAILED; i=$((i+1)); done
echo {marker}
sleep 3
",
            port = http.port()
        )
    };
    let script = format!(
        "{}{}echo SHORT-DONE\nreboot -f\n",
        fetches(100, "WARM-DONE"),
        fetches(1000, "THOUSAND-DONE")
    );
    let mut qemu = boot(dir.path(), &script, &socket);
    qemu.wait_for("WARM-DONE", BOOT + TRANSFER).unwrap();
    sleep_a_second();
    let (warm, warm_fds) = (rss_kib(pid), open_fds(pid));
    let started = Instant::now();
    let console = qemu.wait_for("THOUSAND-DONE", TRANSFER).unwrap();
    let elapsed = started.elapsed();
    sleep_a_second();
    let (after, after_fds) = (rss_kib(pid), open_fds(pid));
    println!(
        "1000 connections in {:.1} s ({:.0}/s); daemon RSS {warm} KiB after 100, {after} KiB \
         after 1100; {warm_fds} then {after_fds} open descriptors",
        elapsed.as_secs_f64(),
        1000.0 / elapsed.as_secs_f64()
    );
    // Closed flows are gone with their host sockets.
    assert!(
        after_fds <= warm_fds + 4,
        "{warm_fds} -> {after_fds} descriptors"
    );
    assert!(!console.contains("FETCH-FAILED"), "{console}");
    assert!(
        after < warm + 4096,
        "RSS grew from {warm} KiB to {after} KiB over 1000 connections"
    );
    qemu.wait_for("SHORT-DONE", BOOT).unwrap();
    qemu.finish().unwrap();
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn sleep_a_second() {
    std::thread::sleep(Duration::from_secs(1));
}
