//! The VMM's event loop: vCPU exits that end the VM, guest resets, interrupt relay
//! from daemons, daemon deaths, and the control socket's requests (snapshot included).

use super::{memfd_of, Error, Origin, Vm};
use crate::api::{self, ApiError, DeviceStatus, Request, Status};
use crate::control;
use crate::layout::VIRTIO_IRQ_BASE;
use crate::snapshot::{self, dir, manifest, SnapshotState};
use crate::vcpu::{Bus, Control, Outcome, Vcpus};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// epoll tokens.
pub(super) const TOKEN_EXIT: u64 = 0;
pub(super) const TOKEN_API: u64 = 2;
pub(super) const TOKEN_CONN_BASE: u64 = 1 << 32;
pub(super) const TOKEN_CALL_BASE: u64 = 2 << 32;
pub(super) const TOKEN_HUP_BASE: u64 = 3 << 32;

/// A requested shutdown: when the VMM stops the guest if it has not powered off.
#[derive(Debug, Clone, Copy)]
pub(super) enum Shutdown {
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

pub(super) struct EventLoop<'a> {
    pub(super) epoll: Epoll,
    pub(super) control: Arc<Control>,
    pub(super) vcpus: Option<Vcpus>,
    pub(super) server: Option<control::Server>,
    pub(super) exit_evt: EventFd,
    pub(super) shutdown: Option<Shutdown>,
    pub(super) origin: Origin,
    pub(super) cpu: manifest::CpuIdentity,
    /// Outlives the vCPU threads, which are joined before `run` returns.
    pub(super) vm: &'a Vm,
    /// The devices the vCPUs reach; the port-I/O ones are saved from here.
    pub(super) bus: Arc<Bus>,
}

