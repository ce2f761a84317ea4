//! Where a snapshot's guest stood: each vCPU's instruction pointer, run state and
//! pending interrupts, the IOAPIC's unmasked pins, and how far each virtqueue got on
//! both sides. For reading a guest that stopped answering: snapshot it through the
//! VMM's API (which needs no agent), then `microagent-snapshot guest DIR`.

use microagent_vmm::snapshot::manifest::MEMORY;
use microagent_vmm::snapshot::rings::file_offset;
use microagent_vmm::snapshot::state::VcpuState;
use microagent_vmm::snapshot::{dir, Error};
use serde::Serialize;
use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// LAPIC register offsets (Intel SDM vol. 3, table 11-1).
const APIC_TPR: usize = 0x80;
const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;
const APIC_LVT_TIMER: usize = 0x320;
const RFLAGS_IF: u64 = 1 << 9;

#[derive(Debug, Serialize)]
pub struct Vcpu {
    pub id: u8,
    /// KVM's run state: runnable, halted, ...
    pub state: &'static str,
    pub rip: u64,
    pub rsp: u64,
    pub interrupts_enabled: bool,
    /// An interrupt KVM had injected but the vCPU had not yet taken.
    pub injected_interrupt: Option<u8>,
    pub nmi_pending: bool,
    pub tpr: u32,
    /// Vectors the LAPIC is servicing (ISR) and holding for delivery (IRR).
    pub in_service: Vec<u8>,
    pub requested: Vec<u8>,
    /// The LAPIC timer: "masked", "one-shot", "periodic" or "tsc-deadline".
    pub timer: &'static str,
    /// TSC-deadline mode: how far the deadline was ahead of the TSC (negative: due).
    pub deadline_in_ticks: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Pin {
    pub pin: usize,
    pub vector: u8,
    /// The destination APIC ID (physical mode) or logical set; Linux gives vectors per
    /// CPU, so two pins may share a vector on different CPUs.
    pub destination: u8,
    pub level_triggered: bool,
    /// Level-triggered: delivered and not yet acknowledged by an EOI.
    pub remote_irr: bool,
    pub asserted: bool,
}

#[derive(Debug, Serialize)]
pub struct Queue {
    pub index: usize,
    pub size: u16,
    /// The guest's avail index and the device's used index, read from guest memory.
    pub avail: u16,
    pub used: u16,
    /// The next avail entry the daemon would have read.
    pub daemon_next: u16,
    /// The guest asked for no interrupts (avail flags bit 0).
    pub no_interrupt: bool,
}

#[derive(Debug, Serialize)]
pub struct Device {
    pub kind: &'static str,
    pub status: u32,
    /// InterruptStatus: raised by the VMM, not yet acknowledged by the guest.
    pub interrupt_status: u32,
    pub queues: Vec<Queue>,
}

#[derive(Debug, Serialize)]
pub struct Guest {
    pub vcpus: Vec<Vcpu>,
    pub ioapic: Vec<Pin>,
    pub devices: Vec<Device>,
}

/// Reads the snapshot's state (checksums checked) and the rings in its memory file.
pub fn read(snapshot: &Path) -> Result<Guest, Error> {
    let opened = dir::open(snapshot)?;
    let state = &opened.state;
    let path = snapshot.join(MEMORY);
    let memory = File::open(&path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let memory_size = opened.manifest.memory_mib << 20;
    let read_u16 = |addr: u64| -> Result<u16, Error> {
        let mut bytes = [0u8; 2];
        let offset = file_offset(addr, memory_size).ok_or_else(|| Error::Corrupt {
            path: path.clone(),
            message: format!("a ring at {addr:#x} is outside guest memory"),
        })?;
        memory
            .read_exact_at(&mut bytes, offset)
            .map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
        Ok(u16::from_le_bytes(bytes))
    };
    let mut devices = Vec::new();
    for transport in &state.devices {
        let mut queues = Vec::new();
        for (index, q) in transport.queues.iter().enumerate() {
            if !q.ready || q.size == 0 {
                continue;
            }
            queues.push(Queue {
                index,
                size: q.size,
                avail: read_u16(q.avail + 2)?,
                used: read_u16(q.used + 2)?,
                daemon_next: q.next_avail,
                no_interrupt: read_u16(q.avail)? & 1 != 0,
            });
        }
        devices.push(Device {
            kind: transport.kind.name(),
            status: transport.status,
            interrupt_status: transport.interrupt_status,
            queues,
        });
    }
    // SAFETY: the IOAPIC's KVM_GET_IRQCHIP fills the `ioapic` member of the union, and
    // any bit pattern is a valid value of its plain integer fields.
    let ioapic = unsafe { state.vm.ioapic.chip.ioapic };
    let ioapic = (0..ioapic.redirtbl.len())
        .filter_map(|pin| {
            // SAFETY: every redirection entry is a u64 (`bits`) viewed as bit fields.
            let entry = unsafe { ioapic.redirtbl[pin].bits };
            (entry & 1 << 16 == 0).then_some(Pin {
                pin,
                vector: entry as u8,
                destination: (entry >> 56) as u8,
                level_triggered: entry & 1 << 15 != 0,
                remote_irr: entry & 1 << 14 != 0,
                asserted: ioapic.irr & 1 << pin != 0,
            })
        })
        .collect();
    Ok(Guest {
        vcpus: state.vcpus.iter().map(vcpu).collect(),
        ioapic,
        devices,
    })
}

fn vcpu(v: &VcpuState) -> Vcpu {
    let regs: Vec<u8> = v.lapic.regs.iter().map(|&b| b as u8).collect();
    let reg = |offset: usize| u32::from_le_bytes([0, 1, 2, 3].map(|i| regs[offset + i]));
    // ISR and IRR: eight 32-bit registers 16 bytes apart, bit n of register i is vector
    // 32 * i + n.
    let vectors = |base: usize| -> Vec<u8> {
        (0..8u8)
            .flat_map(|i| {
                let word = reg(base + 16 * usize::from(i));
                (0..32u8)
                    .filter(move |b| word & 1 << b != 0)
                    .map(move |b| 32 * i + b)
            })
            .collect()
    };
    let lvt = reg(APIC_LVT_TIMER);
    let timer = match (lvt >> 16 & 1, lvt >> 17 & 3) {
        (1, _) => "masked",
        (_, 0) => "one-shot",
        (_, 1) => "periodic",
        _ => "tsc-deadline",
    };
    let msr = |index| v.msrs.iter().find(|m| m.index == index).map(|m| m.data);
    let deadline_in_ticks = match (timer, msr(MSR_IA32_TSC_DEADLINE), msr(MSR_IA32_TSC)) {
        ("tsc-deadline", Some(deadline), Some(tsc)) if deadline != 0 => {
            Some(deadline.wrapping_sub(tsc) as i64)
        }
        _ => None,
    };
    let interrupt = v.events.interrupt;
    Vcpu {
        id: v.id,
        state: match v.mp_state.mp_state {
            0 => "runnable",
            1 => "uninitialized",
            2 => "init-received",
            3 => "halted",
            4 => "sipi-received",
            _ => "other",
        },
        rip: v.regs.rip,
        rsp: v.regs.rsp,
        interrupts_enabled: v.regs.rflags & RFLAGS_IF != 0,
        injected_interrupt: (interrupt.injected != 0).then_some(interrupt.nr),
        nmi_pending: v.events.nmi.pending != 0,
        tpr: reg(APIC_TPR),
        in_service: vectors(APIC_ISR),
        requested: vectors(APIC_IRR),
        timer,
        deadline_in_ticks,
    }
}

/// The human-readable form of [`read`].
pub fn render(guest: &Guest) -> String {
    let mut out = String::new();
    for v in &guest.vcpus {
        let _ = writeln!(
            out,
            "vcpu {}: {} at rip {:#x}, rsp {:#x}, interrupts {}{}{}",
            v.id,
            v.state,
            v.rip,
            v.rsp,
            if v.interrupts_enabled { "on" } else { "off" },
            v.injected_interrupt
                .map(|n| format!(", interrupt {n} injected"))
                .unwrap_or_default(),
            if v.nmi_pending { ", NMI pending" } else { "" },
        );
        let _ = writeln!(
            out,
            "  LAPIC: TPR {:#x}, in service {:?}, requested {:?}, timer {}{}",
            v.tpr,
            v.in_service,
            v.requested,
            v.timer,
            v.deadline_in_ticks
                .map(|t| format!(" (deadline {t} TSC ticks ahead)"))
                .unwrap_or_default()
        );
    }
    for p in &guest.ioapic {
        let _ = writeln!(
            out,
            "ioapic pin {}: vector {} to APIC {}, {}{}{}",
            p.pin,
            p.vector,
            p.destination,
            if p.level_triggered { "level" } else { "edge" },
            if p.remote_irr { ", remote IRR" } else { "" },
            if p.asserted { ", asserted" } else { "" },
        );
    }
    for (i, d) in guest.devices.iter().enumerate() {
        let _ = writeln!(
            out,
            "device {i} {}: status {:#x}, interrupt status {}",
            d.kind, d.status, d.interrupt_status
        );
        for q in &d.queues {
            let _ = writeln!(
                out,
                "  queue {} ({} entries): guest avail {}, device used {}, daemon next {}{}",
                q.index,
                q.size,
                q.avail,
                q.used,
                q.daemon_next,
                if q.no_interrupt {
                    ", interrupts suppressed"
                } else {
                    ""
                }
            );
        }
    }
    out
}
