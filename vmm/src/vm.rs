//! A microVM: its configuration, its set-up on KVM, and running it until the
//! guest ends.
//!
//! [`Vm::new`] does all host-side set-up (KVM, guest memory, kernel,
//! devices, vCPUs) and fails with a [`VmError`] that names what was wrong;
//! [`Vm::run`] starts the vCPU threads and waits on the calling thread for
//! the guest to power off, reset, panic or die.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiRequest, ApiResponse};
use crate::boot::{self, BootError};
use crate::cpu::{self, CpuError};
use crate::devices::legacy::{DEBUG_PORT, DebugPort, GuestEvent, I8042_DATA_PORT, I8042Reset};
use crate::devices::serial::SerialConsole;
use crate::devices::virtio::fs::{Fs, Share, TYPE_FS};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{TYPE_VSOCK, Vsock};
use crate::devices::{Bus, BusError, lock};
use crate::host;
use crate::layout::{self, KVM_TSS_ADDR, SERIAL_IRQ};
use crate::snapshot::{self, SerialRegs, SnapshotError, VcpuState, VirtioSlot, VmState};
use crate::timing::{BootTimes, Clock};
use crate::vcpu::{VcpuControl, VcpuStop, VcpuThread};

/// The smallest guest Husk boots: the kernel loads at 16 MiB and needs
/// room above it for itself, its page tables and an initramfs.
pub const MIN_MEMORY_MIB: u64 = 64;
/// COM1's port window.
const SERIAL_PORT: u64 = 0x3f8;
/// How long to wait for the reset that follows a guest panic.
const PANIC_GRACE: Duration = Duration::from_secs(2);

/// Arguments every guest gets before the user's: the serial console,
/// reboot through the keyboard controller (the VMM sees it), reboot at once
/// on panic, and no probes, calibrations or boot-time patching a microVM
/// does not need (`noreplace-smp`: a 1-vCPU guest would otherwise rewrite
/// every `lock` prefix in the kernel, one text_poke each).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 io_delay=none \
     tsc=reliable no_timer_check nowatchdog noreplace-smp";

/// Where the guest's console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
}

/// What to boot and how big.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// ELF vmlinux with a PVH entry point.
    pub kernel: PathBuf,
    /// newc cpio archive given to the kernel as its initramfs.
    pub initramfs: Option<PathBuf>,
    /// Appended to [`DEFAULT_CMDLINE`] (and the host's work-arounds).
    pub extra_cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Console destination.
    pub console: Console,
    /// Snapshot the VM, and end, when the guest writes this debug-port mark.
    pub snapshot_at: Option<SnapshotAt>,
    /// Give the guest a virtio-rng device (entropy from the host). On by
    /// default: the guest then has entropy at boot.
    pub rng: bool,
    /// Give the guest a virtio-vsock device (CID [`GUEST_CID`]) whose host
    /// side listens on this Unix socket.
    pub vsock: Option<PathBuf>,
    /// Host directories shared with the guest over virtio-fs, one device
    /// each, in this order.
    pub shares: Vec<Share>,
}

/// The guest's vsock CID.
pub const GUEST_CID: u64 = 3;

/// When and where to take a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotAt {
    /// The debug-port value that triggers it (0x02: init was executed).
    pub mark: u8,
    /// The snapshot directory.
    pub dir: PathBuf,
}

