//! The vsock thread: polls the host sockets and moves their bytes.

use super::*;

/// The host side's thread, started once the transport exists.
pub struct VsockHost {
    pub(super) backend: Arc<Mutex<Backend>>,
    pub(super) listener: UnixListener,
    /// Other devices' host sides served on this thread, by epoll data
    /// [`EV_POLLED`] + index.
    pub(super) polled: Vec<crate::devices::Polled>,
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

    /// Serves `polled` on this thread too: its epoll set is nested in
    /// this one's.
    pub fn serve_also(&mut self, polled: crate::devices::Polled) -> std::io::Result<()> {
        let data = EV_POLLED + self.polled.len() as u64;
        lock(&self.backend).epoll.ctl(
            ControlOperation::Add,
            polled.fd,
            EpollEvent::new(EventSet::IN, data),
        )?;
        self.polled.push(polled);
        Ok(())
    }

    pub(super) fn epoll_fd(&self) -> RawFd {
        lock(&self.backend).epoll.as_raw_fd()
    }

    pub(super) fn run(mut self, transport: Arc<Mutex<MmioTransport>>) {
        crate::confine::enter(crate::seccomp::Thread::Vsock);
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
            // Other devices' turns first; this device's events are
            // gathered at the front.
            let mut own = 0;
            for i in 0..n as usize {
                let data = events[i].data();
                match data.checked_sub(EV_POLLED).map(|k| k as usize) {
                    Some(k) if k < self.polled.len() => (self.polled[k].serve)(),
                    _ => {
                        events.swap(own, i);
                        own += 1;
                    }
                }
            }
            self.serve(&transport, &events[..own]);
        }
    }
}
