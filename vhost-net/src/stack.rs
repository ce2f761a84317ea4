//! The user network: smoltcp answers ARP and ICMP for the gateway and terminates guest
//! TCP (accepting any destination address), the daemon answers DHCP and relays UDP
//! itself, and every flow has a host socket. Knows nothing about virtqueues: frames
//! come in through [`Net::guest_frame`] and wait in [`Net::link`] for the guest.

use crate::config::{NetConfig, Protocol, Publish};
use crate::dhcp;
use crate::frame::{self, Verdict, DNS, GATEWAY, GATEWAY_MAC, GUEST, PREFIX_LEN};
use crate::link::{Link, FROM_GUEST_FRAMES, TO_GUEST_FRAMES};
use crate::nat::{self, InboundUdp, TcpFlow, UdpFlow, MAX_TCP_FLOWS, MAX_UDP_FLOWS, TCP_BUFFER};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, IpListenEndpoint};
use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Ephemeral ports the gateway connects from for published ports.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;
/// Datagrams taken from one published UDP socket per poll (epoll reports the rest).
const UDP_BATCH: usize = 256;
/// Egress passes per poll: at most this many segments per flow at once.
const EGRESS_PASSES: usize = 256;
/// While flows exist the owner polls at least this often (closing, expiry).
const HOUSEKEEPING: Duration = Duration::from_millis(500);
/// A listener whose SYN the stack did not take (bad segment) is dropped after this.
const LISTEN_GRACE: Duration = Duration::from_secs(2);
/// A host connection not established by then is given up (the guest gets a reset).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive probes to the guest on idle connections, and the silence after which a
/// connection is dropped: a guest that went away (restored elsewhere, say) does not
/// hold flows forever.
const KEEP_ALIVE: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(60);
const GUEST_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(180);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("publishing {addr}: {source}")]
    Publish { addr: SocketAddr, source: io::Error },
    #[error("registering a host socket with the worker: {0}")]
    Register(io::Error),
}

/// The worker's epoll instance: host sockets are registered edge-triggered under one
/// id; on any event every flow is serviced.
#[derive(Debug, Clone, Copy)]
pub struct Poller {
    pub epoll: RawFd,
    pub id: u16,
}

impl Poller {
    pub(crate) fn add(&self, fd: RawFd, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events,
            u64: u64::from(self.id),
        };
        // SAFETY: epoll_ctl on the worker's epoll fd with a valid event struct; the fd
        // belongs to a socket this module owns (closing it unregisters it).
        if unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn add_stream(&self, fd: RawFd) -> io::Result<()> {
        let events = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
        self.add(fd, events as u32)
    }
}

type FlowKey = (SocketAddrV4, SocketAddrV4);

pub struct Net {
    iface: Interface,
    sockets: SocketSet<'static>,
    pub link: Link,
    /// Learned from the guest's frames; the configured MAC until then.
    guest_mac: EthernetAddress,
    /// The guest's address and MAC as last told to the stack's neighbor cache.
    neighbor: Option<(std::net::Ipv4Addr, EthernetAddress)>,
    dns: Vec<SocketAddr>,
    poller: Poller,
    /// Keyed (guest end, destination as the guest sees it).
    tcp: HashMap<FlowKey, TcpFlow>,
    udp: HashMap<FlowKey, UdpFlow>,
    /// Datagrams from senders to published UDP ports, keyed (guest end, the gateway
    /// end the guest sees them coming from).
    udp_inbound: HashMap<FlowKey, InboundUdp>,
    listeners: Vec<(TcpListener, u16)>,
    udp_published: Vec<(UdpSocket, u16)>,
    next_port: u16,
    epoch: Instant,
}

/// Host sockets of published ports with their guest ports, bound while the daemon may
/// still hold the capability a port below 1024 needs.
#[derive(Debug, Default)]
pub struct Published {
    pub tcp: Vec<(TcpListener, u16)>,
    pub udp: Vec<(UdpSocket, u16)>,
}

