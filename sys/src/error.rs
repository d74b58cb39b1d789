//! The one error of a file operation that husk's crates share: what was
//! being done, to which path, and the system's reason (its source). The
//! runtime, image store, warm-start cache and snapshot code each had a
//! variant of their own for this (issue 15).

use std::path::{Path, PathBuf};

/// A file operation on `path` failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {}", .path.display())]
pub struct PathError {
    /// What was being done ("read", "create", "write the pid file").
    pub what: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl PathError {
    /// A `map_err` adapter: `.map_err(PathError::at("read", &path))`.
    pub fn at(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self { what, path, source }
    }

    /// The system's error number, when the failure came with one.
    pub fn kind(&self) -> std::io::ErrorKind {
        self.source.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_operation_and_path_and_keeps_the_reason() {
        let e = std::fs::read("/nonexistent/husk")
            .map_err(PathError::at("read", Path::new("/nonexistent/husk")))
            .unwrap_err();
        assert_eq!(e.to_string(), "cannot read /nonexistent/husk");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(source.contains("No such file"), "{source}");
    }
}
