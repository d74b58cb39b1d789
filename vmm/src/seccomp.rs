//! Seccomp filters, one per kind of thread: once a thread of the VMM has
//! been set up, it may make only the system calls its work needs. A call
//! outside its list raises SIGSYS, and the VMM exits at once with a line
//! naming the call ([`EXIT_SECCOMP`]), as Firecracker's filters do.
//!
//! - **vCPU threads** run the guest and what its exits reach: KVM's ioctls
//!   (request type 0xAE, nothing else), the virtio devices, and the
//!   virtio-fs server, whose file system calls must be relative to a
//!   directory descriptor (never `AT_FDCWD`, no `open`/`stat` by path; an
//!   `O_PATH` open, which reads nothing, is the one exception: the server
//!   opens a share's root so) and may make no device node; they connect vsock streams to the host's
//!   `<socket>_<port>` sockets (`socket` of `AF_UNIX` only). Landlock
//!   holds them beneath the shares besides ([`crate::confine`]).
//! - **the vsock thread** polls its sockets, accepts, reads and writes;
//!   in a VM with a vsock device it also serves the network devices (no
//!   network thread then): it polls their TAPs, reads frames from them and
//!   sets the TAPs' offloads (`TUNSETOFFLOAD`) where the guest's driver
//!   accepts them.
//! - **a network thread** (one per network slot, in a VM without a vsock
//!   device) does the same for its TAP alone. The vCPU threads write the
//!   guest's frames to the TAP (`write`) and make no TAP ioctl.
//! - **the API thread** accepts, reads and writes.
//! - **the main thread**, once the vCPUs run, waits for events, kicks
//!   vCPUs, makes KVM's VM-level ioctls for a snapshot and writes one, and
//!   binds a TAP the API handed it to a network slot.
//!
//! The filters are compiled once, before any thread starts
//! ([`prepare`]); each thread installs its own when it begins its loop
//! ([`enter`]). `husk-vmm --no-seccomp` leaves them out, for debugging.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// The VMM's exit status when a thread made a system call its filter does
/// not allow, or a filter could not be installed.
pub const EXIT_SECCOMP: i32 = 5;

/// The kinds of thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thread {
    /// A vCPU thread.
    Vcpu,
    /// The vsock device's host side.
    Vsock,
    /// The API socket's listener.
    Api,
    /// The virtio-net devices' host side.
    Net,
    /// The main thread, once the vCPUs run.
    Main,
}

impl Thread {
    /// Every kind of thread.
    pub const ALL: [Thread; 5] = [
        Thread::Vcpu,
        Thread::Vsock,
        Thread::Api,
        Thread::Net,
        Thread::Main,
    ];
}

/// What every thread needs: memory, locks, signals, time, its own end.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// A stream socket's traffic (vsock connections, the API's clients).
const SOCKETS: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
];

/// The virtio-fs server (fuse-backend-rs's passthrough), the vsock device
/// connecting guest streams, and the console. The calls that name a file
/// are in [`vcpu_rules`]: relative to a descriptor only.
const VCPU: &[i64] = &[
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fchmod,
    libc::SYS_fchown,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_umask,
    // CAP_FSETID is dropped around a write that must clear set-uid bits
    // (capset). The file server never switches its uid (Confined makes
    // files as the VMM and gives them the guest's owners): no setresuid.
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_fsetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    // A guest connecting to a host port reaches `<socket>_<port>` (the
    // socket itself: AF_UNIX only, in vcpu_rules).
    libc::SYS_connect,
    libc::SYS_epoll_ctl,
];

/// The calls of a vCPU thread that name a file, each with the arguments
/// (by index) that are directory descriptors: none may be `AT_FDCWD`, so
/// every name is resolved beneath a descriptor the file server holds
/// (docs/security.md).
const VCPU_AT: &[(i64, &[u8])] = &[
    (libc::SYS_newfstatat, &[0]),
    (libc::SYS_statx, &[0]),
    (libc::SYS_readlinkat, &[0]),
    (libc::SYS_unlinkat, &[0]),
    (libc::SYS_mkdirat, &[0]),
    (libc::SYS_fchmodat, &[0]),
    (libc::SYS_fchownat, &[0]),
    (libc::SYS_utimensat, &[0]),
    (libc::SYS_symlinkat, &[1]),
    (libc::SYS_linkat, &[0, 2]),
    (libc::SYS_renameat, &[0, 2]),
    (libc::SYS_renameat2, &[0, 2]),
];

