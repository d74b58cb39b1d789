//! `husk doctor`: what this host has and lacks for husk, each lack named
//! with its fix (docs/doctor.md). Every check reads; nothing is written,
//! loaded or started.

use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// husk runs, without what this check is about.
    Warn,
    /// husk cannot run containers here.
    Fail,
}

/// One check's outcome.
#[derive(Debug)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            level: Level::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn bad(name: &'static str, level: Level, detail: impl Into<String>, fix: &str) -> Self {
        Self {
            name,
            level,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Where the checks look: the host's files under `sysroot` (`/`; a
/// directory of fake ones in the tests), programs on `path`, husk's own
/// binaries near `exe_dir`.
pub struct Host {
    pub sysroot: PathBuf,
    pub path: Option<OsString>,
    pub exe_dir: PathBuf,
}

impl Host {
    /// This host, for the `husk` that runs.
    pub fn this() -> Self {
        Self {
            sysroot: PathBuf::from("/"),
            path: std::env::var_os("PATH"),
            exe_dir: std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_owned))
                .unwrap_or_default(),
        }
    }

    fn file(&self, path: &str) -> PathBuf {
        self.sysroot.join(path.trim_start_matches('/'))
    }

    fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.file(path)).ok()
    }

    /// `program` on the host's PATH.
    fn program(&self, program: &str) -> Option<PathBuf> {
        std::env::split_paths(self.path.as_deref()?)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    }
}

/// `KVM_GET_API_VERSION`: `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::Ioctl = 0xae00;
/// The API version every KVM since Linux 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;

fn kvm(host: &Host) -> Check {
    const NAME: &str = "kvm";
    let path = host.file("/dev/kvm");
    let fix = "load the KVM module (modprobe kvm_intel or kvm_amd), enable \
               virtualization in the firmware, or on a VM enable nested virtualization; \
               the user running husk needs read-write access to /dev/kvm";
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            return Check::bad(NAME, Level::Fail, format!("{}: {e}", path.display()), fix);
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and reads or writes
    // no memory; on a file that is not KVM it fails with ENOTTY.
    let version =
        unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), KVM_GET_API_VERSION) };
    if version == KVM_API_VERSION {
        Check::ok(NAME, format!("{} (API {version})", path.display()))
    } else {
        Check::bad(
            NAME,
            Level::Fail,
            format!(
                "{} does not answer as KVM ({})",
                path.display(),
                if version < 0 {
                    std::io::Error::last_os_error().to_string()
                } else {
                    format!("API {version}, not {KVM_API_VERSION}")
                }
            ),
            fix,
        )
    }
}

fn virtualization(host: &Host) -> Check {
    const NAME: &str = "hardware virtualization";
    let cpuinfo = host.read("/proc/cpuinfo").unwrap_or_default();
    let flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .find(|f| *f == "vmx" || *f == "svm");
    match flag {
        Some(flag) => Check::ok(NAME, format!("{flag}: guest kernels run at hardware speed")),
        None => Check::bad(
            NAME,
            Level::Warn,
            "no vmx or svm in /proc/cpuinfo: KVM here emulates guest kernel mode \
             (as PVM does), so guests run, but their kernels slowly \
             (a cold boot takes seconds, each system call tens of microseconds)",
            "run husk on hardware with VT-x or AMD-V, or on a VM with nested virtualization",
        ),
    }
}

