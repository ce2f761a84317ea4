//! `microagent-vhost-net` driven by the host-side frontend harness playing the guest's
//! virtio-net driver: config space, malformed frames that must not crash the daemon,
//! QEMU's early SET_VRING_ENABLE, TCP through the gateway, and save → load.

use microagent_integration::daemon::Daemon;
use microagent_integration::frontend::Setup;
use microagent_integration::net_guest::{
    arp_reply_for, arp_request, parse_tcp, tcp_segment, NetGuest, GUEST_MAC,
};
use microagent_vhost_net::frame::{DNS, GATEWAY, GATEWAY_MAC, GUEST};
use microagent_vhost_net::smoltcp::wire::{Ipv4Address, Ipv4Packet, TcpControl, TcpPacket};
use microagent_vhost_net::virtio::HEADER_LEN;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(10);

struct Rig {
    dir: TempDir,
    socket: PathBuf,
    log: PathBuf,
    daemon: Daemon,
}

fn start(extra: &[&str]) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let log = dir.path().join("net.log");
    let mut args = vec!["--dns", "127.0.0.1:9"];
    args.extend_from_slice(extra);
    let daemon = Daemon::start_logged("microagent-vhost-net", &socket, args, &log).unwrap();
    Rig {
        dir,
        socket,
        log,
        daemon,
    }
}

impl Rig {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_alive(&mut self) {
        let status = self.daemon.try_status().unwrap();
        assert!(
            status.is_none(),
            "daemon ended ({status:?}):\n{}",
            self.log()
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("daemon log:\n{}", self.log());
        }
    }
}

fn arp_gateway(guest: &mut NetGuest, ip: Ipv4Address) {
    guest.send(&arp_request(ip));
    let reply = guest.recv_until("ARP reply", |f| arp_reply_for(f, ip).is_some());
    assert_eq!(arp_reply_for(&reply, ip), Some(GATEWAY_MAC));
}

#[test]
fn config_space_shows_the_mac_link_up_and_mtu_and_arp_answers_for_gateway_and_dns() {
    let mut rig = start(&["--mac", "52:54:00:ab:cd:ef"]);
    let mut guest = NetGuest::new(&rig.socket);
    let config = guest.fe.config(12).unwrap();
    assert_eq!(
        config,
        [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, 1, 0, 1, 0, 0xdc, 0x05]
    );
    arp_gateway(&mut guest, GATEWAY);
    arp_gateway(&mut guest, DNS);
    // Nobody answers for the guest's own address or others on the network.
    guest.send(&arp_request(GUEST));
    guest.send(&arp_request(Ipv4Address::new(10, 0, 2, 77)));
    assert!(guest.try_recv(Duration::from_millis(500)).is_none());
    rig.assert_alive();
}

