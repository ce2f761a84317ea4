//! A [`Vm`] is built (KVM, memory, devices), then either boots a kernel or is restored
//! from a snapshot, then runs its event loop (`event_loop`) until it ends.

use crate::boot;
use crate::config::{Serial, Start, VmmConfig};
use crate::confinement;
use crate::control;
use crate::cpu;
use crate::devices::i8042::{self, I8042};
use crate::devices::legacy::{self, LegacyState, PioBus, COM1_IRQ};
use crate::devices::virtio_mmio::{self, DeviceKind, InterruptRelay, MmioTransport};
use crate::devices::EventFdTrigger;
use crate::host;
use crate::layout::*;
use crate::memory;
use crate::mptable;
use crate::snapshot::{self, dir, manifest};
use crate::vcpu::{Bus, Control, Outcome, Vcpus};
use event_loop::{EventLoop, TOKEN_API, TOKEN_CONN_BASE};

mod event_loop;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use microagent_confine::Confinement;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::Epoll;
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
    #[error("reading KVM's MSR index list: {0}")]
    MsrIndexList(kvm_ioctls::Error),
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
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    #[error("confining the VMM: {0}")]
    Confine(#[from] microagent_confine::Error),
}

impl Error {
    /// The stable code printed when the VMM cannot start.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Snapshot(e) => e.code(),
            Self::Confine(_) => "vmm.confinement_failed",
            _ => "vmm.start_failed",
        }
    }
}

struct Device {
    transport: Arc<Mutex<MmioTransport>>,
    relay: InterruptRelay,
}

/// What the guest was started from, as a snapshot records it.
struct Origin {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    /// Hashes from the snapshot a restored VM came from (a booted VM hashes its files
    /// when it is first snapshotted).
    restored: Option<(manifest::Artifact, Option<manifest::Artifact>)>,
    cmdline: String,
}

/// A built VM: KVM, guest memory and devices, before it boots or is restored.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: GuestMemoryMmap,
    devices: Vec<(u64, Device)>,
    /// Device entries for the kernel command line.
    device_cmdline: String,
    memory_mib: u64,
    cpus: u8,
    /// KVM's supported CPUID, read once (see [`cpu::supported_cpuid`]).
    supported_cpuid: CpuId,
}

impl Vm {
    /// Creates the KVM VM (irqchip, PIT), `memory_mib` of guest memory and one
    /// virtio-mmio transport per device socket of `config`.
    /// With `restore` (the snapshot's transports and daemon states), each transport is
    /// restored into its new daemon instead of starting fresh.
    pub fn build(
        config: &VmmConfig,
        memory_mib: u64,
        cpus: u8,
        restore: Option<&dir::Opened>,
    ) -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(Error::Kvm)?;
        let supported_cpuid = cpu::supported_cpuid(&kvm)?;
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

