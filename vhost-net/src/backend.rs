//! The vhost-user backend: an RX and a TX queue served by one worker thread, the user
//! network's host sockets on the same epoll instance, a timer for the stack, and device
//! state for snapshots.

use crate::config::NetConfig;
use crate::frame::{MAX_FRAME, MTU};
use crate::network::{self, Attachment, Network};
use crate::stack::Poller;
use crate::state::NetState;
use crate::virtio;
use microagent_daemon_kit::memory::Memory;
use microagent_daemon_kit::Mem;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::timerfd::TimerFd;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const NUM_QUEUES: usize = 2;
pub const QUEUE_SIZE: usize = 1024;
/// epoll id of the stack's timer.
const TIMER_ID: u16 = 8;
/// epoll id of every host socket.
const HOST_ID: u16 = 9;
/// TX chains read per event before the worker serves RX again.
const TX_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Network(#[from] network::Error),
    #[error("the daemon was not wired to its worker's epoll")]
    NotStarted,
    #[error("timer: {0}")]
    Timer(io::Error),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::other(e)
    }
}

pub struct NetBackend {
    config: NetConfig,
    mem: Memory,
    mac: Mutex<[u8; 6]>,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    net: OnceLock<Mutex<Network>>,
    timer: OnceLock<Mutex<TimerFd>>,
    transfer: microagent_daemon_kit::state::transfer::Slot,
    /// Opened before the daemon confines itself; the network takes it in `start`.
    attachment: Mutex<Option<Attachment>>,
}

impl NetBackend {
    pub fn new(config: NetConfig, attachment: Attachment) -> Self {
        Self {
            attachment: Mutex::new(Some(attachment)),
            mac: Mutex::new(config.mac.0),
            config,
            mem: Memory::default(),
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            net: OnceLock::new(),
            timer: OnceLock::new(),
            transfer: Default::default(),
        }
    }

