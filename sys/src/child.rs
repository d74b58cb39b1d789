//! What every process husk starts gets in its forked child, before exec
//! (docs/security.md): a clean signal state, and as each needs, a
//! session of its own, the ready pipe at a fixed descriptor, or death
//! with whoever started it.
//!
//! A process inherits its starter's blocked signals and ignored ones
//! across exec. `husk run` blocks the signals it forwards and Rust
//! ignores SIGPIPE; a VMM that inherited them did not end on SIGTERM.
//!
//! Everything here runs between fork and exec: async-signal-safe calls
//! only, no allocation.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::process::{Pid, Signal};

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

/// Makes `cmd` start with a clean signal state ([`reset_signals`]): a
/// hook.
pub fn clean(cmd: &mut Command) {
    // SAFETY: reset_signals is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            reset_signals();
            Ok(())
        });
    }
}

/// Makes `cmd` start in a session of its own with a clean signal state: a
/// terminal's signals (Ctrl-C to a foreground `husk run`) and hang-ups do
/// not reach it, and it outlives its starter.
pub fn detached(cmd: &mut Command) {
    // SAFETY: setsid and reset_signals are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let _ = rustix::process::setsid();
            reset_signals();
            Ok(())
        });
    }
}

/// [`detached`], with `fd` as its descriptor `at` and no other descriptor
/// of the caller's above `at`: a caller that waits for a pipe's end must
/// not wait for the child's. `fd` must stay open until `cmd` is spawned;
/// spawning fails if it cannot be put at `at`.
pub fn detached_with_fd(cmd: &mut Command, fd: RawFd, at: RawFd) {
    // SAFETY: dup2, fcntl, close_range, setsid and reset_signals are
    // async-signal-safe and take no pointers; dup2 only reads `fd`.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it instead.
            let placed = if fd == at {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, at)
            };
            if placed < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::syscall(libc::SYS_close_range, at + 1, u32::MAX, 0);
            let _ = rustix::process::setsid();
            reset_signals();
            Ok(())
        });
    }
}

/// Makes `cmd` a VMM's: it starts with a clean signal state and dies with
/// the calling process ([`reset_signals`], [`die_with`]).
pub fn vmm(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: async-signal-safe calls in the forked child, before exec.
    unsafe {
        cmd.pre_exec(move || {
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
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    if Pid::as_raw(rustix::process::getppid()) != parent {
        let _ = rustix::process::kill_process(rustix::process::getpid(), Signal::KILL);
    }
}