        let mem = memory::create(memory_mib)?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the returned
            // `Vm` keeps for as long as the VM fd lives, and the slot numbers are
            // distinct.
            unsafe { vm.set_user_memory_region(region_desc) }.map_err(setup("memory slot"))?;
        }

        if let Some(opened) = restore {
            // Before any daemon is connected: a restored ring must find its memory.
            let populated = dir::load_memory(opened, memfd_of(&mem)?)?;
            log::info!("restored {populated} bytes of populated guest memory");
        }

        let mut device_cmdline = String::new();
        let mut devices = Vec::new();
        for (index, (kind, path)) in device_sockets(config).enumerate() {
            let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
            let irq = VIRTIO_IRQ_BASE + index as u32;
            let transport = match restore {
                Some(opened) => {
                    let state = opened.state.devices.get(index);
                    let blob = opened.device_states.get(index);
                    let (Some(state), Some(blob)) = (state, blob) else {
                        return Err(snapshot::Error::Corrupt {
                            path: opened.dir.join(manifest::STATE),
                            message: format!("no state for device {index}"),
                        }
                        .into());
                    };
                    MmioTransport::restore(path, &mem, MAX_QUEUE_SIZE, state, blob).map_err(
                        |e| snapshot::Error::Restore {
                            what: "a device",
                            message: e.to_string(),
                        },
                    )?
                }
                None => MmioTransport::connect(kind, path, &mem, MAX_QUEUE_SIZE)?,
            };
            let relay = transport.register(&vm, base, irq)?;
            device_cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
            devices.push((
                base,
                Device {
                    transport: Arc::new(Mutex::new(transport)),
                    relay,
                },
            ));
        }
        Ok(Self {
            kvm,
            fd: vm,
            mem,
            devices,
            device_cmdline,
            memory_mib,
            cpus,
            supported_cpuid,
        })
    }

    fn create_vcpu(&self, id: u8) -> Result<VcpuFd, Error> {
        self.fd
            .create_vcpu(u64::from(id))
            .map_err(|source| Error::CreateVcpu { id, source })
    }

    /// Loads the kernel (and initrd) and sets up every vCPU for its first instruction.
    fn boot(&self, config: &VmmConfig, kernel_path: &Path) -> Result<Booted, Error> {
        let kernel = boot::load_kernel(&self.mem, kernel_path)?;
        let cmdline = format!(
            "{}{}{}",
            config.cmdline,
            self.device_cmdline,
            kernel.cmdline_extra()
        );
        let failure_hint = host::linux_guest_limitation().filter(|_| kernel.is_linux);
        if let Some(hint) = &failure_hint {
            log::warn!("{hint}");
        }
        let initrd = config
            .initrd
            .as_deref()
            .map(|path| boot::load_initrd(&self.mem, path, kernel.end))
            .transpose()?;
        boot::configure(&self.mem, &kernel, &boot::cmdline(&cmdline)?, initrd)?;
        boot::write_page_tables(&self.mem)?;
        mptable::write(&self.mem, self.cpus)?;
        log::info!("kernel command line: {cmdline}");

        let tsc_deadline = self.kvm.check_extension(Cap::TscDeadlineTimer);
        let mut vcpus = Vec::with_capacity(usize::from(self.cpus));
        for id in 0..self.cpus {
            let vcpu = self.create_vcpu(id)?;
            vcpu.set_cpuid2(&cpu::cpuid(
                &self.supported_cpuid,
                id,
                self.cpus,
                tsc_deadline,
            ))
            .map_err(cpu::Error::SetCpuid)?;
            cpu::setup_msrs(&vcpu)?;
            cpu::setup_fpu(&vcpu)?;
            cpu::setup_lapic(&vcpu)?;
            if id == 0 {
                cpu::setup_boot_vcpu(&vcpu, &self.mem, kernel.entry)?;
            }
            vcpus.push(vcpu);
        }
        Ok(Booted {
            vcpus,
            legacy: LegacyState::default(),
            failure_hint,
            origin: Origin {
                kernel: kernel_path.to_owned(),
                initrd: config.initrd.clone(),
                restored: None,
                cmdline,
            },
        })
    }

    /// Gives the VM and every vCPU its saved state (memory was filled by `build`).
    fn restore(&self, opened: &dir::Opened) -> Result<Vec<VcpuFd>, Error> {
        let restore = |what| {
            move |e: snapshot::state::Error| snapshot::Error::Restore {
                what,
                message: e.to_string(),
            }
        };
        opened
            .state
            .vm
            .apply(&self.fd)
            .map_err(restore("VM state"))?;
        if opened.state.vcpus.len() != usize::from(self.cpus) {
            return Err(snapshot::Error::Corrupt {
                path: opened.dir.join(manifest::STATE),
                message: format!(
                    "{} vCPU states for {} vCPUs",
                    opened.state.vcpus.len(),
                    self.cpus
                ),
            }
            .into());
        }
        let mut vcpus = Vec::with_capacity(usize::from(self.cpus));
        for (id, state) in (0..self.cpus).zip(&opened.state.vcpus) {
            let vcpu = self.create_vcpu(id)?;
            state.apply(&vcpu).map_err(restore("vCPU state"))?;
            vcpus.push(vcpu);
        }
        Ok(vcpus)
    }
}

