//! Boot benchmark: husk-vmm against QEMU `-M microvm`, same kernel, same
//! initramfs, same guest shape, runs interleaved in one process so both see
//! the same machine load.
//!
//! For every run it reports, measured from the moment the launcher spawns
//! the VMM:
//! - husk only, from the VMM's own timings file (debug-port marks):
//!   first KVM_RUN (host-side set-up), guest `start_kernel()`, init exec;
//! - both, measured the same way from outside: the test init's first
//!   console line, the process's end, and the VMM's resident memory other
//!   than guest RAM at the moment that line appears (from /proc/PID/smaps).
//!
//! Prints p50 and p90 of each and the husk/QEMU ratios.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Boot-time benchmark: husk-vmm vs QEMU microvm")]
struct Args {
    /// Boots per VMM.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest kernel (default: the cached build).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs with the test init.
    #[arg(long)]
    initramfs: PathBuf,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// husk-vmm binary (default: next to this one).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Skip the QEMU baseline.
    #[arg(long)]
    no_qemu: bool,
}

/// The test init's first line: the guest's user space is running.
const INIT_LINE: &str = "husk-test-init: started";
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Default, Debug)]
struct Run {
    first_kvm_run_ms: Option<f64>,
    kernel_start_ms: Option<f64>,
    init_exec_ms: Option<f64>,
    init_line_ms: f64,
    exit_ms: f64,
    rss_kib: Option<u64>,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into our timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Resident memory of `pid` outside mappings at least `guest_bytes` large.
fn rss_without_guest(pid: u32, guest_bytes: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut size_kib = 0;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size_kib = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Rss:")
            && size_kib * 1024 < guest_bytes
        {
            total += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    Some(total)
}

/// Spawns `cmd`, watches its stdout for the init line, returns the timings.
fn timed_boot(mut cmd: Command, guest_bytes: u64) -> anyhow::Result<(Run, u64)> {
    let t0 = monotonic_ns();
    let start = Instant::now();
    cmd.env("HUSK_LAUNCH_TIME_NS", t0.to_string());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(INIT_LINE) {
                let _ = tx.send(Instant::now());
            }
        }
    });
    let seen = rx
        .recv_timeout(RUN_TIMEOUT)
        .context("the guest never printed its init line")?;
    let rss = rss_without_guest(pid, guest_bytes);
    let status = child.wait()?;
    let end = Instant::now();
    if !status.success() {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err)?;
        // QEMU exits non-zero after -no-reboot only on real failures.
        bail!("{cmd:?} failed with {status}: {err}");
    }
    let run = Run {
        init_line_ms: (seen - start).as_secs_f64() * 1e3,
        exit_ms: (end - start).as_secs_f64() * 1e3,
        rss_kib: rss,
        ..Default::default()
    };
    Ok((run, t0))
}

fn husk_run(args: &Args, vmm: &Path, kernel: &Path, dir: &Path) -> anyhow::Result<Run> {
    let timings = dir.join("timings.json");
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(&args.initramfs)
        .arg("--memory")
        .arg(args.memory.to_string())
        .arg("--cpus")
        .arg(args.cpus.to_string())
        .arg("--timings")
        .arg(&timings);
    let (mut run, _) = timed_boot(cmd, args.memory << 20)?;
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&timings)?)?;
    let ms = |k: &str| t[k].as_u64().map(|us| us as f64 / 1e3);
    run.first_kvm_run_ms = ms("first_kvm_run_us");
    run.kernel_start_ms = ms("kernel_start_us");
    run.init_exec_ms = ms("init_start_us");
    Ok(run)
}

fn qemu_run(args: &Args, kernel: &Path, cmdline: &str) -> anyhow::Result<Run> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-accel",
        "kvm",
        "-cpu",
        "max,-arch-capabilities",
        "-m",
        &args.memory.to_string(),
        "-smp",
        &args.cpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
    ])
    .arg(kernel)
    .arg("-initrd")
    .arg(&args.initramfs)
    .arg("-append")
    .arg(cmdline);
    Ok(timed_boot(cmd, args.memory << 20)?.0)
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = ((p / 100.0) * (values.len() as f64 - 1.0)).round() as usize;
    values[rank]
}

fn row(name: &str, husk: &[Option<f64>], qemu: &[Option<f64>]) {
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vmm = args
        .vmm
        .clone()
        .unwrap_or_else(|| std::env::current_exe().unwrap().with_file_name("husk-vmm"));
    let kernel = args
        .kernel
        .clone()
        .unwrap_or_else(husk_vmm::paths::default_kernel);
    let kernel = std::fs::canonicalize(&kernel)
        .with_context(|| format!("no kernel at {}", kernel.display()))?;
    let dir = std::env::temp_dir().join(format!("husk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // QEMU gets the command line husk-vmm gives the guest on this host, so
    // both boot the same kernel the same way.
    let emulated = husk_vmm::host::kernel_mode_emulated();
    let cmdline = husk_vmm::vm::kernel_cmdline("", emulated);

    let (mut husk, mut qemu) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        let h = husk_run(&args, &vmm, &kernel, &dir)?;
        eprintln!("run {i}: husk {h:?}");
        husk.push(h);
        if !args.no_qemu {
            let q = qemu_run(&args, &kernel, &cmdline)?;
            eprintln!("run {i}: qemu {q:?}");
            qemu.push(q);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\nkernel {}, {} vCPU, {} MiB, {} runs each, guest kernel mode {}\n",
        kernel.display(),
        args.cpus,
        args.memory,
        args.runs,
        if emulated {
            "emulated (no VMX/SVM)"
        } else {
            "hardware-virtualized"
        }
    );
    println!(
        "| ms from spawn (RSS in KiB) | husk p50 | husk p90 | QEMU p50 | QEMU p90 | husk/QEMU |"
    );
    println!("|---|---|---|---|---|---|");
    let pick = |v: &[Run], f: fn(&Run) -> Option<f64>| v.iter().map(f).collect::<Vec<_>>();
    row(
        "first KVM_RUN (host set-up)",
        &pick(&husk, |r| r.first_kvm_run_ms),
        &[],
    );
    row(
        "guest start_kernel()",
        &pick(&husk, |r| r.kernel_start_ms),
        &[],
    );
    row(
        "init exec'd (debug-port mark)",
        &pick(&husk, |r| r.init_exec_ms),
        &[],
    );
    row(
        "init's first console line",
        &pick(&husk, |r| Some(r.init_line_ms)),
        &pick(&qemu, |r| Some(r.init_line_ms)),
    );
    row(
        "VMM exit after power-off",
        &pick(&husk, |r| Some(r.exit_ms)),
        &pick(&qemu, |r| Some(r.exit_ms)),
    );
    row(
        "VMM RSS without guest RAM",
        &pick(&husk, |r| r.rss_kib.map(|k| k as f64)),
        &pick(&qemu, |r| r.rss_kib.map(|k| k as f64)),
    );
    Ok(())
}