/// Binds every `--publish` socket (non-blocking).
pub fn publish(publish: &[Publish]) -> Result<Published, Error> {
    let mut published = Published::default();
    for &Publish {
        host,
        guest_port,
        protocol,
    } in publish
    {
        let publish_error = |source| Error::Publish { addr: host, source };
        match protocol {
            Protocol::Tcp => {
                let listener = TcpListener::bind(host).map_err(publish_error)?;
                listener.set_nonblocking(true).map_err(publish_error)?;
                published.tcp.push((listener, guest_port));
            }
            Protocol::Udp => {
                let socket = UdpSocket::bind(host).map_err(publish_error)?;
                socket.set_nonblocking(true).map_err(publish_error)?;
                published.udp.push((socket, guest_port));
            }
        }
        log::info!("publishing {host}/{protocol:?} to guest port {guest_port}");
    }
    Ok(published)
}

impl Net {
    /// The stack, with the `listeners` of [`publish`] registered with the worker.
    pub fn new(config: &NetConfig, published: Published, poller: Poller) -> Result<Self, Error> {
        let mut link = Link::default();
        let epoch = Instant::now();
        let mut iface_config = Config::new(HardwareAddress::Ethernet(GATEWAY_MAC));
        iface_config.random_seed = seed();
        let mut iface = Interface::new(iface_config, &mut link, SmolInstant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(GATEWAY.into(), PREFIX_LEN));
            let _ = addrs.push(IpCidr::new(DNS.into(), PREFIX_LEN));
        });
        // With a default route through an address of ours, segments to any address
        // are ours: that is how guest connections to the world reach a listener.
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY);
        iface.set_any_ip(true);
        let fds = published.tcp.iter().map(|(l, _)| l.as_raw_fd());
        for fd in fds.chain(published.udp.iter().map(|(s, _)| s.as_raw_fd())) {
            poller
                .add(fd, libc::EPOLLIN as u32)
                .map_err(Error::Register)?;
        }
        Ok(Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            link,
            guest_mac: config.mac,
            neighbor: None,
            dns: config.dns.clone(),
            poller,
            tcp: HashMap::new(),
            udp: HashMap::new(),
            udp_inbound: HashMap::new(),
            listeners: published.tcp,
            udp_published: published.udp,
            next_port: *EPHEMERAL.start(),
            epoch,
        })
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(
            i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX),
        )
    }

    /// Number of TCP and UDP flows.
    pub fn flows(&self) -> (usize, usize) {
        (self.tcp.len(), self.udp.len() + self.udp_inbound.len())
    }

    /// One frame from the guest.
    pub fn guest_frame(&mut self, frame: &[u8]) {
        let (mac, verdict) = frame::classify(frame);
        if let Some(mac) = mac {
            self.guest_mac = mac;
        }
        match verdict {
            Verdict::Drop(why) => log::debug!("dropped a guest frame: {why}"),
            Verdict::Stack => self.for_stack(frame),
            Verdict::TcpSyn { guest, dest } => {
                let opened = self.open_tcp(guest, dest);
                self.for_stack(frame);
                if opened {
                    // The new listener takes this SYN before another SYN to the same
                    // destination could reach it.
                    self.poll_stack();
                }
            }
            Verdict::Udp {
                guest,
                dest,
                payload,
            } => self.guest_udp(guest, dest, payload),
        }
    }

    fn for_stack(&mut self, frame: &[u8]) {
        if let Some(ip) = frame::guest_source(frame) {
            if self.neighbor != Some((ip, self.guest_mac)) {
                self.neighbor = Some((ip, self.guest_mac));
                self.link
                    .from_guest
                    .push_back(frame::arp_from_guest(self.guest_mac, ip));
            }
        }
        self.link.from_guest.push_back(frame.to_vec());
        if self.link.from_guest.len() >= FROM_GUEST_FRAMES {
            self.poll_stack();
        }
    }

    fn poll_stack(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.link, &mut self.sockets);
        // An egress pass sends at most one segment per socket: keep passing while the
        // stack has more to send (a bulk transfer would otherwise trickle out one
        // segment per event), up to what the link queue takes.
        for _ in 0..EGRESS_PASSES {
            let queued = self.link.to_guest.len();
            if queued >= TO_GUEST_FRAMES {
                break;
            }
            self.iface
                .poll_egress(now, &mut self.link, &mut self.sockets);
            if self.link.to_guest.len() == queued {
                break;
            }
        }
    }

    /// Starts the host connection for a guest SYN and puts a listener for it in the
    /// stack. `false` when there is none (refused destination, flow limit, connect
    /// error): the stack then answers the SYN with a reset.
    fn open_tcp(&mut self, guest: SocketAddrV4, dest: SocketAddrV4) -> bool {
        let key = (guest, dest);
        if self.tcp.contains_key(&key) {
            return false; // a retransmitted SYN: the existing socket answers it
        }
        if self.tcp.len() >= MAX_TCP_FLOWS {
            log::warn!("TCP {guest} -> {dest}: {MAX_TCP_FLOWS} flows already, refused");
            return false;
        }
        let Some(to) = nat::host_addr(dest, &self.dns) else {
            log::debug!("TCP {guest} -> {dest}: destination refused");
            return false;
        };
        let host = match nat::connect_tcp(to) {
            Ok(host) => host,
            Err(e) => {
                log::debug!("TCP {guest} -> {to}: {e}");
                return false;
            }
        };
        if let Err(e) = self.poller.add_stream(host.as_raw_fd()) {
            log::warn!("TCP {guest} -> {to}: {e}");
            return false;
        }
        let mut socket = new_tcp_socket();
        let endpoint = IpListenEndpoint {
            addr: Some((*dest.ip()).into()),
            port: dest.port(),
        };
        if socket.listen(endpoint).is_err() {
            return false;
        }
        let handle = self.sockets.add(socket);
        self.tcp.insert(
            key,
            TcpFlow {
                handle,
                host,
                connecting: true,
                host_write_shut: false,
                host_eof: false,
                reap: false,
                created: Instant::now(),
            },
        );
        true
    }

    fn guest_udp(&mut self, guest: SocketAddrV4, dest: SocketAddrV4, payload: &[u8]) {
        if dest.port() == dhcp::SERVER_PORT && guest.port() == dhcp::CLIENT_PORT {
            let reply = dhcp::reply(payload);
            log::debug!(
                "DHCP from {guest}: {} bytes, answered: {}",
                payload.len(),
                reply.is_some()
            );
            if let Some(reply) = reply {
                let to = SocketAddrV4::new(std::net::Ipv4Addr::BROADCAST, dhcp::CLIENT_PORT);
                let from = SocketAddrV4::new(GATEWAY, dhcp::SERVER_PORT);
                if let Some(frame) = frame::udp_frame(from, to, self.guest_mac, &reply) {
                    self.link.send_to_guest(frame);
                }
            }
            return;
        }
        let key = (guest, dest);
        if let Some(flow) = self.udp_inbound.get_mut(&key) {
            // A reply to a sender on a published port.
            flow.last_used = Instant::now();
            if let Some((socket, _)) = self.udp_published.get(flow.socket) {
                if let Err(e) = socket.send_to(payload, flow.peer) {
                    log::debug!("UDP {guest} -> {}: {e}", flow.peer);
                }
            }
            return;
        }
        if !self.udp.contains_key(&key) {
            if self.udp.len() + self.udp_inbound.len() >= MAX_UDP_FLOWS {
                log::warn!("UDP {guest} -> {dest}: {MAX_UDP_FLOWS} flows already, dropped");
                return;
            }
            let Some(to) = nat::host_addr(dest, &self.dns) else {
                log::debug!("UDP {guest} -> {dest}: destination refused");
                return;
            };
            let host = match nat::connect_udp(to) {
                Ok(host) => host,
                Err(e) => {
                    log::debug!("UDP {guest} -> {to}: {e}");
                    return;
                }
            };
            if let Err(e) = self
                .poller
                .add(host.as_raw_fd(), (libc::EPOLLIN | libc::EPOLLET) as u32)
            {
                log::warn!("UDP {guest} -> {to}: {e}");
                return;
            }
            self.udp.insert(
                key,
                UdpFlow {
                    host,
                    last_used: Instant::now(),
                },
            );
        }
        if let Some(flow) = self.udp.get_mut(&key) {
            flow.last_used = Instant::now();
            // A full host socket buffer drops the datagram, as a full link would.
            if let Err(e) = flow.host.send(payload) {
                log::debug!("UDP {guest} -> {dest}: {e}");
            }
        }
    }

    /// Runs the stack and moves data between its sockets and the host's; call after
    /// every event. Returns how long the stack may wait before the next call.
    pub fn poll(&mut self) -> Option<Duration> {
        self.accept_published();
        self.receive_published_udp();
        self.poll_stack();
        self.service_tcp();
        self.service_udp();
        self.poll_stack();
        let now = self.now();
        let delay = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        if self.tcp.is_empty() && self.udp.is_empty() && self.udp_inbound.is_empty() {
            delay
        } else {
            Some(delay.map_or(HOUSEKEEPING, |d| d.min(HOUSEKEEPING)))
        }
    }

    fn accept_published(&mut self) {
        for i in 0..self.listeners.len() {
            loop {
                let (stream, peer) = match self.listeners[i].0.accept() {
                    Ok(accepted) => accepted,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::warn!("accepting on a published port: {e}");
                        break;
                    }
                };
                let guest_port = self.listeners[i].1;
                if let Err(e) = self.open_published(stream, guest_port) {
                    log::warn!("{peer} -> guest port {guest_port}: {e}");
                }
            }
        }
    }

    fn open_published(&mut self, host: std::net::TcpStream, guest_port: u16) -> io::Result<()> {
        if self.tcp.len() >= MAX_TCP_FLOWS {
            return Err(io::Error::other(format!("{MAX_TCP_FLOWS} flows already")));
        }
        let guest = SocketAddrV4::new(GUEST, guest_port);
        let tcp = &self.tcp;
        let local = free_port(&mut self.next_port, |port| {
            tcp.contains_key(&(guest, SocketAddrV4::new(GATEWAY, port)))
        })?;
        host.set_nonblocking(true)?;
        self.poller.add_stream(host.as_raw_fd())?;
        let mut socket = new_tcp_socket();
        socket
            .connect(self.iface.context(), (GUEST, guest_port), (GATEWAY, local))
            .map_err(io::Error::other)?;
        let handle = self.sockets.add(socket);
        self.tcp.insert(
            (guest, SocketAddrV4::new(GATEWAY, local)),
            TcpFlow {
                handle,
                host,
                connecting: false,
                host_write_shut: false,
                host_eof: false,
                reap: false,
                created: Instant::now(),
            },
        );
        Ok(())
    }

    /// Datagrams to published UDP ports go to the guest from a gateway port of their
    /// own per sender, so the guest's replies find their way back.
    fn receive_published_udp(&mut self) {
        let mut buf = vec![0u8; frame::MAX_UDP_PAYLOAD + 1];
        for socket in 0..self.udp_published.len() {
            for _ in 0..UDP_BATCH {
                let (n, peer) = match self.udp_published[socket].0.recv_from(&mut buf) {
                    Ok(received) => received,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::debug!("receiving on a published UDP port: {e}");
                        break;
                    }
                };
                let guest = SocketAddrV4::new(GUEST, self.udp_published[socket].1);
                let Some(from) = self.inbound_udp_flow(socket, guest, peer) else {
                    continue;
                };
                // Larger datagrams do not fit a frame; dropped.
                if let Some(frame) = frame::udp_frame(from, guest, self.guest_mac, &buf[..n]) {
                    self.link.send_to_guest(frame);
                }
            }
        }
    }

    /// The gateway end of the inbound flow from `peer` on published socket `socket`,
    /// made on its first datagram; `None` at the flow limit.
    fn inbound_udp_flow(
        &mut self,
        socket: usize,
        guest: SocketAddrV4,
        peer: SocketAddr,
    ) -> Option<SocketAddrV4> {
        let existing = self
            .udp_inbound
            .iter_mut()
            .find(|(_, flow)| flow.socket == socket && flow.peer == peer);
        if let Some(((_, from), flow)) = existing {
            flow.last_used = Instant::now();
            return Some(*from);
        }
        if self.udp.len() + self.udp_inbound.len() >= MAX_UDP_FLOWS {
            log::warn!("UDP {peer} -> {guest}: {MAX_UDP_FLOWS} flows already, dropped");
            return None;
        }
        let (udp, inbound) = (&self.udp, &self.udp_inbound);
        let port = free_port(&mut self.next_port, |port| {
            let key = (guest, SocketAddrV4::new(GATEWAY, port));
            udp.contains_key(&key) || inbound.contains_key(&key)
        })
        .ok()?;
        let from = SocketAddrV4::new(GATEWAY, port);
        self.udp_inbound.insert(
            (guest, from),
            InboundUdp {
                socket,
                peer,
                last_used: Instant::now(),
            },
        );
        Some(from)
    }

    fn service_tcp(&mut self) {
        let mut gone = Vec::new();
        for (key, flow) in &mut self.tcp {
            let socket = self.sockets.get_mut::<tcp::Socket>(flow.handle);
            if service_tcp_flow(flow, socket) {
                gone.push(*key);
            }
        }
        for key in gone {
            if let Some(flow) = self.tcp.remove(&key) {
                self.sockets.remove(flow.handle);
                log::debug!("TCP {} -> {}: closed", key.0, key.1);
            }
        }
    }

    fn service_udp(&mut self) {
        let idle = Duration::from_secs(nat::UDP_IDLE_SECS);
        let mut buf = vec![0u8; frame::MAX_UDP_PAYLOAD + 1];
        let guest_mac = self.guest_mac;
        let link = &mut self.link;
        self.udp.retain(|(guest, dest), flow| {
            loop {
                match flow.host.recv(&mut buf) {
                    Ok(n) => {
                        flow.last_used = Instant::now();
                        // Larger datagrams do not fit a frame; dropped.
                        if let Some(frame) = frame::udp_frame(*dest, *guest, guest_mac, &buf[..n]) {
                            link.send_to_guest(frame);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // ICMP errors (port unreachable) surface here; the flow stays.
                    Err(_) => break,
                }
            }
            flow.last_used.elapsed() < idle
        });
        self.udp_inbound
            .retain(|_, flow| flow.last_used.elapsed() < idle);
    }
}

/// The next ephemeral gateway port, after `next`, that is not `taken`.
fn free_port(next: &mut u16, taken: impl Fn(u16) -> bool) -> io::Result<u16> {
    let span = usize::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
    for _ in 0..span {
        let port = *next;
        *next = if port == *EPHEMERAL.end() {
            *EPHEMERAL.start()
        } else {
            port + 1
        };
        if !taken(port) {
            return Ok(port);
        }
    }
    Err(io::Error::other("no free gateway port"))
}

fn new_tcp_socket() -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
    );
    socket.set_nagle_enabled(false);
    socket.set_keep_alive(Some(KEEP_ALIVE));
    socket.set_timeout(Some(GUEST_TIMEOUT));
    socket
}

