//! The virtio device: its queues, and the state its vCPU side and its
//! thread share.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;

use virtio_queue::QueueOwnedT;

use super::*;

/// The network device.
pub struct Net {
    pub(super) backend: Arc<Mutex<Backend>>,
}

/// A bound TAP, and how the thread's epoll watches it.
pub(super) struct Bound {
    pub(super) tap: Tap,
    /// Its epoll data, new with each bind, so that a late event for an
    /// earlier TAP is not taken for this one's.
    pub(super) token: u64,
    /// In the epoll set.
    pub(super) registered: bool,
    /// Polled for input; else in the set with no events.
    pub(super) armed: bool,
    /// epoll reported a hang-up or an error. Those are reported even with
    /// no events asked for, so the TAP leaves the set; it is still read
    /// when the thread is kicked.
    pub(super) hung_up: bool,
    /// A read found its end or failed: it is read no more.
    pub(super) spent: bool,
}

/// What the device's vCPU side and its thread share. Lock order:
/// transport, then this.
pub(super) struct Backend {
    pub(super) bound: Option<Bound>,
    /// The token the next bind gets (0 is the kick's).
    pub(super) next_token: u64,
    /// What the driver accepted (valid while `active`).
    pub(super) acked: u64,
    /// The driver runs the device: DRIVER_OK, and no reset since.
    pub(super) active: bool,
    /// The driver's features changed since the TAP's offloads were set.
    pub(super) offloads_stale: bool,
    /// Set by the thread around its `notify_device(RX)`: a call of
    /// `process_queue(RX)` then is the host's turn to deliver, where one
    /// without it is the guest adding buffers.
    pub(super) host_turn: bool,
    /// The thread's last turn never reached the device (the driver's rx
    /// queue is not ready): the TAP is not polled until the guest or
    /// DRIVER_OK says otherwise.
    pub(super) rx_unreachable: bool,
    /// The length of the frame in `rx_frame` waiting for guest buffers.
    pub(super) pending: Option<usize>,
    /// One frame from the TAP.
    pub(super) rx_frame: FrameBuf,
    /// One frame for the TAP, gathered from the guest's chain.
    pub(super) tx_frame: FrameBuf,
    pub(super) epoll: Arc<Epoll>,
    pub(super) kick: EventFd,
}

/// What became of a frame offered to the rx queue.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Delivered,
    /// It cannot fit the guest's buffers, now or later.
    Dropped,
    /// Too few buffers: it waits for more.
    Waiting,
}

/// Epoll data of the kick eventfd; TAPs get 1, 2, ...
pub(super) const EV_KICK: u64 = 0;

impl Net {
    /// A network device with no TAP bound, and its host side, whose
    /// thread [`NetHost::start`] runs once the transport exists.
    pub fn new() -> std::io::Result<(Self, NetHost)> {
        let epoll = Arc::new(Epoll::new()?);
        let kick = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, EV_KICK),
        )?;
        let backend = Arc::new(Mutex::new(Backend {
            bound: None,
            next_token: EV_KICK + 1,
            acked: 0,
            active: false,
            offloads_stale: false,
            host_turn: false,
            rx_unreachable: false,
            pending: None,
            rx_frame: FrameBuf::new(),
            tx_frame: FrameBuf::new(),
            epoll: epoll.clone(),
            kick,
        }));
        let host = NetHost {
            backend: backend.clone(),
            epoll,
        };
        Ok((Self { backend }, host))
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    /// Runs on the vCPU thread: the TAP's offloads are set by the device's
    /// thread, which is kicked.
    fn activate(&mut self, acked: u64) {
        let mut backend = lock(&self.backend);
        backend.acked = acked;
        backend.active = true;
        backend.offloads_stale = true;
        backend.rx_unreachable = false;
        let _ = backend.kick.write(1);
    }

    /// A frame waiting for buffers is dropped with the queues it waited
    /// on; the thread is kicked to stop polling the TAP.
    fn reset(&mut self) {
        let mut backend = lock(&self.backend);
        backend.active = false;
        backend.acked = 0;
        backend.pending = None;
        backend.rx_unreachable = false;
        let _ = backend.kick.write(1);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut backend = lock(&self.backend);
        match index {
            TX => backend.transmit(queue, mem),
            RX if backend.host_turn => {
                backend.host_turn = false;
                backend.receive(queue, mem)
            }
            RX => {
                // The guest added buffers. A frame waiting for them is
                // the thread's to deliver, not this vCPU's.
                if backend.pending.is_some() || backend.rx_unreachable {
                    backend.rx_unreachable = false;
                    let _ = backend.kick.write(1);
                }
                false
            }
            _ => false,
        }
    }
}

