//! The vhost-user backend: three queues (RX, TX, event) served by one worker thread,
//! host sockets on the same epoll instance, and device state for snapshots.

use crate::config::VsockConfig;
use crate::muxer::{self, Muxer, Poller, Rx};
use crate::packet::{Header, Packet, EVENT_TRANSPORT_RESET, HEADER_LEN, MAX_PAYLOAD};
use crate::state::VsockState;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::QueueOwnedT;
use vm_memory::{
    ByteValued, GuestMemoryBackend, GuestMemoryMmap, VolatileMemoryError, VolatileSlice,
    WriteVolatile,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::timerfd::TimerFd;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
const NUM_QUEUES: usize = 3;
pub const QUEUE_SIZE: usize = 1024;
/// epoll id of the timer that retries a pending transport reset.
const RESET_TIMER_ID: u16 = 9;
/// epoll id of the timer that drives [`Muxer::tick`] while it has work.
const TICK_TIMER_ID: u16 = 10;
const TICK: Duration = Duration::from_millis(100);

use microagent_daemon_kit::busy_poll::BusyPoll;
use microagent_daemon_kit::memory::Memory;
use microagent_daemon_kit::Mem;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Muxer(#[from] muxer::Error),
    #[error("the daemon was not wired to its worker's epoll")]
    NotStarted,
    #[error("timer: {0}")]
    Timer(io::Error),
    #[error(transparent)]
    State(#[from] microagent_daemon_kit::state::Error),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::other(e)
    }
}

pub struct VsockBackend {
    config: VsockConfig,
    mem: Memory,
    acked_features: AtomicU64,
    muxer: OnceLock<Mutex<Muxer>>,
    reset_timer: OnceLock<Mutex<TimerFd>>,
    /// Armed (periodic) while the muxer has pending clients or a paused listener.
    tick_timer: OnceLock<Mutex<(TimerFd, bool)>>,
    /// A transport reset waits to be delivered on the event queue (after a LOAD).
    reset_pending: Mutex<bool>,
    /// The worker's epoll fd, watched while the worker busy-polls.
    epoll_fd: OnceLock<i32>,
    busy_poll: Mutex<BusyPoll>,
    transfer: microagent_daemon_kit::state::transfer::Slot,
}

impl VsockBackend {
    pub fn new(config: VsockConfig) -> Self {
        Self {
            mem: Memory::default(),
            acked_features: AtomicU64::new(0),
            muxer: OnceLock::new(),
            reset_timer: OnceLock::new(),
            tick_timer: OnceLock::new(),
            reset_pending: Mutex::new(false),
            epoll_fd: OnceLock::new(),
            busy_poll: Mutex::new(BusyPoll::new(config.busy_poll)),
            transfer: Default::default(),
            config,
        }
    }

    /// Binds the host socket and registers it, and the reset timer, with the worker's
    /// epoll instance. Called once, before the frontend connects.
    pub fn start(&self, epoll_fd: i32) -> Result<(), Error> {
        let poller = Poller(epoll_fd);
        let muxer = Muxer::new(self.config.guest_cid, &self.config.uds_path, poller)?;
        let reset = timer_on(epoll_fd, RESET_TIMER_ID)?;
        let tick = timer_on(epoll_fd, TICK_TIMER_ID)?;
        let _ = self.muxer.set(Mutex::new(muxer));
        let _ = self.reset_timer.set(Mutex::new(reset));
        let _ = self.tick_timer.set(Mutex::new((tick, false)));
        let _ = self.epoll_fd.set(epoll_fd);
        Ok(())
    }

    /// Arms the tick timer when the muxer needs it. Disarming waits for a tick that finds
    /// nothing to do (`needed` false there): a host client connected within one tick
    /// then costs no timer syscalls, where arming and disarming cost two.
    fn update_tick(&self, needed: bool) {
        let Some(timer) = self.tick_timer.get() else {
            return;
        };
        let mut timer = timer.lock().unwrap_or_else(|e| e.into_inner());
        let (fd, armed) = &mut *timer;
        if needed == *armed {
            return;
        }
        let result = if needed {
            fd.reset(TICK, Some(TICK))
        } else {
            fd.clear()
        };
        match result {
            Ok(()) => *armed = needed,
            Err(e) => log::warn!("tick timer: {e}"),
        }
    }

    fn muxer(&self) -> Option<MutexGuard<'_, Muxer>> {
        self.muxer
            .get()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn timer(&self) -> Option<MutexGuard<'_, TimerFd>> {
        self.reset_timer
            .get()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn memory(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap> {
        self.mem.get()
    }

    /// Packets from the guest.
    fn process_tx(&self, vring: &VringRwLock<Mem>, muxer: &mut Muxer) {
        let mem = self.memory();
        let mut state = vring.get_mut();
        let chains: Vec<_> = match state.get_queue_mut().iter(&*mem) {
            Ok(iter) => iter.collect(),
            Err(e) => {
                log::error!("TX queue: {e}");
                return;
            }
        };
        for chain in chains {
            let head = chain.head_index();
            match read_packet(&mem, chain) {
                Ok((packet, mut payload)) => muxer.guest_packet(packet, &mut payload),
                Err((packet, e)) => {
                    log::warn!("TX: malformed packet: {e}");
                    if let Some(packet) = packet {
                        muxer.malformed(&packet);
                    }
                }
            }
            if let Err(e) = state.add_used(head, 0) {
                log::error!("TX queue: {e}");
            }
        }
        if let Err(e) = state.signal_used_queue() {
            log::warn!("TX queue: signalling: {e}");
        }
    }

    /// Packets for the guest, as long as it has RX buffers.
    fn process_rx(&self, vring: &VringRwLock<Mem>, muxer: &mut Muxer) {
        if !muxer.has_rx() {
            return;
        }
        let mem = self.memory();
        let mut state = vring.get_mut();
        let mut used_any = false;
        while let Some(chain) = state
            .get_queue_mut()
            .iter(&*mem)
            .ok()
            .and_then(|mut iter| iter.next())
        {
            let head = chain.head_index();
            let mut writer = match chain.writer(&mem) {
                Ok(w) => w,
                Err(e) => {
                    log::warn!("RX: unusable buffer: {e}");
                    let _ = state.add_used(head, 0);
                    used_any = true;
                    continue;
                }
            };
            let written = match muxer.next_rx(writer.available_bytes()) {
                None => {
                    state.get_queue_mut().go_to_previous_position();
                    break;
                }
                Some(Rx::TooSmall) => 0,
                Some(Rx::Packet(packet, data)) => {
                    let header = Header::from(packet);
                    match writer
                        .write_obj(header)
                        .and_then(|()| writer.write_all(&data))
                    {
                        Ok(()) => writer.bytes_written() as u32,
                        Err(e) => {
                            log::warn!("RX: writing a packet: {e}");
                            0
                        }
                    }
                }
            };
            if let Err(e) = state.add_used(head, written) {
                log::error!("RX queue: {e}");
                break;
            }
            used_any = true;
        }
        if used_any {
            if let Err(e) = state.signal_used_queue() {
                log::warn!("RX queue: signalling: {e}");
            }
        }
    }

    /// Delivers a pending transport reset; keeps the retry timer armed until it is.
    fn deliver_reset(&self, vring: &VringRwLock<Mem>) {
        let mut pending = self.reset_pending.lock().unwrap_or_else(|e| e.into_inner());
        if !*pending {
            return;
        }
        let mem = self.memory();
        let mut state = vring.get_mut();
        let chain = state
            .get_queue_mut()
            .iter(&*mem)
            .ok()
            .and_then(|mut iter| iter.next());
        let Some(chain) = chain else {
            return; // not started yet, or no buffer: the timer tries again
        };
        let head = chain.head_index();
        let written = match chain.writer(&mem) {
            Ok(mut w) => match w.write_obj(vm_memory::Le32::from(EVENT_TRANSPORT_RESET)) {
                Ok(()) => 4,
                Err(_) => 0,
            },
            Err(_) => 0,
        };
        if state.add_used(head, written).is_ok()
            && state.signal_used_queue().is_ok()
            && written == 4
        {
            *pending = false;
            if let Some(mut timer) = self.timer() {
                let _ = timer.clear();
            }
            log::info!("sent VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
        }
    }

    fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.config.guest_cid,
            acked_features: self.acked_features.load(Ordering::Acquire),
        }
    }

    /// Takes over a saved device. The guest CID stays this daemon's `--guest-cid`: a
    /// fork gets a new one, and the transport reset queued here makes Linux read it
    /// again from the configuration space (virtio_vsock_update_guest_cid).
    fn adopt(&self, saved: &VsockState) -> Result<(), Error> {
        if saved.guest_cid != self.config.guest_cid {
            log::info!(
                "guest CID {} replaces the snapshot's {} after the transport reset",
                self.config.guest_cid,
                saved.guest_cid
            );
        }
        self.acked_features
            .store(saved.acked_features, Ordering::Release);
        *self.reset_pending.lock().unwrap_or_else(|e| e.into_inner()) = true;
        if let Some(mut timer) = self.timer() {
            let tick = Duration::from_millis(10);
            timer.reset(tick, Some(tick)).map_err(errno)?;
        }
        Ok(())
    }
}

/// A timer registered with the worker's epoll under `id`. Non-blocking: a timer cleared
/// after epoll reported it must not block the worker in `wait`.
fn timer_on(epoll_fd: i32, id: u16) -> Result<TimerFd, Error> {
    let timer = TimerFd::new().map_err(errno)?;
    microagent_daemon_kit::state::transfer::set_nonblocking(&timer).map_err(Error::Timer)?;
    let mut event = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: u64::from(id),
    };
    // SAFETY: epoll_ctl with a valid epoll fd, our timer's fd and a valid event.
    if unsafe { libc::epoll_ctl(epoll_fd, libc::EPOLL_CTL_ADD, timer.as_raw_fd(), &mut event) } < 0
    {
        return Err(Error::Timer(io::Error::last_os_error()));
    }
    Ok(timer)
}

