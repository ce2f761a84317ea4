//! The connection multiplexer: guest packets in, host unix sockets out, and back.
//!
//! Independent of virtqueues: the backend feeds it packets popped from the TX queue and
//! asks it for packets to place in RX buffers. Flow control follows the virtio-vsock
//! credit scheme in both directions, so memory per connection is bounded: at most
//! [`BUF_ALLOC`] bytes from the guest waiting for a slow host reader (the guest may not
//! send more than the credit we advertise), and at most [`STAGE_MAX`] bytes read from the
//! host waiting for RX buffers or guest credit (we stop reading the socket beyond that).
//!
//! Host clients are bounded too: at most [`MAX_PENDING`] wait for their CONNECT line or
//! for the guest's answer, each for at most [`CONNECT_TIMEOUT`], and at most
//! [`MAX_CONNECTIONS`] connections exist at once. When accept fails for lack of file
//! descriptors the listener leaves epoll until the next [`Muxer::tick`] (a level-triggered
//! listener with a connection it cannot accept would wake the worker forever).

use crate::packet::*;
use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Receive buffer we advertise per connection (guest → host).
pub const BUF_ALLOC: u32 = 256 << 10;
/// Host → guest bytes staged per connection.
pub const STAGE_MAX: usize = 64 << 10;
/// Owe the guest a credit update once the credit it knows of falls below this and more
/// has been forwarded since the last update (after three 64 KiB packets of a 256 KiB
/// buffer; an update per packet cost an RX buffer and a notification). The update is
/// built when an RX buffer takes it (`Conn::credit_due`).
const CREDIT_LOW: u32 = BUF_ALLOC / 2;
/// Control packets waiting for RX buffers; more are dropped (a guest not posting RX
/// buffers must not make the daemon grow).
const MAX_CONTROL: usize = 4096;
/// Longest "CONNECT <port>\n" line.
const MAX_CONNECT_LINE: usize = 32;
/// First port handed to host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// How long a host client may take to send its CONNECT line, and the guest to answer it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Host clients waiting for their CONNECT line or the guest's answer; more are closed.
pub const MAX_PENDING: usize = 64;
/// Connections of either origin; more are refused (closed, or RST to the guest).
pub const MAX_CONNECTIONS: usize = 1024;

/// epoll ids (the vhost-user-backend worker reserves 0..=queues).
pub const LISTENER_ID: u16 = 8;
const CONN_ID_BASE: u16 = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listening on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("epoll: {0}")]
    Epoll(io::Error),
}

/// A guest packet's payload, wherever it lies: guest memory for the daemon (written to
/// the host socket from there, with no copy in the daemon), a byte slice in tests.
pub trait Payload {
    /// Bytes not yet consumed.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// One write of the unconsumed bytes to `out`; consumes what it took.
    fn write_to(&mut self, out: &mut UnixStream) -> io::Result<usize>;
    /// Appends the unconsumed bytes to `buf` and consumes them.
    fn append_to(&mut self, buf: &mut VecDeque<u8>);
}

impl Payload for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn write_to(&mut self, out: &mut UnixStream) -> io::Result<usize> {
        let n = out.write(self)?;
        *self = &self[n..];
        Ok(n)
    }

    fn append_to(&mut self, buf: &mut VecDeque<u8>) {
        buf.extend(self.iter());
        *self = &[];
    }
}

/// Registers fds with the worker thread's epoll instance.
#[derive(Debug, Clone, Copy)]
pub struct Poller(pub RawFd);

