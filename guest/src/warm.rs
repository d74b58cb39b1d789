//! Warm starts: a booted guest, snapshotted once per kernel, init and VM
//! shape, from which every later VM of that kind is restored.
//!
//! The cache lives under Husk's root (`<root>/snapshots/<key>/`), where
//! `<key>` hashes the identity (device, inode, size, mtime) of the kernel
//! and initramfs files, the VM shape and the
//! snapshot mark; a change to any of them makes a new key, so a stale
//! snapshot is never restored. A snapshot is made on first use: the VMM
//! boots the guest and stops it at its ready mark: the agent's (it connects
//! to the host's ready port over vsock once it listens, and a restored agent
//! continues from there), or for the test init the kernel's exec of init
//! (mark 2).
//!
//! Two husk processes asking for the same snapshot at once is safe: one
//! makes it under an exclusive lock, in a temporary directory renamed into
//! place when complete; the other waits for the lock and finds it made.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::FlockOperation;
use thiserror::Error;

/// What a warm-start snapshot is a snapshot of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The initramfs (the agent's).
    pub initramfs: PathBuf,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// The debug-port mark at which the guest is ready to snapshot.
    pub ready_mark: u8,
    /// The guest has a vsock device (the agent signals readiness over it).
    pub vsock: bool,
    /// Tags of the virtio-fs shares the guest has; each is bound to a
    /// directory when a VM is restored (an empty one while it boots).
    pub shares: Vec<String>,
    /// Network slots (virtio-net devices, unbound while it boots; a
    /// restore binds a TAP to each slot the container uses).
    pub nets: u8,
}

/// Errors making or finding a warm-start snapshot.
#[derive(Debug, Error)]
pub enum WarmError {
    /// A file cannot be read, or the cache cannot be written.
    #[error(transparent)]
    Io(#[from] husk_sys::PathError),
    /// The VMM could not boot the guest to its ready point.
    #[error("booting the guest for its snapshot failed ({status}): {stderr}")]
    Boot {
        /// The VMM's exit status.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
}

/// Whether the snapshot was there already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Found in the cache.
    Cached,
    /// Made now, by a cold boot.
    Created,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WarmError {
    let path = path.to_owned();
    move |source| husk_sys::PathError { what, path, source }.into()
}

/// FNV-1a, 64 bits: a cache key, not a security boundary (the snapshot
/// itself carries a checksum and the VMM checks it).
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

/// Mixes a file's identity into `hash`: its device, inode, size and
/// modification time, as make and ccache judge a file changed. Reading the
/// whole kernel for every container start would cost tens of
/// milliseconds; a rebuilt kernel or agent is a new file or a new mtime.
fn hash_file(hash: &mut u64, path: &Path) -> Result<(), WarmError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(io("read", path))?;
    let id = format!(
        "{}:{}:{}:{}.{}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    fnv1a(hash, id.as_bytes());
    Ok(())
}

/// A short identity of the file at `path` (see [`hash_file`]).
pub fn file_identity(path: &Path) -> Result<String, WarmError> {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    hash_file(&mut hash, path)?;
    Ok(format!("{hash:016x}"))
}

impl GuestImage {
    /// The cache key: a hash of the kernel's and initramfs's identities,
    /// the shape, the mark and the VMM's snapshot format.
    pub fn key(&self) -> Result<String, WarmError> {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        hash_file(&mut hash, &self.kernel)?;
        fnv1a(&mut hash, b"\0initramfs\0");
        hash_file(&mut hash, &self.initramfs)?;
        let shape = format!(
            "\0vcpus={} memory={} mark={} vsock={} shares={:?} format={}",
            self.vcpus,
            self.memory_mib,
            self.ready_mark,
            self.vsock,
            self.shares,
            husk_protocol::snapshot::VERSION
        );
        fnv1a(&mut hash, shape.as_bytes());
        // Added after the rest: an image without network slots keeps the
        // key it had before they existed.
        if self.nets > 0 {
            fnv1a(&mut hash, format!("\0nets={}", self.nets).as_bytes());
        }
        Ok(format!("{hash:016x}"))
    }
}

/// Environment variable naming where the warm-start cache (`snapshots/`
/// and the agent's initramfs in `guest/`) lives instead of `--root`: for
/// callers such as containerd's shim, which give every namespace a root of
/// its own under /run, where a 256 MiB snapshot per root would be made
/// cold and held in memory.
pub const CACHE_ENV: &str = "HUSK_WARM_CACHE";

/// Where the warm-start cache of `root` lives.
pub fn cache_root(root: &Path) -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.to_owned())
}