fn cgroups(host: &Host) -> Check {
    const NAME: &str = "cgroups";
    let wanted = ["cpu", "memory", "pids"];
    // v2: one hierarchy and its controllers; v1: a hierarchy per
    // controller (the runtime uses whichever is mounted).
    let (version, have): (&str, Vec<String>) = match host.read("/sys/fs/cgroup/cgroup.controllers")
    {
        Some(list) => ("v2", list.split_whitespace().map(str::to_owned).collect()),
        None => (
            "v1",
            wanted
                .iter()
                .filter(|c| host.file(&format!("/sys/fs/cgroup/{c}/tasks")).is_file())
                .map(|c| c.to_string())
                .collect(),
        ),
    };
    let missing: Vec<&str> = wanted
        .into_iter()
        .filter(|c| !have.iter().any(|h| h == c))
        .collect();
    if missing.is_empty() {
        return Check::ok(NAME, format!("{version}, controllers: {}", have.join(" ")));
    }
    let detail = if version == "v1" && missing.len() == wanted.len() {
        "no cgroup hierarchy at /sys/fs/cgroup: VMs are not placed in the spec's cgroup".into()
    } else {
        format!(
            "cgroup {version} lacks {}: the VM's limits on the host are not applied",
            missing.join(", ")
        )
    };
    Check::bad(
        NAME,
        Level::Warn,
        detail,
        "mount cgroup2 on /sys/fs/cgroup (systemd.unified_cgroup_hierarchy=1) with the \
         cpu, memory and pids controllers (CONFIG_CGROUP_SCHED, CONFIG_MEMCG, CONFIG_CGROUP_PIDS)",
    )
}

fn overlay(host: &Host) -> Check {
    const NAME: &str = "overlayfs";
    let filesystems = host.read("/proc/filesystems").unwrap_or_default();
    if filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        Check::ok(NAME, "overlay in /proc/filesystems")
    } else {
        Check::bad(
            NAME,
            Level::Warn,
            "overlay is not in /proc/filesystems: containerd's and docker's image \
             snapshots need it",
            "modprobe overlay",
        )
    }
}

fn tun(host: &Host) -> Check {
    const NAME: &str = "tun";
    let path = host.file("/dev/net/tun");
    match std::fs::metadata(&path) {
        Ok(m) if m.file_type().is_char_device() => Check::ok(NAME, path.display().to_string()),
        _ => Check::bad(
            NAME,
            Level::Warn,
            format!(
                "{} is missing: containers get no network but loopback",
                path.display()
            ),
            "modprobe tun",
        ),
    }
}

fn seccomp(host: &Host) -> Check {
    const NAME: &str = "seccomp";
    let status = host.read("/proc/self/status").unwrap_or_default();
    let actions = host
        .read("/proc/sys/kernel/seccomp/actions_avail")
        .unwrap_or_default();
    let have: Vec<&str> = actions.split_whitespace().collect();
    let missing: Vec<&str> = ["kill_process", "errno", "allow"]
        .into_iter()
        .filter(|a| !have.contains(a))
        .collect();
    if !status.lines().any(|l| l.starts_with("Seccomp:")) || !missing.is_empty() {
        return Check::bad(
            NAME,
            Level::Fail,
            "the kernel has no seccomp filters (or lacks kill_process, errno, allow): \
             husk-vmm runs every thread under one",
            "use a kernel built with CONFIG_SECCOMP_FILTER (Linux 4.14 or later)",
        );
    }
    Check::ok(NAME, format!("filter actions: {}", have.join(" ")))
}

fn binaries(host: &Host) -> Check {
    const NAME: &str = "husk's builds";
    match husk_guest::binaries::find_near(&host.exe_dir) {
        Ok(found) => Check::ok(
            NAME,
            format!(
                "VMM {}, kernel {}, agent {}",
                found.vmm.display(),
                found.kernel.display(),
                found.agent.display()
            ),
        ),
        Err(e) => Check::bad(
            NAME,
            Level::Fail,
            format!("{e:#}"),
            "`make kernel agent build` in husk's source (the README's first command does it)",
        ),
    }
}

