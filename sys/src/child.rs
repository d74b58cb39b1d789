//! What every process husk starts gets, in its forked child before exec
//! (docs/security.md), or for a VMM first thing after it
//! ([`spawn_vmm`], [`adopt_starter`]): a clean signal state, and as each
//! needs, a session of its own, the ready pipe at a fixed descriptor, or
//! death with whoever started it.
//!
//! A process inherits its starter's blocked signals and ignored ones
//! across exec. `husk run` blocks the signals it forwards and Rust
//! ignores SIGPIPE; a VMM that inherited them did not end on SIGTERM.
//!
//! What runs between fork and exec: async-signal-safe calls only, no
//! allocation.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
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

/// The flag [`spawn_vmm`] adds to the VMM's command: the descriptor of
/// the pipe whose hang-up tells it that its starter is gone
/// ([`adopt_starter`]).
pub const STARTER_PIPE_FLAG: &str = "--starter-pipe";

/// Spawns `cmd` as a VMM, which dies with the calling thread and, where
/// this process may make one (root), runs as PID 1 of a PID namespace of
/// its own (docs/security.md, "The VMM process"): it sees no host process
/// by its PID, and no other VMM sees it. Its PID here is the child's, as
/// ever.
///
/// Nothing runs between fork and exec, so the spawn is a `vfork`
/// (`posix_spawn`): no copy of this process's page tables, no
/// copy-on-write faults in it afterwards. The VMM program takes its clean
/// signal state and its parent-death signal itself, first thing
/// ([`adopt_starter`], given [`STARTER_PIPE_FLAG`] and the descriptor of
/// a pipe's read end). The returned descriptor is the write end: the
/// caller holds it for as long as the VMM is to live (its hang-up, on the
/// caller's end, is how a VMM that started after its starter died
/// knows).
///
/// The namespace is made for the calling thread's children only
/// (`unshare(CLONE_NEWPID)`), and the thread's own is set back once the
/// VMM is spawned, so nothing else this process starts is in it.
pub fn spawn_vmm(cmd: &mut Command) -> std::io::Result<(Child, std::os::fd::OwnedFd)> {
    // In a namespace of its own the child's getppid() is 0 whoever its
    // parent is: the pipe tells instead. Its read end is the child's (not
    // close-on-exec); the write end stays here.
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    rustix::io::fcntl_setfd(&read, rustix::io::FdFlags::empty())?;
    cmd.arg(STARTER_PIPE_FLAG).arg(read.as_raw_fd().to_string());
    let spawned = if rustix::process::geteuid().is_root() {
        in_pid_namespace(|| cmd.spawn())
    } else {
        cmd.spawn()
    };
    drop(read);
    spawned.map(|child| (child, write))
}

/// What a program [`spawn_vmm`] started does first, while it has one
/// thread, with the descriptor it was given after [`STARTER_PIPE_FLAG`]:
/// a clean signal state ([`reset_signals`]), death (SIGKILL) when the
/// thread that spawned it ends, and, where that thread is gone already
/// (the pipe's write end closed), death now. The descriptor is closed.
pub fn adopt_starter(fd: RawFd) {
    reset_signals();
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    let mut hung_up = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, ours; poll does not block (timeout 0).
    if unsafe { libc::poll(&mut hung_up, 1, 0) } > 0 && hung_up.revents & libc::POLLHUP != 0 {
        // SAFETY: _exit ends the process; nothing of it runs after.
        unsafe { libc::_exit(128 + libc::SIGKILL) };
    }
    // SAFETY: the descriptor was handed to this process for this alone.
    unsafe { libc::close(fd) };
}

/// The flag [`ready_pipe`] adds to a VMM's command: the descriptor of the
/// pipe's write end, on which it [`tell_ready`]s.
pub const READY_FD_FLAG: &str = "--ready-fd";

/// A pipe on which the program `cmd` will start tells that it is ready
/// (its sockets bound): its write end is the child's (not close-on-exec,
/// named after [`READY_FD_FLAG`]; the caller drops it once `cmd` is
/// spawned); the returned read end is the caller's, for [`wait_ready`].
/// For a spawn with no other thread starting programs meanwhile (the
/// write end is inheritable until it is dropped).
pub fn ready_pipe(cmd: &mut Command) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    rustix::io::fcntl_setfd(&write, rustix::io::FdFlags::empty())?;
    cmd.arg(READY_FD_FLAG).arg(write.as_raw_fd().to_string());
    Ok((read, write))
}