/// vCPU fds ready to run, and where the guest came from.
struct Booted {
    vcpus: Vec<VcpuFd>,
    /// Serial and i8042 registers (as out of reset for a boot).
    legacy: LegacyState,
    failure_hint: Option<String>,
    origin: Origin,
}

fn device_sockets(config: &VmmConfig) -> impl Iterator<Item = (DeviceKind, &PathBuf)> {
    config
        .blk
        .iter()
        .map(|p| (DeviceKind::Block, p))
        .chain(config.net.iter().map(|p| (DeviceKind::Net, p)))
        .chain(config.vsock.iter().map(|p| (DeviceKind::Vsock, p)))
}

/// The memfd behind guest memory (every region maps the same one).
fn memfd_of(mem: &GuestMemoryMmap) -> Result<&File, Error> {
    mem.iter()
        .next()
        .and_then(|region| region.file_offset())
        .map(|offset| offset.file())
        .ok_or_else(|| Error::Memory(memory::Error::Map("guest memory has no memfd".into())))
}

/// Builds the VM, boots it or restores it, runs it, and returns why it ended.
///
/// This is the VMM process's last act: the VM's resources (KVM fds, guest memory, daemon
/// connections) are left for the process's exit to release, not dropped here.
pub fn run(config: &VmmConfig) -> Result<Outcome, Error> {
    let (vm, booted, start_paused) = match &config.start {
        Start::Boot { kernel } => {
            let vm = Vm::build(config, config.memory_mib, config.cpus, None)?;
            let booted = vm.boot(config, kernel)?;
            (vm, booted, false)
        }
        Start::Restore {
            dir: snapshot_dir,
            paused,
            kernel,
        } => {
            let opened = dir::open(snapshot_dir)?;
            let m = &opened.manifest;
            let kvm = Kvm::new().map_err(Error::Kvm)?;
            m.check_cpu(&manifest::CpuIdentity::of_host(&kvm)?)?;
            let kernel = kernel.as_deref().unwrap_or(&m.kernel.path);
            m.check_artifacts(kernel, config.initrd.as_deref())?;
            let kinds: Vec<&str> = device_sockets(config).map(|(k, _)| k.name()).collect();
            m.check_devices(&kinds)?;
            let vm = Vm::build(config, m.memory_mib, m.vcpus, Some(&opened))?;
            let vcpus = vm.restore(&opened)?;
            let origin = Origin {
                kernel: kernel.to_owned(),
                initrd: m.initrd.as_ref().map(|a| a.path.clone()),
                restored: Some((m.kernel.clone(), m.initrd.clone())),
                cmdline: m.cmdline.clone(),
            };
            log::info!("restored snapshot {}", snapshot_dir.display());
            let booted = Booted {
                vcpus,
                legacy: opened.state.legacy.clone(),
                failure_hint: None,
                origin,
            };
            (vm, booted, *paused)
        }
    };
    start(config, vm, booted, start_paused)
}

/// A control socket bound at `tmp` until it is renamed to `path`; removed if it never is.
struct Binding {
    path: PathBuf,
    tmp: PathBuf,
}

