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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{CWD, Dev, FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::{Gid, Resource, Rlimit, Uid};
use rustix::thread::{CapabilitySet, CapabilitySets, LinkNameSpaceType, UnshareFlags};

use crate::seccomp;

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
    pub flags: MountFlags,
    /// Flags applied by a second, remounting step (a read-only bind).
    pub remount_flags: Option<MountFlags>,
    /// File-system options (`mode=755,size=65536k`).
    pub data: CString,
    /// The target is a file (a bind mount of a file): created as one.
    pub file: bool,
}

/// A device node to create in the container's /dev.
pub struct DeviceNode {
    /// Path in the container.
    pub path: CString,
    /// Character or block device (or FIFO).
    pub file_type: FileType,
    /// Permission bits.
    pub mode: Mode,
    /// Major and minor.
    pub dev: Dev,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// The directories above it in the container's root, outermost
    /// first, made if missing (a privileged container's `/dev/cpu/0/`).
    pub parents: Vec<CString>,
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
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<Gid>,
    pub umask: Option<u32>,
    pub rlimits: Vec<(Resource, u64, u64)>,
    pub caps: Option<CapPlan>,
    pub no_new_privileges: bool,
    /// `process.oomScoreAdj`, as the text /proc takes.
    pub oom_score_adj: Option<Vec<u8>>,
}

/// A user namespace the child makes for itself last, once its mounts,
/// devices and sysctls are in place as the guest's root, and whose ID maps
/// the agent writes (a process cannot map its own namespace beyond its
/// own ID). The container's other namespaces stay the guest root's.
pub struct UserNs {
    /// `uid_map`'s text.
    pub uid_map: Vec<u8>,
    /// `gid_map`'s text.
    pub gid_map: Vec<u8>,
    /// The child's end of the socket to the agent thread that writes the
    /// maps ([`write_maps`]); set by the spawn.
    pub sock: Option<OwnedFd>,
}

/// Everything the child does before exec.
pub struct Plan {
    /// Namespaces to join (exec into a running container), with their
    /// `CLONE_NEW*` type.
    pub join: Vec<(OwnedFd, LinkNameSpaceType)>,
    /// The container's cgroup's `cgroup.procs`: the child joins it first.
    pub cgroup: Option<OwnedFd>,
    /// Namespaces to create (the PID namespace is made by the spawning
    /// thread: a process cannot move itself into a new one).
    pub unshare: UnshareFlags,
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
    /// `linux.rootfsPropagation`, given to `/` once it is the container's.
    pub rootfs_propagation: Option<MountPropagationFlags>,
    /// A terminal: the child makes fd 0 its controlling terminal.
    pub terminal: bool,
    /// A user namespace of the container's own, made after the mounts.
    pub userns: Option<UserNs>,
    pub process: Option<ProcPlan>,
    /// The container's seccomp program, loaded last.
    pub seccomp: Option<Arc<seccomp::Program>>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            join: Vec::new(),
            cgroup: None,
            unshare: UnshareFlags::empty(),
            rootfs: None,
            mounts: Vec::new(),
            default_dev: false,
            devices: Vec::new(),
            hostname: None,
            domainname: None,
            sysctls: Vec::new(),
            masked: Vec::new(),
            readonly_paths: Vec::new(),
            root_readonly: false,
            rootfs_propagation: None,
            terminal: false,
            userns: None,
            process: None,
            seccomp: None,
        }
    }
}

/// A failed step: what, and the OS error.
struct Failed(String, io::Error);

