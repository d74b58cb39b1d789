//! The VMM's mount namespace: a root of its own that holds only what this
//! VM needs (docs/security.md, "The VMM process"; issue 18).
//!
//! Before any thread starts, the VMM takes a mount namespace of its own
//! in which every mount is a slave of the host's (mounts the host adds
//! beneath a share, as containerd does in a pod's, still reach the guest;
//! nothing the VMM mounts reaches the host). It clones each path it will
//! use ([`Bind`]) with `open_tree`, sets the clone's flags (read-only where
//! it only reads; never set-uid or device files but `/dev/kvm`), mounts an
//! empty tmpfs, moves each clone there at the path it has on the host,
//! and makes that tmpfs its root with `pivot_root`; the host's root is
//! detached. The tmpfs is then made read-only. Every path the VMM was
//! given keeps its meaning, and nothing else of the host's file systems
//! is reachable by any name.
//!
//! What is bound: `/dev/kvm`; the kernel and initramfs files and a
//! restored snapshot's directory, read-only; the directories of its
//! sockets (where the host also puts the `<socket>_<port>` listeners a
//! guest connects to), its console and timings files, and a new snapshot's
//! directory; each share (with what is mounted beneath it), read-only for
//! a read-only share; and its own `/proc/<pid>` as `/proc/self` (the
//! virtio-fs server reopens files through `/proc/self/fd`; no other
//! process is visible).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::mount::{
    MountFlags, MountPropagationFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags,
};

/// One host path the jail holds, at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The path on the host, and in the jail.
    pub path: PathBuf,
    /// Where it appears in the jail, when not at `path` (`/proc/self`).
    pub at: Option<PathBuf>,
    /// Read-only in the jail.
    pub read_only: bool,
    /// Device files under it may be opened (`/dev/kvm` only).
    pub devices: bool,
}

impl Bind {
    /// `path`, read-write.
    pub fn rw(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            at: None,
            read_only: false,
            devices: false,
        }
    }

    /// `path`, read-only.
    pub fn ro(path: impl Into<PathBuf>) -> Self {
        Self {
            read_only: true,
            ..Self::rw(path)
        }
    }
}

/// Adds `bind` to `binds` unless the very same is there: a second mount
/// of a directory on itself only hides the first (a VM's unused volume
/// slots all share one empty directory: four mounts, three of them
/// wasted, per VM).
pub fn add_once(binds: &mut Vec<Bind>, bind: Bind) {
    if !binds.contains(&bind) {
        binds.push(bind);
    }
}

/// `MOUNT_ATTR_*` and the `mount_attr` of `mount_setattr(2)` (5.12), which
/// rustix does not wrap.
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Sets `attr` on every mount of the detached tree `tree`.
fn set_attributes(tree: &OwnedFd, attr: u64) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: attr,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes of a live
    // struct laid out as the kernel's `struct mount_attr`; the path is a
    // NUL-terminated empty string with AT_EMPTY_PATH.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where the new root is mounted before `pivot_root` (in this namespace
/// only, over a directory every Linux host has).
const STAGING: &str = "/proc";

