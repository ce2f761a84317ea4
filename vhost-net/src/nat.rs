//! Where guest flows go on the host, and the host end of each flow.

use crate::frame::{DNS, GATEWAY, NETMASK};
use smoltcp::iface::SocketHandle;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::Instant;

/// At most this many TCP flows (guest connections and published ones) at once; a SYN
/// beyond it is answered with a reset.
pub const MAX_TCP_FLOWS: usize = 256;
/// At most this many UDP flows (DNS and senders to published ports included); a
/// datagram opening one more is dropped.
pub const MAX_UDP_FLOWS: usize = 256;
/// Bytes buffered by the stack for each TCP flow, each way.
pub const TCP_BUFFER: usize = 128 << 10;
/// A UDP flow with no traffic either way for this long is closed.
pub const UDP_IDLE_SECS: u64 = 60;

/// The host address a guest flow to `dest` is connected to: the gateway is the host's
/// loopback, the DNS address (port 53) is the first upstream resolver, anything else on
/// the guest network, and broadcast or multicast, is refused (`None`).
pub fn host_addr(dest: SocketAddrV4, dns: &[SocketAddr]) -> Option<SocketAddr> {
    let ip = *dest.ip();
    let net = |a: Ipv4Addr| u32::from(a) & u32::from(NETMASK);
    if ip == GATEWAY {
        return Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            dest.port(),
        ));
    }
    if ip == DNS {
        return (dest.port() == 53).then(|| dns.first().copied()).flatten();
    }
    if net(ip) == net(GATEWAY)
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_unspecified()
        || ip.is_loopback()
    {
        return None;
    }
    Some(SocketAddr::V4(dest))
}

/// A non-blocking TCP connection to `to`, under way (EINPROGRESS) or done.
pub fn connect_tcp(to: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    match socket.connect(&SockAddr::from(to)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from(socket))
}

/// A non-blocking UDP socket connected to `to`.
pub fn connect_udp(to: SocketAddr) -> io::Result<UdpSocket> {
    let bind: SocketAddr = if to.ip().is_loopback() {
        (Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(to)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

#[derive(Debug)]
pub struct TcpFlow {
    pub handle: SocketHandle,
    pub host: TcpStream,
    /// The host connect has not completed yet.
    pub connecting: bool,
    /// The guest closed its side and the host socket was shut down for writing.
    pub host_write_shut: bool,
    /// The host closed its side and the guest was sent a FIN.
    pub host_eof: bool,
    /// Seen closed once: removed at the next service, after the stack sent its reset.
    pub reap: bool,
    pub created: Instant,
}

#[derive(Debug)]
pub struct UdpFlow {
    pub host: UdpSocket,
    pub last_used: Instant,
}

/// Datagrams from `peer` to the published UDP socket with index `socket`, and the
/// guest's replies back to it.
#[derive(Debug)]
pub struct InboundUdp {
    pub socket: usize,
    pub peer: SocketAddr,
    pub last_used: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_is_loopback_dns_is_the_resolver_and_local_addresses_are_refused() {
        let dns: [SocketAddr; 1] = ["192.0.2.53:5353".parse().unwrap()];
        let to = |a: [u8; 4], port| host_addr(SocketAddrV4::new(a.into(), port), &dns);
        assert_eq!(
            to([10, 0, 2, 2], 8080),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(to([10, 0, 2, 3], 53), Some(dns[0]));
        assert_eq!(to([10, 0, 2, 3], 80), None);
        assert_eq!(host_addr(SocketAddrV4::new(DNS, 53), &[]), None);
        assert_eq!(
            to([93, 184, 216, 34], 443),
            Some("93.184.216.34:443".parse().unwrap())
        );
        for refused in [
            [10, 0, 2, 15],
            [10, 0, 2, 255],
            [255; 4],
            [224, 0, 0, 1],
            [127, 0, 0, 1],
            [0; 4],
        ] {
            assert_eq!(to(refused, 80), None, "{refused:?}");
        }
    }
}
