//! A host-side vhost-user frontend for testing daemons without a guest: it maps a memfd
//! as guest memory, shares it with the daemon, drives split virtqueues in that memory
//! (descriptor chains, avail ring, kicks) and collects completions from the used ring.

use microagent_vmm::devices::vhost_user::{self, load_device_state, save_device_state};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend as VuFrontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("vhost-user: {0}")]
    VhostUser(#[from] vhost::Error),
    #[error("eventfd or pipe: {0}")]
    Io(#[from] io::Error),
    #[error("no completion on queue {queue} within {timeout:?}")]
    Timeout { queue: usize, timeout: Duration },
    #[error("out of guest memory for buffers")]
    OutOfMemory,
    #[error("this queue's kick is an eventfd, not a pipe")]
    NotAPipe,
    #[error(transparent)]
    DeviceState(#[from] microagent_vmm::devices::vhost_user::Error),
}

/// Guest memory backed by a memfd, so that a daemon can map it too.
#[derive(Debug)]
pub struct GuestMemory {
    mem: GuestMemoryMmap,
    next_free: u64,
}

impl GuestMemory {
    pub fn new(size: usize) -> Result<Self, Error> {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"microagent-harness".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| Error::Memory(e.to_string()))?;
        // Page 0 stays unused so that address 0 is never a valid buffer.
        Ok(Self {
            mem,
            next_free: 4096,
        })
    }

    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn size(&self) -> u64 {
        self.mem.last_addr().0 + 1
    }

    /// Reserves `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<GuestAddress, Error> {
        let start = self.next_free.next_multiple_of(align);
        let end = start.checked_add(len).ok_or(Error::OutOfMemory)?;
        if end > self.size() {
            return Err(Error::OutOfMemory);
        }
        self.next_free = end;
        Ok(GuestAddress(start))
    }

    /// Frees every buffer allocated after `mark` (see [`GuestMemory::mark`]).
    pub fn release_to(&mut self, mark: u64) {
        self.next_free = mark;
    }

    pub fn mark(&self) -> u64 {
        self.next_free
    }

    pub fn write(&self, addr: GuestAddress, data: &[u8]) {
        self.mem
            .write_slice(data, addr)
            .expect("harness buffers lie inside guest memory");
    }

    pub fn read(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, addr)
            .expect("harness buffers lie inside guest memory");
        buf
    }

    /// Where guest address `addr` is mapped in this process.
    pub fn host_address(&self, addr: GuestAddress) -> Result<u64, Error> {
        self.mem
            .get_host_address(addr)
            .map(|ptr| ptr as u64)
            .map_err(|e| Error::Memory(e.to_string()))
    }

    /// The regions as SET_MEM_TABLE describes them (tests alter them to send bad ones).
    pub fn regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, Error> {
        self.mem
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region).map_err(Error::VhostUser)
            })
            .collect()
    }
}

/// One buffer of a descriptor chain: where, how long, and whether the device writes it.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub device_writes: bool,
}

impl Buf {
    pub fn readable(addr: GuestAddress, len: u32) -> Self {
        Self {
            addr,
            len,
            device_writes: false,
        }
    }

    pub fn writable(addr: GuestAddress, len: u32) -> Self {
        Self {
            addr,
            len,
            device_writes: true,
        }
    }
}

/// A split virtqueue driven from the host side.
#[derive(Debug)]
pub struct VirtQueue {
    index: usize,
    size: u16,
    desc_table: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
    /// What the daemon reads kicks from: an eventfd, or a pipe's read end.
    kick: EventFd,
    /// The write end when `kick` is a pipe (see [`Setup::pipe_kick`]).
    kick_pipe: Option<File>,
    call: EventFd,
}

