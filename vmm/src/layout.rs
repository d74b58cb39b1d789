//! The guest physical address map of a Husk microVM (x86_64).
//!
//! Everything the VMM places in guest memory has its address here, so that
//! the boot code, the device layer and docs/design.md agree on one map.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA (untouched)
//! 0x0000_0500  GDT (boot segments)          0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH start_info, module list, memory map
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE)
//! 0x0009_fc00  MP table (EBDA) .. 0x0010_0000 reserved (EBDA + BIOS area)
//! 0x0100_0000  kernel (ELF physical load address, 16 MiB)
//!   ...        free RAM; the initramfs sits at the top of low RAM
//! 0xc000_0000  MMIO gap: virtio-mmio devices from MMIO_START
//! 0xfec0_0000  IOAPIC        0xfee0_0000  LAPIC
//! 0x1_0000_0000 RAM above the gap, when the guest has more than 3 GiB
//! ```

/// GDT with the flat boot segments.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the kernel installs its own before it enables interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`, followed by the module list and the memory map.
pub const START_INFO_ADDR: u64 = 0x6000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line the guest kernel accepts (`COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte past the legacy BIOS area; RAM resumes here.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the 1 GiB hole below 4 GiB for device MMIO.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio device windows are allocated.
pub const MMIO_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// IOAPIC base (in-kernel irqchip).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// LAPIC base (in-kernel irqchip).
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS needs three pages of guest-physical space no RAM uses.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// First GSI free for devices after the legacy ISA interrupts.
pub const IRQ_BASE: u32 = 5;
/// COM1's interrupt.
pub const SERIAL_IRQ: u32 = 4;

// The fixed addresses must not overlap; checked when the crate compiles.
const _: () = {
    assert!(IDT_ADDR >= GDT_ADDR + 4 * 8);
    assert!(START_INFO_ADDR + 0x1000 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(IOAPIC_ADDR > MMIO_START && LAPIC_ADDR > IOAPIC_ADDR);
    assert!(KVM_TSS_ADDR > LAPIC_ADDR);
};

/// The RAM regions of a guest of `mem_size` bytes: below the MMIO gap and,
/// for a larger guest, the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// One entry of the guest's E820 memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The E820 map the guest is given for `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIGH_MEMORY_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in ram_regions(mem_size) {
        let start = start.max(HIGH_MEMORY_START);
        let end = if start == HIGH_MEMORY_START {
            size
        } else {
            start + size
        };
        map.push(E820Entry {
            addr: start,
            size: end - start,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_guest_is_one_region_below_the_gap() {
        assert_eq!(ram_regions(128 * MIB), vec![(0, 128 * MIB)]);
        let map = e820_map(128 * MIB);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr, HIGH_MEMORY_START);
        assert_eq!(map[2].addr + map[2].size, 128 * MIB);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 128 * MIB - (HIGH_MEMORY_START - EBDA_START));
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let mem = 4096 * MIB;
        assert_eq!(
            ram_regions(mem),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem - MMIO_GAP_START)]
        );
        let map = e820_map(mem);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(map[3].addr, MMIO_GAP_END);
        assert_eq!(map[3].size, mem - MMIO_GAP_START);
    }
}
