//! Building a VM from a [`VmmConfig`] and running its event loop until it ends.

use crate::api::{self, ApiError, DeviceStatus, Request, Status};
use crate::boot;
use crate::config::{Serial, VmmConfig};
use crate::control;
use crate::cpu;
use crate::devices::legacy::{PioBus, COM1_IRQ};
use crate::devices::virtio_mmio::{self, DeviceKind, InterruptRelay, MmioTransport};
use crate::devices::EventFdTrigger;
use crate::host;
use crate::layout::*;
use crate::memory;
use crate::mptable;
use crate::vcpu::{Bus, Control, Outcome, Vcpus};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::{I8042Device, Serial as Uart};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Descriptors a guest may put in one virtqueue.
const MAX_QUEUE_SIZE: u16 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("creating the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM VM set-up ({what}): {source}")]
    VmSetup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Cpu(#[from] cpu::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error("creating vCPU {id}: {source}")]
    CreateVcpu { id: u8, source: kvm_ioctls::Error },
    #[error(transparent)]
    Device(#[from] virtio_mmio::Error),
    #[error("serial console {path}: {source}")]
    Serial { path: PathBuf, source: io::Error },
    #[error("control socket {path}: {source}")]
    Api { path: PathBuf, source: io::Error },
    #[error("event loop: {0}")]
    EventLoop(io::Error),
    #[error(transparent)]
    Control(#[from] control::Error),
}

/// epoll tokens.
const TOKEN_EXIT: u64 = 0;
const TOKEN_RESET: u64 = 1;
const TOKEN_API: u64 = 2;
const TOKEN_CONN_BASE: u64 = 1 << 32;
const TOKEN_CALL_BASE: u64 = 2 << 32;
const TOKEN_HUP_BASE: u64 = 3 << 32;

struct Device {
    transport: Arc<Mutex<MmioTransport>>,
    relay: InterruptRelay,
}

/// Builds the VM, runs it, and returns why it ended.
pub fn run(config: &VmmConfig) -> Result<Outcome, Error> {
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    let vm = kvm.create_vm().map_err(Error::CreateVm)?;
    let setup = |what| move |source| Error::VmSetup { what, source };
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(setup("TSS address"))?;
    if let Err(e) = vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS) {
        log::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e} (not needed on this host)");
    }
    vm.create_irq_chip().map_err(setup("irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(setup("PIT"))?;

    let mem = memory::create(config.memory_mib)?;
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM
        // (both live until this function returns), and the slot numbers are distinct.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(setup("memory slot"))?;
    }

    let mut cmdline = config.cmdline.clone();
    let mut devices = Vec::new();
    let sockets = config
        .blk
        .iter()
        .map(|p| (DeviceKind::Block, p))
        .chain(config.net.iter().map(|p| (DeviceKind::Net, p)))
        .chain(config.vsock.iter().map(|p| (DeviceKind::Vsock, p)));
    for (index, (kind, path)) in sockets.enumerate() {
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + index as u32;
        let transport = MmioTransport::connect(kind, path, &mem, MAX_QUEUE_SIZE)?;
        let relay = transport.register(&vm, base, irq)?;
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
        devices.push((
            base,
            Device {
                transport: Arc::new(Mutex::new(transport)),
                relay,
            },
        ));
    }

    let kernel = boot::load_kernel(&mem, &config.kernel)?;
    let failure_hint = host::linux_guest_limitation().filter(|_| kernel.is_linux);
    if let Some(hint) = &failure_hint {
        log::warn!("{hint}");
    }
    let initrd = config
        .initrd
        .as_deref()
        .map(|path| boot::load_initrd(&mem, path, kernel.end))
        .transpose()?;
    boot::configure(&mem, &kernel, &boot::cmdline(&cmdline)?, initrd)?;
    boot::write_page_tables(&mem)?;
    mptable::write(&mem, config.cpus)?;
    log::info!("kernel command line: {cmdline}");

    let serial_out: Box<dyn Write + Send> = match &config.serial {
        Serial::Stdio => Box::new(io::stdout()),
        Serial::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::Serial {
                    path: path.clone(),
                    source,
                })?,
        ),
    };
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventLoop)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(setup("serial irqfd"))?;
    let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventLoop)?;
    let reset_trigger = reset_evt.try_clone().map_err(Error::EventLoop)?;
    let bus = Arc::new(Bus {
        pio: PioBus::new(
            Uart::new(EventFdTrigger(serial_irq), serial_out),
            I8042Device::new(EventFdTrigger(reset_trigger)),
        ),
        mmio: devices
            .iter()
            .map(|(base, d)| (*base, d.transport.clone()))
            .collect(),
    });

    let mut vcpu_fds = Vec::with_capacity(usize::from(config.cpus));
    for id in 0..config.cpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| Error::CreateVcpu { id, source })?;
        vcpu.set_cpuid2(&cpu::cpuid(&kvm, id, config.cpus)?)
            .map_err(cpu::Error::SetCpuid)?;
        cpu::setup_msrs(&vcpu)?;
        cpu::setup_fpu(&vcpu)?;
        cpu::setup_lapic(&vcpu)?;
        if id == 0 {
            cpu::setup_boot_vcpu(&vcpu, &mem, kernel.entry)?;
        }
        vcpu_fds.push(vcpu);
    }

    let epoll = Epoll::new().map_err(Error::EventLoop)?;
    let server = match &config.api_socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path).map_err(|source| Error::Api {
                path: path.clone(),
                source,
            })?;
            Some(control::Server::new(
                listener,
                &epoll,
                TOKEN_API,
                TOKEN_CONN_BASE,
            )?)
        }
        None => None,
    };

    let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventLoop)?;
    let control = Arc::new(Control::new(
        exit_evt.try_clone().map_err(Error::EventLoop)?,
        failure_hint,
    ));
    let vcpus = Vcpus::start(vcpu_fds, bus, control.clone()).map_err(Error::EventLoop)?;
    log::info!("{} vCPU(s) running", vcpus.count());

    let mut event_loop = EventLoop {
        epoll,
        control,
        vcpus: Some(vcpus),
        devices,
        server,
        memory_mib: config.memory_mib,
        reset_evt,
        exit_evt,
        shutdown: None,
        _vm: &vm,
        _mem: &mem,
    };
    let outcome = event_loop.run();
    if let Some(path) = &config.api_socket {
        let _ = std::fs::remove_file(path);
    }
    outcome
}

