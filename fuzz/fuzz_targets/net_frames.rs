//! vhost-net: frames from the guest into the user network (`Net::guest_frame`: the
//! frame sorter, the DHCP server, UDP relaying, smoltcp's ARP, ICMP, IPv4 and TCP), then
//! the stack's poll, which moves data between flows and host sockets, as the backend's
//! worker drives them. Truncated headers, bad lengths and checksums, IP options,
//! fragments and oversized frames must never panic, and every frame for the guest must
//! fit the link.
//!
//! The process moves into a network namespace of its own first (root), with only its
//! loopback up: guest flows to the gateway (the host's loopback) reach a TCP listener
//! on 127.0.0.1:8080 and a UDP "resolver" on 127.0.0.1:5353, and flows to any other
//! address leave no machine.
//!
//! Input: frames, each a little-endian u16 length and that many bytes; the stack is
//! polled after every fourth frame and at the end.

#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use microagent_vhost_net::config::{Args, NetConfig};
use microagent_vhost_net::frame::MAX_FRAME;
use microagent_vhost_net::stack::{Net, Poller, Published};
use std::net::{TcpListener, UdpSocket};
use std::sync::OnceLock;

struct Host {
    config: NetConfig,
    epoll: i32,
    service: TcpListener,
    _resolver: UdpSocket,
}

/// Brings `lo` up in this network namespace.
fn loopback_up() {
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0, "fuzz: a socket for ioctl");
    // SAFETY: ifreq is plain data; all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq that outlives the calls.
    unsafe {
        assert!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) >= 0, "fuzz: lo flags");
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req) >= 0, "fuzz: lo up");
        libc::close(fd);
    }
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        // SAFETY: unshare takes no pointers; it moves this process (one thread yet).
        let private = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            private, 0,
            "fuzz: net_frames needs root to run in a network namespace of its own"
        );
        loopback_up();
        let service = TcpListener::bind("127.0.0.1:8080").expect("fuzz: the TCP service");
        service
            .set_nonblocking(true)
            .expect("fuzz: a non-blocking listener");
        let resolver = UdpSocket::bind("127.0.0.1:5353").expect("fuzz: the resolver");
        let config = NetConfig::try_from(Args::parse_from([
            "fuzz",
            "--socket-path",
            "/nonexistent/net.sock",
            "--dns",
            "127.0.0.1:5353",
        ]))
        .expect("fuzz: a config");
        // SAFETY: epoll_create1 takes no pointers; the descriptor lives for the process.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0, "fuzz: epoll_create1");
        Host {
            config,
            epoll,
            service,
            _resolver: resolver,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let host = host();
    let poller = Poller {
        epoll: host.epoll,
        id: 9,
    };
    let Ok(mut net) = Net::new(&host.config, Published::default(), poller) else {
        return;
    };
    let mut rest = data;
    let mut count = 0;
    while let [lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (frame, next) = tail.split_at(len);
        net.guest_frame(frame);
        rest = next;
        count += 1;
        if count % 4 == 0 {
            let _ = net.poll();
        }
    }
    // Connections the flows made: accepted and closed, so the host ends see hangups.
    while host.service.accept().is_ok() {}
    let _ = net.poll();
    for frame in net.link.to_guest.drain(..) {
        assert!(frame.len() <= MAX_FRAME, "a {}-byte frame for the guest", frame.len());
        assert!(frame.len() >= 14, "a frame without an Ethernet header");
    }
});
