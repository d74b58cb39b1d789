//! Docker-style commands over the OCI runtime: `husk run IMAGE`, `ps`,
//! `stop`, `rm`, `logs`, `inspect` (docs/images.md).
//!
//! A container made from an image lives in `<root>/docker/<name>/`, which
//! is also its OCI bundle:
//!
//! ```text
//! config.json      the spec, made from the image's config and the flags
//! rootfs/          overlayfs: the image's layers (read-only, shared with
//!                  every container of the image) under upper/
//! upper/ work/     the container's writable layer: gone with the container
//! container.json   what `ps` and `inspect` show
//! log              stdout and stderr of a detached container
//! ```
//!
//! Its runtime ID is its name, so the runc-style commands (`exec`, `kill`,
//! `state`, `pause`) work on it by name. There is no daemon: a foreground
//! `run` records the exit status itself; `run -d --rm` leaves a small
//! process (`husk _autoremove`) that removes the container when it stops.

#![deny(missing_docs)]

pub mod busybox;
pub mod cni;
mod error;
pub mod network;

pub use error::{BusyboxError, DockerError};

use std::collections::HashSet;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Spec};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::mount::{MountFlags, UnmountFlags};
use serde::{Deserialize, Serialize};

use husk_image::reference::Reference;
use husk_image::registry::Client;
use husk_image::store::{Image, Store};
use husk_runtime::container::{self, CreateOptions};
use husk_runtime::state::{self, ContainerState, Status};
use husk_sys::PathError;

/// The docker layer's results.
type Result<T, E = DockerError> = std::result::Result<T, E>;

/// What `husk run IMAGE` was asked for.
#[derive(Default)]
pub struct RunOptions {
    /// The image.
    pub image: String,
    /// CMD (or the entrypoint's arguments).
    pub command: Vec<String>,
    /// `-d`.
    pub detach: bool,
    /// `-i`: keep stdin (else /dev/null).
    pub interactive: bool,
    /// `-t`.
    pub tty: bool,
    /// `--rm`.
    pub rm: bool,
    /// `--name`.
    pub name: Option<String>,
    /// `-e K=V`.
    pub env: Vec<String>,
    /// `-v HOST:CTR[:ro]`.
    pub volumes: Vec<String>,
    /// `-w`.
    pub workdir: Option<String>,
    /// `--user`.
    pub user: Option<String>,
    /// `--entrypoint`.
    pub entrypoint: Option<String>,
    /// `--memory` (bytes, or with k/m/g).
    pub memory: Option<String>,
    /// `--cpus`.
    pub cpus: Option<f64>,
    /// `--network`: a husk network's name, or `none` (default: the
    /// `bridge` network, made on first use).
    pub network: Option<String>,
    /// `-p [IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]`.
    pub publish: Vec<String>,
    /// `-P`: the image's exposed ports, each on a host port the kernel
    /// picks.
    pub publish_all: bool,
    /// `--hostname` (default: the first 12 digits of its ID).
    pub hostname: Option<String>,
    /// `--add-host HOST:IP`.
    pub add_hosts: Vec<String>,
    /// `--dns IP`.
    pub dns: Vec<String>,
}

/// What `ps` and `inspect` show of a container made from an image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// 64 hex digits.
    pub id: String,
    /// Its name (and runtime ID).
    pub name: String,
    /// The image as given.
    pub image: String,
    /// The image's ID (config digest).
    pub image_id: String,
    /// The diff IDs of its layers: GC keeps them while it exists.
    pub layers: Vec<String>,
    /// The process's args.
    pub command: Vec<String>,
    /// RFC 3339.
    pub created: String,
    /// Its exit status, once a foreground run recorded it.
    pub exit_status: Option<i32>,
    /// `--rm`.
    pub auto_remove: bool,
    /// Mounts from `-v`.
    pub volumes: Vec<String>,
}

fn dir(root: &Path, name: &str) -> PathBuf {
    root.join("docker").join(name)
}

impl Record {
    fn load(root: &Path, name: &str) -> Result<Self> {
        let path = dir(root, name).join("container.json");
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DockerError::NoSuchContainer(name.to_owned()),
            _ => PathError::at("read", &path)(e).into(),
        })?;
        serde_json::from_slice(&bytes).map_err(|source| DockerError::Corrupt { path, source })
    }

    fn save(&self, root: &Path) -> Result<()> {
        let path = dir(root, &self.name).join("container.json");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(PathError::at("write", &path))?;
        Ok(())
    }

    /// Every container made from an image, oldest first.
    pub fn all(root: &Path) -> Vec<Record> {
        let mut all: Vec<Record> = std::fs::read_dir(root.join("docker"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Record::load(root, &e.file_name().to_string_lossy()).ok())
            .collect();
        all.sort_by(|a, b| a.created.cmp(&b.created));
        all
    }
}

