//! The virtio device: the guest's queues, its configuration, and the
//! state a snapshot keeps.

use super::*;

/// The vsock device.
pub struct Vsock {
    pub(super) backend: Arc<Mutex<Backend>>,
    pub(super) config: [u8; 8],
}

impl Vsock {
    /// A device for guest CID `guest_cid` whose host side listens on
    /// `uds_path`. The socket is bound now; [`start`] runs its thread.
    pub fn new(guest_cid: u64, uds_path: &Path) -> std::io::Result<(Self, VsockHost)> {
        let listener = husk_sys::unix::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let kick = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, EV_LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, EV_KICK),
        )?;
        let backend = Arc::new(Mutex::new(Backend {
            guest_cid,
            uds_path: uds_path.to_owned(),
            conns: HashMap::new(),
            rx: VecDeque::new(),
            next_port: 1 << 30,
            epoll,
            kick,
            on_ready: None,
            scratch: Vec::new(),
        }));
        let host = VsockHost {
            backend: backend.clone(),
            listener,
            polled: Vec::new(),
        };
        Ok((
            Self {
                backend,
                config: guest_cid.to_le_bytes(),
            },
            host,
        ))
    }
}

impl Vsock {
    /// Calls `f` (on the vCPU thread that handles the packet) when the
    /// guest connects to [`READY_PORT`].
    pub fn on_ready(&self, f: Box<dyn Fn() + Send>) {
        lock(&self.backend).on_ready = Some(f);
    }
}

/// What a snapshot keeps of the device: which connections the guest had
/// open, so that the restored guest is told they are gone, and where the
/// host's port numbers had got to, so that no new connection takes an
/// old one's ports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    /// (host port, guest port) of each open connection.
    pub(super) open: Vec<Key>,
    pub(super) next_port: u32,
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn save_state(&self) -> Result<Option<DeviceState>, PersistError> {
        let backend = lock(&self.backend);
        let mut open: Vec<Key> = backend.conns.keys().copied().collect();
        open.sort_unstable();
        let state = VsockState {
            open,
            next_port: backend.next_port,
        };
        Ok(Some(DeviceState::Vsock(state)))
    }

    /// The host ends of the saved connections belonged to another
    /// process: the guest is sent a reset for each, before anything else.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        let DeviceState::Vsock(state) = state else {
            return Err(PersistError::NotMine { device: TYPE_VSOCK });
        };
        let mut backend = lock(&self.backend);
        for &key in &state.open {
            let rst = backend.hdr(key, OP_RST, 0);
            backend.rx.push_back((rst, Vec::new()));
        }
        backend.next_port = backend.next_port.max(state.next_port);
        Ok(())
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut backend = lock(&self.backend);
        let mut used = false;
        match index {
            TX => {
                while let Some(chain) = queue.pop_descriptor_chain(mem) {
                    let head = chain.head_index();
                    if let Ok(mut reader) = Reader::new(mem, chain) {
                        let mut hdr = [0u8; HDR_SIZE];
                        if reader.read_exact(&mut hdr).is_ok() {
                            let hdr = Hdr::parse(&hdr);
                            let len = (hdr.len as usize)
                                .min(reader.available_bytes())
                                .min(MAX_PKT);
                            let mut payload = vec![0u8; len];
                            if reader.read_exact(&mut payload).is_ok() {
                                backend.guest_packet(hdr, payload);
                            }
                        }
                    }
                    let _ = queue.add_used(mem, head, 0);
                    used = true;
                }
                // Answers for the guest go out through the rx queue, which
                // the host thread fills.
                if !backend.rx.is_empty() {
                    let _ = backend.kick.write(1);
                }
            }
            RX => {
                while let Some((mut hdr, mut payload)) = backend.rx.pop_front() {
                    let Some(chain) = queue.pop_descriptor_chain(mem) else {
                        backend.rx.push_front((hdr, payload));
                        break;
                    };
                    let head = chain.head_index();
                    let mut written = 0;
                    if let Ok(mut w) = Writer::new(mem, chain)
                        && w.available_bytes() > HDR_SIZE
                    {
                        // The guest's buffers are small (4 KiB in Linux):
                        // data that does not fit goes in the next one.
                        let room = w.available_bytes() - HDR_SIZE;
                        if payload.len() > room {
                            let rest = payload.split_off(room);
                            let rest_hdr = Hdr {
                                len: rest.len() as u32,
                                ..hdr
                            };
                            backend.rx.push_front((rest_hdr, rest));
                            hdr.len = payload.len() as u32;
                        }
                        if w.write_all(&hdr.bytes()).is_ok() && w.write_all(&payload).is_ok() {
                            written = (HDR_SIZE + payload.len()) as u32;
                        }
                    }
                    let _ = queue.add_used(mem, head, written);
                    used = true;
                }
            }
            _ => {}
        }
        used
    }
}

impl VsockHost {
    /// One turn of the host side's thread, on the caller's thread: the
    /// events epoll reports within `timeout_ms` (host clients connecting,
    /// host streams readable, writable or hung up) handled, then what
    /// waits for the guest delivered through `transport`. The steps of the
    /// thread's loop ([`VsockHost::start`]), for the fuzz targets (fuzz/,
    /// docs/fuzzing.md), which drive the device without its thread so that
    /// a run depends on its input alone.
    pub fn turn(&self, transport: &Mutex<MmioTransport>, timeout_ms: i32) {
        let mut events = [EpollEvent::default(); 64];
        let n = {
            let backend = lock(&self.backend);
            backend.epoll.wait(timeout_ms, &mut events).unwrap_or(0)
        };
        self.serve(transport, &events[..n]);
    }

    /// Handles what epoll reported (the thread's loop and [`Self::turn`]
    /// alike), then delivers what waits for the guest through `transport`.
    pub(super) fn serve(&self, transport: &Mutex<MmioTransport>, events: &[EpollEvent]) {
        let mut starved = false;
        for ev in events {
            let mut backend = lock(&self.backend);
            match ev.data() {
                EV_LISTENER => loop {
                    match self.listener.accept() {
                        Ok((stream, _)) => backend.host_connects(stream),
                        Err(e) => {
                            starved = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                            break;
                        }
                    }
                },
                EV_KICK => {
                    let _ = backend.kick.read();
                }
                data => {
                    let key = ((data >> 32) as u32, data as u32);
                    let set = ev.event_set();
                    if set.contains(EventSet::OUT) {
                        backend.flush(key);
                    }
                    if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                        backend.host_readable(key);
                    }
                }
            }
        }
        // Transport, then backend: the lock order of the vCPU threads too.
        if !lock(&self.backend).rx.is_empty() {
            lock(transport).notify_device(RX as u32);
        }
        // Out of descriptors (a guest holding them all through virtio-fs):
        // the listener stays readable and the client waits in its backlog;
        // wait a little instead of spinning on it.
        if starved {
            std::thread::sleep(crate::api::ACCEPT_RETRY);
        }
    }
}
