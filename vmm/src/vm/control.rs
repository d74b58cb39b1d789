//! Running a VM: its vCPU threads, the wait for the guest's end, pause,
//! resume and the API requests.

use super::*;

impl Vm {
    /// Runs the guest until it ends. The vCPU threads are left blocked in
    /// KVM when this returns: the caller ends the process (the VMM binary
    /// does), which is the only way out of KVM_RUN without a signal.
    /// The boot times come back whatever the outcome.
    pub fn run(mut self) -> (Result<GuestExit, VmError>, BootTimes) {
        let ranges = self.guest_memory_ranges();
        let result = self.start_vcpus().and_then(|()| {
            // Every other thread runs now: the main thread's own filter,
            // and the stop signals are its to take.
            crate::confine::enter(crate::seccomp::Thread::Main);
            crate::stop::unblock();
            self.wait()
        });
        lock(&self.serial).flush();
        self.clock.exit(&ranges);
        let times = self.clock.snapshot();
        // The VM and guest memory must outlive the vCPU threads, which are
        // still in KVM_RUN: leak them, the process is about to end.
        std::mem::forget(self);
        (result, times)
    }

    pub(super) fn start_vcpus(&mut self) -> Result<(), VmError> {
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

    pub(super) fn wait(&self) -> Result<GuestExit, VmError> {
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
                        self.take_snapshot(&at.dir, None, false)?;
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
                VmEvent::Api(crate::api::ApiCall {
                    request,
                    fds,
                    reply,
                }) => {
                    let mut fds = fds.into_iter();
                    let response = match request {
                        ApiRequest::AttachNet { slot } => self.attach_net(slot, fds.next()),
                        ApiRequest::DetachNet { slot } => match self.net(slot) {
                            Ok(handle) => {
                                handle.unbind();
                                ApiResponse::ok()
                            }
                            Err(e) => e,
                        },
                        ApiRequest::Pause => self.pause(),
                        ApiRequest::Resume => self.resume(),
                        ApiRequest::Stop => {
                            let _ = reply.send(ApiResponse::ok());
                            return Ok(GuestExit::Stopped);
                        }
                        ApiRequest::Snapshot { dir } => {
                            // Files handed over are the sender's to remove
                            // on failure; a directory made here is ours.
                            let files = fds.next().zip(fds.next()).map(|(state, memory)| {
                                crate::snapshot::SnapshotFiles {
                                    state: state.into(),
                                    memory: memory.into(),
                                }
                            });
                            let handed = files.is_some();
                            match self.take_snapshot(&dir, files, true) {
                                Ok(()) => ApiResponse::ok(),
                                Err(VmError::VcpuDied(id, stop)) => {
                                    let _ = reply.send(ApiResponse::error(format!(
                                        "vCPU {id} stopped: {stop}"
                                    )));
                                    return Err(VmError::VcpuDied(id, stop));
                                }
                                Err(e) => {
                                    // Nothing half-written stays; the VM goes on
                                    // as it was (paused if it was).
                                    if !handed {
                                        let _ = std::fs::remove_dir_all(&dir);
                                    }
                                    ApiResponse::error(format!("{:#}", anyhow::Error::from(e)))
                                }
                            }
                        }
                    };
                    let _ = reply.send(response);
                }
            }
        }
    }

    /// The handle of network slot `slot`, or the answer naming why not.
    fn net(&self, slot: u8) -> Result<&NetHandle, ApiResponse> {
        let nets: Vec<&(u8, NetHandle)> =
            self.virtio.iter().filter_map(|d| d.net.as_ref()).collect();
        nets.iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, handle)| handle)
            .ok_or_else(|| {
                ApiResponse::error(format!(
                    "no network slot {slot}: this VM has {}",
                    nets.len()
                ))
            })
    }

    /// Binds the TAP `fd` to network slot `slot`.
    fn attach_net(&self, slot: u8, fd: Option<std::os::fd::OwnedFd>) -> ApiResponse {
        let handle = match self.net(slot) {
            Ok(handle) => handle,
            Err(answer) => return answer,
        };
        let Some(fd) = fd else {
            return ApiResponse::error("attach_net needs the TAP's descriptor");
        };
        match handle.bind(fd) {
            Ok(()) => ApiResponse::ok(),
            Err(e) => {
                ApiResponse::error(format!("network slot {slot}: {:#}", anyhow::Error::from(e)))
            }
        }
    }

    /// Stops every vCPU and returns once all have stopped.
    pub(super) fn pause(&self) -> ApiResponse {
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

    pub(super) fn resume(&self) -> ApiResponse {
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
}