fn check<T>(
    what: impl FnOnce() -> String,
    r: Result<T, impl Into<io::Error>>,
) -> Result<T, Failed> {
    r.map_err(|e| Failed(what(), e.into()))
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
        let _ = rustix::fs::mkdir(prefix.as_c_str(), Mode::from_raw_mode(0o755));
    }
    match rustix::fs::mkdir(path, Mode::from_raw_mode(0o755)) {
        Err(e) if e != Errno::EXIST => Err(e.into()),
        _ => Ok(()),
    }
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
    // The descriptor is closed at once: only the file is wanted.
    rustix::fs::open(
        m.target.as_c_str(),
        OFlags::CREATE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .map(drop)
    .map_err(|e| fail(e.into()))
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
    let data = (!m.data.is_empty()).then_some(m.data.as_c_str());
    // rustix passes the type as a string, never null: an empty one is
    // ignored for a bind mount as null is, but a new mount with no type is
    // refused here with the kernel's answer to a null type.
    if m.fstype.is_empty() && !m.flags.contains(MountFlags::BIND) {
        return Err(Failed(what(), Errno::INVAL.into()));
    }
    check(
        what,
        rustix::mount::mount(
            m.source.as_c_str(),
            m.target.as_c_str(),
            m.fstype.as_c_str(),
            m.flags,
            data,
        ),
    )?;
    if let Some(flags) = m.remount_flags {
        check(
            what,
            rustix::mount::mount_remount(m.target.as_c_str(), flags | MountFlags::BIND, c""),
        )?;
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
        let mode = Mode::from_raw_mode(0o666);
        match rustix::fs::mknodat(
            CWD,
            path.as_c_str(),
            FileType::CharacterDevice,
            mode,
            rustix::fs::makedev(major, minor),
        ) {
            Err(e) if e != Errno::EXIST => {
                return Err(Failed(format!("create /dev/{name}"), e.into()));
            }
            _ => {}
        }
        // mknod is subject to the umask.
        let _ = rustix::fs::chmod(path.as_c_str(), mode);
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
        // An existing one is kept.
        let _ = rustix::fs::symlink(target.as_c_str(), path.as_c_str());
    }
    Ok(())
}

fn pivot_into(rootfs: &CStr) -> Result<(), Failed> {
    let dot = c".";
    check(
        || "enter the container's root".into(),
        rustix::process::chdir(rootfs),
    )?;
    // pivot_root(".", "."): the old root ends up stacked on the new
    // one and is detached right away, with no directory for it.
    check(
        || "pivot_root into the container's root".into(),
        rustix::process::pivot_root(dot, dot),
    )?;
    check(
        || "detach the guest's root".into(),
        rustix::mount::unmount(dot, UnmountFlags::DETACH),
    )?;
    check(|| "enter /".into(), rustix::process::chdir(c"/"))
}

fn is_dir(path: &CStr) -> Option<bool> {
    rustix::fs::stat(path)
        .ok()
        .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
}

fn mask(path: &CStr) -> Result<(), Failed> {
    let what = || format!("mask {}", path.to_string_lossy());
    // A path that does not exist needs no mask.
    let Some(dir) = is_dir(path) else {
        return Ok(());
    };
    check(
        what,
        if dir {
            rustix::mount::mount(c"tmpfs", path, c"tmpfs", MountFlags::RDONLY, None)
        } else {
            rustix::mount::mount_bind(c"/dev/null", path)
        },
    )
}

fn make_readonly(path: &CStr) -> Result<(), Failed> {
    if is_dir(path).is_none() {
        return Ok(());
    }
    let what = || format!("make {} read-only", path.to_string_lossy());
    check(what, rustix::mount::mount_bind_recursive(path, path))?;
    check(
        what,
        rustix::mount::mount_remount(
            path,
            MountFlags::BIND | MountFlags::RDONLY | MountFlags::REC,
            c"",
        ),
    )
}

