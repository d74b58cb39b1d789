//! The container's cgroup on the host: the VMM and the monitor are moved
//! into the spec's `linux.cgroupsPath`, so what the host accounts and
//! limits for the container is its VM.
//!
//! Every mounted hierarchy gets the path: each cgroup v1 controller under
//! /sys/fs/cgroup (cpuset left out: a new cpuset cgroup needs its CPUs
//! and memory nodes copied in first, and the VM's vCPUs are the
//! container's CPUs anyway) and the v2 hierarchy where one is mounted. A
//! systemd-style path (`slice:prefix:name`) becomes `slice/prefix-name.scope`.
//! `delete` removes the directories once the processes are gone.

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// The relative cgroup path of a spec's `cgroupsPath`.
pub fn relative(cgroups_path: &str) -> Option<PathBuf> {
    let path = match cgroups_path.split(':').collect::<Vec<_>>()[..] {
        [slice, prefix, name] => format!("{slice}/{prefix}-{name}.scope"),
        _ => cgroups_path.to_owned(),
    };
    let rel = PathBuf::from(path.trim_start_matches('/'));
    let ok = !rel.as_os_str().is_empty()
        && rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    ok.then_some(rel)
}

/// The hierarchies to place processes in: v1 controllers (not cpuset) and
/// the v2 hierarchy, where mounted.
fn hierarchies() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dir, kind, opts) = (f.get(1)?, f.get(2)?, f.get(3)?);
            let wanted = match *kind {
                "cgroup2" => true,
                "cgroup" => !opts.split(',').any(|o| o == "cpuset"),
                _ => false,
            };
            (wanted && dir.starts_with(ROOT)).then(|| PathBuf::from(dir))
        })
        .collect()
}

/// Moves `pids` into the cgroup `rel` of every hierarchy, making it.
pub fn place(rel: &Path, pids: &[u32]) -> Result<(), String> {
    for h in hierarchies() {
        let dir = h.join(rel);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("create cgroup {}: {e}", dir.display()))?;
        for pid in pids {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                .map_err(|e| format!("move {pid} into cgroup {}: {e}", dir.display()))?;
        }
    }
    Ok(())
}

/// Bounds the memory of everything in the cgroup `rel` (the VMM and the
/// monitor): `memory.limit_in_bytes` in cgroup v1's memory hierarchy,
/// `memory.max` in v2's, where the file exists.
pub fn limit_memory(rel: &Path, bytes: u64) -> Result<(), String> {
    for h in hierarchies() {
        let dir = h.join(rel);
        for file in ["memory.limit_in_bytes", "memory.max"] {
            let path = dir.join(file);
            if path.exists() {
                std::fs::write(&path, bytes.to_string())
                    .map_err(|e| format!("write {bytes} to {}: {e}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// Removes the cgroup `rel` (and its parents that are left empty and were
/// made for it, up to the first that is not) from every hierarchy.
pub fn remove(rel: &Path) {
    for h in hierarchies() {
        let mut dir = h.join(rel);
        // A killed process holds its cgroup until it is reaped (by its
        // parent, or init once that parent is gone too): wait up to 2 s.
        for _ in 0..100 {
            match std::fs::remove_dir(&dir) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                _ => break,
            }
        }
        while dir != h && (std::fs::remove_dir(&dir).is_ok() || !dir.exists()) {
            if !dir.pop() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_are_checked_and_systemd_paths_converted() {
        assert_eq!(relative("/default/c1"), Some(PathBuf::from("default/c1")));
        assert_eq!(
            relative("system.slice:husk:c1"),
            Some(PathBuf::from("system.slice/husk-c1.scope"))
        );
        assert_eq!(relative("/"), None);
        assert_eq!(relative("/a/../../etc"), None);
    }
}
