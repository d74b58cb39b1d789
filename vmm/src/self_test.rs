//! `husk-vmm --self-test`: the jail tried from inside, as a guest that took
//! over the VMM would try to get out (tests only; docs/security.md).
//!
//! The process jails itself exactly as for a VM (main.rs), then runs the
//! probes on a thread set up as a vCPU thread is, twice: first with the
//! jail alone (its root, uid, namespaces, the vCPU thread's capabilities),
//! then with Landlock and the vCPU thread's seccomp filter on top (refusing
//! with EPERM instead of ending the process). Each probe prints one JSON
//! line `{"probe", "layer", "refused", "errno"}`; controls (what a VMM
//! must still be able to do) print `"control": true`. The exit status is 0
//! only if every probe was refused and every control succeeded.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use husk_protocol::share::Share;

/// What the probes aim at, from the test that runs the self-test.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    /// Another running VMM (signal, trace, read its memory).
    pub pid: Option<u32>,
    /// A file of another container, outside this one's shares.
    pub file: Option<PathBuf>,
    /// A TCP port listening on the host's 127.0.0.1.
    pub port: Option<u16>,
    /// A file the jail holds read-only (the kernel): reopened for writing.
    pub read_only: Option<PathBuf>,
    /// This VM's shares: a control writes and reads a file in the first
    /// read-write one.
    pub shares: Vec<Share>,
}

/// One outcome.
struct Outcome {
    probe: &'static str,
    /// The call failed, with this errno (0: it succeeded).
    errno: i32,
    control: bool,
}

fn errno_of<T, E: Into<io::Error>>(r: Result<T, E>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.into().raw_os_error().unwrap_or(-1),
    }
}

fn last() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

/// `r` from a raw system call: 0 when it succeeded, else the errno.
fn sys(r: libc::c_long) -> i32 {
    if r < 0 { last() } else { 0 }
}

