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

use std::io;

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
