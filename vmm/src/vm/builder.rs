//! Building a new VM: KVM, guest memory, the kernel, devices and vCPUs.

use super::*;

impl Vm {
    /// Sets up a VM for `config`: everything short of running it.
    pub fn new(mut config: VmConfig, clock: Arc<Clock>) -> Result<Self, VmError> {
        check_memory(config.memory_mib, host::total_memory_mib())?;
        check_taps(&config.taps, config.nets)?;
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
        let mut hosts = Hosts::default();
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
                &vm, &mut mmio, &memory, &devices, &clock, path, base, gsi, None, &mut hosts,
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
        for net in 0..config.nets {
            let slot = virtio.len() as u64;
            let base = layout::MMIO_START + slot * layout::MMIO_DEVICE_SIZE;
            let gsi = layout::IRQ_BASE + slot as u32;
            let tap = take_tap(&mut config.taps, net);
            virtio.push(attach_net(
                &vm, &mut mmio, &memory, net, tap, base, gsi, None, &mut hosts,
            )?);
            device_args.push_str(&format!(
                " virtio_mmio.device={}K@{base:#x}:{gsi}",
                layout::MMIO_DEVICE_SIZE >> 10
            ));
        }
        hosts.start()?;
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

    #[allow(clippy::too_many_arguments)]
    pub(super) fn assemble(
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
    pub(super) fn setup_devices_and_vcpus(
        count: u8,
        kvm: &Kvm,
        vm: &VmFd,
        clock: &Arc<Clock>,
        console_out: Box<dyn Write + Send>,
        restored: Option<(&VmState, &Path)>,
    ) -> Result<(Devices, Vec<VcpuFd>), VmError> {
        let (events_tx, events) = channel();
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::EventFd("the serial IRQ", e))?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| VmError::Kvm("wire the serial IRQ", e))?;
        let serial = match restored {
            None => SerialConsole::new(serial_irq, console_out),
            Some((state, dir)) => SerialConsole::from_regs(serial_irq, console_out, &state.serial)
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

        // A restored vCPU gets the CPUID table it was saved with, and the
        // rest of its state later (cpu::restore_vcpu); a booted one is
        // configured from what the host supports.
        enum Cpuid<'a> {
            Supported(kvm_bindings::CpuId),
            Saved(&'a [VcpuState]),
        }
        let cpuid = match restored {
            Some((state, _)) => Cpuid::Saved(&state.vcpus),
            None => Cpuid::Supported(
                kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .map_err(|e| VmError::Kvm("read the supported CPUID", e))?,
            ),
        };
        let mut vcpus = Vec::with_capacity(count as usize);
        for id in 0..count {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| VmError::Kvm("create a vCPU", e))?;
            match &cpuid {
                Cpuid::Supported(supported) => cpu::configure_vcpu(&vcpu, supported, id, count)?,
                Cpuid::Saved(saved) => cpu::restore_cpuid(&vcpu, &saved[usize::from(id)], id)?,
            }
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
}