impl VirtQueue {
    fn new(index: usize, mem: &mut GuestMemory, size: u16, pipe_kick: bool) -> Result<Self, Error> {
        let n = u64::from(size);
        let (kick, kick_pipe) = if pipe_kick {
            let (read_end, write_end) = pipe()?;
            // SAFETY: the read end is a fresh descriptor handed over to the EventFd, which
            // is only used to pass it to the daemon.
            let kick = unsafe { EventFd::from_raw_fd(read_end.into_raw_fd()) };
            (kick, Some(File::from(write_end)))
        } else {
            (EventFd::new(EFD_NONBLOCK)?, None)
        };
        Ok(Self {
            index,
            size,
            desc_table: mem.alloc(16 * n, 16)?,
            avail: mem.alloc(6 + 2 * n, 2)?,
            used: mem.alloc(6 + 8 * n, 4)?,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
            kick,
            kick_pipe,
            call: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Writes descriptor `index` as given, raw: tests use it to build malformed chains.
    pub fn write_descriptor(&self, mem: &GuestMemory, index: u16, desc: Descriptor) {
        let at = self.desc_table.0 + 16 * u64::from(index);
        mem.mmap()
            .write_obj(desc, GuestAddress(at))
            .expect("descriptor table lies inside guest memory");
    }

    /// Writes a chain into the descriptor table (wrapping around it) and returns its head.
    pub fn write_chain(&mut self, mem: &GuestMemory, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, buf) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut flags = if buf.device_writes {
                VIRTQ_DESC_F_WRITE
            } else {
                0
            };
            let next = (index + 1) % self.size;
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_descriptor(
                mem,
                index,
                Descriptor::new(buf.addr.0, buf.len, flags, next),
            );
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        head
    }

    /// Writes `bufs` as an indirect descriptor table at `table` (16 bytes per entry) and
    /// one descriptor pointing at it into the ring's table; returns that head.
    pub fn write_indirect_chain(
        &mut self,
        mem: &GuestMemory,
        table: GuestAddress,
        bufs: &[Buf],
    ) -> u16 {
        for (i, buf) in bufs.iter().enumerate() {
            let mut flags = if buf.device_writes {
                VIRTQ_DESC_F_WRITE
            } else {
                0
            };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let desc = Descriptor::new(buf.addr.0, buf.len, flags, i as u16 + 1);
            mem.mmap()
                .write_obj(desc, table.unchecked_add(16 * i as u64))
                .expect("indirect table lies inside guest memory");
        }
        let head = self.next_desc;
        let len = 16 * bufs.len() as u32;
        self.write_descriptor(
            mem,
            head,
            Descriptor::new(table.0, len, VIRTQ_DESC_F_INDIRECT, 0),
        );
        self.next_desc = (head + 1) % self.size;
        head
    }

    /// With VIRTIO_RING_F_EVENT_IDX: asks the device to signal only once the used index
    /// moves past `idx` (the avail ring's trailing `used_event`).
    pub fn set_used_event(&self, mem: &GuestMemory, idx: u16) {
        mem.mmap()
            .write_obj(idx, self.avail.unchecked_add(4 + 2 * u64::from(self.size)))
            .expect("avail ring lies inside guest memory");
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// With VIRTIO_RING_F_EVENT_IDX: the avail index after which the device wants a kick
    /// (the used ring's trailing `avail_event`).
    pub fn avail_event(&self, mem: &GuestMemory) -> u16 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.mmap()
            .read_obj(self.used.unchecked_add(4 + 8 * u64::from(self.size)))
            .expect("used ring lies inside guest memory")
    }

    /// How many times the device signalled the call eventfd since the last look (0 when
    /// it did not), without waiting.
    pub fn take_calls(&self) -> u64 {
        self.call.read().unwrap_or(0)
    }

    /// Publishes `head` in the avail ring (without kicking).
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        let ring = mem.mmap();
        ring.write_obj(head, self.avail.unchecked_add(4 + 2 * slot))
            .expect("avail ring lies inside guest memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Writes the avail ring's idx field, raw: tests use it to corrupt the ring.
    pub fn set_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.mmap()
            .write_obj(idx, self.avail.unchecked_add(2))
            .expect("avail ring lies inside guest memory");
    }

    /// Adds a chain, publishes it and kicks the device; returns the head index.
    pub fn submit(&mut self, mem: &GuestMemory, bufs: &[Buf]) -> Result<u16, Error> {
        let head = self.write_chain(mem, bufs);
        self.publish(mem, head);
        self.kick()?;
        Ok(head)
    }

    pub fn kick(&self) -> Result<(), Error> {
        if self.kick_pipe.is_some() {
            return self.kick_raw(&1u64.to_ne_bytes());
        }
        self.kick.write(1)?;
        Ok(())
    }

    /// Another handle on a pipe kick's write end, which keeps the pipe open after the
    /// queue is gone.
    pub fn kick_pipe(&self) -> Result<File, Error> {
        Ok(self
            .kick_pipe
            .as_ref()
            .ok_or(Error::NotAPipe)?
            .try_clone()?)
    }

    /// Writes raw bytes to a pipe kick (a well-formed kick is 8 bytes); tests use it to
    /// leave a partial value for the daemon to read.
    pub fn kick_raw(&self, bytes: &[u8]) -> Result<(), Error> {
        let mut pipe = self.kick_pipe.as_ref().ok_or(Error::NotAPipe)?;
        pipe.write_all(bytes)?;
        Ok(())
    }

    fn used_idx(&self, mem: &GuestMemory) -> u16 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.mmap()
            .read_obj(self.used.unchecked_add(2))
            .expect("used ring lies inside guest memory")
    }

    /// Every used element the device has added since the last call, as (head, len).
    pub fn poll_used(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)> {
        let used_idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.last_used != used_idx {
            let slot = u64::from(self.last_used % self.size);
            let elem = self.used.unchecked_add(4 + 8 * slot);
            let id: u32 = mem.mmap().read_obj(elem).expect("used ring in memory");
            let len: u32 = mem
                .mmap()
                .read_obj(elem.unchecked_add(4))
                .expect("used ring in memory");
            out.push((id as u16, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// Blocks until the device signals the call eventfd or `timeout` passes.
    pub fn wait_call(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        // Non-blocking: drains the counter, or finds it empty after a timeout.
        let _ = self.call.read();
    }

    /// Waits until `count` more used elements appear; returns them as (head, len).
    pub fn wait_used(
        &mut self,
        mem: &GuestMemory,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<(u16, u32)>, Error> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(count);
        loop {
            out.extend(self.poll_used(mem));
            if out.len() >= count {
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    queue: self.index,
                    timeout,
                });
            }
            // Short waits: a device that does not signal is still seen by polling.
            self.wait_call((deadline - now).min(Duration::from_millis(10)));
        }
    }
}

/// Options for bringing a device up.
#[derive(Debug, Clone)]
pub struct Setup {
    pub queues: usize,
    pub queue_size: u16,
    /// Virtio feature bits the driver refuses (the rest of what the device offers is acked).
    pub refuse_features: u64,
    /// Ring indices to continue from (after a restore); empty means zeros.
    pub vring_bases: Vec<u16>,
    /// Device state to LOAD before the rings start.
    pub load_state: Option<Vec<u8>>,
    /// A queue whose kick descriptor is a pipe instead of an eventfd.
    pub pipe_kick: Option<usize>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            queues: 1,
            queue_size: 256,
            refuse_features: 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
            vring_bases: Vec::new(),
            load_state: None,
            pipe_kick: None,
        }
    }
}

/// A connection whose features are negotiated, nothing else set up yet.
pub struct Negotiated {
    pub vu: VuFrontend,
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
}

/// A connected, configured vhost-user device.
pub struct Frontend {
    vu: VuFrontend,
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    pub queues: Vec<VirtQueue>,
}

impl Frontend {
    /// Connects to `socket` (retrying while the daemon starts) and negotiates features,
    /// the first steps a VMM runs; tests that send their own messages start here.
    pub fn negotiate(socket: &Path, setup: &Setup) -> Result<Negotiated, Error> {
        let mut vu = vhost_user::connect(socket, setup.queues as u64, Duration::from_secs(10))?;
        vu.set_owner()?;
        let offered = vu.get_features()?;
        let features = offered & !setup.refuse_features;
        vu.set_features(features)?;
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            protocol_features = vu.get_protocol_features()?;
            vu.set_protocol_features(protocol_features)?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request is then acknowledged, so a refusal surfaces at its call.
                vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        Ok(Negotiated {
            vu,
            features,
            protocol_features,
        })
    }

