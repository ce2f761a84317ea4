//! The host-side frontend harness playing a guest's virtio-vsock driver: RX buffers
//! kept posted, packets sent on TX, the event queue for transport resets. Used by the
//! vsock tests and the vsock benchmark alike.

use crate::frontend::{Buf, Frontend, GuestMemory, Setup};
use microagent_vhost_vsock::packet::{
    Header, Packet, HEADER_LEN, HOST_CID, OP_CREDIT_UPDATE, TYPE_STREAM,
};
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use vm_memory::{ByteValued, GuestAddress};

/// The guest CID the harness plays.
pub const CID: u64 = 3;
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const EVENT: usize = 2;
const WAIT: Duration = Duration::from_secs(10);
const RX_BUF: u32 = HEADER_LEN as u32 + (64 << 10);
const RX_BUFFERS: usize = 64;
const TX_SLOTS: usize = 16;

/// The harness as the guest's virtio-vsock driver.
pub struct Guest {
    pub mem: GuestMemory,
    pub fe: Frontend,
    rx_bufs: HashMap<u16, GuestAddress>,
    pending: VecDeque<(u16, u32)>,
    tx_slots: Vec<GuestAddress>,
    next_slot: usize,
    /// RX buffers the device returned as used without writing a header into them
    /// (skipped: a driver would read a stale header from them).
    pub unwritten_rx: usize,
}

impl Guest {
    pub fn connect(socket: &Path, setup: Setup) -> Self {
        let mut mem = GuestMemory::new(32 << 20).unwrap();
        let fe = Frontend::connect(socket, &mut mem, &setup).unwrap();
        let tx_slots = (0..TX_SLOTS)
            .map(|_| mem.alloc(u64::from(RX_BUF), 8).unwrap())
            .collect();
        let mut guest = Self {
            mem,
            fe,
            rx_bufs: HashMap::new(),
            pending: VecDeque::new(),
            tx_slots,
            next_slot: 0,
            unwritten_rx: 0,
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
                queues: 3,
                ..Setup::default()
            },
        )
    }

    /// Posts an RX buffer whose header is poisoned (all 0xFF: op 0xFFFF, which no
    /// device writes), so that a buffer returned without a header is recognised.
    fn post_rx(&mut self, addr: GuestAddress) {
        self.mem.write(addr, &[0xFF; HEADER_LEN]);
        let q = &mut self.fe.queues[RX];
        let head = q.write_chain(&self.mem, &[Buf::writable(addr, RX_BUF)]);
        q.publish(&self.mem, head);
        q.kick().unwrap();
        self.rx_bufs.insert(head, addr);
    }

    pub fn send(&mut self, p: Packet, payload: &[u8]) {
        self.send_batch(&[(p, payload)]);
    }

    /// Queues every packet on TX, kicks once and waits until the device used them all,
    /// as Linux's virtio-vsock send worker does with the packets it has queued.
    pub fn send_batch(&mut self, packets: &[(Packet, &[u8])]) {
        assert!(packets.len() <= TX_SLOTS, "more packets than TX slots");
        let chains: Vec<Vec<Buf>> = packets
            .iter()
            .map(|(p, payload)| self.stage(*p, payload))
            .collect();
        let q = &mut self.fe.queues[TX];
        for bufs in &chains {
            let head = q.write_chain(&self.mem, bufs);
            q.publish(&self.mem, head);
        }
        q.kick().unwrap();
        q.wait_used(&self.mem, packets.len(), WAIT).unwrap();
    }

    /// Writes a packet into the next TX slot; returns its descriptors (header, payload).
    fn stage(&mut self, p: Packet, payload: &[u8]) -> Vec<Buf> {
        let slot = self.tx_slots[self.next_slot];
        self.next_slot = (self.next_slot + 1) % TX_SLOTS;
        let header = Header::from(p);
        self.mem.write(slot, header.as_slice());
        let data = GuestAddress(slot.0 + HEADER_LEN as u64);
        self.mem.write(data, payload);
        let mut bufs = vec![Buf::readable(slot, HEADER_LEN as u32)];
        if !payload.is_empty() {
            bufs.push(Buf::readable(data, payload.len() as u32));
        }
        bufs
    }

    /// The next packet the device put in an RX buffer (the buffer is posted again).
    pub fn try_recv(&mut self, timeout: Duration) -> Option<(Packet, Vec<u8>)> {
        loop {
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
            self.post_rx(addr);
            if bytes[..HEADER_LEN].iter().all(|&b| b == 0xFF) {
                self.unwritten_rx += 1;
                continue;
            }
            let header = *Header::from_slice(&bytes[..HEADER_LEN]).unwrap();
            let packet = Packet::from(header);
            assert_eq!(packet.len as usize, len as usize - HEADER_LEN);
            return Some((packet, bytes[HEADER_LEN..].to_vec()));
        }
    }

    pub fn recv(&mut self) -> (Packet, Vec<u8>) {
        self.try_recv(WAIT).expect("no packet from the device")
    }

    /// Receives, skipping credit updates.
    pub fn recv_op(&mut self) -> (Packet, Vec<u8>) {
        loop {
            let (p, data) = self.recv();
            if p.op != OP_CREDIT_UPDATE {
                return (p, data);
            }
        }
    }
}

/// A packet from the guest (CID 3) to the host.
pub fn pkt(
    src_port: u32,
    dst_port: u32,
    op: u16,
    len: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> Packet {
    Packet {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

/// A host client of a hybrid vsock socket that has sent `CONNECT <port>\n`, in one write
/// as clients such as socat do. (`writeln!` on an unbuffered socket writes "CONNECT ",
/// the port and the newline separately; vhost-device-vsock 0.3.0 reads the line once when
/// the socket becomes readable and closes a client whose line is not whole yet.)
pub fn connect_line(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut client = UnixStream::connect(uds)?;
    client.write_all(format!("CONNECT {port}\n").as_bytes())?;
    Ok(client)
}
