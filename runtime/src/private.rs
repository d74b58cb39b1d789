//! Husk's root directory is its user's alone (docs/security.md): image
//! layers hold set-uid files and device nodes, containers' directories
//! hold their upper layers, and sockets under it control VMs. Like
//! docker's data root, the top is mode 0700, so nothing beneath it can be
//! reached by another host user, whatever the modes inside.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Makes `dir` (mode 0700) if it is missing, or takes group and other
/// access away from it if it is there. Refused, naming it, when it is not
/// a directory or belongs to another user.
pub fn root(dir: &Path) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("husk's root {}: {e}", dir.display());
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(fail)?;
    }
    let meta = std::fs::metadata(dir).map_err(fail)?;
    if !meta.is_dir() {
        return Err(format!("husk's root {} is not a directory", dir.display()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "husk's root {} belongs to uid {}, not to husk's user ({me})",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_made_or_closed_to_others_and_a_foreign_one_refused() {
        let base = std::env::temp_dir().join(format!("husk-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let made = base.join("a/b");
        root(&made).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&made), 0o700);
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        root(&open).unwrap();
        assert_eq!(mode(&open), 0o700);
        let file = base.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(root(&file).unwrap_err().contains("is not a directory"));
        if rustix::process::geteuid().is_root() {
            let theirs = base.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let e = root(&theirs).unwrap_err();
            assert!(e.contains("belongs to uid 65534"), "{e}");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
