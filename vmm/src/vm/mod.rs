//! A microVM: its configuration, its set-up on KVM, and running it until the
//! guest ends.
//!
//! [`Vm::new`] does all host-side set-up (KVM, guest memory, kernel,
//! devices, vCPUs) and fails with a [`VmError`] that names what was wrong;
//! [`Vm::run`] starts the vCPU threads and waits on the calling thread for
//! the guest to power off, reset, panic or die.

mod builder;
mod control;
mod devices;
mod restore;
mod save;

use self::devices::*;

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
use crate::devices::virtio::mmio::{Irq, MmioTransport};
use crate::devices::virtio::net::{Net, NetError, NetHandle, TYPE_NET};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{TYPE_VSOCK, Vsock};
use crate::devices::{Bus, BusError, lock};
use crate::host;
use crate::layout::{self, KVM_TSS_ADDR, SERIAL_IRQ};
use crate::snapshot::{self, SnapshotError, VcpuState, VirtioSlot, VmState};
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
    /// A file, created or truncated, that keeps its newest `limit` bytes
    /// (devices/console_log.rs).
    File(PathBuf, u64),
}

/// What to boot and how big.
#[derive(Debug)]
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
    /// Network slots: virtio-net devices after the shares, the guest's
    /// `eth0`, `eth1`, ... A slot with no TAP drops what the guest sends;
    /// a TAP is bound at start ([`Self::taps`]), at restore, or later
    /// through the API (`attach_net`).
    pub nets: u8,
    /// TAPs bound at start: (slot, descriptor).
    pub taps: Taps,
}

/// TAP descriptors for network slots: (slot, descriptor).
pub type Taps = Vec<(u8, std::os::fd::OwnedFd)>;

/// The most network slots a VM has (the GSIs left after the other
/// devices' slots).
pub const MAX_NETS: u8 = 4;

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
    /// A network slot's device or TAP cannot be set up.
    #[error("network slot {0}")]
    Net(u8, #[source] NetError),
    /// A TAP was given for a slot the VM does not have.
    #[error("a TAP was given for network slot {slot}, but this VM has {nets} (slots 0 to {})", .nets.saturating_sub(1))]
    NoSuchNet {
        /// The slot asked for.
        slot: u8,
        /// How many the VM has.
        nets: u8,
    },
    /// More network slots than the VM can have.
    #[error("{0} network slots asked for: a VM has at most {MAX_NETS}")]
    TooManyNets(u8),
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

/// The debug-port mark the agent's ready signal is recorded as.
pub use husk_protocol::READY_MARK;

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
        Console::File(path, limit) => Box::new(crate::devices::console_log::CappedLog::new(
            crate::devices::console_log::create(path)
                .map_err(|e| VmError::ConsoleFile(path.clone(), e))?,
            *limit,
        )),
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

impl Vm {
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
