//! The host-side frontend harness playing a guest's virtio-net driver (VERSION_1,
//! mergeable RX buffers): frames sent on TX behind a 12-byte header, RX buffers kept
//! posted, and builders for the frames a test guest sends.

use crate::frontend::{Buf, Frontend, GuestMemory, Setup};
use microagent_vhost_net::frame::{GATEWAY_MAC, GUEST};
use microagent_vhost_net::smoltcp::phy::ChecksumCapabilities;
use microagent_vhost_net::smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber,
};
use microagent_vhost_net::virtio::HEADER_LEN;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::Duration;
use vm_memory::GuestAddress;

pub const RX: usize = 0;
pub const TX: usize = 1;
pub const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const WAIT: Duration = Duration::from_secs(10);
const RX_BUF: u32 = 2048;
const RX_BUFFERS: usize = 64;
/// Room for the largest frame a test sends (oversized ones included).
const TX_SLOT: u32 = 128 << 10;

/// The harness as the guest's virtio-net driver.
pub struct NetGuest {
    pub mem: GuestMemory,
    pub fe: Frontend,
    rx_bufs: HashMap<u16, GuestAddress>,
    pending: VecDeque<(u16, u32)>,
    tx_slot: GuestAddress,
}

impl NetGuest {
    pub fn connect(socket: &Path, setup: Setup) -> Self {
        let mut mem = GuestMemory::new(16 << 20).unwrap();
        let fe = Frontend::connect(socket, &mut mem, &setup).unwrap();
        let tx_slot = mem.alloc(u64::from(TX_SLOT), 8).unwrap();
        let mut guest = Self {
            mem,
            fe,
            rx_bufs: HashMap::new(),
            pending: VecDeque::new(),
            tx_slot,
        };
        for _ in 0..RX_BUFFERS {
            let addr = guest.mem.alloc(u64::from(RX_BUF), 8).unwrap();
            guest.post_rx(addr);
        }
        guest
    }

    pub fn new(socket: &Path) -> Self {
        Self::connect(
            socket,
            Setup {
                queues: 2,
                ..Setup::default()
            },
        )
    }

    fn post_rx(&mut self, addr: GuestAddress) {
        let q = &mut self.fe.queues[RX];
        let head = q.write_chain(&self.mem, &[Buf::writable(addr, RX_BUF)]);
        q.publish(&self.mem, head);
        q.kick().unwrap();
        self.rx_bufs.insert(head, addr);
    }

    /// Sends raw chain contents (header included) split into `bufs` readable pieces of
    /// the given lengths; waits until the device used the chain.
    pub fn send_raw(&mut self, bytes: &[u8], pieces: &[usize]) {
        assert!(bytes.len() <= TX_SLOT as usize);
        self.mem.write(self.tx_slot, bytes);
        let mut bufs = Vec::new();
        let mut at = 0u64;
        for &len in pieces {
            bufs.push(Buf::readable(GuestAddress(self.tx_slot.0 + at), len as u32));
            at += len as u64;
        }
        let q = &mut self.fe.queues[TX];
        q.submit(&self.mem, &bufs).unwrap();
        q.wait_used(&self.mem, 1, WAIT).unwrap();
    }

    /// Sends one frame behind a zero virtio-net header.
    pub fn send(&mut self, frame: &[u8]) {
        let mut bytes = vec![0u8; HEADER_LEN];
        bytes.extend_from_slice(frame);
        self.send_raw(&bytes, &[bytes.len()]);
    }