fn errno(e: vmm_sys_util::errno::Error) -> Error {
    Error::Timer(io::Error::from_raw_os_error(e.errno()))
}

/// A TX chain's payload, left in guest memory: the muxer writes it to the host socket
/// from there, and copies only what the socket does not take at once.
pub struct GuestPayload<'m> {
    slices: Vec<VolatileSlice<'m>>,
    len: usize,
}

impl muxer::Payload for GuestPayload<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn write_to(&mut self, out: &mut UnixStream) -> io::Result<usize> {
        while self.slices.first().is_some_and(|s| s.is_empty()) {
            self.slices.remove(0);
        }
        let Some(first) = self.slices.first() else {
            return Ok(0);
        };
        let n = out.write_volatile(first).map_err(|e| match e {
            VolatileMemoryError::IOError(e) => e,
            e => io::Error::other(e),
        })?;
        self.consume(n);
        Ok(n)
    }

    fn append_to(&mut self, buf: &mut VecDeque<u8>) {
        // Only when the host socket is full: copied through a small bounce buffer.
        let mut chunk = [0u8; 4096];
        while let Some(slice) = self.slices.first() {
            let n = slice.copy_to(&mut chunk[..]);
            buf.extend(&chunk[..n]);
            self.consume(n);
        }
    }
}