    /// Connects to `socket` (retrying while the daemon starts) and runs the vhost-user
    /// set-up sequence a VMM runs.
    pub fn connect(socket: &Path, mem: &mut GuestMemory, setup: &Setup) -> Result<Self, Error> {
        let Negotiated {
            mut vu,
            features,
            protocol_features,
        } = Self::negotiate(socket, setup)?;
        vu.set_mem_table(&mem.regions()?)?;

        if let Some(state) = &setup.load_state {
            load_device_state(&mut vu, state)?;
        }

        let queues = start_queues(&mut vu, mem, setup, !protocol_features.is_empty())?;
        Ok(Self {
            vu,
            features,
            protocol_features,
            queues,
        })
    }

    /// The vhost-user connection, for tests that send messages of their own.
    pub fn vu(&mut self) -> &mut VuFrontend {
        &mut self.vu
    }

    /// Reads `len` bytes of the device's config space.
    pub fn config(&mut self, len: u32) -> Result<Vec<u8>, Error> {
        let (_, payload) = self.vu.get_config(
            0,
            len,
            VhostUserConfigFlags::WRITABLE,
            &vec![0; len as usize],
        )?;
        Ok(payload)
    }

    /// Stops every ring (GET_VRING_BASE) and returns the next avail index of each.
    pub fn stop(&mut self) -> Result<Vec<u16>, Error> {
        (0..self.queues.len())
            .map(|i| Ok(self.vu.get_vring_base(i)? as u16))
            .collect()
    }

