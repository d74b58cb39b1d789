//! What holds a vCPU thread besides its seccomp filter (docs/security.md).
//!
//! vCPU threads serve the guest's virtio-fs requests, so a guest that
//! subverts the file server acts with what those threads may do. Each one,
//! before it runs the guest:
//!
//! - takes a file-system context of its own (`unshare(CLONE_FS)`) with a
//!   umask of 0, so that the modes the guest asks for reach its shares
//!   as asked, while every other thread keeps the process's umask (0o077:
//!   the API socket, snapshots and every other file the VMM makes are its
//!   user's alone);
//! - restricts itself with Landlock: file access only beneath the shares
//!   (read-only access beneath a read-only share), and no TCP bind or
//!   connect at all. A kernel without Landlock runs without this layer,
//!   which the VMM says once on stderr; seccomp still holds.
//!
//! Every thread, vCPU or not, also gives up what it does not need before
//! its seccomp filter goes on ([`enter`]): each capability but the few
//! its kind keeps ([`kept`]), from its effective, permitted, inheritable,
//! ambient and bounding sets, with the securebits that stop any of them
//! coming back locked; `no_new_privs` is set. The process as a whole,
//! before any thread starts ([`process`]), closes every descriptor it
//! inherited but the TAPs it was given, sets its rlimits (no core dumps,
//! a bound on open files and on the size of any file it writes), stops
//! being dumpable (no other process of its user may ptrace it or read its
//! memory), and moves into IPC, UTS and network namespaces of its own: no
//! System V object, host name or network interface of the host is in its
//! reach.

use std::io;
use std::os::fd::RawFd;

use rustix::thread::{CapabilitySet, CapabilitySets};

use crate::seccomp::Thread;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus,
};

use husk_protocol::share::Share;

/// The umask of every thread but the vCPU threads.
pub const PROCESS_UMASK: libc::mode_t = 0o077;

/// Gives the calling thread a file-system context (cwd, root, umask) of its
/// own, with `mask` as its umask; the process's other threads keep theirs.
pub fn own_umask(mask: libc::mode_t) -> io::Result<()> {
    // SAFETY: unshare of the calling thread's fs_struct; no memory passed.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: umask only sets the (now private) mask.
    unsafe { libc::umask(mask) };
    Ok(())
}

/// How far Landlock holds the calling thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landlocked {
    /// Every restriction asked for is in force.
    Fully,
    /// The kernel knows an older Landlock: some are.
    Partly,
    /// The kernel has no Landlock.
    Not,
}

/// Restricts the calling thread to `shares`: read and write beneath a
/// share the guest may change, read beneath a read-only one, nothing
/// elsewhere; no TCP bind or connect. Descriptors opened before stay
/// usable.
pub fn landlock(shares: &[Share]) -> Result<Landlocked, String> {
    let fs_abi = ABI::V3;
    let rw = AccessFs::from_all(fs_abi);
    let ro = AccessFs::from_read(fs_abi);
    let fail = |e: landlock::RulesetError| format!("landlock: {e}");
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(rw)
        .map_err(fail)?
        .handle_access(AccessNet::from_all(ABI::V4))
        .map_err(fail)?
        .create()
        .map_err(fail)?;
    for share in shares {
        let dir = PathFd::new(&share.dir)
            .map_err(|e| format!("landlock: share {}: {e}", share.dir.display()))?;
        let access = if share.read_only { ro } else { rw };
        ruleset = ruleset
            .add_rule(PathBeneath::new(dir, access))
            .map_err(fail)?;
    }
    let status = ruleset.restrict_self().map_err(fail)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Landlocked::Fully,
        RulesetStatus::PartiallyEnforced => Landlocked::Partly,
        RulesetStatus::NotEnforced => Landlocked::Not,
    })
}