/// Every probe and control, on the calling thread.
fn probes(targets: &Targets) -> Vec<Outcome> {
    let mut out = Vec::new();
    let mut probe = |probe: &'static str, errno: i32| {
        out.push(Outcome {
            probe,
            errno,
            control: false,
        })
    };
    // Host files, by path and through /proc.
    probe("read /etc/shadow", errno_of(std::fs::read("/etc/shadow")));
    probe(
        "read /proc/1/root/etc/shadow",
        errno_of(std::fs::read("/proc/1/root/etc/shadow")),
    );
    if let Some(file) = &targets.file {
        probe(
            "read another container's file",
            errno_of(std::fs::read(file)),
        );
    }
    if let Some(share) = targets.shares.first() {
        let up = share.dir.join("../../../../../../etc/passwd");
        probe("read ../ out of a share", errno_of(std::fs::read(up)));
    }
    // open_by_handle_at of an ext4 root inode (handle type 1: ino 2,
    // generation 0): needs CAP_DAC_READ_SEARCH.
    {
        #[repr(C)]
        struct Handle {
            bytes: u32,
            kind: i32,
            f: [u32; 2],
        }
        let mut handle = Handle {
            bytes: 8,
            kind: 1,
            f: [2, 0],
        };
        let root = std::fs::File::open("/").ok();
        let fd = root.as_ref().map_or(-1, |f| f.as_raw_fd());
        // SAFETY: open_by_handle_at reads the handle struct above (its
        // size in `bytes`); the descriptor returned, if any, is closed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                fd,
                &mut handle as *mut Handle,
                libc::O_RDONLY,
            )
        };
        if r >= 0 {
            // SAFETY: closes the descriptor just returned.
            unsafe { libc::close(r as i32) };
        }
        probe("open_by_handle_at", sys(r));
    }
    // Writes outside the shares.
    probe("create /x", errno_of(std::fs::write("/x", b"x")));
    probe(
        "create /proc/self/x",
        errno_of(std::fs::write("/proc/self/x", b"x")),
    );
    if let Some(ro) = &targets.read_only {
        probe(
            "reopen a read-only file for writing",
            errno_of(std::fs::OpenOptions::new().write(true).open(ro)),
        );
    }
    // Other processes.
    if let Some(pid) = targets.pid {
        let pid = pid as libc::pid_t;
        // SAFETY: kill with signal 0 only checks permission.
        probe("kill another VMM", sys(unsafe { libc::kill(pid, 0) } as _));
        // SAFETY: tgkill with signal 0 only checks permission.
        probe(
            "tgkill another VMM",
            sys(unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, 0) }),
        );
        // SAFETY: PTRACE_ATTACH takes no memory; detached again if it worked.
        let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
        if r == 0 {
            // SAFETY: as above.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
        }
        probe("ptrace another VMM", sys(r));
        let mut buf = [0u8; 8];
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: 0x40_0000 as *mut libc::c_void,
            iov_len: 8,
        };
        // SAFETY: reads at most 8 bytes into `buf`.
        let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        probe("read another VMM's memory", sys(r as _));
    }
    // The network.
    if let Some(port) = targets.port {
        probe(
            "TCP connect to the host",
            errno_of(std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                std::time::Duration::from_secs(2),
            )),
        );
    }
    // The kernel and the mount table.
    // SAFETY: finit_module of descriptor -1 with an empty argument string.
    probe(
        "load a kernel module",
        sys(unsafe { libc::syscall(libc::SYS_finit_module, -1, c"".as_ptr(), 0) }),
    );
    probe(
        "mount a tmpfs",
        errno_of(rustix::mount::mount(
            "none",
            "/proc",
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            c"",
        )),
    );
    probe(
        "unmount /proc/self",
        errno_of(rustix::mount::unmount(
            "/proc/self",
            rustix::mount::UnmountFlags::DETACH,
        )),
    );
    // SAFETY: unshare takes no memory.
    probe(
        "unshare a user namespace",
        sys(unsafe { libc::unshare(libc::CLONE_NEWUSER) } as _),
    );
    probe(
        "chroot",
        sys(
            // SAFETY: a NUL-terminated path.
            unsafe { libc::chroot(c"/proc".as_ptr()) } as _,
        ),
    );
    // Its identity.
    // SAFETY: raw setresuid of the calling thread; no memory.
    probe(
        "setresuid(0)",
        sys(unsafe { libc::syscall(libc::SYS_setresuid, 0, 0, 0) }),
    );
    // SAFETY: as above.
    probe(
        "setresuid(another VMM's uid)",
        sys(unsafe { libc::syscall(libc::SYS_setresuid, -1, crate::confine::ID_BASE + 1, -1) }),
    );
    probe(
        "capset CAP_SYS_ADMIN",
        errno_of(rustix::thread::set_capabilities(
            None,
            rustix::thread::CapabilitySets {
                effective: rustix::thread::CapabilitySet::SYS_ADMIN,
                permitted: rustix::thread::CapabilitySet::SYS_ADMIN,
                inheritable: rustix::thread::CapabilitySet::empty(),
            },
        )),
    );
    // SAFETY: PR_CAP_AMBIENT_RAISE of CAP_DAC_OVERRIDE; no memory.
    probe(
        "raise an ambient capability",
        sys(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, 1, 0, 0) } as _),
    );
    // SAFETY: PR_SET_SECUREBITS with 0; no memory.
    probe(
        "clear the securebits",
        sys(unsafe { libc::prctl(libc::PR_SET_SECUREBITS, 0, 0, 0, 0) } as _),
    );
    // Controls: its own share is served.
    if let Some(share) = targets.shares.iter().find(|s| !s.read_only) {
        // As the file server does: names beneath a descriptor of the share.
        use rustix::fs::{Mode, OFlags};
        let name = "husk-self-test";
        let wrote = (|| -> io::Result<Vec<u8>> {
            let dir = rustix::fs::openat(
                rustix::fs::CWD,
                &share.dir,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let file = rustix::fs::openat(
                &dir,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            rustix::io::write(&file, b"self-test")?;
            let file =
                rustix::fs::openat(&dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
            let mut buf = vec![0u8; 64];
            let n = rustix::io::read(&file, &mut buf)?;
            buf.truncate(n);
            rustix::fs::unlinkat(&dir, name, rustix::fs::AtFlags::empty())?;
            Ok(buf)
        })();
        let errno = match wrote {
            Ok(bytes) if bytes == b"self-test" => 0,
            Ok(_) => libc::EIO,
            Err(e) => e.raw_os_error().unwrap_or(-1),
        };
        out.push(Outcome {
            probe: "write and read a file in its share",
            errno,
            control: true,
        });
    }
    out
}

/// Runs the probes on a thread of its own with `layer`'s set-up, printing
/// one line each; whether every outcome was as it must be.
fn run_layer(layer: &'static str, targets: &Targets, full: bool) -> bool {
    let targets = targets.clone();
    let result = std::thread::spawn(move || {
        if full {
            if let Err(e) = crate::confine::vcpu_thread(&targets.shares) {
                eprintln!("husk-vmm: self-test: {e}");
                return None;
            }
        }
        if let Err(e) = crate::confine::narrow_capabilities(crate::seccomp::Thread::Vcpu) {
            eprintln!("husk-vmm: self-test: {e}");
            return None;
        }
        let _ = rustix::thread::set_no_new_privs(true);
        if full {
            let program = crate::seccomp::filter_with(
                crate::seccomp::Thread::Vcpu,
                seccompiler::SeccompAction::Errno(libc::EPERM as u32),
            );
            match program.map(|p| crate::seccomp::apply(&p)) {
                Ok(Ok(())) => {}
                e => {
                    eprintln!("husk-vmm: self-test: seccomp: {e:?}");
                    return None;
                }
            }
        }
        Some(probes(&targets))
    })
    .join()
    .ok()
    .flatten();
    let Some(outcomes) = result else {
        return false;
    };
    let mut all = true;
    for o in outcomes {
        let good = if o.control {
            o.errno == 0
        } else {
            o.errno != 0
        };
        all &= good;
        println!(
            "{}",
            serde_json::json!({
                "probe": o.probe,
                "layer": layer,
                "control": o.control,
                "refused": o.errno != 0,
                "errno": o.errno,
                "as_it_must_be": good,
            })
        );
    }
    all
}

/// Both layers; true if every probe was refused and every control worked.
pub fn run(targets: &Targets) -> bool {
    let jail = run_layer("jail", targets, false);
    let all = run_layer("jail+landlock+seccomp", targets, true);
    jail && all
}
