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

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use rustix::process::Signal;

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

/// Spawns `cmd` as a VMM: it starts with a clean signal state
/// ([`reset_signals`]), dies with the calling thread (SIGKILL; a process
/// whose starter is already gone ends at once), and, where this process
/// may make one (root), runs as PID 1 of a PID namespace of its own
/// (docs/security.md, "The VMM process"): it sees no host process by its
/// PID, and no other VMM sees it. Its PID here is the child's, as ever.
///
/// The namespace is made for the calling thread's children only
/// (`unshare(CLONE_NEWPID)`), and the thread's own is set back once the
/// VMM is spawned, so nothing else this process starts is in it.
pub fn spawn_vmm(cmd: &mut Command) -> std::io::Result<Child> {
    // In a namespace of its own the child's getppid() is 0 whoever its
    // parent is: a pipe tells instead. This process holds the write end
    // until the child has exec'd; the child closes its copy, and a hang-up
    // on the read end then means its starter is gone.
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let (r, w) = (read.as_raw_fd(), write.as_raw_fd());
    // SAFETY: async-signal-safe calls in the forked child, before exec;
    // `r` and `w` stay open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            reset_signals();
            libc::close(w);
            let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
            let mut hung_up = libc::pollfd {
                fd: r,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut hung_up, 1, 0) > 0 && hung_up.revents & libc::POLLHUP != 0 {
                libc::_exit(128 + libc::SIGKILL);
            }
            Ok(())
        });
    }
    let spawned = if rustix::process::geteuid().is_root() {
        in_pid_namespace(|| cmd.spawn())
    } else {
        cmd.spawn()
    };
    drop((read, write));
    spawned
}

/// Runs `spawn` with the calling thread's children in a new PID
/// namespace, then sets the thread's back. Where no namespace can be made
/// (no CAP_SYS_ADMIN: a container without it), `spawn` runs as it is.
fn in_pid_namespace(spawn: impl FnOnce() -> std::io::Result<Child>) -> std::io::Result<Child> {
    let own = std::fs::File::open("/proc/thread-self/ns/pid")?;
    // SAFETY: only the PID namespace of the thread's children changes; no
    // descriptor table or file system state is unshared.
    match unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWPID) } {
        Ok(()) => {}
        Err(rustix::io::Errno::PERM) => return spawn(),
        Err(e) => return Err(e.into()),
    }
    let spawned = spawn();
    let back = rustix::thread::move_into_link_name_space(
        own.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::ProcessID),
    );
    if let Err(e) = back {
        // This thread's next children would be in the VMM's namespace,
        // and fail once it ends: refuse rather than go on so.
        if let Ok(mut child) = spawned {
            let _ = child.kill();
            let _ = child.wait();
        }
        return Err(std::io::Error::other(format!(
            "setting the PID namespace back after the VMM's: {e}"
        )));
    }
    spawned
}