impl Poller {
    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, id: u16) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events,
            u64: u64::from(id),
        };
        // SAFETY: epoll_ctl on the worker's epoll fd with a valid event struct.
        if unsafe { libc::epoll_ctl(self.0, op, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// A host client that has not yet sent its CONNECT line.
    AwaitConnect(Vec<u8>),
    /// REQUEST sent to the guest, waiting for RESPONSE or RST.
    Connecting,
    Established,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    /// When the connection was accepted or its REQUEST sent (for [`CONNECT_TIMEOUT`]).
    since: Instant,
    local_port: u32,
    peer_port: u32,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Bytes from the guest written to the host socket.
    fwd_cnt: u32,
    /// `fwd_cnt` as the guest last saw it (in any packet's header).
    fwd_cnt_sent: u32,
    /// In `Muxer::credit_due`: a credit update is to be sent, built when an RX buffer
    /// takes it so that it carries the newest `fwd_cnt`.
    credit_due: bool,
    /// Bytes received from the guest (written to the host socket or in `to_host`).
    rx_from_guest: u32,
    to_host: VecDeque<u8>,
    to_guest: Vec<u8>,
    host_eof: bool,
    sent_shutdown: bool,
    peer_shutdown: u32,
    interest: u32,
    /// Taken out of epoll: the socket hung up, and a hang-up is reported whatever the
    /// interest, but there is nothing to do with it now (see `Muxer::park_if_stuck`).
    parked: bool,
}

impl Conn {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            stream,
            since: Instant::now(),
            local_port,
            peer_port,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            credit_due: false,
            rx_from_guest: 0,
            to_host: VecDeque::new(),
            to_guest: Vec::new(),
            host_eof: false,
            sent_shutdown: false,
            peer_shutdown: 0,
            interest: 0,
            parked: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn wanted_interest(&self) -> u32 {
        let mut events = 0;
        let reading = match self.state {
            State::AwaitConnect(_) => true,
            State::Connecting => false,
            State::Established => {
                !self.host_eof
                    && self.peer_shutdown & SHUTDOWN_RCV == 0
                    && self.to_guest.len() < STAGE_MAX
                    && self.peer_credit() as usize > self.to_guest.len()
            }
        };
        if reading {
            events |= libc::EPOLLIN as u32;
        }
        if !self.to_host.is_empty() {
            events |= libc::EPOLLOUT as u32;
        }
        events
    }

    /// Credit the guest knows of: our buffer less what it sent since our last update.
    fn guest_known_credit(&self) -> u32 {
        BUF_ALLOC.saturating_sub(self.rx_from_guest.wrapping_sub(self.fwd_cnt_sent))
    }

    /// Forwards a guest payload: straight to the socket while nothing is queued before
    /// it, the rest (what the socket would not take now) into `to_host`. False if the
    /// socket failed.
    fn forward(&mut self, payload: &mut dyn Payload) -> bool {
        self.rx_from_guest = self.rx_from_guest.wrapping_add(payload.len() as u32);
        while self.to_host.is_empty() && !payload.is_empty() {
            match payload.write_to(&mut self.stream) {
                Ok(0) => return false,
                Ok(n) => self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        payload.append_to(&mut self.to_host);
        true
    }

    /// Writes as much of `to_host` as the socket takes; false if the socket failed.
    fn flush_to_host(&mut self) -> bool {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.to_host.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        true
    }

    /// Both directions are finished: nothing more can move.
    fn finished(&self) -> bool {
        let host_done = self.host_eof && self.sent_shutdown && self.to_guest.is_empty();
        let guest_done = self.peer_shutdown & SHUTDOWN_SEND != 0 && self.to_host.is_empty();
        let guest_gone = self.peer_shutdown == SHUTDOWN_SEND | SHUTDOWN_RCV;
        (host_done && guest_done) || (guest_gone && self.to_host.is_empty())
    }
}

/// What the backend should place in one RX buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Rx {
    Packet(Packet, Vec<u8>),
    /// The buffer is too small for a header: return it unused.
    TooSmall,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    poller: Poller,
    listener: UnixListener,
    conns: HashMap<u16, Conn>,
    by_ports: HashMap<(u32, u32), u16>,
    control: VecDeque<Packet>,
    /// Connections owed a credit update (see `Conn::credit_due`).
    credit_due: VecDeque<u16>,
    rx_ready: VecDeque<u16>,
    next_id: u16,
    next_host_port: u32,
    /// The listener is out of epoll after accept ran out of descriptors.
    listener_paused: bool,
    /// Accept failed for lack of resources and has not succeeded since (logged once).
    accept_starved: bool,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path, poller: Poller) -> Result<Self, Error> {
        let _ = std::fs::remove_file(uds_path);
        let listener = UnixListener::bind(uds_path).map_err(|source| Error::Listen {
            path: uds_path.to_owned(),
            source,
        })?;
        listener.set_nonblocking(true).map_err(Error::Epoll)?;
        poller
            .ctl(
                libc::EPOLL_CTL_ADD,
                listener.as_raw_fd(),
                libc::EPOLLIN as u32,
                LISTENER_ID,
            )
            .map_err(Error::Epoll)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            poller,
            listener,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            control: VecDeque::new(),
            credit_due: VecDeque::new(),
            rx_ready: VecDeque::new(),
            next_id: CONN_ID_BASE,
            next_host_port: FIRST_HOST_PORT,
            listener_paused: false,
            accept_starved: false,
        })
    }

    /// Host clients still waiting for their CONNECT line or the guest's answer.
    fn pending(&self) -> usize {
        self.conns
            .values()
            .filter(|c| c.state != State::Established)
            .count()
    }

    /// Whether [`Muxer::tick`] has work: a paused listener or a pending client.
    pub fn needs_tick(&self) -> bool {
        self.listener_paused || self.pending() > 0
    }

    /// Periodic housekeeping: puts a paused listener back into epoll and ends host
    /// clients that waited longer than [`CONNECT_TIMEOUT`] (the guest's side of one
    /// whose REQUEST went unanswered gets an RST).
    pub fn tick(&mut self, now: Instant) {
        if self.listener_paused {
            let fd = self.listener.as_raw_fd();
            match self
                .poller
                .ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, LISTENER_ID)
            {
                Ok(()) => self.listener_paused = false,
                Err(e) => log::warn!("re-arming the host listener: {e}"),
            }
        }
        let expired: Vec<u16> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state != State::Established && now.duration_since(c.since) > CONNECT_TIMEOUT
            })
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            log::debug!("host client {id} timed out before its connection was established");
            self.reset_conn(id);
        }
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether anything waits for an RX buffer.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.credit_due.is_empty() || !self.rx_ready.is_empty()
    }

    fn reply(&self, to: &Packet, op: u16) -> Packet {
        Packet {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    fn conn_packet(&self, conn: &Conn, op: u16, flags: u32, len: u32) -> Packet {
        packet(self.guest_cid, conn, op, flags, len)
    }
}

/// A packet on `conn`'s port pair, carrying our current credit.
fn packet(guest_cid: u64, conn: &Conn, op: u16, flags: u32, len: u32) -> Packet {
    Packet {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: conn.local_port,
        dst_port: conn.peer_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: conn.fwd_cnt,
    }
}

impl Muxer {
    fn push_control(&mut self, packet: Packet) {
        if self.control.len() >= MAX_CONTROL {
            log::warn!("guest is not taking RX buffers; dropping a control packet");
            return;
        }
        self.control.push_back(packet);
    }

    fn rst(&mut self, to: &Packet) {
        let packet = self.reply(to, OP_RST);
        self.push_control(packet);
    }

    /// A packet the guest sent on the TX queue.
    pub fn guest_packet(&mut self, p: Packet, payload: &mut dyn Payload) {
        if p.op == OP_RST {
            // Never answer a reset with a reset.
            self.remove_by_ports(p.dst_port, p.src_port);
            return;
        }
        if p.src_cid != self.guest_cid || p.dst_cid != HOST_CID || p.type_ != TYPE_STREAM {
            log::warn!("dropping packet with bad CIDs or type: {p:?}");
            self.remove_by_ports(p.dst_port, p.src_port);
            self.rst(&p);
            return;
        }
        let id = self.by_ports.get(&(p.dst_port, p.src_port)).copied();
        match (p.op, id) {
            (OP_REQUEST, None) => self.guest_connect(&p),
            (OP_REQUEST, Some(_)) => {
                // A second request for a live pair: the guest lost track of it.
                self.remove_by_ports(p.dst_port, p.src_port);
                self.rst(&p);
            }
            (_, None) => self.rst(&p),
            (op, Some(id)) => self.conn_packet_in(id, op, &p, payload),
        }
    }

    /// A packet whose payload could not be read: its connection ends with RST.
    pub fn malformed(&mut self, p: &Packet) {
        self.remove_by_ports(p.dst_port, p.src_port);
        if p.op != OP_RST {
            self.rst(p);
        }
    }

    fn guest_connect(&mut self, p: &Packet) {
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!(
                "{MAX_CONNECTIONS} connections open: refusing guest port {}",
                p.src_port
            );
            self.rst(p);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), p.dst_port);
        let stream = match UnixStream::connect(&path) {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!("guest connect to port {}: {path}: {e}", p.dst_port);
                self.rst(p);
                return;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            self.rst(p);
            return;
        }
        let mut conn = Conn::new(stream, p.dst_port, p.src_port, State::Established);
        conn.peer_buf_alloc = p.buf_alloc;
        conn.peer_fwd_cnt = p.fwd_cnt;
        let response = self.conn_packet(&conn, OP_RESPONSE, 0, 0);
        if self.insert(conn).is_some() {
            self.push_control(response);
        } else {
            self.rst(p);
        }
    }

    fn conn_packet_in(&mut self, id: u16, op: u16, p: &Packet, payload: &mut dyn Payload) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.peer_buf_alloc = p.buf_alloc;
        conn.peer_fwd_cnt = p.fwd_cnt;
        let mut reset = false;
        match op {
            OP_RESPONSE if conn.state == State::Connecting => {
                conn.state = State::Established;
                let line = format!("OK {}\n", conn.local_port);
                // The client is waiting for this line; a socket buffer takes it whole.
                if conn.stream.write_all(line.as_bytes()).is_err() {
                    reset = true;
                } else if !conn.to_guest.is_empty() {
                    self.rx_ready.push_back(id);
                }
            }
            OP_RW if conn.state == State::Established => {
                let buffered = conn.to_host.len() + payload.len();
                if buffered > BUF_ALLOC as usize || conn.peer_shutdown & SHUTDOWN_SEND != 0 {
                    log::warn!("guest port {} overran its credit", conn.peer_port);
                    reset = true;
                } else {
                    reset = !conn.forward(payload);
                }
            }
            OP_SHUTDOWN => {
                conn.peer_shutdown |= p.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                reset = !conn.flush_to_host();
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.owe_credit(id),
            _ => {
                log::warn!(
                    "unexpected op {op} on connection to guest port {}",
                    p.src_port
                );
                reset = true;
            }
        }
        if reset {
            self.reset_conn(id);
        } else {
            self.after_change(id);
        }
    }

    /// An event on the listener or a connection's socket.
    pub fn fd_event(&mut self, id: u16, events: u32) {
        if id == LISTENER_ID {
            self.accept();
            return;
        }
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let mut reset = false;
        if events & libc::EPOLLOUT as u32 != 0 {
            reset = !conn.flush_to_host();
        }
        let hangup = events & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
        if !reset && (hangup || events & libc::EPOLLIN as u32 != 0) {
            reset = match &conn.state {
                State::AwaitConnect(_) => self.read_connect_line(id),
                State::Established => self.read_from_host(id),
                // The client gave up waiting for the guest: withdraw the request.
                State::Connecting => hangup,
            };
        }
        if reset {
            self.reset_conn(id);
            return;
        }
        if hangup {
            self.park_if_stuck(id);
        }
        self.after_change(id);
    }

    /// A hung-up socket leaves epoll, which reports a hang-up whatever the interest,
    /// while nothing can be done with it: until it can be read again (no credit now), or
    /// for good once its end of file was read and nothing waits to be written to it (the
    /// connection then only waits for the guest to close its side).
    fn park_if_stuck(&mut self, id: u16) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let want = conn.wanted_interest();
        let stuck = want & libc::EPOLLIN as u32 == 0 && (!conn.host_eof || want == 0);
        if !conn.parked && stuck {
            let _ = self
                .poller
                .ctl(libc::EPOLL_CTL_DEL, conn.stream.as_raw_fd(), 0, id);
            conn.parked = true;
            conn.interest = 0;
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    self.accept_starved = false;
                    if self.pending() >= MAX_PENDING || self.conns.len() >= MAX_CONNECTIONS {
                        // Closed at once: the client sees EOF instead of waiting.
                        log::warn!("too many host clients waiting; closing a new one");
                        continue;
                    }
                    if stream.set_nonblocking(true).is_ok() {
                        let conn = Conn::new(stream, 0, 0, State::AwaitConnect(Vec::new()));
                        if let Some(id) = self.insert(conn) {
                            // Clients write their CONNECT line right after connecting:
                            // read it now rather than after another turn of epoll.
                            if self.read_connect_line(id) {
                                self.reset_conn(id);
                            } else {
                                self.after_change(id);
                            }
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if e.kind() == ErrorKind::Interrupted
                        || e.kind() == ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays queued and the
                    // listener readable, so leave epoll until the next tick.
                    if self.accept_starved {
                        log::debug!("accepting a host client: {e}; retrying shortly");
                    } else {
                        log::warn!("accepting a host client: {e}; retrying shortly");
                        self.accept_starved = true;
                    }
                    let fd = self.listener.as_raw_fd();
                    if self
                        .poller
                        .ctl(libc::EPOLL_CTL_DEL, fd, 0, LISTENER_ID)
                        .is_ok()
                    {
                        self.listener_paused = true;
                    }
                    return;
                }
            }
        }
    }

    /// Reads the CONNECT line; true when the client must be dropped.
    fn read_connect_line(&mut self, id: u16) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        let State::AwaitConnect(line) = &mut conn.state else {
            return false;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let n = match conn.stream.read(&mut buf[..MAX_CONNECT_LINE - line.len()]) {
            Ok(0) => return true,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                return false
            }
            Err(_) => return true,
        };
        line.extend_from_slice(&buf[..n]);
        let Some(end) = line.iter().position(|&b| b == b'\n') else {
            return line.len() >= MAX_CONNECT_LINE;
        };
        let port = connect_port(&line[..end]);
        let rest = line[end + 1..].to_vec();
        let Some(port) = port else {
            log::debug!("host client sent a malformed CONNECT line");
            return true;
        };
        let local_port = self.allocate_host_port(port);
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        conn.local_port = local_port;
        conn.peer_port = port;
        conn.state = State::Connecting;
        conn.since = Instant::now();
        conn.to_guest = rest;
        self.by_ports.insert((local_port, port), id);
        let request = self.conn_packet(&self.conns[&id], OP_REQUEST, 0, 0);
        self.push_control(request);
        false
    }

    fn allocate_host_port(&mut self, peer: u32) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            if !self.by_ports.contains_key(&(port, peer)) {
                return port;
            }
        }
    }

    /// Reads host bytes within the guest's credit; true when the connection must reset.
    fn read_from_host(&mut self, id: u16) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        let credit = conn.peer_credit() as usize;
        let room = STAGE_MAX
            .saturating_sub(conn.to_guest.len())
            .min(credit.saturating_sub(conn.to_guest.len()));
        if room == 0 || conn.host_eof {
            return false;
        }
        let start = conn.to_guest.len();
        conn.to_guest.resize(start + room, 0);
        let result = conn.stream.read(&mut conn.to_guest[start..]);
        let n = match &result {
            Ok(n) => *n,
            Err(_) => 0,
        };
        conn.to_guest.truncate(start + n);
        match result {
            Ok(0) => conn.host_eof = true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                return false
            }
            Err(_) => return true,
        }
        self.rx_ready.push_back(id);
        false
    }

    /// The next packet for an RX buffer with `capacity` writable bytes.
    pub fn next_rx(&mut self, capacity: usize) -> Option<Rx> {
        if !self.has_rx() {
            return None;
        }
        if capacity < HEADER_LEN {
            return Some(Rx::TooSmall);
        }
        if let Some(packet) = self.control.pop_front() {
            return Some(Rx::Packet(packet, Vec::new()));
        }
        while let Some(id) = self.credit_due.pop_front() {
            // A connection ended since (its id perhaps reused) is owed nothing.
            let Some(conn) = self.conns.get_mut(&id).filter(|c| c.credit_due) else {
                continue;
            };
            conn.credit_due = false;
            if conn.state == State::Established {
                conn.fwd_cnt_sent = conn.fwd_cnt;
                let packet = self.conn_packet(&self.conns[&id], OP_CREDIT_UPDATE, 0, 0);
                return Some(Rx::Packet(packet, Vec::new()));
            }
        }
        while let Some(id) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            if conn.state != State::Established {
                continue;
            }
            let n = conn
                .to_guest
                .len()
                .min(capacity - HEADER_LEN)
                .min(conn.peer_credit() as usize);
            if n > 0 {
                let data: Vec<u8> = conn.to_guest.drain(..n).collect();
                conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                conn.fwd_cnt_sent = conn.fwd_cnt;
                let packet = self.conn_packet(&self.conns[&id], OP_RW, 0, n as u32);
                if !self.conns[&id].to_guest.is_empty() {
                    self.rx_ready.push_back(id);
                }
                self.after_change(id);
                return Some(Rx::Packet(packet, data));
            }
            if conn.to_guest.is_empty() && conn.host_eof && !conn.sent_shutdown {
                conn.sent_shutdown = true;
                let packet = self.conn_packet(&self.conns[&id], OP_SHUTDOWN, SHUTDOWN_SEND, 0);
                self.after_change(id);
                return Some(Rx::Packet(packet, Vec::new()));
            }
        }
        None
    }

    fn insert(&mut self, mut conn: Conn) -> Option<u16> {
        for _ in 0..u16::MAX {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(CONN_ID_BASE);
            if self.conns.contains_key(&id) {
                continue;
            }
            let interest = conn.wanted_interest();
            if self
                .poller
                .ctl(libc::EPOLL_CTL_ADD, conn.stream.as_raw_fd(), interest, id)
                .is_err()
            {
                return None;
            }
            conn.interest = interest;
            if !matches!(conn.state, State::AwaitConnect(_)) {
                self.by_ports.insert((conn.local_port, conn.peer_port), id);
            }
            self.conns.insert(id, conn);
            return Some(id);
        }
        None
    }

    /// Re-arms epoll, sends credit updates, and ends finished connections.
    fn after_change(&mut self, id: u16) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.fwd_cnt != conn.fwd_cnt_sent && conn.guest_known_credit() < CREDIT_LOW {
            self.owe_credit(id);
        }
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.state == State::Established && conn.finished() {
            let rst = packet(self.guest_cid, conn, OP_RST, 0, 0);
            self.push_control(rst);
            self.remove(id);
            return;
        }
        let want = conn.wanted_interest();
        let fd = conn.stream.as_raw_fd();
        if conn.parked {
            let unstuck = want & libc::EPOLLIN as u32 != 0 || (conn.host_eof && want != 0);
            if unstuck && self.poller.ctl(libc::EPOLL_CTL_ADD, fd, want, id).is_ok() {
                conn.parked = false;
                conn.interest = want;
            }
        } else if want != conn.interest
            && self.poller.ctl(libc::EPOLL_CTL_MOD, fd, want, id).is_ok()
        {
            conn.interest = want;
        }
    }

    /// Queues a credit update for `id` (once, however often it is owed before an RX
    /// buffer takes it).
    fn owe_credit(&mut self, id: u16) {
        if let Some(conn) = self.conns.get_mut(&id) {
            if !conn.credit_due {
                conn.credit_due = true;
                self.credit_due.push_back(id);
            }
        }
    }

    fn reset_conn(&mut self, id: u16) {
        if let Some(conn) = self.conns.get(&id) {
            // A client that never sent CONNECT has no guest side to reset.
            if !matches!(conn.state, State::AwaitConnect(_)) {
                let rst = self.conn_packet(conn, OP_RST, 0, 0);
                self.push_control(rst);
            }
        }
        self.remove(id);
    }

    fn remove_by_ports(&mut self, local: u32, peer: u32) {
        if let Some(id) = self.by_ports.get(&(local, peer)).copied() {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: u16) {
        if let Some(conn) = self.conns.remove(&id) {
            if !conn.parked {
                let _ = self
                    .poller
                    .ctl(libc::EPOLL_CTL_DEL, conn.stream.as_raw_fd(), 0, id);
            }
            self.by_ports.remove(&(conn.local_port, conn.peer_port));
        }
    }
}

