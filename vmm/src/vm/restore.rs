//! Building a VM from a snapshot: memory mapped copy-on-write, devices
//! and vCPUs restored, shares bound again.

use super::*;

/// Guest memory mapped `MAP_PRIVATE` from a snapshot's memory file: pages
/// are shared with every other VM restored from it until written.
pub(super) fn map_snapshot_memory(
    path: &Path,
    memory_mib: u64,
) -> Result<GuestMemoryMmap, VmError> {
    let file = File::open(path).map_err(|source| {
        VmError::Snapshot(SnapshotError::Io(husk_sys::PathError {
            what: "open",
            path: path.to_owned(),
            source,
        }))
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
        mut taps: Taps,
        clock: Arc<Clock>,
    ) -> Result<Self, VmError> {
        let (state, mem_path) = snapshot::read(dir)?;
        let nets = state.virtio.iter().filter(|s| s.net_slot.is_some()).count() as u8;
        check_taps(&taps, nets)?;
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
            Some((&state, dir)),
        )?;
        let mut mmio = Bus::new();
        let mut virtio = Vec::new();
        let mut hosts = Hosts::default();
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
                    &mut hosts,
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
            if let (TYPE_NET, Some(net)) = (slot.transport.device_type, slot.net_slot) {
                // A slot without a TAP now is no error: one may be bound
                // through the API once the container's network is known.
                let tap = take_tap(&mut taps, net);
                virtio.push(attach_net(
                    &vm,
                    &mut mmio,
                    &memory,
                    net,
                    tap,
                    slot.base,
                    slot.gsi,
                    Some((&slot.transport, dir)),
                    &mut hosts,
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
        hosts.start()?;
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
}