/// Everything a vCPU thread takes on before it runs the guest: its own
/// umask of 0 and Landlock over `shares`. Failing to take them ends the
/// VMM: it does not serve a guest unconfined.
pub fn vcpu_thread(shares: &[Share]) -> Result<Landlocked, String> {
    own_umask(0).map_err(|e| format!("unshare(CLONE_FS): {e}"))?;
    landlock(shares)
}

/// The capabilities a thread of kind `thread` keeps. A vCPU thread serves
/// virtio-fs: it gives new files the guest's owners (CAP_CHOWN), reaches
/// every file of its shares whatever their modes (CAP_DAC_OVERRIDE,
/// CAP_FOWNER), and keeps set-uid bits the guest sets (CAP_FSETID, dropped
/// by the file server around a write that must clear them). The main
/// thread keeps CAP_DAC_OVERRIDE; the others none.
pub fn kept(thread: Thread) -> CapabilitySet {
    match thread {
        Thread::Vcpu => FILE_SERVER,
        // Its sockets, timings and a warm snapshot are in root's
        // directories: it removes and writes them at the end.
        Thread::Main => CapabilitySet::DAC_OVERRIDE,
        Thread::Vsock | Thread::Api | Thread::Net => CapabilitySet::empty(),
    }
}

/// What the file server needs (a vCPU thread's): every thread's set is
/// part of it, and so is what the set-up does before the threads start.
pub const FILE_SERVER: CapabilitySet = CapabilitySet::CHOWN
    .union(CapabilitySet::DAC_OVERRIDE)
    .union(CapabilitySet::FOWNER)
    .union(CapabilitySet::FSETID);

/// The uids (and gids) husk's VMMs run as: the VMM whose process ID is P
/// runs as `ID_BASE + P` ([`husk_protocol::ids`]). Process IDs are unique
/// among live processes and below 2^22 (`pid_max`), so no two running
/// VMMs share an id, and no id is reused while one runs; files and
/// processes of that uid end with the VMM (its sockets are removed, the
/// files it makes for the guest are the guest's). The range
/// 0x7000_0000..0x7040_0000 is far above what distributions give users
/// (`husk doctor` checks /etc/passwd, /etc/group, /etc/subuid and
/// /etc/subgid).
pub use husk_protocol::ids::{VMM_ID_BASE as ID_BASE, vmm_id};

/// This process's PID in the host's PID namespace, which the host's
/// `/proc` names: a VMM that is PID 1 of a namespace of its own
/// (`husk_sys::child::spawn_vmm`) is 1 to `getpid`, but its uid, and the
/// `/proc` directory its jail holds, go by its host PID.
pub fn host_pid() -> u32 {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse().ok())
        .unwrap_or_else(std::process::id)
}

/// Moves the process (which must have one thread, and all of root's
/// capabilities) to the uid and gid `id`, with no supplementary groups,
/// keeping only [`FILE_SERVER`]'s capabilities: the bounding set is cut
/// to them first, and the securebits that stop any other coming back
/// (`NOROOT`, no ambient raise, `KEEP_CAPS` off) are set and locked.
pub fn become_own_user(id: u32) -> Result<(), String> {
    // A uid change clears the parent-death signal its starter set (husk's
    // monitor and the tests end their VMM so when they die): read it now,
    // set it again after, and check that the parent did not die between.
    let death_signal = rustix::process::parent_process_death_signal()
        .map_err(|e| format!("PR_GET_PDEATHSIG: {e}"))?;
    let parent = rustix::process::getppid();
    drop_from_bounding_set(FILE_SERVER)?;
    const KEEP_CAPS: u32 = 1 << 4;
    set_securebits((SECUREBITS & !(1 << 5)) | KEEP_CAPS)?;
    rustix::thread::set_thread_groups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    let gid = rustix::process::Gid::from_raw(id);
    let uid = rustix::process::Uid::from_raw(id);
    rustix::thread::set_thread_res_gid(gid, gid, gid)
        .map_err(|e| format!("setresgid({id}): {e}"))?;
    rustix::thread::set_thread_res_uid(uid, uid, uid)
        .map_err(|e| format!("setresuid({id}): {e}"))?;
    // The uid change emptied the effective set; the permitted set was kept
    // (KEEP_CAPS) for the next two steps, then cut to FILE_SERVER.
    let now = rustix::thread::capabilities(None).map_err(|e| format!("capget: {e}"))?;
    set_capabilities(now.permitted, now.permitted)?;
    set_securebits(SECUREBITS)?;
    rustix::thread::clear_ambient_capability_set()
        .map_err(|e| format!("clearing the ambient capabilities: {e}"))?;
    set_capabilities(FILE_SERVER, FILE_SERVER)?;
    if death_signal.is_some() {
        rustix::process::set_parent_process_death_signal(death_signal)
            .map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
        if rustix::process::getppid() != parent {
            return Err("its parent ended while it was being jailed".into());
        }
    }
    let after = rustix::thread::capabilities(None).map_err(|e| format!("capget: {e}"))?;
    if after.permitted != FILE_SERVER || rustix::process::geteuid() != uid {
        return Err(format!(
            "uid {} with capabilities {:#x} after the drop",
            rustix::process::geteuid().as_raw(),
            after.permitted.bits()
        ));
    }
    Ok(())
}

