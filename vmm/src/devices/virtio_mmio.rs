//! virtio-mmio transports (virtio 1.x) whose device side is a vhost-user daemon.
//!
//! The transport owns the register file the guest sees. Features and config space come
//! from the daemon; queue kicks are ioeventfds on QueueNotify handed to the daemon; the
//! daemon's call eventfds are relayed by the VMM's event loop, which sets
//! InterruptStatus and raises the device's interrupt line (virtio-mmio drivers read
//! InterruptStatus before they look at the rings). DRIVER_OK starts the daemon's rings,
//! a reset (status 0) stops them.

use super::vhost_user::{self, load_device_state, save_device_state};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_4551; // what QEMU reports; drivers do not care

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// Largest config space vhost-user carries (VHOST_USER_MAX_CONFIG_SIZE).
const MAX_CONFIG_SIZE: usize = 256;
/// How long to keep trying to connect to a daemon's socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to vhost-user socket {path}: {source}")]
    Connect { path: PathBuf, source: vhost::Error },
    #[error("vhost-user {request} to {path}: {source}")]
    Request {
        request: &'static str,
        path: PathBuf,
        source: vhost::Error,
    },
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    #[error("registering KVM ioeventfd/irqfd: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("{path} offers no virtio 1.x (VIRTIO_F_VERSION_1)")]
    NotModern { path: PathBuf },
    #[error("the daemon on {path} cannot save or load device state (no VHOST_USER_PROTOCOL_F_DEVICE_STATE)")]
    NoDeviceState { path: PathBuf },
    #[error("the daemon on {path} has failed")]
    Failed { path: PathBuf },
    #[error("device state of the daemon on {path}: {source}")]
    DeviceState {
        path: PathBuf,
        source: super::vhost_user::Error,
    },
    #[error("the daemon on {path} differs from the snapshot's: {message}")]
    Mismatch { path: PathBuf, message: String },
}

/// Which virtio device a daemon implements (vhost-user does not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Net,
    Block,
    Vsock,
}

impl DeviceKind {
    fn device_id(self) -> u32 {
        match self {
            Self::Net => 1,
            Self::Block => 2,
            Self::Vsock => 19,
        }
    }

    /// Queues when the daemon cannot be asked (no MQ protocol feature).
    fn default_queues(self) -> usize {
        match self {
            Self::Net => 2,
            Self::Block => 1,
            Self::Vsock => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Net => "net",
            Self::Block => "block",
            Self::Vsock => "vsock",
        }
    }
}

/// One queue's registers as the driver set them, and where the daemon's ring stood.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The next available-ring index the daemon will read: 0 until a snapshot stops
    /// the ring and GET_VRING_BASE reports it.
    pub next_avail: u16,
}

/// What the guest sees of a transport: plain data, saved in snapshots and restored
/// into a transport connected to a new daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub kind: DeviceKind,
    /// Features offered to the guest (the daemon's, without vhost-user's own bit).
    pub device_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueState>,
    pub status: u32,
    pub interrupt_status: u32,
}

/// Everything the event loop needs to relay one transport's interrupts.
pub struct InterruptRelay {
    pub calls: Vec<RawFd>,
    status: Arc<AtomicU32>,
    irq: EventFd,
}

impl InterruptRelay {
    /// A used-buffer notification from the daemon: consume it, flag it, raise the line.
    pub fn used_buffer(&self, call: RawFd) {
        let mut counter = [0u8; 8];
        // SAFETY: reading 8 bytes from an eventfd into a local buffer of 8 bytes.
        unsafe { libc::read(call, counter.as_mut_ptr().cast(), counter.len()) };
        self.raise(INT_VRING);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(e) = self.irq.write(1) {
            log::error!("raising a virtio interrupt: {e}");
        }
    }
}

