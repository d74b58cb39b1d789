//! The size of a container's VM (vCPUs and memory), from its spec's
//! resource limits; the warm-start cache keeps one snapshot per shape.

/// The VM shape of a container guest with no CPU limit.
pub const VCPUS: u8 = 1;
/// Guest memory of a container guest with no memory limit (or a small
/// one), MiB.
pub const MEMORY_MIB: u64 = 256;
/// What the guest's kernel and agent need beside the container's limit,
/// MiB.
pub const GUEST_RESERVE_MIB: u64 = 64;
/// Guest memory is a multiple of this, MiB: few shapes, so few warm-start
/// snapshots.
pub const MEMORY_STEP_MIB: u64 = 256;
/// The most vCPUs husk gives a VM.
pub const MAX_VCPUS: u8 = 8;
/// The most memory husk gives a VM, MiB.
pub const MAX_MEMORY_MIB: u64 = 16 << 10;
/// What the VMM process itself needs beside guest memory, for the host
/// cgroup's limit, MiB.
pub const VMM_RESERVE_MIB: u64 = 64;

/// The size of a container's VM: what its spec's limits need (docs/
/// runtime.md, "Resources"). The guest enforces the limits themselves in
/// the container's cgroup; the VM only has to hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    /// vCPUs: the CPU quota rounded up (1 without one).
    pub vcpus: u8,
    /// Guest memory, MiB: the memory limit and the guest's reserve, rounded
    /// up to 256 MiB (256 without a limit).
    pub memory_mib: u64,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            vcpus: VCPUS,
            memory_mib: MEMORY_MIB,
        }
    }
}

impl Shape {
    /// The shape `resources` need.
    pub fn of(resources: Option<&oci_spec::runtime::LinuxResources>) -> Result<Self, String> {
        Self::on_host(resources, host_cpus())
    }

    /// The shape `resources` need on a host of `host_cpus` CPUs: limits
    /// that make no sense, and more vCPUs than the host or husk has, are
    /// refused by name (runc's -1 is "no limit").
    pub fn on_host(
        resources: Option<&oci_spec::runtime::LinuxResources>,
        host_cpus: u64,
    ) -> Result<Self, String> {
        let mut shape = Self::default();
        let Some(r) = resources else {
            return Ok(shape);
        };
        if let Some(m) = r.memory() {
            for (name, value) in [
                ("limit", m.limit()),
                ("reservation", m.reservation()),
                ("swap", m.swap()),
            ] {
                if let Some(v) = value.filter(|&v| v < -1) {
                    return Err(format!(
                        "linux.resources.memory.{name} {v}: must be a number of bytes, or -1 for no limit"
                    ));
                }
            }
        }
        if let Some(cpu) = r.cpu() {
            if let Some(q) = cpu.quota().filter(|&q| q < -1) {
                return Err(format!(
                    "linux.resources.cpu.quota {q}: must be a number of microseconds, or -1 for no limit"
                ));
            }
            if cpu.period() == Some(0) {
                return Err("linux.resources.cpu.period 0: must be at least 1 microsecond".into());
            }
        }
        if let Some(limit) = r
            .memory()
            .as_ref()
            .and_then(|m| m.limit())
            .filter(|&l| l > 0)
        {
            let need = (limit as u64).div_ceil(1 << 20) + GUEST_RESERVE_MIB;
            let mib = need.div_ceil(MEMORY_STEP_MIB) * MEMORY_STEP_MIB;
            if mib > MAX_MEMORY_MIB {
                return Err(format!(
                    "linux.resources.memory.limit {limit}: more than husk gives a VM ({} GiB)",
                    MAX_MEMORY_MIB >> 10
                ));
            }
            shape.memory_mib = mib.max(MEMORY_MIB);
        }
        if let Some(cpu) = r.cpu() {
            if let Some(quota) = cpu.quota().filter(|&q| q > 0) {
                let period = cpu.period().filter(|&p| p > 0).unwrap_or(100_000);
                let cpus = (quota as u64).div_ceil(period);
                let most = host_cpus.clamp(1, u64::from(MAX_VCPUS));
                if cpus > most {
                    return Err(format!(
                        "linux.resources.cpu quota {quota} per period {period} asks for {cpus} CPUs; \
                         a VM gets at most {most} here (this host has {host_cpus}, husk's limit is {MAX_VCPUS})"
                    ));
                }
                shape.vcpus = cpus.max(1) as u8;
            }
        }
        Ok(shape)
    }

    /// The most memory a container of this VM may be given (`update`).
    pub fn memory_limit_max(&self) -> u64 {
        (self.memory_mib - GUEST_RESERVE_MIB) << 20
    }
}

