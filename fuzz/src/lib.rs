//! What the fuzz targets share: guest memory and a split virtqueue laid out in it,
//! both made from the fuzzer's bytes, so that the daemons' own chain walking and
//! request parsing see exactly what a hostile guest could put in its memory.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size: one region at 0.
pub const MEM_SIZE: usize = 0x10000;
/// Queue size (descriptors).
pub const QUEUE_SIZE: u16 = 16;
/// Where the rings live: descriptor table, available ring, used ring.
pub const DESC_TABLE: u64 = 0x0;
pub const AVAIL_RING: u64 = 0x100;
pub const USED_RING: u64 = 0x200;

/// Guest memory whose first bytes are `data` (the rest zero).
pub fn guest_memory(data: &[u8]) -> Option<GuestMemoryMmap> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).ok()?;
    Some(mem)
}

/// A ready split queue whose rings are at the fixed addresses above.
pub fn queue(mem: &GuestMemoryMmap) -> Option<Queue> {
    let mut q = Queue::new(QUEUE_SIZE).ok()?;
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}