    /// The next frame the device delivered (its buffer is posted again).
    pub fn try_recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        if self.pending.is_empty() {
            let used = self.fe.queues[RX].wait_used(&self.mem, 1, timeout).ok()?;
            self.pending.extend(used);
        }
        let (head, len) = self.pending.pop_front()?;
        let addr = self
            .rx_bufs
            .remove(&head)
            .expect("used an unknown rx buffer");
        assert!(len as usize >= HEADER_LEN, "rx used length {len}");
        let bytes = self.mem.read(addr, len as usize);
        let num_buffers = u16::from_le_bytes([bytes[10], bytes[11]]);
        assert_eq!(
            num_buffers, 1,
            "a small frame spread over {num_buffers} buffers"
        );
        self.post_rx(addr);
        Some(bytes[HEADER_LEN..].to_vec())
    }

    /// Receives until `want` accepts a frame, answering ARP requests for the guest's
    /// address as its kernel would; panics after the timeout.
    pub fn recv_until(&mut self, what: &str, mut want: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline {
            if let Some(frame) = self.try_recv(Duration::from_millis(200)) {
                if want(&frame) {
                    return frame;
                }
                if let Some(reply) = arp_reply_to(&frame) {
                    self.send(&reply);
                }
            }
        }
        panic!("no {what} from the device");
    }
}

fn ethernet(ethertype: EthernetProtocol, dst: EthernetAddress, payload_len: usize) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + payload_len];
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: dst,
        ethertype,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    frame
}

/// An ARP request from the guest for `target`.
pub fn arp_request(target: Ipv4Address) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: GUEST,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut frame = ethernet(
        EthernetProtocol::Arp,
        EthernetAddress::BROADCAST,
        repr.buffer_len(),
    );
    repr.emit(&mut ArpPacket::new_unchecked(&mut frame[14..]));
    frame
}

/// The guest's answer when `frame` asks who has the guest's address.
fn arp_reply_to(frame: &[u8]) -> Option<Vec<u8>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let packet = ArpPacket::new_checked(eth.payload()).ok()?;
    let ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = ArpRepr::parse(&packet).ok()?
    else {
        return None;
    };
    if target_protocol_addr != GUEST {
        return None;
    }
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: GUEST,
        target_hardware_addr: source_hardware_addr,
        target_protocol_addr: source_protocol_addr,
    };
    let mut reply = ethernet(
        EthernetProtocol::Arp,
        source_hardware_addr,
        repr.buffer_len(),
    );
    repr.emit(&mut ArpPacket::new_unchecked(&mut reply[14..]));
    Some(reply)
}

/// The sender's MAC when `frame` is an ARP reply for `ip`.
pub fn arp_reply_for(frame: &[u8], ip: Ipv4Address) -> Option<EthernetAddress> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let packet = ArpPacket::new_checked(eth.payload()).ok()?;
    match ArpRepr::parse(&packet).ok()? {
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr,
            source_protocol_addr,
            ..
        } if source_protocol_addr == ip => Some(source_hardware_addr),
        _ => None,
    }
}

/// A TCP segment from the guest (10.0.2.15:`src_port`) to `dst`.
pub fn tcp_segment(
    src_port: u16,
    dst: (Ipv4Address, u16),
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let tcp = TcpRepr {
        src_port,
        dst_port: dst.1,
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 64240,
        window_scale: None,
        max_seg_size: (control == TcpControl::Syn).then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: GUEST,
        dst_addr: dst.0,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let mut frame = ethernet(EthernetProtocol::Ipv4, GATEWAY_MAC, 20 + tcp.buffer_len());
    let mut packet = Ipv4Packet::new_unchecked(&mut frame[14..]);
    ip.emit(&mut packet, &caps);
    tcp.emit(
        &mut TcpPacket::new_unchecked(packet.payload_mut()),
        &GUEST.into(),
        &dst.0.into(),
        &caps,
    );
    frame
}

/// (control flags, seq, ack, src port, dst port) of a TCP segment to the guest.
pub struct Segment {
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
    pub seq: u32,
    pub ack_number: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

pub fn parse_tcp(frame: &[u8]) -> Option<Segment> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some(Segment {
        syn: tcp.syn(),
        ack: tcp.ack(),
        rst: tcp.rst(),
        seq: tcp.seq_number().0 as u32,
        ack_number: tcp.ack_number().0 as u32,
        src_port: tcp.src_port(),
        dst_port: tcp.dst_port(),
    })
}
