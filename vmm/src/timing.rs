//! Boot timing: when the VMM started, entered KVM_RUN, and when the guest
//! reported its boot phases on the debug port, in a form a program reads.
//!
//! "Process start" is the moment the launcher spawned the VMM, passed in
//! `HUSK_LAUNCH_TIME_NS` (CLOCK_MONOTONIC nanoseconds, read just before the
//! spawn); without it, the entry into `main`. The kernel's own process start
//! time (/proc/self/stat) has only 10 ms resolution, too coarse here.

use std::sync::Mutex;

use serde::Serialize;

/// Environment variable carrying the launcher's CLOCK_MONOTONIC at spawn.
pub const LAUNCH_TIME_ENV: &str = "HUSK_LAUNCH_TIME_NS";

/// Clock `id` in nanoseconds (libc's `clock_gettime`, not rustix's:
/// rustix looks for the vDSO on first use with prctl, which the vCPU
/// thread's seccomp filter refuses).
fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass, which
    // lives for the duration of the call.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC in nanoseconds, the clock every timestamp here uses.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// What was timed, as written to the `--timings` file (microseconds since
/// the origin).
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct BootTimes {
    /// `launch` (the launcher's spawn time) or `main` (entry into main).
    pub origin: &'static str,
    /// Origin, CLOCK_MONOTONIC nanoseconds.
    pub origin_ns: u64,
    /// Host-side set-up steps, each with when it ended.
    pub setup_us: Vec<(&'static str, u64)>,
    /// The boot vCPU's first KVM_RUN: the end of host-side set-up.
    pub first_kvm_run_us: Option<u64>,
    /// The guest kernel's `start_kernel()` (debug-port mark 0x01).
    pub kernel_start_us: Option<u64>,
    /// The guest's init was executed and is about to run (mark 0x02).
    pub init_start_us: Option<u64>,
    /// The agent said it is ready (its vsock ready signal, mark 0x03).
    pub ready_us: Option<u64>,
    /// Every debug-port write, in order: (value, microseconds).
    pub marks: Vec<(u8, u64)>,
    /// When the VM ended.
    pub exit_us: Option<u64>,
    /// The VMM's resident memory, less guest memory, at exit (KiB).
    pub vmm_rss_kib: Option<u64>,
    /// CPU time of the vCPU threads at exit (guest time, including KVM's
    /// emulation of it, plus [`Self::device_us`]).
    pub vcpu_cpu_us: Option<u64>,
    /// Time the vCPU threads spent in the VMM's device models (MMIO and
    /// port I/O exits: virtio-fs requests are served there): host-side
    /// work done on guest threads.
    pub device_us: Option<u64>,
    /// CPU time of every thread of the VMM at exit, by name (its
    /// `comm`), summed over threads of one name: where the host-side time
    /// outside the vCPUs goes.
    pub threads_cpu_us: Vec<(String, u64)>,
    /// CPU time of the whole VMM process at exit, threads that ended
    /// included.
    pub process_cpu_us: Option<u64>,
    /// CPU time the VMM spent collecting these figures at exit (reading
    /// its /proc files): the measurement's own cost, which a benchmark
    /// leaves out of the host-side time.
    pub timings_cpu_us: Option<u64>,
}

/// This thread's CPU time (nanoseconds).
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// This process's CPU time, all its threads (nanoseconds).
pub fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// Whether the vCPU threads time their device exits (two clock reads,
/// system calls, per exit): only when the timings are written.
pub static MEASURE_DEVICES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Nanoseconds the vCPU threads spent handling device exits.
pub static DEVICE_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// CPU time of this process's vCPU threads (named `husk-vcpu<N>`), from
/// each thread's schedstat (nanoseconds on CPU).
pub fn vcpu_cpu_us() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("husk-vcpu") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total / 1000)
}

/// CPU time of this process's threads (schedstat, on-CPU time), summed
/// by thread name, in order of first appearance.
pub fn threads_cpu_us() -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let name = comm.trim().to_string();
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, us)) => *us += ns / 1000,
            None => out.push((name, ns / 1000)),
        }
    }
    out
}

/// Boot times, recorded from any thread.
pub struct Clock {
    times: Mutex<BootTimes>,
    /// Whether the exit's figures (memory, CPU per thread) are wanted:
    /// reading them costs every VM's end a few hundred µs of /proc work.
    collect: std::sync::atomic::AtomicBool,
}

