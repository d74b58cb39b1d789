//! A pod in one VM (containerd's shim, docs/kubernetes.md): the pod's
//! sandbox container starts the VM, and each further container of the pod
//! is made in the same guest by its agent.
//!
//! The containers' roots and volumes reach the guest through one share
//! that the sandbox's VM gets at start, the last volume share
//! ([`POD_TAG`]); no device is added later. On the host:
//!
//! - `<pod>/rw` is a directory bound on itself and made a shared mount;
//!   the host binds each container's root at `rw/c-<id>/rootfs`, its
//!   volume directories at `rw/v-<hash>` (one per host directory and
//!   mode, shared by the pod's containers as an emptyDir is) and its
//!   volume files on empty files at `rw/c-<id>/f<n>`;
//! - `<pod>/ro` is a read-only bind of `rw` that receives those binds
//!   (a slave of its peer group), and is what the VMM serves. The guest
//!   can write inside a container's root (the bind is read-write) but can
//!   create nothing beside them: it never plants a symlink or a
//!   directory where the host mounts next. A read-only root or volume is
//!   read-only on both sides, so the VMM's writes get EROFS from the host
//!   kernel.
//!
//! A container's binds are detached when it is removed; the pod's, with
//! its volumes, when the sandbox's VM ends.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use husk_protocol::{VOLUME_TAGS, VOLUMES_DIR};
use rustix::mount::{MountPropagationFlags, UnmountFlags};
use serde::{Deserialize, Serialize};

/// The volume share that carries the pod.
pub const POD_TAG: &str = VOLUME_TAGS[VOLUME_TAGS.len() - 1];

/// A container's place in a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pod {
    /// The pod's sandbox: its VM is the pod's.
    Sandbox,
    /// A container made in the VM of sandbox `sandbox`, whose state is
    /// under husk root `root`.
    Member {
        /// The sandbox's husk root.
        root: PathBuf,
        /// The sandbox's container ID.
        sandbox: String,
    },
}

/// The CRI annotation with the pod's memory limit, bytes.
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// The CRI annotation with the pod's CPU quota, microseconds per period.
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// The CRI annotation with the pod's CPU period, microseconds.
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// The pod's limits as containerd's CRI passes them to the sandbox (its
/// annotations, from the pod's resources and overhead), that size the
/// pod's VM; `None` where it passes none (the VM then has the default
/// size, docs/kubernetes.md).
pub fn sandbox_resources(
    annotations: &std::collections::HashMap<String, String>,
) -> Result<Option<oci_spec::runtime::LinuxResources>, String> {
    let number = |key: &str| -> Result<Option<i64>, String> {
        annotations
            .get(key)
            .map(|v| {
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("annotation {key}={v:?} is not a number"))
            })
            .transpose()
    };
    let (memory, quota, period) = (
        number(SANDBOX_MEMORY)?.filter(|&m| m > 0),
        number(SANDBOX_CPU_QUOTA)?.filter(|&q| q > 0),
        number(SANDBOX_CPU_PERIOD)?.filter(|&p| p > 0),
    );
    if memory.is_none() && quota.is_none() {
        return Ok(None);
    }
    let mut r = oci_spec::runtime::LinuxResources::default();
    if let Some(limit) = memory {
        let mut m = oci_spec::runtime::LinuxMemory::default();
        m.set_limit(Some(limit));
        r.set_memory(Some(m));
    }
    if let Some(quota) = quota {
        let mut cpu = oci_spec::runtime::LinuxCpu::default();
        cpu.set_quota(Some(quota));
        cpu.set_period(period.map(|p| p as u64));
        r.set_cpu(Some(cpu));
    }
    Ok(Some(r))
}

/// The pod directory of the sandbox whose state directory is `state_dir`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pod")
}

fn errno(what: String) -> impl FnOnce(rustix::io::Errno) -> String {
    move |e| format!("{what}: {}", std::io::Error::from(e))
}