/// A requested shutdown: when the VMM stops the guest if it has not powered off.
#[derive(Debug, Clone, Copy)]
enum Shutdown {
    At(Instant),
    /// The timeout is beyond what `Instant` can hold: wait for the guest.
    WhenGuestStops,
}

impl Shutdown {
    fn after(timeout_ms: u64) -> Self {
        Instant::now()
            .checked_add(Duration::from_millis(timeout_ms))
            .map_or(Self::WhenGuestStops, Self::At)
    }

    fn deadline(self) -> Option<Instant> {
        match self {
            Self::At(at) => Some(at),
            Self::WhenGuestStops => None,
        }
    }
}

/// epoll_wait's timeout until `deadline` (rounded up), or -1 for none.
fn epoll_timeout(deadline: Option<Instant>) -> i32 {
    deadline.map_or(-1, |at| {
        let left = at.saturating_duration_since(Instant::now());
        // Round up so that the loop does not wake just before the deadline and spin.
        let ms = left.as_nanos().div_ceil(1_000_000);
        i32::try_from(ms).unwrap_or(i32::MAX)
    })
}

struct EventLoop<'a> {
    epoll: Epoll,
    control: Arc<Control>,
    vcpus: Option<Vcpus>,
    devices: Vec<(u64, Device)>,
    server: Option<control::Server>,
    memory_mib: u64,
    reset_evt: EventFd,
    exit_evt: EventFd,
    shutdown: Option<Shutdown>,
    // Kept alive for as long as vCPUs run.
    _vm: &'a VmFd,
    _mem: &'a GuestMemoryMmap,
}