/// The securebits every thread locks: no capabilities from uid 0 at an
/// exec, none kept across a uid change by request, no ambient raise.
const SECUREBITS: u32 = (1 << 0) // SECBIT_NOROOT
    | (1 << 1) // SECBIT_NOROOT_LOCKED
    | (1 << 3) // SECBIT_NO_SETUID_FIXUP_LOCKED (off: a uid change drops the effective set)
    | (1 << 5) // SECBIT_KEEP_CAPS_LOCKED (off)
    | (1 << 6) // SECBIT_NO_CAP_AMBIENT_RAISE
    | (1 << 7); // SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED

/// Drops every capability but `keep` from the calling thread's bounding
/// set (needs CAP_SETPCAP).
fn drop_from_bounding_set(keep: CapabilitySet) -> Result<(), String> {
    for cap in 0..64u64 {
        if keep.bits() & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP of one capability number; no memory is
        // passed. The kernel answers EINVAL past the last one.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(format!(
                "dropping capability {cap} from the bounding set: {e}"
            ));
        }
    }
    Ok(())
}

/// Sets the calling thread's securebits (needs CAP_SETPCAP).
fn set_securebits(bits: u32) -> Result<(), String> {
    // SAFETY: PR_SET_SECUREBITS with a value; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(format!("securebits: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets the calling thread's effective and permitted sets; the
/// inheritable set is emptied.
fn set_capabilities(effective: CapabilitySet, permitted: CapabilitySet) -> Result<(), String> {
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective,
            permitted,
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(|e| format!("capset: {e}"))
}

/// Narrows the calling thread's capabilities to [`kept`]`(thread)`: the
/// bounding set first (that needs CAP_SETPCAP), the securebits, the
/// ambient set, then the effective, permitted and inheritable sets. A
/// thread started by one that already narrowed its own (or by a VMM that
/// took its own uid) inherits them: then only the effective and permitted
/// sets are cut, and checked.
pub fn narrow_capabilities(thread: Thread) -> Result<(), String> {
    let keep = kept(thread);
    let now = rustix::thread::capabilities(None).map_err(|e| format!("capget: {e}"))?;
    if now.effective.contains(CapabilitySet::SETPCAP) {
        drop_from_bounding_set(keep)?;
        set_securebits(SECUREBITS)?;
    }
    rustix::thread::clear_ambient_capability_set()
        .map_err(|e| format!("clearing the ambient capabilities: {e}"))?;
    set_capabilities(now.effective & keep, now.permitted & keep)?;
    let after = rustix::thread::capabilities(None).map_err(|e| format!("capget: {e}"))?;
    if !keep.contains(after.permitted) {
        return Err(format!(
            "capabilities {:#x} are left beyond the {:#x} kept",
            after.permitted.bits(),
            keep.bits()
        ));
    }
    Ok(())
}

/// Everything the calling thread gives up before it does the work of its
/// kind: its capabilities but [`kept`], then `no_new_privs`, then its
/// seccomp filter (if the filters were prepared), always last. A thread
/// that cannot ends the VMM: it does not run with more than it needs.
pub fn enter(thread: Thread) {
    let narrowed = narrow_capabilities(thread).and_then(|()| {
        rustix::thread::set_no_new_privs(true).map_err(|e| format!("no_new_privs: {e}"))
    });
    if let Err(e) = narrowed {
        eprintln!("husk-vmm: cannot confine the {thread:?} thread: {e}");
        // SAFETY: _exit ends the process; nothing is shared with it.
        unsafe { libc::_exit(crate::seccomp::EXIT_SECCOMP) };
    }
    crate::seccomp::enter(thread);
}

/// The most descriptors the VMM may hold (fewer if it inherited a lower
/// hard limit): the virtio-fs server holds one
/// per inode the guest keeps looked up, and a guest past this bound gets
/// EMFILE (ENFILE to its own system calls), never the host's table.
pub const MAX_OPEN_FILES: u64 = 65_536;

/// The largest file the VMM may write (a guest's file in a share, a
/// snapshot's memory) unless the guest's memory is larger: past it the
/// guest's write gets EFBIG.
pub const MAX_FILE_SIZE: u64 = 256 << 30;

/// What the whole process takes on before any thread starts (docs/
/// security.md, "The VMM process"): every inherited descriptor above
/// stderr is closed but those in `keep` (the TAPs it was handed); core
/// dumps off; at most [`MAX_OPEN_FILES`] descriptors (or the inherited hard
/// limit) and files of at most
/// `max_file_size` bytes (SIGXFSZ ignored, so an oversized write fails
/// with EFBIG instead of killing the VMM); not dumpable; and, when started
/// with CAP_SYS_ADMIN (by husk, as root), IPC, UTS and network namespaces
/// of its own. With `container_netns` it keeps the network namespace it
/// was started in: one its starter made for this VM's container alone
/// (docs/security.md, "The VMM process"). Must run while the process has
/// one thread.
pub fn process(keep: &[RawFd], max_file_size: u64, container_netns: bool) -> Result<(), String> {
    close_inherited(keep)?;
    let limit = |resource, value: u64, what: &str| {
        rustix::process::setrlimit(
            resource,
            rustix::process::Rlimit {
                current: Some(value),
                maximum: Some(value),
            },
        )
        .map_err(|e| format!("setrlimit({what}, {value}): {e}"))
    };
    limit(rustix::process::Resource::Core, 0, "RLIMIT_CORE")?;
    // Raising the hard limit needs CAP_SYS_RESOURCE, which a starter may
    // lack: never above what was inherited.
    let inherited = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX);
    limit(
        rustix::process::Resource::Nofile,
        MAX_OPEN_FILES.min(inherited),
        "RLIMIT_NOFILE",
    )?;
    limit(
        rustix::process::Resource::Fsize,
        max_file_size,
        "RLIMIT_FSIZE",
    )?;
    // SAFETY: SIG_IGN for SIGXFSZ; no handler runs.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| format!("PR_SET_DUMPABLE: {e}"))?;
    // A VMM a user of the kvm group starts, without CAP_SYS_ADMIN, cannot
    // make namespaces; it holds no capability that reaches the host's
    // either, and stays in its starter's (docs/security.md).
    if !may_make_namespaces() {
        return Ok(());
    }
    use rustix::thread::UnshareFlags;
    let flags = match container_netns {
        true => UnshareFlags::NEWIPC | UnshareFlags::NEWUTS,
        false => UnshareFlags::NEWIPC | UnshareFlags::NEWUTS | UnshareFlags::NEWNET,
    };
    // SAFETY: the process has one thread (the caller's contract), so no
    // other thread sees its namespaces change; no descriptor table or
    // file-system state is unshared.
    unsafe { rustix::thread::unshare_unsafe(flags) }
        .map_err(|e| format!("unshare({flags:?}): {e}"))?;
    Ok(())
}

