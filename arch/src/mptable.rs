//! The Intel MultiProcessor Specification 1.4 table, so a kernel without ACPI
//! finds its CPUs, the IOAPIC and how ISA IRQs are routed.
//!
//! Placed at the EBDA ([`EBDA_START`]): the floating pointer structure first
//! (Linux scans the first KiB of the EBDA for `_MP_`), the configuration table
//! right after it.

use crate::layout::{EBDA_START, IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in an MP table (1 to 254)")]
    TooManyCpus(u32),
}

/// A built MP table: the bytes to write at [`MpTable::address`].
pub struct MpTable {
    pub address: u64,
    pub bytes: Vec<u8>,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The IOAPIC's APIC ID: after the CPUs' LAPIC IDs.
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// Build the MP table for `cpus` vCPUs (LAPIC IDs 0..cpus).
pub fn build(cpus: u32) -> Result<MpTable, MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = ioapic_id(cpus as u8);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus as u8 {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS as u8 {
        // type, irqtype, irqflag (le16: conforming), srcbus, srcbusirq, dstapic, dstirq
        entries.extend_from_slice(&[ENTRY_INTSRC, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let fp_len = 16usize;
    let table_addr = EBDA_START + fp_len as u64;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"BLIMP   ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // ext table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(fp_len);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(MPC_SPEC_REV);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: 0 = configuration table present
    fp[10] = checksum(&fp);

    let mut bytes = fp;
    bytes.extend_from_slice(&table);
    Ok(MpTable {
        address: EBDA_START,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u32, 2, 8, 254] {
            let t = build(cpus).unwrap();
            assert_eq!(&t.bytes[0..4], b"_MP_");
            assert_eq!(sum(&t.bytes[0..16]), 0, "floating pointer checksum");
            let phys = u32::from_le_bytes(t.bytes[4..8].try_into().unwrap()) as u64;
            assert_eq!(phys, t.address + 16);
            let table = &t.bytes[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "config table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]) as u32;
            assert_eq!(count, cpus + 1 + 1 + 24 + 2);
            // Processor entries come first; only CPU 0 is the BSP.
            assert_eq!(table[44], ENTRY_PROCESSOR);
            assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
            if cpus > 1 {
                assert_eq!(table[64 + 3], CPU_ENABLED);
            }
        }
    }

    #[test]
    fn cpu_count_bounds() {
        assert_eq!(build(0).err(), Some(MpTableError::TooManyCpus(0)));
        assert_eq!(build(255).err(), Some(MpTableError::TooManyCpus(255)));
    }
}
