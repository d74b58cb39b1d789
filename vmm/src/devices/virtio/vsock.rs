//! virtio-vsock with its host side on a Unix socket ("hybrid vsock", as
//! Firecracker has it): no /dev/vhost-vsock is needed or used.
//!
//! Host to guest: connect to the Unix socket, write `CONNECT <port>\n`; once
//! the guest accepts, the VMM answers `OK <host port>\n` and the socket is a
//! byte stream to the guest's listener on `<port>`. Guest to host: a guest
//! connection to CID 2 port `P` is forwarded to the Unix socket `<path>_P`.
//!
//! Threads: guest packets (tx queue) are handled on the vCPU thread that
//! notified; the host side runs on one thread, `husk-vsock`, with an epoll
//! over the listener, every connection and a kick eventfd, and delivers
//! packets to the guest (rx queue) through the transport. Lock order is
//! always transport, then backend.
//!
//! Flow control is vsock's own: the VMM sends a guest no more than the
//! credit the guest advertised, and advertises a fixed buffer per
//! connection ([`BUF_ALLOC`]), keeping guest bytes the host side has not
//! taken yet in that buffer and no more. A host reader that stops reading
//! stops the guest's writer; nothing grows.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioDevice;
use super::mmio::MmioTransport;
use crate::devices::lock;

/// virtio device type of a socket device.
pub const TYPE_VSOCK: u32 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Bytes of guest data the VMM holds per connection (the credit it gives).
pub const BUF_ALLOC: u32 = 256 * 1024;

const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
const RX: usize = 0;
const TX: usize = 1;
const HDR_SIZE: usize = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flags: the sender will receive no more, send no more.
const SHUTDOWN_RECEIVE: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;
/// Largest payload the VMM puts in one packet.
const MAX_PKT: usize = 64 * 1024;
/// epoll data of the listener and of the kick eventfd; connections use
/// their key, which never collides (host ports start at 1 << 30).
const EV_LISTENER: u64 = 0;
const EV_KICK: u64 = 1;

/// A vsock packet header (virtio 1.2, 5.10.6), little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn parse(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// One connection: host port and guest port, and its flow-control state.
struct Conn {
    stream: UnixStream,
    /// Waiting for the guest's RESPONSE to our REQUEST.
    connecting: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes of guest data written to the host stream.
    fwd_cnt: u32,
    /// fwd_cnt last told to the guest.
    fwd_cnt_told: u32,
    /// Guest data the host side has not taken yet (at most BUF_ALLOC).
    out: VecDeque<u8>,
    /// Registered for readable events (stopped while the guest has no
    /// credit for us).
    reading: bool,
    /// The host side closed its end for writing; the guest was told.
    host_eof: bool,
    /// The guest will send no more; once its held bytes are written the
    /// host stream's write side is shut.
    guest_done: bool,
}

