//! What a frontend's message must satisfy before vhost-user-backend acts on it. Each
//! check closes a way for a frontend to kill or wedge the daemon that the handler itself
//! lets through (issue 19):
//!
//! - SET_MEM_TABLE / ADD_MEM_REG: every region must lie inside its file (fstat). A
//!   region past EOF maps fine and kills the daemon with SIGBUS at the first access.
//! - SET_VRING_NUM: a split virtqueue's size is a power of two (virtio 1.2, 2.7: "Queue
//!   Size value is always a power of 2"; our devices do not offer VIRTIO_F_RING_PACKED)
//!   from 1 to the device's maximum. virtio-queue ignores any other size and keeps the
//!   old one, so the device's ring layout would silently differ from the driver's.
//! - SET_VRING_KICK/CALL/ERR and SET_DEVICE_STATE_FD: the descriptor is made
//!   non-blocking, so a kick fd holding a partial eventfd value, a call fd that is full
//!   or a state pipe nobody drains cannot block a thread forever.

use microagent_device_state::transfer::set_nonblocking;
use std::fs::File;
use std::io;

/// vhost-user request codes (vhost-user spec, "Front-end message types").
pub mod request {
    pub const SET_FEATURES: u32 = 2;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const ADD_MEM_REG: u32 = 37;
    pub const SET_DEVICE_STATE_FD: u32 = 42;
}

/// `struct VhostUserMemoryRegion`: guest address, size, frontend address, mmap offset.
const REGION_LEN: usize = 32;

/// What the device allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_queue_size: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "SET_MEM_TABLE region {index}: {size:#x} bytes at file offset {offset:#x} do not fit \
         in its {file_size}-byte file; mapping it would kill the daemon with SIGBUS"
    )]
    RegionPastEof {
        index: usize,
        size: u64,
        offset: u64,
        file_size: u64,
    },
    #[error("SET_MEM_TABLE region {index}: fstat on its file: {source}")]
    Fstat { index: usize, source: io::Error },
    #[error(
        "SET_VRING_NUM {num} for ring {index}: a split virtqueue's size must be a power of two \
         from 1 to {max}"
    )]
    QueueSize { index: u32, num: u32, max: u16 },
    #[error("request {request}: making its file descriptor non-blocking: {source}")]
    NonBlocking { request: u32, source: io::Error },
    #[error("request {request} announces a {size}-byte payload, more than {max}")]
    TooLarge {
        request: u32,
        size: usize,
        max: usize,
    },
}

impl Refusal {
    /// A stable code for logs and for the frontend's operator.
    pub fn code(&self) -> &'static str {
        match self {
            Self::RegionPastEof { .. } | Self::Fstat { .. } => "vhost_user.region_past_eof",
            Self::QueueSize { .. } => "vhost_user.bad_queue_size",
            Self::NonBlocking { .. } => "vhost_user.bad_fd",
            Self::TooLarge { .. } => "vhost_user.message_too_large",
        }
    }
}

/// Checks one message (its request code, payload and attached files). Payloads too
/// short for their request are left to the handler, which refuses them.
pub fn check(request: u32, payload: &[u8], files: &[File], limits: Limits) -> Result<(), Refusal> {
    match request {
        request::SET_MEM_TABLE => {
            let count = u32_at(payload, 0).unwrap_or(0) as usize;
            let regions = payload
                .get(8..)
                .unwrap_or_default()
                .chunks_exact(REGION_LEN);
            for (index, (region, file)) in regions.zip(files).take(count).enumerate() {
                region_fits(index, region, file)?;
            }
            Ok(())
        }
        request::ADD_MEM_REG => match (payload.get(8..8 + REGION_LEN), files.first()) {
            (Some(region), Some(file)) => region_fits(0, region, file),
            _ => Ok(()),
        },
        request::SET_VRING_NUM => {
            let (Some(index), Some(num)) = (u32_at(payload, 0), u32_at(payload, 4)) else {
                return Ok(());
            };
            let max = limits.max_queue_size;
            if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
                return Err(Refusal::QueueSize { index, num, max });
            }
            Ok(())
        }
        request::SET_VRING_KICK
        | request::SET_VRING_CALL
        | request::SET_VRING_ERR
        | request::SET_DEVICE_STATE_FD => files
            .iter()
            .try_for_each(set_nonblocking)
            .map_err(|source| Refusal::NonBlocking { request, source }),
        _ => Ok(()),
    }
}

/// VHOST_USER_F_PROTOCOL_FEATURES, a virtio feature bit only vhost-user uses.
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// Message order the handler is stricter about than frontends are. QEMU's virtio-net
/// (7.2) sends SET_VRING_ENABLE when the device is realized, before SET_FEATURES has
/// acked VHOST_USER_F_PROTOCOL_FEATURES, and does not send it again when it starts the
/// device; vhost's handler answers that early message with an error that ends the
/// session. So the gate answers early enables itself, keeps the last state asked for
/// each ring, and replays those states to the handler right after the SET_FEATURES that
/// acks the feature (until then the rings cannot run anyway).
#[derive(Debug, Default)]
pub struct Order {
    protocol_features_acked: bool,
    /// SET_VRING_ENABLE payloads held back, the last one per ring.
    held: Vec<[u8; 8]>,
}

/// What the gate does with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Forward,
    /// The gate answers it (success) and holds it back.
    AnswerHere,
    /// Forward it, then send these SET_VRING_ENABLE payloads (no reply wanted).
    ForwardThenEnable(Vec<[u8; 8]>),
}

