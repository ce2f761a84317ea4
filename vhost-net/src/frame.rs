//! Ethernet frames from the guest, sorted before anything acts on them, and the UDP
//! frames the daemon builds for the guest. Pure functions of bytes: they know nothing
//! about virtqueues or host sockets, and a malformed frame is a [`Verdict::Drop`] with
//! its reason, never a panic.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket, UdpRepr,
};
use std::net::SocketAddrV4;

/// The guest network (slirp's, so that guests configured for QEMU's user network work).
pub const GATEWAY: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
pub const DNS: Ipv4Address = Ipv4Address::new(10, 0, 2, 3);
pub const GUEST: Ipv4Address = Ipv4Address::new(10, 0, 2, 15);
pub const NETMASK: Ipv4Address = Ipv4Address::new(255, 255, 255, 0);
pub const PREFIX_LEN: u8 = 24;
/// The gateway's (and DNS server's) MAC, as slirp's.
pub const GATEWAY_MAC: EthernetAddress = EthernetAddress([0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]);

/// The link MTU, and the largest frame either way: MTU plus the Ethernet header.
pub const MTU: usize = 1500;
pub const MAX_FRAME: usize = MTU + ETHERNET_HEADER;
const ETHERNET_HEADER: usize = 14;
const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
/// Largest UDP payload that fits one frame (the daemon does not fragment).
pub const MAX_UDP_PAYLOAD: usize = MTU - IPV4_HEADER - UDP_HEADER;

/// What to do with one frame from the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// For the TCP/IP stack: ARP for our addresses, ICMP to them, TCP segments of
    /// existing flows.
    Stack,
    /// A TCP SYN opening a connection: a flow must exist before the stack sees it.
    TcpSyn {
        guest: SocketAddrV4,
        dest: SocketAddrV4,
    },
    /// A UDP datagram (DHCP, DNS, any other flow).
    Udp {
        guest: SocketAddrV4,
        dest: SocketAddrV4,
        payload: &'a [u8],
    },
    Drop(&'static str),
}

/// The guest's MAC (the frame's source) and what to do with the frame.
pub fn classify(frame: &[u8]) -> (Option<EthernetAddress>, Verdict<'_>) {
    if frame.len() > MAX_FRAME {
        return (None, Verdict::Drop("frame longer than the MTU"));
    }
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return (None, Verdict::Drop("truncated Ethernet header"));
    };
    let src = eth.src_addr();
    if !src.is_unicast() {
        return (None, Verdict::Drop("multicast source MAC"));
    }
    let verdict = match eth.ethertype() {
        EthernetProtocol::Arp => arp(eth.payload()),
        EthernetProtocol::Ipv4 => ipv4(eth.payload()),
        _ => Verdict::Drop("not IPv4 or ARP"),
    };
    (Some(src), verdict)
}

/// Only ARP requests for the gateway's and DNS server's addresses reach the stack
/// (which would otherwise, accepting any address, answer for every address).
fn arp(payload: &[u8]) -> Verdict<'_> {
    let Ok(packet) = ArpPacket::new_checked(payload) else {
        return Verdict::Drop("truncated ARP packet");
    };
    match ArpRepr::parse(&packet) {
        Ok(ArpRepr::EthernetIpv4 {
            operation,
            target_protocol_addr,
            ..
        }) => {
            let ours = target_protocol_addr == GATEWAY || target_protocol_addr == DNS;
            match operation {
                ArpOperation::Request if ours => Verdict::Stack,
                ArpOperation::Reply => Verdict::Stack,
                _ => Verdict::Drop("ARP not for the gateway"),
            }
        }
        _ => Verdict::Drop("unsupported ARP packet"),
    }
}

