//! A small file replaced whole, so that a reader sees the old contents or
//! the new, never a part: a container's `state.json`, written several
//! times on the path of every `husk run`.
//!
//! The new contents go to a temporary file beside the target, which is
//! then swapped with the target (`renameat2(RENAME_EXCHANGE)`) and
//! unlinked, holding the old contents. A plain `rename` over an existing
//! file costs several times more on ext4: its `auto_da_alloc` heuristic
//! starts writing the new file's data back at once, within the rename
//! (about 95 against 25 microseconds of CPU here, docs/benchmarks.md).
//! That heuristic guards a file against being found empty after a host
//! crash; what this module writes describes processes that a host crash
//! ends anyway. A target that does not exist yet is renamed into place.

use std::io::ErrorKind;
use std::path::Path;

use rustix::fs::{CWD, RenameFlags};

use crate::PathError;

/// Replaces the file at `path` with `contents`, through a temporary file
/// `.NAME.PID` in the same directory.
pub fn replace(path: &Path, contents: &[u8]) -> Result<(), PathError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    // Only a regular file is swapped: an exchange would as readily swap
    // a directory in the way out of its place.
    let swap = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => true,
        Ok(_) => {
            return Err(PathError::at("write", path)(std::io::Error::new(
                ErrorKind::AlreadyExists,
                "something other than a file is in the way",
            )));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => false,
        Err(e) => return Err(PathError::at("write", path)(e)),
    };
    std::fs::write(&tmp, contents).map_err(PathError::at("write", &tmp))?;
    if swap {
        match rustix::fs::renameat_with(CWD, &tmp, CWD, path, RenameFlags::EXCHANGE) {
            Ok(()) => return std::fs::remove_file(&tmp).map_err(PathError::at("remove", &tmp)),
            // Gone meanwhile, or a file system without the flag: renamed.
            Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::INVAL => {}
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(PathError::at("write", path)(e.into()));
            }
        }
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        PathError::at("write", path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("husk-replace-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        d
    }

    fn names(d: &std::path::Path) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    }

    #[test]
    fn a_file_is_made_then_replaced_and_no_temporary_file_is_left() {
        let d = scratch("ok");
        let f = d.join("state.json");
        replace(&f, b"one").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"one");
        replace(&f, b"two, longer").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two, longer");
        assert_eq!(names(&d), ["state.json"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_missing_directory_is_named() {
        let d = scratch("missing");
        let f = d.join("gone").join("state.json");
        let e = replace(&f, b"x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("gone/.state.json."), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_directory_in_the_way_is_refused_and_left_alone() {
        let d = scratch("dir");
        let f = d.join("state.json");
        std::fs::create_dir(&f).unwrap();
        std::fs::write(f.join("kept"), b"k").unwrap();
        assert!(replace(&f, b"x").is_err());
        assert_eq!(std::fs::read(f.join("kept")).unwrap(), b"k");
        assert_eq!(names(&d), ["state.json"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