/// Moves the calling process (which must have one thread) into a mount
/// namespace whose root holds only `binds`. A bind whose path does not
/// exist on the host is left out: what needs it fails later with its
/// own error, as it would outside the jail. The working directory is
/// kept where it exists in the jail (relative paths given to the VMM keep
/// their meaning), else `/`.
pub fn enter(binds: &[Bind]) -> Result<(), String> {
    let cwd = std::env::current_dir().ok();
    // SAFETY: the process has one thread (the caller's contract).
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
        .map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::DOWNSTREAM | MountPropagationFlags::REC,
    )
    .map_err(|e| format!("making every mount a slave: {e}"))?;

    // Clone each path while the host's tree is still in reach; a path
    // inside another is mounted after it, so that it is seen.
    let mut binds: Vec<&Bind> = binds.iter().collect();
    binds.sort_by_key(|b| b.at.as_ref().unwrap_or(&b.path).components().count());
    let mut clones = Vec::new();
    for bind in binds {
        let at = bind.at.clone().unwrap_or_else(|| bind.path.clone());
        let is_dir = match std::fs::metadata(&bind.path) {
            Ok(meta) => meta.is_dir(),
            Err(_) => continue,
        };
        let tree = rustix::mount::open_tree(
            rustix::fs::CWD,
            &bind.path,
            OpenTreeFlags::OPEN_TREE_CLONE
                | OpenTreeFlags::OPEN_TREE_CLOEXEC
                | OpenTreeFlags::AT_RECURSIVE,
        )
        .map_err(|e| format!("cloning {}: {e}", bind.path.display()))?;
        let mut attr = MOUNT_ATTR_NOSUID;
        if !bind.devices {
            attr |= MOUNT_ATTR_NODEV;
        }
        if bind.read_only {
            attr |= MOUNT_ATTR_RDONLY;
        }
        if bind.devices {
            attr |= MOUNT_ATTR_NOEXEC;
        }
        set_attributes(&tree, attr)
            .map_err(|e| format!("setting the flags of {}: {e}", bind.path.display()))?;
        clones.push((at, is_dir, tree));
    }

    rustix::mount::mount(
        "husk-vmm",
        STAGING,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        c"size=1m,nr_inodes=1024,mode=0755",
    )
    .map_err(|e| format!("mounting the jail's root: {e}"))?;
    let root = Path::new(STAGING);
    // The jail's own directories are searchable by the VMM's own uid (made
    // 0755 whatever the process's umask; an error ends the VMM).
    // SAFETY: umask only sets the process's mask (one thread).
    let umask = unsafe { libc::umask(0o022) };
    let mut mounted: Vec<PathBuf> = Vec::new();
    for (at, is_dir, tree) in &clones {
        let inside = beneath(root, at)?;
        if mounted.iter().any(|m| inside.starts_with(m)) {
            // Beneath a bind mounted before (a file in its sockets'
            // directory): that is the host's directory, where nothing may
            // be made. The path is there already; mount over it (in this
            // namespace only) for its own flags, or leave it.
            let there = std::fs::symlink_metadata(&inside);
            if !there.is_ok_and(|m| m.is_dir() == *is_dir) {
                continue;
            }
        } else {
            if let Some(parent) = inside.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("making {} in the jail: {e}", at.display()))?;
            }
            let made = if *is_dir {
                std::fs::create_dir(&inside)
            } else {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&inside)
                    .map(drop)
            };
            match made {
                Ok(()) => {}
                // Two binds at one path: the later one is mounted over.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("making {} in the jail: {e}", at.display())),
            }
        }
        rustix::mount::move_mount(
            tree.as_fd(),
            "",
            rustix::fs::CWD,
            &inside,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|e| format!("mounting {} in the jail: {e}", at.display()))?;
        mounted.push(inside);
    }
    let keep_cwd = cwd
        .as_ref()
        .and_then(|cwd| beneath(root, cwd).ok())
        .filter(|inside| {
            // Made in the tmpfs only, never beneath a bind.
            inside.is_dir()
                || (!mounted.iter().any(|m| inside.starts_with(m))
                    && std::fs::create_dir_all(inside).is_ok())
        })
        .and(cwd);
    // SAFETY: as above.
    unsafe { libc::umask(umask) };
    drop(clones);

    rustix::process::chdir(root).map_err(|e| format!("chdir to the jail: {e}"))?;
    rustix::process::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    rustix::mount::unmount(".", UnmountFlags::DETACH)
        .map_err(|e| format!("detaching the host's root: {e}"))?;
    rustix::process::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    rustix::mount::mount_remount(
        "/",
        MountFlags::BIND
            | MountFlags::RDONLY
            | MountFlags::NOSUID
            | MountFlags::NODEV
            | MountFlags::NOEXEC,
        c"",
    )
    .map_err(|e| format!("making the jail's root read-only: {e}"))?;
    if let Some(cwd) = keep_cwd {
        let _ = rustix::process::chdir(&cwd);
    }
    Ok(())
}

/// `path` (absolute, without `..`) beneath `root`.
fn beneath(root: &Path, path: &Path) -> Result<PathBuf, String> {
    let mut inside = root.to_owned();
    for part in path.components() {
        match part {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => inside.push(name),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!(
                    "{}: a path the jail holds must be absolute, without `..`",
                    path.display()
                ));
            }
        }
    }
    Ok(inside)
}

/// `path` made absolute against the working directory, its `..` taken
/// away by name, without resolving links: the jail holds it at the name
/// the VMM will use. The working directory is a resolved path (getcwd), so
/// a relative `../x` names on the host the same file it names in the jail,
/// where the working directory is made again (and the jail's own
/// directories hold no links).
pub fn absolute(path: &Path) -> PathBuf {
    let whole = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut out = PathBuf::from("/");
    for part in whole.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The directory a socket at `path` is made in.
pub fn socket_dir(path: &Path) -> PathBuf {
    absolute(path)
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_owned)
}

/// Creates `path` (empty, 0600 by the VMM's umask) if it does not exist,
/// so that the jail can hold the file the VMM writes later. Fails
/// quietly: the VMM's own open then fails with its own error.
pub fn touch(path: &Path) {
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path);
}

/// `/proc/<pid>`, this process's directory in the host's /proc
/// ([`crate::confine::host_pid`]), seen in the jail as `/proc/self`.
pub fn own_proc(pid: u32) -> Bind {
    Bind {
        path: PathBuf::from(format!("/proc/{pid}")),
        at: Some(PathBuf::from("/proc/self")),
        read_only: true,
        devices: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bind_is_made_once() {
        let mut binds = vec![Bind::ro("/a")];
        add_once(&mut binds, Bind::ro("/e"));
        add_once(&mut binds, Bind::ro("/e"));
        add_once(&mut binds, Bind::ro("/a"));
        // Not the same: read-write over read-only stays as asked.
        add_once(&mut binds, Bind::rw("/e"));
        assert_eq!(binds, vec![Bind::ro("/a"), Bind::ro("/e"), Bind::rw("/e")]);
    }

    #[test]
    fn paths_are_held_at_their_absolute_names_without_dotdot() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(absolute(Path::new("/a/b/../c/./d")), Path::new("/a/c/d"));
        assert_eq!(absolute(Path::new("/../x")), Path::new("/x"));
        assert_eq!(
            absolute(Path::new("../x")),
            cwd.parent().unwrap_or(Path::new("/")).join("x")
        );
        assert_eq!(absolute(Path::new("y")), cwd.join("y"));
        assert!(beneath(Path::new("/proc"), &absolute(Path::new("../x"))).is_ok());
        assert!(beneath(Path::new("/proc"), Path::new("/a/../b")).is_err());
    }
}
