//! A container inside the guest: its root filesystem (the virtio-fs share
//! [`ROOTFS_TAG`]), and the plan its processes are started with, made from
//! the OCI spec the runtime sent.

use std::ffi::CString;
use std::path::{Component, Path};
use std::sync::Arc;

use husk_protocol::{Process, ROOTFS_TAG, VOLUME_TAGS, VOLUMES_DIR};
use oci_spec::runtime::{LinuxDeviceType, LinuxNamespaceType, Spec};
use rustix::fs::{FileType, Mode};
use rustix::mount::{MountFlags, MountPropagationFlags};
use rustix::process::{Gid, Resource};
use rustix::thread::UnshareFlags;

use crate::seccomp;
use crate::setup::{CapPlan, DeviceNode, MountStep, Plan, ProcPlan, capability};

/// Where the agent mounts container roots.
const CONTAINERS: &str = "/run/husk";

fn cstring(s: &str, what: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} {s:?} contains a NUL byte"))
}

/// The container's directory in the guest, from its ID.
pub fn rootfs_of(id: &str) -> Result<String, String> {
    if id.is_empty()
        || id.len() > 1024
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        || id.starts_with('.')
    {
        return Err(format!("container ID {id:?} is not valid"));
    }
    Ok(format!("{CONTAINERS}/{id}/rootfs"))
}

/// Mounts the container's root share at its place in the guest.
pub fn mount_rootfs(rootfs: &str, readonly: bool) -> Result<(), String> {
    std::fs::create_dir_all(rootfs).map_err(|e| format!("create {rootfs}: {e}"))?;
    let (source, target) = (cstring(ROOTFS_TAG, "tag")?, cstring(rootfs, "path")?);
    let flags = if readonly {
        MountFlags::RDONLY
    } else {
        MountFlags::empty()
    };
    rustix::mount::mount(&source, &target, c"virtiofs", flags, None).map_err(|e| {
        format!(
            "mount the container's root (virtio-fs {ROOTFS_TAG:?}) on {rootfs}: {}",
            std::io::Error::from(e)
        )
    })
}

/// Binds a pod container's root, `from` (a directory under a volume
/// share, `<VOLUMES_DIR>/<tag>/...`), at its place in the guest.
pub fn bind_rootfs(from: &str, rootfs: &str) -> Result<(), String> {
    let rest = from
        .strip_prefix(&format!("{VOLUMES_DIR}/"))
        .filter(|rest| !rest.split('/').any(|c| c == ".." || c == "."))
        .ok_or_else(|| format!("the container's root {from:?} is not under a volume share"))?;
    mount_volume(rest.split('/').next().unwrap_or_default())?;
    std::fs::create_dir_all(rootfs).map_err(|e| format!("create {rootfs}: {e}"))?;
    let (source, target) = (cstring(from, "path")?, cstring(rootfs, "path")?);
    rustix::mount::mount_bind(&source, &target).map_err(|e| {
        format!(
            "bind the container's root {from} on {rootfs}: {}",
            std::io::Error::from(e)
        )
    })
}

/// Mounts volume share `tag` at `<VOLUMES_DIR>/<tag>` once.
fn mount_volume(tag: &str) -> Result<(), String> {
    static MOUNTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    if !VOLUME_TAGS.contains(&tag) {
        return Err(format!("{tag:?} is not a volume share"));
    }
    let mut mounted = MOUNTED.lock().unwrap_or_else(|e| e.into_inner());
    if mounted.iter().any(|t| t == tag) {
        return Ok(());
    }
    let target = format!("{VOLUMES_DIR}/{tag}");
    std::fs::create_dir_all(&target).map_err(|e| format!("create {target}: {e}"))?;
    let (source, c_target) = (cstring(tag, "tag")?, cstring(&target, "path")?);
    rustix::mount::mount(&source, &c_target, c"virtiofs", MountFlags::empty(), None).map_err(
        |e| {
            format!(
                "mount volume share {tag:?} on {target}: {}",
                std::io::Error::from(e)
            )
        },
    )?;
    mounted.push(tag.to_owned());
    Ok(())
}