/// Moves data both ways for one flow; `true` when the flow is over.
fn service_tcp_flow(flow: &mut TcpFlow, socket: &mut tcp::Socket) -> bool {
    use tcp::State;
    match socket.state() {
        State::Closed | State::TimeWait => {
            if flow.reap {
                return true;
            }
            flow.reap = true;
            return false;
        }
        State::Listen => return flow.created.elapsed() > LISTEN_GRACE,
        _ => {}
    }
    if flow.connecting {
        match flow.host.take_error() {
            Ok(None) if flow.host.peer_addr().is_ok() => flow.connecting = false,
            Ok(None) if flow.created.elapsed() > CONNECT_TIMEOUT => {
                log::debug!("TCP host connect: timed out");
                socket.abort();
                return false;
            }
            Ok(None) => return false,
            Ok(Some(e)) | Err(e) => {
                log::debug!("TCP host connect: {e}");
                socket.abort();
                return false;
            }
        }
    }
    // Guest to host, straight from the socket's buffer: what the host does not take
    // stays there and the guest's window closes.
    while socket.can_recv() {
        let host = &flow.host;
        match socket.recv(|data| match (&*host).write(data) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        }) {
            Ok(Ok(n)) if n > 0 => continue,
            Ok(Ok(_)) => break,
            Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => break,
            Ok(Err(e)) => {
                log::debug!("TCP write to host: {e}");
                socket.abort();
                return false;
            }
            Err(_) => break,
        }
    }
    // The guest sent its FIN and everything before it reached the host. (`may_recv`
    // is also false before the handshake completes, so the state decides.)
    let guest_closed = matches!(
        socket.state(),
        State::CloseWait | State::LastAck | State::Closing
    );
    if guest_closed && !socket.can_recv() && !flow.host_write_shut {
        let _ = flow.host.shutdown(Shutdown::Write);
        flow.host_write_shut = true;
    }
    // Host to guest, straight into the socket's buffer.
    while !flow.host_eof && socket.can_send() {
        let host = &flow.host;
        match socket.send(|buf| match (&*host).read(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        }) {
            Ok(Ok(0)) => {
                flow.host_eof = true;
                socket.close();
            }
            Ok(Ok(_)) => continue,
            Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => break,
            Ok(Err(e)) => {
                log::debug!("TCP read from host: {e}");
                socket.abort();
                return false;
            }
            Err(_) => break,
        }
    }
    false
}

