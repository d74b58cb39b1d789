//! A cgroup (v2) per container in the guest: where the spec's resource
//! limits are enforced (`memory.max`, `cpu.max`, `cpu.weight`,
//! `pids.max`), where `update` changes them, and where stats and OOM kills
//! are read from.
//!
//! The host bounds the whole VM (its memory size, its vCPUs, the VMM's
//! host cgroup); the guest's cgroup bounds the container inside it, so a
//! container that outgrows its limit is OOM-killed by the guest kernel and
//! the event is seen here (`memory.events`), as runc reports it.

use std::path::PathBuf;

use husk_protocol::Stats;
use oci_spec::runtime::LinuxResources;
use rustix::mount::MountFlags;

/// Where the agent mounts the guest's cgroup2 hierarchy.
pub const ROOT: &str = "/sys/fs/cgroup";

/// Mounts cgroup2 and enables the controllers containers are limited by.
/// Called once at boot (before the warm-start snapshot).
pub fn init() -> Result<(), String> {
    rustix::mount::mount(
        c"cgroup2",
        ROOT,
        c"cgroup2",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        // Moving a process into a cgroup otherwise waits for an RCU
        // grace period (the threadgroup rwsem's fast path is switched
        // off and on around it): 0.6 s of every container start on an
        // emulated guest. favordynmods keeps it switched off.
        c"favordynmods",
    )
    .map_err(|e| format!("mount cgroup2 on {ROOT}: {}", std::io::Error::from(e)))?;
    write(
        &PathBuf::from(ROOT),
        "cgroup.subtree_control",
        "+memory +cpu +pids",
    )
}

fn write(dir: &std::path::Path, file: &str, value: &str) -> Result<(), String> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
}

/// A container's cgroup directory.
pub fn dir(id: &str) -> PathBuf {
    PathBuf::from(ROOT).join(id)
}

/// Makes a container's cgroup and applies its resources.
pub fn create(id: &str, resources: Option<&LinuxResources>) -> Result<(), String> {
    let dir = dir(id);
    std::fs::create_dir(&dir).map_err(|e| format!("create the cgroup {}: {e}", dir.display()))?;
    match resources {
        Some(r) => apply(id, r),
        None => Ok(()),
    }
}

/// cgroup v1's `cpu.shares` (2-262144) as v2's `cpu.weight` (1-10000), as
/// runc and crun convert it.
pub fn weight_of_shares(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
}

/// Writes the spec's limits into a container's cgroup (at create, and at
/// `update`). What the spec leaves out is left as it is.
pub fn apply(id: &str, r: &LinuxResources) -> Result<(), String> {
    let dir = dir(id);
    let limit = |v: i64| {
        if v < 0 {
            "max".to_owned()
        } else {
            v.to_string()
        }
    };
    if let Some(m) = r.memory() {
        if let Some(l) = m.limit() {
            write(&dir, "memory.max", &limit(l))?;
        }
        if let Some(l) = m.reservation() {
            write(&dir, "memory.low", &limit(l))?;
        }
    }
    if let Some(c) = r.cpu() {
        if c.quota().is_some() || c.period().is_some() {
            let quota = c.quota().map(limit).unwrap_or_else(|| "max".into());
            let period = c.period().unwrap_or(100_000);
            write(&dir, "cpu.max", &format!("{quota} {period}"))?;
        }
        if let Some(shares) = c.shares() {
            write(&dir, "cpu.weight", &weight_of_shares(shares).to_string())?;
        }
    }
    if let Some(p) = r.pids() {
        write(&dir, "pids.max", &limit(p.limit()))?;
    }
    Ok(())
}

fn read_number(dir: &std::path::Path, file: &str, key: Option<&str>) -> u64 {
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    match key {
        None => text.trim().parse().unwrap_or(0),
        Some(key) => text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or(0),
    }
}

/// The OOM kills in a container's cgroup (`memory.events`); `None` where
/// it has none.
pub fn oom_kills(id: &str) -> Option<u64> {
    let dir = dir(id);
    dir.is_dir()
        .then(|| read_number(&dir, "memory.events", Some("oom_kill ")))
}

/// A container's resource usage and OOM kills, from its cgroup.
pub fn stats(id: &str) -> Result<Stats, String> {
    let dir = dir(id);
    if !dir.is_dir() {
        return Err(format!("container {id:?} has no cgroup"));
    }
    Ok(Stats {
        cpu_ns: read_number(&dir, "cpu.stat", Some("usage_usec ")) * 1000,
        memory_bytes: read_number(&dir, "memory.current", None),
        pids: read_number(&dir, "pids.current", None),
        oom_kills: read_number(&dir, "memory.events", Some("oom_kill ")),
        memory_limit: match std::fs::read_to_string(dir.join("memory.max")) {
            Ok(s) => s.trim().parse().ok(),
            Err(_) => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_become_weights_as_runc_converts_them() {
        assert_eq!(weight_of_shares(1024), 39);
        assert_eq!(weight_of_shares(2), 1);
        assert_eq!(weight_of_shares(262_144), 10_000);
        assert_eq!(weight_of_shares(0), 100);
    }
}
