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
use husk_bench::{QEMU_MICROVM, monotonic_ns, row, rss_without_guest, vmm_binary};

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
    /// Back-to-back runs of the host set-up benchmark (null guest).
    #[arg(long, default_value_t = 30)]
    setup_runs: usize,
}

/// The test init's first line: the guest's user space is running.
const INIT_LINE: &str = "husk-test-init: started";
const RUN_TIMEOUT: Duration = Duration::from_secs(900);
/// Pause after each boot: the host tears a VM down after its process has
/// exited, and that work must not land in the next run's set-up.
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Default, Debug)]
struct Run {
    setup_steps_ms: Vec<(String, f64)>,
    first_kvm_run_ms: Option<f64>,
    kernel_start_ms: Option<f64>,
    init_exec_ms: Option<f64>,
    init_line_ms: f64,
    exit_ms: f64,
    rss_kib: Option<u64>,
    self_rss_kib: Option<u64>,
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
    if let Some(steps) = t["setup_us"].as_array() {
        for step in steps {
            let name = step[0].as_str().unwrap_or("?").to_string();
            run.setup_steps_ms
                .push((name, step[1].as_u64().unwrap_or(0) as f64 / 1e3));
        }
    }
    run.kernel_start_ms = ms("kernel_start_us");
    run.self_rss_kib = t["vmm_rss_kib"].as_u64();
    run.init_exec_ms = ms("init_start_us");
    Ok(run)
}

fn qemu_run(args: &Args, kernel: &Path, cmdline: &str) -> anyhow::Result<Run> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(QEMU_MICROVM)
        .args([
            "-m",
            &args.memory.to_string(),
            "-smp",
            &args.cpus.to_string(),
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

/// The guest code of the set-up benchmark, 32-bit protected mode:
/// `mov al, 0x10; mov dx, 0x3f0; out dx, al; hlt` — a power-off on Husk's
/// debug port (QEMU's isa-debug-exit device sits on the same port there).
const NULL_GUEST: [u8; 8] = [0xb0, 0x10, 0x66, 0xba, 0xf0, 0x03, 0xee, 0xf4];

/// A copy of `kernel` whose PVH entry point powers the guest off at once:
/// the VMM loads exactly the real kernel file, and the guest runs no code
/// of its own, so the run measures host-side set-up and tear-down alone.
fn null_guest_kernel(kernel: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 20)])?;
    let entry = husk_vmm::boot::load_kernel(&mem, kernel)?.entry.0;
    let mut elf = std::fs::read(kernel)?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (
        u64_at(&elf, 32) as usize,
        u16_at(&elf, 54),
        u16_at(&elf, 56),
    );
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (kind, offset, paddr, filesz) = (
            u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()),
            u64_at(&elf, ph + 8),
            u64_at(&elf, ph + 24),
            u64_at(&elf, ph + 32),
        );
        if kind == 1 && (paddr..paddr + filesz).contains(&entry) {
            let at = (offset + entry - paddr) as usize;
            elf[at..at + NULL_GUEST.len()].copy_from_slice(&NULL_GUEST);
            let path = dir.join("vmlinux-null-guest");
            std::fs::write(&path, &elf)?;
            return Ok(path);
        }
    }
    bail!(
        "the PVH entry {entry:#x} is in no loadable segment of {}",
        kernel.display()
    )
}

/// One run of the null guest: (spawn to first KVM_RUN, spawn to exit) in
/// ms, and the set-up steps.
fn husk_null_run(vmm: &Path, kernel: &Path, dir: &Path) -> anyhow::Result<Run> {
    let timings = dir.join("null-timings.json");
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--timings")
        .arg(&timings);
    let t0 = monotonic_ns();
    let start = Instant::now();
    let out = cmd
        .env("HUSK_LAUNCH_TIME_NS", t0.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    let exit_ms = start.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "null guest failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&timings)?)?;
    let mut run = Run {
        exit_ms,
        first_kvm_run_ms: t["first_kvm_run_us"].as_u64().map(|us| us as f64 / 1e3),
        self_rss_kib: t["vmm_rss_kib"].as_u64(),
        ..Default::default()
    };
    if let Some(steps) = t["setup_us"].as_array() {
        for step in steps {
            let name = step[0].as_str().unwrap_or("?").to_string();
            run.setup_steps_ms
                .push((name, step[1].as_u64().unwrap_or(0) as f64 / 1e3));
        }
    }
    Ok(run)
}

/// The same null guest under QEMU microvm, ended by isa-debug-exit: spawn
/// to exit in ms.
fn qemu_null_run(kernel: &Path) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = Command::new("qemu-system-x86_64")
        .args(QEMU_MICROVM)
        .args([
            "-m",
            "128",
            "-display",
            "none",
            "-device",
            "isa-debug-exit,iobase=0x3f0,iosize=1",
            "-kernel",
        ])
        .arg(kernel)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    // isa-debug-exit ends QEMU with (value << 1) | 1.
    if out.status.code() != Some((0x10 << 1) | 1) {
        bail!(
            "QEMU null guest ended with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(ms)
}

fn setup_benchmark(args: &Args, vmm: &Path, kernel: &Path, dir: &Path) -> anyhow::Result<()> {
    let null = null_guest_kernel(kernel, dir)?;
    let (mut husk, mut qemu) = (Vec::new(), Vec::new());
    for _ in 0..args.setup_runs {
        husk.push(husk_null_run(vmm, &null, dir)?);
        if !args.no_qemu {
            qemu.push(Some(qemu_null_run(&null)?));
        }
    }
    println!(
        "\nHost set-up: the real kernel file with its PVH entry patched to power \
         off at once, {} back-to-back runs each\n",
        args.setup_runs
    );
    println!(
        "| ms from spawn (RSS in KiB) | husk p50 | husk p90 | QEMU p50 | QEMU p90 | husk/QEMU |"
    );
    println!("|---|---|---|---|---|---|");
    if let Some(first) = husk.first() {
        for (i, (name, _)) in first.setup_steps_ms.iter().enumerate() {
            let steps: Vec<Option<f64>> = husk
                .iter()
                .map(|r| r.setup_steps_ms.get(i).map(|s| s.1))
                .collect();
            row(&format!("set-up step `{name}` done"), &steps, &[]);
        }
    }
    let pick = |f: fn(&Run) -> Option<f64>| husk.iter().map(f).collect::<Vec<_>>();
    row("first KVM_RUN", &pick(|r| r.first_kvm_run_ms), &[]);
    row(
        "VMM exited (guest powered off)",
        &pick(|r| Some(r.exit_ms)),
        &qemu,
    );
    row(
        "VMM RSS without guest RAM (husk-vmm's own count)",
        &pick(|r| r.self_rss_kib.map(|k| k as f64)),
        &[],
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vmm = vmm_binary(args.vmm.clone());
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

    if args.setup_runs > 0 {
        setup_benchmark(&args, &vmm, &kernel, &dir)?;
    }

    let (mut husk, mut qemu) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        std::thread::sleep(SETTLE);
        let h = husk_run(&args, &vmm, &kernel, &dir)?;
        eprintln!("run {i}: husk {h:?}");
        husk.push(h);
        if !args.no_qemu {
            std::thread::sleep(SETTLE);
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
    row(
        "VMM RSS without guest RAM, at exit (husk-vmm's own count)",
        &pick(&husk, |r| r.self_rss_kib.map(|k| k as f64)),
        &[],
    );
    Ok(())
}