/// `destination` under `rootfs`, refusing `..` (the destination is the
/// spec's, and a mount must land inside the container's root).
fn under(rootfs: &str, destination: &Path) -> Result<String, String> {
    if !destination.is_absolute() {
        return Err(format!(
            "mount destination {} is not absolute",
            destination.display()
        ));
    }
    let mut path = rootfs.to_owned();
    for c in destination.components() {
        match c {
            Component::Normal(part) => {
                path.push('/');
                path.push_str(&part.to_string_lossy());
            }
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!(
                    "mount destination {} leaves the container's root",
                    destination.display()
                ));
            }
        }
    }
    Ok(path)
}

/// `MS_*` flags of a mount option; `None` for a file-system option.
fn mount_flag(option: &str) -> Option<(bool, MountFlags)> {
    Some(match option {
        "ro" => (true, MountFlags::RDONLY),
        "rw" => (false, MountFlags::RDONLY),
        "nosuid" => (true, MountFlags::NOSUID),
        "suid" => (false, MountFlags::NOSUID),
        "nodev" => (true, MountFlags::NODEV),
        "dev" => (false, MountFlags::NODEV),
        "noexec" => (true, MountFlags::NOEXEC),
        "exec" => (false, MountFlags::NOEXEC),
        "sync" => (true, MountFlags::SYNCHRONOUS),
        "async" => (false, MountFlags::SYNCHRONOUS),
        "dirsync" => (true, MountFlags::DIRSYNC),
        "noatime" => (true, MountFlags::NOATIME),
        "atime" => (false, MountFlags::NOATIME),
        "nodiratime" => (true, MountFlags::NODIRATIME),
        "diratime" => (false, MountFlags::NODIRATIME),
        "relatime" => (true, MountFlags::RELATIME),
        "norelatime" => (false, MountFlags::RELATIME),
        "strictatime" => (true, MountFlags::STRICTATIME),
        "bind" => (true, MountFlags::BIND),
        "rbind" => (true, MountFlags::BIND | MountFlags::REC),
        "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
        | "runbindable" => (true, MountFlags::empty()),
        _ => return None,
    })
}

fn mount_steps(spec: &Spec, rootfs: &str, maps: Option<&IdMaps>) -> Result<Vec<MountStep>, String> {
    let mut steps = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let destination = m.destination().display().to_string();
        let mut flags = MountFlags::empty();
        let mut data: Vec<String> = Vec::new();
        for option in m.options().iter().flatten() {
            match mount_flag(option) {
                Some((true, f)) => flags |= f,
                Some((false, f)) => flags.remove(f),
                None => data.push(option.clone()),
            }
        }
        let mut fstype = m.typ().clone().unwrap_or_default();
        let mut source = m
            .source()
            .as_ref()
            .map(|s| s.display().to_string())
            .unwrap_or_else(|| fstype.clone());
        match fstype.as_str() {
            // The guest has cgroup v2 only, as runc mounts on a unified
            // host.
            "cgroup" => fstype = "cgroup2".into(),
            // One container per guest: its terminals live in the guest's
            // devpts, so a terminal the agent opens is the container's
            // /dev/pts/N too.
            "devpts" => {
                fstype = "bind".into();
                source = "/dev/pts".into();
                flags = MountFlags::BIND;
                data.clear();
            }
            _ => {}
        }
        let bind = flags.contains(MountFlags::BIND) || fstype == "bind";
        let (fstype, remount_flags, file) = if bind {
            // A host path reaches the guest through a volume share, which
            // is mounted on first use; any other source must exist in the
            // guest.
            if let Some(rest) = source.strip_prefix(&format!("{VOLUMES_DIR}/")) {
                let tag = rest.split('/').next().unwrap_or_default();
                mount_volume(tag)?;
            }
            let meta = std::fs::metadata(&source).map_err(|e| {
                format!("mount {destination}: bind source {source} is not in the guest: {e}")
            })?;
            let remount = flags
                .contains(MountFlags::RDONLY)
                .then_some(flags.difference(MountFlags::REC));
            (String::new(), remount, !meta.is_dir())
        } else {
            if fstype == "tmpfs"
                && let Some(maps) = maps
            {
                owned_in(&mut data, maps, &destination)?;
            }
            (fstype, None, false)
        };
        steps.push(MountStep {
            source: cstring(&source, "mount source")?,
            target: cstring(&under(rootfs, m.destination())?, "mount destination")?,
            destination,
            fstype: cstring(&fstype, "mount type")?,
            flags: if bind {
                flags | MountFlags::BIND
            } else {
                flags
            },
            remount_flags,
            data: cstring(&data.join(","), "mount options")?,
            file,
        });
    }
    Ok(steps)
}