/// Errors setting up or running a VM. Each names what failed.
#[derive(Debug, Error)]
pub enum VmError {
    /// There is no /dev/kvm.
    #[error(
        "/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, \
         or run on a machine with virtualization enabled)"
    )]
    NoKvm,
    /// /dev/kvm cannot be opened by this user.
    #[error("permission denied opening /dev/kvm: run as root or as a member of the kvm group")]
    KvmPermission,
    /// /dev/kvm failed to open otherwise.
    #[error("cannot open /dev/kvm")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// Guest memory below the minimum.
    #[error("guest memory of {0} MiB is too small: Husk needs at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    /// Guest memory above what the host has.
    #[error("guest memory of {0} MiB is more than this host has ({1} MiB)")]
    MemoryTooLarge(u64, u64),
    /// A vCPU count KVM or the MP table cannot take.
    #[error("{0} vCPUs requested: Husk boots 1 to {1}")]
    VcpuCount(u8, u8),
    /// The console file cannot be created.
    #[error("cannot create console file {}", .0.display())]
    ConsoleFile(PathBuf, #[source] std::io::Error),
    /// Guest memory cannot be allocated.
    #[error("cannot allocate {0} MiB of guest memory")]
    GuestMemory(u64, #[source] vm_memory::mmap::FromRangesError),
    /// A KVM set-up call failed.
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// An eventfd could not be made.
    #[error("cannot create an eventfd for {0}")]
    EventFd(&'static str, #[source] std::io::Error),
    /// A device could not be placed on its bus.
    #[error("cannot place a device on the bus")]
    Bus(#[from] BusError),
    /// Loading the guest failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Configuring a vCPU failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A vCPU thread could not be started.
    #[error("cannot start vCPU thread {0}")]
    Thread(u8, #[source] std::io::Error),
    /// The guest kernel panicked.
    #[error("the guest kernel panicked (its console shows why)")]
    GuestPanic,
    /// A vCPU could not go on.
    #[error("guest vCPU {0} died: {1}")]
    VcpuDied(u8, VcpuStop),
    /// A snapshot could not be read or written.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A snapshot's state is not one KVM or the devices accept.
    #[error("snapshot {} cannot be restored: {why}", .dir.display())]
    BadSnapshot {
        /// The snapshot directory (or its memory file).
        dir: PathBuf,
        /// What KVM or a device refused.
        why: String,
    },
    /// A virtio-fs share cannot be served.
    #[error("virtio-fs")]
    Share(#[source] crate::devices::virtio::fs::ShareError),
    /// The vsock device's Unix socket cannot be made.
    #[error("cannot listen on vsock socket {}", .0.display())]
    VsockSocket(PathBuf, #[source] std::io::Error),
    /// Saving the VM's state failed.
    #[error("cannot take the snapshot: {0}")]
    SaveFailed(String),
}

/// How the guest ended when it ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted; a microVM ends there.
    Reset,
    /// The VM was snapshotted at the requested mark and ended.
    Snapshotted,
    /// The VM was stopped through the API socket.
    Stopped,
}

/// What the VMM's owner hears from devices and vCPU threads.
enum VmEvent {
    Guest(GuestEvent),
    VcpuStopped(u8, VcpuStop),
    VcpuSaved(u8, Box<Result<VcpuState, CpuError>>),
    VcpuPaused(u8),
    Api(crate::api::ApiCall),
}

/// A virtio-mmio device as the VM keeps it: where, on which GSI.
struct VirtioDevice {
    base: u64,
    gsi: u32,
    transport: Arc<Mutex<MmioTransport>>,
    /// A virtio-fs device's tag.
    share_tag: Option<String>,
}

/// Makes the virtio device of `device_type` (the ones a snapshot may hold).
fn virtio_device(device_type: u32) -> Option<Box<dyn crate::devices::virtio::VirtioDevice>> {
    match device_type {
        crate::devices::virtio::rng::TYPE_RNG => Some(Box::new(Rng)),
        _ => None,
    }
}

/// Wires a virtio-mmio transport into the VM: its irqfd and its window.
fn attach_virtio(
    vm: &VmFd,
    mmio: &mut Bus,
    base: u64,
    gsi: u32,
    make: impl FnOnce(EventFd) -> Result<MmioTransport, VmError>,
) -> Result<VirtioDevice, VmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::EventFd("a virtio IRQ", e))?;
    vm.register_irqfd(&irq, gsi)
        .map_err(|e| VmError::Kvm("wire a virtio IRQ", e))?;
    let transport = Arc::new(Mutex::new(make(irq)?));
    mmio.insert(transport.clone(), base, layout::MMIO_DEVICE_SIZE)?;
    Ok(VirtioDevice {
        base,
        gsi,
        transport,
        share_tag: None,
    })
}

/// A transport for `device`: new, or in the state `restored` holds (a
/// state that does not fit is the snapshot's error).
fn transport(
    device: Box<dyn crate::devices::virtio::VirtioDevice>,
    memory: &GuestMemoryMmap,
    irq: EventFd,
    restored: Option<(&crate::devices::virtio::mmio::MmioState, &Path)>,
) -> Result<MmioTransport, VmError> {
    match restored {
        None => Ok(MmioTransport::new(device, memory.clone(), irq)),
        Some((state, dir)) => {
            MmioTransport::restore(device, memory.clone(), irq, state).map_err(|why| {
                VmError::BadSnapshot {
                    dir: dir.to_owned(),
                    why,
                }
            })
        }
    }
}

/// Wires the vsock device: its transport (new, or restored from
/// `restored`), its host thread, and its ready signal, which is recorded as
/// the debug-port mark [`husk_protocol`]'s `READY_MARK` would be.
#[allow(clippy::too_many_arguments)]
fn attach_vsock(
    vm: &VmFd,
    mmio: &mut Bus,
    memory: &GuestMemoryMmap,
    devices: &Devices,
    clock: &Arc<Clock>,
    path: &Path,
    base: u64,
    gsi: u32,
    restored: Option<(&crate::devices::virtio::mmio::MmioState, &Path)>,
) -> Result<VirtioDevice, VmError> {
    let (device, host) =
        Vsock::new(GUEST_CID, path).map_err(|e| VmError::VsockSocket(path.to_owned(), e))?;
    {
        let control = devices.control.clone();
        let tx = Mutex::new(devices.events_tx.clone());
        let clock = clock.clone();
        device.on_ready(Box::new(move || {
            clock.mark(READY_MARK);
            control.mark_written(READY_MARK);
            let _ = lock(&tx).send(VmEvent::Guest(GuestEvent::Mark(READY_MARK)));
        }));
    }
    let attached = attach_virtio(vm, mmio, base, gsi, |irq| {
        transport(Box::new(device), memory, irq, restored)
    })?;
    host.start(attached.transport.clone())
        .map_err(|e| VmError::Thread(0, e))?;
    Ok(attached)
}

/// Wires a virtio-fs device serving `share` (new, or restored from
/// `restored`).
fn attach_fs(
    vm: &VmFd,
    mmio: &mut Bus,
    memory: &GuestMemoryMmap,
    share: &Share,
    base: u64,
    gsi: u32,
    restored: Option<(&crate::devices::virtio::mmio::MmioState, &Path)>,
) -> Result<VirtioDevice, VmError> {
    let device = Fs::new(share).map_err(VmError::Share)?;
    let mut attached = attach_virtio(vm, mmio, base, gsi, |irq| {
        transport(Box::new(device), memory, irq, restored)
    })?;
    attached.share_tag = Some(share.tag.clone());
    Ok(attached)
}

/// The debug-port mark the agent's ready signal is recorded as.
pub use husk_protocol::READY_MARK;

/// The devices and the channel they report on, made during set-up.
struct Devices {
    pio: Bus,
    serial: Arc<Mutex<SerialConsole>>,
    events: Receiver<VmEvent>,
    events_tx: Sender<VmEvent>,
    ended: Arc<AtomicBool>,
    control: Arc<VcpuControl>,
}

/// A VM ready to run.
pub struct Vm {
    // Field order is drop order: vCPUs and devices go before the VM and
    // guest memory they refer to.
    vcpus: Vec<VcpuFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialConsole>>,
    events: Receiver<VmEvent>,
    events_tx: Sender<VmEvent>,
    ended: Arc<AtomicBool>,
    control: Arc<VcpuControl>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Events that arrived while a pause was waiting for its vCPUs.
    pending: std::cell::RefCell<std::collections::VecDeque<VmEvent>>,
    snapshot_at: Option<SnapshotAt>,
    virtio: Vec<VirtioDevice>,
    memory_mib: u64,
    clock: Arc<Clock>,
    cmdline: String,
    /// The virtio-fs shares, which bound what vCPU threads may reach.
    shares: Arc<Vec<Share>>,
    vm: VmFd,
    memory: GuestMemoryMmap,
}

/// Opens /dev/kvm, naming the usual reasons it fails.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::KvmOpen(e),
    })
}

