//! A snapshot's rings agree with its memory.
//!
//! A device's state records where its daemon's ring stopped (GET_VRING_BASE: the next
//! available index it would read). Our daemons finish every request they take before
//! they report that, so the used ring in saved memory can be at that index, or behind it
//! when a daemon holds a buffer, but never ahead: an entry ahead was written after the
//! state was saved (a daemon that ran again before memory was written). Restored, the
//! new daemon would write its next entries over those and the guest would see buffers
//! it already had, or ids that are not heads ("vsock rx:id 50 is not a head").

use crate::devices::virtio_mmio::TransportState;
use crate::memory::ram_ranges;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Status bit set by the driver once it has set the device up.
const DRIVER_OK: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "device {device} queue {queue}: the used ring in memory is at index {used} but the \
         saved ring stopped at {next_avail}; a daemon wrote guest memory after its state \
         was saved, so this snapshot cannot be restored safely; take it again"
    )]
    UsedAhead {
        device: usize,
        queue: usize,
        used: u16,
        next_avail: u16,
    },
    #[error("device {device} queue {queue}: its used ring at {addr:#x} is outside guest memory")]
    OutsideMemory {
        device: usize,
        queue: usize,
        addr: u64,
    },
    #[error("reading the used ring of device {device} queue {queue}: {source}")]
    Read {
        device: usize,
        queue: usize,
        source: io::Error,
    },
}

/// Checks every ready queue of every started device against `memory`: a file laid out
/// like guest memory's memfd (the snapshot's memory file, or the memfd itself) of
/// `memory_size` bytes.
pub fn check(devices: &[TransportState], memory: &File, memory_size: u64) -> Result<(), Error> {
    for (device, transport) in devices.iter().enumerate() {
        if transport.status & DRIVER_OK == 0 {
            continue;
        }
        for (queue, q) in transport.queues.iter().enumerate() {
            if !q.ready || q.size == 0 {
                continue;
            }
            // The used ring starts with u16 flags, then the u16 index.
            let addr = q.used.checked_add(2);
            let offset =
                addr.and_then(|a| file_offset(a, memory_size))
                    .ok_or(Error::OutsideMemory {
                        device,
                        queue,
                        addr: q.used,
                    })?;
            let mut idx = [0u8; 2];
            memory
                .read_exact_at(&mut idx, offset)
                .map_err(|source| Error::Read {
                    device,
                    queue,
                    source,
                })?;
            let used = u16::from_le_bytes(idx);
            // Ring indices wrap at 2^16: "ahead" is a positive distance.
            if (used.wrapping_sub(q.next_avail) as i16) > 0 {
                return Err(Error::UsedAhead {
                    device,
                    queue,
                    used,
                    next_avail: q.next_avail,
                });
            }
        }
    }
    Ok(())
}

/// Where the two bytes at guest address `addr` are in the memfd's layout (the
/// snapshot's memory file has the same layout).
pub fn file_offset(addr: u64, memory_size: u64) -> Option<u64> {
    let mut offset = 0;
    for (start, len) in ram_ranges(memory_size) {
        let start = start.0;
        if addr >= start && addr.checked_add(2)? <= start + len {
            return Some(offset + (addr - start));
        }
        offset += len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio_mmio::{DeviceKind, QueueState};
    use std::io::Write;

    fn transport(used_addr: u64, next_avail: u16) -> TransportState {
        TransportState {
            kind: DeviceKind::Vsock,
            device_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueState {
                size: 64,
                ready: true,
                desc: 0x1000,
                avail: 0x2000,
                used: used_addr,
                next_avail,
            }],
            status: 1 | 2 | 4 | 8,
            interrupt_status: 0,
        }
    }

    /// A 16 MiB memory file whose used ring at 0x3000 has index `used`.
    fn memory(used: u16) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.set_len(16 << 20).unwrap();
        file.write_all_at(&used.to_le_bytes(), 0x3002).unwrap();
        file.flush().unwrap();
        file
    }

    #[test]
    fn a_used_ring_at_or_behind_the_saved_index_passes() {
        check(&[transport(0x3000, 7)], &memory(7), 16 << 20).unwrap();
        check(&[transport(0x3000, 7)], &memory(5), 16 << 20).unwrap();
        // Wrapped: 65535 -> 2 is two entries ahead of 0xffff, so 0xffff is behind 2.
        check(&[transport(0x3000, 2)], &memory(0xffff), 16 << 20).unwrap();
    }

    #[test]
    fn a_used_ring_ahead_of_the_saved_index_is_refused_naming_device_and_queue() {
        let err = check(&[transport(0x3000, 7)], &memory(8), 16 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                Error::UsedAhead {
                    device: 0,
                    queue: 0,
                    used: 8,
                    next_avail: 7
                }
            ),
            "{err}"
        );
        let err = check(&[transport(0x3000, 0xffff)], &memory(1), 16 << 20).unwrap_err();
        assert!(matches!(err, Error::UsedAhead { used: 1, .. }), "{err}");
    }

    #[test]
    fn a_device_the_driver_never_started_is_not_checked() {
        let mut t = transport(0x3000, 0);
        t.status = 1 | 2;
        check(&[t], &memory(9), 16 << 20).unwrap();
    }

    #[test]
    fn a_used_ring_outside_memory_is_refused() {
        let err = check(&[transport(16 << 20, 0)], &memory(0), 16 << 20).unwrap_err();
        assert!(matches!(err, Error::OutsideMemory { .. }), "{err}");
        let err = check(&[transport(u64::MAX - 1, 0)], &memory(0), 16 << 20).unwrap_err();
        assert!(matches!(err, Error::OutsideMemory { .. }), "{err}");
    }
}