/// The highest capability this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn set_identity(p: &ProcPlan, last_cap: u32) -> Result<(), Failed> {
    // One capability as a set of one.
    let one = |cap: u32| CapabilitySet::from_bits_retain(1 << cap);
    if let Some(caps) = &p.caps {
        check(
            || "keep capabilities across setuid".into(),
            rustix::thread::set_keep_capabilities(true),
        )?;
        for cap in 0..=last_cap {
            if caps.bounding & (1 << cap) == 0 {
                check(
                    || format!("drop capability {cap} from the bounding set"),
                    rustix::thread::remove_capability_from_bounding_set(one(cap)),
                )?;
            }
        }
    }
    // The thread's own calls: the forked child has no other thread.
    check(
        || {
            let groups: Vec<u32> = p.groups.iter().map(|g| g.as_raw()).collect();
            format!("set additional groups {groups:?}")
        },
        rustix::thread::set_thread_groups(&p.groups),
    )?;
    let gid = Gid::from_raw_unchecked(p.gid);
    check(
        || format!("set group {}", p.gid),
        rustix::thread::set_thread_res_gid(gid, gid, gid),
    )?;
    let uid = Uid::from_raw_unchecked(p.uid);
    check(
        || format!("set user {}", p.uid),
        rustix::thread::set_thread_res_uid(uid, uid, uid),
    )?;
    if let Some(caps) = &p.caps {
        check(
            || "set capabilities".into(),
            rustix::thread::set_capabilities(
                None,
                CapabilitySets {
                    effective: CapabilitySet::from_bits_retain(caps.effective),
                    permitted: CapabilitySet::from_bits_retain(caps.permitted),
                    inheritable: CapabilitySet::from_bits_retain(caps.inheritable),
                },
            ),
        )?;
        for cap in 0..=last_cap {
            if caps.ambient & (1 << cap) != 0 {
                check(
                    || format!("raise ambient capability {cap}"),
                    rustix::thread::configure_capability_in_ambient_set(one(cap), true),
                )?;
            }
        }
    }
    if p.no_new_privileges {
        check(
            || "set no_new_privileges".into(),
            rustix::thread::set_no_new_privs(true),
        )?;
    }
    Ok(())
}

/// The child's side of its user namespace: made, then its own `/proc`
/// directory (opened before, in the guest's `/proc`) handed to the agent,
/// which writes the maps; the agent's answer is 0 or the errno it met.
fn enter_user_namespace(sock: &OwnedFd, me: &OwnedFd) -> Result<(), Failed> {
    check(
        || "create the user namespace".into(),
        // SAFETY: a user namespace only, no CLONE_FILES; the child has no
        // other thread (a user namespace needs that).
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER) },
    )?;
    let what = || "have the agent write the user namespace's ID maps".to_string();
    let fds = [me.as_fd()];
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
    check(
        what,
        rustix::net::sendmsg(
            sock,
            &[io::IoSlice::new(b"u")],
            &mut control,
            rustix::net::SendFlags::empty(),
        ),
    )?;
    let mut answer = [0u8; 4];
    let got = check(what, rustix::io::read(sock, &mut answer))?;
    match (got, i32::from_ne_bytes(answer)) {
        (4, 0) => Ok(()),
        (4, errno) => Err(Failed(what(), io::Error::from_raw_os_error(errno))),
        _ => Err(Failed(what(), Errno::PIPE.into())),
    }
}

/// The agent's side: waits for the child's `/proc` directory, writes its
/// maps and answers. Returns when the child answered, or closed its end
/// (it failed, or it was spawned without a user namespace).
pub fn write_maps(sock: OwnedFd, uid_map: &[u8], gid_map: &[u8]) {
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let received = rustix::net::recvmsg(
        &sock,
        &mut [io::IoSliceMut::new(&mut byte)],
        &mut control,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    );
    if !matches!(received, Ok(ref r) if r.bytes == 1) {
        return;
    }
    let mut dir = None;
    for message in control.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(fds) = message {
            dir = fds.into_iter().next();
        }
    }
    let write = |dir: &OwnedFd, name: &CStr, map: &[u8]| -> rustix::io::Result<()> {
        let file = rustix::fs::openat(dir, name, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
        // The kernel takes a map in one write only.
        match rustix::io::write(&file, map)? {
            n if n == map.len() => Ok(()),
            _ => Err(Errno::INVAL),
        }
    };
    let result = match &dir {
        Some(dir) => write(dir, c"uid_map", uid_map).and_then(|()| write(dir, c"gid_map", gid_map)),
        None => Err(Errno::BADF),
    };
    let errno = match result {
        Ok(()) => 0,
        Err(e) => e.raw_os_error(),
    };
    let _ = rustix::io::write(&sock, &errno.to_ne_bytes());
}