/// Random hex digits from the kernel.
fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Finds an image in the store; the built-in busybox is made on first use,
/// anything else is pulled (as docker does).
pub fn image(root: &Path, what: &str) -> Result<(Store, Image)> {
    let store = Store::open(root)?;
    if let Ok(image) = store.find(what) {
        return Ok((store, image));
    }
    let reference = Reference::parse(what)?;
    if reference.to_string() == crate::busybox::IMAGE_NAME {
        let tar = store
            .dir()
            .join("ingest")
            .join(format!("busybox-{}.tar", std::process::id()));
        let made = crate::busybox::write_oci_archive(&tar).map_err(DockerError::from);
        let loaded = made.and_then(|_| Ok(husk_image::archive::load(&store, &tar)?));
        let _ = std::fs::remove_file(&tar);
        loaded?;
    } else {
        eprintln!("Unable to find image '{reference}' locally");
        Client::new(&reference.registry).pull(&store, &reference)?;
    }
    let image = store.find(what)?;
    Ok((store, image))
}

/// Bytes in `256m`, `1g`, `1048576`.
pub fn parse_bytes(s: &str) -> Result<i64> {
    let lower = s.to_ascii_lowercase();
    let lower = lower.strip_suffix('b').unwrap_or(&lower);
    let (digits, unit) = match lower.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => lower.split_at(i),
        None => (lower, ""),
    };
    let bad = |source| DockerError::BadSize {
        value: s.to_owned(),
        source,
    };
    let n: i64 = digits.parse().map_err(|e| bad(Some(e)))?;
    let scale = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(bad(None)),
    };
    Ok(n * scale)
}

/// Opens a file of the container's root filesystem without leaving it
/// (the image's symlinks resolve inside it, never to the host's files).
fn read_in_root(rootfs: &Path, path: &str) -> Option<String> {
    let root = std::fs::File::open(rootfs).ok()?;
    let fd = rustix::fs::openat2(
        &root,
        path.trim_start_matches('/'),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .ok()?;
    let file = std::fs::File::from(fd);
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text).ok()?;
    Some(text)
}

/// uid, gid and additional gids of `user` (`name`, `uid`, `name:group`,
/// `uid:gid`) in the container's /etc/passwd and /etc/group.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32, Vec<u32>)> {
    let passwd = read_in_root(rootfs, "etc/passwd").unwrap_or_default();
    let group = read_in_root(rootfs, "etc/group").unwrap_or_default();
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && (f[0] == u || f[2] == u));
    let number = |s: &str| s.parse::<u32>().map_err(DockerError::BadUserEntry);
    let (uid, name, mut gid) = match (u.parse::<u32>(), &entry) {
        (_, Some(f)) => (number(f[2])?, f[0].to_owned(), number(f[3])?),
        (Ok(uid), None) => (uid, String::new(), 0),
        (Err(_), None) => return Err(DockerError::NoSuchUser(u.to_owned())),
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .map(|f| number(f[2]))
                .transpose()?
                .ok_or_else(|| DockerError::NoSuchGroup(g.to_owned()))?,
        };
    }
    let additional = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4 && !name.is_empty() && f[3].split(',').any(|m| m == name))
        .filter_map(|f| f[2].parse().ok())
        .filter(|&g| g != gid)
        .collect();
    Ok((uid, gid, additional))
}

/// Mounts the container's root: the image's layers under its writable
/// layer.
fn mount_rootfs(dir: &Path, store: &Store, image: &Image) -> Result<()> {
    let mut lower = Vec::new();
    for layer in image.layers.iter().rev() {
        lower.push(store.layer_path(&layer.diff_id)?.display().to_string());
    }
    if lower.is_empty() {
        // An image of no layers: an empty read-only lower layer.
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).map_err(PathError::at("create", &empty))?;
        lower.push(empty.display().to_string());
    }
    for sub in ["rootfs", "upper", "work"] {
        let path = dir.join(sub);
        std::fs::create_dir_all(&path).map_err(PathError::at("create", &path))?;
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        dir.join("upper").display(),
        dir.join("work").display()
    );
    let target = CString::new(dir.join("rootfs").as_os_str().as_encoded_bytes())?;
    let data = CString::new(options)?;
    let mounted = rustix::mount::mount(
        c"overlay",
        target.as_c_str(),
        c"overlay",
        // The guest sees modes over virtio-fs; on the host nothing in an
        // image is a device or raises privileges.
        MountFlags::NOSUID | MountFlags::NODEV,
        data.as_c_str(),
    );
    mounted.map_err(|e| DockerError::Mount {
        layers: image.layers.len(),
        source: e.into(),
    })
}

fn unmount_rootfs(dir: &Path) {
    let _ = rustix::mount::unmount(dir.join("rootfs"), UnmountFlags::DETACH);
}

/// docker's default capabilities for a container's processes (moby's
/// `oci/caps` defaults), which `husk run` and `husk build`'s `RUN` steps
/// get, as `docker run` and `docker build` give them; runc's own default
/// spec has only three.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// [`DEFAULT_CAPABILITIES`] as a process's bounding, effective and
/// permitted sets (none inheritable or ambient, as docker has it).
pub fn default_capabilities() -> oci_spec::runtime::LinuxCapabilities {
    // Named as a spec names them (serde's names, `CAP_` and all).
    let set: oci_spec::runtime::Capabilities =
        serde_json::from_value(serde_json::json!(DEFAULT_CAPABILITIES))
            .expect("docker's capabilities are the spec's");
    let mut caps = oci_spec::runtime::LinuxCapabilities::default();
    caps.set_bounding(Some(set.clone()));
    caps.set_effective(Some(set.clone()));
    caps.set_permitted(Some(set));
    caps.set_inheritable(None);
    caps.set_ambient(None);
    caps
}