/// The full kernel command line for `extra` on this host.
pub fn kernel_cmdline(extra: &str, emulated_kernel_mode: bool) -> String {
    let mut cmdline = String::from(DEFAULT_CMDLINE);
    if emulated_kernel_mode {
        cmdline.push(' ');
        cmdline.push_str(host::EMULATED_KERNEL_MODE_ARGS);
    }
    if !extra.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra.trim());
    }
    cmdline
}

fn check_memory(memory_mib: u64, host_mib: Option<u64>) -> Result<(), VmError> {
    if memory_mib < MIN_MEMORY_MIB {
        return Err(VmError::MemoryTooSmall(memory_mib));
    }
    match host_mib {
        Some(host) if memory_mib > host => Err(VmError::MemoryTooLarge(memory_mib, host)),
        _ => Ok(()),
    }
}

fn open_console(console: &Console) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match console {
        Console::Stdout => Box::new(std::io::stdout()),
        Console::File(path) => {
            Box::new(File::create(path).map_err(|e| VmError::ConsoleFile(path.clone(), e))?)
        }
    })
}

fn create_vm(kvm: &Kvm, vcpus: u8) -> Result<VmFd, VmError> {
    let max_vcpus = kvm.get_max_vcpus().min(254) as u8;
    if vcpus == 0 || vcpus > max_vcpus {
        return Err(VmError::VcpuCount(vcpus, max_vcpus));
    }
    kvm.create_vm()
        .map_err(|e| VmError::Kvm("create the VM", e))
}

/// Registers guest memory with KVM, then creates the in-kernel irqchip and
/// PIT. The order matters: once an irqchip exists, every memory slot change
/// waits for an SRCU grace period (milliseconds each).
fn register_memory_and_irqchip(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in memory.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which the
        // Vm keeps for as long as the VM fd exists (field order, and run()
        // leaks both).
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|e| VmError::Kvm("register guest memory with KVM", e))?;
    }
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(|e| VmError::Kvm("set the TSS address", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("create the in-kernel irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Kvm("create the in-kernel PIT", e))
}

/// Guest memory mapped `MAP_PRIVATE` from a snapshot's memory file: pages
/// are shared with every other VM restored from it until written.
fn map_snapshot_memory(path: &Path, memory_mib: u64) -> Result<GuestMemoryMmap, VmError> {
    let file = File::open(path).map_err(|source| {
        VmError::Snapshot(SnapshotError::Io {
            what: "open",
            path: path.to_owned(),
            source,
        })
    })?;
    let file = Arc::new(file);
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, size) in layout::ram_regions(memory_mib << 20) {
        let mapping = MmapRegionBuilder::new(size as usize)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| VmError::BadSnapshot {
                dir: path.to_owned(),
                why: format!("cannot map memory: {e}"),
            })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or_else(|| {
            VmError::BadSnapshot {
                dir: path.to_owned(),
                why: "memory region overflows".into(),
            }
        })?;
        regions.push(region);
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| VmError::BadSnapshot {
        dir: path.to_owned(),
        why: format!("memory layout: {e}"),
    })
}

