//! What a container's process does between fork and exec: join or create
//! namespaces, build the container's mount tree and pivot into it, then
//! limits, identity and capabilities.
//!
//! Everything here runs in the forked child of a multithreaded agent, so the
//! plan is built beforehand in the parent ([`Plan`]) and the child makes
//! system calls and formats at most one error message. That message goes
//! back to the agent through the error pipe, naming the step that failed
//! (`mount proc on /proc: Permission denied`); std's own error channel would
//! carry only the errno.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{OwnedFd, RawFd};

/// One mount of the spec, resolved.
pub struct MountStep {
    /// Source (the device, or the path a bind mount takes).
    pub source: CString,
    /// Target, absolute in the guest (under the container's root).
    pub target: CString,
    /// Where it is in the container, for messages.
    pub destination: String,
    /// File system type (empty for a bind mount).
    pub fstype: CString,
    /// `MS_*` flags.
    pub flags: libc::c_ulong,
    /// Flags applied by a second, remounting step (a read-only bind).
    pub remount_flags: Option<libc::c_ulong>,
    /// File-system options (`mode=755,size=65536k`).
    pub data: CString,
    /// The target is a file (a bind mount of a file): created as one.
    pub file: bool,
}

/// A device node to create in the container's /dev.
pub struct DeviceNode {
    /// Path in the container.
    pub path: CString,
    /// `S_IFCHR` or `S_IFBLK` with the permission bits.
    pub mode: libc::mode_t,
    /// Major and minor.
    pub dev: libc::dev_t,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// Capability sets as bit masks.
pub struct CapPlan {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

/// Who the process runs as, and with what.
pub struct ProcPlan {
    pub cwd: CString,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    pub umask: Option<libc::mode_t>,
    pub rlimits: Vec<(libc::c_int, u64, u64)>,
    pub caps: Option<CapPlan>,
    pub no_new_privileges: bool,
}

/// Everything the child does before exec.
#[derive(Default)]
pub struct Plan {
    /// Namespaces to join (exec into a running container), with their
    /// `CLONE_NEW*` type.
    pub join: Vec<(OwnedFd, libc::c_int)>,
    /// The container's cgroup's `cgroup.procs`: the child joins it first.
    pub cgroup: Option<OwnedFd>,
    /// Namespaces to create (the PID namespace is made by the spawning
    /// thread: a process cannot move itself into a new one).
    pub unshare: libc::c_int,
    /// The container's root, mounted in the guest: mounts are made under
    /// it, then it becomes `/`.
    pub rootfs: Option<CString>,
    pub mounts: Vec<MountStep>,
    /// Populate a tmpfs /dev with the standard nodes and links.
    pub default_dev: bool,
    pub devices: Vec<DeviceNode>,
    pub hostname: Option<CString>,
    pub domainname: Option<CString>,
    /// `/proc/sys/...` path and value.
    pub sysctls: Vec<(CString, Vec<u8>)>,
    pub masked: Vec<CString>,
    pub readonly_paths: Vec<CString>,
    pub root_readonly: bool,
    /// A terminal: the child makes fd 0 its controlling terminal.
    pub terminal: bool,
    pub process: Option<ProcPlan>,
}

/// A failed step: what, and the OS error.
struct Failed(String, io::Error);

fn check(what: impl FnOnce() -> String, r: libc::c_int) -> Result<(), Failed> {
    if r < 0 {
        Err(Failed(what(), io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// `mkdir -p`, for mount points.
fn mkdir_all(path: &CStr) -> io::Result<()> {
    let bytes = path.to_bytes();
    for (i, _) in bytes
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'/' && i > 0)
    {
        let prefix = CString::new(&bytes[..i]).unwrap_or_default();
        // SAFETY: mkdir with a valid C string.
        unsafe { libc::mkdir(prefix.as_ptr(), 0o755) };
    }
    // SAFETY: as above.
    if unsafe { libc::mkdir(path.as_ptr(), 0o755) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

fn make_mount_point(m: &MountStep) -> Result<(), Failed> {
    let fail = |e| Failed(format!("create mount point {}", m.destination), e);
    if !m.file {
        return mkdir_all(&m.target).map_err(fail);
    }
    let bytes = m.target.to_bytes();
    if let Some(slash) = bytes.iter().rposition(|&b| b == b'/')
        && slash > 0
    {
        mkdir_all(&CString::new(&bytes[..slash]).unwrap_or_default()).map_err(fail)?;
    }
    // SAFETY: open with a valid C string; the descriptor is closed at once.
    let fd = unsafe { libc::open(m.target.as_ptr(), libc::O_CREAT | libc::O_CLOEXEC, 0o644) };
    if fd < 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    // SAFETY: fd was just opened.
    unsafe { libc::close(fd) };
    Ok(())
}

fn do_mount(m: &MountStep) -> Result<(), Failed> {
    make_mount_point(m)?;
    let what = || {
        let kind = m.fstype.to_str().unwrap_or("");
        format!(
            "mount {} on {}",
            if kind.is_empty() { "bind" } else { kind },
            m.destination
        )
    };
    let data = if m.data.is_empty() {
        std::ptr::null()
    } else {
        m.data.as_ptr().cast()
    };
    let fstype = if m.fstype.is_empty() {
        std::ptr::null()
    } else {
        m.fstype.as_ptr()
    };
    // SAFETY: mount with valid C strings (or null where allowed).
    check(what, unsafe {
        libc::mount(m.source.as_ptr(), m.target.as_ptr(), fstype, m.flags, data)
    })?;
    if let Some(flags) = m.remount_flags {
        // SAFETY: as above; a remount takes no source or type.
        check(what, unsafe {
            libc::mount(
                std::ptr::null(),
                m.target.as_ptr(),
                std::ptr::null(),
                flags | libc::MS_REMOUNT | libc::MS_BIND,
                std::ptr::null(),
            )
        })?;
    }
    Ok(())
}

/// The standard /dev of a container (runc's default devices).
fn populate_dev(rootfs: &CStr) -> Result<(), Failed> {
    let root = rootfs.to_str().unwrap_or("");
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = cstr(&format!("{root}/dev/{name}"));
        // SAFETY: mknod with a valid C string.
        let r = unsafe {
            libc::mknod(
                path.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        };
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(Failed(
                format!("create /dev/{name}"),
                io::Error::last_os_error(),
            ));
        }
        // mknod is subject to the umask.
        // SAFETY: chmod with a valid C string.
        unsafe { libc::chmod(path.as_ptr(), 0o666) };
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
        ("core", "/proc/kcore"),
    ] {
        let (path, target) = (cstr(&format!("{root}/dev/{link}")), cstr(target));
        // SAFETY: symlink with valid C strings; an existing one is kept.
        unsafe { libc::symlink(target.as_ptr(), path.as_ptr()) };
    }
    Ok(())
}

fn pivot_into(rootfs: &CStr) -> Result<(), Failed> {
    let dot = c".";
    // SAFETY: chdir/syscall/umount2 with valid C strings.
    unsafe {
        check(
            || "enter the container's root".into(),
            libc::chdir(rootfs.as_ptr()),
        )?;
        // pivot_root(".", "."): the old root ends up stacked on the new
        // one and is detached right away, with no directory for it.
        check(
            || "pivot_root into the container's root".into(),
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int,
        )?;
        check(
            || "detach the guest's root".into(),
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH),
        )?;
        check(|| "enter /".into(), libc::chdir(c"/".as_ptr()))?;
    }
    Ok(())
}

fn is_dir(path: &CStr) -> Option<bool> {
    // SAFETY: stat into a zeroed struct with a valid C string.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::stat(path.as_ptr(), &mut st) == 0)
            .then_some(st.st_mode & libc::S_IFMT == libc::S_IFDIR)
    }
}

fn mask(path: &CStr) -> Result<(), Failed> {
    let what = || format!("mask {}", path.to_string_lossy());
    // A path that does not exist needs no mask.
    let Some(dir) = is_dir(path) else {
        return Ok(());
    };
    // SAFETY: mount with valid C strings.
    check(what, unsafe {
        if dir {
            libc::mount(
                c"tmpfs".as_ptr(),
                path.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY,
                std::ptr::null(),
            )
        } else {
            libc::mount(
                c"/dev/null".as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        }
    })
}

fn make_readonly(path: &CStr) -> Result<(), Failed> {
    if is_dir(path).is_none() {
        return Ok(());
    }
    let what = || format!("make {} read-only", path.to_string_lossy());
    // SAFETY: mount with valid C strings.
    unsafe {
        check(
            what,
            libc::mount(
                path.as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
        )?;
        check(
            what,
            libc::mount(
                std::ptr::null(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                std::ptr::null(),
            ),
        )
    }
}

const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The highest capability this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn set_identity(p: &ProcPlan, last_cap: u32) -> Result<(), Failed> {
    // SAFETY: the calls below take plain integers or point at live memory
    // of the right size.
    unsafe {
        if let Some(caps) = &p.caps {
            check(
                || "keep capabilities across setuid".into(),
                libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0),
            )?;
            for cap in 0..=last_cap {
                if caps.bounding & (1 << cap) == 0 {
                    check(
                        || format!("drop capability {cap} from the bounding set"),
                        libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0),
                    )?;
                }
            }
        }
        check(
            || format!("set additional groups {:?}", p.groups),
            libc::setgroups(p.groups.len(), p.groups.as_ptr()),
        )?;
        check(
            || format!("set group {}", p.gid),
            libc::setresgid(p.gid, p.gid, p.gid),
        )?;
        check(
            || format!("set user {}", p.uid),
            libc::setresuid(p.uid, p.uid, p.uid),
        )?;
        if let Some(caps) = &p.caps {
            let header = CapHeader {
                version: CAP_VERSION_3,
                pid: 0,
            };
            let data = [
                CapData {
                    effective: caps.effective as u32,
                    permitted: caps.permitted as u32,
                    inheritable: caps.inheritable as u32,
                },
                CapData {
                    effective: (caps.effective >> 32) as u32,
                    permitted: (caps.permitted >> 32) as u32,
                    inheritable: (caps.inheritable >> 32) as u32,
                },
            ];
            check(
                || "set capabilities".into(),
                libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int,
            )?;
            for cap in 0..=last_cap {
                if caps.ambient & (1 << cap) != 0 {
                    check(
                        || format!("raise ambient capability {cap}"),
                        libc::prctl(
                            libc::PR_CAP_AMBIENT,
                            libc::PR_CAP_AMBIENT_RAISE,
                            cap as libc::c_ulong,
                            0,
                            0,
                        ),
                    )?;
                }
            }
        }
        if p.no_new_privileges {
            check(
                || "set no_new_privileges".into(),
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            )?;
        }
    }
    Ok(())
}

fn run(plan: &Plan, last_cap: u32) -> Result<(), Failed> {
    // SAFETY: each call below takes plain integers or valid C strings.
    unsafe {
        if let Some(procs) = &plan.cgroup {
            // "0" is the writing process: the child joins before it makes
            // anything the limits should count.
            let written = libc::write(
                std::os::fd::AsRawFd::as_raw_fd(procs),
                c"0".as_ptr().cast(),
                1,
            );
            check(
                || "join the container's cgroup".into(),
                written as libc::c_int,
            )?;
        }
        if plan.terminal {
            check(|| "start a session".into(), libc::setsid())?;
            check(
                || "take the terminal".into(),
                libc::ioctl(0, libc::TIOCSCTTY, 0),
            )?;
        }
        for (fd, kind) in &plan.join {
            check(
                || format!("join the container's namespace {kind:#x}"),
                libc::setns(std::os::fd::AsRawFd::as_raw_fd(fd), *kind),
            )?;
        }
        if plan.unshare != 0 {
            check(
                || format!("create namespaces {:#x}", plan.unshare),
                libc::unshare(plan.unshare),
            )?;
        }
        if let Some(rootfs) = &plan.rootfs {
            check(
                || "make the mount tree private".into(),
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
            )?;
            check(
                || "bind the container's root".into(),
                libc::mount(
                    rootfs.as_ptr(),
                    rootfs.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ),
            )?;
            for m in &plan.mounts {
                do_mount(m)?;
            }
            if plan.default_dev {
                populate_dev(rootfs)?;
            }
            for d in &plan.devices {
                let what = || format!("create device {}", d.path.to_string_lossy());
                let r = libc::mknod(d.path.as_ptr(), d.mode, d.dev);
                if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                    return Err(Failed(what(), io::Error::last_os_error()));
                }
                check(what, libc::chown(d.path.as_ptr(), d.uid, d.gid))?;
            }
            pivot_into(rootfs)?;
        }
        for (path, value) in &plan.sysctls {
            let what = || format!("set sysctl {}", path.to_string_lossy());
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            check(what, fd)?;
            let n = libc::write(fd, value.as_ptr().cast(), value.len());
            libc::close(fd);
            check(what, n as libc::c_int)?;
        }
        for path in &plan.masked {
            mask(path)?;
        }
        for path in &plan.readonly_paths {
            make_readonly(path)?;
        }
        if plan.root_readonly {
            check(
                || "make the root read-only".into(),
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                ),
            )?;
        }
        if let Some(name) = &plan.hostname {
            check(
                || format!("set hostname {}", name.to_string_lossy()),
                libc::sethostname(name.as_ptr(), name.to_bytes().len()),
            )?;
        }
        if let Some(name) = &plan.domainname {
            check(
                || format!("set domain name {}", name.to_string_lossy()),
                libc::setdomainname(name.as_ptr(), name.to_bytes().len()),
            )?;
        }
        if let Some(p) = &plan.process {
            for &(resource, soft, hard) in &p.rlimits {
                let limit = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                check(
                    || format!("set rlimit {resource} to {soft}/{hard}"),
                    libc::setrlimit(resource as _, &limit),
                )?;
            }
            if let Some(mask) = p.umask {
                libc::umask(mask);
            }
            set_identity(p, last_cap)?;
            check(
                || format!("enter working directory {}", p.cwd.to_string_lossy()),
                libc::chdir(p.cwd.as_ptr()),
            )?;
        }
        // The agent blocks SIGCHLD in every thread (it reads it from a
        // signalfd), and a signal mask survives fork and exec: the process
        // starts with no signal blocked, as runc's does. (An inherited
        // blocked SIGCHLD hung a shell's `wait`.)
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        check(
            || "unblock signals".into(),
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()),
        )?;
    }
    Ok(())
}

/// Runs `plan` in the forked child; on failure writes what failed to
/// `err_fd` and returns the OS error (the spawn then fails).
pub fn apply(plan: &Plan, last_cap: u32, err_fd: RawFd) -> io::Result<()> {
    run(plan, last_cap).map_err(|Failed(what, e)| {
        let msg = format!("{what}: {e}");
        // SAFETY: write from a live buffer to the pipe the parent reads.
        unsafe { libc::write(err_fd, msg.as_ptr().cast(), msg.len()) };
        e
    })
}

/// The capability number of `name` (`CAP_CHOWN` is 0).
pub fn capability(name: &str) -> Option<u32> {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let short = name.strip_prefix("CAP_")?;
    NAMES.iter().position(|&n| n == short).map(|i| i as u32)
}

/// The highest capability number of the running kernel.
pub fn kernel_last_cap() -> u32 {
    last_cap()
}
