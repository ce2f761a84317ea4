//! Plain serializable state of the KVM VM and its vCPUs, apart from the runtime handles
//! (`VmFd`, `VcpuFd`): captured from a paused VM, applied to freshly created ones.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vCPU {vcpu}: {what}: {source}")]
    Vcpu {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM accepted {set} of {total} MSRs; MSR {index:#x} was refused")]
    MsrRefused {
        vcpu: u8,
        set: usize,
        total: usize,
        index: u32,
    },
    #[error("vCPU {vcpu}: building an MSR or CPUID list: {message}")]
    List { vcpu: u8, message: String },
    #[error("VM: {what}: {source}")]
    Vm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Everything KVM holds for one vCPU. The FPU is inside `xsave`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// None when this KVM cannot report it.
    pub tsc_khz: Option<u32>,
}

/// The in-kernel irqchip, PIT and clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// IA32_TSC_DEADLINE: the LAPIC timer's deadline in TSC-deadline mode.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

impl VcpuState {
    /// Reads a vCPU that is outside KVM_RUN. `msr_indices` is KVM's MSR index list;
    /// MSRs this vCPU cannot read are left out.
    pub fn capture(id: u8, vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, Error> {
        let ioctl = |what| {
            move |source| Error::Vcpu {
                vcpu: id,
                what,
                source,
            }
        };
        Ok(Self {
            id,
            cpuid: vcpu
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(ioctl("KVM_GET_CPUID2"))?
                .as_slice()
                .to_vec(),
            msrs: read_msrs(id, vcpu, msr_indices)?,
            regs: vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?,
            debugregs: vcpu.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
            mp_state: vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
            tsc_khz: vcpu.get_tsc_khz().ok(),
        })
    }

    /// Applies the state to a vCPU that has never run, in the order KVM needs: CPUID
    /// before MSRs, special registers (APIC base) before the LAPIC, events last.
    pub fn apply(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        let id = self.id;
        let ioctl = |what| {
            move |source| Error::Vcpu {
                vcpu: id,
                what,
                source,
            }
        };
        if let Some(khz) = self.tsc_khz {
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                vcpu.set_tsc_khz(khz).map_err(ioctl("KVM_SET_TSC_KHZ"))?;
            }
        }
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|e| Error::List {
            vcpu: id,
            message: format!("{e:?}"),
        })?;
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|e| Error::List {
            vcpu: id,
            message: format!("{e:?}"),
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if set != self.msrs.len() {
            return Err(Error::MsrRefused {
                vcpu: id,
                set,
                total: self.msrs.len(),
                index: self.msrs.get(set).map_or(0, |m| m.index),
            });
        }
        vcpu.set_sregs(&self.sregs)
            .map_err(ioctl("KVM_SET_SREGS"))?;
        // SAFETY: the VMM never grants the guest dynamic XSAVE features
        // (ARCH_REQ_XCOMP_GUEST_PERM), so KVM reads at most size_of::<kvm_xsave>()
        // bytes, which `self.xsave` holds.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(ioctl("KVM_SET_LAPIC"))?;
        // KVM ignores a TSC deadline written while the LAPIC timer is not in
        // TSC-deadline mode, which it was not above (the LAPIC was at reset): write it
        // again now. A zero deadline is written as 1, which fires at once: zero also
        // means "fired, interrupt not yet taken", and a guest that lost that tick waits
        // forever (Firecracker does the same); Linux ignores a spurious tick.
        if let Some(saved) = self.msrs.iter().find(|m| m.index == MSR_IA32_TSC_DEADLINE) {
            let deadline = kvm_msr_entry {
                data: saved.data.max(1),
                ..*saved
            };
            let msrs = Msrs::from_entries(&[deadline]).map_err(|e| Error::List {
                vcpu: id,
                message: format!("{e:?}"),
            })?;
            vcpu.set_msrs(&msrs)
                .map_err(ioctl("KVM_SET_MSRS (TSC deadline)"))?;
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(ioctl("KVM_SET_REGS"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads every MSR in `indices` that this vCPU has. KVM_GET_MSRS stops at the first
/// MSR it cannot read; that one is skipped and the rest read again.
fn read_msrs(id: u8, vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::List {
            vcpu: id,
            message: format!("{e:?}"),
        })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(|source| Error::Vcpu {
            vcpu: id,
            what: "KVM_GET_MSRS",
            source,
        })?;
        saved.extend_from_slice(&msrs.as_slice()[..read.min(rest.len())]);
        rest = rest.get(read + 1..).unwrap_or(&[]);
    }
    Ok(saved)
}

impl VmState {
    pub fn capture(vm: &VmFd) -> Result<Self, Error> {
        let ioctl = |what| move |source| Error::Vm { what, source };
        let chip = |id| {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(ioctl("KVM_GET_IRQCHIP"))
                .map(|()| chip)
        };
        let mut clock = vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?;
        // Only KVM_CLOCK_REALTIME would be honoured on restore, and it would move the
        // guest clock forward by the time the snapshot sat on disk: the guest resumes
        // at the instant it was saved.
        clock.flags = 0;
        Ok(Self {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock,
        })
    }

    /// Applies the state to a VM whose irqchip and PIT exist and whose vCPUs do not yet.
    pub fn apply(&self, vm: &VmFd) -> Result<(), Error> {
        let ioctl = |what| move |source| Error::Vm { what, source };
        vm.set_pit2(&self.pit).map_err(ioctl("KVM_SET_PIT2"))?;
        vm.set_clock(&self.clock).map_err(ioctl("KVM_SET_CLOCK"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    /// Needs /dev/kvm (present on every machine this project runs on).
    #[test]
    fn vcpu_and_vm_state_round_trip_through_json_into_a_new_vm() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(Default::default()).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0x20_0000;
        vcpu.set_regs(&regs).unwrap();
        let indices = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
        let state = VcpuState::capture(0, &vcpu, &indices).unwrap();
        assert!(!state.msrs.is_empty());
        // The KVM clock MSRs come with KVM's list and are saved with the rest.
        const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
        assert!(indices.contains(&MSR_KVM_SYSTEM_TIME_NEW));
        assert!(state
            .msrs
            .iter()
            .any(|m| m.index == MSR_KVM_SYSTEM_TIME_NEW));
        let vm_state = VmState::capture(&vm).unwrap();

        let json = serde_json::to_string(&(&state, &vm_state)).unwrap();
        let (back, vm_back): (VcpuState, VmState) = serde_json::from_str(&json).unwrap();

        let vm2 = kvm.create_vm().unwrap();
        vm2.create_irq_chip().unwrap();
        vm2.create_pit2(Default::default()).unwrap();
        vm_back.apply(&vm2).unwrap();
        let vcpu2 = vm2.create_vcpu(0).unwrap();
        back.apply(&vcpu2).unwrap();
        let regs2 = vcpu2.get_regs().unwrap();
        assert_eq!((regs2.rax, regs2.rip), (0x1234_5678, 0x20_0000));
        assert_eq!(vcpu2.get_sregs().unwrap().cr0, state.sregs.cr0);
    }
}