fn ipv4(payload: &[u8]) -> Verdict<'_> {
    let Ok(packet) = Ipv4Packet::new_checked(payload) else {
        return Verdict::Drop("truncated or inconsistent IPv4 header");
    };
    if packet.more_frags() || packet.frag_offset() != 0 {
        return Verdict::Drop("IPv4 fragment");
    }
    let caps = ChecksumCapabilities::default();
    let Ok(ip) = Ipv4Repr::parse(&packet, &caps) else {
        return Verdict::Drop("bad IPv4 header or checksum");
    };
    // The stack answers a source, and smoltcp panics when it is to send to 0.0.0.0
    // (found by fuzzing); a broadcast, multicast or loopback source is no guest's
    // either. Only a DHCP client, which has no address yet, sends from 0.0.0.0.
    let src = ip.src_addr;
    if src.is_broadcast() || src.is_multicast() || src.is_loopback() {
        return Verdict::Drop("IPv4 source not a unicast address");
    }
    if src.is_unspecified() && !is_dhcp_request(&ip, packet.payload()) {
        return Verdict::Drop("IPv4 source 0.0.0.0 outside DHCP");
    }
    let body = packet.payload();
    match ip.next_header {
        IpProtocol::Icmp if ip.dst_addr == GATEWAY || ip.dst_addr == DNS => Verdict::Stack,
        IpProtocol::Icmp => Verdict::Drop("ICMP beyond the gateway"),
        IpProtocol::Tcp => tcp(&ip, body),
        IpProtocol::Udp => udp(&ip, body),
        _ => Verdict::Drop("not ICMP, TCP or UDP"),
    }
}

/// A UDP datagram to the DHCP server port (checked in full by [`udp`]).
fn is_dhcp_request(ip: &Ipv4Repr, body: &[u8]) -> bool {
    ip.next_header == IpProtocol::Udp
        && UdpPacket::new_checked(body).is_ok_and(|d| d.dst_port() == crate::dhcp::SERVER_PORT)
}

fn tcp<'a>(ip: &Ipv4Repr, body: &'a [u8]) -> Verdict<'a> {
    let Ok(segment) = TcpPacket::new_checked(body) else {
        return Verdict::Drop("truncated TCP header");
    };
    if !segment.verify_checksum(&ip.src_addr.into(), &ip.dst_addr.into()) {
        return Verdict::Drop("bad TCP checksum");
    }
    if segment.syn() && !segment.ack() && !segment.rst() && !segment.fin() {
        return Verdict::TcpSyn {
            guest: SocketAddrV4::new(ip.src_addr, segment.src_port()),
            dest: SocketAddrV4::new(ip.dst_addr, segment.dst_port()),
        };
    }
    Verdict::Stack
}

fn udp<'a>(ip: &Ipv4Repr, body: &'a [u8]) -> Verdict<'a> {
    let Ok(datagram) = UdpPacket::new_checked(body) else {
        return Verdict::Drop("truncated UDP header or bad length");
    };
    let caps = ChecksumCapabilities::default();
    let Ok(udp) = UdpRepr::parse(&datagram, &ip.src_addr.into(), &ip.dst_addr.into(), &caps) else {
        return Verdict::Drop("bad UDP checksum");
    };
    if udp.src_port == 0 || udp.dst_port == 0 {
        return Verdict::Drop("UDP port 0");
    }
    let len = usize::from(datagram.len()).saturating_sub(UDP_HEADER);
    let payload = datagram.payload().get(..len).unwrap_or_default();
    Verdict::Udp {
        guest: SocketAddrV4::new(ip.src_addr, udp.src_port),
        dest: SocketAddrV4::new(ip.dst_addr, udp.dst_port),
        payload,
    }
}

/// The source address of an IPv4 frame on the guest network (the guest's own address).
pub fn guest_source(frame: &[u8]) -> Option<Ipv4Address> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let src = Ipv4Packet::new_checked(eth.payload()).ok()?.src_addr();
    let net = |a: Ipv4Address| u32::from(a) & u32::from(NETMASK);
    (net(src) == net(GATEWAY) && src != GATEWAY && src != DNS && !src.is_broadcast()).then_some(src)
}

/// An ARP reply from `ip` at `mac` to the gateway: fed to the stack so that it knows
/// the guest's MAC without asking (its first answer, after a restore say, would
/// otherwise be dropped while it asks).
pub fn arp_from_guest(mac: EthernetAddress, ip: Ipv4Address) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: mac,
        source_protocol_addr: ip,
        target_hardware_addr: GATEWAY_MAC,
        target_protocol_addr: GATEWAY,
    };
    let mut frame = vec![0u8; ETHERNET_HEADER + repr.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: mac,
        dst_addr: GATEWAY_MAC,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut eth);
    repr.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
    frame
}

