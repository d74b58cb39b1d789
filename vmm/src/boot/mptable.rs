//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI
//! learns its CPUs, its IOAPIC and how ISA interrupts are routed.
//!
//! No crate among the rust-vmm set writes one (Firecracker and Cloud
//! Hypervisor keep theirs inside their VMMs), so Husk builds it here: a
//! floating pointer in the EBDA followed by the configuration table.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{EBDA_START, HIGH_MEMORY_START, IOAPIC_ADDR, LAPIC_ADDR};

/// Number of IOAPIC pins the in-kernel irqchip has.
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const MP_IRQDIR_DEFAULT: u16 = 0;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINTERRUPT: u8 = 3;
const ENTRY_LOCALINTERRUPT: u8 = 4;
const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;

/// Errors writing the MP table.
#[derive(Debug, Error)]
pub enum MpTableError {
    /// More vCPUs than APIC IDs the table can name.
    #[error("{0} vCPUs do not fit in an MP table (at most 254)")]
    TooManyCpus(u8),
    /// The table does not fit below the BIOS area.
    #[error("MP table of {0} bytes does not fit in the EBDA")]
    TooLarge(usize),
    /// Guest memory refused the write.
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The IOAPIC's ID: one past the last CPU's APIC ID.
fn ioapic_id(cpus: u8) -> u8 {
    cpus + 1
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The bytes of the configuration table (header and entries) for `cpus`.
fn config_table(cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC).
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id(cpus), IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        let kind = if pin == 0 { MP_EXTINT } else { MP_INT };
        entries.push(ENTRY_IOINTERRUPT);
        entries.push(kind);
        entries.extend_from_slice(&MP_IRQDIR_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[0, pin, ioapic_id(cpus), pin]);
        count += 1;
    }
    for (kind, lint) in [(MP_EXTINT, 0u8), (MP_NMI, 1u8)] {
        entries.push(ENTRY_LOCALINTERRUPT);
        entries.push(kind);
        entries.extend_from_slice(&MP_IRQDIR_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[0, 0, 0xff, lint]);
        count += 1;
    }

    let length = (HEADER_SIZE + entries.len()) as u16;
    let mut table = Vec::with_capacity(length as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// The complete MP structure (floating pointer, then configuration table)
/// as it is placed at `EBDA_START`.
pub fn mptable_bytes(cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let table = config_table(cpus);
    let mut bytes = Vec::with_capacity(FLOATING_POINTER_SIZE + table.len());
    bytes.extend_from_slice(b"_MP_");
    let table_addr = (EBDA_START as usize + FLOATING_POINTER_SIZE) as u32;
    bytes.extend_from_slice(&table_addr.to_le_bytes());
    bytes.push(1); // length in 16-byte units
    bytes.push(4); // spec revision 1.4
    bytes.push(0); // checksum, below
    bytes.extend_from_slice(&[0; 5]); // feature bytes: a table is present
    bytes[10] = checksum(&bytes);
    bytes.extend_from_slice(&table);
    if EBDA_START as usize + bytes.len() > HIGH_MEMORY_START as usize {
        return Err(MpTableError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn setup_mptable<M: GuestMemory>(mem: &M, cpus: u8) -> Result<(), MpTableError> {
    let bytes = mptable_bytes(cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_hold_and_entries_are_counted() {
        for cpus in [1u8, 2, 8, 254] {
            let bytes = mptable_bytes(cpus).unwrap();
            assert_eq!(&bytes[0..4], b"_MP_");
            assert_eq!(sum(&bytes[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let table = &bytes[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "config table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(count, cpus as usize + 1 + 1 + 24 + 2);
            // Entry sizes: 20 bytes per processor, 8 for every other kind.
            assert_eq!(
                len,
                HEADER_SIZE + cpus as usize * 20 + (count - cpus as usize) * 8
            );
            // Exactly one boot processor, APIC IDs 0..cpus.
            let procs = &table[HEADER_SIZE..HEADER_SIZE + cpus as usize * 20];
            let bsp = procs
                .chunks(20)
                .filter(|p| p[3] & CPU_BOOTPROCESSOR != 0)
                .count();
            assert_eq!(bsp, 1);
            for (i, p) in procs.chunks(20).enumerate() {
                assert_eq!(p[0], ENTRY_PROCESSOR);
                assert_eq!(p[1] as usize, i);
            }
        }
    }

    #[test]
    fn refuses_impossible_cpu_counts() {
        assert!(matches!(
            mptable_bytes(0),
            Err(MpTableError::TooManyCpus(0))
        ));
        assert!(matches!(
            mptable_bytes(255),
            Err(MpTableError::TooManyCpus(255))
        ));
    }
}
