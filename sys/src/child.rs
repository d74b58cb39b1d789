//! What every process husk starts gets in its forked child, before exec
//! (docs/security.md): a clean signal state, and for a VMM, death with
//! whoever started it.
//!
//! A process inherits its starter's blocked signals and ignored ones
//! across exec. `husk run` blocks the signals it forwards and Rust
//! ignores SIGPIPE; a VMM that inherited them did not end on SIGTERM.

/// Unblocks every signal and gives every one its default action. Only
/// async-signal-safe calls: for `pre_exec`.
pub fn reset_signals() {
    // SAFETY: an empty set made here; sigprocmask and signal take no
    // memory of the caller's beyond it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in 1..libc::SIGRTMIN() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// Makes `cmd` a VMM's: it starts with a clean signal state and dies with
/// the calling process ([`reset_signals`], [`die_with`]).
pub fn vmm(cmd: &mut std::process::Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: async-signal-safe calls in the forked child, before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            reset_signals();
            die_with(parent);
            Ok(())
        });
    }
}

/// Has the kernel kill this process (SIGKILL) when `parent`, its starter,
/// ends; ends it now if `parent` already has. For `pre_exec`; `parent` is
/// the starter's PID, read before the fork.
pub fn die_with(parent: libc::pid_t) {
    // SAFETY: prctl, getppid and raise are async-signal-safe and take no
    // pointers.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() != parent {
            libc::raise(libc::SIGKILL);
        }
    }
}