/// An Ethernet/IPv4/UDP frame for the guest, checksums filled in. `None` when the
/// payload does not fit one frame.
pub fn udp_frame(
    from: SocketAddrV4,
    to: SocketAddrV4,
    to_mac: EthernetAddress,
    payload: &[u8],
) -> Option<Vec<u8>> {
    if payload.len() > MAX_UDP_PAYLOAD {
        return None;
    }
    let caps = ChecksumCapabilities::default();
    let udp = UdpRepr {
        src_port: from.port(),
        dst_port: to.port(),
    };
    let ip = Ipv4Repr {
        src_addr: *from.ip(),
        dst_addr: *to.ip(),
        next_header: IpProtocol::Udp,
        payload_len: UDP_HEADER + payload.len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: GATEWAY_MAC,
        dst_addr: to_mac,
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0u8; ETHERNET_HEADER + IPV4_HEADER + UDP_HEADER + payload.len()];
    let mut eth_frame = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut eth_frame);
    let mut ip_packet = Ipv4Packet::new_unchecked(eth_frame.payload_mut());
    ip.emit(&mut ip_packet, &caps);
    let mut udp_packet = UdpPacket::new_unchecked(ip_packet.payload_mut());
    udp.emit(
        &mut udp_packet,
        &from.ip().to_owned().into(),
        &to.ip().to_owned().into(),
        payload.len(),
        |buf| buf.copy_from_slice(payload),
        &caps,
    );
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    fn guest_udp(payload: &[u8]) -> Vec<u8> {
        let mut frame = udp_frame(
            SocketAddrV4::new(GUEST, 4000),
            SocketAddrV4::new(DNS, 53),
            GATEWAY_MAC,
            payload,
        )
        .unwrap();
        // Make it come from the guest.
        frame[6..12].copy_from_slice(GUEST_MAC.as_bytes());
        frame
    }

    #[test]
    fn a_built_udp_frame_parses_back_to_its_addresses_and_payload() {
        let frame = guest_udp(b"query");
        let (mac, verdict) = classify(&frame);
        assert_eq!(mac, Some(GUEST_MAC));
        assert_eq!(
            verdict,
            Verdict::Udp {
                guest: SocketAddrV4::new(GUEST, 4000),
                dest: SocketAddrV4::new(DNS, 53),
                payload: b"query",
            }
        );
    }

    #[test]
    fn truncated_oversized_and_corrupt_frames_are_dropped_with_a_reason() {
        let frame = guest_udp(b"query");
        for len in 0..frame.len() {
            let (_, verdict) = classify(&frame[..len]);
            assert!(matches!(verdict, Verdict::Drop(_)), "{len}: {verdict:?}");
        }
        let mut long = guest_udp(&[0; MAX_UDP_PAYLOAD]);
        assert!(matches!(classify(&long).1, Verdict::Udp { .. }));
        long.push(0);
        assert_eq!(
            classify(&long).1,
            Verdict::Drop("frame longer than the MTU")
        );

        let mut bad_sum = frame.clone();
        let last = bad_sum.len() - 1;
        bad_sum[last] ^= 0xff;
        assert_eq!(classify(&bad_sum).1, Verdict::Drop("bad UDP checksum"));

        // IPv4 total length larger than the frame.
        let mut bad_len = frame.clone();
        bad_len[16] = 0xff;
        assert!(matches!(classify(&bad_len).1, Verdict::Drop(_)));

        // A fragment (more-fragments flag), checksum fixed so only the flag differs.
        let mut fragment = frame.clone();
        fragment[20] |= 0x20;
        let mut ip = Ipv4Packet::new_unchecked(&mut fragment[14..]);
        ip.fill_checksum();
        assert_eq!(classify(&fragment).1, Verdict::Drop("IPv4 fragment"));
    }

    /// A frame from the guest to `dst` from `src`, protocol `proto`, with valid checksums
    /// (a TCP SYN or a UDP datagram to port 67).
    fn from_source(src: Ipv4Address, proto: IpProtocol) -> Vec<u8> {
        let (dst, payload) = match proto {
            IpProtocol::Tcp => {
                let mut seg = vec![0u8; 20];
                let mut tcp = TcpPacket::new_unchecked(&mut seg[..]);
                tcp.set_src_port(40000);
                tcp.set_dst_port(8080);
                tcp.set_header_len(20);
                tcp.set_syn(true);
                tcp.set_window_len(1024);
                tcp.fill_checksum(&src.into(), &GATEWAY.into());
                (GATEWAY, seg)
            }
            _ => {
                let mut seg = vec![0u8; 12];
                let mut udp = UdpPacket::new_unchecked(&mut seg[..]);
                udp.set_src_port(crate::dhcp::CLIENT_PORT);
                udp.set_dst_port(crate::dhcp::SERVER_PORT);
                udp.set_len(12);
                udp.fill_checksum(&src.into(), &Ipv4Address::BROADCAST.into());
                (Ipv4Address::BROADCAST, seg)
            }
        };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: proto,
            payload_len: payload.len(),
            hop_limit: 64,
        };
        let mut frame = vec![0u8; ETHERNET_HEADER + IPV4_HEADER + payload.len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        EthernetRepr {
            src_addr: GUEST_MAC,
            dst_addr: GATEWAY_MAC,
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut eth);
        let mut packet = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip.emit(&mut packet, &ChecksumCapabilities::default());
        packet.payload_mut().copy_from_slice(&payload);
        frame
    }

    #[test]
    fn sources_no_guest_can_have_are_dropped_and_dhcp_from_nowhere_passes() {
        let syn = |src| {
            let frame = from_source(src, IpProtocol::Tcp);
            match classify(&frame).1 {
                Verdict::TcpSyn { .. } => Ok(()),
                Verdict::Drop(why) => Err(why),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(syn(GUEST), Ok(()));
        assert_eq!(
            syn(Ipv4Address::UNSPECIFIED),
            Err("IPv4 source 0.0.0.0 outside DHCP")
        );
        for src in [
            Ipv4Address::BROADCAST,
            Ipv4Address::new(224, 0, 0, 1),
            Ipv4Address::new(127, 0, 0, 1),
        ] {
            assert_eq!(syn(src), Err("IPv4 source not a unicast address"));
        }
        let dhcp = from_source(Ipv4Address::UNSPECIFIED, IpProtocol::Udp);
        assert!(matches!(classify(&dhcp).1, Verdict::Udp { .. }));
    }

    #[test]
    fn payloads_too_large_for_one_frame_are_not_built() {
        let from = SocketAddrV4::new(DNS, 53);
        let to = SocketAddrV4::new(GUEST, 4000);
        assert!(udp_frame(from, to, GUEST_MAC, &[0; MAX_UDP_PAYLOAD + 1]).is_none());
        let frame = udp_frame(from, to, GUEST_MAC, &[0; MAX_UDP_PAYLOAD]).unwrap();
        assert_eq!(frame.len(), MAX_FRAME);
    }

    #[test]
    fn the_guest_source_is_an_address_on_its_network_other_than_ours() {
        assert_eq!(guest_source(&guest_udp(b"x")), Some(GUEST));
        let from_dns = udp_frame(
            SocketAddrV4::new(DNS, 53),
            SocketAddrV4::new(GUEST, 4000),
            GUEST_MAC,
            b"x",
        )
        .unwrap();
        assert_eq!(guest_source(&from_dns), None);
        let announce = arp_from_guest(GUEST_MAC, GUEST);
        assert_eq!(guest_source(&announce), None);
        assert_eq!(classify(&announce), (Some(GUEST_MAC), Verdict::Stack));
    }

    #[test]
    fn arp_reaches_the_stack_only_for_the_gateway_and_dns() {
        let arp_for = |target: Ipv4Address| {
            let repr = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: GUEST_MAC,
                source_protocol_addr: GUEST,
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: target,
            };
            let mut frame = vec![0u8; ETHERNET_HEADER + repr.buffer_len()];
            let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
            EthernetRepr {
                src_addr: GUEST_MAC,
                dst_addr: EthernetAddress::BROADCAST,
                ethertype: EthernetProtocol::Arp,
            }
            .emit(&mut eth);
            repr.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
            classify(&frame).1 == Verdict::Stack
        };
        assert!(arp_for(GATEWAY));
        assert!(arp_for(DNS));
        assert!(!arp_for(GUEST));
        assert!(!arp_for(Ipv4Address::new(10, 0, 2, 99)));
    }
}
