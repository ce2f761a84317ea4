//! Tap mode of microagent-vhost-net on this machine (root): the KVM test guest under
//! microagent-vmm, our daemon attached to a tap in a network namespace made by
//! `microagent_vhost_net::netns` (as `microagent create --net tap` makes it), the
//! namespace's kernel as the gateway, NAT to the host. Also what is left behind after a
//! SIGKILL, and the error without privileges.

use microagent_integration::daemon::{self, Daemon};
use microagent_integration::tap_net;
use microagent_integration::vmm::VmmArgs;
use microagent_vhost_net::netns::{self, TapNetwork};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const RUN: Duration = Duration::from_secs(60);

/// A tap network removed when dropped (a failing test leaves nothing behind).
struct NetGuard(TapNetwork);

impl NetGuard {
    fn create(tag: &str) -> Self {
        Self::with_dns(tag, None)
    }

    fn with_dns(tag: &str, dns: Option<SocketAddrV4>) -> Self {
        let name = format!("microagent-test-{}-{tag}", std::process::id());
        Self(netns::create(&name, dns).unwrap())
    }
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        let _ = netns::remove(&self.0.netns);
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The test guest through one tap network: ARP for the gateway and an ICMP echo (the
/// namespace's kernel answers both), then a UDP datagram to a service on the host's
/// end of the veth pair, which sees it come from the namespace's address (the
/// namespace's NAT) and replies through the NAT back to the guest.
fn guest_through(net: &TapNetwork, dir: &Path) {
    let service = UdpSocket::bind((net.host_addr(), 0)).unwrap();
    let SocketAddr::V4(dest) = service.local_addr().unwrap() else {
        unreachable!()
    };
    let from = udp_from_guest(net, dir, service, dest);
    assert_eq!(
        from.ip(),
        net.netns_addr(),
        "the guest's 10.0.2.15 is translated"
    );
}

/// Runs the test guest with `net_udp=DEST`; `service` answers the datagram with
/// `pong-through-nat`. Returns where the service saw it come from.
fn udp_from_guest(
    net: &TapNetwork,
    dir: &Path,
    service: UdpSocket,
    dest: SocketAddrV4,
) -> SocketAddr {
    let socket = dir.join("net.sock");
    service
        .set_read_timeout(Some(Duration::from_secs(50)))
        .unwrap();
    let host = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, from) = service.recv_from(&mut buf).unwrap();
        service.send_to(b"pong-through-nat", from).unwrap();
        (buf[..n].to_vec(), from)
    });
    let _daemon = Daemon::start_logged(
        "microagent-vhost-net",
        &socket,
        [
            "--mode",
            "tap",
            "--netns",
            &net.netns,
            "--mac",
            "52:54:00:12:34:99",
        ],
        &dir.join("net.log"),
    )
    .unwrap();
    let mut args = VmmArgs::test_guest(&format!("scenario=net net_udp={dest}"));
    args.extra = vec!["--net".into(), socket.into()];
    let (output, console) = args.run(dir, RUN).unwrap();
    let log = std::fs::read_to_string(dir.join("net.log")).unwrap_or_default();
    assert!(output.status.success(), "{output:?}\n{console}\n{log}");
    assert!(console.contains("NET-MAC=52:54:00:12:34:99\n"), "{console}");
    let gateway = microagent_vhost_net::frame::GATEWAY_MAC
        .0
        .map(|b| format!("{b:02x}"))
        .join(":");
    assert!(
        console.contains(&format!("NET-ARP={gateway}\n")),
        "{console}"
    );
    assert!(console.contains("NET-PING=ok\n"), "{console}\n{log}");
    assert!(
        console.contains("NET-UDP=pong-through-nat\n"),
        "{console}\n{log}"
    );
    assert!(!console.contains("NET-FAIL"), "{console}");
    let (payload, from) = host.join().unwrap();
    assert_eq!(payload, b"microagent-udp");
    from
}