/// Makes pod directory `pod` (rw shared, ro its read-only slave); returns
/// the directory the VMM serves.
pub fn make(pod: &Path) -> Result<PathBuf, String> {
    let (rw, ro) = (pod.join("rw"), pod.join("ro"));
    for d in [&rw, &ro] {
        std::fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    let made = (|| {
        rustix::mount::mount_bind(&rw, &rw).map_err(errno(format!("bind {}", rw.display())))?;
        rustix::mount::mount_change(&rw, MountPropagationFlags::SHARED)
            .map_err(errno(format!("make {} shared", rw.display())))?;
        rustix::mount::mount_bind(&rw, &ro).map_err(errno(format!("bind {}", ro.display())))?;
        remount_read_only(&ro)?;
        rustix::mount::mount_change(&ro, MountPropagationFlags::DOWNSTREAM)
            .map_err(errno(format!("make {} a slave", ro.display())))
    })();
    if let Err(e) = made {
        remove(pod);
        return Err(e);
    }
    Ok(ro)
}

fn remount_read_only(path: &Path) -> Result<(), String> {
    rustix::mount::mount_remount(
        path,
        rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::RDONLY,
        "",
    )
    .map_err(errno(format!("make {} read-only", path.display())))
}

/// Removes pod directory `pod`: every bind under it detached, then its
/// directories and mount-point files, never crossing into a mount.
pub fn remove(pod: &Path) {
    for d in ["ro", "rw"] {
        let _ = rustix::mount::unmount(pod.join(d), UnmountFlags::DETACH);
    }
    remove_same_fs(pod);
}

/// Removes `path` and what is beneath it on its own file system; a mount
/// still beneath (an unmount that failed) is left, with what holds it.
fn remove_same_fs(path: &Path) {
    let Ok(top) = std::fs::symlink_metadata(path) else {
        return;
    };
    fn walk(path: &Path, dev: u64) {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        if meta.dev() != dev {
            return;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                walk(&entry.path(), dev);
            }
            let _ = std::fs::remove_dir(path);
        } else {
            let _ = std::fs::remove_file(path);
        }
    }
    walk(path, top.dev());
}

/// A short stable name of a host path (FNV-1a), for a volume's directory.
fn name_of(path: &Path, read_only: bool) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("v-{hash:016x}{}", if read_only { "-ro" } else { "" })
}

/// Binds `source` on `<pod>/rw/<rel>` (made as a directory or an empty
/// file as `source` is), read-only on both sides with `read_only`.
fn bind(pod: &Path, rel: &str, source: &Path, read_only_bind: bool) -> Result<(), String> {
    let target = pod.join("rw").join(rel);
    let meta = std::fs::metadata(source)
        .map_err(|e| format!("bind source {} cannot be used: {e}", source.display()))?;
    if meta.is_dir() {
        std::fs::create_dir_all(&target)
    } else {
        std::fs::File::create(&target).map(drop)
    }
    .map_err(|e| format!("create {}: {e}", target.display()))?;
    rustix::mount::mount_bind(source, &target).map_err(errno(format!(
        "bind {} on {}",
        source.display(),
        target.display()
    )))?;
    if read_only_bind {
        remount_read_only(&target)?;
        remount_read_only(&pod.join("ro").join(rel))?;
    }
    Ok(())
}