/// `AT_FDCWD` as the low 32 bits of an argument.
const AT_FDCWD: u64 = libc::AT_FDCWD as u32 as u64;

/// The vCPU threads' rules with arguments: file calls relative to a
/// descriptor ([`VCPU_AT`]); `mknodat` of a regular file, FIFO or socket,
/// never of a device; `socket` of `AF_UNIX` only.
fn vcpu_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>, seccompiler::Error> {
    let not_cwd =
        |arg: u8| SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, AT_FDCWD);
    // openat: relative to a descriptor; by path only for an O_PATH
    // descriptor, which reads and writes nothing: the file server opens
    // a share's root that way when the guest mounts it (FUSE_INIT and
    // FUSE_DESTROY import the root again), and Landlock refuses any
    // content beyond the shares.
    let mut rules = vec![(
        libc::SYS_openat,
        vec![
            SeccompRule::new(vec![not_cwd(0)?])?,
            SeccompRule::new(vec![SeccompCondition::new(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(libc::O_PATH as u64),
                libc::O_PATH as u64,
            )?])?,
        ],
    )];
    for &(nr, dirfds) in VCPU_AT {
        let conditions = dirfds
            .iter()
            .map(|&a| not_cwd(a))
            .collect::<Result<_, _>>()?;
        rules.push((nr, vec![SeccompRule::new(conditions)?]));
    }
    let mut mknod = Vec::new();
    for kind in [0, libc::S_IFREG, libc::S_IFIFO, libc::S_IFSOCK] {
        mknod.push(SeccompRule::new(vec![
            not_cwd(0)?,
            SeccompCondition::new(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(u64::from(libc::S_IFMT)),
                u64::from(kind),
            )?,
        ])?);
    }
    rules.push((libc::SYS_mknodat, mknod));
    rules.push((
        libc::SYS_socket,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )?])?],
    ));
    Ok(rules)
}

const VSOCK: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// A snapshot's files, the timings file, the sockets removed at the end.
const MAIN: &[i64] = &[
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_lseek,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_pwrite64,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_statx,
    libc::SYS_getdents64,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    // A snapshot's directory must be this user's (snapshot::write).
    libc::SYS_geteuid,
    // A TAP bound to a network slot joins the network thread's epoll set
    // (a socket stand-in's type is read with getsockopt).
    libc::SYS_epoll_ctl,
    libc::SYS_getsockopt,
];

/// `ioctl(FIONBIO)`: set a descriptor non-blocking (the same number on
/// every libc; glibc's and musl's constants differ in type).
const FIONBIO: u64 = 0x5421;
/// `ioctl(FIOCLEX)`: set close-on-exec.
const FIOCLEX: u64 = 0x5451;
/// `ioctl(TUNSETOFFLOAD)`: a TAP's offloads, as the guest's driver
/// accepted them.
pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;
/// `ioctl(TUNSETVNETHDRSZ)`: the virtio-net header's size on a TAP.
pub const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
/// `ioctl(TUNGETIFF)`: a TAP's flags, checked when it is bound.
pub const TUNGETIFF: u64 = 0x8004_54d2;

/// `ioctl` requests a thread may make: KVM's (type 0xAE) for `kvm`, a
/// TAP's header size and offloads for `tap`, and setting a descriptor
/// non-blocking or close-on-exec.
fn ioctl_rules(kvm: bool, tap: bool, irq: bool) -> Result<Vec<SeccompRule>, seccompiler::Error> {
    let request = |op, value| SeccompCondition::new(1, SeccompCmpArgLen::Dword, op, value);
    let mut rules = vec![
        SeccompRule::new(vec![request(SeccompCmpOp::Eq, FIONBIO)?])?,
        SeccompRule::new(vec![request(SeccompCmpOp::Eq, FIOCLEX)?])?,
    ];
    if tap {
        for op in [TUNSETOFFLOAD, TUNSETVNETHDRSZ, TUNGETIFF] {
            rules.push(SeccompRule::new(vec![request(SeccompCmpOp::Eq, op)?])?);
        }
    }
    if kvm {
        rules.push(SeccompRule::new(vec![request(
            SeccompCmpOp::MaskedEq(0xff00),
            0xae00,
        )?])?);
    } else if irq {
        rules.push(SeccompRule::new(vec![request(
            SeccompCmpOp::Eq,
            crate::devices::virtio::mmio::KVM_IRQ_LINE,
        )?])?);
    }
    Ok(rules)
}