impl Vm {
    /// Sets up a VM for `config`: everything short of running it.
    pub fn new(config: &VmConfig, clock: Arc<Clock>) -> Result<Self, VmError> {
        check_memory(config.memory_mib, host::total_memory_mib())?;
        // Fail on a bad console path before any KVM work.
        let console_out = open_console(&config.console)?;
        clock.setup_step("validate");
        let kvm = open_kvm()?;
        let vm = create_vm(&kvm, config.vcpus)?;
        clock.setup_step("create_vm");

        let mem_size = config.memory_mib << 20;
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_size)
            .into_iter()
            .map(|(start, size)| (GuestAddress(start), size as usize))
            .collect();
        let memory = GuestMemoryMmap::<()>::from_ranges(&ranges)
            .map_err(|e| VmError::GuestMemory(config.memory_mib, e))?;
        // Load the guest before KVM knows its memory: the kernel is mapped
        // from its file (boot::kernel_file), and replacing pages of a
        // registered slot would make KVM invalidate them.
        let kernel = boot::load_kernel(&memory, &config.kernel)?;
        let initramfs = match &config.initramfs {
            Some(path) => {
                let loaded = boot::load_initramfs(&memory, path, mem_size)?;
                boot::check_initramfs(path, loaded, kernel.end)?;
                Some(loaded)
            }
            None => None,
        };
        clock.setup_step("load_guest");
        register_memory_and_irqchip(&vm, &memory)?;
        clock.setup_step("kvm_memory_irqchip");

