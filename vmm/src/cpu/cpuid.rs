//! CPUID normalisation: turns KVM_GET_SUPPORTED_CPUID (what the host and KVM can offer)
//! into what one vCPU of this VM should see, per vendor.
//!
//! - Topology is built from our vCPU count, not edited from KVM's entries: one package,
//!   one thread per core, `cpus` cores. KVM >= 6.2 returns leaf 0xB/0x1F subleaf 0 only,
//!   and keeps the host's cache sharing in leaf 4 / 0x8000001D.
//! - Features the VMM cannot back are hidden: AMX (its XSAVE state is not permitted to
//!   the guest, so leaf 0xD hides it), the virtual PMU, WAITPKG, SGX, VMX/SVM (nested
//!   state is not saved in snapshots).
//! - The TSC-deadline timer is advertised when KVM emulates it: KVM only reports the bit
//!   itself from 6.14, and without it guests calibrate the LAPIC timer against the PIT.

use kvm_bindings::kvm_cpuid_entry2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM's supported CPUID has no leaf 0 (vendor)")]
    NoVendor,
    #[error("{cpus} vCPUs: vCPU {cpu_id} is out of range")]
    CpuOutOfRange { cpu_id: u8, cpus: u8 },
}

/// What one vCPU is, for its CPUID.
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    /// This vCPU's index, also its APIC ID.
    pub cpu_id: u8,
    /// vCPUs in the VM, all cores of one package.
    pub cpus: u8,
    /// KVM_CAP_TSC_DEADLINE_TIMER: KVM emulates the LAPIC TSC-deadline mode.
    pub tsc_deadline: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

// Leaf 1.
const ECX_VMX: u32 = 1 << 5;
const ECX_PDCM: u32 = 1 << 15;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
// Leaf 7 subleaf 0.
const EBX_SGX: u32 = 1 << 2;
const EBX_FDP_EXCPTN_ONLY: u32 = 1 << 6;
const EBX_ZERO_FCS_FDS: u32 = 1 << 13;
const ECX_WAITPKG: u32 = 1 << 5;
const ECX_SGX_LC: u32 = 1 << 30;
const EDX_AMX: u32 = (1 << 22) | (1 << 24) | (1 << 25); // AMX-BF16, AMX-TILE, AMX-INT8
                                                        // Leaf 7 subleaf 1.
const EAX_AMX_FP16: u32 = 1 << 21;
const EDX_AMX_COMPLEX: u32 = 1 << 8;
// Leaf 0xD: XTILECFG and XTILEDATA state components.
const XSTATE_AMX: u32 = (1 << 17) | (1 << 18);
// Leaf 0x80000001 ECX.
const ECX_SVM: u32 = 1 << 2;

// Topology level types (leaf 0xB/0x1F ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// The vendor leaf 0 names.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Result<Vendor, Error> {
    let leaf0 = entries
        .iter()
        .find(|e| e.function == 0)
        .ok_or(Error::NoVendor)?;
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    name[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    Ok(match &name {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    })
}

/// Bits needed to number `n` things: the APIC ID shift of a level holding `n`.
fn id_bits(n: u32) -> u32 {
    u32::BITS - (n.max(1) - 1).leading_zeros()
}