/// A compiled filter: classic BPF that finds a call by binary search
/// (husk-seccomp; seccompiler's chain made each thread's load cost
/// 0.15-0.3 ms of host CPU at every VM start, docs/benchmarks.md).
pub type Program = Vec<husk_seccomp::sock_filter>;

/// The filter of `thread`, compiled: a call outside it raises SIGSYS.
pub fn filter(thread: Thread) -> Result<Program, String> {
    filter_with(thread, SeccompAction::Trap)
}

/// The filter of `thread` with `refused` for a call outside it (the jail's
/// self-test uses `Errno(EPERM)`, to go on after each refusal).
pub fn filter_with(thread: Thread, refused: SeccompAction) -> Result<Program, String> {
    // A call with no rules is allowed whatever its arguments; one with
    // rules when any of them holds.
    let allow = u32::from(SeccompAction::Allow);
    let chains = rules(thread)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(nr, rules)| {
            let chain = husk_seccomp::Chain {
                unconditional: rules.is_empty().then_some(allow),
                conditional: rules.into_iter().map(|r| (r, allow)).collect(),
            };
            (nr as u32, chain)
        })
        .collect();
    husk_seccomp::program(chains, u32::from(refused))
}

/// The same rules compiled by seccompiler, a linear chain: the filter
/// [`filter`] replaced, kept for what it is measured and checked against
/// (the equivalence test, husk-bench-seccomp).
pub fn seccompiler_chain(thread: Thread) -> Result<Program, String> {
    let program: seccompiler::BpfProgram = seccompiler::SeccompFilter::new(
        rules(thread).map_err(|e| e.to_string())?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        seccompiler::TargetArch::x86_64,
    )
    .and_then(TryInto::try_into)
    .map_err(|e| e.to_string())?;
    Ok(husk_seccomp::from_seccompiler(program))
}