/// The child's side of [`ready_pipe`]: one byte written, the descriptor
/// closed.
pub fn tell_ready(fd: RawFd) {
    // SAFETY: writes one byte from a live buffer to `fd`, then closes the
    // descriptor, which this process owns (its starter's pipe) and nothing
    // else here uses.
    unsafe {
        libc::write(fd, b"r".as_ptr().cast(), 1);
        libc::close(fd);
    }
}

/// A pidfd of `child`, readable once it has ended; `None` on a kernel
/// without pidfds (before 5.3).
pub fn pidfd(child: &Child) -> Option<OwnedFd> {
    pidfd_of(child.id())
}

/// Waits up to `timeout` for `child` to tell it is ready on `ready`
/// ([`ready_pipe`]'s read end): `true` once it did; `false` where it ended
/// (or closed the pipe) without, or the time ran out.
pub fn wait_ready(child: &Child, ready: &OwnedFd, timeout: std::time::Duration) -> bool {
    let pidfd = pidfd(child);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(left) = rustix::time::Timespec::try_from(left) else {
            return false;
        };
        let mut fds: Vec<_> = std::iter::once(ready)
            .chain(&pidfd)
            .map(|fd| rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN))
            .collect();
        match rustix::event::poll(&mut fds, Some(&left)) {
            Err(rustix::io::Errno::INTR) => continue,
            Ok(n) if n > 0 && !fds[0].revents().is_empty() => {
                let mut byte = [0u8; 1];
                return matches!(rustix::io::read(ready, &mut byte), Ok(1));
            }
            // The time ran out, the child ended first, or poll failed.
            _ => return false,
        }
    }
}

/// Waits up to `timeout` for `child` to end: its status, or `None` where
/// it still runs. Sleeps on the child's pidfd (one `poll`) rather than
/// polling its status; a kernel without pidfds (before 5.3) gets the
/// polling.
pub fn wait_timeout(
    child: &mut Child,
    timeout: std::time::Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    if let Some(status) = child.try_wait()? {
        return Ok(Some(status));
    }
    let deadline = std::time::Instant::now() + timeout;
    let pidfd = pidfd(child);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match &pidfd {
            Some(fd) => {
                let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
                let left = rustix::time::Timespec::try_from(left).ok();
                match rustix::event::poll(&mut fds, left.as_ref()) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            None => std::thread::sleep(left.min(std::time::Duration::from_millis(5))),
        }
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if left.is_zero() {
            return Ok(None);
        }
    }
}

/// A child process this one waits for (a monitor: spawned, or forked
/// without exec, [`Forked`]).
pub trait Waited {
    /// Its PID.
    fn pid(&self) -> u32;
    /// Waits for it to end.
    fn wait_end(&mut self) -> std::io::Result<std::process::ExitStatus>;
}

/// A child made by `fork` alone, running this program's code: its PID,
/// and its status once waited for.
#[derive(Debug)]
pub struct Forked {
    pid: u32,
    status: Option<std::process::ExitStatus>,
}

impl Forked {
    /// The child `pid`, which this process forked.
    pub fn new(pid: u32) -> Self {
        Self { pid, status: None }
    }
}