impl EventLoop<'_> {
    fn add(&self, fd: i32, token: u64, events: EventSet) -> Result<(), Error> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            .map_err(Error::EventLoop)
    }

    pub(super) fn run(&mut self) -> Result<Outcome, Error> {
        self.add(self.exit_evt.as_raw_fd(), TOKEN_EXIT, EventSet::IN)?;
        for (index, (_, device)) in self.vm.devices.iter().enumerate() {
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
            TOKEN_API => {
                if let Some(server) = &mut self.server {
                    server.accept(&self.epoll);
                }
            }
            t if t & !0xffff_ffff == TOKEN_CALL_BASE => {
                let index = ((t >> 16) & 0xffff) as usize;
                let queue = (t & 0xffff) as usize;
                if let Some((_, device)) = self.vm.devices.get(index) {
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
        let Some((_, device)) = self.vm.devices.get(index) else {
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
            Request::Snapshot { dir } => {
                return match self.snapshot(&dir) {
                    Ok(written) => api::reply_ok(&api::SnapshotReply {
                        status: self.status(),
                        snapshot: written,
                    }),
                    Err(e) => api::reply_err(&ApiError {
                        code: e.code(),
                        message: e.to_string(),
                    }),
                }
            }
        }
        api::reply_ok(&self.status())
    }

    /// Pauses the vCPUs (if running), writes the snapshot, and resumes them (if they
    /// were running): a failed snapshot leaves the VM as it was and no directory.
    fn snapshot(&mut self, dir: &Path) -> Result<dir::Written, snapshot::Error> {
        let memfd = memfd_of(&self.vm.mem).map_err(|e| snapshot::Error::Write {
            dir: dir.to_owned(),
            step: "finding guest memory",
            source: io::Error::other(e.to_string()),
        })?;
        dir::preflight(dir, memfd, self.vm.memory_mib << 20)?;
        let Some(vcpus) = self.vcpus.as_ref() else {
            return Err(snapshot::Error::Stopping);
        };
        let (kernel, initrd) = match &self.origin.restored {
            Some((kernel, initrd)) => (kernel.clone(), initrd.clone()),
            None => (
                manifest::Artifact::of(&self.origin.kernel)?,
                self.origin
                    .initrd
                    .as_deref()
                    .map(manifest::Artifact::of)
                    .transpose()?,
            ),
        };
        let was_paused = vcpus.paused();
        if !was_paused {
            vcpus.pause();
        }
        let mut result = self.capture_and_write(vcpus, dir, kernel, initrd);
        // Memory is written (or the snapshot failed): the daemons may run again.
        for (index, (_, device)) in self.vm.devices.iter().enumerate() {
            let mut transport = device.transport.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = transport.resume_rings() {
                log::error!("after the snapshot, device {index}: {e}");
                if result.is_ok() {
                    result = Err(snapshot::Error::DeviceState {
                        index,
                        message: e.to_string(),
                    });
                }
            }
        }
        if !was_paused {
            vcpus.resume();
        }
        if let Ok(written) = &result {
            log::info!(
                "snapshot {}: {} of {} memory bytes populated",
                dir.display(),
                written.memory_populated,
                written.memory_bytes
            );
        }
        result
    }

    fn capture_and_write(
        &self,
        vcpus: &Vcpus,
        dir: &Path,
        kernel: manifest::Artifact,
        initrd: Option<manifest::Artifact>,
    ) -> Result<dir::Written, snapshot::Error> {
        // Devices first: once their rings are stopped no daemon writes guest memory. They
        // stay stopped until the caller has this written ([`MmioTransport::resume_rings`]).
        let mut transports = Vec::with_capacity(self.vm.devices.len());
        let mut device_states = Vec::with_capacity(self.vm.devices.len());
        for (index, (_, device)) in self.vm.devices.iter().enumerate() {
            let mut transport = device.transport.lock().unwrap_or_else(|e| e.into_inner());
            let (state, blob) = transport.save().map_err(|e| snapshot::Error::DeviceState {
                index,
                message: e.to_string(),
            })?;
            transports.push(state);
            device_states.push(blob);
        }
        hold_rings_stopped();
        let vcpu_states = vcpus.save_state().map_err(snapshot::Error::VcpuThreads)?;
        let state = SnapshotState {
            vm: snapshot::state::VmState::capture(&self.vm.fd).map_err(snapshot::Error::Capture)?,
            vcpus: vcpu_states,
            devices: transports,
            legacy: self.bus.pio.state(),
        };
        let manifest = manifest::Manifest {
            format: manifest::Format {
                major: manifest::FORMAT_MAJOR,
                minor: manifest::FORMAT_MINOR,
            },
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            kernel,
            initrd,
            cmdline: self.origin.cmdline.clone(),
            cpu: self.cpu.clone(),
            vcpus: self.vm.cpus,
            memory_mib: self.vm.memory_mib,
            memory_populated: 0,
            devices: self
                .vm
                .devices
                .iter()
                .enumerate()
                .map(|(index, (base, device))| manifest::DeviceEntry {
                    kind: device
                        .transport
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .kind()
                        .name()
                        .into(),
                    mmio_base: *base,
                    irq: VIRTIO_IRQ_BASE + index as u32,
                })
                .collect(),
            files: Vec::new(),
            checksum: String::new(),
        };
        let memfd = memfd_of(&self.vm.mem).map_err(|e| snapshot::Error::Write {
            dir: dir.to_owned(),
            step: "finding guest memory",
            source: io::Error::other(e.to_string()),
        })?;
        dir::write(
            dir,
            manifest,
            &state,
            &device_states,
            memfd,
            self.vm.memory_mib << 20,
        )
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
            memory_mib: self.vm.memory_mib,
            devices: self
                .vm
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

/// Environment variable a debug build reads: when set to a path, a snapshot creates that
/// file once every device's rings are stopped and waits (up to 30 s) until the test
/// removes it, so a test can make a daemon busy at exactly that moment. Release builds
/// do not have it.
#[cfg(debug_assertions)]
const SNAPSHOT_GATE_ENV: &str = "MICROAGENT_TEST_SNAPSHOT_GATE";

#[cfg(debug_assertions)]
fn hold_rings_stopped() {
    let Some(gate) = std::env::var_os(SNAPSHOT_GATE_ENV).map(std::path::PathBuf::from) else {
        return;
    };
    if let Err(e) = std::fs::write(&gate, "rings stopped\n") {
        log::warn!("{SNAPSHOT_GATE_ENV}: creating {}: {e}", gate.display());
        return;
    }
    log::warn!(
        "{SNAPSHOT_GATE_ENV}: rings stopped; waiting for {} to go",
        gate.display()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while gate.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(not(debug_assertions))]
fn hold_rings_stopped() {}