    /// A device reset and a new start, as a VMM runs them when the driver resets the
    /// device (status 0) and sets it up again: every ring stopped (GET_VRING_BASE),
    /// features acked anew (what the device offers minus `setup.refuse_features`), and
    /// fresh rings from index 0. What the old rings held is the driver's to forget.
    pub fn reset(&mut self, mem: &mut GuestMemory, setup: &Setup) -> Result<(), Error> {
        self.stop()?;
        let mut features = self.vu.get_features()? & !setup.refuse_features;
        if !self.protocol_features.is_empty() {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.vu.set_features(features)?;
        self.features = features;
        let enable = !self.protocol_features.is_empty();
        self.queues = start_queues(&mut self.vu, mem, setup, enable)?;
        Ok(())
    }

    /// SET_DEVICE_STATE_FD(SAVE) after [`Frontend::stop`]: reads the state to EOF and
    /// checks it with CHECK_DEVICE_STATE.
    pub fn save_state(&mut self) -> Result<Vec<u8>, Error> {
        Ok(save_device_state(&mut self.vu)?)
    }
}

/// Builds fresh rings for `setup.queues` queues (continuing from `setup.vring_bases`)
/// and hands them to the daemon, as a VMM does when the driver sets DRIVER_OK;
/// `enable` sends SET_VRING_ENABLE (with VHOST_USER_F_PROTOCOL_FEATURES).
fn start_queues(
    vu: &mut VuFrontend,
    mem: &mut GuestMemory,
    setup: &Setup,
    enable: bool,
) -> Result<Vec<VirtQueue>, Error> {
    let mut queues = Vec::with_capacity(setup.queues);
    for index in 0..setup.queues {
        let pipe_kick = setup.pipe_kick == Some(index);
        let mut queue = VirtQueue::new(index, mem, setup.queue_size, pipe_kick)?;
        let base = setup.vring_bases.get(index).copied().unwrap_or(0);
        queue.next_desc = base % queue.size;
        queue.avail_idx = base;
        queue.last_used = base;
        // A restored used ring already holds `base` in guest memory.
        if base != 0 {
            mem.mmap()
                .write_obj(base, queue.used.unchecked_add(2))
                .expect("used ring lies inside guest memory");
            queue.set_avail_idx(mem, base);
        }
        // vhost-user carries ring addresses in the frontend's own address space.
        let config = VringConfigData {
            queue_max_size: setup.queue_size,
            queue_size: setup.queue_size,
            flags: 0,
            desc_table_addr: mem.host_address(queue.desc_table)?,
            used_ring_addr: mem.host_address(queue.used)?,
            avail_ring_addr: mem.host_address(queue.avail)?,
            log_addr: None,
        };
        vu.set_vring_num(index, setup.queue_size)?;
        vu.set_vring_addr(index, &config)?;
        vu.set_vring_base(index, base)?;
        vu.set_vring_call(index, &queue.call)?;
        vu.set_vring_kick(index, &queue.kick)?;
        if enable {
            vu.set_vring_enable(index, true)?;
        }
        queues.push(queue);
    }
    Ok(queues)
}

/// A pipe: (read end, write end).
pub fn pipe() -> Result<(File, OwnedFd), Error> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Asserts that a daemon refused the device state `connect` loaded: CHECK_DEVICE_STATE
/// failed (not the connection or the transfer), and the daemon's log names `reason`.
pub fn assert_state_refused(connect: Result<Frontend, Error>, log: &Path, reason: &str) {
    match connect {
        Err(Error::DeviceState(vhost_user::Error::Check(_))) => {}
        Err(other) => panic!("expected CHECK_DEVICE_STATE to refuse the state, got: {other}"),
        Ok(_) => panic!("the daemon accepted the state ({reason} expected)"),
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        text.contains(reason),
        "daemon log does not name {reason:?}:\n{text}"
    );
}