fn cap_mask(names: &[String]) -> Result<u64, String> {
    names.iter().try_fold(0u64, |mask, name| {
        capability(name)
            .map(|c| mask | (1 << c))
            .ok_or_else(|| format!("unknown capability {name}"))
    })
}

/// Resource number of an `RLIMIT_*` name.
fn rlimit(name: &str) -> Option<Resource> {
    Some(match name {
        "RLIMIT_CPU" => Resource::Cpu,
        "RLIMIT_FSIZE" => Resource::Fsize,
        "RLIMIT_DATA" => Resource::Data,
        "RLIMIT_STACK" => Resource::Stack,
        "RLIMIT_CORE" => Resource::Core,
        "RLIMIT_RSS" => Resource::Rss,
        "RLIMIT_NPROC" => Resource::Nproc,
        "RLIMIT_NOFILE" => Resource::Nofile,
        "RLIMIT_MEMLOCK" => Resource::Memlock,
        "RLIMIT_AS" => Resource::As,
        "RLIMIT_LOCKS" => Resource::Locks,
        "RLIMIT_SIGPENDING" => Resource::Sigpending,
        "RLIMIT_MSGQUEUE" => Resource::Msgqueue,
        "RLIMIT_NICE" => Resource::Nice,
        "RLIMIT_RTPRIO" => Resource::Rtprio,
        "RLIMIT_RTTIME" => Resource::Rttime,
        _ => return None,
    })
}

/// `linux.rootfsPropagation`'s value as mount flags (runc's names); any
/// other is refused, naming it.
fn propagation(name: &str) -> Result<MountPropagationFlags, String> {
    use MountPropagationFlags as F;
    let flags = match name {
        "shared" => F::SHARED,
        "slave" => F::DOWNSTREAM,
        "private" => F::PRIVATE,
        "unbindable" => F::UNBINDABLE,
        "rshared" => F::SHARED | F::REC,
        "rslave" => F::DOWNSTREAM | F::REC,
        "rprivate" => F::PRIVATE | F::REC,
        "runbindable" => F::UNBINDABLE | F::REC,
        _ => {
            return Err(format!(
                "linux.rootfsPropagation {name:?} is not one of shared, slave, private, unbindable (or their r-prefixed recursive forms)"
            ));
        }
    };
    Ok(flags)
}