/// The port of a `CONNECT <port>` line (without its newline), parsed strictly: decimal
/// digits only (no sign, space or leading zero), from 1 to `u32::MAX - 1`. `u32::MAX` is
/// VMADDR_PORT_ANY, which names no port, and port 0 is refused as no guest service
/// listens there (Linux binds from 1024 up unless asked for a port).
pub fn connect_port(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"CONNECT ")?;
    let first = *digits.first()?;
    if !(b'1'..=b'9').contains(&first) || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let port: u32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (port != u32::MAX).then_some(port)
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet from guest port 600 to host port 6000.
    fn from_guest(op: u16, len: u32) -> Packet {
        Packet {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 600,
            dst_port: 6000,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    fn drain(muxer: &mut Muxer) -> Vec<Packet> {
        std::iter::from_fn(|| match muxer.next_rx(1 << 16) {
            Some(Rx::Packet(p, _)) => Some(p),
            _ => None,
        })
        .collect()
    }

    /// Guest packets handled in one go (one kick) owe the guest one credit update, and
    /// it carries what was forwarded by the time an RX buffer takes it, not what was
    /// forwarded when it fell due: with the update built at once, the guest learned
    /// 144 KiB of 192 KiB and had to ask or wait for the rest.
    #[test]
    fn one_credit_update_per_batch_carries_everything_forwarded() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let host = UnixListener::bind(dir.path().join("v.sock_6000")).unwrap();
        // SAFETY: creates a new epoll fd, owned below.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0);
        // SAFETY: the fd was just created and nothing else owns it.
        let _epoll =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(epoll) };
        let mut muxer = Muxer::new(3, &uds, Poller(epoll)).unwrap();
        muxer.guest_packet(from_guest(OP_REQUEST, 0), &mut &[][..]);
        let (mut stream, _) = host.accept().unwrap();
        assert_eq!(drain(&mut muxer)[0].op, OP_RESPONSE);
        // 4 x 48 KiB: the update falls due after the third (144 KiB, credit under half).
        let chunk = vec![7u8; 48 << 10];
        for _ in 0..4 {
            muxer.guest_packet(from_guest(OP_RW, chunk.len() as u32), &mut &chunk[..]);
        }
        let updates = drain(&mut muxer);
        assert_eq!(updates.len(), 1, "{updates:?}");
        assert_eq!(updates[0].op, OP_CREDIT_UPDATE);
        assert_eq!(updates[0].fwd_cnt, 4 * (48 << 10));
        let mut got = vec![0u8; 4 * (48 << 10)];
        stream.read_exact(&mut got).unwrap();
        // Asked, the daemon answers even when nothing moved since.
        muxer.guest_packet(from_guest(OP_CREDIT_REQUEST, 0), &mut &[][..]);
        let answer = drain(&mut muxer);
        assert_eq!(answer.len(), 1, "{answer:?}");
        assert_eq!(
            (answer[0].op, answer[0].fwd_cnt),
            (OP_CREDIT_UPDATE, 4 * (48 << 10))
        );
    }

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(connect_port(b"CONNECT 5"), Some(5));
        assert_eq!(connect_port(b"CONNECT 4294967294"), Some(u32::MAX - 1));
        for bad in [
            "CONNECT +5",
            "CONNECT 0",
            "CONNECT 4294967295",
            "CONNECT 4294967296",
            "CONNECT 05",
            "CONNECT  5",
            "CONNECT 5 ",
            "CONNECT -1",
            "CONNECT ",
            "connect 5",
            "CONNECT 5\r",
        ] {
            assert_eq!(connect_port(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