impl Order {
    pub fn admit(&mut self, request: u32, payload: &[u8]) -> Admit {
        match request {
            request::SET_FEATURES => {
                self.protocol_features_acked = u64_at(payload, 0) & PROTOCOL_FEATURES != 0;
                if self.protocol_features_acked && !self.held.is_empty() {
                    Admit::ForwardThenEnable(std::mem::take(&mut self.held))
                } else {
                    Admit::Forward
                }
            }
            request::SET_VRING_ENABLE if !self.protocol_features_acked => {
                if let Some(state) = payload.get(..8).and_then(|p| <[u8; 8]>::try_from(p).ok()) {
                    self.held.retain(|held| held[..4] != state[..4]);
                    self.held.push(state);
                }
                Admit::AnswerHere
            }
            _ => Admit::Forward,
        }
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    if let Some(b) = bytes.get(at..at + 8) {
        word.copy_from_slice(b);
    }
    u64::from_le_bytes(word)
}

/// A region (`struct VhostUserMemoryRegion`) must be non-empty and end inside its file.
/// A frontend can still shrink the file afterwards; frontends that must not be trusted
/// that far should seal it (F_SEAL_SHRINK), as microagent-vmm's memfd is never resized.
fn region_fits(index: usize, region: &[u8], file: &File) -> Result<(), Refusal> {
    let size = u64_at(region, 8);
    let offset = u64_at(region, 24);
    let file_size = file
        .metadata()
        .map_err(|source| Refusal::Fstat { index, source })?
        .len();
    match offset.checked_add(size) {
        Some(end) if size > 0 && end <= file_size => Ok(()),
        _ => Err(Refusal::RegionPastEof {
            index,
            size,
            offset,
            file_size,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_queue_size: 1024,
    };

    fn mem_table(regions: &[(u64, u64)]) -> Vec<u8> {
        let mut payload = (regions.len() as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(&[0; 4]);
        for &(size, offset) in regions {
            for field in [0x1000_0000u64, size, 0x7f00_0000_0000, offset] {
                payload.extend_from_slice(&field.to_le_bytes());
            }
        }
        payload
    }

    fn file_of(len: u64) -> File {
        let file = tempfile::tempfile().unwrap();
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn regions_inside_their_files_pass_and_others_are_refused() {
        let ok = mem_table(&[(4096, 0), (4096, 4096)]);
        let files = [file_of(8192), file_of(8192)];
        check(request::SET_MEM_TABLE, &ok, &files, LIMITS).unwrap();
        for (size, offset) in [(16384, 0), (4096, 8192), (1, u64::MAX), (0, 0)] {
            let payload = mem_table(&[(size, offset)]);
            let err = check(request::SET_MEM_TABLE, &payload, &[file_of(8192)], LIMITS);
            assert!(
                matches!(err, Err(Refusal::RegionPastEof { index: 0, .. })),
                "{size:#x}@{offset:#x}: {err:?}"
            );
        }
    }

    #[test]
    fn descriptors_for_rings_and_state_come_out_non_blocking() {
        use std::os::fd::AsRawFd;
        for request in [
            request::SET_VRING_KICK,
            request::SET_VRING_CALL,
            request::SET_VRING_ERR,
            request::SET_DEVICE_STATE_FD,
        ] {
            let file = file_of(0);
            check(
                request,
                &0u64.to_le_bytes(),
                std::slice::from_ref(&file),
                LIMITS,
            )
            .unwrap();
            // SAFETY: F_GETFL on a descriptor owned by `file`.
            let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
            assert_ne!(flags & libc::O_NONBLOCK, 0, "request {request}");
        }
    }

    #[test]
    fn early_ring_enables_are_answered_held_and_replayed_after_protocol_features() {
        let mut order = Order::default();
        let ring = |index: u32, on: u32| {
            let mut p = [0u8; 8];
            p[..4].copy_from_slice(&index.to_le_bytes());
            p[4..].copy_from_slice(&on.to_le_bytes());
            p
        };
        assert_eq!(
            order.admit(request::SET_VRING_ENABLE, &ring(0, 1)),
            Admit::AnswerHere
        );
        assert_eq!(
            order.admit(request::SET_VRING_ENABLE, &ring(1, 0)),
            Admit::AnswerHere
        );
        assert_eq!(
            order.admit(request::SET_VRING_ENABLE, &ring(1, 1)),
            Admit::AnswerHere
        );
        // SET_FEATURES without the feature changes nothing yet.
        let plain = (1u64 << 32).to_le_bytes();
        assert_eq!(order.admit(request::SET_FEATURES, &plain), Admit::Forward);
        let acked = (1u64 << 32 | PROTOCOL_FEATURES).to_le_bytes();
        assert_eq!(
            order.admit(request::SET_FEATURES, &acked),
            Admit::ForwardThenEnable(vec![ring(0, 1), ring(1, 1)])
        );
        assert_eq!(
            order.admit(request::SET_VRING_ENABLE, &ring(0, 0)),
            Admit::Forward
        );
        assert_eq!(order.admit(request::SET_FEATURES, &acked), Admit::Forward);
        assert_eq!(order.admit(request::SET_MEM_TABLE, &[]), Admit::Forward);
    }

    #[test]
    fn queue_sizes_must_be_powers_of_two_up_to_the_maximum() {
        let num = |index: u32, num: u32| {
            let mut payload = index.to_le_bytes().to_vec();
            payload.extend_from_slice(&num.to_le_bytes());
            check(request::SET_VRING_NUM, &payload, &[], LIMITS)
        };
        for good in [1, 2, 256, 1024] {
            num(0, good).unwrap();
        }
        for bad in [0, 3, 100, 1000, 2048, u32::MAX] {
            let err = num(1, bad).unwrap_err();
            assert!(matches!(err, Refusal::QueueSize { index: 1, .. }), "{bad}");
            assert_eq!(err.code(), "vhost_user.bad_queue_size");
        }
    }
}