/// The identity, limits and capabilities of `process`.
pub fn process_plan(process: &Process) -> Result<ProcPlan, String> {
    let rlimits = process
        .rlimits
        .iter()
        .map(|(name, &(soft, hard))| {
            rlimit(name)
                .map(|r| (r, soft, hard))
                .ok_or_else(|| format!("unknown rlimit {name}"))
        })
        .collect::<Result<_, _>>()?;
    let caps = match &process.capabilities {
        None => None,
        Some(c) => Some(CapPlan {
            bounding: cap_mask(&c.bounding)?,
            effective: cap_mask(&c.effective)?,
            permitted: cap_mask(&c.permitted)?,
            inheritable: cap_mask(&c.inheritable)?,
            ambient: cap_mask(&c.ambient)?,
        }),
    };
    let cwd = if process.cwd.is_empty() {
        "/"
    } else {
        &process.cwd
    };
    Ok(ProcPlan {
        cwd: cstring(cwd, "cwd")?,
        uid: process.uid,
        gid: process.gid,
        groups: process
            .additional_gids
            .iter()
            .map(|&gid| Gid::from_raw_unchecked(gid))
            .collect(),
        umask: process.umask,
        rlimits,
        caps,
        no_new_privileges: process.no_new_privileges,
        oom_score_adj: process
            .oom_score_adj
            .map(|adj| adj.to_string().into_bytes()),
    })
}

/// What the container's namespaces are: the `CLONE_NEW*` flags it gets
/// fresh (the PID one separately), refusing what the guest cannot do.
pub fn namespaces(spec: &Spec) -> Result<(UnshareFlags, bool), String> {
    let mut flags = UnshareFlags::empty();
    let mut pid = false;
    for ns in spec
        .linux()
        .iter()
        .flat_map(|l| l.namespaces().iter().flatten())
    {
        if let Some(path) = ns.path() {
            // The spec's own name for it ("mount", where Display says "mnt").
            let kind = serde_json::to_value(ns.typ())
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| ns.typ().to_string());
            return Err(format!(
                "joining the {kind} namespace at {} is not possible: the container has a VM of its own",
                path.display()
            ));
        }
        match ns.typ() {
            LinuxNamespaceType::Pid => pid = true,
            // Made last, by the child itself, with its maps written by the
            // agent (user_maps, setup.rs).
            LinuxNamespaceType::User => {}
            LinuxNamespaceType::Time => {}
            other => flags |= UnshareFlags::from_bits_retain(other as u32),
        }
    }
    Ok((flags, pid))
}

/// A user namespace's ID maps, as `/proc/<pid>/uid_map` and `gid_map`
/// take them, and who the container's root is outside it.
#[derive(Debug, Clone, PartialEq)]
pub struct IdMaps {
    /// `uid_map`'s text: one `inside outside count` line per mapping.
    pub uid_map: Vec<u8>,
    /// `gid_map`'s text.
    pub gid_map: Vec<u8>,
    uids: Vec<(u32, u32, u32)>,
    gids: Vec<(u32, u32, u32)>,
}

impl IdMaps {
    fn outside(map: &[(u32, u32, u32)], id: u32) -> Option<u32> {
        map.iter()
            .find(|&&(inside, _, size)| id >= inside && id - inside < size)
            .map(|&(inside, outside, _)| outside + (id - inside))
    }

    /// The guest's uid for `uid` inside the namespace.
    pub fn uid(&self, uid: u32) -> Option<u32> {
        Self::outside(&self.uids, uid)
    }

    /// The guest's gid for `gid` inside the namespace.
    pub fn gid(&self, gid: u32) -> Option<u32> {
        Self::outside(&self.gids, gid)
    }
}

/// The most mappings the kernel takes in one map (since Linux 4.15).
const MAX_MAPPINGS: usize = 340;

