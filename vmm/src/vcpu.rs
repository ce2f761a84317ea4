//! vCPU threads: the KVM_RUN loop, exit dispatch, and pause/stop coordination.
//!
//! A vCPU is taken out of KVM_RUN by a real-time signal (KVM_RUN then returns EINTR);
//! the signal is repeated until the vCPU reports, which covers a signal that lands just
//! before KVM_RUN is entered.

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

    /// Tells KVM this vCPU is parked on purpose (KVM_KVMCLOCK_CTRL), so that on resume
    /// the guest's watchdogs and RCU do not count the pause as a stall. EINVAL means the
    /// guest has not enabled kvmclock: nothing to tell.
    fn park(&self) {
        if let Err(e) = self.vcpu.kvmclock_ctrl() {
            if e.errno() != libc::EINVAL {
                log::warn!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", self.id);
            }
        }
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
        saver.park();
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
    let ended = if let Err(e) = confinement.enter() {
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
    let mut entry_failure = None;
    let exit = vcpu.run();
    if matches!(exit, Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..))) {
        // kvm-ioctls drops the access size, which the devices need.
        port_io_exit(vcpu, &bus.pio);
        return None;
    }
    match exit {
        Ok(exit) => match exit {
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
                exit_name = format!("fail_entry (hardware reason {reason:#x}, cpu {cpu})");
                entry_failure = Some(reason);
            }
            other => exit_name = format!("{other:?}"),
        },
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            vcpu.set_kvm_immediate_exit(0);
            return None;
        }
        Err(e) => exit_name = format!("KVM_RUN error: {e}"),
    }
    let mut report = failure(id, vcpu, exit_name, control);
    if let Some((code, message, hint)) = entry_failure.and_then(explain_entry_failure) {
        report.code = code.into();
        report.message = message.into();
        report.hint = Some(
            report
                .hint
                .map_or(hint.to_string(), |h| format!("{hint} {h}")),
        );
    }
    Some(Outcome::VcpuError(Box::new(report)))
}

/// Completes a KVM_EXIT_IO with its size and count, which `VcpuExit::IoIn/IoOut` hide:
/// a 16/32-bit access and string I/O must reach every byte, not only the first.
fn port_io_exit(vcpu: &mut VcpuFd, pio: &PioBus) {
    let run = vcpu.get_kvm_run();
    // SAFETY: KVM_RUN just returned KVM_EXIT_IO (kvm-ioctls decoded it as IoIn/IoOut),
    // so `io` is the active member of the exit union.
    let io = unsafe { run.__bindgen_anon_1.io };
    let size = usize::from(io.size);
    let len = size * io.count as usize;
    let base = std::ptr::from_mut(run).cast::<u8>();
    // SAFETY: for KVM_EXIT_IO the kernel puts `size * count` bytes of data at
    // `data_offset` inside the vCPU's kvm_run mapping, which lives as long as `vcpu`
    // (the layout kvm-ioctls itself slices for IoIn/IoOut); `run` is not used again, so
    // this slice is the only reference to those bytes.
    let data = unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len) };
    if u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN {
        pio.read(io.port, size, data);
    } else {
        pio.write(io.port, size, data);
    }
}

/// VMX exit reason 33 with the entry-failure bit (31): the CPU refused the guest state.
const VMX_ENTRY_FAILURE_GUEST_STATE: u64 = 0x8000_0021;

