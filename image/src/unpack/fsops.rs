//! The file layer the unpacker writes through: every call relative to a
//! directory descriptor, never following a symbolic link, so that a
//! hostile layer cannot reach outside the layer's directory.

use super::*;

/// Makes a directory that a path needs but the layer does not have (yet),
/// and opens it.
pub(super) fn make_missing_dir(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    sys::mkdirat(parent, name, 0o755)?;
    let dir = sys::open_dir(parent, name)?;
    // The mode as tar makes it, whatever the umask.
    sys::fchmod(dir.as_fd(), 0o755)?;
    Ok(dir)
}

/// Makes the directory `name` in `parent`, unless there is one.
pub(super) fn make_directory(parent: BorrowedFd<'_>, name: &CStr) -> Result<(), EntryError> {
    match sys::fstatat(parent, name) {
        Ok(st) if is_type(&st, FileType::Directory) => return Ok(()),
        Ok(_) => sys::unlinkat(parent, name, AtFlags::empty()).map_err(failed("replace"))?,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(failed("inspect")(e)),
    }
    sys::mkdirat(parent, name, 0o700).map_err(failed("create"))
}

/// Removes whatever is at `name` in `parent`, so an entry can replace it.
pub(super) fn remove_existing(parent: BorrowedFd<'_>, name: &CStr) -> Result<(), EntryError> {
    match sys::fstatat(parent, name) {
        Ok(st) if is_type(&st, FileType::Directory) => {
            remove_tree(parent, name).map_err(failed("replace the directory"))
        }
        Ok(_) => sys::unlinkat(parent, name, AtFlags::empty()).map_err(failed("replace")),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(failed("inspect")(e)),
    }
}

/// Removes the directory `name` in `parent` and all it holds, never
/// following a symbolic link.
pub(super) fn remove_tree(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let dir = sys::open_dir(parent, name)?;
    for child in sys::read_dir(dir.as_fd())? {
        match sys::unlinkat(dir.as_fd(), &child, AtFlags::empty()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => remove_tree(dir.as_fd(), &child)?,
            Err(e) => return Err(e),
        }
    }
    drop(dir);
    sys::unlinkat(parent, name, AtFlags::REMOVEDIR)
}

/// Whether `st` is of file type `file_type`.
pub(super) fn is_type(st: &Stat, file_type: FileType) -> bool {
    FileType::from_raw_mode(st.st_mode) == file_type
}

/// Sets all of an entry's metadata on `name` in `parent`.
pub(super) fn set_metadata(
    parent: BorrowedFd<'_>,
    name: &CStr,
    meta: &Metadata,
    symlink: bool,
) -> Result<(), EntryError> {
    set_owner_mode_xattrs(parent, name, meta, symlink)?;
    sys::utimensat(parent, name, &meta.mtime).map_err(failed("set the modification time"))
}

/// Sets an entry's owner, mode (not for a symbolic link) and extended
/// attributes on `name` in `parent`. The owner goes first: changing it
/// clears setuid, setgid and file capabilities.
pub(super) fn set_owner_mode_xattrs(
    parent: BorrowedFd<'_>,
    name: &CStr,
    meta: &Metadata,
    symlink: bool,
) -> Result<(), EntryError> {
    sys::fchownat(parent, name, meta.uid, meta.gid).map_err(failed("set the owner"))?;
    if !symlink {
        sys::fchmodat(parent, name, meta.mode).map_err(failed("set the mode"))?;
    }
    for (key, value) in &meta.xattrs {
        match sys::lsetxattr(parent, name, key, value) {
            Ok(()) => {}
            // Only trusted.* and security.* attributes may be on symbolic links.
            Err(e)
                if symlink
                    && matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP))
                    && !key.to_bytes().starts_with(b"trusted.")
                    && !key.to_bytes().starts_with(b"security.") => {}
            Err(e) => {
                let key = key.to_string_lossy();
                return Err(failed(format!("set extended attribute {key:?}"))(e));
            }
        }
    }
    Ok(())
}

/// Thin wrappers over the system calls: each works on `name` inside the
/// directory `dir` and never follows a symbolic link at `name`.
pub(super) mod sys {
    use std::ffi::{CStr, CString, OsStr};
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    use rustix::fs::{
        AtFlags, Dev, FileType, Mode, OFlags, Stat, Timespec, Timestamps, XattrFlags,
    };
    use rustix::io::Errno;

    /// Opens the directory `name` in `dir`; fails (`ELOOP` or `ENOTDIR`)
    /// where `name` is a symbolic link.
    pub fn open_dir(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(rustix::fs::openat(dir, name, flags, Mode::empty())?)
    }