/// The container's user namespace, when its spec asks for one: its ID
/// maps, checked as runc checks them (a user namespace needs both maps,
/// maps need a user namespace), and every ID the process runs as mapped.
pub fn user_maps(spec: &Spec, process: &Process) -> Result<Option<IdMaps>, String> {
    let linux = spec.linux().as_ref();
    let user = linux
        .iter()
        .flat_map(|l| l.namespaces().iter().flatten())
        .any(|ns| ns.typ() == LinuxNamespaceType::User);
    let uid_mappings = linux.and_then(|l| l.uid_mappings().as_ref());
    let gid_mappings = linux.and_then(|l| l.gid_mappings().as_ref());
    let given =
        |m: Option<&Vec<oci_spec::runtime::LinuxIdMapping>>| m.is_some_and(|m| !m.is_empty());
    if !user {
        if given(uid_mappings) || given(gid_mappings) {
            return Err(
                "linux.uidMappings and linux.gidMappings need a user namespace in linux.namespaces"
                    .into(),
            );
        }
        return Ok(None);
    }
    let table = |field: &str, m: Option<&Vec<oci_spec::runtime::LinuxIdMapping>>| {
        let m = m.filter(|m| !m.is_empty()).ok_or_else(|| {
            format!("the user namespace needs linux.{field}: no mapping is given")
        })?;
        if m.len() > MAX_MAPPINGS {
            return Err(format!(
                "linux.{field} has {} mappings; the kernel takes at most {MAX_MAPPINGS}",
                m.len()
            ));
        }
        let mut out: Vec<(u32, u32, u32)> = Vec::new();
        for (i, e) in m.iter().enumerate() {
            let (inside, outside, size) = (e.container_id(), e.host_id(), e.size());
            if size == 0
                || inside.checked_add(size - 1).is_none()
                || outside.checked_add(size - 1).is_none()
            {
                return Err(format!(
                    "linux.{field}[{i}] (containerID {inside}, hostID {outside}, size {size}) is not a range of IDs"
                ));
            }
            let overlaps =
                |a: u32, b: u32, n: u32| a < b.saturating_add(n) && b < a.saturating_add(size);
            if let Some(j) = out
                .iter()
                .position(|&(ci, ho, n)| overlaps(inside, ci, n) || overlaps(outside, ho, n))
            {
                return Err(format!("linux.{field}[{i}] overlaps linux.{field}[{j}]"));
            }
            out.push((inside, outside, size));
        }
        Ok(out)
    };
    let uids = table("uidMappings", uid_mappings)?;
    let gids = table("gidMappings", gid_mappings)?;
    let text = |m: &[(u32, u32, u32)]| {
        m.iter()
            .map(|(i, o, n)| format!("{i} {o} {n}\n"))
            .collect::<String>()
            .into_bytes()
    };
    let maps = IdMaps {
        uid_map: text(&uids),
        gid_map: text(&gids),
        uids,
        gids,
    };
    if maps.uid(process.uid).is_none() {
        return Err(format!(
            "process.user.uid {} is not mapped by linux.uidMappings",
            process.uid
        ));
    }
    for gid in std::iter::once(process.gid).chain(process.additional_gids.iter().copied()) {
        if maps.gid(gid).is_none() {
            return Err(format!(
                "group {gid} of process.user is not mapped by linux.gidMappings"
            ));
        }
    }
    Ok(Some(maps))
}

/// A tmpfs mounted for a container with a user namespace is mounted before
/// the namespace exists: its `uid=` and `gid=` options are the
/// namespace's IDs, so they are given as the guest's, and where absent the
/// container's root owns it (as a tmpfs the namespace's root mounted).
fn owned_in(data: &mut Vec<String>, maps: &IdMaps, destination: &str) -> Result<(), String> {
    let mut uid = false;
    let mut gid = false;
    for option in data.iter_mut() {
        let Some((key, value)) = option.split_once('=') else {
            continue;
        };
        let mapped = match key {
            "uid" => {
                uid = true;
                value.parse().ok().and_then(|v| maps.uid(v))
            }
            "gid" => {
                gid = true;
                value.parse().ok().and_then(|v| maps.gid(v))
            }
            _ => continue,
        };
        let mapped = mapped.ok_or_else(|| {
            format!("mount {destination}: option {option} is not an ID the user namespace maps")
        })?;
        *option = format!("{key}={mapped}");
    }
    if !uid && let Some(root) = maps.uid(0) {
        data.push(format!("uid={root}"));
    }
    if !gid && let Some(root) = maps.gid(0) {
        data.push(format!("gid={root}"));
    }
    Ok(())
}