/// A container of the pod at `pod`: its root (`rootfs`, read-only with
/// `readonly`) and the host paths its spec binds are bound into the pod
/// share. Returns the root's guest path and the spec with bind sources
/// rewritten to guest paths. On failure, what was bound is undone.
pub fn add_member(
    pod: &Path,
    id: &str,
    rootfs: &Path,
    readonly: bool,
    spec_json: &str,
) -> Result<(String, String), String> {
    let guest = |rel: &str| format!("{VOLUMES_DIR}/{POD_TAG}/{rel}");
    let member = format!("c-{id}");
    let added = (|| {
        std::fs::create_dir_all(pod.join("rw").join(&member))
            .map_err(|e| format!("create the container's pod directory: {e}"))?;
        let root_rel = format!("{member}/rootfs");
        bind(pod, &root_rel, rootfs, readonly)?;
        let mut spec: serde_json::Value =
            serde_json::from_str(spec_json).map_err(|e| format!("the spec: {e}"))?;
        let mut files = 0;
        if let Some(mounts) = spec["mounts"].as_array_mut() {
            for m in mounts.iter_mut().filter(|m| crate::volumes::is_bind(m)) {
                let Some(source) = m["source"].as_str().map(PathBuf::from) else {
                    continue;
                };
                let ro = crate::volumes::read_only(m);
                let destination = m["destination"].as_str().unwrap_or("?").to_owned();
                let meta = std::fs::metadata(&source).map_err(|e| {
                    format!(
                        "mount {destination}: bind source {} cannot be used: {e}",
                        source.display()
                    )
                })?;
                let rel = if meta.is_dir() {
                    // One bind per host directory and mode for the whole
                    // pod: its containers share its files (and the guest's
                    // page cache of them).
                    let rel = name_of(&source, ro);
                    let there = pod.join("rw").join(&rel);
                    let bound = std::fs::metadata(&there)
                        .ok()
                        .zip(std::fs::metadata(pod.join("rw")).ok())
                        .is_some_and(|(a, b)| a.dev() != b.dev());
                    if !bound {
                        bind(pod, &rel, &source, ro)
                            .map_err(|e| format!("mount {destination}: {e}"))?;
                    }
                    rel
                } else {
                    // A file is bound, not copied: a write to it (the
                    // termination log) reaches the host's file.
                    let rel = format!("{member}/f{files}");
                    files += 1;
                    bind(pod, &rel, &source, ro)
                        .map_err(|e| format!("mount {destination}: {e}"))?;
                    rel
                };
                m["source"] = guest(&rel).into();
            }
        }
        let json = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
        Ok((guest(&root_rel), json))
    })();
    if added.is_err() {
        remove_member(pod, id);
    }
    added
}

/// Detaches container `id`'s binds from the pod and removes its
/// directory (the pod's shared volumes stay until the pod ends).
pub fn remove_member(pod: &Path, id: &str) {
    let dir = pod.join("rw").join(format!("c-{id}"));
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let _ = rustix::mount::unmount(entry.path(), UnmountFlags::DETACH);
    }
    remove_same_fs(&dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_are_stable_and_distinct() {
        let a = name_of(Path::new("/var/lib/kubelet/pods/x/volumes/cache"), false);
        assert_eq!(
            a,
            name_of(Path::new("/var/lib/kubelet/pods/x/volumes/cache"), false)
        );
        assert_ne!(
            a,
            name_of(Path::new("/var/lib/kubelet/pods/x/volumes/other"), false)
        );
        assert_ne!(
            a,
            name_of(Path::new("/var/lib/kubelet/pods/x/volumes/cache"), true)
        );
        assert!(a.starts_with("v-") && a.len() == 18, "{a}");
    }

    #[test]
    fn the_pods_annotations_size_its_vm() {
        let mut a = std::collections::HashMap::new();
        assert_eq!(sandbox_resources(&a).unwrap(), None);
        a.insert(SANDBOX_MEMORY.to_owned(), "1073741824".to_owned());
        a.insert(SANDBOX_CPU_QUOTA.to_owned(), "200000".to_owned());
        a.insert(SANDBOX_CPU_PERIOD.to_owned(), "100000".to_owned());
        let r = sandbox_resources(&a).unwrap().unwrap();
        let shape = husk_guest::shape::Shape::on_host(Some(&r), 4).unwrap();
        assert_eq!((shape.vcpus, shape.memory_mib), (2, 1280));
        a.insert(SANDBOX_MEMORY.to_owned(), "lots".to_owned());
        let e = sandbox_resources(&a).unwrap_err();
        assert!(e.contains(SANDBOX_MEMORY) && e.contains("lots"), "{e}");
    }

    #[test]
    fn removal_follows_no_symlink() {
        let dir = std::env::temp_dir().join(format!("husk-pod-rm-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("a/link")).unwrap();
        remove_same_fs(&dir);
        assert!(!dir.exists());
        assert!(Path::new("/etc/passwd").exists(), "a symlink was followed");
    }
}