/// A deterministic byte stream (xorshift).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn malformed_frames_do_not_crash_the_daemon_and_it_keeps_answering() {
    let mut rig = start(&[]);
    let mut guest = NetGuest::new(&rig.socket);
    let good = arp_request(GATEWAY);
    let syn = tcp_segment(40000, (GATEWAY, 9), TcpControl::Syn, 1, None);

    // Chains shorter than the virtio-net header, a header alone, a header split over
    // descriptors, and frames cut at every length.
    guest.send_raw(&[], &[0]);
    guest.send_raw(&[0; 5], &[5]);
    guest.send_raw(&[0; HEADER_LEN], &[HEADER_LEN]);
    for frame in [&good, &syn] {
        for len in 0..frame.len() {
            guest.send(&frame[..len]);
        }
    }
    let mut split = vec![0u8; HEADER_LEN];
    split.extend_from_slice(&good);
    guest.send_raw(&split, &[3, 9, 1, split.len() - 13]);
    // Oversized: a jumbo frame and a 64 KiB one.
    let mut jumbo = syn.clone();
    jumbo.resize(9000, 0xaa);
    guest.send(&jumbo);
    guest.send(&vec![0x55; 64 << 10]);
    // IPv4 with bad lengths, options, a fragment, a bad checksum; TCP with a bad one.
    for mutate in [
        |f: &mut Vec<u8>| f[16] = 0xff,  // total length past the frame
        |f: &mut Vec<u8>| f[14] = 0x4f,  // header length 60 > total
        |f: &mut Vec<u8>| f[14] = 0x43,  // header length 12 < 20
        |f: &mut Vec<u8>| f[20] |= 0x20, // more fragments
        |f: &mut Vec<u8>| f[21] = 8,     // fragment offset
        |f: &mut Vec<u8>| f[24] ^= 0xff, // IP checksum
        |f: &mut Vec<u8>| *f.last_mut().unwrap() ^= 0xff, // TCP checksum
        |f: &mut Vec<u8>| f[46] = 0xf0,  // TCP data offset past the segment
        |f: &mut Vec<u8>| f[23] = 99,    // unknown protocol
    ] {
        let mut frame = syn.clone();
        mutate(&mut frame);
        guest.send(&frame);
        let mut fixed = frame.clone();
        if let Ok(mut ip) = Ipv4Packet::new_checked(&mut fixed[14..]) {
            ip.fill_checksum();
            guest.send(&fixed);
        }
    }
    // IP options (a 24-byte header with a no-op option): well formed, must not panic.
    let mut options = syn.clone();
    options.splice(34..34, [1u8, 1, 1, 0]);
    options[14] = 0x46;
    let total = u16::from_be_bytes([options[16], options[17]]) + 4;
    options[16..18].copy_from_slice(&total.to_be_bytes());
    Ipv4Packet::new_unchecked(&mut options[14..]).fill_checksum();
    guest.send(&options);
    // Sources no guest has, checksums valid: a SYN from 0.0.0.0 panicked the worker
    // inside smoltcp (an answer to 0.0.0.0), found by the net_frames fuzz target.
    for src in [[0, 0, 0, 0], [255; 4], [224, 0, 0, 1], [127, 0, 0, 1]] {
        let mut frame = syn.clone();
        frame[26..30].copy_from_slice(&src);
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.fill_checksum();
        let (from, to) = (ip.src_addr(), ip.dst_addr());
        TcpPacket::new_unchecked(ip.payload_mut()).fill_checksum(&from.into(), &to.into());
        guest.send(&frame);
        arp_gateway(&mut guest, GATEWAY);
    }
    rig.assert_alive();
    // Noise: random frames, some with a plausible Ethernet/IPv4 start.
    for i in 0..2000u64 {
        let len = (i as usize * 37) % 1600;
        let mut frame = noise(i, len);
        if i % 2 == 0 && len > 34 {
            frame[..34].copy_from_slice(&syn[..34]);
        }
        guest.send(&frame);
    }
    rig.assert_alive();
    // Still answering, without the noise having queued anything unbounded.
    while guest.try_recv(Duration::from_millis(200)).is_some() {}
    arp_gateway(&mut guest, GATEWAY);
    rig.assert_alive();
}

#[test]
fn ring_enable_before_features_as_qemu_sends_it_keeps_the_session() {
    let rig = start(&[]);
    let mut raw = UnixStream::connect(&rig.socket).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    let message = |request: u32, flags: u32, payload: &[u8]| {
        let mut bytes = request.to_le_bytes().to_vec();
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes
    };
    const VERSION_1: u32 = 1;
    const NEED_REPLY: u32 = 8;
    // SET_OWNER, then SET_VRING_ENABLE(0, 1) asking for a reply, before SET_FEATURES.
    raw.write_all(&message(3, VERSION_1, &[])).unwrap();
    let mut enable = 0u32.to_le_bytes().to_vec();
    enable.extend_from_slice(&1u32.to_le_bytes());
    raw.write_all(&message(18, VERSION_1 | NEED_REPLY, &enable))
        .unwrap();
    let mut ack = [0u8; 20];
    raw.read_exact(&mut ack).unwrap();
    assert_eq!(u32::from_le_bytes(ack[..4].try_into().unwrap()), 18);
    assert_eq!(u64::from_le_bytes(ack[12..].try_into().unwrap()), 0);
    // The session goes on: GET_FEATURES is answered.
    raw.write_all(&message(1, VERSION_1, &[])).unwrap();
    let mut reply = [0u8; 20];
    raw.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_le_bytes(reply[..4].try_into().unwrap()), 1);
    let features = u64::from_le_bytes(reply[12..].try_into().unwrap());
    assert_ne!(features & 1 << 32, 0, "VERSION_1 offered: {features:#x}");
}

/// Opens a TCP connection from the guest to `port` on the gateway (the host's
/// loopback); returns the device's initial sequence number.
fn guest_connect(guest: &mut NetGuest, src_port: u16, port: u16) -> u32 {
    guest.send(&tcp_segment(
        src_port,
        (GATEWAY, port),
        TcpControl::Syn,
        1000,
        None,
    ));
    let syn_ack = guest.recv_until("SYN-ACK", |f| {
        parse_tcp(f).is_some_and(|s| s.syn && s.ack && s.dst_port == src_port)
    });
    let s = parse_tcp(&syn_ack).unwrap();
    assert_eq!(s.ack_number, 1001);
    guest.send(&tcp_segment(
        src_port,
        (GATEWAY, port),
        TcpControl::None,
        1001,
        Some(s.seq.wrapping_add(1)),
    ));
    s.seq
}

