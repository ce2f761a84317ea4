//! The vhost-user backend: what the frontend negotiates, one worker thread per queue, and
//! device state transfer for snapshots.

use crate::config::BlkConfig;
use crate::disk::{self, Disk, SECTOR_SIZE};
use crate::request::{self, Device, Request, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use crate::state::BlkState;
use crate::watchdog::InFlight;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueOwnedT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

/// Largest queue a frontend may set up (QEMU asks for 1024 by default).
pub const QUEUE_SIZE: usize = 1024;
/// Segments in one request (with indirect descriptors a request may exceed the ring).
const SEG_MAX: u32 = 254;
/// A batch moving at least this much data is executed on several threads.
const PARALLEL_BATCH_BYTES: u64 = 512 << 10;

use crate::request::Parsed;

use microagent_daemon_kit::memory::Memory;
use microagent_daemon_kit::Mem;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Disk(#[from] disk::Error),
    #[error(transparent)]
    State(#[from] microagent_daemon_kit::state::Error),
    #[error("saved state does not fit this disk: {0}")]
    Mismatch(String),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::other(e)
    }
}

pub struct BlkBackend {
    disk: Disk,
    config: BlkConfig,
    mem: Memory,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// A queue whose avail ring is corrupt stops being served until the device is reset.
    broken: Vec<AtomicBool>,
    transfer: microagent_daemon_kit::state::transfer::Slot,
    /// Threads a large batch is spread over.
    io_threads: usize,
    /// Which queues are executing a batch, since when (for the I/O watchdog).
    in_flight: Arc<InFlight>,
}

impl BlkBackend {
    pub fn new(config: BlkConfig) -> Result<Self, Error> {
        let disk = Disk::open(&config.disk, config.read_only, config.direct_io)?;
        let in_flight = Arc::new(InFlight::new(usize::from(config.queues)));
        Ok(Self {
            disk,
            broken: (0..config.queues).map(|_| AtomicBool::new(false)).collect(),
            config,
            mem: Memory::default(),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            transfer: Default::default(),
            io_threads: thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            in_flight,
        })
    }

    /// What the I/O watchdog watches.
    pub fn in_flight(&self) -> Arc<InFlight> {
        self.in_flight.clone()
    }

    /// `struct virtio_blk_config`, little-endian.
    fn config_space(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(60);
        c.extend_from_slice(&self.disk.sectors().to_le_bytes()); // capacity
        c.extend_from_slice(&0u32.to_le_bytes()); // size_max
        c.extend_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        c.extend_from_slice(&[0; 4]); // geometry
        c.extend_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c.extend_from_slice(&[0, 0]); // physical_block_exp, alignment_offset
        c.extend_from_slice(&0u16.to_le_bytes()); // min_io_size
        c.extend_from_slice(&0u32.to_le_bytes()); // opt_io_size
        c.extend_from_slice(&[0, 0]); // writeback, unused0
        c.extend_from_slice(&self.config.queues.to_le_bytes()); // num_queues
        c.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        c.extend_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_discard_seg
        c.extend_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c.extend_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        c.extend_from_slice(&[1, 0, 0, 0]); // write_zeroes_may_unmap, unused1
        c
    }

    fn state(&self) -> BlkState {
        BlkState {
            acked_features: self.acked_features.load(Ordering::Acquire),
            sectors: self.disk.sectors(),
            read_only: self.config.read_only,
            queues: self.config.queues,
            serial: self.config.serial.clone(),
        }
    }

    /// Checks saved state against this daemon and adopts what the driver negotiated.
    fn adopt(&self, saved: &BlkState) -> Result<(), Error> {
        let ours = self.state();
        if saved.sectors != ours.sectors {
            return Err(Error::Mismatch(format!(
                "saved disk had {} sectors, this one has {}",
                saved.sectors, ours.sectors
            )));
        }
        if saved.read_only != ours.read_only || saved.queues != ours.queues {
            return Err(Error::Mismatch(format!(
                "saved read_only={} queues={}, this daemon read_only={} queues={}",
                saved.read_only, saved.queues, ours.read_only, ours.queues
            )));
        }
        // The serial is this daemon's configuration, not device state: the guest asks for
        // it (GET_ID) whenever it wants it, and a fork's disk gets a serial of its own.
        if saved.acked_features & !self.features() != 0 {
            return Err(Error::Mismatch(format!(
                "saved features {:#x} are not all offered here ({:#x})",
                saved.acked_features,
                self.features()
            )));
        }
        self.acked_features
            .store(saved.acked_features, Ordering::Release);
        self.event_idx.store(
            saved.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            Ordering::Release,
        );
        Ok(())
    }

    /// Serves every available request on one queue. The ring stays locked throughout, so
    /// GET_VRING_BASE (which takes the same lock) returns only after these completed.
    fn process_queue(&self, index: usize, vring: &VringRwLock<Mem>) {
        let Some(broken) = self.broken.get(index) else {
            return;
        };
        if broken.load(Ordering::Acquire) {
            return;
        }
        let mem = self.mem.get();
        let device = Device {
            disk: &self.disk,
            read_only: self.config.read_only,
            serial: self.config.serial.as_bytes(),
        };
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mut state = vring.get_mut();
        let mut used_any = false;
        let result = (|| -> Result<(), virtio_queue::Error> {
            loop {
                if event_idx {
                    state.disable_notification()?;
                }
                let parsed: Vec<(u16, Parsed)> = state
                    .get_queue_mut()
                    .iter(&*mem)?
                    .map(|chain| {
                        let head = chain.head_index();
                        let descriptors: Vec<Descriptor> = chain.collect();
                        (head, Request::parse(&mem, &descriptors))
                    })
                    .collect();
                let busy = self.in_flight.busy(index);
                let used = self.complete(index, &mem, &device, &parsed);
                drop(busy);
                for ((head, _), used_len) in parsed.iter().zip(used) {
                    state.add_used(*head, used_len)?;
                    used_any = true;
                }
                if !event_idx || !state.enable_notification()? {
                    return Ok(());
                }
            }
        })();
        if let Err(e) = result {
            log::error!("queue {index} is broken, not serving it until reset: {e}");
            broken.store(true, Ordering::Release);
        }
        if used_any && state.needs_notification().unwrap_or(true) {
            if let Err(e) = state.signal_used_queue() {
                log::warn!("queue {index}: signalling the frontend: {e}");
            }
        }
    }

    /// Carries out a batch and returns each request's used length, in order. A batch
    /// that moves a lot of data is spread over worker threads, as page-cache copies of
    /// large requests are CPU-bound; requests in one batch were in flight together, so
    /// the driver expects no order among them.
    fn complete(
        &self,
        queue: usize,
        mem: &GuestMemoryMmap,
        device: &Device<'_>,
        batch: &[(u16, Parsed)],
    ) -> Vec<u32> {
        let one = |(_, parsed): &(u16, Parsed)| {
            let used = request::complete(queue, mem, device, parsed);
            // The watchdog times each request, not the batch: a long batch on a slow
            // disk that keeps completing requests is not a disk that stopped answering.
            self.in_flight.progress(queue);
            used
        };
        let bytes: u64 = batch
            .iter()
            .filter_map(|(_, p)| p.as_ref().ok())
            .map(Request::data_len)
            .sum();
        let workers = self.io_threads.min(batch.len());
        if bytes < PARALLEL_BATCH_BYTES || workers < 2 {
            return batch.iter().map(one).collect();
        }
        let per_worker = batch.len().div_ceil(workers);
        thread::scope(|scope| {
            let handles: Vec<_> = batch
                .chunks(per_worker)
                .map(|chunk| {
                    let handle = scope.spawn(|| chunk.iter().map(one).collect::<Vec<u32>>());
                    (chunk.len(), handle)
                })
                .collect();
            handles
                .into_iter()
                // Had a request panicked, its chunk reports no bytes rather than a
                // length that belongs to another request.
                .flat_map(|(len, h)| h.join().unwrap_or_else(|_| vec![0; len]))
                .collect()
        })
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        usize::from(self.config.queues)
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.config.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::DEVICE_STATE
    }

    fn reset_device(&self) {
        for broken in &self.broken {
            broken.store(false, Ordering::Release);
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    /// Exactly `size` bytes: fields a newer driver asks for beyond ours read as zero.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_space();
        microagent_daemon_kit::config_space::slice(&config, offset, size)
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        self.mem.update(mem);
        Ok(())
    }

    /// One worker thread per queue, so a slow queue never holds up another.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.config.queues).map(|q| 1u64 << q).collect()
    }

    /// Lets the daemon stop its worker threads when the frontend disconnects.
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        microagent_daemon_kit::worker::exit_event(thread_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        microagent_daemon_kit::confine::worker_thread();
        // An error returned here would end the worker thread: report and carry on.
        if evset != EventSet::IN {
            log::warn!("queue {thread_id}: unexpected event set {evset:?}");
            return Ok(());
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(thread_id, vring),
            None => log::warn!("queue {thread_id}: event for unknown ring {device_event}"),
        }
        Ok(())
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        self.transfer
            .set_fd(direction, phase, file, || self.state())
    }

    fn check_device_state(&self) -> io::Result<()> {
        self.transfer.check(|saved: BlkState| self.adopt(&saved))
    }
}
