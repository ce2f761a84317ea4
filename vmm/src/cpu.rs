//! Architectural set-up of a vCPU before its first KVM_RUN: CPUID, MSRs, FPU, LAPIC,
//! and the registers and segments each boot entry expects.

use crate::boot::Entry;
use crate::layout::*;
use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading KVM's supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2: {0}")]
    SetCpuid(kvm_ioctls::Error),
    #[error("KVM_SET_MSRS: {0}")]
    SetMsrs(kvm_ioctls::Error),
    #[error("building the MSR list: {0}")]
    MsrList(String),
    #[error("KVM_SET_FPU: {0}")]
    SetFpu(kvm_ioctls::Error),
    #[error("LAPIC: {0}")]
    Lapic(kvm_ioctls::Error),
    #[error("KVM_SET_REGS: {0}")]
    SetRegs(kvm_ioctls::Error),
    #[error("KVM_GET/SET_SREGS: {0}")]
    Sregs(kvm_ioctls::Error),
    #[error("writing the GDT: {0}")]
    Gdt(String),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 0x1;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// KVM's supported CPUID, read once per VM: every vCPU's CPUID and the host identity a
/// snapshot records derive from it (each read executes CPUID on the host, which is
/// slow where that instruction traps to an outer hypervisor).
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::SupportedCpuid)
}

/// `supported` with the topology and identity this VMM presents to vCPU `cpu_id`.
/// `tsc_deadline`: KVM emulates the LAPIC timer's TSC-deadline mode
/// (KVM_CAP_TSC_DEADLINE_TIMER), which KVM's supported CPUID does not list; without it
/// Linux runs its LAPIC timer in one-shot mode and first checks the legacy timer through
/// the IO-APIC, which took about 2 s of a nested boot here.
pub fn cpuid(supported: &CpuId, cpu_id: u8, cpus: u8, tsc_deadline: bool) -> CpuId {
    let mut cpuid = supported.clone();
    let shift = u32::BITS - (u32::from(cpus).max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (u32::from(cpu_id) << 24) | (u32::from(cpus) << 16) | (8 << 8);
                entry.ecx |= 1 << 31; // running under a hypervisor
                if tsc_deadline {
                    entry.ecx |= 1 << 24; // TSC-deadline mode of the LAPIC timer
                }
                if cpus > 1 {
                    entry.edx |= 1 << 28; // HTT: the package has several logical CPUs
                }
            }
            0xb => {
                // One thread per core, `cpus` cores in one package.
                let (eax, ebx, level_type) = match entry.index {
                    0 => (0, 1, 1),
                    1 => (shift, u32::from(cpus), 2),
                    _ => (0, 0, 0),
                };
                entry.eax = eax;
                entry.ebx = ebx;
                entry.ecx = (level_type << 8) | (entry.index & 0xff);
                entry.edx = u32::from(cpu_id);
            }
            0x4000_0000 => {
                // KVM's signature, so that guests use kvm-clock and friends.
                entry.ebx = u32::from_le_bytes(*b"KVMK");
                entry.ecx = u32::from_le_bytes(*b"VMKV");
                entry.edx = u32::from_le_bytes(*b"M\0\0\0");
            }
            _ => {}
        }
    }
    cpuid
}

pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), Error> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::MsrList(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(Error::SetMsrs)?;
    if set != entries.len() {
        let failed = entries[set].index;
        log::warn!(
            "KVM set {set} of {} boot MSRs; MSR {failed:#x} refused",
            entries.len()
        );
    }
    Ok(())
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::SetFpu)
}

/// LINT0 delivers the legacy PIC's interrupts, LINT1 NMIs.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut lapic = vcpu.get_lapic().map_err(Error::Lapic)?;
    let mut set_mode = |offset: usize, mode: u32| {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as libc::c_char;
        }
    };
    set_mode(APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(Error::Lapic)
}

/// A flat segment; `system` for the TSS, whose type bits mean something else.
fn segment(
    selector: u16,
    limit: u32,
    type_: u8,
    system: bool,
    long: bool,
    db: bool,
) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(db),
        s: u8::from(!system),
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Encodes a segment as a GDT entry.
fn gdt_entry(seg: &kvm_segment) -> u64 {
    let base = seg.base;
    let limit = u64::from(seg.limit >> 12); // granularity 4 KiB
    let access = u64::from(seg.type_)
        | (u64::from(seg.s) << 4)
        | (u64::from(seg.dpl) << 5)
        | (u64::from(seg.present) << 7);
    let flags = (u64::from(seg.l) << 1) | (u64::from(seg.db) << 2) | (u64::from(seg.g) << 3);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (flags << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// Segments, control registers and GDT for `entry`; registers for the boot vCPU.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: Entry) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(Error::Sregs)?;
    let long = matches!(entry, Entry::Linux64(_));
    let code = segment(0x8, 0xffff_ffff, 0xb, false, long, !long);
    let data = segment(0x10, 0xffff_ffff, 0x3, false, false, true);
    let tss = segment(0x18, 0xf_ffff, 0xb, true, false, false);
    let gdt = [0, gdt_entry(&code), gdt_entry(&data), gdt_entry(&tss)];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(|e| Error::Gdt(e.to_string()))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|e| Error::Gdt(e.to_string()))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Pvh(addr) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = addr.0;
            regs.rbx = PVH_INFO_START;
        }
        Entry::Linux64(addr) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = addr.0;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    vcpu.set_sregs(&sregs).map_err(Error::Sregs)?;
    vcpu.set_regs(&regs).map_err(Error::SetRegs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_usual_flat_segments() {
        // The values every x86 boot loader uses for flat 64-bit code and data.
        let code = segment(0x8, 0xffff_ffff, 0xb, false, true, false);
        assert_eq!(gdt_entry(&code), 0x00af_9b00_0000_ffff);
        let data = segment(0x10, 0xffff_ffff, 0x3, false, false, true);
        assert_eq!(gdt_entry(&data), 0x00cf_9300_0000_ffff);
        let code32 = segment(0x8, 0xffff_ffff, 0xb, false, false, true);
        assert_eq!(gdt_entry(&code32), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn the_lapic_timer_offers_tsc_deadline_mode_when_kvm_emulates_it() {
        let leaf1 = kvm_bindings::kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        };
        let supported = CpuId::from_entries(&[leaf1]).expect("one entry");
        let ecx = |tsc_deadline| cpuid(&supported, 0, 2, tsc_deadline).as_slice()[0].ecx;
        assert_eq!(ecx(true) & (1 << 24), 1 << 24);
        assert_eq!(ecx(false) & (1 << 24), 0);
    }
}