fn containerd(host: &Host) -> Check {
    const NAME: &str = "containerd";
    let snippet = "add to /etc/containerd/config.toml: \
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.husk] \
         runtime_type = \"io.containerd.husk.v2\" (docs/kubernetes.md), and put \
         containerd-shim-husk-v2 on containerd's PATH";
    let Some(binary) = host.program("containerd") else {
        return Check::bad(
            NAME,
            Level::Warn,
            "no containerd on PATH: husk works alone and behind docker, not for Kubernetes",
            "apt install containerd",
        );
    };
    let config = host.read("/etc/containerd/config.toml").unwrap_or_default();
    let shim = host.program("containerd-shim-husk-v2");
    match (config.contains("io.containerd.husk.v2"), shim) {
        (true, Some(shim)) => Check::ok(
            NAME,
            format!(
                "{}, handler husk in /etc/containerd/config.toml, shim {}",
                binary.display(),
                shim.display()
            ),
        ),
        (configured, shim) => {
            let mut lacks = Vec::new();
            if !configured {
                lacks.push("no runtime io.containerd.husk.v2 in /etc/containerd/config.toml");
            }
            if shim.is_none() {
                lacks.push("no containerd-shim-husk-v2 on PATH");
            }
            Check::bad(NAME, Level::Warn, lacks.join("; "), snippet)
        }
    }
}

fn cni(host: &Host) -> Check {
    const NAME: &str = "CNI plugins";
    let found = ["/usr/lib/cni", "/opt/cni/bin"]
        .into_iter()
        .find(|dir| host.file(&format!("{dir}/bridge")).is_file());
    match found {
        Some(dir) => Check::ok(NAME, format!("bridge in {dir}")),
        None => Check::bad(
            NAME,
            Level::Warn,
            "no bridge plugin in /usr/lib/cni or /opt/cni/bin: no `husk network` \
             and no CRI pod networks",
            "apt install containernetworking-plugins",
        ),
    }
}

fn iptables(host: &Host) -> Check {
    const NAME: &str = "iptables";
    match host.program("iptables") {
        Some(p) => Check::ok(NAME, p.display().to_string()),
        None => Check::bad(
            NAME,
            Level::Warn,
            "no iptables on PATH: CNI's bridge and portmap plugins and a pod's port \
             forwarding need it",
            "apt install iptables",
        ),
    }
}

/// The uids and gids husk's VMMs run as must be no user's or group's of
/// the host, nor in a range /etc/subuid or /etc/subgid gives a user for
/// its user namespaces: a VMM could act as that user on its files.
fn vmm_ids(host: &Host) -> Check {
    use husk_protocol::ids::{VMM_ID_BASE, VMM_ID_COUNT, overlaps};
    const NAME: &str = "VMM ids";
    let end = u64::from(VMM_ID_BASE) + u64::from(VMM_ID_COUNT) - 1;
    let mut clashes = Vec::new();
    for (file, id_field) in [("/etc/passwd", 2), ("/etc/group", 2)] {
        for line in host.read(file).unwrap_or_default().lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if let Some(id) = fields.get(id_field).and_then(|f| f.parse::<u64>().ok())
                && overlaps(id, 1)
            {
                clashes.push(format!("{file}: {} ({id})", fields[0]));
            }
        }
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        for line in host.read(file).unwrap_or_default().lines() {
            let fields: Vec<&str> = line.split(':').collect();
            let start = fields.get(1).and_then(|f| f.parse::<u64>().ok());
            let count = fields.get(2).and_then(|f| f.parse::<u64>().ok());
            if let (Some(start), Some(count)) = (start, count)
                && overlaps(start, count)
            {
                clashes.push(format!("{file}: {} ({start}, {count} ids)", fields[0]));
            }
        }
    }
    if clashes.is_empty() {
        Check::ok(
            NAME,
            format!("{VMM_ID_BASE}-{end} are no user's or group's, and no subordinate range's"),
        )
    } else {
        Check::bad(
            NAME,
            Level::Warn,
            format!(
                "husk-vmm runs as ids {VMM_ID_BASE}-{end} (one per VM); these are in that range: {}",
                clashes.join("; ")
            ),
            "give those users, groups and ranges ids outside 1879048192-1883242495",
        )
    }
}

/// Every check, in the order they are printed.
pub fn checks(host: &Host) -> Vec<Check> {
    vec![
        kvm(host),
        virtualization(host),
        seccomp(host),
        binaries(host),
        vmm_ids(host),
        cgroups(host),
        overlay(host),
        tun(host),
        cni(host),
        iptables(host),
        containerd(host),
    ]
}