    /// Registers the network's host fds (published ports, or the tap) and the stack's
    /// timer with the worker's epoll instance. Called once, before the frontend connects.
    pub fn start(&self, epoll_fd: i32) -> Result<(), Error> {
        let attachment = self
            .attachment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(Error::NotStarted)?;
        let net = Network::new(
            &self.config,
            attachment,
            Poller {
                epoll: epoll_fd,
                id: HOST_ID,
            },
        )?;
        let timer = TimerFd::new().map_err(errno)?;
        microagent_daemon_kit::state::transfer::set_nonblocking(&timer).map_err(Error::Timer)?;
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: u64::from(TIMER_ID),
        };
        // SAFETY: epoll_ctl with a valid epoll fd, our timer's fd and a valid event.
        if unsafe { libc::epoll_ctl(epoll_fd, libc::EPOLL_CTL_ADD, timer.as_raw_fd(), &mut event) }
            < 0
        {
            return Err(Error::Timer(io::Error::last_os_error()));
        }
        let _ = self.net.set(Mutex::new(net));
        let _ = self.timer.set(Mutex::new(timer));
        Ok(())
    }

    fn net(&self) -> Option<MutexGuard<'_, Network>> {
        self.net
            .get()
            .map(|n| n.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn header_len(&self) -> usize {
        virtio::header_len(self.acked_features.load(Ordering::Acquire))
    }

    fn mergeable(&self) -> bool {
        self.acked_features.load(Ordering::Acquire) & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// Frames from the guest, at most [`TX_BATCH`]; `true` when more may wait.
    fn process_tx(&self, vring: &VringRwLock<Mem>, net: &mut Network) -> bool {
        let mem = self.mem.get();
        let header_len = self.header_len();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mut state = vring.get_mut();
        let mut used = 0;
        let mut frame = Vec::with_capacity(MAX_FRAME);
        'rounds: loop {
            if event_idx {
                let _ = state.disable_notification();
            }
            while used < TX_BATCH {
                let chain = match state.get_queue_mut().iter(&*mem) {
                    Ok(mut iter) => iter.next(),
                    // Not started (or broken): nothing to read.
                    Err(_) => break 'rounds,
                };
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                match read_frame(&mem, chain, header_len, &mut frame) {
                    Ok(()) => net.guest_frame(&frame),
                    Err(why) => log::debug!("TX: dropped a frame: {why}"),
                }
                if let Err(e) = state.add_used(head, 0) {
                    log::error!("TX queue: {e}");
                    break;
                }
                used += 1;
            }
            // With EVENT_IDX the driver kicks only past the index published here, so it
            // is published whenever the device stops reading; chains that arrived
            // meanwhile are read now.
            let more = !event_idx || state.enable_notification().unwrap_or(false);
            if used >= TX_BATCH || !event_idx || !more {
                break;
            }
        }
        if used > 0 && state.needs_notification().unwrap_or(true) {
            if let Err(e) = state.signal_used_queue() {
                log::warn!("TX queue: signalling: {e}");
            }
        }
        used >= TX_BATCH
    }

    /// Frames for the guest, as long as it has RX buffers; `true` if any was delivered.
    fn process_rx(&self, vring: &VringRwLock<Mem>, net: &mut Network) -> bool {
        if net.to_guest().is_empty() {
            return false;
        }
        let mem = self.mem.get();
        let header_len = self.header_len();
        let mergeable = self.mergeable();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mut state = vring.get_mut();
        let mut used_any = false;
        'frames: while let Some(frame) = net.to_guest().front() {
            let need = header_len + frame.len();
            // Buffers until the frame fits: one without mergeable buffers.
            let mut writers = Vec::new();
            let mut room = 0;
            while room < need && (mergeable || writers.is_empty()) {
                let chain = match state.get_queue_mut().iter(&*mem) {
                    Ok(mut iter) => iter.next(),
                    Err(e) => {
                        // Not started yet (or broken): frames wait.
                        log::debug!("RX queue: {e}");
                        for _ in &writers {
                            state.get_queue_mut().go_to_previous_position();
                        }
                        break 'frames;
                    }
                };
                let Some(chain) = chain else {
                    // Out of buffers: with EVENT_IDX, ask for a kick when the driver
                    // adds some (and use any that arrived meanwhile).
                    if event_idx && state.enable_notification().unwrap_or(false) {
                        continue;
                    }
                    break;
                };
                let head = chain.head_index();
                match chain.writer(&mem) {
                    Ok(writer) => {
                        room += writer.available_bytes();
                        writers.push((head, writer));
                    }
                    Err(e) => {
                        log::warn!("RX: unusable buffer: {e}");
                        let _ = state.add_used(head, 0);
                        used_any = true;
                    }
                }
            }
            if room < need {
                if !mergeable && !writers.is_empty() {
                    // A buffer too small for the frame: drop it, as a NIC would.
                    log::debug!("RX: a {need}-byte frame does not fit the guest's buffer");
                    for (head, _) in &writers {
                        let _ = state.add_used(*head, 0);
                    }
                    used_any = true;
                    net.to_guest().pop_front();
                    continue;
                }
                // Not enough buffers yet: give them back and wait for the next kick.
                for _ in &writers {
                    state.get_queue_mut().go_to_previous_position();
                }
                break;
            }
            let header = virtio::rx_header(u16::try_from(writers.len()).unwrap_or(u16::MAX));
            let mut bytes = header[..header_len].iter().chain(frame.iter()).copied();
            for (head, writer) in &mut writers {
                let take = writer.available_bytes();
                let chunk: Vec<u8> = bytes.by_ref().take(take).collect();
                let written = match writer.write_all(&chunk) {
                    Ok(()) => chunk.len() as u32,
                    Err(e) => {
                        log::warn!("RX: writing a frame: {e}");
                        0
                    }
                };
                if let Err(e) = state.add_used(*head, written) {
                    log::error!("RX queue: {e}");
                }
            }
            used_any = true;
            net.to_guest().pop_front();
        }
        if used_any && state.needs_notification().unwrap_or(true) {
            if let Err(e) = state.signal_used_queue() {
                log::warn!("RX queue: signalling: {e}");
            }
        }
        used_any
    }

    fn arm_timer(&self, delay: Option<Duration>) {
        let Some(timer) = self.timer.get() else {
            return;
        };
        let mut timer = timer.lock().unwrap_or_else(|e| e.into_inner());
        let result = match delay {
            // A zero delay would disarm the timer; the stack wants to run now.
            Some(d) => timer.reset(d.max(Duration::from_micros(100)), None),
            None => timer.clear(),
        };
        if let Err(e) = result {
            log::warn!("stack timer: {e}");
        }
    }

    fn state(&self) -> NetState {
        NetState {
            mac: *self.mac.lock().unwrap_or_else(|e| e.into_inner()),
            acked_features: self.acked_features.load(Ordering::Acquire),
        }
    }

    fn adopt(&self, saved: &NetState) -> Result<(), Error> {
        // The guest read its MAC at boot: config space keeps showing that one.
        if saved.mac != self.config.mac.0 {
            log::info!(
                "restored MAC {} replaces --mac {}",
                smoltcp::wire::EthernetAddress(saved.mac),
                self.config.mac
            );
        }
        *self.mac.lock().unwrap_or_else(|e| e.into_inner()) = saved.mac;
        self.acked_features
            .store(saved.acked_features, Ordering::Release);
        Ok(())
    }
}