/// Rewrites KVM's supported CPUID for `guest`.
pub fn normalize(entries: &mut Vec<kvm_cpuid_entry2>, guest: Guest) -> Result<(), Error> {
    if guest.cpus == 0 || guest.cpu_id >= guest.cpus {
        return Err(Error::CpuOutOfRange {
            cpu_id: guest.cpu_id,
            cpus: guest.cpus,
        });
    }
    let vendor = vendor(entries)?;
    let cpus = u32::from(guest.cpus);
    let apic_id = u32::from(guest.cpu_id);
    let core_bits = id_bits(cpus);

    // Topology leaves are rebuilt whole: KVM returns subleaf 0 only.
    let had_1f = entries.iter().any(|e| e.function == 0x1f);
    entries.retain(|e| e.function != 0xb && e.function != 0x1f);
    entries.extend(extended_topology(0xb, apic_id, cpus, core_bits));
    if had_1f && vendor == Vendor::Intel {
        entries.extend(extended_topology(0x1f, apic_id, cpus, core_bits));
    }

    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (1, _) => {
                e.ebx = (apic_id << 24) | (cpus << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                e.ecx &= !(ECX_VMX | ECX_PDCM);
                if guest.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            (4, _) if vendor == Vendor::Intel => {
                // EAX[25:14]: logical CPUs sharing this cache - 1; EAX[31:26]: cores - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { (1 << core_bits) - 1 } else { 0 };
                let cores = (1 << core_bits) - 1;
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | (cores << 26);
                if e.eax & 0x1f == 0 {
                    e.eax = 0; // no cache at this subleaf: all fields zero
                }
            }
            (7, 0) => {
                e.ebx &= !EBX_SGX;
                e.ecx &= !(ECX_WAITPKG | ECX_SGX_LC);
                e.edx &= !EDX_AMX;
                if vendor == Vendor::Intel {
                    e.ebx |= EBX_FDP_EXCPTN_ONLY | EBX_ZERO_FCS_FDS;
                }
            }
            (7, 1) => {
                e.eax &= !EAX_AMX_FP16;
                e.edx &= !EDX_AMX_COMPLEX;
            }
            (0xd, 0) => e.eax &= !XSTATE_AMX,
            (0xd, 17 | 18) | (0xa | 0x12 | 0x1d | 0x1e, _) => zero(e),
            (0x8000_0001, _) => e.ecx &= !ECX_SVM,
            (0x8000_0008, _) if vendor == Vendor::Amd => {
                // ECX[7:0]: cores - 1; ECX[15:12]: APIC ID bits for the core number.
                e.ecx = (core_bits << 12) | (cpus - 1);
            }
            (0x8000_001d, _) if vendor == Vendor::Amd => {
                // EAX[25:14]: logical CPUs sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & !(0xfff << 14)) | (sharing << 14);
            }
            (0x8000_001e, _) if vendor == Vendor::Amd => {
                e.eax = apic_id; // extended APIC ID
                e.ebx = apic_id & 0xff; // core ID; one thread per core
                e.ecx = 0; // node 0, one node per package
                e.edx = 0;
            }
            (0x4000_0000, _) => {
                // KVM's signature, so that guests use kvm-clock and friends.
                e.ebx = u32::from_le_bytes(*b"KVMK");
                e.ecx = u32::from_le_bytes(*b"VMKV");
                e.edx = u32::from_le_bytes(*b"M\0\0\0");
            }
            _ => {}
        }
    }
    Ok(())
}

fn zero(e: &mut kvm_cpuid_entry2) {
    e.eax = 0;
    e.ebx = 0;
    e.ecx = 0;
    e.edx = 0;
}

