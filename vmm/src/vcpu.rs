//! vCPU threads: the KVM_RUN loop, exit dispatch, and pause/stop coordination.
//!
//! A vCPU is taken out of KVM_RUN by a real-time signal (KVM_RUN then returns EINTR);
//! the signal is repeated until the vCPU reports, which covers a signal that lands just
//! before KVM_RUN is entered.

use crate::devices::i8042::Effect;
use crate::devices::legacy::PioBus;
use crate::devices::virtio_mmio::MmioTransport;
use crate::layout::VIRTIO_MMIO_SIZE;
use crate::snapshot::state::VcpuState;
use kvm_ioctls::{VcpuExit, VcpuFd};
use microagent_confine::Confinement;
use serde::Serialize;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// Signal used to kick vCPUs out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Why the VM stopped running.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The guest asked for a reset (i8042 command, triple fault, KVM system event).
    GuestReset { how: String },
    /// The guest powered off (KVM system event).
    GuestPowerOff,
    /// The host asked the VMM to stop.
    Shutdown,
    /// A vCPU hit something the VMM cannot continue from.
    VcpuError(Box<VcpuFailure>),
}

/// A structured report of a fatal vCPU exit.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VcpuFailure {
    /// Stable code for scripts, e.g. `vmm.emulation_failure`.
    pub code: String,
    pub message: String,
    pub vcpu: u8,
    pub exit: String,
    pub suberror: Option<u32>,
    pub rip: Option<String>,
    pub cr0: Option<String>,
    pub cr3: Option<String>,
    pub cr4: Option<String>,
    pub efer: Option<String>,
    /// What to do about it, when known.
    pub hint: Option<String>,
}

impl VcpuFailure {
    /// A vCPU thread that could not confine itself never runs the guest.
    fn unconfined(vcpu: u8, error: &microagent_confine::Error) -> Self {
        Self {
            code: "vmm.confinement_failed".into(),
            message: format!("vCPU {vcpu} could not confine itself: {error}"),
            vcpu,
            exit: "none".into(),
            suberror: None,
            rip: None,
            cr0: None,
            cr3: None,
            cr4: None,
            efer: None,
            hint: Some("run with --seccomp=off to check whether seccomp is the cause".into()),
        }
    }
}

/// Devices a vCPU dispatches exits to.
pub struct Bus {
    pub pio: PioBus,
    /// (base address, transport), sorted by address.
    pub mmio: Vec<(u64, Arc<Mutex<MmioTransport>>)>,
}

impl Bus {
    fn mmio_device(&self, addr: u64) -> Option<(u64, &Arc<Mutex<MmioTransport>>)> {
        self.mmio
            .iter()
            .find(|(base, _)| (*base..*base + VIRTIO_MMIO_SIZE).contains(&addr))
            .map(|(base, t)| (addr - base, t))
    }
}

#[derive(Debug, Default)]
struct RunState {
    pause: bool,
    stop: bool,
    paused: usize,
    running: usize,
    /// vCPU threads past their confinement (entered, or failed and ending the VM).
    confined: usize,
    /// Bumped to ask every paused vCPU thread to save its state into `saved`.
    save_seq: u64,
    saved: Vec<Option<Result<VcpuState, String>>>,
}

/// What a vCPU thread needs to save its state when asked.
struct Saver<'a> {
    id: u8,
    vcpu: &'a VcpuFd,
    msr_indices: &'a [u32],
    seen: u64,
}

impl Saver<'_> {
    /// Saves this vCPU's state if a save was asked for since the last one; true if it did.
    fn serve(&mut self, state: &mut RunState) -> bool {
        if state.save_seq == self.seen {
            return false;
        }
        self.seen = state.save_seq;
        let result =
            VcpuState::capture(self.id, self.vcpu, self.msr_indices).map_err(|e| e.to_string());
        if let Some(slot) = state.saved.get_mut(usize::from(self.id)) {
            *slot = Some(result);
        }
        true
    }
}

/// Shared between the VMM's main loop and its vCPU threads.
pub struct Control {
    state: Mutex<RunState>,
    changed: Condvar,
    outcome: Mutex<Option<Outcome>>,
    /// Written when a vCPU ends the VM; the main loop waits on it.
    pub exit_evt: EventFd,
    /// Added to a failure report when the host cannot run the guest (PVM).
    pub failure_hint: Option<String>,
}

impl Control {
    pub fn new(exit_evt: EventFd, failure_hint: Option<String>) -> Self {
        Self {
            state: Mutex::new(RunState::default()),
            changed: Condvar::new(),
            outcome: Mutex::new(None),
            exit_evt,
            failure_hint,
        }
    }

