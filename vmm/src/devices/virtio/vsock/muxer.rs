//! The connections between guest ports and host Unix sockets: their
//! credit, the CONNECT handshake, and the bytes each way.

use super::*;

/// epoll data of the listener, of the kick eventfd and (from
/// [`EV_POLLED`] on) of other devices' epoll sets served on this thread;
/// connections use their key, whose host port is never 0 (those the host
/// starts have ports from 1 << 30; a guest's to host port 0 is refused),
/// so never collides.
pub(super) const EV_LISTENER: u64 = 0;

pub(super) const EV_KICK: u64 = 1;

/// The first other device's epoll data ([`VsockHost::serve_also`]).
pub(super) const EV_POLLED: u64 = 2;

/// One connection: host port and guest port, and its flow-control state.
pub(super) struct Conn {
    pub(super) stream: UnixStream,
    /// Waiting for the guest's RESPONSE to our REQUEST.
    pub(super) connecting: bool,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub(super) tx_cnt: u32,
    /// Bytes of guest data written to the host stream.
    pub(super) fwd_cnt: u32,
    /// fwd_cnt last told to the guest.
    pub(super) fwd_cnt_told: u32,
    /// Guest data the host side has not taken yet (at most BUF_ALLOC).
    pub(super) out: VecDeque<u8>,
    /// Registered for readable events (stopped while the guest has no
    /// credit for us).
    pub(super) reading: bool,
    /// The host side closed its end for writing; the guest was told.
    pub(super) host_eof: bool,
    /// The guest will send no more; once its held bytes are written the
    /// host stream's write side is shut.
    pub(super) guest_done: bool,
}

impl Conn {
    pub(super) fn new(
        stream: UnixStream,
        connecting: bool,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    ) -> Self {
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

    /// What the guest takes now: its buffer (at most [`BUF_ALLOC`],
    /// whatever it advertises) less what is on its way to it. Bytes in
    /// flight wait in the rx queue while the guest posts no buffers, so
    /// this also bounds what the VMM holds for the guest per connection.
    pub(super) fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .min(BUF_ALLOC)
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// (host port, guest port)
pub(super) type Key = (u32, u32);

pub(super) fn ev_data(key: Key) -> u64 {
    (u64::from(key.0) << 32) | u64::from(key.1)
}

/// The host side of the device, shared by the device and its thread.
pub(super) struct Backend {
    pub(super) guest_cid: u64,
    pub(super) uds_path: PathBuf,
    pub(super) conns: HashMap<Key, Conn>,
    pub(super) rx: VecDeque<(Hdr, Vec<u8>)>,
    pub(super) next_port: u32,
    pub(super) epoll: Epoll,
    pub(super) kick: EventFd,
    /// Called when the guest connects to [`READY_PORT`].
    pub(super) on_ready: Option<Box<dyn Fn() + Send>>,
    /// What host streams are read into: one buffer for every read, so
    /// that a read does not allocate (and free) a packet's worth, which
    /// musl's allocator maps and unmaps each time.
    pub(super) scratch: Vec<u8>,
}

/// The most connections open at once past which the guest may open no
/// more (host clients' connections count, and are never refused; the
/// muxer of Firecracker's vsock has 1023). Each holds a host descriptor and up to [`BUF_ALLOC`] of the
/// guest's bytes while its host reader does not read: at most 64 MiB.
pub(super) const MAX_CONNS: usize = 256;

/// Connects to the Unix socket at `path` without blocking: a listener
/// whose backlog is full (one that does not accept) is an error
/// (`EAGAIN`), not a wait.
pub(super) fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&sock, &SocketAddrUnix::new(path)?)?;
    Ok(UnixStream::from(sock))
}

/// Reads one line of at most 64 bytes from `stream`, and nothing after it:
/// peeks at what arrived, then takes the line (byte by byte if it arrives
/// in pieces).
pub(super) fn read_line_exactly(mut stream: &UnixStream) -> Option<String> {
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

impl Backend {
    pub(super) fn hdr(&self, key: Key, op: u16, len: u32) -> Hdr {
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

    pub(super) fn send(&mut self, key: Key, op: u16) {
        let hdr = self.hdr(key, op, 0);
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_cnt_told = c.fwd_cnt;
        }
        self.rx.push_back((hdr, Vec::new()));
    }

    pub(super) fn watch(&self, key: Key, events: EventSet) {
        if let Some(c) = self.conns.get(&key) {
            let fd = c.stream.as_raw_fd();
            let ev = EpollEvent::new(events, ev_data(key));
            if self.epoll.ctl(ControlOperation::Modify, fd, ev).is_err() {
                let _ = self.epoll.ctl(ControlOperation::Add, fd, ev);
            }
        }
    }

    pub(super) fn rearm(&mut self, key: Key) {
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

    pub(super) fn close(&mut self, key: Key, tell_guest: bool) {
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
    pub(super) fn flush(&mut self, key: Key) {
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
    pub(super) fn guest_packet(&mut self, hdr: Hdr, payload: Vec<u8>) {
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

    /// The guest connects to host port P: forwarded to `<path>_P`. At most
    /// [`MAX_CONNS`] connections are open; past that, and when the host
    /// listener's backlog is full (it does not accept), the guest is reset
    /// at once: the connect never blocks the vCPU thread.
    pub(super) fn guest_connects(&mut self, hdr: Hdr) {
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
        let full = self.conns.len() >= MAX_CONNS && !self.conns.contains_key(&key);
        // Host port 0 would make a key that is another source's epoll
        // data (EV_LISTENER and on).
        let stream = if full || hdr.dst_port == 0 {
            Err(ErrorKind::Other.into())
        } else {
            connect_nonblocking(&path)
        };
        match stream {
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
    pub(super) fn host_connects(&mut self, stream: UnixStream) {
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
    pub(super) fn host_readable(&mut self, key: Key) {
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