#[cfg(test)]
mod capability_tests {
    /// Every name in docker's set is a capability the spec knows.
    #[test]
    fn dockers_default_capabilities_are_the_specs() {
        let caps = super::default_capabilities();
        assert_eq!(caps.bounding().as_ref().unwrap().len(), 14);
        assert_eq!(caps.effective(), caps.permitted());
    }
}

/// The spec of a container of `image` as `o` asks.
fn spec(
    root: &Path,
    o: &RunOptions,
    config: &oci_spec::image::ImageConfiguration,
    rootfs: &Path,
    id: &str,
) -> Result<Spec> {
    let image = config.config().clone().unwrap_or_default();
    let mut args: Vec<String> = match &o.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => image.entrypoint().clone().unwrap_or_default(),
    };
    if !o.command.is_empty() {
        args.extend(o.command.iter().cloned());
    } else if o.entrypoint.is_none() {
        args.extend(image.cmd().clone().unwrap_or_default());
    }
    if args.is_empty() {
        return Err(DockerError::NoCommand {
            image: o.image.clone(),
        });
    }
    let mut env: Vec<String> = image.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    let hostname = o.hostname.clone().unwrap_or_else(|| id[..12].to_owned());
    env.push(format!("HOSTNAME={hostname}"));
    if o.tty && !o.detach {
        env.push("TERM=xterm".into());
    }
    for e in &o.env {
        let key = e.split('=').next().unwrap_or(e);
        let value = if e.contains('=') {
            e.clone()
        } else {
            // `-e KEY` passes the caller's value, as docker does.
            match std::env::var(key) {
                Ok(v) => format!("{key}={v}"),
                Err(_) => continue,
            }
        };
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(value);
    }
    let cwd = o
        .workdir
        .clone()
        .or_else(|| image.working_dir().clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(DockerError::RelativeWorkdir(cwd));
    }
    let user = o
        .user
        .clone()
        .or_else(|| image.user().clone().filter(|u| !u.is_empty()));
    let mut spec: Spec = serde_json::from_str(&husk_runtime::bundle::default_spec())?;
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(args));
    process.set_env(Some(env));
    process.set_cwd(cwd.into());
    process.set_terminal(Some(o.tty && !o.detach));
    if let Some(user) = user {
        let (uid, gid, additional) = resolve_user(rootfs, &user)?;
        let mut u = process.user().clone();
        u.set_uid(uid);
        u.set_gid(gid);
        u.set_additional_gids((!additional.is_empty()).then_some(additional));
        process.set_user(u);
    }
    process.set_capabilities(Some(default_capabilities()));
    spec.set_process(Some(process));
    spec.set_hostname(Some(hostname));
    if let Some(r) = spec.root().clone() {
        let mut r = r;
        r.set_readonly(Some(false));
        spec.set_root(Some(r));
    }
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for v in &o.volumes {
        mounts.push(volume(root, v)?);
    }
    spec.set_mounts(Some(mounts));
    if o.memory.is_some() || o.cpus.is_some() {
        let mut linux = spec.linux().clone().unwrap_or_default();
        let mut resources = linux.resources().clone().unwrap_or_default();
        if let Some(m) = &o.memory {
            let mut memory = oci_spec::runtime::LinuxMemory::default();
            let limit = parse_bytes(m).map_err(|e| DockerError::BadFlag {
                flag: "--memory",
                source: Box::new(e),
            })?;
            memory.set_limit(Some(limit));
            resources.set_memory(Some(memory));
        }
        if let Some(cpus) = o.cpus {
            if cpus.is_nan() || cpus <= 0.0 {
                return Err(DockerError::BadCpus(cpus));
            }
            let mut cpu = oci_spec::runtime::LinuxCpu::default();
            cpu.set_period(Some(100_000));
            cpu.set_quota(Some((cpus * 100_000.0) as i64));
            resources.set_cpu(Some(cpu));
        }
        linux.set_resources(Some(resources));
        spec.set_linux(Some(linux));
    }
    Ok(spec)
}

/// A bind mount from `-v HOST:CTR[:ro]`; a HOST that is a name, not a
/// path, is a named volume under `<root>/volumes` (made on first use).
fn volume(root: &Path, v: &str) -> Result<Mount> {
    let bad = |why: String| DockerError::BadVolume {
        spec: v.to_owned(),
        why,
    };
    let parts: Vec<&str> = v.split(':').collect();
    let (host, ctr, mode) = match parts.as_slice() {
        [h, c] => (*h, *c, "rw"),
        [h, c, m] if *m == "ro" || *m == "rw" => (*h, *c, *m),
        _ => return Err(bad("expected HOST:CONTAINER[:ro]".into())),
    };
    if !ctr.starts_with('/') {
        return Err(bad(format!("the container path {ctr:?} is not absolute")));
    }
    let source = if host.starts_with('/') {
        let p = PathBuf::from(host);
        if !p.exists() {
            std::fs::create_dir_all(&p).map_err(|e| DockerError::VolumeHost {
                spec: v.to_owned(),
                source: PathError::at("create", &p)(e),
            })?;
        }
        p
    } else {
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(bad(format!(
                "{host:?} is neither an absolute path nor a volume name"
            )));
        }
        let p = root.join("volumes").join(host);
        std::fs::create_dir_all(&p).map_err(|source| DockerError::CreateVolume {
            name: host.to_owned(),
            source,
        })?;
        p
    };
    let mut m = Mount::default();
    m.set_destination(ctr.into());
    m.set_source(Some(source));
    m.set_typ(Some("bind".into()));
    m.set_options(Some(vec!["rbind".into(), mode.into()]));
    Ok(m)
}