/// The calls `thread` may make, each with its rules on arguments (none:
/// any arguments).
pub fn rules(thread: Thread) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::Error> {
    let extra: &[&[i64]] = match thread {
        Thread::Vcpu => &[VCPU, SOCKETS],
        Thread::Vsock => &[VSOCK, SOCKETS],
        Thread::Api => &[SOCKETS],
        Thread::Net => &[VSOCK],
        Thread::Main => &[MAIN],
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(extra.iter().flat_map(|s| s.iter()))
        .map(|&nr| (nr, Vec::new()))
        .collect();
    rules.insert(
        libc::SYS_ioctl,
        ioctl_rules(
            matches!(thread, Thread::Vcpu | Thread::Main),
            // The main thread binds a TAP (its flags, header size and
            // offloads); the thread that serves the device (the vsock
            // thread, or the network thread) sets offloads later.
            matches!(thread, Thread::Main | Thread::Net | Thread::Vsock),
            // The vsock and network threads raise their device's
            // interrupt (KVM_IRQ_LINE on the VM: its own lines only).
            matches!(thread, Thread::Vsock | Thread::Net),
        )?,
    );
    if thread == Thread::Vcpu {
        rules.extend(vcpu_rules()?);
    }
    Ok(rules)
}

/// Installs `program` in the calling thread, `no_new_privs` first.
pub fn apply(program: &Program) -> std::io::Result<()> {
    rustix::thread::set_no_new_privs(true)?;
    husk_seccomp::load(program, 0)
}

struct Filters {
    vcpu: Program,
    vsock: Program,
    api: Program,
    net: Program,
    main: Program,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Compiles every filter and installs the SIGSYS handler; threads that
/// start afterwards install theirs ([`enter`]). Not called: no filters.
pub fn prepare() -> Result<(), String> {
    let filters = Filters {
        vcpu: filter(Thread::Vcpu)?,
        vsock: filter(Thread::Vsock)?,
        api: filter(Thread::Api)?,
        net: filter(Thread::Net)?,
        main: filter(Thread::Main)?,
    };
    install_sigsys_handler();
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Installs the calling thread's filter, if [`prepare`] ran. A kernel that
/// refuses it ends the VMM: it does not run unfiltered.
pub fn enter(thread: Thread) {
    let Some(filters) = FILTERS.get() else {
        return;
    };
    let program = match thread {
        Thread::Vcpu => &filters.vcpu,
        Thread::Vsock => &filters.vsock,
        Thread::Api => &filters.api,
        Thread::Net => &filters.net,
        Thread::Main => &filters.main,
    };
    if let Err(e) = apply(program) {
        eprintln!("husk-vmm: cannot install the {thread:?} thread's seccomp filter: {e}");
        // SAFETY: _exit ends the process; nothing is shared with it.
        unsafe { libc::_exit(EXIT_SECCOMP) };
    }
}

/// Writes "husk-vmm: seccomp: system call N is not allowed on thread T"
/// and ends the process: only async-signal-safe calls.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // struct siginfo for SIGSYS: si_signo, si_errno, si_code, padding, then
    // void *si_call_addr (offset 16) and int si_syscall (offset 24).
    // SAFETY: the kernel passes a siginfo of at least 128 bytes.
    let nr = unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(24).cast::<i32>()) };
    let mut line = [0u8; 96];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if len < line.len() {
                line[len] = b;
                len += 1;
            }
        }
    };
    put(b"husk-vmm: seccomp: system call ");
    put(decimal(i64::from(nr)).as_slice());
    put(b" is not allowed on thread ");
    // SAFETY: gettid takes no arguments.
    put(decimal(unsafe { libc::syscall(libc::SYS_gettid) }).as_slice());
    put(b"\n");
    // SAFETY: write of a live buffer to stderr, then _exit: both
    // async-signal-safe and allowed by every filter.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// The decimal digits of `n`, without allocating.
fn decimal(mut n: i64) -> DecimalBuf {
    let mut buf = DecimalBuf([0; 24], 0);
    let negative = n < 0;
    let mut digits = [0u8; 20];
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10).unsigned_abs() as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if negative {
        buf.0[buf.1] = b'-';
        buf.1 += 1;
    }
    for i in (0..count).rev() {
        buf.0[buf.1] = digits[i];
        buf.1 += 1;
    }
    buf
}

struct DecimalBuf([u8; 24], usize);

impl DecimalBuf {
    fn as_slice(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

fn install_sigsys_handler() {
    // SAFETY: a zeroed sigaction with a handler of the SA_SIGINFO shape.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child with `thread`'s filter installed;
    /// returns how the child ended (its exit status, or the signal).
    fn in_filtered_child(thread: Thread, f: fn() -> i32) -> (Option<i32>, Option<i32>) {
        let program = filter(thread).unwrap();
        // SAFETY: the child only installs the filter (a prctl and a
        // seccomp call on a program built before the fork) and makes raw
        // system calls, then _exits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                if apply(&program).is_err() {
                    libc::_exit(100);
                }
                libc::_exit(f());
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            if libc::WIFSIGNALED(status) {
                (None, Some(libc::WTERMSIG(status)))
            } else {
                (Some(libc::WEXITSTATUS(status)), None)
            }
        }
    }