/// Runs `husk doctor`: prints each check; exit status 0 when husk can run
/// containers here (warnings allowed), 1 when not.
pub fn doctor() -> anyhow::Result<u8> {
    let results = checks(&Host::this());
    let mut out = String::new();
    for c in &results {
        let mark = match c.level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        out.push_str(&format!("{mark} {}: {}\n", c.name, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("     fix: {fix}\n"));
        }
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|c| c.level == Level::Fail)
        .map(|c| c.name)
        .collect();
    if failed.is_empty() {
        out.push_str("husk can run containers on this host\n");
    } else {
        out.push_str(&format!(
            "husk cannot run containers on this host: {}\n",
            failed.join(", ")
        ));
    }
    print!("{out}");
    Ok(if failed.is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake host with everything husk wants; `without` removes one
    /// piece.
    struct Fake {
        dir: PathBuf,
    }

    impl Fake {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("husk-doctor-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let write = |path: &str, text: &str| {
                let p = dir.join(path);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, text).unwrap();
            };
            write(
                "proc/cpuinfo",
                "processor\t: 0\nflags\t\t: fpu vme vmx sse\n",
            );
            write(
                "sys/fs/cgroup/cgroup.controllers",
                "cpuset cpu io memory pids\n",
            );
            write("proc/filesystems", "nodev\tproc\n\text4\nnodev\toverlay\n");
            write("proc/self/status", "Name:\thusk\nSeccomp:\t0\n");
            write(
                "proc/sys/kernel/seccomp/actions_avail",
                "kill_process kill_thread trap errno user_notif trace log allow\n",
            );
            write("usr/lib/cni/bridge", "");
            write(
                "etc/containerd/config.toml",
                "[plugins.x.runtimes.husk]\n runtime_type = \"io.containerd.husk.v2\"\n",
            );
            write("bin/containerd", "");
            write("bin/containerd-shim-husk-v2", "");
            write("bin/iptables", "");
            write(
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
            );
            write("etc/group", "root:x:0:\n");
            write("etc/subuid", "alice:100000:65536\n");
            Self { dir }
        }

        fn host(&self) -> Host {
            Host {
                sysroot: self.dir.clone(),
                path: Some(self.dir.join("bin").into_os_string()),
                exe_dir: self.dir.join("husk-bin"),
            }
        }

        fn remove(&self, path: &str) {
            let p = self.dir.join(path);
            if p.is_dir() {
                std::fs::remove_dir_all(p).unwrap();
            } else {
                std::fs::remove_file(p).unwrap();
            }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn level(check: Check) -> (Level, String, bool) {
        (check.level, check.detail, check.fix.is_some())
    }

    #[test]
    fn a_complete_host_passes_every_check_it_can_fake() {
        let fake = Fake::new("complete");
        let host = fake.host();
        for check in [
            virtualization(&host),
            cgroups(&host),
            overlay(&host),
            seccomp(&host),
            cni(&host),
            iptables(&host),
            containerd(&host),
            vmm_ids(&host),
        ] {
            assert_eq!(check.level, Level::Ok, "{check:?}");
        }
    }

    #[test]
    fn each_missing_piece_is_named_with_its_fix() {
        let fake = Fake::new("missing");
        let host = fake.host();
        // /dev/kvm is not in the fake tree; a regular file there is not KVM.
        let (l, detail, fix) = level(kvm(&host));
        assert!(
            l == Level::Fail && detail.contains("dev/kvm") && fix,
            "{detail}"
        );
        std::fs::create_dir_all(fake.dir.join("dev")).unwrap();
        std::fs::write(fake.dir.join("dev/kvm"), "").unwrap();
        let (l, detail, _) = level(kvm(&host));
        assert!(
            l == Level::Fail && detail.contains("does not answer as KVM"),
            "{detail}"
        );
        // No husk-vmm next to the fake husk.
        let (l, detail, fix) = level(binaries(&host));
        assert!(
            l == Level::Fail && detail.contains("husk-vmm") && fix,
            "{detail}"
        );

        std::fs::write(fake.dir.join("proc/cpuinfo"), "flags\t: fpu sse\n").unwrap();
        let (l, detail, fix) = level(virtualization(&host));
        assert!(l == Level::Warn && detail.contains("emulates guest kernel mode") && fix);

        std::fs::write(
            fake.dir.join("sys/fs/cgroup/cgroup.controllers"),
            "cpu io\n",
        )
        .unwrap();
        let (l, detail, _) = level(cgroups(&host));
        assert!(
            l == Level::Warn && detail.contains("v2 lacks memory, pids"),
            "{detail}"
        );
        fake.remove("sys/fs/cgroup/cgroup.controllers");
        let (l, detail, _) = level(cgroups(&host));
        assert!(
            l == Level::Warn && detail.contains("no cgroup hierarchy"),
            "{detail}"
        );
        for c in ["cpu", "memory", "pids"] {
            std::fs::create_dir_all(fake.dir.join("sys/fs/cgroup").join(c)).unwrap();
            std::fs::write(fake.dir.join("sys/fs/cgroup").join(c).join("tasks"), "").unwrap();
        }
        assert_eq!(cgroups(&host).level, Level::Ok, "v1");
        fake.remove("sys/fs/cgroup/pids");
        let (l, detail, _) = level(cgroups(&host));
        assert!(
            l == Level::Warn && detail.contains("v1 lacks pids"),
            "{detail}"
        );

        std::fs::write(fake.dir.join("proc/filesystems"), "nodev\tproc\n").unwrap();
        let (l, detail, _) = level(overlay(&host));
        assert!(l == Level::Warn && detail.contains("overlay"), "{detail}");

        let (l, detail, _) = level(tun(&host));
        assert!(
            l == Level::Warn && detail.contains("dev/net/tun"),
            "{detail}"
        );

        std::fs::write(
            fake.dir.join("proc/sys/kernel/seccomp/actions_avail"),
            "allow\n",
        )
        .unwrap();
        let (l, detail, _) = level(seccomp(&host));
        assert!(l == Level::Fail && detail.contains("seccomp"), "{detail}");

        // A user, and a subordinate range, among the VMMs' ids.
        std::fs::write(
            fake.dir.join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nvm7:x:1879048199:1:::\n",
        )
        .unwrap();
        std::fs::write(fake.dir.join("etc/subgid"), "bob:1879000000:100000\n").unwrap();
        let (l, detail, fix) = level(vmm_ids(&host));
        assert!(
            l == Level::Warn
                && detail.contains("/etc/passwd: vm7 (1879048199)")
                && detail.contains("/etc/subgid: bob")
                && !detail.contains("alice")
                && fix,
            "{detail}"
        );

        fake.remove("usr/lib/cni/bridge");
        let (l, detail, _) = level(cni(&host));
        assert!(
            l == Level::Warn && detail.contains("bridge plugin"),
            "{detail}"
        );

        fake.remove("bin/iptables");
        let (l, detail, _) = level(iptables(&host));
        assert!(
            l == Level::Warn && detail.contains("no iptables"),
            "{detail}"
        );

        fake.remove("bin/containerd-shim-husk-v2");
        let (l, detail, _) = level(containerd(&host));
        assert!(
            l == Level::Warn && detail.contains("no containerd-shim-husk-v2"),
            "{detail}"
        );
        std::fs::write(fake.dir.join("etc/containerd/config.toml"), "version = 2\n").unwrap();
        let (l, detail, _) = level(containerd(&host));
        assert!(
            l == Level::Warn && detail.contains("no runtime io.containerd.husk.v2"),
            "{detail}"
        );
        fake.remove("bin/containerd");
        let (l, detail, _) = level(containerd(&host));
        assert!(
            l == Level::Warn && detail.contains("no containerd on PATH"),
            "{detail}"
        );
    }
}