fn errno(e: vmm_sys_util::errno::Error) -> Error {
    Error::Timer(io::Error::from_raw_os_error(e.errno()))
}

/// The frame of one TX chain, without its virtio-net header.
fn read_frame(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    header_len: usize,
    frame: &mut Vec<u8>,
) -> Result<(), String> {
    let mut reader = chain.reader(mem).map_err(|e| e.to_string())?;
    let total = reader.available_bytes();
    let Some(len) = total.checked_sub(header_len) else {
        return Err(format!(
            "{total} bytes is shorter than the virtio-net header"
        ));
    };
    if len > MAX_FRAME {
        return Err(format!("{len}-byte frame is longer than {MAX_FRAME}"));
    }
    let mut header = [0u8; virtio::HEADER_LEN];
    reader
        .read_exact(&mut header[..header_len])
        .map_err(|e| e.to_string())?;
    frame.resize(len, 0);
    reader.read_exact(frame).map_err(|e| e.to_string())
}

impl VhostUserBackend for NetBackend {
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
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MTU
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        log::debug!("acked features {features:#x}");
        self.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::DEVICE_STATE
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mac = *self.mac.lock().unwrap_or_else(|e| e.into_inner());
        let space = virtio::config_space(mac, MTU as u16);
        microagent_daemon_kit::config_space::slice(&space, offset, size)
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
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        microagent_daemon_kit::confine::worker_thread();
        // An error returned here would end the worker thread: report and carry on.
        let Some(mut net) = self.net() else {
            log::error!("{}", Error::NotStarted);
            return Ok(());
        };
        let [rx, tx] = vrings else {
            log::error!("expected 2 vrings, got {}", vrings.len());
            return Ok(());
        };
        if device_event == TIMER_ID {
            if let Some(timer) = self.timer.get() {
                let _ = timer.lock().unwrap_or_else(|e| e.into_inner()).wait();
            }
        }
        // Whatever woke the worker, both rings and every flow are served: the stack's
        // state changes with each of them.
        let mut delay = None;
        let mut more_tx = false;
        for _ in 0..8 {
            more_tx = self.process_tx(tx, &mut net);
            delay = net.poll();
            let delivered = self.process_rx(rx, &mut net);
            if !more_tx && !delivered {
                break;
            }
        }
        // TX chains left for later: come back at once (no kick will say so).
        self.arm_timer(if more_tx { Some(Duration::ZERO) } else { delay });
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
        self.transfer.check(|saved: NetState| self.adopt(&saved))
    }
}