/// Code, message and hint for a KVM_EXIT_FAIL_ENTRY reason the VMM knows.
fn explain_entry_failure(reason: u64) -> Option<(&'static str, &'static str, &'static str)> {
    (reason == VMX_ENTRY_FAILURE_GUEST_STATE).then_some((
        "vmm.invalid_guest_state",
        "the CPU refused to enter the guest: invalid guest state (VMX reason 0x80000021)",
        "A register or segment the vCPU was given is not valid for VMX on this host \
         (see cr0/cr4/efer above); check the kernel's boot entry, and that the host \
         has unrestricted guest (kvm_intel.unrestricted_guest=1).",
    ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::i8042::I8042;
    use crate::devices::EventFdTrigger;
    use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs};
    use kvm_ioctls::Kvm;
    use microagent_confine::Seccomp;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
    use vm_superio::Serial;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    const PVCLOCK_PAGE: u64 = 0x2000;
    /// pvclock_vcpu_time_info.flags, and the bit KVM sets after KVM_KVMCLOCK_CTRL.
    const PVCLOCK_FLAGS: u64 = PVCLOCK_PAGE + 29;
    const PVCLOCK_GUEST_STOPPED: u8 = 1 << 1;

    /// A one-vCPU VM in real mode spinning at 0x1000 (a halted vCPU would not re-enter
    /// the guest, where KVM updates the clock page), kvmclock enabled at PVCLOCK_PAGE as
    /// a guest kernel would, run by the VMM's own vCPU threads.
    fn spinning_vm_with_kvmclock() -> (GuestMemoryMmap, Vcpus, kvm_ioctls::VmFd) {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let region = mem.iter().next().unwrap();
        let desc = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: `mem` is returned with the VM fd and outlives the test's use of it.
        unsafe { vm.set_user_memory_region(desc) }.unwrap();
        mem.write_slice(&[0xf3, 0x90, 0xeb, 0xfc], GuestAddress(0x1000)) // pause; jmp
            .unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 0x2;
        vcpu.set_regs(&regs).unwrap();
        let msr = kvm_msr_entry {
            index: MSR_KVM_SYSTEM_TIME_NEW,
            data: PVCLOCK_PAGE | 1,
            ..Default::default()
        };
        vcpu.set_msrs(&Msrs::from_entries(&[msr]).unwrap()).unwrap();

        let trigger = || EventFdTrigger(EventFd::new(EFD_NONBLOCK).unwrap());
        let bus = Bus {
            pio: PioBus::new(
                Serial::new(trigger(), Box::new(std::io::sink())),
                I8042::new(trigger(), trigger()),
            ),
            mmio: Vec::new(),
        };
        let control = Arc::new(Control::new(EventFd::new(EFD_NONBLOCK).unwrap(), None));
        let vcpus = Vcpus::start(
            vec![vcpu],
            Arc::new(bus),
            control,
            Arc::new(Vec::new()),
            false,
            // The vCPU thread's own filter: KVM_KVMCLOCK_CTRL must pass it.
            Confinement::new(&crate::confinement::vcpu_thread(), Seccomp::On).unwrap(),
        )
        .unwrap();
        (mem, vcpus, vm)
    }

    #[test]
    fn a_paused_vcpu_tells_the_guest_its_clock_was_stopped() {
        let (mem, vcpus, _vm) = spinning_vm_with_kvmclock();
        let flags =
            |mem: &GuestMemoryMmap| mem.read_obj::<u8>(GuestAddress(PVCLOCK_FLAGS)).unwrap();
        let wait_for = |mask: u8| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while flags(&mem) & mask == 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // KVM writes the clock page (PVCLOCK_TSC_STABLE_BIT here) at the first entry.
        wait_for(0xff);
        assert_eq!(flags(&mem) & PVCLOCK_GUEST_STOPPED, 0, "before any pause");
        assert_eq!(vcpus.pause(), 1);
        vcpus.resume();
        // KVM writes the flag into the guest's clock page when the vCPU re-enters.
        wait_for(PVCLOCK_GUEST_STOPPED);
        let seen = flags(&mem);
        vcpus.stop();
        assert_ne!(
            seen & PVCLOCK_GUEST_STOPPED,
            0,
            "PVCLOCK_GUEST_STOPPED after a pause (flags {seen:#x})"
        );
    }

    #[test]
    fn an_invalid_guest_state_entry_failure_is_explained() {
        let (code, message, hint) = explain_entry_failure(0x8000_0021).unwrap();
        assert_eq!(code, "vmm.invalid_guest_state");
        assert!(message.contains("invalid guest state"));
        assert!(hint.contains("unrestricted_guest"));
        assert_eq!(explain_entry_failure(0x21), None);
    }
}