    #[test]
    fn a_call_outside_a_threads_list_is_stopped_and_one_inside_is_not() {
        // Allowed everywhere.
        let ok = in_filtered_child(Thread::Api, || {
            // SAFETY: getpid takes no arguments.
            (unsafe { libc::syscall(libc::SYS_getpid) } > 0) as i32
        });
        assert_eq!(ok, (Some(1), None));
        // No thread of the VMM starts programs.
        for thread in Thread::ALL {
            let killed = in_filtered_child(thread, || {
                // SAFETY: execve of nothing; the filter stops it first.
                unsafe { libc::syscall(libc::SYS_execve, 0, 0, 0) as i32 }
            });
            assert_eq!(killed, (None, Some(libc::SIGSYS)), "{thread:?}");
        }
        // Only the vCPU threads open files; the API thread does not.
        let opened = in_filtered_child(Thread::Api, || {
            // SAFETY: openat of a NUL-terminated path.
            unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/".as_ptr(), 0) as i32 }
        });
        assert_eq!(opened, (None, Some(libc::SIGSYS)));
        // ioctl: KVM's requests on a vCPU thread, not a terminal's.
        let tty = in_filtered_child(Thread::Vcpu, || {
            // SAFETY: TIOCGWINSZ on fd 0 with a live winsize.
            unsafe {
                let mut ws: libc::winsize = std::mem::zeroed();
                libc::syscall(libc::SYS_ioctl, 0, libc::TIOCGWINSZ, &mut ws) as i32
            }
        });
        assert_eq!(tty, (None, Some(libc::SIGSYS)));
        let kvm = in_filtered_child(Thread::Vcpu, || {
            // SAFETY: KVM_GET_API_VERSION on a bad descriptor: EBADF, but
            // the call is made.
            unsafe { (libc::syscall(libc::SYS_ioctl, -1, 0xae00, 0) == -1) as i32 }
        });
        assert_eq!(kvm, (Some(1), None));
    }