/// Saves descriptors 0-2 and puts others in their place until dropped.
struct Stdio([OwnedFd; 3]);

impl Stdio {
    fn replace(with: [BorrowedFd<'_>; 3]) -> std::io::Result<Self> {
        let mut saved = Vec::new();
        for (fd, file) in with.into_iter().enumerate() {
            saved.push(rustix::io::fcntl_dupfd_cloexec(standard(fd), 3)?);
            let _ = put_at(fd, file);
        }
        let saved: [OwnedFd; 3] = saved.try_into().expect("three");
        Ok(Self(saved))
    }
}

impl Drop for Stdio {
    fn drop(&mut self) {
        for (fd, saved) in self.0.iter().enumerate() {
            let _ = put_at(fd, saved.as_fd());
        }
    }
}

/// Standard descriptor `fd` (0, 1 or 2).
fn standard(fd: usize) -> BorrowedFd<'static> {
    match fd {
        0 => rustix::stdio::stdin(),
        1 => rustix::stdio::stdout(),
        _ => rustix::stdio::stderr(),
    }
}

/// Makes standard descriptor `fd` (0, 1 or 2) a copy of `file`, unless
/// it is `file`.
fn put_at(fd: usize, file: BorrowedFd<'_>) -> rustix::io::Result<()> {
    match fd {
        0 => rustix::stdio::dup2_stdin(file),
        1 => rustix::stdio::dup2_stdout(file),
        _ => rustix::stdio::dup2_stderr(file),
    }
}

/// `husk run IMAGE`: returns the container's exit status (0 when
/// detached, after printing its ID).
pub fn run(root: &Path, o: &RunOptions) -> Result<i32> {
    let (store, image) = image(root, &o.image)?;
    let config = husk_image::config(&store, &image)?;
    let id = random_hex(32);
    let name = o.name.clone().unwrap_or_else(|| id[..12].to_owned());
    container::check_id(&name)?;
    // Every flag is checked before anything is made.
    let (net, ports, names) = plan_network(root, o, &config, &id)?;
    let dir = dir(root, &name);
    let containers = root.join("docker");
    std::fs::create_dir_all(&containers).map_err(PathError::at("create", &containers))?;
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(DockerError::NameInUse(name));
        }
        Err(e) => return Err(PathError::at("create", &dir)(e).into()),
    }
    // Held while the container's layers are not yet recorded, so that a
    // GC meanwhile keeps them.
    let adding = store.adding()?;
    let made = (|| -> Result<Record> {
        mount_rootfs(&dir, &store, &image)?;
        let mut spec = spec(root, o, &config, &dir.join("rootfs"), &id)?;
        if let Some(n) = &net {
            let mut aliases = vec![name.clone()];
            aliases.push(names.hostname.clone());
            aliases.dedup();
            let a = network::attach(root, &name, &id, n, ports, aliases)?;
            set_netns(&mut spec, &a.netns);
        }
        if net.is_none() {
            // --network none: no network namespace in the spec, which
            // husk gives loopback only (no network device in the VM).
            drop_netns(&mut spec);
        }
        network::write_names(root, &name, &dir.join("rootfs"), &names)?;
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)
            .map_err(PathError::at("write", &path))?;
        let record = Record {
            id: id.clone(),
            name: name.clone(),
            image: o.image.clone(),
            image_id: image.config.clone(),
            layers: image.layers.iter().map(|l| l.diff_id.clone()).collect(),
            command: spec
                .process()
                .as_ref()
                .and_then(|p| p.args().clone())
                .unwrap_or_default(),
            created: state::now_rfc3339(),
            exit_status: None,
            auto_remove: o.rm,
            volumes: o.volumes.clone(),
        };
        record.save(root)?;
        Ok(record)
    })();
    drop(adding);
    let mut record = match made {
        Ok(r) => r,
        Err(e) => {
            remove_dir(root, &name);
            return Err(e);
        }
    };
    let null = dev_null()?;
    let options = CreateOptions {
        root,
        id: &name,
        bundle: &dir,
        pid_file: None,
        console_socket: None,
        detach: o.detach,
        restore: None,
        stdio: None,
        pod: None,
    };
    if o.detach {
        let log = open_log(&dir)?;
        let started = {
            let _stdio = Stdio::replace([null.as_fd(), log.as_fd(), log.as_fd()])
                .map_err(DockerError::Stdio)?;
            husk_runtime::run::run(&options)
        };
        if let Err(e) = started {
            remove(root, &name, true)?;
            return Err(e.into());
        }
        if o.rm {
            autoremove_later(root, &name)?;
        }
        println!("{id}");
        return Ok(0);
    }
    let status = {
        let _stdio = if o.interactive {
            None
        } else {
            Some(
                Stdio::replace([
                    null.as_fd(),
                    rustix::stdio::stdout(),
                    rustix::stdio::stderr(),
                ])
                .map_err(DockerError::Stdio)?,
            )
        };
        husk_runtime::run::run(&options)
    };
    match status {
        Ok(status) => {
            if o.rm {
                remove(root, &name, true)?;
            } else {
                record.exit_status = Some(status);
                record.save(root)?;
            }
            Ok(status)
        }
        Err(e) => {
            if o.rm {
                let _ = remove(root, &name, true);
            } else {
                record.exit_status = Some(125);
                let _ = record.save(root);
            }
            Err(e.into())
        }
    }
}