/// Whether this process may make namespaces (CAP_SYS_ADMIN): husk starts
/// its VMMs as root; a user of the kvm group cannot.
pub fn may_make_namespaces() -> bool {
    rustix::thread::capabilities(None)
        .is_ok_and(|caps| caps.effective.contains(CapabilitySet::SYS_ADMIN))
}

/// Closes every descriptor above stderr but those in `keep`.
fn close_inherited(keep: &[RawFd]) -> Result<(), String> {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&fd| fd > 2).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from: u32 = 3;
    for fd in keep.into_iter().map(|fd| fd as u32).chain([u32::MAX]) {
        if fd > from {
            let to = if fd == u32::MAX { u32::MAX } else { fd - 1 };
            // SAFETY: close_range of descriptors nothing in this process
            // owns yet (it runs before any is opened); no memory passed.
            if unsafe { libc::syscall(libc::SYS_close_range, from, to, 0) } != 0 {
                return Err(format!(
                    "closing inherited descriptors {from}-{to}: {}",
                    io::Error::last_os_error()
                ));
            }
        }
        from = fd.saturating_add(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-confine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// On a thread of its own (Landlock and the umask stay with it): files
    /// beneath a read-write share can be made, beneath a read-only one
    /// read only, and nothing else on the host opened or reached by TCP;
    /// the test's own thread is untouched.
    #[test]
    fn a_confined_thread_reaches_its_shares_only() {
        let base = scratch("landlock");
        let (rw, ro) = (base.join("rw"), base.join("ro"));
        std::fs::create_dir_all(&rw).unwrap();
        std::fs::create_dir_all(&ro).unwrap();
        std::fs::write(ro.join("f"), b"ro").unwrap();
        std::fs::write(base.join("secret"), b"secret").unwrap();
        let shares = vec![
            Share {
                tag: "rw".into(),
                dir: rw.clone(),
                read_only: false,
            },
            Share {
                tag: "ro".into(),
                dir: ro.clone(),
                read_only: true,
            },
        ];
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let b = base.clone();
        let result = std::thread::spawn(move || {
            let landlocked = vcpu_thread(&shares).unwrap();
            // SAFETY: umask of the thread's own context.
            let mask = unsafe { libc::umask(0) };
            std::fs::write(b.join("rw/made"), b"x").unwrap();
            let made_mode = {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(b.join("rw/mode"))
                    .unwrap();
                f.metadata().unwrap().permissions().mode() & 0o777
            };
            (
                landlocked,
                mask,
                made_mode,
                std::fs::read(b.join("ro/f")).is_ok(),
                std::fs::write(b.join("ro/new"), b"x").is_err(),
                std::fs::read(b.join("secret")).is_err(),
                std::fs::read("/etc/passwd").is_err(),
                std::fs::write(b.join("planted"), b"x").is_err(),
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            )
        })
        .join()
        .unwrap();
        let (
            landlocked,
            mask,
            mode,
            read_ro,
            refused_ro,
            refused_secret,
            refused_etc,
            refused_plant,
            refused_tcp,
        ) = result;
        assert_eq!(mask, 0, "the vCPU thread's umask is 0");
        assert_eq!(mode, 0o666, "a guest's mode is not masked");
        assert!(read_ro);
        assert_eq!(landlocked, Landlocked::Fully, "this kernel has Landlock");
        assert!(refused_ro, "write beneath a read-only share");
        assert!(refused_secret, "read beside the shares");
        assert!(refused_etc, "read of /etc/passwd");
        assert!(refused_plant, "file made beside the shares");
        assert!(refused_tcp, "TCP connect");
        // This thread is untouched.
        assert!(std::fs::read("/etc/passwd").is_ok());
        assert!(!base.join("planted").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