impl Waited for Forked {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn wait_end(&mut self) -> std::io::Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        if let Some(status) = self.status {
            return Ok(status);
        }
        let mut raw = 0;
        loop {
            // SAFETY: waitpid writes the status into `raw`, an int.
            let r = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut raw, 0) };
            if r >= 0 {
                let status = std::process::ExitStatus::from_raw(raw);
                self.status = Some(status);
                return Ok(status);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// A pidfd of the process `pid`; `None` on a kernel without pidfds
/// (before 5.3), or where it is gone and reaped.
pub fn pidfd_of(pid: u32) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid as i32)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// In a forked child that runs on without exec, as [`detached_with_fd`]
/// sets up an exec'd one: `stdio` (where given) at descriptors 0-2,
/// `fd` at `at`, every other descriptor closed, a session of its own,
/// a clean signal state. `at` must be above 2.
pub fn detach_forked(stdio: Option<[RawFd; 3]>, fd: RawFd, at: RawFd) -> std::io::Result<()> {
    // Everything moved out of the way first, above whatever it lands on.
    let high = |fd: RawFd| {
        // SAFETY: F_DUPFD takes a descriptor and a number, no memory.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, at + 1) };
        match new < 0 {
            true => Err(std::io::Error::last_os_error()),
            false => Ok(new),
        }
    };
    let fd = high(fd)?;
    if let Some(stdio) = stdio {
        let moved = [high(stdio[0])?, high(stdio[1])?, high(stdio[2])?];
        for (to, from) in moved.into_iter().enumerate() {
            // SAFETY: dup2 takes two descriptors, no memory; the new one
            // is not close-on-exec (what the monitor runs inherits it).
            if unsafe { libc::dup2(from, to as RawFd) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    // SAFETY: as above.
    if unsafe { libc::dup2(fd, at) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: close_range takes numbers only.
    unsafe { libc::syscall(libc::SYS_close_range, at + 1, u32::MAX, 0) };
    let _ = rustix::process::setsid();
    reset_signals();
    Ok(())
}

/// What /proc/self/stat tells of this process: its thread count, and
/// where its command line lies in its memory.
#[derive(Debug, Clone, Copy)]
pub struct Own {
    /// Its threads: a `fork` whose child goes on running Rust code needs
    /// one, since a lock another thread held at the fork (the
    /// allocator's) stays held in the child for ever.
    pub threads: u64,
    /// The command line's first byte and the byte past its last.
    args: (usize, usize),
}

impl Own {
    /// Reads /proc/self/stat; `None` where it cannot be read.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // After the command name's closing parenthesis (which the name
        // may itself hold) comes field 3: num_threads is field 20,
        // arg_start and arg_end fields 48 and 49.
        let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| rest.get(n - 3)?.parse().ok();
        Some(Self {
            threads: field(20)?,
            args: (field(48)? as usize, field(49)? as usize),
        })
    }

    /// Bytes its command line has room for, the last NUL included.
    pub fn room(&self) -> usize {
        self.args.1.saturating_sub(self.args.0)
    }
}

/// The bytes of a command line: each argument NUL-terminated.
pub fn cmdline_bytes(args: &[&std::ffi::OsStr]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut line = Vec::new();
    for arg in args {
        line.extend_from_slice(arg.as_bytes());
        line.push(0);
    }
    line
}

/// Writes `args` over this process's command line where it lies in its
/// memory, NULs after, as `ps` and /proc/PID/cmdline then show it (a
/// forked monitor: its starter's would be shown). `false`, and nothing
/// written, where it does not fit [`Own::room`] (moving it elsewhere
/// needs CAP_SYS_RESOURCE, which a container's root may lack).
///
/// # Safety
///
/// `own` is this process's, read since it last changed; nothing else in
/// the process reads its arguments meanwhile (one thread).
pub unsafe fn rewrite_cmdline(own: &Own, args: &[&std::ffi::OsStr]) -> bool {
    let line = cmdline_bytes(args);
    if line.len() > own.room() || own.args.0 == 0 {
        return false;
    }
    // SAFETY: [arg_start, arg_end) is this process's argument area, on
    // its stack, writable and its own (the caller's promise); `line` fits.
    unsafe {
        let to = own.args.0 as *mut u8;
        std::ptr::copy_nonoverlapping(line.as_ptr(), to, line.len());
        std::ptr::write_bytes(to.add(line.len()), 0, own.room() - line.len());
    }
    true
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forked_child_is_waited_for_once() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let pid = child.id();
        // Reaped through `forked`, not `child`.
        std::mem::forget(child);
        let mut forked = Forked::new(pid);
        assert_eq!(forked.pid(), pid);
        assert_eq!(forked.wait_end().unwrap().code(), Some(7));
        // Reaped: the status is kept, not asked again.
        assert_eq!(forked.wait_end().unwrap().code(), Some(7));
    }

    #[test]
    fn threads_are_counted() {
        assert!(Own::read().unwrap().threads >= 1);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        // This one and `other` at least (the harness may run more).
        assert!(Own::read().unwrap().threads >= 2);
        drop(tx);
        let _ = other.join();
    }

    /// The descriptors [`detach_forked_leaves_stdio_and_the_channel_alone`]'s
    /// child is given (stdio's three, the channel, one to be closed), and
    /// the inodes of the pipe, stderr's socket and the channel.
    static GIVEN: [std::sync::atomic::AtomicI32; 5] =
        [const { std::sync::atomic::AtomicI32::new(-1) }; 5];
    static INODES: [std::sync::atomic::AtomicU64; 3] =
        [const { std::sync::atomic::AtomicU64::new(0) }; 3];

    /// The inode of descriptor `fd` (0 where it is not open).
    fn inode(fd: RawFd) -> u64 {
        // SAFETY: fstat writes into a local of its type.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            match libc::fstat(fd, &mut st) {
                0 => st.st_ino,
                _ => 0,
            }
        }
    }

    /// A forked monitor's descriptors and session: stdio moved to 0-2
    /// (from descriptors above them, each where it was asked), the
    /// channel at 3, every other descriptor closed, a session of its own.
    #[test]
    fn detach_forked_leaves_stdio_and_the_channel_alone() {
        use std::sync::atomic::Ordering::SeqCst;
        let (read, write) = rustix::pipe::pipe().unwrap();
        let (err, channel) = std::os::unix::net::UnixStream::pair().unwrap();
        let extra = std::fs::File::open("/dev/null").unwrap();
        // stdin the pipe's write end and stdout its read end, swapped on
        // purpose: each must land where asked.
        let given = [
            write.as_raw_fd(),
            read.as_raw_fd(),
            err.as_raw_fd(),
            channel.as_raw_fd(),
            extra.as_raw_fd(),
        ];
        for (slot, fd) in given.into_iter().enumerate() {
            GIVEN[slot].store(fd, SeqCst);
        }
        for (slot, fd) in [read.as_raw_fd(), err.as_raw_fd(), channel.as_raw_fd()]
            .into_iter()
            .enumerate()
        {
            INODES[slot].store(inode(fd), SeqCst);
        }
        let status = in_child(|| {
            let given: [RawFd; 5] = std::array::from_fn(|i| GIVEN[i].load(SeqCst));
            let ino: [u64; 3] = std::array::from_fn(|i| INODES[i].load(SeqCst));
            if detach_forked(Some([given[0], given[1], given[2]]), given[3], 3).is_err() {
                return 1;
            }
            // SAFETY: fcntl on descriptor numbers, no memory.
            let mode = |fd: RawFd| unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_ACCMODE;
            if [inode(0), inode(1), inode(2), inode(3)] != [ino[0], ino[0], ino[1], ino[2]] {
                return 2;
            }
            if (mode(0), mode(1)) != (libc::O_WRONLY, libc::O_RDONLY) {
                return 3;
            }
            if (4..64).any(|fd| inode(fd) != 0) {
                return 4;
            }
            // SAFETY: getsid and getpid take no pointers.
            if unsafe { libc::getsid(0) != libc::getpid() } {
                return 5;
            }
            0
        });
        assert_eq!(status, 0);
        drop((read, write, err, channel, extra));
    }

    /// Set in the test's own child, which rewrites its command line.
    const REWRITE_CHILD: &str = "HUSK_TEST_REWRITE_CMDLINE";

    #[test]
    fn a_command_line_is_shown_as_rewritten_where_it_fits() {
        if std::env::var_os(REWRITE_CHILD).is_some() {
            return rewrite_in_this_process();
        }
        // In a child of its own (this test again): the test process's own
        // line stays.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child::tests::a_command_line_is_shown_as_rewritten_where_it_fits",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(REWRITE_CHILD, "1")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("too long: refused, unchanged"), "{said}");
        assert!(
            said.contains("cmdline=husk|--root|/r|_monitor|c1|"),
            "{said}"
        );
    }

    fn rewrite_in_this_process() {
        use std::ffi::OsStr;
        let shown = || -> String {
            std::fs::read("/proc/self/cmdline")
                .unwrap()
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| format!("{}|", String::from_utf8_lossy(a)))
                .collect()
        };
        let own = Own::read().unwrap();
        let before = shown();
        let long = "x".repeat(own.room());
        // SAFETY: this process's own, read just now; the harness's other
        // threads do not read the arguments.
        assert!(!unsafe { rewrite_cmdline(&own, &[OsStr::new(&long)]) });
        assert_eq!(shown(), before);
        println!("too long: refused, unchanged");
        let args = ["husk", "--root", "/r", "_monitor", "c1"].map(OsStr::new);
        // SAFETY: as above.
        assert!(unsafe { rewrite_cmdline(&own, &args) });
        println!("cmdline={}", shown());
    }

    /// Runs `child` in a forked child (async-signal-safe calls only) and
    /// returns its exit status.
    fn in_child(child: fn() -> i32) -> i32 {
        // SAFETY: the child makes only async-signal-safe calls, then
        // _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: ends the forked child.
            unsafe { libc::_exit(child()) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "{status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// A starter already gone (the pipe's write end closed): the VMM
    /// ends at once, as SIGKILL would have ended it.
    #[test]
    fn a_vmm_whose_starter_is_gone_ends_at_once() {
        let status = in_child(|| {
            let mut fds = [0; 2];
            // SAFETY: a pipe into a local array; the write end is closed.
            unsafe {
                libc::pipe(fds.as_mut_ptr());
                libc::close(fds[1]);
            }
            adopt_starter(fds[0]);
            0
        });
        assert_eq!(status, 128 + libc::SIGKILL);
    }

    /// A starter still there: the VMM goes on, with the parent-death
    /// signal set, no signal blocked or ignored, and the pipe closed.
    #[test]
    fn a_vmm_whose_starter_is_there_takes_its_death_signal_and_clean_signals() {
        let status = in_child(|| {
            let mut fds = [0; 2];
            // SAFETY: a pipe into a local array, SIGTERM ignored and
            // blocked as a monitor's would be; each call reads or writes
            // only locals.
            unsafe {
                libc::pipe(fds.as_mut_ptr());
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            adopt_starter(fds[0]);
            let mut death = 0;
            // SAFETY: each call reads or writes only locals.
            unsafe {
                libc::prctl(libc::PR_GET_PDEATHSIG, &mut death);
                if death != libc::SIGKILL {
                    return 1;
                }
                if libc::fcntl(fds[0], libc::F_GETFD) != -1 {
                    return 2;
                }
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut old);
                if old.sa_sigaction != libc::SIG_DFL {
                    return 3;
                }
                let mut mask: libc::sigset_t = std::mem::zeroed();
                libc::sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask);
                if libc::sigismember(&mask, libc::SIGTERM) == 1 {
                    return 4;
                }
            }
            0
        });
        assert_eq!(status, 0);
    }

    /// A child still running is waited for until the limit and reported
    /// running; one that ends is reported as soon as it does, with its
    /// status.
    #[test]
    fn wait_timeout_waits_until_the_end_or_the_limit() {
        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let start = std::time::Instant::now();
        let waited = wait_timeout(&mut sleeper, std::time::Duration::from_millis(200)).unwrap();
        assert!(waited.is_none());
        assert!(start.elapsed() >= std::time::Duration::from_millis(200));
        sleeper.kill().unwrap();
        let start = std::time::Instant::now();
        let waited = wait_timeout(&mut sleeper, std::time::Duration::from_secs(30)).unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&waited.unwrap()),
            Some(libc::SIGKILL)
        );
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        let mut quick = Command::new("sh")
            .args(["-c", "sleep 0.2; exit 3"])
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let waited = wait_timeout(&mut quick, std::time::Duration::from_secs(30)).unwrap();
        assert_eq!(waited.unwrap().code(), Some(3));
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
    }

    /// A child that writes on its ready pipe is seen ready; one that ends
    /// without is not, at once; one that lives on without is not, at the
    /// limit.
    #[test]
    fn wait_ready_sees_the_byte_the_end_or_the_limit() {
        let spawn = |script: &str| {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", script, "sh"]);
            let (ready, theirs) = ready_pipe(&mut cmd).unwrap();
            let child = cmd.spawn().unwrap();
            drop(theirs);
            (child, ready)
        };
        let limit = std::time::Duration::from_secs(30);
        let (mut child, ready) = spawn("sleep 0.2; printf r >&\"$2\"; sleep 0.2");
        assert!(wait_ready(&child, &ready, limit));
        child.wait().unwrap();
        let (mut child, ready) = spawn("exit 3");
        let start = std::time::Instant::now();
        assert!(!wait_ready(&child, &ready, limit));
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        child.wait().unwrap();
        let (mut child, ready) = spawn("exec sleep 30");
        let start = std::time::Instant::now();
        assert!(!wait_ready(
            &child,
            &ready,
            std::time::Duration::from_millis(300)
        ));
        assert!(start.elapsed() >= std::time::Duration::from_millis(300));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
