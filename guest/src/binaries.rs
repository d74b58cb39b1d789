//! Where husk finds its other pieces: the VMM, the guest kernel, and the
//! agent, which it packs into the guest's initramfs.
//!
//! Each comes from an environment variable when set (`HUSK_VMM`,
//! `HUSK_KERNEL`, `HUSK_AGENT`), else from next to the `husk` binary (an
//! install, or cargo's target directory; the agent also from the musl
//! target directory the Makefile builds it in), else, for the kernel, from
//! the cache that `kernel-config/build-kernel.sh` fills.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::initramfs::Initramfs;
use crate::shape::Shape;
use crate::warm::GuestImage;

/// Where the runtime's pieces are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `husk-vmm`.
    pub vmm: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The agent's initramfs.
    pub initramfs: PathBuf,
}

/// The warm-start image of container guests made from `bins`, with `nets`
/// network slots.
pub fn guest_image(bins: &Binaries, shape: Shape, nets: u8) -> GuestImage {
    GuestImage {
        kernel: bins.kernel.clone(),
        initramfs: bins.initramfs.clone(),
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
        ready_mark: husk_protocol::READY_MARK,
        vsock: true,
        shares: std::iter::once(husk_protocol::ROOTFS_TAG)
            .chain(husk_protocol::VOLUME_TAGS)
            .map(str::to_owned)
            .collect(),
        nets,
    }
}

/// A piece that cannot be found or prepared.
#[derive(Debug, Error)]
pub enum BinariesError {
    /// Not found where it is looked for.
    #[error("cannot find {what}: looked in {}; set {var}", .tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NotFound {
        /// Which piece.
        what: &'static str,
        /// Its environment variable.
        var: &'static str,
        /// Where it was looked for.
        tried: Vec<PathBuf>,
    },
    /// The agent's initramfs cannot be written.
    #[error("cannot write the agent's initramfs {}", .0.display())]
    Initramfs(PathBuf, #[source] std::io::Error),
    /// The agent is not a static executable: it could not run in the
    /// guest, which has no dynamic loader.
    #[error("the agent {} is not a statically linked x86-64 executable (build it with `make agent`)", .0.display())]
    NotStatic(PathBuf),
    /// The agent cannot be read.
    #[error(transparent)]
    Identity(crate::warm::WarmError),
    /// A binary cannot be read.
    #[error("cannot read {}", .0.display())]
    Unreadable(PathBuf, #[source] std::io::Error),
    /// The agent cannot be packed.
    #[error("cannot pack the agent into an initramfs")]
    Pack(#[from] crate::initramfs::InitramfsError),
}

fn find(
    what: &'static str,
    var: &'static str,
    candidates: Vec<PathBuf>,
) -> Result<PathBuf, BinariesError> {
    if let Some(path) = std::env::var_os(var) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(BinariesError::NotFound {
                what,
                var,
                tried: vec![path],
            })
        };
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or(BinariesError::NotFound {
            what,
            var,
            tried: candidates,
        })
}

/// Whether `elf` is a 64-bit x86 executable without a program interpreter.
fn is_static_elf(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    const PT_INTERP: u32 = 3;
    if !elf.starts_with(b"\x7fELF\x02\x01") || u16_at(18) != Some(62) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        u32_at(at).is_some_and(|t| t != PT_INTERP)
    })
}