/// The writable layer of container `name`, if it was made from an image
/// (what `checkpoint` copies).
pub fn upper_dir(root: &Path, name: &str) -> Option<PathBuf> {
    let dir = dir(root, name);
    dir.join("container.json")
        .exists()
        .then(|| dir.join("upper"))
}

/// Where docker's checkpoint `checkpoint` of container `name` is: under
/// `dir` if given, else the container's own `checkpoints/` (removed with
/// it). The container must be one made from an image, and the name a
/// plain one.
pub fn checkpoint_path(
    root: &Path,
    name: &str,
    checkpoint: &str,
    dir: Option<&Path>,
) -> Result<PathBuf> {
    Record::load(root, name)?;
    let mut chars = checkpoint.chars();
    let plain = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !plain {
        return Err(DockerError::BadCheckpointName(checkpoint.to_owned()));
    }
    Ok(match dir {
        Some(dir) => dir.join(checkpoint),
        None => self::dir(root, name).join("checkpoints").join(checkpoint),
    })
}

/// The names of container `name`'s checkpoints (docker's `checkpoint
/// ls`), sorted.
pub fn checkpoints(root: &Path, name: &str, dir: Option<&Path>) -> Result<Vec<String>> {
    Record::load(root, name)?;
    let dir = match dir {
        Some(dir) => dir.to_owned(),
        None => self::dir(root, name).join("checkpoints"),
    };
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join(husk_runtime::checkpoint::MANIFEST).exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// `husk restore` of a container made from an image, as docker's `start
/// --checkpoint`: the container (stopped) is restored from `checkpoint`
/// with the writable layer saved there in place of its own, and runs
/// on; detached, its output goes to its log again. Returns its exit
/// status (0 when detached).
pub fn restore(root: &Path, name: &str, checkpoint: &Path, options: &CreateOptions) -> Result<i32> {
    let record = Record::load(root, name)?;
    let (at, manifest) = husk_runtime::checkpoint::open(checkpoint, name)?;
    if !manifest.upper {
        return Err(DockerError::NoWritableLayer {
            checkpoint: at,
            name: name.to_owned(),
        });
    }
    match runtime_status(root, name) {
        Some(Status::Stopped) => container::delete(root, name, true)?,
        None => {}
        Some(status) => {
            return Err(DockerError::WrongState {
                name: name.to_owned(),
                status,
                why: "stop it before restoring a checkpoint into it",
            });
        }
    }
    let store = Store::open(root)?;
    let image = store
        .find(&record.image_id)
        .map_err(|source| DockerError::ImageGone {
            name: name.to_owned(),
            source,
        })?;
    let dir = dir(root, name);
    // The checkpoint's layer is copied in full before the container's own
    // is let go: a failed copy leaves the container as it was.
    let incoming = dir.join("upper.restoring");
    let _ = std::fs::remove_dir_all(&incoming);
    husk_runtime::checkpoint::copy_tree(&at.join(husk_runtime::checkpoint::UPPER_DIR), &incoming)?;
    unmount_rootfs(&dir);
    let _ = std::fs::remove_dir_all(dir.join("upper"));
    let _ = std::fs::remove_dir_all(dir.join("work"));
    std::fs::rename(&incoming, dir.join("upper"))
        .map_err(PathError::at("put the checkpoint's layer in", &dir))?;
    {
        let _adding = store.adding()?;
        mount_rootfs(&dir, &store, &image)?;
    }
    let options = CreateOptions {
        root,
        id: name,
        bundle: &dir,
        restore: Some(&at),
        pod: None,
        ..*options
    };
    let null = dev_null()?;
    if options.detach {
        let log = open_log(&dir)?;
        let _stdio =
            Stdio::replace([null.as_fd(), log.as_fd(), log.as_fd()]).map_err(DockerError::Stdio)?;
        return Ok(husk_runtime::run::run(&options)?);
    }
    let _stdio = Stdio::replace([
        null.as_fd(),
        rustix::stdio::stdout(),
        rustix::stdio::stderr(),
    ])
    .map_err(DockerError::Stdio)?;
    Ok(husk_runtime::run::run(&options)?)
}

/// /dev/null, for a container's stdin.
fn dev_null() -> Result<std::fs::File> {
    let path = Path::new("/dev/null");
    Ok(std::fs::File::open(path).map_err(PathError::at("open", path))?)
}

/// The log of a detached container in `dir`, opened to append.
fn open_log(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("log");
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(PathError::at("open", &path))?)
}

