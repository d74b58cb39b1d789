//! Shared pieces of Husk's benchmark programs: clocks, percentiles, the
//! table rows they print, and memory accounting from /proc.

pub use husk_vmm::timing::monotonic_ns;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};

/// QEMU microvm as the baselines run it: KVM, the CPU model that works on
/// these hosts (../shared/HOST-KVM.md), no default devices or config.
pub const QEMU_MICROVM: &[&str] = &[
    "-M",
    "microvm,x-option-roms=off,rtc=off",
    "-accel",
    "kvm",
    "-cpu",
    "max,-arch-capabilities",
    "-nodefaults",
    "-no-user-config",
];

/// The husk-vmm to measure: the one given, else the one next to the
/// benchmark binary.
pub fn vmm_binary(given: Option<std::path::PathBuf>) -> std::path::PathBuf {
    given.unwrap_or_else(|| {
        std::env::current_exe()
            .expect("the benchmark knows its own path")
            .with_file_name("husk-vmm")
    })
}

/// Resident memory of `pid` outside guest RAM, in KiB. Guest RAM is a run
/// of adjacent mappings at least `guest_bytes` long: one mapping in QEMU,
/// several in husk-vmm, which maps the kernel's pages from its file into
/// the middle of it. (A guard page or thread stack that happens to sit
/// right beside guest RAM is left out too: a few KiB.)
pub fn rss_without_guest(pid: u32, guest_bytes: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    // (start, end, rss KiB) of every mapping, in address order.
    let mut maps: Vec<(u64, u64, u64)> = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            maps.push((a, b, 0));
        } else if let Some(v) = line.strip_prefix("Rss:")
            && let Some(last) = maps.last_mut()
        {
            last.2 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        }
    }
    let mut total = 0;
    let mut i = 0;
    while i < maps.len() {
        let mut j = i;
        while j + 1 < maps.len() && maps[j + 1].0 == maps[j].1 {
            j += 1;
        }
        if maps[j].1 - maps[i].0 < guest_bytes {
            total += maps[i..=j].iter().map(|m| m.2).sum::<u64>();
        }
        i = j + 1;
    }
    Some(total)
}

pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = ((p / 100.0) * (values.len() as f64 - 1.0)).round() as usize;
    values[rank]
}

pub fn row(name: &str, husk: &[Option<f64>], qemu: &[Option<f64>]) {
    let collect = |v: &[Option<f64>]| -> Vec<f64> { v.iter().flatten().copied().collect() };
    let (mut h, mut q) = (collect(husk), collect(qemu));
    let fmt = |v: &mut Vec<f64>| {
        if v.is_empty() {
            ("-".to_string(), "-".to_string(), None)
        } else {
            let p50 = percentile(v, 50.0);
            (
                format!("{p50:.1}"),
                format!("{:.1}", percentile(v, 90.0)),
                Some(p50),
            )
        }
    };
    let (h50, h90, hp) = fmt(&mut h);
    let (q50, q90, qp) = fmt(&mut q);
    let ratio = match (hp, qp) {
        (Some(h), Some(q)) if q > 0.0 => format!("{:.2}x", h / q),
        _ => "-".into(),
    };
    println!("| {name} | {h50} | {h90} | {q50} | {q90} | {ratio} |");
}

/// CPU time of a reaped child and its reaped descendants, and its status.
pub fn wait_rusage(pid: u32) -> anyhow::Result<(i32, f64)> {
    let mut status = 0;
    // SAFETY: wait4 writes the status and a zeroed rusage.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::wait4(pid as i32, &mut status, 0, &mut u) < 0 {
            bail!("wait4: {}", std::io::Error::last_os_error());
        }
        u
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((
        libc::WEXITSTATUS(status),
        (s(usage.ru_utime) + s(usage.ru_stime)) * 1000.0,
    ))
}

/// One timed run of a runtime.
pub struct Sample {
    /// Wall time.
    pub wall_ms: f64,
    /// CPU time outside the guest (husk with HUSK_TIMINGS only).
    pub host_ms: Option<f64>,
    /// vCPU time less the device models (husk only).
    pub guest_ms: Option<f64>,
}

pub fn json_u64(path: &Path, key: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v.get(key)?.as_u64().map(|x| x as f64 / 1000.0)
}

/// Runs `cmd` to completion: wall time, and with `timings` (the
/// `HUSK_TIMINGS` prefix husk was given) its host-side and guest time.
pub fn one_run(runtime: &str, cmd: &mut Command, timings: Option<&Path>) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {runtime}"))?;
    let pid = child.id();
    let mut stderr = child.stderr;
    let said = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = std::io::Read::read_to_string(e, &mut s);
        }
        s
    });
    let (code, cpu_ms) = wait_rusage(pid)?;
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    let said = said.join().unwrap_or_default();
    if code != 0 {
        bail!("{runtime} exited {code}: {}", said.trim());
    }
    let (host_ms, guest_ms) = match timings {
        Some(prefix) => {
            let vmm = prefix.with_extension("vmm.json");
            let vcpu = json_u64(&vmm, "vcpu_cpu_us");
            let device = json_u64(&vmm, "device_us");
            // The VMM's reading of its own figures at exit is the
            // measurement's cost, not husk's.
            let measuring = json_u64(&vmm, "timings_cpu_us").unwrap_or(0.0);
            match (vcpu, device) {
                (Some(v), Some(d)) => (Some(cpu_ms - (v - d) - measuring), Some(v - d)),
                _ => (None, None),
            }
        }
        None => (None, None),
    };
    Ok(Sample {
        wall_ms,
        host_ms,
        guest_ms,
    })
}