    /// Creates the regular file `name` in `dir` (mode 0600), for writing;
    /// fails if anything is at `name`.
    pub fn create_file(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<File> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o600))?;
        Ok(File::from(fd))
    }

    pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
        Ok(rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode))?)
    }

    /// Removes `name` from `dir`: a directory (empty) with `AtFlags::REMOVEDIR`.
    pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: AtFlags) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(dir, name, flags)?)
    }

    /// The status of `name` in `dir` (of the link, for a symbolic link).
    pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
        Ok(rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
    }

    /// Makes `name` in `dir` a symbolic link to `target`.
    pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        Ok(rustix::fs::symlinkat(target, dir, name)?)
    }

    /// Makes `name` in `dir` a hard link to `target` in `target_dir` (to a
    /// symbolic link itself, not to what it points at).
    pub fn linkat(
        target_dir: BorrowedFd<'_>,
        target: &CStr,
        dir: BorrowedFd<'_>,
        name: &CStr,
    ) -> io::Result<()> {
        Ok(rustix::fs::linkat(
            target_dir,
            target,
            dir,
            name,
            AtFlags::empty(),
        )?)
    }

    /// Makes the device or FIFO `name` in `dir`.
    pub fn mknodat(
        dir: BorrowedFd<'_>,
        name: &CStr,
        file_type: FileType,
        mode: u32,
        device: Dev,
    ) -> io::Result<()> {
        Ok(rustix::fs::mknodat(
            dir,
            name,
            file_type,
            Mode::from_raw_mode(mode),
            device,
        )?)
    }

    /// Sets the owner of `name` in `dir` (of the link, for a symbolic link).
    /// Neither ID may be `u32::MAX`, which means "leave unchanged".
    pub fn fchownat(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
        Ok(rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// Sets the mode of `name` in `dir`; fails (`EOPNOTSUPP`) where it is a
    /// symbolic link.
    ///
    /// Linux's `fchmodat` takes no flags, and rustix's `chmodat` refuses
    /// `AT_SYMLINK_NOFOLLOW`, so this does what the C library does for it:
    /// open `name` itself (`O_PATH | O_NOFOLLOW`), refuse a symbolic link,
    /// and change the mode through the descriptor's entry in
    /// `/proc/self/fd` (an `O_PATH` descriptor cannot be `fchmod`ed).
    pub fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(dir, name, flags, Mode::empty())?;
        if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) == FileType::Symlink {
            return Err(Errno::OPNOTSUPP.into());
        }
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        match rustix::fs::chmod(path.as_str(), Mode::from_raw_mode(mode)) {
            // No /proc: there is no other way to reach the file.
            Err(Errno::NOENT) => Err(Errno::OPNOTSUPP.into()),
            other => Ok(other?),
        }
    }

    pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
        Ok(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?)
    }

    /// Sets the access and modification times of `name` in `dir` to `mtime`.
    pub fn utimensat(dir: BorrowedFd<'_>, name: &CStr, mtime: &Timespec) -> io::Result<()> {
        let times = Timestamps {
            last_access: *mtime,
            last_modification: *mtime,
        };
        Ok(rustix::fs::utimensat(
            dir,
            name,
            &times,
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// Sets the access and modification times of `fd` to `mtime`.
    pub fn futimens(fd: BorrowedFd<'_>, mtime: &Timespec) -> io::Result<()> {
        let times = Timestamps {
            last_access: *mtime,
            last_modification: *mtime,
        };
        Ok(rustix::fs::futimens(fd, &times)?)
    }

    /// Sets the extended attribute `key` of `fd`.
    pub fn fsetxattr(fd: BorrowedFd<'_>, key: &CStr, value: &[u8]) -> io::Result<()> {
        Ok(rustix::fs::fsetxattr(fd, key, value, XattrFlags::empty())?)
    }

    /// Sets the extended attribute `key` of `name` in `dir` (of the link,
    /// for a symbolic link). There is no `*at` form: the path goes through
    /// `dir`'s entry in `/proc/self/fd`.
    pub fn lsetxattr(dir: BorrowedFd<'_>, name: &CStr, key: &CStr, value: &[u8]) -> io::Result<()> {
        let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        path.extend_from_slice(name.to_bytes());
        let path = CString::new(path).map_err(io::Error::other)?;
        Ok(rustix::fs::lsetxattr(
            &path,
            key,
            value,
            XattrFlags::empty(),
        )?)
    }

    /// The names in the directory `dir` (less `.` and `..`), read through
    /// its entry in `/proc/self/fd`.
    pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
        let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
        std::fs::read_dir(path)?
            .map(|entry| {
                let name = entry?.file_name();
                CString::new(OsStr::as_bytes(&name)).map_err(io::Error::other)
            })
            .collect()
    }
}