/// Starts `husk _autoremove NAME`, which removes the container when it
/// stops.
fn autoremove_later(root: &Path, name: &str) -> Result<()> {
    let exe = std::env::current_exe().map_err(DockerError::Autoremove)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--root")
        .arg(root)
        .arg("_autoremove")
        .arg(name)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    husk_sys::child::detached(&mut cmd);
    cmd.spawn().map_err(DockerError::Autoremove)?;
    Ok(())
}

/// `husk _autoremove NAME`: waits until the container stops, then
/// removes it.
pub fn autoremove(root: &Path, name: &str) -> Result<()> {
    loop {
        match ContainerState::load(root, name) {
            Ok(s) if s.status() != Status::Stopped => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            _ => return remove(root, name, true),
        }
    }
}

/// Removes container `name`'s directory, after taking it off its network.
fn remove_dir(root: &Path, name: &str) {
    if let Err(e) = network::detach(root, name) {
        // The rest goes anyway: a plugin that fails DEL once would fail it
        // at every later try too.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text += &format!(": {s}");
            source = s.source();
        }
        eprintln!("husk: warning: container {name}: {text}");
    }
    let dir = dir(root, name);
    unmount_rootfs(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The network a container of `o` joins (None for `none`), its published
/// ports and its names, from the flags (checked here, before anything is
/// made).
fn plan_network(
    root: &Path,
    o: &RunOptions,
    config: &oci_spec::image::ImageConfiguration,
    id: &str,
) -> Result<(Option<network::Network>, Vec<network::Port>, network::Names)> {
    let mut ports = o
        .publish
        .iter()
        .map(|p| network::parse_publish(p))
        .collect::<Result<Vec<_>, _>>()?;
    if o.publish_all {
        publish_exposed(&mut ports, config)?;
    }
    let names = network::Names {
        hostname: o.hostname.clone().unwrap_or_else(|| id[..12].to_owned()),
        extra_hosts: o
            .add_hosts
            .iter()
            .map(|h| network::parse_add_host(h))
            .collect::<Result<_, _>>()?,
        dns: o
            .dns
            .iter()
            .map(|d| network::parse_dns(d))
            .collect::<Result<_, _>>()?,
    };
    if let Some(h) = &o.hostname {
        let ok = !h.is_empty()
            && h.len() <= 63
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !ok {
            return Err(DockerError::BadHostname(h.clone()));
        }
    }
    let net = match o.network.as_deref().unwrap_or(network::DEFAULT_NETWORK) {
        "none" => {
            if !ports.is_empty() {
                return Err(network::NetworkError::PublishWithoutNetwork.into());
            }
            None
        }
        "host" => return Err(network::NetworkError::HostNetwork.into()),
        name => Some(network::get_or_default(root, name)?),
    };
    Ok((net, ports, names))
}

/// `-P`: every port the image exposes that `-p` did not publish, on a
/// host port the kernel picks.
fn publish_exposed(
    ports: &mut Vec<network::Port>,
    config: &oci_spec::image::ImageConfiguration,
) -> Result<()> {
    let exposed = config
        .config()
        .as_ref()
        .and_then(|c| c.exposed_ports().clone())
        .unwrap_or_default();
    for e in exposed {
        let p = network::parse_publish(&e)?;
        if !ports
            .iter()
            .any(|q| q.container_port == p.container_port && q.protocol == p.protocol)
        {
            ports.push(p);
        }
    }
    Ok(())
}

/// Takes the network namespace out of the spec: husk gives such a
/// container loopback only (`--network none`).
pub fn drop_netns(spec: &mut Spec) {
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    namespaces.retain(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Network);
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
}

/// Names the namespace at `netns` (a namespace a network attachment
/// made) as the spec's network namespace.
pub fn set_netns(spec: &mut Spec, netns: &Path) {
    drop_netns(spec);
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    let mut ns = oci_spec::runtime::LinuxNamespace::default();
    ns.set_typ(oci_spec::runtime::LinuxNamespaceType::Network);
    ns.set_path(Some(netns.to_owned()));
    namespaces.push(ns);
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
}

/// The runtime status of a container (None once the runtime forgot it).
fn runtime_status(root: &Path, name: &str) -> Option<Status> {
    ContainerState::load(root, name).ok().map(|s| s.status())
}

/// `husk rm`: removes a container, its writable layer and its log; a
/// running one only with `force` (killed first).
pub fn remove(root: &Path, name: &str, force: bool) -> Result<()> {
    let dir = dir(root, name);
    if !dir.join("container.json").exists() && !dir.exists() {
        return Err(DockerError::NoSuchContainer(name.to_owned()));
    }
    match runtime_status(root, name) {
        Some(Status::Stopped) | None => {
            let _ = container::delete(root, name, true);
        }
        Some(status) if force => {
            let _ = status;
            container::delete(root, name, true)?;
        }
        Some(status) => {
            return Err(DockerError::WrongState {
                name: name.to_owned(),
                status,
                why: "stop it first, or remove it with rm -f",
            });
        }
    }
    remove_dir(root, name);
    Ok(())
}

/// `husk stop`: SIGTERM, then SIGKILL after `timeout`.
pub fn stop(root: &Path, name: &str, timeout: std::time::Duration) -> Result<()> {
    Record::load(root, name)?;
    let Some(status) = runtime_status(root, name) else {
        return Ok(());
    };
    if status == Status::Stopped {
        return Ok(());
    }
    if status == Status::Paused {
        container::pause(root, name, false)?;
    }
    let _ = container::kill(root, name, libc::SIGTERM, false);
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if runtime_status(root, name) != Some(Status::Running) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = container::kill(root, name, libc::SIGKILL, false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while runtime_status(root, name) == Some(Status::Running) {
        if std::time::Instant::now() > deadline {
            return Err(DockerError::DidNotStop(name.to_owned()));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// `husk logs`: what a detached container wrote; with `follow`, until it
/// stops.
pub fn logs(root: &Path, name: &str, follow: bool, out: &mut dyn Write) -> Result<()> {
    Record::load(root, name)?;
    let path = dir(root, name).join("log");
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(PathError::at("read", &path)(e).into()),
    };
    let mut read = |buf: &mut [u8]| {
        file.read(buf)
            .map_err(|e| DockerError::from(PathError::at("read", &path)(e)))
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n]).map_err(DockerError::WriteOut)?;
            continue;
        }
        out.flush().map_err(DockerError::WriteOut)?;
        if !follow || runtime_status(root, name) != Some(Status::Running) {
            // One more read: what was written before it stopped.
            let n = read(&mut buf)?;
            out.write_all(&buf[..n]).map_err(DockerError::WriteOut)?;
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A container's status as `ps` shows it.
pub fn status_text(root: &Path, r: &Record) -> (bool, String) {
    match ContainerState::load(root, &r.name) {
        Ok(s) => match s.status() {
            Status::Stopped => (false, format!("Exited ({})", s.exit_status.unwrap_or(-1))),
            Status::Running => (true, "Up".into()),
            status => (true, status.to_string()),
        },
        Err(_) => match r.exit_status {
            Some(code) => (false, format!("Exited ({code})")),
            None => (false, "Created".into()),
        },
    }
}

/// docker's `NetworkSettings` of container `name`.
fn network_settings(root: &Path, name: &str) -> serde_json::Value {
    let Ok(Some(a)) = network::attachment(root, name) else {
        return serde_json::json!({"Networks": {}, "IPAddress": "", "Ports": {}});
    };
    let ip = a.ip().map(|ip| ip.to_string()).unwrap_or_default();
    let gateway = network::get(root, &a.network)
        .map(|n| n.gateway)
        .unwrap_or_default();
    let mut ports = serde_json::Map::new();
    for p in &a.ports {
        ports.insert(
            format!("{}/{}", p.container_port, p.protocol),
            serde_json::json!([{
                "HostIp": p.host_ip.map(|i| i.to_string()).unwrap_or_else(|| "0.0.0.0".into()),
                "HostPort": p.host_port.to_string(),
            }]),
        );
    }
    serde_json::json!({
        "IPAddress": ip,
        "Gateway": gateway,
        "SandboxKey": a.netns,
        "Ports": ports,
        "Networks": {a.network.clone(): {"IPAddress": ip, "Gateway": gateway, "Aliases": a.names}},
    })
}

/// Diff IDs every container still uses (kept by GC).
pub fn layers_in_use(root: &Path) -> HashSet<String> {
    Record::all(root)
        .into_iter()
        .flat_map(|r| r.layers)
        .collect()
}

/// `husk inspect`: a container's record and runtime state, or an image's
/// record and config.
pub fn inspect(root: &Path, what: &str) -> Result<serde_json::Value> {
    if let Ok(r) = Record::load(root, what) {
        let state = ContainerState::load(root, what).ok().map(|s| s.oci_state());
        let (running, status) = status_text(root, &r);
        return Ok(serde_json::json!({
            "Id": r.id,
            "Name": r.name,
            "Image": r.image_id,
            "Config": {"Image": r.image, "Cmd": r.command},
            "Created": r.created,
            "State": {"Status": status, "Running": running, "ExitCode": r.exit_status, "Runtime": state},
            "Mounts": r.volumes,
            "HostConfig": {"AutoRemove": r.auto_remove},
            "NetworkSettings": network_settings(root, &r.name),
            "GraphDriver": {"Name": "overlay", "Data": {
                "MergedDir": dir(root, &r.name).join("rootfs"),
                "UpperDir": dir(root, &r.name).join("upper"),
            }},
        }));
    }
    let store = Store::open(root)?;
    let image = store
        .find(what)
        .map_err(|_| DockerError::NoSuchContainerOrImage(what.to_owned()))?;
    let config: serde_json::Value = serde_json::from_slice(&store.read_blob(&image.config)?)?;
    Ok(serde_json::json!({
        "Id": image.config,
        "RepoTags": [image.name],
        "RepoDigests": [format!("{}@{}", Reference::parse(&image.name)?.name(), image.manifest)],
        "Size": image.size(),
        "Config": config["config"],
        "Architecture": config["architecture"],
        "Os": config["os"],
        "RootFS": {"Type": "layers", "Layers": image.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_all_adds_the_images_exposed_ports_not_published_already() {
        let config: oci_spec::image::ImageConfiguration =
            serde_json::from_value(serde_json::json!({
                "architecture": "amd64", "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": []},
                "config": {"ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8080/tcp": {}}}
            }))
            .unwrap();
        let mut ports = vec![network::parse_publish("127.0.0.1:9000:8080").unwrap()];
        publish_exposed(&mut ports, &config).unwrap();
        let mut got: Vec<(u16, u16, &str)> = ports
            .iter()
            .map(|p| (p.host_port, p.container_port, p.protocol.as_str()))
            .collect();
        got.sort();
        assert_eq!(got, [(0, 53, "udp"), (0, 80, "tcp"), (9000, 8080, "tcp")]);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2G").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("10kb").unwrap(), 10 << 10);
        assert!(
            parse_bytes("lots")
                .unwrap_err()
                .to_string()
                .contains("\"lots\"")
        );
        assert!(parse_bytes("5x").is_err());
    }

    #[test]
    fn users_resolve_inside_the_image() {
        let rootfs = std::env::temp_dir().join(format!("husk-users-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&rootfs);
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            rootfs.join("etc/group"),
            "root:x:0:\napp:x:1000:\nwheel:x:10:app\n",
        )
        .unwrap();
        assert_eq!(
            resolve_user(&rootfs, "app").unwrap(),
            (1000, 1000, vec![10])
        );
        assert_eq!(
            resolve_user(&rootfs, "1000:wheel").unwrap(),
            (1000, 10, vec![])
        );
        assert_eq!(resolve_user(&rootfs, "4242").unwrap(), (4242, 0, vec![]));
        let e = resolve_user(&rootfs, "nobody").unwrap_err().to_string();
        assert!(e.contains("unable to find user nobody"), "{e}");
        // An image whose /etc/passwd is a symlink to the host's file
        // resolves inside the image (and finds nothing there).
        std::fs::remove_file(rootfs.join("etc/passwd")).unwrap();
        let outside = rootfs.with_extension("outside");
        std::fs::write(&outside, "evil:x:7:7::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(&outside, rootfs.join("etc/passwd")).unwrap();
        assert!(resolve_user(&rootfs, "evil").is_err());
        std::fs::remove_dir_all(&rootfs).unwrap();
        std::fs::remove_file(&outside).unwrap();
    }

    /// An error and its sources, as the binary prints it (`{:#}`).
    fn chain(e: &dyn std::error::Error) -> String {
        let mut line = e.to_string();
        let mut source = e.source();
        while let Some(inner) = source {
            line = format!("{line}: {inner}");
            source = inner.source();
        }
        line
    }

    #[test]
    fn errors_are_typed_and_keep_their_messages() {
        let root = std::env::temp_dir().join(format!("husk-errors-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("docker/broken")).unwrap();
        std::fs::write(root.join("docker/broken/container.json"), "{").unwrap();

        let e = Record::load(&root, "gone").unwrap_err();
        assert!(matches!(&e, DockerError::NoSuchContainer(n) if n == "gone"));
        assert_eq!(e.to_string(), "no such container: gone");
        let e = Record::load(&root, "broken").unwrap_err();
        assert!(matches!(e, DockerError::Corrupt { .. }), "{e:?}");
        let text = chain(&e);
        assert!(
            text.starts_with(&format!(
                "{} is corrupt: ",
                root.join("docker/broken/container.json").display()
            )),
            "{text}"
        );
        assert!(matches!(
            remove(&root, "gone", false),
            Err(DockerError::NoSuchContainer(_))
        ));

        let e = parse_bytes("lots").unwrap_err();
        assert!(matches!(
            e,
            DockerError::BadSize {
                source: Some(_),
                ..
            }
        ));
        let memory = DockerError::BadFlag {
            flag: "--memory",
            source: Box::new(e),
        };
        assert_eq!(
            chain(&memory),
            "--memory: \"lots\" is not a size (like 512m or 2g): cannot parse integer from empty string"
        );
        assert_eq!(
            chain(&parse_bytes("5x").unwrap_err()),
            "\"5x\" is not a size (like 512m or 2g)"
        );

        for (v, says) in [
            (
                "/tmp:data",
                "-v \"/tmp:data\": the container path \"data\" is not absolute",
            ),
            ("a:b:c:d", "-v \"a:b:c:d\": expected HOST:CONTAINER[:ro]"),
            (
                "bad name!:/data",
                "-v \"bad name!:/data\": \"bad name!\" is neither an absolute path nor a volume name",
            ),
        ] {
            let e = volume(&root, v).unwrap_err();
            assert!(matches!(e, DockerError::BadVolume { .. }), "{e:?}");
            assert_eq!(e.to_string(), says);
        }
        assert!(matches!(
            checkpoint_path(&root, "gone", "x", None),
            Err(DockerError::NoSuchContainer(_))
        ));
        std::fs::remove_dir_all(&root).unwrap();

        // The busybox tools' errors carry their reason in the message
        // (callers may print them alone).
        let e = busybox::make_rootfs(Path::new("/nonexistent/husk/rootfs")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("cannot create /nonexistent/husk/rootfs: "),
            "{text}"
        );
        assert!(std::error::Error::source(&e).is_none());
    }
}