/// Takes an exclusive lock on `path` for as long as the file is open.
pub fn lock(path: &Path) -> Result<File, WarmError> {
    let file = File::create(path).map_err(io("create", path))?;
    // Released when the file is closed.
    rustix::fs::flock(&file, FlockOperation::LockExclusive)
        .map_err(|e| io("lock", path)(e.into()))?;
    Ok(file)
}

/// The warm-start snapshot of `image` under `root`, made with the VMM at
/// `vmm` if it is not cached yet.
pub fn snapshot(
    root: &Path,
    vmm: &Path,
    image: &GuestImage,
) -> Result<(PathBuf, Origin), WarmError> {
    let dir = cache_root(root).join("snapshots");
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    // Snapshots hold guest memory, and their boots' sockets: the cache
    // may live outside husk's root, so it is closed to others itself.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io("create", &dir))?;
    let key = image.key()?;
    let snap = dir.join(&key);
    if snap.join(husk_protocol::snapshot::STATE_FILE).exists() {
        return Ok((snap, Origin::Cached));
    }
    let _lock = lock(&dir.join(format!("{key}.lock")))?;
    // Another process may have made it while we waited.
    if snap.join(husk_protocol::snapshot::STATE_FILE).exists() {
        return Ok((snap, Origin::Cached));
    }
    let tmp = dir.join(format!("{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut cmd = Command::new(vmm);
    // The boot's vsock socket only carries the agent's ready signal.
    let boot_socket = dir.join(format!("{key}.vsock"));
    let _ = std::fs::remove_file(&boot_socket);
    if image.vsock {
        cmd.arg("--vsock-socket").arg(&boot_socket);
    }
    // Shares are bound to their real directories on restore; the boot
    // serves an empty, read-only one (the guest mounts nothing before its
    // snapshot).
    let empty = dir.join(format!("{key}.empty"));
    if !image.shares.is_empty() {
        std::fs::create_dir_all(&empty).map_err(io("create", &empty))?;
    }
    for tag in &image.shares {
        cmd.arg("--share")
            .arg(format!("{tag}={}:ro", empty.display()));
    }
    if image.nets > 0 {
        cmd.args(["--nets", &image.nets.to_string()]);
    }
    // The boot dies with whoever runs it (a killed monitor left it
    // running), and starts with no signal blocked or ignored, in a PID
    // namespace of its own.
    cmd.arg("--kernel")
        .arg(&image.kernel)
        .arg("--initramfs")
        .arg(&image.initramfs)
        .args(["--cpus", &image.vcpus.to_string()])
        .args(["--memory", &image.memory_mib.to_string()])
        .arg("--snapshot-dir")
        .arg(&tmp)
        .args(["--snapshot-at-mark", &image.ready_mark.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let out = husk_sys::child::spawn_vmm(&mut cmd)
        .and_then(|(child, _starter)| child.wait_with_output())
        .map_err(io("run", vmm))?;
    let _ = std::fs::remove_file(&boot_socket);
    let _ = std::fs::remove_dir(&empty);
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(WarmError::Boot {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    std::fs::rename(&tmp, &snap).map_err(io("store", &snap))?;
    prune(&dir, KEEP);
    sweep(&dir);
    Ok((snap, Origin::Created))
}

/// Snapshots kept in a cache: each is as large as its guest's memory, and
/// every new kernel or agent makes a new one.
pub const KEEP: usize = 4;

/// Removes all but the `keep` newest entries of a cache directory (and
/// their lock files). A VM restored from a removed snapshot keeps running:
/// its memory mapping holds the file.
pub fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut made: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.')
                && !name.ends_with(".lock")
                && !name.ends_with(".tmp")
                && !name.ends_with(".vsock")
                && !name.ends_with(".empty")
                && name != "agent.lock"
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    made.sort();
    made.reverse();
    for (_, path) in made.into_iter().skip(keep) {
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        let mut lock = path.into_os_string();
        lock.push(".lock");
        let _ = std::fs::remove_file(lock);
    }
}

/// Removes what boots that ended without cleaning up (a killed starter)
/// left in a cache directory: `<key>.tmp`, `<key>.vsock` and `<key>.empty`
/// of every key whose lock nobody holds, i.e. no boot of it is under way.
pub fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(key) = [".tmp", ".vsock", ".empty"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
        else {
            continue;
        };
        let lock = dir.join(format!("{key}.lock"));
        let held = match File::open(&lock) {
            // Released when `f` is closed.
            Ok(f) => rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).is_err(),
            Err(_) => false,
        };
        if held {
            continue;
        }
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> GuestImage {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.join("initramfs"), b"initramfs").unwrap();
        GuestImage {
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initramfs"),
            vcpus: 1,
            memory_mib: 128,
            ready_mark: 2,
            vsock: false,
            shares: Vec::new(),
            nets: 0,
        }
    }

    #[test]
    fn the_key_changes_with_every_input_and_only_then() {
        let dir = std::env::temp_dir().join(format!("husk-warm-key-{}", std::process::id()));
        let image = files(&dir);
        let key = image.key().unwrap();
        assert_eq!(key, image.key().unwrap());
        let mut other = image.clone();
        other.memory_mib = 256;
        assert_ne!(other.key().unwrap(), key);
        let mut other = image.clone();
        other.vcpus = 2;
        assert_ne!(other.key().unwrap(), key);
        let mut other = image.clone();
        other.ready_mark = 3;
        assert_ne!(other.key().unwrap(), key);
        let mut other = image.clone();
        other.vsock = true;
        assert_ne!(other.key().unwrap(), key);
        let mut other = image.clone();
        other.nets = 4;
        assert_ne!(other.key().unwrap(), key);
        let mut other = image.clone();
        other.shares = vec!["rootfs".into()];
        assert_ne!(other.key().unwrap(), key);
        std::fs::write(dir.join("initramfs"), b"initramfs v2").unwrap();
        assert_ne!(image.key().unwrap(), key);
        std::fs::write(dir.join("initramfs"), b"initramfs").unwrap();
        std::fs::write(dir.join("vmlinux"), b"kernel v2").unwrap();
        assert_ne!(image.key().unwrap(), key);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_cache_keeps_the_newest_entries() {
        let dir = std::env::temp_dir().join(format!("husk-warm-prune-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..6 {
            let snap = dir.join(format!("s{i}"));
            std::fs::create_dir(&snap).unwrap();
            std::fs::write(snap.join("state"), b"x").unwrap();
            std::fs::write(dir.join(format!("s{i}.lock")), b"").unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i);
            std::fs::File::open(&snap).unwrap().set_modified(t).unwrap();
        }
        prune(&dir, 4);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "s2", "s2.lock", "s3", "s3.lock", "s4", "s4.lock", "s5", "s5.lock"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_kernel_is_named_and_a_failed_boot_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("husk-warm-err-{}", std::process::id()));
        let mut image = files(&dir);
        image.kernel = dir.join("missing");
        let err = snapshot(&dir.join("root"), Path::new("/bin/false"), &image).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot read {}", dir.join("missing").display())
        );
        // A VMM that fails: an error, and no snapshot or temporary left.
        let image = files(&dir);
        let err = snapshot(&dir.join("root"), Path::new("/bin/false"), &image).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("booting the guest for its snapshot failed")
        );
        let left: Vec<_> = std::fs::read_dir(dir.join("root/snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
