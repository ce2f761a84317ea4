//! Where a snapshot's guest stood: each vCPU's instruction pointer, run state and
//! pending interrupts, the IOAPIC's unmasked pins, and how far each virtqueue got on
//! both sides. For reading a guest that stopped answering: snapshot it through the
//! VMM's API (which needs no agent), then `microagent-snapshot guest DIR`.

use microagent_vmm::devices::virtio_mmio::QueueState;
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
const APIC_TIMER_CURRENT_COUNT: usize = 0x390;
const RFLAGS_IF: u64 = 1 << 9;
/// VIRTIO_RING_F_EVENT_IDX: the driver's used_event and the device's avail_event replace
/// the rings' flags for notification suppression.
const EVENT_IDX: u64 = 1 << 29;
const DRIVER_OK: u32 = 4;
const KVM_IRQCHIP_IOAPIC: u32 = 2;

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
    /// The LAPIC timer: "masked", "one-shot", "periodic", "tsc-deadline" or "reserved".
    pub timer: &'static str,
    /// One-shot and periodic modes: the count left (0: not running).
    pub timer_count: u32,
    /// TSC-deadline mode: the deadline MSR, and how far it was ahead of the TSC
    /// (negative: due). A deadline of 0 is disarmed, or fired with its interrupt not yet
    /// taken.
    pub tsc_deadline: Option<u64>,
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
    pub masked: bool,
}

#[derive(Debug, Serialize)]
pub struct Queue {
    pub index: usize,
    pub size: u16,
    /// The next avail entry the daemon would have read.
    pub daemon_next: u16,
    /// What guest memory holds of the ring; None when a ring lies outside it (the guest
    /// set the addresses).
    pub ring: Option<Ring>,
}