pub struct MmioTransport {
    path: PathBuf,
    vu: Frontend,
    mem: GuestMemoryMmap,
    /// The guest-visible registers (interrupt status lives in `interrupt_status`, shared
    /// with the interrupt relay).
    regs: TransportState,
    /// Whether the daemon speaks vhost-user protocol features.
    protocol: bool,
    /// Whether it agreed to VHOST_USER_PROTOCOL_F_DEVICE_STATE.
    device_state: bool,
    max_queue_size: u16,
    interrupt_status: Arc<AtomicU32>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    irq: EventFd,
    started: bool,
    /// [`Self::save`] stopped the rings of a started device; [`Self::resume_rings`]
    /// starts them again.
    stopped_by_save: bool,
    failed: bool,
}

impl MmioTransport {
    /// Connects to a daemon and negotiates what does not depend on the guest.
    pub fn connect(
        kind: DeviceKind,
        path: &Path,
        mem: &GuestMemoryMmap,
        max_queue_size: u16,
    ) -> Result<Self, Error> {
        let mut vu =
            vhost_user::connect(path, 16, CONNECT_TIMEOUT).map_err(|source| Error::Connect {
                path: path.to_owned(),
                source,
            })?;
        let req = |request: &'static str| {
            let path = path.to_owned();
            move |source| Error::Request {
                request,
                path,
                source,
            }
        };
        vu.set_owner().map_err(req("SET_OWNER"))?;
        let features = vu.get_features().map_err(req("GET_FEATURES"))?;
        if features & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::NotModern {
                path: path.to_owned(),
            });
        }
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let protocol = features & protocol_bit != 0;
        let mut num_queues = kind.default_queues();
        let mut device_state = false;
        if protocol {
            let offered = vu
                .get_protocol_features()
                .map_err(req("GET_PROTOCOL_FEATURES"))?;
            let wanted = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::DEVICE_STATE;
            let acked = offered & wanted;
            vu.set_protocol_features(acked)
                .map_err(req("SET_PROTOCOL_FEATURES"))?;
            device_state = acked.contains(VhostUserProtocolFeatures::DEVICE_STATE);
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                num_queues = vu.get_queue_num().map_err(req("GET_QUEUE_NUM"))? as usize;
            }
        }
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(req("memory regions"))?;
        vu.set_mem_table(&regions).map_err(req("SET_MEM_TABLE"))?;

        let eventfds = |n| {
            (0..n)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect::<io::Result<Vec<_>>>()
                .map_err(Error::EventFd)
        };
        Ok(Self {
            path: path.to_owned(),
            vu,
            mem: mem.clone(),
            regs: TransportState {
                kind,
                device_features: features & !protocol_bit,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                queues: vec![QueueState::default(); num_queues],
                status: 0,
                interrupt_status: 0,
            },
            protocol,
            device_state,
            max_queue_size,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            kicks: eventfds(num_queues)?,
            calls: eventfds(num_queues)?,
            irq: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
            started: false,
            stopped_by_save: false,
            failed: false,
        })
    }

    pub fn kind(&self) -> DeviceKind {
        self.regs.kind
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn failed(&self) -> bool {
        self.failed
    }

    /// The daemon's socket, watched for hang-up.
    pub fn socket_fd(&self) -> RawFd {
        self.vu.as_raw_fd()
    }

    /// Wires the transport into KVM: QueueNotify writes become kick eventfds, the
    /// interrupt eventfd drives `gsi`.
    pub fn register(&self, vm: &VmFd, base: u64, gsi: u32) -> Result<InterruptRelay, Error> {
        for (index, kick) in self.kicks.iter().enumerate() {
            vm.register_ioevent(kick, &IoEventAddress::Mmio(base + 0x50), index as u32)
                .map_err(Error::Kvm)?;
        }
        vm.register_irqfd(&self.irq, gsi).map_err(Error::Kvm)?;
        Ok(InterruptRelay {
            calls: self.calls.iter().map(AsRawFd::as_raw_fd).collect(),
            status: self.interrupt_status.clone(),
            irq: self.irq.try_clone().map_err(Error::EventFd)?,
        })
    }

    /// The daemon went away: the guest sees a device that needs a reset.
    pub fn mark_failed(&mut self, relay: &InterruptRelay) {
        self.failed = true;
        self.started = false;
        self.regs.status |= STATUS_DEVICE_NEEDS_RESET;
        relay.raise(INT_CONFIG);
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.read_config(offset - 0x100, data);
            return;
        }
        let queue = self.regs.queues.get(self.regs.queue_sel as usize).copied();
        let value = match offset {
            0x000 => MAGIC_VALUE,
            0x004 => MMIO_VERSION,
            0x008 => self.regs.kind.device_id(),
            0x00c => VENDOR_ID,
            0x010 => match self.regs.device_features_sel {
                0 => self.regs.device_features as u32,
                1 => (self.regs.device_features >> 32) as u32,
                _ => 0,
            },
            0x034 => queue.map_or(0, |_| u32::from(self.max_queue_size)),
            0x044 => queue.map_or(0, |q| u32::from(q.ready)),
            0x060 => self.interrupt_status.load(Ordering::Acquire),
            0x070 => self.regs.status,
            0x0fc => 0, // config generation: the config never changes under the driver
            _ => {
                log::debug!(
                    "{}: read of unknown register {offset:#x}",
                    self.regs.kind.name()
                );
                0
            }
        };
        write_le(data, value);
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            log::debug!("{}: config space write ignored", self.regs.kind.name());
            return;
        }
        let value = read_le(data);
        let sel = self.regs.queue_sel as usize;
        match offset {
            0x014 => self.regs.device_features_sel = value,
            0x020 => match self.regs.driver_features_sel {
                0 => {
                    self.regs.driver_features =
                        (self.regs.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.regs.driver_features =
                        (self.regs.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x024 => self.regs.driver_features_sel = value,
            0x030 => self.regs.queue_sel = value,
            0x038 => self.with_queue(sel, |q| q.size = value as u16),
            0x044 => self.with_queue(sel, |q| q.ready = value == 1),
            0x064 => {
                self.interrupt_status.fetch_and(!value, Ordering::AcqRel);
            }
            0x070 => self.set_status(value),
            0x080 => self.with_queue(sel, |q| set_low(&mut q.desc, value)),
            0x084 => self.with_queue(sel, |q| set_high(&mut q.desc, value)),
            0x090 => self.with_queue(sel, |q| set_low(&mut q.avail, value)),
            0x094 => self.with_queue(sel, |q| set_high(&mut q.avail, value)),
            0x0a0 => self.with_queue(sel, |q| set_low(&mut q.used, value)),
            0x0a4 => self.with_queue(sel, |q| set_high(&mut q.used, value)),
            _ => log::debug!(
                "{}: write of unknown register {offset:#x}",
                self.regs.kind.name()
            ),
        }
    }

    /// Queue registers change only while the driver has not started the device.
    fn with_queue(&mut self, index: usize, f: impl FnOnce(&mut QueueState)) {
        if self.regs.status & STATUS_DRIVER_OK != 0 {
            log::warn!(
                "{}: queue register written after DRIVER_OK",
                self.regs.kind.name()
            );
            return;
        }
        if let Some(queue) = self.regs.queues.get_mut(index) {
            f(queue);
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if self.failed {
            return;
        }
        if value & STATUS_FEATURES_OK != 0
            && self.regs.driver_features & !self.regs.device_features != 0
        {
            // The driver asked for something we do not offer: refuse FEATURES_OK.
            self.regs.status = value & !STATUS_FEATURES_OK;
            return;
        }
        let starting = value & STATUS_DRIVER_OK != 0 && self.regs.status & STATUS_DRIVER_OK == 0;
        self.regs.status = value;
        if starting {
            if let Err(e) = self.activate() {
                log::error!(
                    "{}: starting device on {}: {e}",
                    self.regs.kind.name(),
                    self.path.display()
                );
                self.failed = true;
                self.regs.status |= STATUS_DEVICE_NEEDS_RESET;
            }
        }
    }

    /// DRIVER_OK: hand the negotiated features and every ready queue to the daemon.
    fn activate(&mut self) -> Result<(), Error> {
        self.set_features()?;
        self.start_rings()?;
        log::info!(
            "{}: started on {}",
            self.regs.kind.name(),
            self.path.display()
        );
        Ok(())
    }

    fn request_error(&self, request: &'static str) -> impl FnOnce(vhost::Error) -> Error {
        let path = self.path.clone();
        move |source| Error::Request {
            request,
            path,
            source,
        }
    }

    fn set_features(&mut self) -> Result<(), Error> {
        let mut features = self.regs.driver_features;
        if self.protocol {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.vu
            .set_features(features)
            .map_err(self.request_error("SET_FEATURES"))
    }

    /// Starts every ready queue at its `next_avail` index.
    fn start_rings(&mut self) -> Result<(), Error> {
        for (index, q) in self.regs.queues.clone().into_iter().enumerate() {
            if !q.ready {
                continue;
            }
            let host = |gpa: u64| {
                self.mem
                    .get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| Error::Request {
                        request: "SET_VRING_ADDR",
                        path: self.path.clone(),
                        source: vhost::Error::InvalidGuestMemory,
                    })
            };
            let config = VringConfigData {
                queue_max_size: self.max_queue_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host(q.desc)?,
                used_ring_addr: host(q.used)?,
                avail_ring_addr: host(q.avail)?,
                log_addr: None,
            };
            self.vu
                .set_vring_num(index, q.size)
                .map_err(self.request_error("SET_VRING_NUM"))?;
            self.vu
                .set_vring_addr(index, &config)
                .map_err(self.request_error("SET_VRING_ADDR"))?;
            self.vu
                .set_vring_base(index, q.next_avail)
                .map_err(self.request_error("SET_VRING_BASE"))?;
            self.vu
                .set_vring_call(index, &self.calls[index])
                .map_err(self.request_error("SET_VRING_CALL"))?;
            self.vu
                .set_vring_kick(index, &self.kicks[index])
                .map_err(self.request_error("SET_VRING_KICK"))?;
            if self.protocol {
                self.vu
                    .set_vring_enable(index, true)
                    .map_err(self.request_error("SET_VRING_ENABLE"))?;
            }
        }
        self.started = true;
        Ok(())
    }

    /// Stops the daemon's rings (GET_VRING_BASE records where each stood) and asks it
    /// for its device state. The vCPUs must be paused. The rings stay stopped until
    /// [`Self::resume_rings`], which the caller runs once guest memory is saved too: a
    /// daemon running meanwhile (host traffic for the guest, requests already queued)
    /// would write used entries past the recorded bases into the memory being saved,
    /// and the restored device would hand the guest those buffers a second time.
    pub fn save(&mut self) -> Result<(TransportState, Vec<u8>), Error> {
        if self.failed {
            return Err(Error::Failed {
                path: self.path.clone(),
            });
        }
        if !self.device_state {
            return Err(Error::NoDeviceState {
                path: self.path.clone(),
            });
        }
        let started = self.started;
        if started {
            for index in 0..self.regs.queues.len() {
                if !self.regs.queues[index].ready {
                    continue;
                }
                match self.vu.get_vring_base(index) {
                    Ok(base) => self.regs.queues[index].next_avail = base as u16,
                    Err(source) => {
                        // Some rings may be stopped already: the device cannot go on
                        // as if nothing happened; the guest sees it needs a reset.
                        self.failed = true;
                        self.started = false;
                        self.regs.status |= STATUS_DEVICE_NEEDS_RESET;
                        return Err(Error::Request {
                            request: "GET_VRING_BASE",
                            path: self.path.clone(),
                            source,
                        });
                    }
                }
            }
            self.started = false;
            self.stopped_by_save = true;
        }
        let saved = save_device_state(&mut self.vu).map_err(|source| Error::DeviceState {
            path: self.path.clone(),
            source,
        })?;
        let mut regs = self.regs.clone();
        regs.interrupt_status = self.interrupt_status.load(Ordering::Acquire);
        Ok((regs, saved))
    }

    /// Starts the rings [`Self::save`] stopped, where they stopped (nothing otherwise).
    pub fn resume_rings(&mut self) -> Result<(), Error> {
        if !std::mem::take(&mut self.stopped_by_save) {
            return Ok(());
        }
        self.start_rings()
    }

    /// Connects to a fresh daemon and gives it the saved transport and device state;
    /// a started device's rings restart where they stopped.
    pub fn restore(
        path: &Path,
        mem: &GuestMemoryMmap,
        max_queue_size: u16,
        state: &TransportState,
        device_state: &[u8],
    ) -> Result<Self, Error> {
        let mut transport = Self::connect(state.kind, path, mem, max_queue_size)?;
        if transport.regs.device_features != state.device_features
            || transport.regs.queues.len() != state.queues.len()
        {
            return Err(Error::Mismatch {
                path: path.to_owned(),
                message: format!(
                    "features {:#x} and {} queues, the snapshot has {:#x} and {}",
                    transport.regs.device_features,
                    transport.regs.queues.len(),
                    state.device_features,
                    state.queues.len()
                ),
            });
        }
        if !transport.device_state {
            return Err(Error::NoDeviceState {
                path: path.to_owned(),
            });
        }
        transport.regs = state.clone();
        transport
            .interrupt_status
            .store(state.interrupt_status, Ordering::Release);
        if state.status & STATUS_DRIVER_OK != 0 {
            transport.set_features()?;
            load_device_state(&mut transport.vu, device_state).map_err(|source| {
                Error::DeviceState {
                    path: path.to_owned(),
                    source,
                }
            })?;
            transport.start_rings()?;
        }
        Ok(transport)
    }

    /// Device reset: stop the daemon's rings and forget the driver's settings.
    fn reset(&mut self) {
        if self.started {
            for (index, q) in self.regs.queues.iter().enumerate() {
                if q.ready {
                    if let Err(e) = self.vu.get_vring_base(index) {
                        log::warn!("{}: stopping queue {index}: {e}", self.regs.kind.name());
                    }
                }
            }
            self.started = false;
        }
        self.regs.status = 0;
        self.regs.driver_features = 0;
        self.regs.device_features_sel = 0;
        self.regs.driver_features_sel = 0;
        self.regs.queue_sel = 0;
        self.regs.queues.fill(QueueState::default());
        self.interrupt_status.store(0, Ordering::Release);
    }

    /// Reads config space from offset 0 and slices: some backends (libvhost-user, as in
    /// qemu-storage-daemon) ignore the offset of GET_CONFIG, as QEMU always asks for
    /// the whole space.
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let end = offset as usize + data.len();
        if self.failed || !self.protocol || end > MAX_CONFIG_SIZE {
            return;
        }
        match self
            .vu
            .get_config(0, end as u32, VhostUserConfigFlags::WRITABLE, &vec![0; end])
        {
            Ok((_, payload)) if payload.len() == end => {
                data.copy_from_slice(&payload[offset as usize..])
            }
            Ok(_) => log::warn!("{}: short config read", self.regs.kind.name()),
            Err(e) => log::warn!("{}: GET_CONFIG: {e}", self.regs.kind.name()),
        }
    }
}

fn set_low(reg: &mut u64, value: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
}

fn set_high(reg: &mut u64, value: u32) {
    *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
}

fn read_le(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

fn write_le(data: &mut [u8], value: u32) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(i).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_state_round_trips_through_json() {
        let state = TransportState {
            kind: DeviceKind::Vsock,
            device_features: 1 << 32 | 1 << 29,
            device_features_sel: 1,
            driver_features_sel: 0,
            driver_features: 1 << 32,
            queue_sel: 2,
            queues: vec![
                QueueState {
                    size: 8,
                    ready: true,
                    desc: 0x20_1000,
                    avail: 0x20_1080,
                    used: 0x20_10a0,
                    next_avail: 9,
                },
                QueueState::default(),
            ],
            status: 0xf,
            interrupt_status: INT_VRING,
        };
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.contains(r#""kind":"vsock""#), "{json}");
        assert_eq!(
            serde_json::from_str::<TransportState>(&json).unwrap(),
            state
        );
    }
}