impl Conn {
    fn new(stream: UnixStream, connecting: bool, peer_buf_alloc: u32, peer_fwd_cnt: u32) -> Self {
        Self {
            stream,
            connecting,
            peer_buf_alloc,
            peer_fwd_cnt,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            out: VecDeque::new(),
            reading: false,
            host_eof: false,
            guest_done: false,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// (host port, guest port)
type Key = (u32, u32);

fn ev_data(key: Key) -> u64 {
    (u64::from(key.0) << 32) | u64::from(key.1)
}

/// The host side of the device, shared by the device and its thread.
struct Backend {
    guest_cid: u64,
    uds_path: PathBuf,
    conns: HashMap<Key, Conn>,
    rx: VecDeque<(Hdr, Vec<u8>)>,
    next_port: u32,
    epoll: Epoll,
    kick: EventFd,
    /// Called when the guest connects to [`READY_PORT`].
    on_ready: Option<Box<dyn Fn() + Send>>,
    /// What host streams are read into: one buffer for every read, so
    /// that a read does not allocate (and free) a packet's worth, which
    /// musl's allocator maps and unmaps each time.
    scratch: Vec<u8>,
}

/// Reads one line of at most 64 bytes from `stream`, and nothing after it:
/// peeks at what arrived, then takes the line (byte by byte if it arrives
/// in pieces).
fn read_line_exactly(mut stream: &UnixStream) -> Option<String> {
    let mut buf = [0u8; 64];
    // SAFETY: recv into a live buffer of the length given.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK,
        )
    };
    let n = usize::try_from(n).ok()?;
    let line = match buf[..n].iter().position(|&b| b == b'\n') {
        Some(end) => {
            let mut line = vec![0u8; end + 1];
            stream.read_exact(&mut line).ok()?;
            line
        }
        None => {
            let mut line = Vec::new();
            let mut byte = [0u8];
            while line.last() != Some(&b'\n') {
                if line.len() >= 64 || stream.read(&mut byte).ok()? == 0 {
                    return None;
                }
                line.push(byte[0]);
            }
            line
        }
    };
    String::from_utf8(line).ok()
}

/// Host port whose connection requests mean "the guest is ready";
/// answered with a reset.
pub use husk_protocol::READY_PORT;

impl Backend {
    fn hdr(&self, key: Key, op: u16, len: u32) -> Hdr {
        let (fwd_cnt, _) = self
            .conns
            .get(&key)
            .map_or((0, 0), |c| (c.fwd_cnt, c.tx_cnt));
        Hdr {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    fn send(&mut self, key: Key, op: u16) {
        let hdr = self.hdr(key, op, 0);
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_cnt_told = c.fwd_cnt;
        }
        self.rx.push_back((hdr, Vec::new()));
    }

    fn watch(&self, key: Key, events: EventSet) {
        if let Some(c) = self.conns.get(&key) {
            let fd = c.stream.as_raw_fd();
            let ev = EpollEvent::new(events, ev_data(key));
            if self.epoll.ctl(ControlOperation::Modify, fd, ev).is_err() {
                let _ = self.epoll.ctl(ControlOperation::Add, fd, ev);
            }
        }
    }

    fn rearm(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut events = EventSet::empty();
        c.reading = !c.connecting && !c.host_eof && c.credit() > 0;
        if c.reading {
            events |= EventSet::IN;
        }
        if !c.out.is_empty() {
            events |= EventSet::OUT;
        }
        self.watch(key, events);
    }

    fn close(&mut self, key: Key, tell_guest: bool) {
        if let Some(c) = self.conns.remove(&key) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if tell_guest {
                let hdr = self.hdr(key, OP_RST, 0);
                self.rx.push_back((hdr, Vec::new()));
            }
        }
    }