impl Binding {
    /// `.PID` beside `path`: no longer than `api.sock`, so it fits where that does.
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            tmp: path.with_file_name(format!(".{}", std::process::id())),
        }
    }

    fn publish(self) -> Result<(), Error> {
        std::fs::rename(&self.tmp, &self.path).map_err(|source| Error::Api {
            path: self.path.clone(),
            source,
        })
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        // After a successful rename there is nothing at `tmp` any more.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Serial, i8042, the control socket and the vCPU threads; then the event loop.
fn start(config: &VmmConfig, vm: Vm, booted: Booted, paused: bool) -> Result<Outcome, Error> {
    let setup = |what| move |source| Error::VmSetup { what, source };
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
    vm.fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(setup("serial irqfd"))?;
    let kbd_irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventLoop)?;
    vm.fd
        .register_irqfd(&kbd_irq, i8042::KBD_IRQ)
        .map_err(setup("i8042 keyboard irqfd"))?;
    let serial = legacy::serial_from(
        &booted.legacy.serial,
        EventFdTrigger(serial_irq),
        serial_out,
    )
    .map_err(|message| snapshot::Error::Restore {
        what: "serial state",
        message,
    })?;
    let bus = Arc::new(Bus {
        pio: PioBus::new(
            serial,
            I8042::restore(booted.legacy.i8042, EventFdTrigger(kbd_irq)),
        ),
        mmio: vm
            .devices
            .iter()
            .map(|(base, d)| (*base, d.transport.clone()))
            .collect(),
    });

    let epoll = Epoll::new().map_err(Error::EventLoop)?;
    // The control socket is bound under a temporary name and renamed into place once the
    // VMM is confined: whoever sees the socket talks to a confined VMM.
    let binding = config.api_socket.as_deref().map(Binding::new);
    let server = match &binding {
        Some(binding) => {
            let _ = std::fs::remove_file(&binding.path);
            let listener = UnixListener::bind(&binding.tmp).map_err(|source| Error::Api {
                path: binding.tmp.clone(),
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

    let msr_indices = Arc::new(
        vm.kvm
            .get_msr_index_list()
            .map_err(Error::MsrIndexList)?
            .as_slice()
            .to_vec(),
    );
    let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventLoop)?;
    // Compiled here, so that a bad profile fails the start rather than a vCPU.
    let vcpu_confinement = Confinement::new(&confinement::vcpu_thread(), config.seccomp)?;
    let main_confinement = Confinement::new(&confinement::main_thread(), config.seccomp)?;
    let control = Arc::new(Control::new(
        exit_evt.try_clone().map_err(Error::EventLoop)?,
        booted.failure_hint,
    ));
    // Before the first vCPU thread starts, so that every thread is under the ruleset: a
    // snapshot writes beneath the given directories and hashes the kernel and initrd.
    let readable: Vec<PathBuf> = std::iter::once(booted.origin.kernel.clone())
        .chain(booted.origin.initrd.clone())
        .collect();
    microagent_confine::enter_landlock("vmm", &config.landlock, &readable)?;
    let vcpus = Vcpus::start(
        booted.vcpus,
        bus.clone(),
        control.clone(),
        msr_indices,
        paused,
        vcpu_confinement,
    )
    .map_err(Error::EventLoop)?;
    log::info!(
        "{} vCPU(s) {}",
        vcpus.count(),
        if paused { "paused" } else { "running" }
    );

    let cpu = manifest::CpuIdentity::of_supported(&vm.supported_cpuid);
    // Set-up is over: everything the loop needs is open. On failure `vcpus` is dropped,
    // which stops the vCPU threads.
    main_confinement.enter()?;
    if let Some(binding) = binding {
        binding.publish()?;
    }
    let mut event_loop = EventLoop {
        epoll,
        control,
        vcpus: Some(vcpus),
        server,
        exit_evt,
        shutdown: None,
        origin: booted.origin,
        cpu,
        vm: &vm,
        bus,
    };
    let outcome = event_loop.run();
    drop(event_loop);
    if let Some(path) = &config.api_socket {
        let _ = std::fs::remove_file(path);
    }
    // The process exits next, and its exit releases the VM in one pass: KVM VM and vCPU
    // fds, the guest memory mapping and memfd, the daemon sockets. Unmapping and
    // closing them one by one here first cost about 0.3 ms more CPU per run
    // (bench_vmm_start, docs/benchmarks.md) and nothing a caller could observe.
    std::mem::forget(vm);
    outcome
}