/// The plan that starts the container's own process; `joined`: the
/// namespaces it takes from its pod's sandbox (its spec's hostname is
/// then the sandbox's, and not set again).
pub fn create_plan(
    spec: &Spec,
    rootfs: &str,
    process: &Process,
    joined: &[String],
) -> Result<Plan, String> {
    let (unshare, _) = namespaces(spec)?;
    let maps = user_maps(spec, process)?;
    let mounts = mount_steps(spec, rootfs, maps.as_ref())?;
    let default_dev = mounts
        .iter()
        .any(|m| m.destination.trim_end_matches('/') == "/dev" && m.fstype.to_bytes() == b"tmpfs");
    let linux = spec.linux().as_ref();
    let mut devices = Vec::new();
    for d in linux.iter().flat_map(|l| l.devices().iter().flatten()) {
        let kind = match d.typ() {
            LinuxDeviceType::B => FileType::BlockDevice,
            LinuxDeviceType::C | LinuxDeviceType::U => FileType::CharacterDevice,
            LinuxDeviceType::P => FileType::Fifo,
            LinuxDeviceType::A => continue,
        };
        let mode = kind.as_raw_mode() | d.file_mode().unwrap_or(0o666);
        let path = under(rootfs, d.path())?;
        // Made before the fork: the child allocates nothing.
        let mut parents = Vec::new();
        let mut at = Path::new(&path).parent();
        while let Some(dir) = at.filter(|dir| dir.starts_with(rootfs) && *dir != Path::new(rootfs))
        {
            parents.push(cstring(&dir.to_string_lossy(), "device directory")?);
            at = dir.parent();
        }
        parents.reverse();
        devices.push(DeviceNode {
            path: cstring(&path, "device path")?,
            parents,
            file_type: FileType::from_raw_mode(mode),
            mode: Mode::from_raw_mode(mode),
            dev: rustix::fs::makedev(d.major() as u32, d.minor() as u32),
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
        });
    }
    let uts = unshare.contains(UnshareFlags::NEWUTS);
    let uts_joined = joined.iter().any(|n| n == "uts");
    let hostname = match spec.hostname() {
        Some(_) if uts_joined => None,
        Some(h) if uts => Some(cstring(h, "hostname")?),
        Some(_) => return Err("the spec sets a hostname without a UTS namespace".into()),
        None => None,
    };
    let domainname = match spec.domainname() {
        Some(d) if uts && !uts_joined => Some(cstring(d, "domainname")?),
        _ => None,
    };
    let mut sysctls = Vec::new();
    for (key, value) in linux.iter().flat_map(|l| l.sysctl().iter().flatten()) {
        if key.contains("..") || key.contains('/') {
            return Err(format!("sysctl {key:?} is not a sysctl name"));
        }
        sysctls.push((
            cstring(&format!("/proc/sys/{}", key.replace('.', "/")), "sysctl")?,
            value.as_bytes().to_vec(),
        ));
    }
    let paths = |list: Option<&Vec<String>>| -> Result<Vec<CString>, String> {
        list.into_iter()
            .flatten()
            .map(|p| cstring(p, "path"))
            .collect()
    };
    Ok(Plan {
        join: Vec::new(),
        cgroup: None,
        unshare: unshare.difference(UnshareFlags::NEWPID),
        rootfs: Some(cstring(rootfs, "root")?),
        mounts,
        default_dev,
        devices,
        hostname,
        domainname,
        sysctls,
        masked: paths(linux.and_then(|l| l.masked_paths().as_ref()))?,
        readonly_paths: paths(linux.and_then(|l| l.readonly_paths().as_ref()))?,
        root_readonly: spec.root().as_ref().and_then(|r| r.readonly()) == Some(true),
        rootfs_propagation: match linux.and_then(|l| l.rootfs_propagation().as_deref()) {
            None | Some("") => None,
            Some(p) => Some(propagation(p)?),
        },
        terminal: process.terminal,
        userns: maps.map(|m| crate::setup::UserNs {
            uid_map: m.uid_map,
            gid_map: m.gid_map,
            sock: None,
        }),
        process: Some(process_plan(process)?),
        seccomp: match linux.and_then(|l| l.seccomp().as_ref()) {
            Some(profile) => Some(Arc::new(
                seccomp::compile(profile).map_err(|e| format!("linux.seccomp: {e}"))?,
            )),
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_stay_under_the_root() {
        assert_eq!(under("/r", Path::new("/proc")).unwrap(), "/r/proc");
        assert_eq!(under("/r", Path::new("/dev/./pts/")).unwrap(), "/r/dev/pts");
        assert!(
            under("/r", Path::new("/../etc"))
                .unwrap_err()
                .contains("leaves")
        );
        assert!(
            under("/r", Path::new("dev"))
                .unwrap_err()
                .contains("not absolute")
        );
    }

    #[test]
    fn a_device_deep_in_dev_has_its_directories_made_first() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "linux": {"devices": [
                {"path": "/dev/cpu/0/cpuid", "type": "c", "major": 203, "minor": 0},
                {"path": "/dev/null", "type": "c", "major": 1, "minor": 3}
            ]}
        }))
        .unwrap();
        let plan = create_plan(&spec, "/r", &Process::default(), &[]).unwrap();
        let parents: Vec<Vec<String>> = plan
            .devices
            .iter()
            .map(|d| {
                d.parents
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect()
            })
            .collect();
        assert_eq!(
            parents,
            [vec!["/r/dev", "/r/dev/cpu", "/r/dev/cpu/0"], vec!["/r/dev"]]
        );
    }

    /// Issue 19, item 7: a namespace by path is refused by name in a VM of
    /// its own; runc's propagation names are taken and any other refused.
    #[test]
    fn namespace_paths_and_unknown_propagations_are_refused_by_name() {
        for kind in ["ipc", "uts", "pid", "mount", "cgroup", "user"] {
            let spec: Spec = serde_json::from_value(serde_json::json!({
                "ociVersion": "1.2.0",
                "linux": {"namespaces": [{"type": kind, "path": "/proc/1/ns/x"}]}
            }))
            .unwrap();
            let err = namespaces(&spec).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "joining the {kind} namespace at /proc/1/ns/x is not possible: the container has a VM of its own"
                )
            );
        }
        use MountPropagationFlags as F;
        assert_eq!(propagation("rslave").unwrap(), F::DOWNSTREAM | F::REC);
        assert_eq!(propagation("unbindable").unwrap(), F::UNBINDABLE);
        let err = propagation("rsideways").unwrap_err();
        assert!(
            err.starts_with("linux.rootfsPropagation \"rsideways\" is not one of"),
            "{err}"
        );
    }

    /// Issue 19, item 2: a user namespace's maps are checked as runc
    /// checks them, and refused by name.
    #[test]
    fn user_namespace_maps_are_checked_and_refused_by_name() {
        let spec = |ns: bool, maps: serde_json::Value| -> Spec {
            let mut linux = serde_json::json!({"namespaces": [{"type": "mount"}]});
            if ns {
                linux["namespaces"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::json!({"type": "user"}));
            }
            for (k, v) in maps.as_object().unwrap() {
                linux[k] = v.clone();
            }
            serde_json::from_value(serde_json::json!({"ociVersion": "1.2.0", "linux": linux}))
                .unwrap()
        };
        let range =
            |c: u32, h: u32, n: u32| serde_json::json!({"containerID": c, "hostID": h, "size": n});
        let both = serde_json::json!({
            "uidMappings": [range(0, 100000, 65536)],
            "gidMappings": [range(0, 100000, 1000), range(1000, 2000, 1)]
        });
        let root = Process::default();
        let maps = user_maps(&spec(true, both.clone()), &root)
            .unwrap()
            .unwrap();
        assert_eq!(maps.uid_map, b"0 100000 65536\n");
        assert_eq!(maps.gid_map, b"0 100000 1000\n1000 2000 1\n");
        assert_eq!(
            (maps.uid(0), maps.uid(65535), maps.uid(65536)),
            (Some(100000), Some(165535), None)
        );
        assert_eq!(
            (maps.gid(999), maps.gid(1000), maps.gid(1001)),
            (Some(100999), Some(2000), None)
        );
        // No user namespace, no maps: nothing to do.
        assert_eq!(
            user_maps(&spec(false, serde_json::json!({})), &root).unwrap(),
            None
        );
        let refused = |ns: bool, maps: serde_json::Value, process: &Process| {
            user_maps(&spec(ns, maps), process).unwrap_err()
        };
        assert_eq!(
            refused(false, both.clone(), &root),
            "linux.uidMappings and linux.gidMappings need a user namespace in linux.namespaces"
        );
        assert_eq!(
            refused(
                true,
                serde_json::json!({"uidMappings": [range(0, 1, 1)]}),
                &root
            ),
            "the user namespace needs linux.gidMappings: no mapping is given"
        );
        assert_eq!(
            refused(true, serde_json::json!({}), &root),
            "the user namespace needs linux.uidMappings: no mapping is given"
        );
        assert_eq!(
            refused(
                true,
                serde_json::json!({"uidMappings": [range(0, 1, 0)], "gidMappings": [range(0, 1, 1)]}),
                &root
            ),
            "linux.uidMappings[0] (containerID 0, hostID 1, size 0) is not a range of IDs"
        );
        assert_eq!(
            refused(
                true,
                serde_json::json!({"uidMappings": [range(0, 1, 1)], "gidMappings": [range(4294967295, 1, 2)]}),
                &root
            ),
            "linux.gidMappings[0] (containerID 4294967295, hostID 1, size 2) is not a range of IDs"
        );
        assert_eq!(
            refused(
                true,
                serde_json::json!({"uidMappings": [range(0, 100, 10), range(10, 105, 10)], "gidMappings": [range(0, 1, 1)]}),
                &root
            ),
            "linux.uidMappings[1] overlaps linux.uidMappings[0]"
        );
        let many: Vec<_> = (0..341).map(|i| range(i, 1000 + i, 1)).collect();
        assert_eq!(
            refused(
                true,
                serde_json::json!({"uidMappings": many, "gidMappings": [range(0, 1, 1)]}),
                &root
            ),
            "linux.uidMappings has 341 mappings; the kernel takes at most 340"
        );
        let user = Process {
            uid: 70000,
            ..Default::default()
        };
        assert_eq!(
            refused(true, both.clone(), &user),
            "process.user.uid 70000 is not mapped by linux.uidMappings"
        );
        let grouped = Process {
            additional_gids: vec![1001],
            ..Default::default()
        };
        assert_eq!(
            refused(true, both.clone(), &grouped),
            "group 1001 of process.user is not mapped by linux.gidMappings"
        );
        // A tmpfs mounted for the namespace: its owner options are the
        // guest's IDs, and its root is the container root's by default.
        let mut data = vec!["mode=755".to_string(), "gid=5".to_string()];
        owned_in(&mut data, &maps, "/dev").unwrap();
        assert_eq!(data, ["mode=755", "gid=100005", "uid=100000"]);
        let mut data = vec!["uid=70000".to_string()];
        assert_eq!(
            owned_in(&mut data, &maps, "/run").unwrap_err(),
            "mount /run: option uid=70000 is not an ID the user namespace maps"
        );
    }

    #[test]
    fn ids_are_checked() {
        assert_eq!(rootfs_of("c1").unwrap(), "/run/husk/c1/rootfs");
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(rootfs_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn capabilities_are_numbered_as_the_kernel_does() {
        assert_eq!(capability("CAP_CHOWN"), Some(0));
        assert_eq!(capability("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(capability("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(capability("CHOWN"), None);
        assert!(
            cap_mask(&["CAP_NOPE".into()])
                .unwrap_err()
                .contains("CAP_NOPE")
        );
    }
}