#[test]
fn guest_syn_to_the_gateway_reaches_a_host_listener_on_loopback() {
    let mut rig = start(&[]);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut guest = NetGuest::new(&rig.socket);
    guest_connect(&mut guest, 40001, port);
    listener.set_nonblocking(false).unwrap();
    let (_conn, peer) = listener.accept().unwrap();
    assert!(peer.ip().is_loopback());
    // A SYN to a closed port is reset.
    let closed = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    guest.send(&tcp_segment(
        40002,
        (GATEWAY, closed_port),
        TcpControl::Syn,
        5,
        None,
    ));
    guest.recv_until("RST", |f| {
        parse_tcp(f).is_some_and(|s| s.rst && s.dst_port == 40002)
    });
    rig.assert_alive();
}

#[test]
fn after_save_and_load_old_flows_are_reset_new_ones_work_and_the_mac_is_kept() {
    let rig = start(&["--mac", "52:54:00:00:00:01"]);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut guest = NetGuest::new(&rig.socket);
    let server_isn = guest_connect(&mut guest, 40010, port);
    let (_old, _) = listener.accept().unwrap();
    guest.fe.stop().unwrap();
    let state = guest.fe.save_state().unwrap();
    drop(guest);
    let mut rig = rig;
    assert!(rig.daemon.wait_exit(WAIT).unwrap().success());
    let dir = &rig.dir;

    // The new daemon has another --mac; the guest keeps the one it read at boot.
    let socket = dir.path().join("restored.sock");
    let log = dir.path().join("restored.log");
    let mut restored = Daemon::start_logged(
        "microagent-vhost-net",
        &socket,
        ["--dns", "127.0.0.1:9", "--mac", "52:54:00:00:00:02"],
        &log,
    )
    .unwrap();
    let mut guest = NetGuest::connect(
        &socket,
        Setup {
            queues: 2,
            load_state: Some(state),
            ..Setup::default()
        },
    );
    assert_eq!(guest.fe.config(6).unwrap(), [0x52, 0x54, 0, 0, 0, 1]);
    // A segment of the old connection is answered with a reset.
    guest.send(&tcp_segment(
        40010,
        (GATEWAY, port),
        TcpControl::Psh,
        1001,
        Some(server_isn.wrapping_add(1)),
    ));
    guest.recv_until("RST for the old flow", |f| {
        parse_tcp(f).is_some_and(|s| s.rst && s.dst_port == 40010)
    });
    // A new connection works.
    guest_connect(&mut guest, 40011, port);
    let (_new, _) = listener.accept().unwrap();
    assert!(restored.try_status().unwrap().is_none());
}