/// Leaf 0xB or 0x1F: an SMT level of one thread, a core level of `cpus` cores, then the
/// invalid level that ends the guest's enumeration.
fn extended_topology(
    function: u32,
    apic_id: u32,
    cpus: u32,
    core_bits: u32,
) -> [kvm_cpuid_entry2; 3] {
    let level = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    [
        level(0, 0, 1, LEVEL_SMT),
        level(1, core_bits, cpus, LEVEL_CORE),
        level(2, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL_SPR: &str = include_str!("fixtures/intel_sapphire_rapids.txt");
    const AMD_GENOA: &str = include_str!("fixtures/amd_zen4_genoa.txt");

    fn parse(fixture: &str) -> Vec<kvm_cpuid_entry2> {
        fixture
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let v: Vec<u32> = l
                    .split_whitespace()
                    .map(|w| u32::from_str_radix(w.trim_start_matches("0x"), 16).unwrap())
                    .collect();
                kvm_cpuid_entry2 {
                    function: v[0],
                    index: v[1],
                    flags: v[2],
                    eax: v[3],
                    ebx: v[4],
                    ecx: v[5],
                    edx: v[6],
                    ..Default::default()
                }
            })
            .collect()
    }

    fn guest_view(
        fixture: &str,
        cpu_id: u8,
        cpus: u8,
        tsc_deadline: bool,
    ) -> Vec<kvm_cpuid_entry2> {
        let mut entries = parse(fixture);
        normalize(
            &mut entries,
            Guest {
                cpu_id,
                cpus,
                tsc_deadline,
            },
        )
        .unwrap();
        entries
    }

    /// What the guest's CPUID instruction returns: KVM returns zeros for a missing subleaf.
    fn cpuid(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> [u32; 4] {
        entries
            .iter()
            .find(|e| {
                e.function == function
                    && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
            })
            .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
    }

    /// Linux's reading of leaf 0xB/0x1F: (threads per core, logical CPUs per package).
    fn ext_topology(entries: &[kvm_cpuid_entry2], function: u32) -> (u32, u32) {
        let mut smt = 0;
        let mut package = 0;
        for index in 0.. {
            let [_, ebx, ecx, _] = cpuid(entries, function, index);
            match (ecx >> 8) & 0xff {
                0 => break,
                LEVEL_SMT => smt = ebx & 0xffff,
                _ => package = ebx & 0xffff,
            }
        }
        (smt, package)
    }

    #[test]
    fn both_hosts_show_one_package_of_n_single_thread_cores() {
        for fixture in [INTEL_SPR, AMD_GENOA] {
            for cpus in [1u8, 2, 4] {
                for cpu_id in 0..cpus {
                    let e = guest_view(fixture, cpu_id, cpus, true);
                    assert_eq!(ext_topology(&e, 0xb), (1, u32::from(cpus)));
                    let [_, ebx, _, edx] = cpuid(&e, 1, 0);
                    assert_eq!(ebx >> 24, u32::from(cpu_id), "initial APIC ID");
                    assert_eq!((ebx >> 16) & 0xff, u32::from(cpus), "logical CPUs");
                    assert_eq!(edx & EDX_HTT != 0, cpus > 1, "HTT");
                    for index in 0..2 {
                        assert_eq!(cpuid(&e, 0xb, index)[3], u32::from(cpu_id), "x2APIC ID");
                    }
                }
            }
        }
    }

    #[test]
    fn intel_leaf_1f_and_cache_sharing_follow_the_vcpu_count() {
        for (cpus, addressable) in [(1u8, 1), (2, 2), (4, 4)] {
            let e = guest_view(INTEL_SPR, 0, cpus, true);
            assert_eq!(ext_topology(&e, 0x1f), (1, u32::from(cpus)));
            for index in 0..4 {
                let eax = cpuid(&e, 4, index)[0];
                let level = (eax >> 5) & 7;
                let sharing = ((eax >> 14) & 0xfff) + 1;
                let cores = (eax >> 26) + 1;
                assert_eq!(cores, addressable, "leaf 4.{index} cores");
                let want = if level == 3 { addressable } else { 1 };
                assert_eq!(sharing, want, "leaf 4.{index} (L{level}) sharing");
            }
            assert_eq!(cpuid(&e, 4, 4), [0; 4], "leaf 4 ends");
        }
        // Three cores are addressed with two bits, as on hardware.
        let e = guest_view(INTEL_SPR, 2, 3, true);
        assert_eq!(cpuid(&e, 0xb, 1)[0], 2);
        assert_eq!((cpuid(&e, 4, 3)[0] >> 26) + 1, 4);
    }

    #[test]
    fn amd_topoext_leaves_describe_our_cores() {
        for cpus in [1u8, 2, 4] {
            for cpu_id in 0..cpus {
                let e = guest_view(AMD_GENOA, cpu_id, cpus, true);
                let topoext = cpuid(&e, 0x8000_0001, 0)[2] & (1 << 22) != 0;
                assert!(topoext, "TOPOEXT stays set, so 0x8000001E must be valid");
                let [eax, ebx, ecx, _] = cpuid(&e, 0x8000_001e, 0);
                assert_eq!(eax, u32::from(cpu_id), "extended APIC ID");
                assert_eq!(ebx & 0xff, u32::from(cpu_id), "core ID");
                assert_eq!((ebx >> 8) & 0xff, 0, "one thread per core");
                assert_eq!(ecx, 0, "node 0 of 1");
                let ecx = cpuid(&e, 0x8000_0008, 0)[2];
                assert_eq!((ecx & 0xff) + 1, u32::from(cpus), "NC");
                assert_eq!(
                    1 << ((ecx >> 12) & 0xf),
                    u32::from(cpus).next_power_of_two()
                );
                for index in 0..4 {
                    let eax = cpuid(&e, 0x8000_001d, index)[0];
                    let level = (eax >> 5) & 7;
                    let sharing = ((eax >> 14) & 0xfff) + 1;
                    let want = if level == 3 { u32::from(cpus) } else { 1 };
                    assert_eq!(sharing, want, "0x8000001D.{index} (L{level})");
                }
            }
        }
    }

    #[test]
    fn tsc_deadline_timer_is_advertised_when_kvm_emulates_it() {
        // KVM reports the bit itself from 6.14 only: the 6.18 AMD recording has it, the
        // 6.1 Intel table does not.
        for (fixture, reported) in [(INTEL_SPR, false), (AMD_GENOA, true)] {
            let host = cpuid(&parse(fixture), 1, 0)[2] & ECX_TSC_DEADLINE != 0;
            assert_eq!(host, reported);
            let with = guest_view(fixture, 0, 2, true);
            assert_ne!(cpuid(&with, 1, 0)[2] & ECX_TSC_DEADLINE, 0);
            let without = guest_view(fixture, 0, 2, false);
            assert_eq!(cpuid(&without, 1, 0)[2] & ECX_TSC_DEADLINE, 0);
            assert_ne!(cpuid(&with, 1, 0)[2] & ECX_HYPERVISOR, 0);
        }
    }

    #[test]
    fn intel_features_the_vmm_cannot_back_are_hidden() {
        let host = parse(INTEL_SPR);
        assert_ne!(cpuid(&host, 7, 0)[3] & EDX_AMX, 0, "fixture advertises AMX");
        for cpus in [1u8, 2, 4] {
            let e = guest_view(INTEL_SPR, 0, cpus, true);
            let [_, ebx, ecx, edx] = cpuid(&e, 7, 0);
            assert_eq!(edx & EDX_AMX, 0, "AMX");
            assert_eq!(cpuid(&e, 7, 1)[0] & EAX_AMX_FP16, 0, "AMX-FP16");
            assert_eq!(cpuid(&e, 0xd, 0)[0] & XSTATE_AMX, 0, "AMX state");
            assert_eq!(cpuid(&e, 0x1d, 0), [0; 4], "tile palette leaf");
            assert_eq!(cpuid(&e, 0x1e, 0), [0; 4], "TMUL leaf");
            assert_eq!(ecx & ECX_WAITPKG, 0, "WAITPKG");
            assert_eq!(ebx & EBX_SGX, 0, "SGX");
            assert_eq!(ecx & ECX_SGX_LC, 0, "SGX_LC");
            assert_eq!(cpuid(&e, 0x12, 0), [0; 4], "SGX leaf");
            assert_eq!(cpuid(&e, 0xa, 0), [0; 4], "PMU");
            let ecx1 = cpuid(&e, 1, 0)[2];
            assert_eq!(ecx1 & ECX_PDCM, 0, "PDCM");
            assert_eq!(ecx1 & ECX_VMX, 0, "VMX");
            let fpu = EBX_FDP_EXCPTN_ONLY | EBX_ZERO_FCS_FDS;
            assert_eq!(ebx & fpu, fpu, "FDP_EXCPTN_ONLY and ZERO_FCS_FDS");
            // What the guest keeps: AVX-512F (7.0 EBX[16]) and the kvm-clock signature.
            assert_ne!(ebx & (1 << 16), 0);
            assert_eq!(cpuid(&e, 0x4000_0000, 0)[1], u32::from_le_bytes(*b"KVMK"));
        }
    }

    #[test]
    fn amd_hides_svm() {
        // The recording host had no nested SVM to offer; a host with it sets ECX[2].
        let mut e = parse(AMD_GENOA);
        assert_eq!(vendor(&e).unwrap(), Vendor::Amd);
        for entry in e.iter_mut().filter(|e| e.function == 0x8000_0001) {
            entry.ecx |= ECX_SVM;
        }
        let guest = Guest {
            cpu_id: 1,
            cpus: 2,
            tsc_deadline: true,
        };
        normalize(&mut e, guest).unwrap();
        assert_eq!(cpuid(&e, 0x8000_0001, 0)[2] & ECX_SVM, 0);
    }

    #[test]
    fn a_vcpu_outside_the_vm_is_refused() {
        let mut e = parse(AMD_GENOA);
        let guest = Guest {
            cpu_id: 2,
            cpus: 2,
            tsc_deadline: true,
        };
        assert!(matches!(
            normalize(&mut e, guest),
            Err(Error::CpuOutOfRange { cpu_id: 2, cpus: 2 })
        ));
        assert!(matches!(
            normalize(&mut Vec::new(), Guest { cpu_id: 0, ..guest }),
            Err(Error::NoVendor)
        ));
    }
}