impl EventLoop<'_> {
    fn add(&self, fd: i32, token: u64, events: EventSet) -> Result<(), Error> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            .map_err(Error::EventLoop)
    }

    fn run(&mut self) -> Result<Outcome, Error> {
        self.add(self.exit_evt.as_raw_fd(), TOKEN_EXIT, EventSet::IN)?;
        self.add(self.reset_evt.as_raw_fd(), TOKEN_RESET, EventSet::IN)?;
        for (index, (_, device)) in self.devices.iter().enumerate() {
            for (queue, &fd) in device.relay.calls.iter().enumerate() {
                let token = TOKEN_CALL_BASE | ((index as u64) << 16) | queue as u64;
                self.add(fd, token, EventSet::IN)?;
            }
            let fd = device
                .transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .socket_fd();
            self.add(fd, TOKEN_HUP_BASE | index as u64, EventSet::READ_HANG_UP)?;
        }

        let mut events = vec![EpollEvent::default(); 64];
        let outcome = loop {
            if let Some(outcome) = self.control.outcome() {
                break outcome;
            }
            let shutdown_at = self.shutdown.and_then(Shutdown::deadline);
            if shutdown_at.is_some_and(|at| Instant::now() >= at) {
                break Outcome::Shutdown;
            }
            if let Some(server) = &mut self.server {
                server.tick(&self.epoll);
            }
            let accept_at = self.server.as_ref().and_then(control::Server::wake_at);
            let wake_at = match (shutdown_at, accept_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let n = match self.epoll.wait(epoll_timeout(wake_at), &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::EventLoop(e)),
            };
            for event in &events[..n] {
                self.dispatch(event.data(), event.event_set());
            }
        };
        if let Some(vcpus) = self.vcpus.take() {
            vcpus.stop();
        }
        Ok(outcome)
    }

    fn dispatch(&mut self, token: u64, events: EventSet) {
        match token {
            TOKEN_EXIT => {
                let _ = self.exit_evt.read();
            }
            TOKEN_RESET => {
                let _ = self.reset_evt.read();
                self.control.finish(Outcome::GuestReset {
                    how: "i8042 reset".into(),
                });
            }
            TOKEN_API => {
                if let Some(server) = &mut self.server {
                    server.accept(&self.epoll);
                }
            }
            t if t & !0xffff_ffff == TOKEN_CALL_BASE => {
                let index = ((t >> 16) & 0xffff) as usize;
                let queue = (t & 0xffff) as usize;
                if let Some((_, device)) = self.devices.get(index) {
                    if let Some(&fd) = device.relay.calls.get(queue) {
                        device.relay.used_buffer(fd);
                    }
                }
            }
            t if t & !0xffff_ffff == TOKEN_HUP_BASE => self.daemon_gone((t & 0xffff_ffff) as usize),
            t if t & !0xffff_ffff == TOKEN_CONN_BASE => self.serve(t, events),
            _ => {}
        }
    }

    fn daemon_gone(&mut self, index: usize) {
        let Some((_, device)) = self.devices.get(index) else {
            return;
        };
        let mut transport = device.transport.lock().unwrap_or_else(|e| e.into_inner());
        log::error!(
            "{} daemon on {} disconnected; the guest sees a failed device",
            transport.kind().name(),
            transport.path().display()
        );
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            transport.socket_fd(),
            EpollEvent::default(),
        );
        transport.mark_failed(&device.relay);
    }

    /// A control client is readable, writable or gone: answer every complete line.
    fn serve(&mut self, token: u64, events: EventSet) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        if server.owns(token) {
            if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
                let read = server.read(token);
                for line in read.lines {
                    let reply = match api::parse(line.trim()) {
                        Ok(request) => self.handle(request),
                        Err(error) => api::reply_err(&error),
                    };
                    server.queue(token, &reply);
                }
                if read.overflow {
                    server.queue(token, &api::reply_err(&api::line_too_long()));
                }
            }
            server.flush(&self.epoll, token);
        }
        self.server = Some(server);
    }

    fn handle(&mut self, request: Request) -> String {
        let Some(vcpus) = self.vcpus.as_ref() else {
            return api::reply_err(&ApiError {
                code: "vmm.stopping",
                message: "the VM is stopping".into(),
            });
        };
        match request {
            Request::Status => {}
            Request::Pause => {
                let paused = vcpus.pause();
                log::info!("paused {paused} vCPU(s)");
            }
            Request::Resume => vcpus.resume(),
            Request::Shutdown { timeout_ms } => self.shutdown = Some(Shutdown::after(timeout_ms)),
        }
        api::reply_ok(&self.status())
    }

    fn status(&self) -> Status {
        let state = match (&self.vcpus, self.shutdown) {
            (_, Some(_)) => "stopping",
            (Some(v), None) if v.paused() => "paused",
            _ => "running",
        };
        Status {
            state,
            vcpus: self.vcpus.as_ref().map_or(0, Vcpus::count),
            memory_mib: self.memory_mib,
            devices: self
                .devices
                .iter()
                .map(|(_, d)| {
                    let t = d.transport.lock().unwrap_or_else(|e| e.into_inner());
                    DeviceStatus {
                        kind: t.kind().name(),
                        socket: t.path().display().to_string(),
                        failed: t.failed(),
                    }
                })
                .collect(),
        }
    }
}