#[test]
fn dhcp_discover_is_offered_the_guest_address_over_the_rings() {
    use microagent_vhost_net::frame::udp_frame;
    use microagent_vhost_net::smoltcp::wire::{
        DhcpMessageType, DhcpPacket, DhcpRepr, EthernetFrame, IpProtocol, UdpPacket,
    };
    use std::net::SocketAddrV4;
    let mut rig = start(&[]);
    let mut guest = NetGuest::new(&rig.socket);
    let discover = DhcpRepr {
        message_type: DhcpMessageType::Discover,
        transaction_id: 0xfeed,
        secs: 0,
        client_hardware_address: GUEST_MAC,
        client_ip: Ipv4Address::UNSPECIFIED,
        your_ip: Ipv4Address::UNSPECIFIED,
        server_ip: Ipv4Address::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Address::UNSPECIFIED,
        broadcast: false,
        requested_ip: None,
        client_identifier: Some(GUEST_MAC),
        server_identifier: None,
        parameter_request_list: Some(&[1, 3, 6]),
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let mut payload = vec![0u8; discover.buffer_len()];
    discover
        .emit(&mut DhcpPacket::new_unchecked(&mut payload[..]))
        .unwrap();
    let mut frame = udp_frame(
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
        SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
        GUEST_MAC,
        &payload,
    )
    .unwrap();
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(GUEST_MAC.as_bytes());
    guest.send(&frame);
    let offer = guest.recv_until("DHCP offer", |f| {
        let Ok(eth) = EthernetFrame::new_checked(f) else {
            return false;
        };
        Ipv4Packet::new_checked(eth.payload()).is_ok_and(|ip| ip.next_header() == IpProtocol::Udp)
    });
    let eth = EthernetFrame::new_checked(&offer[..]).unwrap();
    assert_eq!(eth.dst_addr(), GUEST_MAC);
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert_eq!(ip.src_addr(), GATEWAY);
    let udp = UdpPacket::new_checked(ip.payload()).unwrap();
    assert_eq!((udp.src_port(), udp.dst_port()), (67, 68));
    let dhcp = DhcpPacket::new_checked(udp.payload()).unwrap();
    let repr = DhcpRepr::parse(&dhcp).unwrap();
    assert_eq!(repr.message_type, DhcpMessageType::Offer);
    assert_eq!(repr.your_ip, GUEST);
    assert_eq!(repr.transaction_id, 0xfeed);
    rig.assert_alive();
}

#[test]
fn a_udp_flow_to_the_gateway_reaches_a_host_socket_and_the_answer_comes_back() {
    use microagent_vhost_net::frame::udp_frame;
    use microagent_vhost_net::smoltcp::wire::{EthernetFrame, UdpPacket};
    use std::net::{SocketAddrV4, UdpSocket};
    let mut rig = start(&[]);
    let echo = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = echo.send_to(&reply, from);
        }
    });
    let mut guest = NetGuest::new(&rig.socket);
    let mut frame = udp_frame(
        SocketAddrV4::new(GUEST, 5000),
        SocketAddrV4::new(GATEWAY, port),
        GATEWAY_MAC,
        b"ping",
    )
    .unwrap();
    frame[6..12].copy_from_slice(GUEST_MAC.as_bytes());
    guest.send(&frame);
    let answer = guest.recv_until("UDP answer", |f| {
        let Ok(eth) = EthernetFrame::new_checked(f) else {
            return false;
        };
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return false;
        };
        UdpPacket::new_checked(ip.payload()).is_ok_and(|u| u.dst_port() == 5000)
    });
    let eth = EthernetFrame::new_checked(&answer[..]).unwrap();
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert_eq!((ip.src_addr(), ip.dst_addr()), (GATEWAY, GUEST));
    let udp = UdpPacket::new_checked(ip.payload()).unwrap();
    assert_eq!(udp.src_port(), port);
    assert_eq!(udp.payload(), b"echo:ping");
    rig.assert_alive();
}

/// A daemon publishing a free UDP port on 127.0.0.1 to the guest's port 7000.
fn start_publishing_udp_to_7000() -> (std::net::SocketAddr, Rig) {
    let published = std::net::SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        microagent_integration::net_services::free_udp_port(),
    ));
    let rig = start(&["--publish", &format!("{published}:7000/udp")]);
    (published, rig)
}

/// A `--publish .../udp` port: each host sender's datagrams reach the guest's port from
/// a gateway port of that sender's own (kept for its later datagrams), and the guest's
/// replies to that gateway port go back to that sender from the published address.
#[test]
fn datagrams_to_a_published_udp_port_reach_the_guest_and_replies_return_to_each_sender() {
    use microagent_vhost_net::frame::udp_frame;
    use microagent_vhost_net::smoltcp::wire::{EthernetFrame, UdpPacket};
    use std::net::{SocketAddrV4, UdpSocket};
    let (published, mut rig) = start_publishing_udp_to_7000();
    let mut guest = NetGuest::new(&rig.socket);
    let senders: Vec<UdpSocket> = (0..2)
        .map(|_| {
            let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s
        })
        .collect();
    // (gateway port, payload) of a datagram to the guest's port 7000.
    let receive = |guest: &mut NetGuest| {
        let frame = guest.recv_until("a datagram to guest port 7000", |f| {
            let Ok(eth) = EthernetFrame::new_checked(f) else {
                return false;
            };
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                return false;
            };
            UdpPacket::new_checked(ip.payload()).is_ok_and(|u| u.dst_port() == 7000)
        });
        let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(eth.dst_addr(), GUEST_MAC);
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (GATEWAY, GUEST));
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        (udp.src_port(), udp.payload().to_vec())
    };
    let mut gateway_ports = Vec::new();
    for (i, sender) in senders.iter().enumerate() {
        sender
            .send_to(format!("hello-{i}").as_bytes(), published)
            .unwrap();
        let (port, payload) = receive(&mut guest);
        assert_eq!(payload, format!("hello-{i}").as_bytes());
        gateway_ports.push(port);
    }
    assert_ne!(
        gateway_ports[0], gateway_ports[1],
        "one gateway port per sender"
    );
    // A sender's next datagram comes from the same gateway port.
    senders[0].send_to(b"again", published).unwrap();
    assert_eq!(receive(&mut guest), (gateway_ports[0], b"again".to_vec()));

    // The guest answers each gateway port; each sender gets its own answer.
    for (i, port) in gateway_ports.iter().enumerate().rev() {
        let mut frame = udp_frame(
            SocketAddrV4::new(GUEST, 7000),
            SocketAddrV4::new(GATEWAY, *port),
            GATEWAY_MAC,
            format!("reply-{i}").as_bytes(),
        )
        .unwrap();
        frame[6..12].copy_from_slice(GUEST_MAC.as_bytes());
        guest.send(&frame);
    }
    for (i, sender) in senders.iter().enumerate() {
        let mut buf = [0u8; 64];
        let (n, from) = sender.recv_from(&mut buf).unwrap();
        assert_eq!(from, published);
        assert_eq!(&buf[..n], format!("reply-{i}").as_bytes());
    }
    rig.assert_alive();
}