/// The agent's initramfs under `root`, written if this agent has none yet.
pub fn agent_initramfs(root: &Path, agent: &Path) -> Result<PathBuf, BinariesError> {
    let fail = |path: &Path| {
        let path = path.to_owned();
        move |e| BinariesError::Initramfs(path, e)
    };
    let identity = crate::warm::file_identity(agent).map_err(BinariesError::Identity)?;
    let dir = crate::warm::cache_root(root).join("guest");
    let path = dir.join(format!("agent-{identity}.cpio"));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(fail(&dir))?;
    // One writer at a time: the file's identity is part of the warm-start
    // key, so two racing writers would make two keys.
    let _lock = crate::warm::lock(&dir.join("agent.lock")).map_err(BinariesError::Identity)?;
    if path.is_file() {
        return Ok(path);
    }
    let bytes = std::fs::read(agent).map_err(fail(agent))?;
    if !is_static_elf(&bytes) {
        return Err(BinariesError::NotStatic(agent.to_owned()));
    }
    std::fs::create_dir_all(&dir).map_err(fail(&dir))?;
    let mut fs = Initramfs::with_base();
    fs.host_file("init", 0o755, agent)?;
    let tmp = dir.join(format!(".agent-{}.cpio", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(fail(&tmp))?;
    fs.write_to(std::io::BufWriter::new(file))?;
    std::fs::rename(&tmp, &path).map_err(fail(&path))?;
    crate::warm::prune(&dir, crate::warm::KEEP);
    Ok(path)
}

/// Finds the VMM, kernel and agent next to the running `husk`, and
/// prepares the agent's initramfs under `root`.
pub fn locate(root: &Path) -> Result<Binaries, BinariesError> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_default();
    locate_near(root, &exe_dir)
}

/// As [`locate`], looking next to a `husk` installed in `exe_dir`.
pub fn locate_near(root: &Path, exe_dir: &Path) -> Result<Binaries, BinariesError> {
    let found = find_near(exe_dir)?;
    Ok(Binaries {
        vmm: found.vmm,
        kernel: found.kernel,
        initramfs: agent_initramfs(root, &found.agent)?,
    })
}

/// Where the VMM, the kernel and the agent are, found as [`locate_near`]
/// finds them, with nothing written (`husk doctor`).
pub struct Found {
    /// `husk-vmm`.
    pub vmm: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The agent (static), not yet packed.
    pub agent: PathBuf,
}

/// Finds the VMM, kernel and agent for a `husk` in `exe_dir`; the agent
/// must be a static executable.
pub fn find_near(exe_dir: &Path) -> Result<Found, BinariesError> {
    let vmm = find(
        "the VMM (husk-vmm)",
        "HUSK_VMM",
        vec![exe_dir.join("husk-vmm")],
    )?;
    let kernel = find(
        "the guest kernel",
        "HUSK_KERNEL",
        vec![husk_protocol::paths::default_kernel()],
    )?;
    // cargo's target/<profile>/ next to target/x86_64-unknown-linux-musl/
    // (where a host build's dynamically linked husk-agent also lies).
    let mut agents = Vec::new();
    if let Some(target) = exe_dir.parent() {
        agents.push(target.join("x86_64-unknown-linux-musl/release/husk-agent"));
    }
    agents.push(exe_dir.join("husk-agent"));
    let agent = find("the guest agent (husk-agent)", "HUSK_AGENT", agents)?;
    let mut head = vec![0u8; 4096];
    let read = std::fs::File::open(&agent)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|e| BinariesError::Unreadable(agent.clone(), e))?;
    head.truncate(read);
    if !is_static_elf(&head) {
        return Err(BinariesError::NotStatic(agent));
    }
    Ok(Found { vmm, kernel, agent })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_static_agent_is_packed() {
        let root = std::env::temp_dir().join(format!("husk-bins-{}", std::process::id()));
        // A dynamically linked program (this host's ls) is refused by name.
        let err = agent_initramfs(&root, Path::new("/bin/ls")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the agent /bin/ls is not a statically linked x86-64 executable (build it with `make agent`)"
        );
        // busybox-static is static: packed once, found again.
        let first = agent_initramfs(&root, Path::new("/bin/busybox")).unwrap();
        assert_eq!(
            agent_initramfs(&root, Path::new("/bin/busybox")).unwrap(),
            first
        );
        assert!(std::fs::metadata(&first).unwrap().len() > 1_000_000);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