impl GuestPayload<'_> {
    /// Drops the first `n` bytes (and any slice left empty).
    fn consume(&mut self, mut n: usize) {
        self.len -= n.min(self.len);
        while let Some(first) = self.slices.first_mut() {
            if n < first.len() {
                match first.offset(n) {
                    Ok(rest) => *first = rest,
                    Err(_) => {
                        self.slices.remove(0);
                    }
                }
                return;
            }
            n -= first.len();
            self.slices.remove(0);
        }
    }
}

/// Header and payload of one TX chain (the payload left in guest memory). On error, the
/// header when it could be read, so that its connection can be reset.
pub fn read_packet<'m>(
    mem: &'m GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> Result<(Packet, GuestPayload<'m>), (Option<Packet>, String)> {
    let mut slices = Vec::new();
    let mut total = 0usize;
    for desc in chain.readable() {
        total = total
            .checked_add(desc.len() as usize)
            .ok_or_else(|| (None, "descriptor lengths overflow".to_owned()))?;
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), desc.len() as usize) {
            slices.push(slice.map_err(|e| (None, e.to_string()))?);
        }
    }
    if total < HEADER_LEN {
        return Err((None, format!("{total} bytes is shorter than a header")));
    }
    let mut payload = GuestPayload { slices, len: total };
    let mut header = Header::default();
    let mut filled = 0;
    while filled < HEADER_LEN {
        let Some(slice) = payload.slices.first() else {
            break;
        };
        let n = slice.copy_to(&mut header.as_mut_slice()[filled..]);
        filled += n;
        payload.consume(n);
    }
    let packet = Packet::from(header);
    if packet.len > MAX_PAYLOAD || packet.len as usize > payload.len {
        let why = format!("payload length {} is invalid", packet.len);
        return Err((Some(packet), why));
    }
    // Bytes past the header's length are not part of the packet.
    let mut keep = packet.len as usize;
    payload.slices.retain_mut(|slice| {
        if keep == 0 {
            return false;
        }
        if slice.len() > keep {
            if let Ok(head) = slice.subslice(0, keep) {
                *slice = head;
            }
        }
        keep -= slice.len().min(keep);
        true
    });
    payload.len = packet.len as usize;
    Ok((packet, payload))
}

