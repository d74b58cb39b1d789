//! The VM's device slots: which virtio device each MMIO slot holds, and
//! wiring a device to its transport, its interrupt and its host side.

use super::*;

/// A virtio-mmio device as the VM keeps it: where, on which GSI.
pub(super) struct VirtioDevice {
    pub(super) base: u64,
    pub(super) gsi: u32,
    pub(super) transport: Arc<Mutex<MmioTransport>>,
    /// A virtio-fs device's tag.
    pub(super) share_tag: Option<String>,
    /// A virtio-net device's slot, and the handle that binds its TAP.
    pub(super) net: Option<(u8, NetHandle)>,
}

/// Makes the virtio device of `device_type` (the ones a snapshot may hold).
pub(super) fn virtio_device(
    device_type: u32,
) -> Option<Box<dyn crate::devices::virtio::VirtioDevice>> {
    match device_type {
        crate::devices::virtio::rng::TYPE_RNG => Some(Box::new(Rng)),
        _ => None,
    }
}

/// Wires a virtio-mmio transport into the VM: its interrupt line and its
/// window.
pub(super) fn attach_virtio(
    vm: &VmFd,
    mmio: &mut Bus,
    base: u64,
    gsi: u32,
    make: impl FnOnce(Irq) -> Result<MmioTransport, VmError>,
) -> Result<VirtioDevice, VmError> {
    // SAFETY: the VM's descriptor is open for as long as `vm` lives,
    // which outlasts this call.
    let borrowed =
        unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(vm)) };
    let vm_fd = rustix::io::fcntl_dupfd_cloexec(borrowed, 0)
        .map_err(|e| VmError::EventFd("a virtio IRQ", e.into()))?;
    let irq = Irq::Line { vm: vm_fd, gsi };
    let transport = Arc::new(Mutex::new(make(irq)?));
    mmio.insert(transport.clone(), base, layout::MMIO_DEVICE_SIZE)?;
    Ok(VirtioDevice {
        base,
        gsi,
        transport,
        share_tag: None,
        net: None,
    })
}

/// A transport for `device`: new, or in the state `restored` holds (a
/// state that does not fit is the snapshot's error).
pub(super) fn transport(
    device: Box<dyn crate::devices::virtio::VirtioDevice>,
    memory: &GuestMemoryMmap,
    irq: Irq,
    restored: Option<(&crate::devices::virtio::mmio::MmioState, &Path)>,
) -> Result<MmioTransport, VmError> {
    match restored {
        None => Ok(MmioTransport::new(device, memory.clone(), irq)),
        Some((state, dir)) => {
            MmioTransport::restore(device, memory.clone(), irq, state).map_err(|why| {
                VmError::BadSnapshot {
                    dir: dir.to_owned(),
                    why: why.to_string(),
                }
            })
        }
    }
}

/// Device host sides whose thread starts once every device is attached
/// ([`Hosts::start`]): the vsock device's, which the network devices
/// attached after it are served on (no `husk-net` thread each: issue 18).
#[derive(Default)]
pub(super) struct Hosts {
    vsock: Option<(
        crate::devices::virtio::vsock::VsockHost,
        Arc<Mutex<MmioTransport>>,
    )>,
}

impl Hosts {
    /// Starts the threads.
    pub(super) fn start(self) -> Result<(), VmError> {
        if let Some((host, transport)) = self.vsock {
            host.start(transport).map_err(|e| VmError::Thread(0, e))?;
        }
        Ok(())
    }
}

/// Wires the vsock device: its transport (new, or restored from
/// `restored`), its host side (into `hosts`, to start later), and its
/// ready signal, which is recorded as the debug-port mark
/// [`husk_protocol`]'s `READY_MARK` would be.
#[allow(clippy::too_many_arguments)]
pub(super) fn attach_vsock(
    vm: &VmFd,
    mmio: &mut Bus,
    memory: &GuestMemoryMmap,
    devices: &Devices,
    clock: &Arc<Clock>,
    path: &Path,
    base: u64,
    gsi: u32,
    restored: Option<(&crate::devices::virtio::mmio::MmioState, &Path)>,
    hosts: &mut Hosts,
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
    hosts.vsock = Some((host, attached.transport.clone()));
    Ok(attached)
}

/// Wires a virtio-fs device serving `share` (new, or restored from
/// `restored`).
pub(super) fn attach_fs(
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

/// Wires network slot `slot`'s virtio-net device (new, or restored from
/// `restored`), its host side (served on the vsock device's thread where
/// `hosts` has one, else on a thread of its own, started now), and binds
/// `tap` if one is given.
#[allow(clippy::too_many_arguments)]
pub(super) fn attach_net(
    vm: &VmFd,
    mmio: &mut Bus,
    memory: &GuestMemoryMmap,
    slot: u8,
    tap: Option<std::os::fd::OwnedFd>,
    base: u64,
    gsi: u32,
    restored: Option<(&crate::devices::virtio::mmio::MmioState, &Path)>,
    hosts: &mut Hosts,
) -> Result<VirtioDevice, VmError> {
    let (device, host) = Net::new().map_err(|e| VmError::Net(slot, NetError::from(e)))?;
    let mut attached = attach_virtio(vm, mmio, base, gsi, |irq| {
        transport(Box::new(device), memory, irq, restored)
    })?;
    let handle = match &mut hosts.vsock {
        Some((vsock, _)) => {
            let (handle, polled) = host.polled(attached.transport.clone());
            vsock
                .serve_also(polled)
                .map_err(|e| VmError::Net(slot, NetError::from(e)))?;
            handle
        }
        None => host
            .start(attached.transport.clone())
            .map_err(|e| VmError::Net(slot, NetError::from(e)))?,
    };
    if let Some(tap) = tap {
        handle.bind(tap).map_err(|e| VmError::Net(slot, e))?;
    }
    attached.net = Some((slot, handle));
    Ok(attached)
}

/// Takes slot `slot`'s TAP out of `taps`, if one was given.
pub(super) fn take_tap(taps: &mut Taps, slot: u8) -> Option<std::os::fd::OwnedFd> {
    let at = taps.iter().position(|(s, _)| *s == slot)?;
    Some(taps.swap_remove(at).1)
}

/// Refuses TAPs for slots the VM will not have.
pub(super) fn check_taps(taps: &Taps, nets: u8) -> Result<(), VmError> {
    if nets > MAX_NETS {
        return Err(VmError::TooManyNets(nets));
    }
    match taps.iter().find(|(slot, _)| *slot >= nets) {
        Some(&(slot, _)) => Err(VmError::NoSuchNet { slot, nets }),
        None => Ok(()),
    }
}

/// The devices and the channel they report on, made during set-up.
pub(super) struct Devices {
    pub(super) pio: Bus,
    pub(super) serial: Arc<Mutex<SerialConsole>>,
    pub(super) events: Receiver<VmEvent>,
    pub(super) events_tx: Sender<VmEvent>,
    pub(super) ended: Arc<AtomicBool>,
    pub(super) control: Arc<VcpuControl>,
}
