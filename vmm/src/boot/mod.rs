//! Loading the guest: the ELF kernel through its PVH entry point, the
//! initramfs, the command line, the PVH start info with the E820 map, the MP
//! table, and the boot vCPU's 32-bit protected-mode state.
//!
//! This module writes only guest memory and computes register values; it
//! never touches a vCPU or the VM itself.

pub mod kernel_file;
pub mod mptable;

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{self, Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, load_cmdline};
use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, GDT_ADDR, HIGH_MEMORY_START, IDT_ADDR, MMIO_GAP_START,
    START_INFO_ADDR, e820_map,
};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const PAGE_SIZE: u64 = 4096;
/// Module list and memory map follow the start info in the same page.
const MODLIST_ADDR: u64 = START_INFO_ADDR + 0x40;
const MEMMAP_ADDR: u64 = START_INFO_ADDR + 0x80;

/// Boot-time selectors: one flat 32-bit code and data segment and a TSS.
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// Errors loading the guest.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {}", .0.display())]
    OpenKernel(PathBuf, #[source] std::io::Error),
    /// The kernel file is not an ELF file at all.
    #[error(
        "kernel {} is not an ELF vmlinux (a bzImage or other format is not supported; \
         build one with kernel-config/build-kernel.sh)",
        .0.display()
    )]
    NotElf(PathBuf),
    /// The ELF file could not be loaded as a kernel.
    #[error("cannot load kernel {} into guest memory", .0.display())]
    LoadKernel(PathBuf, #[source] linux_loader::loader::Error),
    /// The ELF file has no PVH entry point.
    #[error(
        "kernel {} has no PVH entry point: it is not a Linux vmlinux built with CONFIG_PVH=y",
        .0.display()
    )]
    NoPvhEntry(PathBuf),
    /// The initramfs cannot be read.
    #[error("cannot read initramfs {}", .0.display())]
    ReadInitramfs(PathBuf, #[source] std::io::Error),
    /// The initramfs does not fit in guest memory beside the kernel.
    #[error(
        "initramfs {} ({size} bytes) does not fit in guest memory above the kernel; \
         give the guest more memory",
        .path.display()
    )]
    InitramfsTooLarge {
        /// The initramfs.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {0} to guest memory")]
    WriteGuest(&'static str),
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// Where the kernel was loaded and where the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// PVH entry point (32-bit protected mode, paging off).
    pub entry: GuestAddress,
    /// First byte past the kernel image.
    pub end: u64,
}

/// Loads the ELF kernel at `path` and returns its PVH entry point.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let file = File::open(path).map_err(|e| BootError::OpenKernel(path.to_owned(), e))?;
    let mut file = kernel_file::KernelFile::new(file);
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START))).map_err(
        |e| match e {
            linux_loader::loader::Error::Elf(
                elf::Error::InvalidElfMagicNumber | elf::Error::ReadElfHeader,
            ) => BootError::NotElf(path.to_owned()),
            other => BootError::LoadKernel(path.to_owned(), other),
        },
    )?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
            entry,
            end: loaded.kernel_end,
        }),
        _ => Err(BootError::NoPvhEntry(path.to_owned())),
    }
}

/// Places the initramfs at the top of low RAM, page aligned, and returns
/// its guest address and size. [`check_initramfs`] then makes sure it does
/// not reach down into the kernel (the two may be loaded in parallel).
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let data = std::fs::read(path).map_err(|e| BootError::ReadInitramfs(path.to_owned(), e))?;
    let size = data.len() as u64;
    let top = mem_size.min(MMIO_GAP_START);
    let addr = top
        .checked_sub(size)
        .filter(|&a| a >= HIGH_MEMORY_START)
        .ok_or_else(|| BootError::InitramfsTooLarge {
            path: path.to_owned(),
            size,
        })?
        & !(PAGE_SIZE - 1);
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|_| BootError::WriteGuest("the initramfs"))?;
    Ok((GuestAddress(addr), size))
}

