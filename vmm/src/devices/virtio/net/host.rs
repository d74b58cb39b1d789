//! The device's host side: its thread `husk-net`, which moves frames from
//! the TAP to the guest, and the handle that binds a TAP.

use std::io::ErrorKind;
use std::os::fd::OwnedFd;

use super::device::{Backend, Bound};
use super::*;

/// The host side of a network device, before its thread starts.
pub struct NetHost {
    pub(super) backend: Arc<Mutex<Backend>>,
    pub(super) epoll: Arc<Epoll>,
}

/// Binds a TAP to a running network device, or takes it away: from any
/// thread (the API's requests arrive on the main thread).
#[derive(Clone)]
pub struct NetHandle {
    pub(super) backend: Arc<Mutex<Backend>>,
}

impl NetHost {
    /// Runs the host side on a thread `husk-net`, delivering frames to the
    /// guest through `transport`; returns the handle that binds its TAP.
    pub fn start(self, transport: Arc<Mutex<MmioTransport>>) -> std::io::Result<NetHandle> {
        let handle = NetHandle {
            backend: self.backend.clone(),
        };
        std::thread::Builder::new()
            .name("husk-net".into())
            .spawn(move || self.run(transport))?;
        Ok(handle)
    }

    /// The host side, to be served on another thread's epoll (the vsock
    /// thread's) rather than a thread of its own; returns the handle that
    /// binds its TAP.
    pub fn polled(
        self,
        transport: Arc<Mutex<MmioTransport>>,
    ) -> (NetHandle, crate::devices::Polled) {
        use std::os::fd::AsRawFd;
        let handle = NetHandle {
            backend: self.backend.clone(),
        };
        let fd = self.epoll.as_raw_fd();
        let mut events = [EpollEvent::default(); 4];
        let serve = Box::new(move || {
            // More than four ready: the outer set reports this one again.
            if let Ok(n) = self.epoll.wait(0, &mut events) {
                self.serve(&transport, &events[..n]);
            }
        });
        (handle, crate::devices::Polled { fd, serve })
    }

    fn run(self, transport: Arc<Mutex<MmioTransport>>) {
        crate::confine::enter(crate::seccomp::Thread::Net);
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("husk-vmm: net: epoll_wait failed; the guest receives no more: {e}");
                    return;
                }
            };
            self.serve(&transport, &events[..n]);
        }
    }
}

impl NetHandle {
    /// Binds `tap` to the device: a TAP opened with `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR` (or a frame-keeping socket in its place, see the
    /// module's documentation). Its header size is set to 12 bytes, it is
    /// made non-blocking, its offloads follow what the guest's driver
    /// accepted, and the device's thread polls it. Refused, saying why,
    /// when the device has a TAP already or `tap` will not do.
    ///
    /// System calls, on the calling thread: `fstat`/`statx`, `ioctl`
    /// (`TUNGETIFF`, `TUNSETVNETHDRSZ`, `FIONBIO`, `TUNSETOFFLOAD`),
    /// `getsockopt` for a socket, `epoll_ctl`.
    pub fn bind(&self, tap: OwnedFd) -> Result<(), NetError> {
        let mut backend = lock(&self.backend);
        if backend.bound.is_some() {
            return Err(NetError::AlreadyBound);
        }
        let tap = Tap::new(tap)?;
        let flags = if backend.active {
            tap_offloads(backend.acked)
        } else {
            0
        };
        tap.set_offloads(flags)
            .map_err(|source| NetError::Offloads { flags, source })?;
        let token = backend.next_token;
        // Nothing waits in `pending` while no TAP is bound.
        let armed = backend.active && !backend.rx_unreachable;
        backend
            .epoll
            .ctl(
                ControlOperation::Add,
                tap.fd(),
                EpollEvent::new(interest(armed), token),
            )
            .map_err(NetError::Poll)?;
        backend.next_token += 1;
        backend.offloads_stale = false;
        backend.bound = Some(Bound {
            tap,
            token,
            registered: true,
            armed,
            hung_up: false,
            spent: false,
        });
        Ok(())
    }

    /// Takes the TAP away, if one is bound, and closes it (a TAP that is
    /// not persistent goes with its last descriptor). A frame waiting for
    /// guest buffers is dropped. System calls: `epoll_ctl`, `close`.
    pub fn unbind(&self) {
        let mut backend = lock(&self.backend);
        if let Some(bound) = backend.bound.take() {
            // Out of the set before it closes: a duplicate of the
            // descriptor elsewhere would keep it in.
            if bound.registered {
                let _ = backend.epoll.ctl(
                    ControlOperation::Delete,
                    bound.tap.fd(),
                    EpollEvent::default(),
                );
            }
            backend.pending = None;
        }
    }
}

fn interest(armed: bool) -> EventSet {
    if armed {
        EventSet::IN
    } else {
        EventSet::empty()
    }
}

impl Backend {
    /// Whether the thread's turn should offer frames to the guest.
    pub(super) fn can_receive(&self) -> bool {
        self.active
            && !self.rx_unreachable
            && self
                .bound
                .as_ref()
                .is_some_and(|bound| self.pending.is_some() || !bound.spent)
    }

    /// Sets the TAP's offloads to what the driver accepted, if that
    /// changed. A TAP that refuses keeps the offloads it had (none, for a
    /// new TAP: the safe side).
    pub(super) fn update_offloads(&mut self) {
        if !self.offloads_stale || !self.active {
            return;
        }
        let Some(bound) = &self.bound else {
            return;
        };
        self.offloads_stale = false;
        let flags = tap_offloads(self.acked);
        if let Err(e) = bound.tap.set_offloads(flags) {
            eprintln!("husk-vmm: net: cannot set the TAP's offloads to {flags:#x}: {e}");
        }
    }

    /// Has the epoll set watch the TAP as the device's state wants: for
    /// input while the guest can take frames and none waits; not at all
    /// once it hung up or is spent.
    pub(super) fn watch(&mut self) {
        let armed = self.active && self.pending.is_none() && !self.rx_unreachable;
        let Some(bound) = &mut self.bound else {
            return;
        };
        if bound.hung_up || bound.spent {
            if bound.registered {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    bound.tap.fd(),
                    EpollEvent::default(),
                );
                bound.registered = false;
            }
            return;
        }
        if bound.armed != armed
            && self
                .epoll
                .ctl(
                    ControlOperation::Modify,
                    bound.tap.fd(),
                    EpollEvent::new(interest(armed), bound.token),
                )
                .is_ok()
        {
            bound.armed = armed;
        }
    }
}
