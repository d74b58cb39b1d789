//! Files made for one user's eyes only, in a directory that cannot be
//! used to redirect them: a VM snapshot's `state` and `memory` (guest
//! memory holds the guest's secrets). Shared by the VMM, which writes a
//! warm-start snapshot into a directory it makes, and the runtime, which
//! makes a checkpoint's files and hands their descriptors to a VMM that
//! cannot see the checkpoint's directory from its jail.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::PathError;

/// Why private files could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PrivateError {
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] PathError),
    /// The directory (or a file in it) could be used to redirect the
    /// write: a symlink, another user's, open to others' writes, or a file
    /// with another link.
    #[error("{} is not a safe place for private files: {why}", .path.display())]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// Makes `dir` (mode 0700, with its parents) if missing, and in it each
/// of `names`, opened for writing, empty, mode 0600. Refused: `dir` a
/// symlink, another user's (not this one's or root's), or writable by others (where a link could be
/// planted); a name that is a symlink, or a file with another link.
pub fn create_files(dir: &Path, names: &[&str]) -> Result<Vec<File>, PrivateError> {
    let dir_file = open_dir(dir)?;
    names
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let file = open_beneath(&dir_file, name).map_err(PathError::at("create", &path))?;
            let meta = file.metadata().map_err(PathError::at("create", &path))?;
            if !meta.is_file() || meta.nlink() != 1 {
                return Err(PrivateError::Unsafe {
                    path: dir.to_owned(),
                    why: format!(
                        "{} is not a file of its own (a link to another file?)",
                        path.display()
                    ),
                });
            }
            file.set_len(0).map_err(PathError::at("create", &path))?;
            Ok(file)
        })
        .collect()
}

/// Makes `dir` (mode 0700, with its parents) if missing, refused as
/// [`create_files`] refuses it: a directory for one user's files (a
/// VMM's sockets).
pub fn dir(dir: &Path) -> Result<(), PrivateError> {
    open_dir(dir).map(drop)
}

fn open_dir(dir: &Path) -> Result<File, PrivateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(PathError::at("create", dir))?;
    private_dir(dir)
}

/// Opens the directory `dir`, refusing a symlink in its place, a
/// directory of another user than this one or root, or one others may
/// write to.
fn private_dir(dir: &Path) -> Result<File, PrivateError> {
    let refuse = |why: String| PrivateError::Unsafe {
        path: dir.to_owned(),
        why,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                refuse("it is a symlink, not a directory".into())
            }
            _ => PathError::at("open", dir)(e).into(),
        })?;
    let meta = file.metadata().map_err(PathError::at("open", dir))?;
    // Root's directory, or this user's (a jailed VMM runs as a uid of its
    // own and writes into the directory husk, as root, made for it).
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(refuse(format!(
            "it belongs to uid {}, not {me}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "others may write to it (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(file)
}

/// Opens (making it if missing) the file `name` in the directory `dir`
/// for writing, mode 0600, never through a symlink.
fn open_beneath(dir: &File, name: &str) -> std::io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        rustix::fs::OFlags::WRONLY
            | rustix::fs::OFlags::CREATE
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o600),
    )?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-private-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn files_are_made_private_in_a_private_directory() {
        let base = scratch("made");
        let dir = base.join("a/b");
        let files = create_files(&dir, &["state", "memory"]).unwrap();
        assert_eq!(files.len(), 2);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("state")), 0o600);
        assert_eq!(mode(&dir.join("memory")), 0o600);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn links_and_open_directories_are_refused() {
        let base = scratch("refused");
        let target = base.join("target");
        std::fs::write(&target, b"keep").unwrap();
        // A symlink planted at a file's name.
        let dir = base.join("d");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("state")).unwrap();
        let e = create_files(&dir, &["state"]).unwrap_err();
        assert!(e.to_string().contains("cannot create"), "{e}");
        // A hard link at a file's name.
        let dir2 = base.join("d2");
        std::fs::create_dir(&dir2).unwrap();
        std::fs::hard_link(&target, dir2.join("state")).unwrap();
        let e = create_files(&dir2, &["state"]).unwrap_err();
        assert!(e.to_string().contains("a link to another file"), "{e}");
        // A directory others may write to, and a symlink in its place.
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = create_files(&open, &["state"]).unwrap_err();
        assert!(e.to_string().contains("others may write to it"), "{e}");
        std::os::unix::fs::symlink(&dir, base.join("link")).unwrap();
        let e = create_files(&base.join("link"), &["state"]).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