impl VhostUserBackend for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
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

    fn set_event_idx(&self, _enabled: bool) {}

    /// `struct virtio_vsock_config`: the guest CID, padded to the requested size.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config.guest_cid.to_le_bytes();
        microagent_daemon_kit::config_space::slice(&config, offset, size)
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        self.mem.update(mem);
        Ok(())
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        microagent_daemon_kit::worker::exit_event(thread_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        microagent_daemon_kit::confine::worker_thread();
        self.busy_poll
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .woke();
        // An error returned here would end the worker thread: report and carry on.
        let Some(mut muxer) = self.muxer() else {
            log::error!("{}", Error::NotStarted);
            return Ok(());
        };
        let [rx, tx, event] = vrings else {
            log::error!("expected 3 vrings, got {}", vrings.len());
            return Ok(());
        };
        match usize::from(device_event) {
            RX_QUEUE => {}
            TX_QUEUE => self.process_tx(tx, &mut muxer),
            EVENT_QUEUE => {}
            _ if device_event == RESET_TIMER_ID => {
                if let Some(mut timer) = self.timer() {
                    let _ = timer.wait();
                }
            }
            _ if device_event == TICK_TIMER_ID => {
                if let Some(timer) = self.tick_timer.get() {
                    let _ = timer.lock().unwrap_or_else(|e| e.into_inner()).0.wait();
                }
                muxer.tick(Instant::now());
                self.update_tick(muxer.needs_tick());
            }
            _ => muxer.fd_event(device_event, evset.bits()),
        }
        self.deliver_reset(event);
        self.process_rx(rx, &mut muxer);
        if muxer.needs_tick() {
            self.update_tick(true);
        }
        drop(muxer);
        if let Some(&epoll_fd) = self.epoll_fd.get() {
            let mut busy = self.busy_poll.lock().unwrap_or_else(|e| e.into_inner());
            busy.spin(epoll_fd);
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
        self.transfer.check(|saved: VsockState| self.adopt(&saved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The worker reads the reset timer after epoll reported it; if another event of the
    /// same batch delivered the reset and cleared the timer, the read must not block
    /// (it did: the worker then never handled a kick again).
    #[test]
    fn reading_a_cleared_reset_timer_does_not_block_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(VsockBackend::new(VsockConfig {
            socket_path: dir.path().join("vsock.sock"),
            guest_cid: 3,
            uds_path: dir.path().join("vm.vsock"),
            seccomp: microagent_confine::Seccomp::On,
            landlock: Vec::new(),
            busy_poll: Duration::ZERO,
        }));
        // SAFETY: epoll_create1 with valid flags; the result is checked.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0);
        backend.start(epoll).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let reader = backend.clone();
        std::thread::spawn(move || {
            if let Some(mut timer) = reader.timer() {
                let _ = timer.wait();
            }
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(2)).is_ok(),
            "reading the disarmed reset timer blocked"
        );
        // SAFETY: closing the epoll descriptor created above.
        unsafe { libc::close(epoll) };
    }
}