fn run(plan: &Plan, last_cap: u32) -> Result<(), Failed> {
    // The child's own /proc directory, from the guest's /proc, before any
    // mount hides it: the agent writes the maps through it.
    let me = match &plan.userns {
        Some(_) => Some(check(
            || "open /proc/self".into(),
            rustix::fs::open(
                c"/proc/self",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ),
        )?),
        None => None,
    };
    if let Some(procs) = &plan.cgroup {
        // "0" is the writing process: the child joins before it makes
        // anything the limits should count.
        check(
            || "join the container's cgroup".into(),
            rustix::io::write(procs, b"0"),
        )?;
    }
    if plan.terminal {
        check(|| "start a session".into(), rustix::process::setsid())?;
        check(
            || "take the terminal".into(),
            rustix::process::ioctl_tiocsctty(rustix::stdio::stdin()),
        )?;
    }
    for (fd, kind) in &plan.join {
        check(
            || format!("join the container's namespace {:#x}", *kind as u32),
            rustix::thread::move_into_link_name_space(fd.as_fd(), Some(*kind)),
        )?;
    }
    if !plan.unshare.is_empty() {
        // SAFETY: the plan's flags are namespaces only
        // (container::namespaces), never CLONE_FILES: no descriptor table
        // is split, and the child has no other thread anyway.
        let unshared = unsafe { rustix::thread::unshare_unsafe(plan.unshare) };
        check(
            || format!("create namespaces {:#x}", plan.unshare.bits()),
            unshared,
        )?;
    }
    if let Some(rootfs) = &plan.rootfs {
        check(
            || "make the mount tree private".into(),
            rustix::mount::mount_change(
                c"/",
                MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
            ),
        )?;
        check(
            || "bind the container's root".into(),
            rustix::mount::mount_bind_recursive(rootfs.as_c_str(), rootfs.as_c_str()),
        )?;
        for m in &plan.mounts {
            do_mount(m)?;
        }
        if plan.default_dev {
            populate_dev(rootfs)?;
        }
        for d in &plan.devices {
            let what = || format!("create device {}", d.path.to_string_lossy());
            for dir in &d.parents {
                match rustix::fs::mkdirat(CWD, dir.as_c_str(), Mode::from_raw_mode(0o755)) {
                    Err(e) if e != Errno::EXIST => return Err(Failed(what(), e.into())),
                    _ => {}
                }
            }
            match rustix::fs::mknodat(CWD, d.path.as_c_str(), d.file_type, d.mode, d.dev) {
                Err(e) if e != Errno::EXIST => return Err(Failed(what(), e.into())),
                _ => {}
            }
            check(
                what,
                rustix::fs::chown(
                    d.path.as_c_str(),
                    Some(Uid::from_raw_unchecked(d.uid)),
                    Some(Gid::from_raw_unchecked(d.gid)),
                ),
            )?;
            // mknod is subject to the umask: the spec's mode, as runc sets it.
            check(what, rustix::fs::chmod(d.path.as_c_str(), d.mode))?;
        }
        pivot_into(rootfs)?;
        if let Some(flags) = plan.rootfs_propagation {
            check(
                || format!("set the root's propagation {:#x}", flags.bits()),
                rustix::mount::mount_change(c"/", flags),
            )?;
        }
    }
    for (path, value) in &plan.sysctls {
        let what = || format!("set sysctl {}", path.to_string_lossy());
        let fd = check(
            what,
            rustix::fs::open(
                path.as_c_str(),
                OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::empty(),
            ),
        )?;
        let written = rustix::io::write(&fd, value);
        drop(fd);
        check(what, written)?;
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
            rustix::mount::mount_remount(c"/", MountFlags::BIND | MountFlags::RDONLY, c""),
        )?;
    }
    if let Some(name) = &plan.hostname {
        check(
            || format!("set hostname {}", name.to_string_lossy()),
            rustix::system::sethostname(name.to_bytes()),
        )?;
    }
    if let Some(name) = &plan.domainname {
        check(
            || format!("set domain name {}", name.to_string_lossy()),
            rustix::system::setdomainname(name.to_bytes()),
        )?;
    }
    if let Some(p) = &plan.process {
        if let Some(adj) = &p.oom_score_adj {
            // Before the identity drops CAP_SYS_RESOURCE (a value below
            // the current needs it), through the guest's /proc or the
            // container's, whichever is mounted at /proc now.
            let what = || format!("set oom_score_adj {}", String::from_utf8_lossy(adj));
            let fd = check(
                what,
                rustix::fs::open(
                    c"/proc/self/oom_score_adj",
                    OFlags::WRONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                ),
            )?;
            check(what, rustix::io::write(&fd, adj))?;
        }
        for &(resource, soft, hard) in &p.rlimits {
            let limit = Rlimit {
                current: Some(soft),
                maximum: Some(hard),
            };
            check(
                || format!("set rlimit {} to {soft}/{hard}", resource as u32),
                rustix::process::setrlimit(resource, limit),
            )?;
        }
        if let Some(mask) = p.umask {
            rustix::process::umask(Mode::from_bits_retain(mask));
        }
    }
    // The user namespace last, before the identity: what came before
    // (mounts, devices, sysctls, the oom score, limits) is the guest
    // root's work, and the process's IDs are the namespace's.
    if let (
        Some(UserNs {
            sock: Some(sock), ..
        }),
        Some(me),
    ) = (&plan.userns, &me)
    {
        enter_user_namespace(sock, me)?;
    }
    drop(me);
    if let Some(p) = &plan.process {
        // Without no_new_privs, loading a filter takes CAP_SYS_ADMIN:
        // loaded before the identity drops it, as runc does (the filter
        // then sees the few calls that set the identity).
        if !p.no_new_privileges {
            load_seccomp(plan)?;
        }
        set_identity(p, last_cap)?;
        check(
            || format!("enter working directory {}", p.cwd.to_string_lossy()),
            rustix::process::chdir(p.cwd.as_c_str()),
        )?;
    }
    // The agent blocks SIGCHLD in every thread (it reads it from a
    // signalfd), and a signal mask survives fork and exec: the process
    // starts with no signal blocked, as runc's does. (An inherited
    // blocked SIGCHLD hung a shell's `wait`.) rustix has no safe
    // sigprocmask.
    // SAFETY: the empty set is initialised by sigemptyset before
    // sigprocmask reads it; no old set is asked for.
    let unblocked = unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut())
    };
    check(
        || "unblock signals".into(),
        if unblocked < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        },
    )?;
    // With no_new_privs: as late as can be, so that the filter sees only
    // the process's own calls (and the exec).
    match &plan.process {
        Some(p) if p.no_new_privileges => load_seccomp(plan),
        _ => Ok(()),
    }
}

fn load_seccomp(plan: &Plan) -> Result<(), Failed> {
    match &plan.seccomp {
        Some(program) => check(|| "load the seccomp profile".into(), seccomp::load(program)),
        None => Ok(()),
    }
}

/// Runs `plan` in the forked child; on failure writes what failed to
/// `err` and returns the OS error (the spawn then fails).
pub fn apply(plan: &Plan, last_cap: u32, err: BorrowedFd<'_>) -> io::Result<()> {
    run(plan, last_cap).map_err(|Failed(what, e)| {
        let msg = format!("{what}: {e}");
        let _ = rustix::io::write(err, msg.as_bytes());
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
