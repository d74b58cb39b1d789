//! Signals a thread takes instead of having them delivered: a foreground
//! `husk run` blocks the ones it forwards before it starts any thread,
//! and takes them from a signalfd while it waits for its child. No crate husk uses wraps
//! signal masks safely.

/// A set of signals.
#[derive(Clone, Copy)]
pub struct SignalSet(libc::sigset_t);

impl SignalSet {
    /// The set of `signals`.
    pub fn of(signals: &[libc::c_int]) -> Self {
        // SAFETY: sigemptyset initialises the set before sigaddset reads
        // it; both write only into it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &sig in signals {
                libc::sigaddset(&mut set, sig);
            }
            Self(set)
        }
    }

    /// Blocks these signals in the calling thread, and so in the threads
    /// it starts from now on.
    pub fn block(&self) {
        // SAFETY: reads the initialised set; no old mask is wanted.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &self.0, std::ptr::null_mut()) };
    }

    /// Waits until one of these signals is pending and takes it; `None`
    /// if sigwait fails.
    pub fn wait(&self) -> Option<libc::c_int> {
        let mut sig = 0;
        // SAFETY: sigwait reads the initialised set and writes a live int.
        (unsafe { libc::sigwait(&self.0, &mut sig) } == 0).then_some(sig)
    }

    /// Waits for `child` to end, on the calling thread, handing each of
    /// these signals (blocked) that arrives meanwhile to `forward`: one
    /// `poll` on a signalfd and the child's pidfd, no thread. Where either
    /// cannot be had (a kernel before 5.3), a thread takes the signals.
    pub fn wait_child(
        &self,
        child: &mut impl crate::child::Waited,
        forward: impl Fn(libc::c_int) + Send + Clone + 'static,
    ) -> std::io::Result<std::process::ExitStatus> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: signalfd reads the initialised set; -1 asks for a new
        // descriptor, owned below.
        let sfd = unsafe { libc::signalfd(-1, &self.0, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        let pidfd = crate::child::pidfd_of(child.pid());
        let (sfd, pidfd) = match (sfd, pidfd) {
            // SAFETY: `sfd` is a descriptor signalfd just returned.
            (sfd, Some(pidfd)) if sfd >= 0 => (unsafe { OwnedFd::from_raw_fd(sfd) }, pidfd),
            (sfd, _) => {
                if sfd >= 0 {
                    // SAFETY: closes the descriptor signalfd just returned.
                    unsafe { libc::close(sfd) };
                }
                let set = *self;
                std::thread::spawn(move || {
                    while let Some(sig) = set.wait() {
                        forward(sig);
                    }
                });
                return child.wait_end();
            }
        };
        loop {
            let mut fds = [
                rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN),
                rustix::event::PollFd::new(&sfd, rustix::event::PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            if !fds[0].revents().is_empty() {
                return child.wait_end();
            }
            // SAFETY: an all-zero signalfd_siginfo is a valid value.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reads at most one record into `info`, which is that
            // size.
            while unsafe { libc::read(sfd.as_raw_fd(), (&raw mut info).cast(), size) }
                == size as isize
            {
                forward(info.ssi_signo as libc::c_int);
            }
        }
    }
}

/// Ignores `signals` in this process from now on (and across exec: an
/// ignored signal stays ignored), as a process that must outlive its
/// terminal and stray signals does.
pub fn ignore(signals: &[libc::c_int]) {
    for &sig in signals {
        // SAFETY: SIG_IGN installs no handler code; signal only changes
        // the disposition.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}

/// Gives `signals` their default action in this process from now on: a
/// command that prints a listing ends quietly on SIGPIPE when its reader
/// goes away (`husk ps | head`), as other command-line tools do, instead
/// of failing on the write.
pub fn default_action(signals: &[libc::c_int]) {
    for &sig in signals {
        // SAFETY: SIG_DFL installs no handler code; signal only changes
        // the disposition.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}
