//! Signals a thread takes instead of having them delivered: a foreground
//! `husk run` blocks the ones it forwards before it starts any thread,
//! and one thread waits for them (sigwait). No crate husk uses wraps
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