impl Backend {
    /// Writes every frame the guest queued to the TAP, one `write()` a
    /// frame. A frame that is too long, too short or in bad buffers is
    /// dropped, as is everything while no TAP is bound or the TAP refuses
    /// it (a full queue, a bad GSO header); the guest gets each chain
    /// back regardless.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            if let Ok(mut reader) = Reader::new(mem, chain) {
                let len = reader.available_bytes();
                if (VNET_HDR_LEN..=MAX_FRAME).contains(&len)
                    && reader.read_exact(&mut self.tx_frame[..len]).is_ok()
                    && let Some(bound) = &self.bound
                {
                    let _ = bound.tap.write(&self.tx_frame[..len]);
                }
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// Moves frames from the TAP to the guest's rx buffers until the TAP
    /// has none, the guest's buffers run out (the frame then waits in
    /// `pending`) or [`RX_BUDGET`] frames went.
    pub(super) fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        for _ in 0..RX_BUDGET {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.read_frame() {
                    Some(len) => len,
                    None => break,
                },
            };
            // A runt carries not even its header: nothing to deliver.
            if len < VNET_HDR_LEN {
                continue;
            }
            let (outcome, published) = self.place(len, queue, mem);
            used |= published;
            if outcome == Outcome::Waiting {
                self.pending = Some(len);
                break;
            }
        }
        used
    }

    /// Reads one frame from the TAP into `rx_frame`: its length, or None
    /// when there is none now. A TAP whose read fails is read no more
    /// (a detached TAP fails every read); nor is a socket whose peer
    /// closed.
    fn read_frame(&mut self) -> Option<usize> {
        let bound = self.bound.as_mut()?;
        if bound.spent {
            return None;
        }
        loop {
            match bound.tap.read(&mut self.rx_frame) {
                Ok(0) => {
                    bound.spent = true;
                    return None;
                }
                Ok(len) => return Some(len),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) => {
                    eprintln!("husk-vmm: net: the TAP cannot be read, and is read no more: {e}");
                    bound.spent = true;
                    return None;
                }
            }
        }
    }

    /// Offers the frame in `rx_frame[..len]` to the rx queue: pops chains
    /// until their writable bytes hold it (one chain without MRG_RXBUF),
    /// copies it in with `num_buffers` set, and publishes every chain it
    /// used at once. Returns what became of it, and whether any used
    /// element was published (chains the guest made badly go back empty).
    ///
    /// Too few buffers: the chains are put back (`next_avail` rewound)
    /// and the frame waits, unless the ring holds every buffer it can
    /// and still too few, or (without MRG_RXBUF) one buffer is too small:
    /// then waiting would not help and the frame is dropped.
    fn place(&mut self, len: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> (Outcome, bool) {
        let merge = self.acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let start = queue.next_avail();
        let mut popped: u16 = 0;
        let mut room = 0usize;
        let mut writers: Vec<(u16, Writer<'_>)> = Vec::new();
        // Chains with no writable bytes or outside guest memory.
        let mut bad: Vec<(u16, u32)> = Vec::new();
        while room < len {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            popped += 1;
            let head = chain.head_index();
            match Writer::new(mem, chain) {
                Ok(writer) if writer.available_bytes() > 0 => {
                    room = room.saturating_add(writer.available_bytes());
                    writers.push((head, writer));
                    if !merge {
                        break;
                    }
                }
                _ => bad.push((head, 0)),
            }
        }
        if room < len {
            let ring_full = popped >= queue.size();
            let too_small = !merge && !writers.is_empty();
            if too_small {
                // Only the last chain popped was good: it goes back.
                queue.go_to_previous_position();
            } else if !writers.is_empty() {
                // Good chains among bad ones: all go back, to be taken in
                // order with the next frame.
                queue.set_next_avail(start);
                bad.clear();
            }
            let published = publish(queue, mem, &bad);
            let outcome = if too_small || ring_full {
                Outcome::Dropped
            } else {
                Outcome::Waiting
            };
            return (outcome, published);
        }
        let frame = &mut self.rx_frame[..len];
        let buffers = writers.len() as u16;
        frame[NUM_BUFFERS_AT..VNET_HDR_LEN].copy_from_slice(&buffers.to_le_bytes());
        let mut used = bad;
        let mut at = 0;
        for (head, mut writer) in writers {
            let n = writer.available_bytes().min(len - at);
            let _ = writer.write_all(&frame[at..at + n]);
            at += n;
            used.push((head, writer.bytes_written() as u32));
        }
        (Outcome::Delivered, publish(queue, mem, &used))
    }
}

/// Puts `used` (head, length) in the used ring and makes them visible to
/// the guest together, with one store of the used index (Release, after
/// the elements). virtio-queue's `add_used` stores the index for each
/// element: Linux's `receive_mergeable`, reading the first buffer of a
/// merged frame on another vCPU before the rest are there, drops the
/// frame. Returns whether any was published; a used ring outside guest
/// memory publishes nothing (`Queue::is_valid` checked it when the queue
/// became ready).
///
/// Without EVENT_IDX (not offered), nothing else reads the count of
/// elements added that `add_used` keeps.
pub(super) fn publish(queue: &mut Queue, mem: &GuestMemoryMmap, used: &[(u16, u32)]) -> bool {
    if used.is_empty() {
        return false;
    }
    let ring = GuestAddress(queue.used_ring());
    let size = queue.size();
    let mut next = queue.next_used();
    for &(head, len) in used {
        // struct virtq_used_elem { le32 id; le32 len; } at ring + 4 + 8 * i.
        let slot = u64::from(next % size);
        let elem = (u64::from(len) << 32) | u64::from(head);
        let Some(at) = ring.checked_add(4 + 8 * slot) else {
            return false;
        };
        if mem.write_obj(elem.to_le(), at).is_err() {
            return false;
        }
        next = next.wrapping_add(1);
    }
    let Some(idx) = ring.checked_add(2) else {
        return false;
    };
    if mem.store(next.to_le(), idx, Ordering::Release).is_err() {
        return false;
    }
    queue.set_next_used(next);
    true
}

/// A frame's bytes, [`MAX_FRAME`] long, starting on a page boundary. A
/// heap buffer that happened to start 0xfc0 bytes into a page made every
/// 4 KiB of a 64 KiB frame land 2 bytes off its source's place in a page,
/// the kernel's worst case for the copy of a TAP read (4K aliasing): RX of
/// GSO frames ran at a third of the speed (docs/benchmarks.md, virtio-net).
pub(super) struct FrameBuf {
    bytes: Vec<u8>,
    start: usize,
}

/// A page.
const PAGE: usize = 4096;

impl FrameBuf {
    pub(super) fn new() -> Self {
        let bytes = vec![0; MAX_FRAME + PAGE];
        let start = bytes.as_ptr().align_offset(PAGE).min(PAGE);
        Self { bytes, start }
    }
}

impl std::ops::Deref for FrameBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..self.start + MAX_FRAME]
    }
}