    fn state(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records why the VM ends (the first reason wins) and wakes the main loop.
    pub fn finish(&self, outcome: Outcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
        }
        if let Err(e) = self.exit_evt.write(1) {
            log::error!("signalling VM exit: {e}");
        }
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The vCPU threads of one VM.
pub struct Vcpus {
    control: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
}

impl Vcpus {
    /// Starts one thread per vCPU; with `paused`, none enters KVM_RUN until resumed.
    /// `msr_indices` (KVM's MSR index list) is what a snapshot saves.
    pub fn start(
        vcpus: Vec<VcpuFd>,
        bus: Arc<Bus>,
        control: Arc<Control>,
        msr_indices: Arc<Vec<u32>>,
        paused: bool,
        confinement: Confinement,
    ) -> std::io::Result<Self> {
        extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        register_signal_handler(kick_signal(), noop)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        {
            let mut state = control.state();
            state.running = vcpus.len();
            state.pause = paused;
        }
        let mut threads = Vec::with_capacity(vcpus.len());
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            let bus = bus.clone();
            let control = control.clone();
            let msr_indices = msr_indices.clone();
            let confinement = confinement.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("vcpu{id}"))
                    .spawn(move || {
                        run(id as u8, vcpu, &bus, &control, &msr_indices, &confinement)
                    })?,
            );
        }
        let vcpus = Self { control, threads };
        // Whoever reaches the VMM after this (its control socket appears later) finds
        // every vCPU thread confined.
        vcpus.wait_until(|s| s.confined == s.running);
        if paused {
            vcpus.kick_until(|s| s.paused == s.running);
        }
        Ok(vcpus)
    }

    /// Every vCPU's state, saved by its own thread; the vCPUs must be paused.
    pub fn save_state(&self) -> Result<Vec<VcpuState>, String> {
        let mut state = self.control.state();
        if !(state.pause && state.paused == state.running) {
            return Err("the vCPUs are not paused".into());
        }
        state.saved = (0..self.threads.len()).map(|_| None).collect();
        state.save_seq += 1;
        self.control.changed.notify_all();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while state.saved.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err("a vCPU thread did not save its state within 10 s".into());
            }
            state = self
                .control
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.saved.drain(..).flatten().collect()
    }

    fn wait_until(&self, done: impl Fn(&RunState) -> bool) {
        let mut state = self.control.state();
        while !done(&state) {
            state = self
                .control
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn kick_until(&self, done: impl Fn(&RunState) -> bool) {
        let mut state = self.control.state();
        while !done(&state) {
            for thread in &self.threads {
                // SAFETY: the pthread handle belongs to a thread we spawned and have not
                // joined; a no-op handler is installed for the signal.
                unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
            }
            state = self
                .control
                .changed
                .wait_timeout(state, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops every vCPU outside KVM_RUN; returns how many are paused.
    pub fn pause(&self) -> usize {
        self.control.state().pause = true;
        self.kick_until(|s| s.paused == s.running);
        self.control.state().paused
    }

    pub fn resume(&self) {
        let mut state = self.control.state();
        state.pause = false;
        self.control.changed.notify_all();
        drop(state);
    }

    pub fn paused(&self) -> bool {
        let state = self.control.state();
        state.pause && state.paused == state.running
    }

    pub fn count(&self) -> usize {
        self.threads.len()
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(mut self) {
        self.control.state().stop = true;
        self.control.changed.notify_all();
        self.kick_until(|s| s.running == 0);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// While a pause is requested, counts this vCPU as paused and waits, saving its state
/// when asked.
fn wait_while_paused<'a>(
    control: &'a Control,
    mut state: MutexGuard<'a, RunState>,
    saver: &mut Saver<'_>,
) -> MutexGuard<'a, RunState> {
    if state.pause && !state.stop {
        state.paused += 1;
        control.changed.notify_all();
        while state.pause && !state.stop {
            if saver.serve(&mut state) {
                control.changed.notify_all();
            }
            state = control
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        state.paused -= 1;
        control.changed.notify_all();
    }
    state
}

fn run(
    id: u8,
    mut vcpu: VcpuFd,
    bus: &Bus,
    control: &Control,
    msr_indices: &[u32],
    confinement: &Confinement,
) {
    let mut seen = control.state().save_seq;
    // Confined before the first KVM_RUN: from here on the guest drives this thread.
    let confined = confinement.enter();
    control.state().confined += 1;
    control.changed.notify_all();
    let ended = if let Err(e) = confined {
        control.finish(Outcome::VcpuError(Box::new(VcpuFailure::unconfined(
            id, &e,
        ))));
        true
    } else {
        loop {
            let mut saver = Saver {
                id,
                vcpu: &vcpu,
                msr_indices,
                seen,
            };
            let stop = wait_while_paused(control, control.state(), &mut saver).stop;
            seen = saver.seen;
            if stop {
                break false;
            }
            if let Some(outcome) = run_once(id, &mut vcpu, bus, control) {
                control.finish(outcome);
                break true;
            }
        }
    };
    let mut saver = Saver {
        id,
        vcpu: &vcpu,
        msr_indices,
        seen,
    };
    let mut state = control.state();
    // A vCPU that ended the VM parks (pausable) until the main loop stops the VM.
    while ended && !state.stop {
        state = wait_while_paused(control, state, &mut saver);
        if !state.stop && !state.pause {
            state = control
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
    state.running -= 1;
    control.changed.notify_all();
}

/// One KVM_RUN; Some(outcome) when the VM must end.
fn run_once(id: u8, vcpu: &mut VcpuFd, bus: &Bus, control: &Control) -> Option<Outcome> {
    let exit_name;
    match vcpu.run() {
        Ok(exit) => match exit {
            VcpuExit::IoIn(port, data) => {
                bus.pio.read(port, data);
                return None;
            }
            VcpuExit::IoOut(port, data) => {
                // A reset ends the VM here: this vCPU parks instead of running the
                // guest on until the main loop stops it.
                return match bus.pio.write(port, data) {
                    Effect::CpuReset => Some(Outcome::GuestReset {
                        how: "i8042 reset".into(),
                    }),
                    Effect::None => None,
                };
            }
            VcpuExit::MmioRead(addr, data) => {
                match bus.mmio_device(addr) {
                    Some((offset, t)) => lock(t).read(offset, data),
                    None => data.fill(0),
                }
                return None;
            }
            VcpuExit::MmioWrite(addr, data) => {
                if let Some((offset, t)) = bus.mmio_device(addr) {
                    lock(t).write(offset, data);
                }
                return None;
            }
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => return None,
            VcpuExit::Hlt => {
                // With the in-kernel LAPIC a halt stays in KVM; seeing one is harmless.
                return None;
            }
            VcpuExit::Shutdown => {
                return Some(Outcome::GuestReset {
                    how: "triple fault or shutdown".into(),
                })
            }
            VcpuExit::SystemEvent(kind, _) => {
                return Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Outcome::GuestPowerOff,
                    _ => Outcome::GuestReset {
                        how: format!("KVM system event {kind}"),
                    },
                })
            }
            VcpuExit::InternalError => exit_name = "internal_error".to_string(),
            VcpuExit::FailEntry(reason, cpu) => {
                exit_name = format!("fail_entry (hardware reason {reason:#x}, cpu {cpu})")
            }
            other => exit_name = format!("{other:?}"),
        },
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            vcpu.set_kvm_immediate_exit(0);
            return None;
        }
        Err(e) => exit_name = format!("KVM_RUN error: {e}"),
    }
    Some(Outcome::VcpuError(Box::new(failure(
        id, vcpu, exit_name, control,
    ))))
}

fn failure(id: u8, vcpu: &mut VcpuFd, exit: String, control: &Control) -> VcpuFailure {
    let mut suberror = None;
    let (code, message) = if exit == "internal_error" {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
        // active member of the kvm_run union.
        let sub = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
        suberror = Some(sub);
        if sub == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            (
                "vmm.emulation_failure",
                "KVM could not emulate a guest instruction".to_string(),
            )
        } else {
            (
                "vmm.internal_error",
                format!("KVM internal error, suberror {sub}"),
            )
        }
    } else {
        ("vmm.unhandled_exit", format!("unhandled vCPU exit: {exit}"))
    };
    let regs = vcpu.get_regs().ok();
    let sregs = vcpu.get_sregs().ok();
    let hex = |v: u64| format!("{v:#x}");
    VcpuFailure {
        code: code.into(),
        message,
        vcpu: id,
        exit,
        suberror,
        rip: regs.map(|r| hex(r.rip)),
        cr0: sregs.map(|s| hex(s.cr0)),
        cr3: sregs.map(|s| hex(s.cr3)),
        cr4: sregs.map(|s| hex(s.cr4)),
        efer: sregs.map(|s| hex(s.efer)),
        hint: control.failure_hint.clone(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
