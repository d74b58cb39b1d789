//! The vsock thread: polls the host sockets and moves their bytes.

use super::*;

/// The host side's thread, started once the transport exists.
pub struct VsockHost {
    pub(super) backend: Arc<Mutex<Backend>>,
    pub(super) listener: UnixListener,
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

    pub(super) fn epoll_fd(&self) -> RawFd {
        lock(&self.backend).epoll.as_raw_fd()
    }

    pub(super) fn run(self, transport: Arc<Mutex<MmioTransport>>) {
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
            self.serve(&transport, &events[..n as usize]);
        }
    }
}