/// A split virtqueue's indices and notification suppression, read from guest memory.
#[derive(Debug, Serialize)]
pub struct Ring {
    /// The guest's avail index and the device's used index.
    pub avail: u16,
    pub used: u16,
    /// Without EVENT_IDX: the guest asked for no interrupts (avail flags bit 0).
    pub no_interrupt: bool,
    /// With EVENT_IDX: the used index after which the guest wants an interrupt, and the
    /// avail index after which the device wants a kick.
    pub used_event: Option<u16>,
    pub avail_event: Option<u16>,
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
    let read_u16 = |addr: Option<u64>| -> Option<u16> {
        let offset = file_offset(addr?, memory_size)?;
        let mut bytes = [0u8; 2];
        memory.read_exact_at(&mut bytes, offset).ok()?;
        Some(u16::from_le_bytes(bytes))
    };
    let ring = |q: &QueueState, event_idx: bool| -> Option<Ring> {
        let size = u64::from(q.size);
        // avail: flags, idx, ring[size], used_event; used: flags, idx, ring[size] of
        // 8 bytes, avail_event.
        let at = |base: u64, offset: u64| base.checked_add(offset);
        Some(Ring {
            avail: read_u16(at(q.avail, 2))?,
            used: read_u16(at(q.used, 2))?,
            no_interrupt: !event_idx && read_u16(at(q.avail, 0))? & 1 != 0,
            used_event: match event_idx {
                true => Some(read_u16(at(q.avail, 4 + 2 * size))?),
                false => None,
            },
            avail_event: match event_idx {
                true => Some(read_u16(at(q.used, 4 + 8 * size))?),
                false => None,
            },
        })
    };
    let mut devices = Vec::new();
    for transport in &state.devices {
        let event_idx = transport.driver_features & EVENT_IDX != 0;
        // Before DRIVER_OK the ring addresses may be half written: not read.
        let started = transport.status & DRIVER_OK != 0;
        let queues = transport
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| started && q.ready && q.size != 0)
            .map(|(index, q)| Queue {
                index,
                size: q.size,
                daemon_next: q.next_avail,
                ring: ring(q, event_idx),
            })
            .collect();
        devices.push(Device {
            kind: transport.kind.name(),
            status: transport.status,
            interrupt_status: transport.interrupt_status,
            queues,
        });
    }
    let chip = &state.vm.ioapic;
    if chip.chip_id != KVM_IRQCHIP_IOAPIC {
        return Err(Error::Corrupt {
            path: snapshot.join(microagent_vmm::snapshot::manifest::STATE),
            message: format!("the IOAPIC's chip id is {}", chip.chip_id),
        });
    }
    // SAFETY: the chip id says the union holds the IOAPIC's state, and the union was
    // rebuilt from the saved bytes, so its integer fields hold valid values.
    let ioapic = unsafe { chip.chip.ioapic };
    let ioapic = (0..ioapic.redirtbl.len())
        .filter_map(|pin| {
            // SAFETY: every redirection entry is a u64 (`bits`) viewed as bit fields.
            let entry = unsafe { ioapic.redirtbl[pin].bits };
            let p = Pin {
                pin,
                vector: entry as u8,
                destination: (entry >> 56) as u8,
                level_triggered: entry & 1 << 15 != 0,
                remote_irr: entry & 1 << 14 != 0,
                asserted: ioapic.irr & 1 << pin != 0,
                masked: entry & 1 << 16 != 0,
            };
            // A masked pin matters only when something is left on it.
            (!p.masked || p.remote_irr || p.asserted).then_some(p)
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
        (_, 2) => "tsc-deadline",
        _ => "reserved",
    };
    let msr = |index| v.msrs.iter().find(|m| m.index == index).map(|m| m.data);
    let tsc_deadline = (timer == "tsc-deadline")
        .then(|| msr(MSR_IA32_TSC_DEADLINE))
        .flatten();
    let deadline_in_ticks = match (tsc_deadline, msr(MSR_IA32_TSC)) {
        (Some(deadline), Some(tsc)) if deadline != 0 => Some(deadline.wrapping_sub(tsc) as i64),
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
        timer_count: reg(APIC_TIMER_CURRENT_COUNT),
        tsc_deadline,
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
            match (v.tsc_deadline, v.deadline_in_ticks) {
                (_, Some(t)) => format!(" (deadline {t} TSC ticks ahead)"),
                (Some(0), _) => " (deadline 0: disarmed, or fired and not yet taken)".into(),
                _ if matches!(v.timer, "one-shot" | "periodic") =>
                    format!(" (count {})", v.timer_count),
                _ => String::new(),
            }
        );
    }
    for p in &guest.ioapic {
        let _ = writeln!(
            out,
            "ioapic pin {}: vector {} to APIC {}, {}{}{}{}",
            p.pin,
            p.vector,
            p.destination,
            if p.level_triggered { "level" } else { "edge" },
            if p.remote_irr { ", remote IRR" } else { "" },
            if p.asserted { ", asserted" } else { "" },
            if p.masked { ", masked" } else { "" },
        );
    }
    for (i, d) in guest.devices.iter().enumerate() {
        let _ = writeln!(
            out,
            "device {i} {}: status {:#x}, interrupt status {}",
            d.kind, d.status, d.interrupt_status
        );
        for q in &d.queues {
            let _ = write!(
                out,
                "  queue {} ({} entries): daemon next {}",
                q.index, q.size, q.daemon_next
            );
            let _ = match &q.ring {
                None => writeln!(out, ", ring outside guest memory"),
                Some(r) => writeln!(
                    out,
                    ", guest avail {}, device used {}{}{}",
                    r.avail,
                    r.used,
                    r.used_event
                        .zip(r.avail_event)
                        .map(|(u, a)| format!(", used_event {u}, avail_event {a}"))
                        .unwrap_or_default(),
                    if r.no_interrupt {
                        ", interrupts suppressed"
                    } else {
                        ""
                    }
                ),
            };
        }
    }
    out
}