/// A seed for the stack's sequence numbers and ports, different per process.
fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got == 8 {
        u64::from_le_bytes(bytes)
    } else {
        u64::from(std::process::id()) ^ (Instant::now().elapsed().as_nanos() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Args;
    use clap::Parser;

    fn net() -> Net {
        let config = NetConfig::try_from(Args::parse_from([
            "x",
            "--socket-path",
            "/tmp/n.sock",
            "--dns",
            "127.0.0.1:9",
        ]))
        .unwrap();
        // SAFETY: epoll_create1 takes no pointers; the fd lives as long as the test.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0);
        Net::new(&config, Published::default(), Poller { epoll, id: 9 }).unwrap()
    }

    /// The frames of a net_frames fuzz input: each a little-endian u16 length and bytes.
    fn fuzz_frames(mut data: &[u8]) -> Vec<&[u8]> {
        let mut frames = Vec::new();
        while let [lo, hi, tail @ ..] = data {
            let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
            let (frame, next) = tail.split_at(len);
            frames.push(frame);
            data = next;
        }
        frames
    }

    /// Checksums made valid: under cargo-fuzz (`cfg(fuzzing)`) smoltcp does not verify
    /// them, so a fuzz input needs them filled to reproduce outside the fuzzer.
    fn with_checksums(frame: &[u8]) -> Vec<u8> {
        use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, TcpPacket};
        let mut frame = frame.to_vec();
        let Ok(mut eth) = EthernetFrame::new_checked(&mut frame[..]) else {
            return frame;
        };
        if eth.ethertype() != EthernetProtocol::Ipv4 {
            return frame;
        }
        let Ok(mut ip) = smoltcp::wire::Ipv4Packet::new_checked(eth.payload_mut()) else {
            return frame;
        };
        ip.fill_checksum();
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        if ip.next_header() == IpProtocol::Tcp {
            if let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) {
                tcp.fill_checksum(&src.into(), &dst.into());
            }
        }
        frame
    }

    /// net_frames found it (fuzz/corpus/net_frames/crash-d32f57b0…): a TCP SYN to the
    /// gateway from source 0.0.0.0 made smoltcp answer to 0.0.0.0, which it refuses
    /// with `assert!(!dst_addr.is_unspecified())`: one frame panicked the worker.
    #[test]
    fn a_syn_from_the_unspecified_address_is_dropped_not_answered() {
        let input = include_bytes!(
            "../../fuzz/corpus/net_frames/crash-d32f57b0cc18703d0219797da80a316362301a7d"
        );
        let mut net = net();
        // As the fuzz target drives it: a poll after every fourth frame.
        for (i, frame) in fuzz_frames(input).into_iter().enumerate() {
            net.guest_frame(&with_checksums(frame));
            if i % 4 == 3 {
                let _ = net.poll();
            }
        }
        let _ = net.poll();
        for frame in net.link.to_guest.drain(..) {
            let eth = smoltcp::wire::EthernetFrame::new_checked(&frame[..]).unwrap();
            if eth.ethertype() == smoltcp::wire::EthernetProtocol::Ipv4 {
                let ip = smoltcp::wire::Ipv4Packet::new_checked(eth.payload()).unwrap();
                assert!(!ip.dst_addr().is_unspecified(), "an answer to 0.0.0.0");
            }
        }
    }
}