impl std::ops::DerefMut for FrameBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + MAX_FRAME]
    }
}

impl NetHost {
    /// The handle that binds the device's TAP, for a caller that takes
    /// the thread's turns itself ([`NetHost::turn`]) instead of starting
    /// it: the fuzz targets (fuzz/, docs/fuzzing.md).
    pub fn handle(&self) -> NetHandle {
        NetHandle {
            backend: self.backend.clone(),
        }
    }

    /// One turn of the device's thread, on the caller's thread: the events
    /// epoll reports within `timeout_ms`, the TAP's offloads brought up to
    /// date, and the frames the TAP has delivered to the guest. The steps
    /// of the thread's loop ([`NetHost::start`]), for the fuzz targets,
    /// which drive the device without its thread so that a run depends on
    /// its input alone.
    pub fn turn(&self, transport: &Mutex<MmioTransport>, timeout_ms: i32) {
        let mut events = [EpollEvent::default(); 4];
        let n = self.epoll.wait(timeout_ms, &mut events).unwrap_or(0);
        self.serve(transport, &events[..n]);
    }

    /// Handles what epoll reported (the thread's loop and [`Self::turn`]
    /// alike): the TAP's offloads brought up to date, and the frames the
    /// TAP has delivered to the guest.
    pub(super) fn serve(&self, transport: &Mutex<MmioTransport>, events: &[EpollEvent]) {
        // Transport, then backend: the vCPU threads' order.
        let mut transport = lock(transport);
        let mut backend = lock(&self.backend);
        for event in events {
            if event.data() == EV_KICK {
                let _ = backend.kick.read();
            } else if let Some(bound) = &mut backend.bound
                && bound.token == event.data()
                && event
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
            {
                bound.hung_up = true;
            }
        }
        backend.update_offloads();
        if backend.can_receive() {
            backend.host_turn = true;
            drop(backend);
            transport.notify_device(RX as u32);
            backend = lock(&self.backend);
            if std::mem::take(&mut backend.host_turn) {
                // The transport did not call the device: its driver has no
                // rx queue ready.
                backend.rx_unreachable = true;
            }
        }
        backend.watch();
    }
}