/// Fails when the initramfs at `addr` overlaps the kernel ending at
/// `kernel_end`.
pub fn check_initramfs(
    path: &Path,
    (addr, size): (GuestAddress, u64),
    kernel_end: u64,
) -> Result<(), BootError> {
    if addr.raw_value() < kernel_end {
        return Err(BootError::InitramfsTooLarge {
            path: path.to_owned(),
            size,
        });
    }
    Ok(())
}

/// Writes the command line and the PVH start info (with the E820 map and the
/// initramfs as module 0).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    initramfs: Option<(GuestAddress, u64)>,
    mem_size: u64,
) -> Result<(), BootError> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|_| BootError::WriteGuest("the kernel command line"))?;

    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initramfs
        .map(|(addr, size)| hvm_modlist_entry {
            paddr: addr.raw_value(),
            size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .into_iter()
        .collect();

    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { MODLIST_ADDR },
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|_| BootError::WriteGuest("the PVH start info"))?;
    Ok(())
}

/// A GDT descriptor from its flags, base and limit (the layout the CPU reads).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The segment register KVM should load for a GDT descriptor.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granular = ((entry >> 55) & 1) as u8;
    let limit = if granular == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// The boot GDT: null, flat 32-bit code, flat data, TSS.
fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xc09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Writes the boot GDT and an empty IDT and returns the special registers
/// of the PVH entry state: protected mode, paging off, flat segments.
pub fn boot_sregs(mem: &GuestMemoryMmap, mut sregs: kvm_sregs) -> Result<kvm_sregs, BootError> {
    let gdt = boot_gdt();
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(|_| BootError::WriteGuest("the boot GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|_| BootError::WriteGuest("the boot IDT"))?;

    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment(gdt[1], CODE_SELECTOR);
    let data = segment(gdt[2], DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], TSS_SELECTOR);
    // PE and ET; no paging, no long mode: the PVH entry code sets those up.
    sregs.cr0 = 0x11;
    sregs.cr4 = 0;
    sregs.efer = 0;
    Ok(sregs)
}

/// General registers at the PVH entry point: %rbx holds the start info.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rbx: START_INFO_ADDR,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_are_flat_32_bit() {
        let gdt = boot_gdt();
        let cs = segment(gdt[1], CODE_SELECTOR);
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        assert_eq!((cs.type_, cs.db, cs.l, cs.s, cs.present), (0xb, 1, 0, 1, 1));
        let ds = segment(gdt[2], DATA_SELECTOR);
        assert_eq!((ds.type_, ds.db, ds.limit), (0x3, 1, 0xffff_ffff));
        let tr = segment(gdt[3], TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s, tr.limit), (0xb, 0, 0x67));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn start_info_and_memmap_land_where_the_guest_looks() {
        let mem_size = 64u64 << 20;
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        write_boot_params(
            &mem,
            "console=ttyS0",
            Some((GuestAddress(0x300_0000), 1234)),
            mem_size,
        )
        .unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(START_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries as usize, e820_map(mem_size).len());
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 1234));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                info.memmap_paddr + (u64::from(info.memmap_entries) - 1) * 24,
            ))
            .unwrap();
        assert_eq!(last.addr + last.size, mem_size);
        let mut cmdline = [0u8; 14];
        mem.read_slice(&mut cmdline, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cmdline, b"console=ttyS0\0");
        // The memory map must not run into the command line.
        assert!(info.memmap_paddr + u64::from(info.memmap_entries) * 24 <= CMDLINE_ADDR);
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_ram() {
        let mem_size = 32u64 << 20;
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        let dir = std::env::temp_dir().join(format!("husk-initrd-test-{}", std::process::id()));
        std::fs::write(&dir, vec![7u8; 10_000]).unwrap();
        let (addr, size) = load_initramfs(&mem, &dir, mem_size).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert!(addr.raw_value() + size <= mem_size);
        check_initramfs(&dir, (addr, size), 0x100_0000).unwrap();
        let err = check_initramfs(&dir, (addr, size), mem_size - 4096).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        std::fs::remove_file(&dir).unwrap();
    }
}
