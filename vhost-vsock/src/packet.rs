//! virtio-vsock packets: the header, operations and flags (virtio spec 5.10).

use vm_memory::{ByteValued, Le16, Le32, Le64};

pub const HOST_CID: u64 = 2;
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Event queue: the guest must drop every connection (sent after a restore).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Largest payload accepted in one packet from the guest.
pub const MAX_PAYLOAD: u32 = 64 << 10;

pub const HEADER_LEN: usize = std::mem::size_of::<Header>();

/// `struct virtio_vsock_hdr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct Header {
    pub src_cid: Le64,
    pub dst_cid: Le64,
    pub src_port: Le32,
    pub dst_port: Le32,
    pub len: Le32,
    pub type_: Le16,
    pub op: Le16,
    pub flags: Le32,
    pub buf_alloc: Le32,
    pub fwd_cnt: Le32,
}

// SAFETY: plain little-endian integers, packed so there is no padding; any bit pattern
// is a valid header.
unsafe impl ByteValued for Header {}

/// The fields of a header in native types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl From<Header> for Packet {
    fn from(h: Header) -> Self {
        Self {
            src_cid: h.src_cid.into(),
            dst_cid: h.dst_cid.into(),
            src_port: h.src_port.into(),
            dst_port: h.dst_port.into(),
            len: h.len.into(),
            type_: h.type_.into(),
            op: h.op.into(),
            flags: h.flags.into(),
            buf_alloc: h.buf_alloc.into(),
            fwd_cnt: h.fwd_cnt.into(),
        }
    }
}

impl From<Packet> for Header {
    fn from(p: Packet) -> Self {
        Self {
            src_cid: p.src_cid.into(),
            dst_cid: p.dst_cid.into(),
            src_port: p.src_port.into(),
            dst_port: p.dst_port.into(),
            len: p.len.into(),
            type_: p.type_.into(),
            op: p.op.into(),
            flags: p.flags.into(),
            buf_alloc: p.buf_alloc.into(),
            fwd_cnt: p.fwd_cnt.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_44_bytes_and_round_trips() {
        assert_eq!(HEADER_LEN, 44);
        let p = Packet {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1025,
            dst_port: 52,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 1 << 18,
            fwd_cnt: 99,
        };
        let h = Header::from(p);
        assert_eq!(h.as_slice()[16..20], 1025u32.to_le_bytes());
        assert_eq!(Packet::from(h), p);
    }
}