impl Clock {
    /// Starts the clock at the launcher's spawn time if the environment
    /// gives one, else now.
    pub fn from_env() -> Self {
        let launch = std::env::var(LAUNCH_TIME_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&t| t <= monotonic_ns());
        let (origin, origin_ns) = match launch {
            Some(t) => ("launch", t),
            None => ("main", monotonic_ns()),
        };
        Self {
            times: Mutex::new(BootTimes {
                origin,
                origin_ns,
                ..Default::default()
            }),
            collect: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Has [`Self::exit`] collect the VMM's memory and CPU figures (the
    /// timings are written somewhere).
    pub fn collect_at_exit(&self) {
        self.collect
            .store(true, std::sync::atomic::Ordering::Relaxed);
        MEASURE_DEVICES.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BootTimes> {
        self.times.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn since_origin(t: &BootTimes) -> u64 {
        monotonic_ns().saturating_sub(t.origin_ns) / 1000
    }

    /// Records the end of a named host-side set-up step.
    pub fn setup_step(&self, name: &'static str) {
        let mut t = self.lock();
        let now = Self::since_origin(&t);
        t.setup_us.push((name, now));
    }

    /// Records the first KVM_RUN (only the first call counts).
    pub fn first_kvm_run(&self) {
        let mut t = self.lock();
        if t.first_kvm_run_us.is_none() {
            t.first_kvm_run_us = Some(Self::since_origin(&t));
        }
    }

    /// Records a value the guest wrote to the debug port.
    pub fn mark(&self, value: u8) {
        let mut t = self.lock();
        let now = Self::since_origin(&t);
        t.marks.push((value, now));
        match value {
            husk_protocol::marks::MARK_KERNEL_START => {
                t.kernel_start_us.get_or_insert(now);
            }
            husk_protocol::marks::MARK_INIT_START => {
                t.init_start_us.get_or_insert(now);
            }
            husk_protocol::marks::READY_MARK => {
                t.ready_us.get_or_insert(now);
            }
            _ => {}
        }
    }

    /// Records the end of the VM and, where wanted
    /// ([`Self::collect_at_exit`]), the VMM's own memory (outside the
    /// guest's `ranges`) and CPU time.
    pub fn exit(&self, ranges: &[(u64, u64)]) {
        let mut t = self.lock();
        t.exit_us = Some(Self::since_origin(&t));
        t.device_us = Some(DEVICE_NS.load(std::sync::atomic::Ordering::Relaxed) / 1000);
        if !self.collect.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let before = thread_cpu_ns();
        t.process_cpu_us = Some(process_cpu_ns() / 1000);
        t.vmm_rss_kib = rss_excluding(ranges);
        t.vcpu_cpu_us = vcpu_cpu_us();
        t.threads_cpu_us = threads_cpu_us();
        t.timings_cpu_us = Some(thread_cpu_ns().saturating_sub(before) / 1000);
    }

    /// A copy of what was recorded.
    pub fn snapshot(&self) -> BootTimes {
        self.lock().clone()
    }
}

/// Resident memory of this process outside the given host ranges (guest
/// memory), in KiB, from /proc/self/smaps.
pub fn rss_excluding(ranges: &[(u64, u64)]) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    Some(rss_excluding_in(&smaps, ranges))
}

fn rss_excluding_in(smaps: &str, ranges: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut counted = true;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, _)) = first.split_once('-')
            && let Ok(start) = u64::from_str_radix(start, 16)
        {
            counted = !ranges.iter().any(|&(s, len)| start >= s && start < s + len);
        } else if let Some(rest) = line.strip_prefix("Rss:")
            && counted
        {
            total += rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_fill_the_named_phases_once() {
        let clock = Clock::from_env();
        clock.first_kvm_run();
        clock.mark(0x01);
        clock.mark(0x02);
        clock.mark(0x02);
        clock.first_kvm_run();
        let t = clock.snapshot();
        assert!(t.first_kvm_run_us.is_some());
        assert!(t.kernel_start_us.unwrap() <= t.init_start_us.unwrap());
        assert_eq!(t.marks.len(), 3);
        assert_eq!(t.marks[0].0, 1);
    }

    #[test]
    fn guest_ranges_are_left_out_of_rss() {
        let smaps = "\
00400000-00500000 r-xp 00000000 08:01 1 /bin/husk-vmm
Size:               1024 kB
Rss:                 300 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:               50000 kB
7fff00000000-7fff00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
";
        assert_eq!(rss_excluding_in(smaps, &[]), 50312);
        assert_eq!(
            rss_excluding_in(smaps, &[(0x7f00_0000_0000, 128 << 20)]),
            312
        );
    }
}