/// The host's online CPUs, counted where glibc's
/// `sysconf(_SC_NPROCESSORS_ONLN)` counts them: the kernel's list of
/// online CPUs, else /proc/stat's `cpuN` lines, else the CPUs this
/// process may run on. Not `available_parallelism`, which counts only the
/// last.
pub fn host_cpus() -> u64 {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|list| cpu_list_len(&list))
        .or_else(|| {
            let stat = std::fs::read_to_string("/proc/stat").ok()?;
            let n = stat
                .lines()
                .filter(|l| {
                    l.strip_prefix("cpu")
                        .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
                })
                .count();
            (n > 0).then_some(n as u64)
        })
        .or_else(|| Some(rustix::thread::sched_getaffinity(None).ok()?.count().into()))
        .unwrap_or(1)
        .max(1)
}

/// How many CPUs a kernel CPU list (`0-3,6`) names.
fn cpu_list_len(list: &str) -> Option<u64> {
    list.trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (first.parse::<u64>().ok()?, last.parse::<u64>().ok()?);
                Some(last.checked_sub(first)? + 1)
            }
            None => part.parse::<u64>().ok().map(|_| 1),
        })
        .sum::<Option<u64>>()
        .filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: serde_json::Value) -> oci_spec::runtime::LinuxResources {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_vm_is_sized_by_the_specs_limits() {
        assert_eq!(Shape::of(None).unwrap(), Shape::default());
        let small = resources(serde_json::json!({"memory": {"limit": 100 << 20}}));
        assert_eq!(Shape::of(Some(&small)).unwrap().memory_mib, 256);
        // 600 MiB + 64 MiB for the guest, rounded up to 256 MiB.
        let big = resources(serde_json::json!({"memory": {"limit": 600u64 << 20}}));
        let shape = Shape::of(Some(&big)).unwrap();
        assert_eq!(shape.memory_mib, 768);
        assert_eq!(shape.memory_limit_max(), 704 << 20);
        // Exactly at a step: 192 MiB + 64 = 256.
        let exact = resources(serde_json::json!({"memory": {"limit": 192 << 20}}));
        assert_eq!(Shape::of(Some(&exact)).unwrap().memory_mib, 256);
        let cpus = |quota: i64, period: u64| {
            let r = resources(serde_json::json!({"cpu": {"quota": quota, "period": period}}));
            Shape::on_host(Some(&r), 16).map(|s| s.vcpus)
        };
        assert_eq!(cpus(50_000, 100_000), Ok(1));
        assert_eq!(cpus(150_000, 100_000), Ok(2));
        assert_eq!(cpus(200_000, 100_000), Ok(2));
        assert_eq!(cpus(-1, 100_000), Ok(1));
        assert_eq!(cpus(800_000, 100_000), Ok(MAX_VCPUS));
        // Issue 14: more CPUs than husk or the host gives, and limits that
        // make no sense, are refused by name, not clamped or taken.
        let e = cpus(10_000_000, 100_000).unwrap_err();
        assert!(
            e.contains("asks for 100 CPUs; a VM gets at most 8 here"),
            "{e}"
        );
        let r = resources(serde_json::json!({"cpu": {"quota": 300_000, "period": 100_000}}));
        let e = Shape::on_host(Some(&r), 2).unwrap_err();
        assert!(
            e.contains("asks for 3 CPUs; a VM gets at most 2 here (this host has 2"),
            "{e}"
        );
        for (json, want) in [
            (
                serde_json::json!({"memory": {"limit": -5}}),
                "memory.limit -5: must be",
            ),
            (
                serde_json::json!({"memory": {"swap": -2}}),
                "memory.swap -2: must be",
            ),
            (
                serde_json::json!({"memory": {"reservation": -9}}),
                "memory.reservation -9",
            ),
            (
                serde_json::json!({"cpu": {"quota": -100}}),
                "cpu.quota -100: must be",
            ),
            (
                serde_json::json!({"cpu": {"quota": 100, "period": 0}}),
                "cpu.period 0",
            ),
        ] {
            let e = Shape::of(Some(&resources(json.clone()))).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
        assert_eq!(
            Shape::of(Some(&resources(
                serde_json::json!({"memory": {"limit": -1}})
            )))
            .unwrap()
            .memory_mib,
            MEMORY_MIB
        );
        let huge = resources(serde_json::json!({"memory": {"limit": 64u64 << 30}}));
        let e = Shape::of(Some(&huge)).unwrap_err();
        assert!(e.contains("more than husk gives a VM (16 GiB)"), "{e}");
    }

    #[test]
    fn the_hosts_cpus_are_counted_from_the_kernels_list() {
        assert_eq!(cpu_list_len("0\n"), Some(1));
        assert_eq!(cpu_list_len("0-15\n"), Some(16));
        assert_eq!(cpu_list_len("0-3,6,8-9\n"), Some(7));
        assert_eq!(cpu_list_len(""), None);
        assert_eq!(cpu_list_len("3-1"), None);
        assert!(host_cpus() >= 1);
    }
}