    /// Writes what the host stream takes of the connection's held bytes.
    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.out.is_empty() {
            let (front, _) = c.out.as_slices();
            match c.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.close(key, true);
                    return;
                }
            }
        }
        if c.guest_done && c.out.is_empty() {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            if c.host_eof {
                // Both directions are done: the RST ends it for the guest.
                self.close(key, true);
                return;
            }
        }
        // Tell the guest about freed buffer before it runs out.
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= BUF_ALLOC / 4 {
            self.send(key, OP_CREDIT_UPDATE);
        }
        self.rearm(key);
    }

    /// A packet from the guest.
    fn guest_packet(&mut self, hdr: Hdr, payload: Vec<u8>) {
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = hdr.buf_alloc;
            c.peer_fwd_cnt = hdr.fwd_cnt;
        }
        match hdr.op {
            OP_REQUEST => self.guest_connects(hdr),
            OP_RESPONSE => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                c.connecting = false;
                let answer = format!("OK {}\n", key.0);
                if c.stream.write_all(answer.as_bytes()).is_err() {
                    self.close(key, true);
                    return;
                }
                self.rearm(key);
            }
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.rx.push_back((self.hdr(key, OP_RST, 0), Vec::new()));
                    return;
                };
                // The guest may not send beyond the credit we gave.
                if c.out.len() + payload.len() > BUF_ALLOC as usize {
                    self.close(key, true);
                    return;
                }
                c.out.extend(payload);
                self.flush(key);
            }
            OP_CREDIT_REQUEST => self.send(key, OP_CREDIT_UPDATE),
            OP_CREDIT_UPDATE => self.rearm(key),
            OP_SHUTDOWN => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    c.guest_done = true;
                }
                if hdr.flags & SHUTDOWN_RECEIVE != 0 {
                    c.host_eof = true;
                }
                // Write what is held, then shut the stream's write side
                // (and end the connection when both sides are done).
                self.flush(key);
            }
            OP_RST => self.close(key, false),
            _ => {}
        }
    }

    /// The guest connects to host port P: forwarded to `<path>_P`.
    fn guest_connects(&mut self, hdr: Hdr) {
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.dst_port == READY_PORT {
            let rst = self.hdr(key, OP_RST, 0);
            self.rx.push_back((rst, Vec::new()));
            if let Some(on_ready) = &self.on_ready {
                on_ready();
            }
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), hdr.dst_port));
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => {
                self.conns
                    .insert(key, Conn::new(stream, false, hdr.buf_alloc, hdr.fwd_cnt));
                self.send(key, OP_RESPONSE);
                self.rearm(key);
            }
            Err(_) => {
                let hdr = self.hdr(key, OP_RST, 0);
                self.rx.push_back((hdr, Vec::new()));
            }
        }
    }

    /// A host client connected to the Unix socket: read its CONNECT line
    /// and ask the guest.
    fn host_connects(&mut self, stream: UnixStream) {
        // The CONNECT line is short; a client that does not send it within
        // a second is dropped. Exactly the line is read: what the client
        // sent behind it (its first frame) is the connection's first data.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let port =
            read_line_exactly(&stream).and_then(|line| husk_protocol::vsock::parse_connect(&line));
        let Some(port) = port else {
            let _ = (&stream).write_all(b"ERROR expected CONNECT <port>\n");
            return;
        };
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let key = (self.next_port, port);
        self.next_port = self.next_port.wrapping_add(1).max(1 << 30);
        self.conns.insert(key, Conn::new(stream, true, 0, 0));
        self.send(key, OP_REQUEST);
        self.rearm(key);
    }

    /// The host stream has bytes: send what the guest's credit allows.
    /// Also called when it hangs up or fails, which epoll reports whatever
    /// events are asked for.
    fn host_readable(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.host_eof {
            // Reading is not armed after the host's EOF, so this is a
            // hang-up: the host closed both directions. Without this the
            // level-triggered hang-up would re-send the guest a shutdown on
            // every wake-up, a storm that keeps the guest busy.
            self.close(key, true);
            return;
        }
        let room = (c.credit() as usize).min(MAX_PKT);
        if room == 0 {
            self.rearm(key);
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(MAX_PKT, 0);
        let read = c.stream.read(&mut scratch[..room]);
        let buf = match &read {
            Ok(n) => scratch[..*n].to_vec(),
            Err(_) => Vec::new(),
        };
        self.scratch = scratch;
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        match read {
            Ok(0) => {
                // The host will send no more; the guest may still.
                c.host_eof = true;
                let hdr = Hdr {
                    flags: SHUTDOWN_SEND,
                    ..self.hdr(key, OP_SHUTDOWN, 0)
                };
                self.rx.push_back((hdr, Vec::new()));
                self.flush(key);
            }
            Ok(n) => {
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                c.fwd_cnt_told = c.fwd_cnt;
                let hdr = self.hdr(key, OP_RW, n as u32);
                self.rx.push_back((hdr, buf));
                self.rearm(key);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => self.rearm(key),
            Err(_) => self.close(key, true),
        }
    }
}

/// The vsock device.
pub struct Vsock {
    backend: Arc<Mutex<Backend>>,
    config: [u8; 8],
}

impl Vsock {
    /// A device for guest CID `guest_cid` whose host side listens on
    /// `uds_path`. The socket is bound now; [`start`] runs its thread.
    pub fn new(guest_cid: u64, uds_path: &Path) -> std::io::Result<(Self, VsockHost)> {
        let listener = UnixListener::bind(uds_path)?;
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
struct VsockState {
    /// (host port, guest port) of each open connection.
    open: Vec<Key>,
    next_port: u32,
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn save_state(&self) -> Result<Option<serde_json::Value>, String> {
        let backend = lock(&self.backend);
        let mut open: Vec<Key> = backend.conns.keys().copied().collect();
        open.sort_unstable();
        let state = VsockState {
            open,
            next_port: backend.next_port,
        };
        Ok(Some(
            serde_json::to_value(state).expect("plain data serializes"),
        ))
    }

    /// The host ends of the saved connections belonged to another
    /// process: the guest is sent a reset for each, before anything else.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let state: VsockState = serde_json::from_value(state.clone())
            .map_err(|e| format!("vsock: saved state: {e}"))?;
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

/// The host side's thread, started once the transport exists.
pub struct VsockHost {
    backend: Arc<Mutex<Backend>>,
    listener: UnixListener,
}

impl VsockHost {
    /// Runs the host side on a thread `husk-vsock`, delivering packets to
    /// the guest through `transport`.
    pub fn start(self, transport: Arc<Mutex<MmioTransport>>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("husk-vsock".into())
            .spawn(move || self.run(transport))
            .map(|_| ())
    }

    fn epoll_fd(&self) -> RawFd {
        lock(&self.backend).epoll.as_raw_fd()
    }

    fn run(self, transport: Arc<Mutex<MmioTransport>>) {
        crate::seccomp::enter(crate::seccomp::Thread::Vsock);
        let epoll_fd = self.epoll_fd();
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            // SAFETY: epoll_wait fills at most `len` events into our buffer;
            // EpollEvent is a transparent wrapper of epoll_event.
            let n = unsafe {
                libc::epoll_wait(
                    epoll_fd,
                    events.as_mut_ptr().cast(),
                    events.len() as i32,
                    -1,
                )
            };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            for ev in &events[..n as usize] {
                let mut backend = lock(&self.backend);
                match ev.data() {
                    EV_LISTENER => {
                        while let Ok((stream, _)) = self.listener.accept() {
                            backend.host_connects(stream);
                        }
                    }
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
            // Deliver what is waiting for the guest (transport, then
            // backend: the lock order of the vCPU threads too).
            if !lock(&self.backend).rx.is_empty() {
                lock(&transport).notify_device(RX as u32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_wire_order() {
        let hdr = Hdr {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 1 << 30,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        };
        let b = hdr.bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Hdr::parse(&b), hdr);
    }

    #[test]
    fn a_host_hang_up_after_eof_resets_once_instead_of_repeating() {
        let dir = std::env::temp_dir().join(format!("husk-vsock-hup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (device, _host) = Vsock::new(3, &dir.join("v.sock")).unwrap();
        let mut b = lock(&device.backend);
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let key = (1 << 30, 1024);
        b.conns.insert(key, Conn::new(ours, false, BUF_ALLOC, 0));
        // The host half-closes: one SHUTDOWN(SEND) for the guest.
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        b.host_readable(key);
        let (hdr, _) = b.rx.pop_front().unwrap();
        assert_eq!((hdr.op, hdr.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        assert!(b.rx.is_empty());
        // Then it closes entirely; epoll keeps reporting the hang-up. The
        // first report resets the connection; later ones find nothing.
        drop(theirs);
        b.host_readable(key);
        b.host_readable(key);
        let ops: Vec<u16> = b.rx.drain(..).map(|(h, _)| h.op).collect();
        assert_eq!(ops, [OP_RST]);
        assert!(b.conns.is_empty());
        drop(b);
        drop(device);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn credit_follows_what_the_guest_consumed() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, false, 1000, 0);
        assert_eq!(c.credit(), 1000);
        c.tx_cnt = 800;
        assert_eq!(c.credit(), 200);
        c.peer_fwd_cnt = 500;
        assert_eq!(c.credit(), 700);
        c.tx_cnt = 2000;
        assert_eq!(c.credit(), 0, "never negative");
        // Counters wrap as the spec says they do.
        c.tx_cnt = 5;
        c.peer_fwd_cnt = u32::MAX - 4;
        assert_eq!(c.credit(), 990);
    }
}