/// The host's first global IPv4 address (one the namespace reaches through the NAT and
/// that is not the host's loopback).
fn host_global_ipv4() -> Ipv4Addr {
    let text = run("ip", &["-4", "-o", "addr", "show", "scope", "global"]);
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next()?.parse::<Ipv4Addr>().ok())
        .find(|ip| !ip.octets().starts_with(&[10, 201]))
        .expect("a global IPv4 address on this host")
}

/// With a resolver given, the guest's DNS address 10.0.2.3:53 is forwarded to it: the
/// guest's datagram to 10.0.2.3:53 reaches a "resolver" on a host address and the
/// answer comes back from 10.0.2.3:53 (the guest matches the reply's source).
#[test]
fn the_dns_address_of_a_tap_network_forwards_to_its_resolver() {
    let resolver = UdpSocket::bind((host_global_ipv4(), 0)).unwrap();
    let SocketAddr::V4(at) = resolver.local_addr().unwrap() else {
        unreachable!()
    };
    let net = NetGuard::with_dns("dns", Some(at));
    let dir = tempfile::tempdir().unwrap();
    let dns = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 53);
    let from = udp_from_guest(&net.0, dir.path(), resolver, dns);
    assert_eq!(from.ip(), net.0.netns_addr());
}

/// Two VMs at once, each in a namespace of its own with the same guest address and
/// MAC (as forks have): both get their ARP, echo and UDP reply.
#[test]
fn two_vms_with_the_same_guest_address_each_reach_the_host_through_their_tap_network() {
    let (a, b) = (NetGuard::create("a"), NetGuard::create("b"));
    assert_ne!(a.0.index, b.0.index);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::thread::scope(|s| {
        let first = s.spawn(|| guest_through(&a.0, dir_a.path()));
        guest_through(&b.0, dir_b.path());
        first.join().unwrap();
    });
}

/// A daemon attached to a tap network is SIGKILLed; removing the network (what
/// `microagent delete` does) leaves no namespace, veth or NAT rule of it.
#[test]
fn a_tap_network_leaves_nothing_behind_after_its_daemon_is_killed() {
    let net = NetGuard::create("kill");
    tap_net::assert_present(&net.0);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let mut daemon = Daemon::start(
        "microagent-vhost-net",
        &socket,
        ["--mode", "tap", "--netns", &net.0.netns],
    )
    .unwrap();
    let pid = daemon.pid().unwrap();
    // SAFETY: SIGKILL to the daemon this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    daemon.wait_exit(Duration::from_secs(10)).unwrap();
    netns::remove(&net.0.netns).unwrap();
    assert_eq!(tap_net::traces(&net.0), Vec::<String>::new());
    // Removing again is harmless (delete after a failed start, say).
    netns::remove(&net.0.netns).unwrap();
}

/// Without CAP_NET_ADMIN and CAP_SYS_ADMIN the daemon refuses tap mode with a code,
/// whether the tap is in a namespace or in its own.
#[test]
fn tap_mode_without_privileges_is_refused_with_a_code() {
    let net = NetGuard::create("nopriv");
    let dir = tempfile::tempdir().unwrap();
    let binary = daemon::binary("microagent-vhost-net").unwrap();
    let socket = dir.path().join("net.sock");
    let socket = socket.to_str().unwrap();
    let base = [
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        binary.to_str().unwrap(),
        "--socket-path",
        socket,
        "--mode",
        "tap",
    ];
    for extra in [
        &["--netns", net.0.netns.as_str()][..],
        &["--tap", "matest0"],
    ] {
        let out = Command::new("setpriv")
            .args(base)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(
            stderr.contains("[net.tap_needs_root] tap mode needs root"),
            "{extra:?}: {stderr}"
        );
        assert!(!Path::new(socket).exists());
    }
    assert!(!run("ip", &["-o", "link", "show"]).contains("matest0"));
}
