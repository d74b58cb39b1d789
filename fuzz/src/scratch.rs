//! Scratch directories for targets that write files (the virtio-fs share,
//! the layer unpacker, the image store), fenced so that anything written
//! outside the directory the code under test was given is seen:
//!
//! ```text
//! /tmp/husk-fuzz-NAME-PID/              sentinel, outer, harness  and nothing else
//! /tmp/husk-fuzz-NAME-PID/outer/        sentinel, work            and nothing else
//! /tmp/husk-fuzz-NAME-PID/outer/work    the directory handed to the code
//! /tmp/husk-fuzz-NAME-PID/harness       the harness's own files (sockets, inputs)
//! ```
//!
//! [`Scratch::check`] panics (a crash for the fuzzer) when either level
//! holds anything else or a sentinel changed: an entry that climbed out
//! of `work` by one or two levels, or a write through a link that points
//! at a sentinel.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const SENTINEL: &str = "sentinel";
const SENTINEL_TEXT: &[u8] = b"outside the scratch directory\n";

/// A fenced scratch directory, removed when dropped.
pub struct Scratch {
    base: PathBuf,
}

impl Scratch {
    /// Makes `/tmp/husk-fuzz-NAME-PID` afresh, with an empty `work`.
    pub fn new(name: &str) -> Self {
        let base = std::env::temp_dir().join(format!("husk-fuzz-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("outer/work")).expect("scratch directory");
        std::fs::create_dir_all(base.join("harness")).expect("scratch directory");
        for dir in [base.clone(), base.join("outer")] {
            std::fs::write(dir.join(SENTINEL), SENTINEL_TEXT).expect("sentinel");
            set_mode(&dir.join(SENTINEL), 0o644);
        }
        Self { base }
    }

    /// The directory the code under test may write.
    pub fn work(&self) -> PathBuf {
        self.base.join("outer/work")
    }

    /// The directory for the harness's own files (sockets, inputs),
    /// beside the fence.
    pub fn harness(&self) -> PathBuf {
        self.base.join("harness")
    }

    /// The outermost sentinel file.
    pub fn sentinel(&self) -> PathBuf {
        self.base.join(SENTINEL)
    }

    /// The whole scratch tree.
    pub fn root(&self) -> &Path {
        &self.base
    }

    /// Empties `work` (whatever modes its entries were given).
    pub fn reset(&self) {
        let work = self.work();
        if std::fs::symlink_metadata(&work).is_ok_and(|m| m.is_dir()) {
            for entry in std::fs::read_dir(&work).expect("read work").flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    make_removable(&path);
                    std::fs::remove_dir_all(&path).expect("empty work");
                } else {
                    std::fs::remove_file(&path).expect("empty work");
                }
            }
        } else {
            let _ = std::fs::remove_file(&work);
            std::fs::create_dir(&work).expect("work");
        }
    }

    /// Panics when anything but the fence's own entries is beside `work`
    /// or above it, or a sentinel was changed.
    pub fn check(&self) {
        let outer = self.base.join("outer");
        for (dir, expected) in [
            (&self.base, &["outer", SENTINEL, "harness"][..]),
            (&outer, &["work", SENTINEL][..]),
        ] {
            let found: BTreeSet<String> = std::fs::read_dir(dir)
                .expect("read scratch")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
            assert_eq!(
                found,
                expected,
                "something was written outside the directory it was given, in {}",
                dir.display()
            );
            let sentinel = dir.join(SENTINEL);
            let meta = std::fs::symlink_metadata(&sentinel).expect("sentinel");
            assert!(
                meta.is_file() && meta.nlink() == 1 && meta.mode() & 0o7777 == 0o644,
                "the sentinel {} was changed: {meta:?}",
                sentinel.display()
            );
            assert_eq!(
                std::fs::read(&sentinel).expect("sentinel"),
                SENTINEL_TEXT,
                "the sentinel {} was written",
                sentinel.display()
            );
        }
    }
}

/// Directories the code under test made without write or search rights
/// are opened up so that they can be removed (root needs this only for
/// the immutable cases, which nothing here makes; it is cheap).
fn make_removable(dir: &Path) {
    set_mode(dir, 0o700);
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}
