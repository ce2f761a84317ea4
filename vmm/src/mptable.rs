//! The Intel MultiProcessor table, which is how Linux finds its CPUs and the IOAPIC on a
//! machine without ACPI. Written into the EBDA, where Linux scans for `_MP_`.

use crate::layout::EBDA_START;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
pub const LAPIC_ADDRESS: u32 = 0xfee0_0000;
/// IOAPIC pins routed from ISA IRQs of the same number.
const IRQ_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MPC_SPEC: u8 = 4;
/// All tables together must fit the 1 KiB EBDA.
const EBDA_SIZE: usize = 1024;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6; FPU and APIC present.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("an MP table for {0} CPUs does not fit in the EBDA")]
    TooManyCpus(u8),
    #[error("writing the MP table: {0}")]
    Write(String),
}

/// Builds the floating pointer and configuration table for `cpus` CPUs, laid out at
/// `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, Error> {
    let ioapic_id = cpus; // after the LAPIC ids 0..cpus
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    count += 1;
    for irq in 0..IRQ_PINS {
        // type, irq type, flags (conforming), source bus, source irq, ioapic, pin
        entries.extend_from_slice(&[3, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 takes the PIC's ExtINT, LINT1 NMIs, on every local APIC (0xff).
    entries.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"MICROAGT");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&((base + 16) as u32).to_le_bytes());
    floating.extend_from_slice(&[1, MPC_SPEC, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    let mut out = floating;
    out.extend_from_slice(&table);
    if out.len() > EBDA_SIZE {
        return Err(Error::TooManyCpus(cpus));
    }
    Ok(out)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), Error> {
    let table = build(cpus, EBDA_START)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(|e| Error::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn tables_checksum_to_zero_and_point_at_each_other() {
        let t = build(4, EBDA_START).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
        let table_at = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(table_at, EBDA_START + 16);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0, "configuration table checksum");
        let entries = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(entries, 4 + 1 + 1 + 24 + 2);
        // First processor entry is the enabled boot processor with APIC id 0.
        assert_eq!(
            &table[44..48],
            &[0, 0, APIC_VERSION, CPU_ENABLED | CPU_BOOTPROCESSOR]
        );
        assert_eq!(&table[64..68], &[0, 1, APIC_VERSION, CPU_ENABLED]);
    }

    #[test]
    fn the_largest_machine_fits_the_ebda() {
        assert!(build(crate::config::MAX_CPUS, EBDA_START).is_ok());
        assert!(matches!(build(40, EBDA_START), Err(Error::TooManyCpus(40))));
    }
}
