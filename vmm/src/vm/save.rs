//! Writing a snapshot of a paused VM.

use super::*;

impl Vm {
    /// Stops every vCPU where it is, collects their state, and writes the
    /// snapshot. The vCPUs stay stopped (paused) afterwards. `ask`: the
    /// vCPUs are asked to save now (else they were, by the guest's mark).
    /// Snapshots the VM into `dir`, or into `files` where the caller made
    /// them (then `dir` only names them in errors).
    pub(super) fn take_snapshot(
        &self,
        dir: &Path,
        files: Option<snapshot::SnapshotFiles>,
        ask: bool,
    ) -> Result<(), VmError> {
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
        // Every transport stays locked until the memory is written: the
        // device threads (vsock, net) write guest memory only under their
        // transport's lock, so none can deliver between a queue's saved
        // state and the memory that goes with it.
        let held: Vec<_> = self.virtio.iter().map(|d| lock(&d.transport)).collect();
        let mut virtio = Vec::with_capacity(self.virtio.len());
        for (d, transport) in self.virtio.iter().zip(&held) {
            let transport = transport.save().map_err(|why| {
                gave_up(VmError::SaveFailed(format!(
                    "{why}; a snapshot cannot keep it"
                )))
            })?;
            virtio.push(VirtioSlot {
                base: d.base,
                gsi: d.gsi,
                transport,
                share_tag: d.share_tag.clone(),
                net_slot: d.net.as_ref().map(|(slot, _)| *slot),
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
                // SAFETY: every vCPU is stopped and every device thread
                // waits for its transport's lock (`held`), so nothing
                // writes guest memory while we read it; the region is a
                // live mapping of exactly len() bytes owned by self.memory.
                unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) }
            })
            .collect();
        let written = match files {
            Some(files) => snapshot::write_files(files, dir, &state, &regions),
            None => snapshot::write(dir, &state, &regions),
        };
        drop(held);
        written.map_err(|e| gave_up(e.into()))?;
        Ok(())
    }
}
