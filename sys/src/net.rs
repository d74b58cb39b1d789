//! TAP devices and network namespaces, as the runtime needs them to join a
//! container's network namespace to its VM (docs/networking.md).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};

/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: an Ethernet device whose frames
/// carry the virtio-net header (the VMM's offloads).
const TAP_FLAGS: u16 = 0x0002 | 0x1000 | 0x4000;
/// `TUNSETIFF`.
const TUNSETIFF: libc::Ioctl = 0x4004_54ca_u32 as libc::Ioctl;
/// `NSFS_MAGIC` (linux/magic.h): the file system of namespace files.
const NSFS_MAGIC: u64 = 0x6e73_6673;
/// `NS_GET_NSTYPE` (linux/nsfs.h, `_IO(0xb7, 0x3)`): a namespace file's
/// `CLONE_NEW*` type.
const NS_GET_NSTYPE: libc::Ioctl = 0xb703;
/// The longest interface name (IFNAMSIZ less its NUL).
pub const MAX_IFNAME: usize = 15;

/// Opens TAP device `name` (made if it does not exist; it goes when the
/// last descriptor of it closes) in the network namespace of the calling
/// thread, close-on-exec.
pub fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() > MAX_IFNAME || name.contains(['/', '\0', ' ']) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    let tun = rustix::fs::open(
        "/dev/net/tun",
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| std::io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
    // struct ifreq: the name (16 bytes, NUL-terminated), then the flags.
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    req[16..18].copy_from_slice(&TAP_FLAGS.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one 40-byte struct ifreq, which
    // `req` is, for the descriptor just opened.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun)
}

/// Opens the network namespace file at `path` (a `/proc/PID/ns/net` or a
/// bind mount of one, as `ip netns` and CNI make them). A file that is not
/// a namespace, or a namespace of another type, is refused with an
/// `InvalidInput` error that says which.
pub fn open_netns(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let invalid = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_owned());
    if rustix::fs::fstatfs(&fd)?.f_type as u64 != NSFS_MAGIC {
        return Err(invalid("is not a namespace"));
    }
    // The kernel names the namespace's type (NS_GET_NSTYPE, Linux 4.11):
    // no thread need enter it to find out.
    // SAFETY: NS_GET_NSTYPE takes no argument and returns the type.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) };
    match kind {
        k if k == libc::CLONE_NEWNET => Ok(fd),
        k if k >= 0 => Err(invalid("is a namespace, but not a network namespace")),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Whether `ns` is the host's network namespace: this process's own (the
/// namespace the runtime runs in, whose interfaces a mirror would take
/// from the host), or PID 1's where it can be read.
pub fn is_hosts_netns(ns: impl AsFd) -> std::io::Result<bool> {
    let theirs = rustix::fs::fstat(ns)?;
    let same = |path: &str| {
        rustix::fs::stat(path).is_ok_and(|s| (s.st_dev, s.st_ino) == (theirs.st_dev, theirs.st_ino))
    };
    Ok(same("/proc/self/ns/net") || same("/proc/1/ns/net"))
}

/// A descriptor of `fd`'s file that survives `exec` (for a child's
/// command line, `--net SLOT=FD`): `dup` does not copy close-on-exec.
pub fn inheritable(fd: impl AsFd) -> std::io::Result<OwnedFd> {
    Ok(rustix::io::dup(fd)?)
}

/// Makes a new, empty network namespace and keeps it by a bind mount on
/// `path` (a new file), as `ip netns add` does under /run/netns: it lives
/// until [`remove_netns`], with no process in it. The namespace is made
/// on a thread of its own, which ends at once.
pub fn make_netns(path: &Path) -> std::io::Result<()> {
    drop(
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?,
    );
    let made = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<()> {
            // SAFETY: CLONE_NEWNET only, on this thread: no descriptor table
            // or filesystem state is unshared under other threads' feet.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }?;
            rustix::mount::mount_bind("/proc/thread-self/ns/net", path)?;
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace's thread panicked")))
    });
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Lets go of a namespace [`make_netns`] kept at `path` (it ends when
/// nothing else holds it) and removes the file. A path that is not there
/// is no error.
pub fn remove_netns(path: &Path) -> std::io::Result<()> {
    match rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_files_are_told_apart() {
        let net = open_netns(Path::new("/proc/self/ns/net")).unwrap();
        assert!(is_hosts_netns(&net).unwrap());
        let e = open_netns(Path::new("/proc/self/ns/uts")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("not a network namespace"), "{e}");
        let e = open_netns(Path::new("/etc/hostname")).unwrap_err();
        assert_eq!(e.to_string(), "is not a namespace");
        let e = open_netns(Path::new("/no/such/netns")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn bad_tap_names_are_refused_before_the_kernel_sees_them() {
        for name in ["", "a/b", "sixteen-bytes-xx", "a b"] {
            let e = open_tap(name).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{name:?}");
        }
    }
}