    /// The threads that serve a network device (the vsock thread, or a
    /// network thread of its own) read its TAPs and set their offloads;
    /// they open nothing, connect nowhere (no socket of their own) and
    /// make no KVM call but the interrupt's.
    #[test]
    fn the_network_thread_touches_only_its_taps() {
        for thread in [Thread::Net, Thread::Vsock] {
            let offload = in_filtered_child(thread, || {
                // SAFETY: TUNSETOFFLOAD on a bad descriptor: EBADF, but
                // the call is made.
                unsafe { (libc::syscall(libc::SYS_ioctl, -1, TUNSETOFFLOAD, 0) == -1) as i32 }
            });
            assert_eq!(offload, (Some(1), None), "{thread:?}");
        }
        // The vsock and network threads raise their device's interrupt:
        // KVM_IRQ_LINE, and no other KVM call.
        for thread in [Thread::Net, Thread::Vsock] {
            let irq = in_filtered_child(thread, || {
                // SAFETY: KVM_IRQ_LINE on a bad descriptor: EBADF, but the
                // call is made.
                unsafe {
                    (libc::syscall(
                        libc::SYS_ioctl,
                        -1,
                        crate::devices::virtio::mmio::KVM_IRQ_LINE,
                        0,
                    ) == -1) as i32
                }
            });
            assert_eq!(irq, (Some(1), None));
        }
        let refused: [Call; 4] = [
            ("openat", || {
                // SAFETY: openat of a NUL-terminated path.
                unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/".as_ptr(), 0) as i32 }
            }),
            ("socket", || {
                // SAFETY: socket takes no pointers.
                unsafe {
                    libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) as i32
                }
            }),
            ("KVM ioctl", || {
                // SAFETY: as above, on a bad descriptor.
                unsafe { libc::syscall(libc::SYS_ioctl, -1, 0xae00, 0) as i32 }
            }),
            ("TUNSETIFF", || {
                // SAFETY: as above: a TAP is never made or renamed here.
                unsafe { libc::syscall(libc::SYS_ioctl, -1, 0x4004_54ca, 0) as i32 }
            }),
        ];
        for (name, call) in refused {
            for thread in [Thread::Net, Thread::Vsock] {
                assert_eq!(
                    in_filtered_child(thread, call),
                    (None, Some(libc::SIGSYS)),
                    "{thread:?}: {name}"
                );
            }
        }
    }

    /// A directory descriptor the filtered children use (opened before
    /// their filters, as the file server's are).
    static DIR_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

    /// A system call made in a filtered child, by name.
    type Call = (&'static str, fn() -> i32);

    fn dir_fd() -> i32 {
        DIR_FD.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Issue 14: what a guest that subverted the file server could ask a
    /// vCPU thread for. Refused: sockets other than AF_UNIX, any file
    /// call by absolute path or relative to the working directory, a
    /// block or character device node. Allowed: AF_UNIX sockets, calls
    /// relative to a directory descriptor, FIFOs.
    #[test]
    fn a_vcpu_thread_gets_no_network_no_cwd_paths_and_no_devices() {
        let dir = std::env::temp_dir().join(format!("husk-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fd = std::fs::File::open(&dir).unwrap();
        DIR_FD.store(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            std::sync::atomic::Ordering::SeqCst,
        );
        let refused: [Call; 11] = [
            ("openat(AT_FDCWD, /etc/shadow, O_RDWR)", || {
                // SAFETY: openat of a NUL-terminated path.
                unsafe {
                    libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        c"/etc/shadow".as_ptr(),
                        libc::O_RDWR,
                    ) as i32
                }
            }),
            ("socket(AF_INET)", || {
                // SAFETY: socket takes no pointers.
                unsafe {
                    libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) as i32
                }
            }),
            ("socket(AF_NETLINK)", || {
                // SAFETY: as above.
                unsafe {
                    libc::syscall(libc::SYS_socket, libc::AF_NETLINK, libc::SOCK_RAW, 0) as i32
                }
            }),
            ("socket(AF_INET6)", || {
                // SAFETY: as above.
                unsafe {
                    libc::syscall(libc::SYS_socket, libc::AF_INET6, libc::SOCK_DGRAM, 0) as i32
                }
            }),
            ("openat(AT_FDCWD, /etc/shadow)", || {
                // SAFETY: openat of a NUL-terminated path.
                unsafe {
                    libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/shadow".as_ptr(), 0)
                        as i32
                }
            }),
            ("open(/etc/shadow)", || {
                // SAFETY: open of a NUL-terminated path.
                unsafe { libc::syscall(libc::SYS_open, c"/etc/shadow".as_ptr(), 0) as i32 }
            }),
            ("newfstatat(AT_FDCWD)", || {
                // SAFETY: a stat buffer that outlives the call.
                unsafe {
                    let mut st: libc::stat = std::mem::zeroed();
                    libc::syscall(
                        libc::SYS_newfstatat,
                        libc::AT_FDCWD,
                        c"/etc".as_ptr(),
                        &mut st,
                        0,
                    ) as i32
                }
            }),
            ("renameat2 to AT_FDCWD", || {
                // SAFETY: NUL-terminated names.
                unsafe {
                    libc::syscall(
                        libc::SYS_renameat2,
                        dir_fd(),
                        c"a".as_ptr(),
                        libc::AT_FDCWD,
                        c"/tmp/b".as_ptr(),
                        0,
                    ) as i32
                }
            }),
            ("linkat to AT_FDCWD", || {
                // SAFETY: NUL-terminated names.
                unsafe {
                    libc::syscall(
                        libc::SYS_linkat,
                        dir_fd(),
                        c"a".as_ptr(),
                        libc::AT_FDCWD,
                        c"/tmp/b".as_ptr(),
                        0,
                    ) as i32
                }
            }),
            ("mknodat(block device)", || {
                // SAFETY: a NUL-terminated name.
                unsafe {
                    libc::syscall(
                        libc::SYS_mknodat,
                        dir_fd(),
                        c"sda".as_ptr(),
                        libc::S_IFBLK | 0o600,
                        0x800,
                    ) as i32
                }
            }),
            ("mknodat(char device)", || {
                // SAFETY: a NUL-terminated name.
                unsafe {
                    libc::syscall(
                        libc::SYS_mknodat,
                        dir_fd(),
                        c"mem".as_ptr(),
                        libc::S_IFCHR | 0o600,
                        0x101,
                    ) as i32
                }
            }),
        ];
        for (what, call) in refused {
            assert_eq!(
                in_filtered_child(Thread::Vcpu, call),
                (None, Some(libc::SIGSYS)),
                "{what}"
            );
        }
        let allowed: [Call; 5] = [
            ("openat(AT_FDCWD, O_PATH)", || {
                // SAFETY: openat of a NUL-terminated path.
                (unsafe {
                    libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        c"/".as_ptr(),
                        libc::O_PATH,
                    )
                } >= 0) as i32
            }),
            ("socket(AF_UNIX)", || {
                // SAFETY: socket takes no pointers.
                (unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) }
                    >= 0) as i32
            }),
            ("openat(dirfd)", || {
                // SAFETY: openat of a NUL-terminated name.
                (unsafe {
                    libc::syscall(libc::SYS_openat, dir_fd(), c".".as_ptr(), libc::O_RDONLY)
                } >= 0) as i32
            }),
            ("mknodat(FIFO)", || {
                // SAFETY: a NUL-terminated name.
                (unsafe {
                    libc::syscall(
                        libc::SYS_mknodat,
                        dir_fd(),
                        c"fifo".as_ptr(),
                        libc::S_IFIFO | 0o600,
                        0,
                    )
                } == 0) as i32
            }),
            ("mkdirat(dirfd)", || {
                // SAFETY: a NUL-terminated name.
                (unsafe { libc::syscall(libc::SYS_mkdirat, dir_fd(), c"d".as_ptr(), 0o700) } == 0)
                    as i32
            }),
        ];
        for (what, call) in allowed {
            assert_eq!(
                in_filtered_child(Thread::Vcpu, call),
                (Some(1), None),
                "{what}"
            );
        }
        assert!(dir.join("fifo").exists() && dir.join("d").is_dir());
        assert!(!dir.join("sda").exists() && !dir.join("mem").exists());
        drop(fd);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn with_the_handler_a_refused_call_ends_the_vmm_with_status_5() {
        let program = filter(Thread::Api).unwrap();
        // SAFETY: as in_filtered_child; the handler is installed in the
        // child only.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                install_sigsys_handler();
                if apply(&program).is_err() {
                    libc::_exit(100);
                }
                libc::syscall(libc::SYS_execve, 0, 0, 0);
                libc::_exit(0);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(libc::WIFEXITED(status), "killed, not exited: {status:#x}");
            assert_eq!(libc::WEXITSTATUS(status), EXIT_SECCOMP);
        }
    }

    #[test]
    fn each_threads_tree_decides_every_call_as_seccompilers_chain_would() {
        // The same rules compiled to seccompiler's chain of comparisons
        // (what the VMM loaded before) and to the tree it loads now: the
        // same action for every syscall number and the arguments the
        // rules look at, and a much shorter walk to a refusal.
        let args: [[u64; 6]; 6] = [
            [0; 6],
            [AT_FDCWD, 0, 0, 0, 0, 0],
            [3, FIONBIO, libc::O_PATH as u64, 0, 0, 0],
            [
                libc::AF_UNIX as u64,
                0xae80,
                u64::from(libc::S_IFCHR),
                0,
                0,
                0,
            ],
            [
                libc::AF_INET as u64,
                TUNSETOFFLOAD,
                u64::from(libc::S_IFREG),
                AT_FDCWD,
                0,
                0,
            ],
            [5, 0x5401, libc::O_RDONLY as u64, 0, 0, 0],
        ];
        for thread in Thread::ALL {
            let tree = filter(thread).unwrap();
            let chain = seccompiler_chain(thread).unwrap();
            let mut allowed = 0;
            for nr in 0..600 {
                for a in args {
                    let want = husk_seccomp::evaluate(&chain, nr, a);
                    assert_eq!(
                        husk_seccomp::evaluate(&tree, nr, a),
                        want,
                        "{thread:?}: {nr} {a:?}"
                    );
                    allowed += usize::from(want == libc::SECCOMP_RET_ALLOW);
                }
            }
            assert!(allowed > 0, "{thread:?}");
            assert!(
                tree.len() < chain.len() + chain.len() / 2,
                "{thread:?}: {} {}",
                tree.len(),
                chain.len()
            );
        }
    }

    #[test]
    fn numbers_print_without_allocating() {
        assert_eq!(decimal(0).as_slice(), b"0");
        assert_eq!(decimal(59).as_slice(), b"59");
        assert_eq!(decimal(-12).as_slice(), b"-12");
    }
}