/// Senders to a published UDP port share the UDP flow limit: past it, a new sender's
/// datagrams are dropped while senders that have a flow still get through.
#[test]
fn senders_to_a_published_udp_port_beyond_the_flow_limit_are_dropped() {
    use microagent_vhost_net::nat::MAX_UDP_FLOWS;
    use microagent_vhost_net::smoltcp::wire::{EthernetFrame, UdpPacket};
    use std::collections::HashSet;
    use std::net::UdpSocket;
    let (published, mut rig) = start_publishing_udp_to_7000();
    let mut guest = NetGuest::new(&rig.socket);
    let senders: Vec<UdpSocket> = (0..MAX_UDP_FLOWS + 40)
        .map(|_| UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
        .collect();
    let payload_of = |f: &[u8]| -> Option<Vec<u8>> {
        let eth = EthernetFrame::new_checked(f).ok()?;
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        let udp = UdpPacket::new_checked(ip.payload()).ok()?;
        (udp.dst_port() == 7000).then(|| udp.payload().to_vec())
    };
    let mut delivered = HashSet::new();
    // In batches, each closed by a marker from sender 0 (whose flow exists from the
    // first batch on): datagrams on one socket are taken in order, so once the marker
    // arrives every datagram sent before it was either delivered or dropped.
    for (batch, chunk) in senders.chunks(32).enumerate() {
        for (i, sender) in chunk.iter().enumerate() {
            let n = batch * 32 + i;
            sender
                .send_to(format!("from-{n}").as_bytes(), published)
                .unwrap();
        }
        let marker = format!("marker-{batch}");
        senders[0].send_to(marker.as_bytes(), published).unwrap();
        loop {
            let frame =
                guest.recv_until("a datagram to guest port 7000", |f| payload_of(f).is_some());
            let payload = String::from_utf8(payload_of(&frame).unwrap()).unwrap();
            if payload == marker {
                break;
            }
            assert!(delivered.insert(payload.clone()), "{payload} twice");
        }
    }
    let expected: HashSet<String> = (0..MAX_UDP_FLOWS).map(|n| format!("from-{n}")).collect();
    assert_eq!(delivered, expected);
    rig.assert_alive();
}

#[test]
fn syns_beyond_the_flow_limit_are_reset_and_the_limit_holds() {
    use microagent_vhost_net::nat::MAX_TCP_FLOWS;
    let mut rig = start(&[]);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut guest = NetGuest::new(&rig.socket);
    let attempts = MAX_TCP_FLOWS + 44;
    let (mut accepted, mut reset) = (0, 0);
    for i in 0..attempts {
        let src = 20000 + i as u16;
        guest.send(&tcp_segment(src, (GATEWAY, port), TcpControl::Syn, 7, None));
        let answer = guest.recv_until("SYN-ACK or RST", |f| {
            parse_tcp(f).is_some_and(|s| s.dst_port == src && (s.rst || (s.syn && s.ack)))
        });
        match parse_tcp(&answer) {
            Some(s) if s.rst => reset += 1,
            _ => accepted += 1,
        }
    }
    assert_eq!((accepted, reset), (MAX_TCP_FLOWS, attempts - MAX_TCP_FLOWS));
    rig.assert_alive();
}

#[test]
fn with_event_idx_arp_and_tcp_still_flow() {
    let mut rig = start(&[]);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut guest = NetGuest::connect(
        &rig.socket,
        Setup {
            queues: 2,
            refuse_features: 0,
            ..Setup::default()
        },
    );
    assert_ne!(
        guest.fe.features & 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
        0
    );
    for _ in 0..3 {
        arp_gateway(&mut guest, GATEWAY);
    }
    for i in 0..3 {
        guest_connect(&mut guest, 41000 + i, port);
        listener.accept().unwrap();
    }
    rig.assert_alive();
}