        let (devices, vcpus) =
            Self::setup_devices_and_vcpus(config.vcpus, &kvm, &vm, &clock, console_out, None)?;
        let mut mmio = Bus::new();
        let mut virtio = Vec::new();
        let mut device_args = String::new();
        if config.rng {
            let (base, gsi) = (layout::MMIO_START, layout::IRQ_BASE);
            virtio.push(attach_virtio(&vm, &mut mmio, base, gsi, |irq| {
                Ok(MmioTransport::new(Box::new(Rng), memory.clone(), irq))
            })?);
            // Announced on the command line: no PCI, no device tree.
            device_args = format!(
                "virtio_mmio.device={}K@{base:#x}:{gsi}",
                layout::MMIO_DEVICE_SIZE >> 10
            );
        }
        if let Some(path) = &config.vsock {
            let slot = virtio.len() as u64;
            let base = layout::MMIO_START + slot * layout::MMIO_DEVICE_SIZE;
            let gsi = layout::IRQ_BASE + slot as u32;
            virtio.push(attach_vsock(
                &vm, &mut mmio, &memory, &devices, &clock, path, base, gsi, None,
            )?);
            device_args.push_str(&format!(
                " virtio_mmio.device={}K@{base:#x}:{gsi}",
                layout::MMIO_DEVICE_SIZE >> 10
            ));
        }
        for share in &config.shares {
            let slot = virtio.len() as u64;
            let base = layout::MMIO_START + slot * layout::MMIO_DEVICE_SIZE;
            let gsi = layout::IRQ_BASE + slot as u32;
            virtio.push(attach_fs(&vm, &mut mmio, &memory, share, base, gsi, None)?);
            device_args.push_str(&format!(
                " virtio_mmio.device={}K@{base:#x}:{gsi}",
                layout::MMIO_DEVICE_SIZE >> 10
            ));
        }
        let extra = format!("{device_args} {}", config.extra_cmdline);
        let cmdline = kernel_cmdline(&extra, host::kernel_mode_emulated());
        boot::write_boot_params(&memory, &cmdline, initramfs, mem_size)?;
        boot::mptable::setup_mptable(&memory, config.vcpus).map_err(BootError::from)?;
        let bsp = &vcpus[0];
        let sregs = bsp
            .get_sregs()
            .map_err(|e| VmError::Kvm("read the boot vCPU's special registers", e))?;
        bsp.set_sregs(&boot::boot_sregs(&memory, sregs)?)
            .map_err(|e| VmError::Kvm("set the boot vCPU's special registers", e))?;
        bsp.set_regs(&boot::boot_regs(kernel.entry))
            .map_err(|e| VmError::Kvm("set the boot vCPU's registers", e))?;
        clock.setup_step("boot_params");
        Ok(Self::assemble(
            vm,
            memory,
            (devices, mmio, virtio),
            vcpus,
            clock,
            cmdline,
            config.memory_mib,
            config.snapshot_at.clone(),
            config.shares.clone(),
        ))
    }

    /// Restores the VM saved in the snapshot directory `dir`, ready to run
    /// from where it was.
    /// A snapshot whose guest has a vsock device needs `vsock`, the Unix
    /// socket for its host side (connections are not part of a snapshot).
    /// Each virtio-fs device of the snapshot is bound to the share of
    /// `shares` with its tag: the directory may differ from the one it was
    /// booted with (the guest must not have mounted it yet).
    pub fn restore(
        dir: &Path,
        console: &Console,
        vsock: Option<&Path>,
        shares: &[Share],
        clock: Arc<Clock>,
    ) -> Result<Self, VmError> {
        let (state, mem_path) = snapshot::read(dir)?;
        check_memory(state.memory_mib, host::total_memory_mib())?;
        let console_out = open_console(console)?;
        clock.setup_step("validate");
        let kvm = open_kvm()?;
        let count = u8::try_from(state.vcpus.len()).map_err(|_| VmError::BadSnapshot {
            dir: dir.to_owned(),
            why: "too many vCPUs".into(),
        })?;
        let vm = create_vm(&kvm, count)?;
        clock.setup_step("create_vm");
        let memory = map_snapshot_memory(&mem_path, state.memory_mib)?;
        clock.setup_step("map_memory");
        register_memory_and_irqchip(&vm, &memory)?;
        let bad = |what: &str, e: kvm_ioctls::Error| VmError::BadSnapshot {
            dir: dir.to_owned(),
            why: format!("{what}: {e}"),
        };
        if state.irqchips.len() != 3 {
            return Err(VmError::BadSnapshot {
                dir: dir.to_owned(),
                why: "irqchip state".into(),
            });
        }
        for chip in &state.irqchips {
            vm.set_irqchip(chip).map_err(|e| bad("irqchip", e))?;
        }
        vm.set_pit2(&state.pit).map_err(|e| bad("PIT", e))?;
        clock.setup_step("kvm_memory_irqchip");

        let (devices, vcpus) = Self::setup_devices_and_vcpus(
            count,
            &kvm,
            &vm,
            &clock,
            console_out,
            Some((&state.serial, dir)),
        )?;
        let mut mmio = Bus::new();
        let mut virtio = Vec::new();
        for slot in &state.virtio {
            if slot.transport.device_type == TYPE_VSOCK {
                let path = vsock.ok_or_else(|| VmError::BadSnapshot {
                    dir: dir.to_owned(),
                    why: "its guest has a vsock device: give --vsock-socket".into(),
                })?;
                virtio.push(attach_vsock(
                    &vm,
                    &mut mmio,
                    &memory,
                    &devices,
                    &clock,
                    path,
                    slot.base,
                    slot.gsi,
                    Some((&slot.transport, dir)),
                )?);
                continue;
            }
            if slot.transport.device_type == TYPE_FS {
                let tag = slot.share_tag.as_deref().unwrap_or_default();
                let share =
                    shares
                        .iter()
                        .find(|s| s.tag == tag)
                        .ok_or_else(|| VmError::BadSnapshot {
                            dir: dir.to_owned(),
                            why: format!(
                                "its guest has a virtio-fs share {tag:?}: give --share {tag}=DIR"
                            ),
                        })?;
                virtio.push(attach_fs(
                    &vm,
                    &mut mmio,
                    &memory,
                    share,
                    slot.base,
                    slot.gsi,
                    Some((&slot.transport, dir)),
                )?);
                continue;
            }
            let device =
                virtio_device(slot.transport.device_type).ok_or_else(|| VmError::BadSnapshot {
                    dir: dir.to_owned(),
                    why: format!("unknown virtio device type {}", slot.transport.device_type),
                })?;
            virtio.push(attach_virtio(&vm, &mut mmio, slot.base, slot.gsi, |irq| {
                transport(device, &memory, irq, Some((&slot.transport, dir)))
            })?);
        }
        for (id, (vcpu, saved)) in vcpus.iter().zip(&state.vcpus).enumerate() {
            cpu::restore_vcpu(vcpu, saved, id as u8)?;
        }
        for device in &virtio {
            lock(&device.transport).settle_after_restore();
        }
        // The clock last: guest time resumes where it stopped, not where
        // it would be had the snapshot kept running.
        let mut kvm_clock = state.clock;
        kvm_clock.flags = 0;
        vm.set_clock(&kvm_clock).map_err(|e| bad("clock", e))?;
        // The guest's TSC (its clocksource) runs on while a snapshot waits
        // in the cache, so a guest restored minutes later finds minutes
        // gone. Each vCPU is told it was paused by the host (kvmclock's
        // PVCLOCK_GUEST_STOPPED, KVM_KVMCLOCK_CTRL), and its watchdogs take
        // the gap for a pause: without it a two-vCPU guest's RCU stall
        // detector reported the idle vCPU as stalled and the container
        // never started (docs/snapshots.md). A guest that has not enabled
        // kvmclock refuses the call (EINVAL): nothing to tell it then.
        for vcpu in &vcpus {
            let _ = vcpu.kvmclock_ctrl();
        }
        clock.setup_step("vcpus");
        Ok(Self::assemble(
            vm,
            memory,
            (devices, mmio, virtio),
            vcpus,
            clock,
            state.cmdline,
            state.memory_mib,
            None,
            shares.to_vec(),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        vm: VmFd,
        memory: GuestMemoryMmap,
        (devices, mmio, virtio): (Devices, Bus, Vec<VirtioDevice>),
        vcpus: Vec<VcpuFd>,
        clock: Arc<Clock>,
        cmdline: String,
        memory_mib: u64,
        snapshot_at: Option<SnapshotAt>,
        shares: Vec<Share>,
    ) -> Self {
        let Devices {
            pio,
            serial,
            events,
            events_tx,
            ended,
            control,
        } = devices;
        if let Some(at) = &snapshot_at {
            control.save_on_mark(at.mark);
        }
        Self {
            vcpus,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            serial,
            events,
            events_tx,
            ended,
            control,
            threads: Vec::new(),
            pending: Default::default(),
            snapshot_at,
            virtio,
            memory_mib,
            clock,
            cmdline,
            shares: Arc::new(shares),
            vm,
            memory,
        }
    }

    /// The devices on the port-I/O bus and the vCPUs.
    fn setup_devices_and_vcpus(
        count: u8,
        kvm: &Kvm,
        vm: &VmFd,
        clock: &Arc<Clock>,
        console_out: Box<dyn Write + Send>,
        restored_serial: Option<(&SerialRegs, &Path)>,
    ) -> Result<(Devices, Vec<VcpuFd>), VmError> {
        let (events_tx, events) = channel();
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::EventFd("the serial IRQ", e))?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| VmError::Kvm("wire the serial IRQ", e))?;
        let serial = match restored_serial {
            None => SerialConsole::new(serial_irq, console_out),
            Some((regs, dir)) => SerialConsole::from_regs(serial_irq, console_out, regs)
                .ok_or_else(|| VmError::BadSnapshot {
                    dir: dir.to_owned(),
                    why: "serial FIFO".into(),
                })?,
        };
        let serial = Arc::new(Mutex::new(serial));
        let ended = Arc::new(AtomicBool::new(false));
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(|e| VmError::Kvm("read the MSR list", e))?
            .as_slice()
            .to_vec();
        let control = Arc::new(VcpuControl::new(msr_indices));
        let sink = |tx: &Sender<VmEvent>| {
            let tx = tx.clone();
            let ended = ended.clone();
            let control = control.clone();
            Box::new(move |e| {
                match e {
                    GuestEvent::Panic => {}
                    GuestEvent::Mark(mark) => control.mark_written(mark),
                    _ => ended.store(true, Ordering::Release),
                }
                // The receiver is gone only while the VMM is exiting.
                let _ = tx.send(VmEvent::Guest(e));
            }) as Box<dyn Fn(GuestEvent) + Send>
        };
        let mut pio = Bus::new();
        pio.insert(serial.clone(), SERIAL_PORT, 8)?;
        pio.insert(
            Arc::new(Mutex::new(DebugPort::new(clock.clone(), sink(&events_tx)))),
            DEBUG_PORT,
            1,
        )?;
        pio.insert(
            Arc::new(Mutex::new(I8042Reset::new(sink(&events_tx)))),
            I8042_DATA_PORT,
            5,
        )?;
        clock.setup_step("devices");

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("read the supported CPUID", e))?;
        let mut vcpus = Vec::with_capacity(count as usize);
        for id in 0..count {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| VmError::Kvm("create a vCPU", e))?;
            cpu::configure_vcpu(&vcpu, &supported, id, count)?;
            vcpus.push(vcpu);
        }
        let devices = Devices {
            pio,
            serial,
            events,
            events_tx,
            ended,
            control,
        };
        Ok((devices, vcpus))
    }

    /// The kernel command line the guest was given.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Host address ranges of guest memory (to tell the VMM's own memory
    /// from the guest's).
    pub fn guest_memory_ranges(&self) -> Vec<(u64, u64)> {
        self.memory
            .iter()
            .map(|r| (r.as_ptr() as u64, r.len()))
            .collect()
    }

    /// Runs the guest until it ends. The vCPU threads are left blocked in
    /// KVM when this returns: the caller ends the process (the VMM binary
    /// does), which is the only way out of KVM_RUN without a signal.
    /// The boot times come back whatever the outcome.
    pub fn run(mut self) -> (Result<GuestExit, VmError>, BootTimes) {
        let ranges = self.guest_memory_ranges();
        let result = self.start_vcpus().and_then(|()| {
            // Every other thread runs now: the main thread's own filter,
            // and the stop signals are its to take.
            crate::seccomp::enter(crate::seccomp::Thread::Main);
            crate::stop::unblock();
            self.wait()
        });
        lock(&self.serial).flush();
        self.clock.exit(crate::timing::rss_excluding(&ranges));
        let times = self.clock.snapshot();
        // The VM and guest memory must outlive the vCPU threads, which are
        // still in KVM_RUN: leak them, the process is about to end.
        std::mem::forget(self);
        (result, times)
    }

    fn start_vcpus(&mut self) -> Result<(), VmError> {
        crate::vcpu::install_kick_handler().map_err(|e| VmError::Thread(0, e))?;
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let tx = self.events_tx.clone();
            let saved_tx = self.events_tx.clone();
            let paused_tx = self.events_tx.clone();
            let thread = VcpuThread {
                id: id as u8,
                vcpu,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                clock: self.clock.clone(),
                ended: self.ended.clone(),
                control: self.control.clone(),
                on_stop: Box::new(move |id, stop| {
                    let _ = tx.send(VmEvent::VcpuStopped(id, stop));
                }),
                on_saved: Box::new(move |id, state| {
                    let _ = saved_tx.send(VmEvent::VcpuSaved(id, Box::new(state)));
                }),
                on_paused: Box::new(move |id| {
                    let _ = paused_tx.send(VmEvent::VcpuPaused(id));
                }),
                shares: self.shares.clone(),
            };
            let handle = thread.spawn().map_err(|e| VmError::Thread(id as u8, e))?;
            self.threads.push(handle);
        }
        Ok(())
    }

    fn wait(&self) -> Result<GuestExit, VmError> {
        let mut panicked = false;
        loop {
            let event = if panicked {
                match self.events.recv_timeout(PANIC_GRACE) {
                    Ok(event) => event,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                        return Err(VmError::GuestPanic);
                    }
                }
            } else if let Some(event) = self.pending.borrow_mut().pop_front() {
                event
            } else {
                match self.events.recv() {
                    Ok(event) => event,
                    Err(_) => return Err(VmError::GuestPanic),
                }
            };
            match event {
                VmEvent::Guest(GuestEvent::Panic) => panicked = true,
                _ if panicked => return Err(VmError::GuestPanic),
                VmEvent::Guest(GuestEvent::PowerOff) => return Ok(GuestExit::PowerOff),
                VmEvent::Guest(GuestEvent::Reset) => return Ok(GuestExit::Reset),
                VmEvent::Guest(GuestEvent::Mark(mark)) => {
                    if let Some(at) = &self.snapshot_at
                        && at.mark == mark
                    {
                        // The vCPUs were asked to save when the mark was
                        // written.
                        self.take_snapshot(&at.dir, false)?;
                        return Ok(GuestExit::Snapshotted);
                    }
                }
                VmEvent::VcpuStopped(id, stop) => return Err(VmError::VcpuDied(id, stop)),
                VmEvent::VcpuSaved(id, _) => {
                    return Err(VmError::SaveFailed(format!(
                        "vCPU {id} saved its state unasked"
                    )));
                }
                // A late answer to a pause that already completed.
                VmEvent::VcpuPaused(_) => {}
                VmEvent::Api((request, reply)) => {
                    let response = match request {
                        ApiRequest::Pause => self.pause(),
                        ApiRequest::Resume => self.resume(),
                        ApiRequest::Stop => {
                            let _ = reply.send(ApiResponse::ok());
                            return Ok(GuestExit::Stopped);
                        }
                        ApiRequest::Snapshot { dir } => match self.take_snapshot(&dir, true) {
                            Ok(()) => ApiResponse::ok(),
                            Err(VmError::VcpuDied(id, stop)) => {
                                let _ = reply
                                    .send(ApiResponse::error(format!("vCPU {id} stopped: {stop}")));
                                return Err(VmError::VcpuDied(id, stop));
                            }
                            Err(e) => {
                                // Nothing half-written stays; the VM goes on
                                // as it was (paused if it was).
                                let _ = std::fs::remove_dir_all(&dir);
                                ApiResponse::error(format!("{:#}", anyhow::Error::from(e)))
                            }
                        },
                    };
                    let _ = reply.send(response);
                }
            }
        }
    }

    /// Stops every vCPU and returns once all have stopped.
    fn pause(&self) -> ApiResponse {
        if self.control.paused() {
            return ApiResponse::ok();
        }
        self.control.request_pause();
        let mut stopped = vec![false; self.threads.len()];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while stopped.iter().any(|s| !s) {
            for (id, handle) in self.threads.iter().enumerate() {
                if !stopped[id] {
                    crate::vcpu::kick(handle);
                }
            }
            // Other events wait in a side queue until the pause is done.
            match self.events.recv_timeout(Duration::from_millis(2)) {
                Ok(VmEvent::VcpuPaused(id)) => stopped[id as usize] = true,
                Ok(other) => self.pending.borrow_mut().push_back(other),
                Err(_) => {}
            }
            if std::time::Instant::now() > deadline {
                return ApiResponse::error("the vCPUs did not stop within 5 s");
            }
        }
        ApiResponse::ok()
    }

    fn resume(&self) -> ApiResponse {
        self.control.resume();
        for handle in &self.threads {
            handle.thread().unpark();
        }
        ApiResponse::ok()
    }

    /// Serves the control socket at `path` for this VM (pause, resume, stop).
    pub fn serve_api(&self, path: &Path) -> Result<(), crate::api::ApiError> {
        let tx = Mutex::new(self.events_tx.clone());
        crate::api::serve(path, move |call| {
            let _ = lock(&tx).send(VmEvent::Api(call));
        })
    }

    /// Stops every vCPU where it is, collects their state, and writes the
    /// snapshot. The vCPUs stay stopped (paused) afterwards. `ask`: the
    /// vCPUs are asked to save now (else they were, by the guest's mark).
    fn take_snapshot(&self, dir: &Path, ask: bool) -> Result<(), VmError> {
        let was_paused = self.control.paused();
        if ask {
            self.control.request_save();
        }
        let mut saved: Vec<Option<VcpuState>> = (0..self.threads.len()).map(|_| None).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let gave_up = |why: VmError| {
            // Asked by the API: the VM goes on as it was.
            if ask && !was_paused {
                self.resume();
            }
            why
        };
        while saved.iter().any(Option::is_none) {
            // A vCPU that re-entered the guest before it saw the request
            // is kicked out of KVM_RUN by a signal, a paused one unparked;
            // repeat until all answer.
            for (id, handle) in self.threads.iter().enumerate() {
                if saved[id].is_none() {
                    crate::vcpu::kick(handle);
                    handle.thread().unpark();
                }
            }
            match self.events.recv_timeout(Duration::from_millis(2)) {
                Ok(VmEvent::VcpuSaved(id, state)) => {
                    let state =
                        (*state).map_err(|e| gave_up(VmError::SaveFailed(e.to_string())))?;
                    saved[id as usize] = Some(state);
                }
                Ok(VmEvent::VcpuStopped(id, stop)) => return Err(VmError::VcpuDied(id, stop)),
                // Other events wait until the snapshot is done.
                Ok(VmEvent::VcpuPaused(_)) | Err(RecvTimeoutError::Timeout) => {}
                Ok(other) => self.pending.borrow_mut().push_back(other),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(VmError::SaveFailed("the vCPU threads are gone".into()));
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(gave_up(VmError::SaveFailed(
                    "the vCPUs did not stop within 5 s".into(),
                )));
            }
        }
        let mut virtio = Vec::with_capacity(self.virtio.len());
        for d in &self.virtio {
            let transport = lock(&d.transport).save().map_err(|why| {
                gave_up(VmError::SaveFailed(format!(
                    "{why}; a snapshot cannot keep it"
                )))
            })?;
            virtio.push(VirtioSlot {
                base: d.base,
                gsi: d.gsi,
                transport,
                share_tag: d.share_tag.clone(),
            });
        }
        let e = |what: &str| {
            let what = what.to_owned();
            move |err: kvm_ioctls::Error| VmError::SaveFailed(format!("{what}: {err}"))
        };
        let mut irqchips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm.get_irqchip(&mut chip).map_err(e("irqchip"))?;
            irqchips.push(chip);
        }
        let state = VmState {
            memory_mib: self.memory_mib,
            cmdline: self.cmdline.clone(),
            vcpus: saved.into_iter().flatten().collect(),
            irqchips,
            pit: self.vm.get_pit2().map_err(e("PIT"))?,
            clock: self.vm.get_clock().map_err(e("clock"))?,
            serial: lock(&self.serial).regs(),
            virtio,
        };
        let regions: Vec<&[u8]> = self
            .memory
            .iter()
            .map(|r| {
                // SAFETY: every vCPU is stopped, so nothing writes guest
                // memory while we read it; the region is a live mapping of
                // exactly len() bytes owned by self.memory.
                unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) }
            })
            .collect();
        snapshot::write(dir, &state, &regions).map_err(|e| gave_up(e.into()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limits_are_checked_with_clear_errors() {
        assert!(check_memory(128, Some(24000)).is_ok());
        let small = check_memory(16, Some(24000)).unwrap_err();
        assert_eq!(
            small.to_string(),
            "guest memory of 16 MiB is too small: Husk needs at least 64 MiB"
        );
        let large = check_memory(30000, Some(24000)).unwrap_err();
        assert_eq!(
            large.to_string(),
            "guest memory of 30000 MiB is more than this host has (24000 MiB)"
        );
    }

    #[test]
    fn cmdline_adds_host_work_arounds_only_where_needed() {
        let plain = kernel_cmdline("init=/bin/sh", false);
        assert!(plain.starts_with(DEFAULT_CMDLINE));
        assert!(plain.ends_with(" init=/bin/sh"));
        assert!(!plain.contains("clearcpuid"));
        let emulated = kernel_cmdline("", true);
        assert!(emulated.contains("noxsave"));
        assert!(emulated.contains("husk_xstate=bounce"));
        assert!(!plain.contains("husk_xstate"));
        assert!(emulated.contains("clearcpuid=cx16"));
    }
}
