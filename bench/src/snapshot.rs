//! Snapshot benchmark: cold boot against restore from a snapshot, and the
//! host memory of idle restored VMs, in one run on one machine.
//!
//! The guest is the test init; "ready" is its first console line (the
//! stand-in for the agent until the agent exists). The snapshot is taken as
//! the kernel executes init (debug-port mark 2), so a restore still runs
//! the init's exec and start-up, like a cold boot's last step.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use husk_bench::{monotonic_ns, row, vmm_binary};

#[derive(Parser)]
#[command(about = "Snapshot benchmark: cold boot vs restore, memory of restored VMs")]
struct Args {
    /// Initramfs with the test init.
    #[arg(long)]
    initramfs: PathBuf,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Cold boots.
    #[arg(long, default_value_t = 3)]
    cold_runs: usize,
    /// Restores, one after the other.
    #[arg(long, default_value_t = 10)]
    restore_runs: usize,
    /// Idle restored VMs kept up together for the memory figure.
    #[arg(long, default_value_t = 10)]
    idle_vms: usize,
    /// husk-vmm binary (default: next to this one).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// An initramfs whose init is husk-agent: adds cold boot vs warm start
    /// to the agent's first answer over vsock.
    #[arg(long)]
    agent_initramfs: Option<PathBuf>,
}

/// Connects to the guest's agent and completes the protocol handshake;
/// retries while the agent is not there yet.
fn agent_answers(socket: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) {
            writeln!(s, "CONNECT {}", husk_protocol::CONTROL_PORT)?;
            // Byte by byte: the agent's first frame may follow the line
            // at once, and a buffered reader would swallow it.
            let mut line = Vec::new();
            let mut byte = [0u8];
            while s.read(&mut byte)? == 1 {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
            if line.starts_with(b"OK ") {
                husk_protocol::handshake(&mut s, "husk-bench")?;
                husk_protocol::write_frame(&mut s, &husk_protocol::Request::Shutdown)?;
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the agent never answered");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Cold boots and warm starts of the agent: spawn to its first answer.
fn agent_benchmark(args: &Args, vmm: &Path, initramfs: &Path, dir: &Path) -> anyhow::Result<()> {
    let initramfs = initramfs.to_str().context("initramfs path")?;
    let memory = args.memory.to_string();
    let socket = dir.join("agent.sock");
    let mut cold = Vec::new();
    for _ in 0..args.cold_runs {
        let _ = std::fs::remove_file(&socket);
        let start = Instant::now();
        let mut child = Command::new(vmm)
            .args([
                "--initramfs",
                initramfs,
                "--memory",
                &memory,
                "--vsock-socket",
            ])
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()?;
        agent_answers(&socket)?;
        cold.push(Some(start.elapsed().as_secs_f64() * 1e3));
        child.wait()?;
    }
    let snap = dir.join("agent-snap");
    let boot_socket = dir.join("agent-boot.sock");
    let status = Command::new(vmm)
        .args([
            "--initramfs",
            initramfs,
            "--memory",
            &memory,
            "--vsock-socket",
        ])
        .arg(&boot_socket)
        .arg("--snapshot-dir")
        .arg(&snap)
        .args(["--snapshot-at-mark", &husk_protocol::READY_MARK.to_string()])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("agent snapshot boot failed");
    }
    let mut warm = Vec::new();
    for _ in 0..args.restore_runs {
        let _ = std::fs::remove_file(&socket);
        let start = Instant::now();
        let mut child = Command::new(vmm)
            .arg("--restore")
            .arg(&snap)
            .arg("--vsock-socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()?;
        agent_answers(&socket)?;
        warm.push(Some(start.elapsed().as_secs_f64() * 1e3));
        child.wait()?;
    }
    println!(
        "\n| ms from spawn to the agent's first answer | warm p50 | warm p90 | cold p50 | cold p90 | warm/cold |"
    );
    println!("|---|---|---|---|---|---|");
    row("agent ready (vsock connect + handshake)", &warm, &cold);
    Ok(())
}

const READY_LINE: &str = "husk-test-init: started";
const IDLE_LINE: &str = "husk-test-init: idle";
const TIMEOUT: Duration = Duration::from_secs(600);

/// Console lines the benchmark waits for, with when they appeared.
type Lines = mpsc::Receiver<(String, Instant)>;

/// Spawns husk-vmm, returns the child, its spawn time and a channel that
/// yields the time each watched line appears.
fn spawn(
    vmm: &Path,
    args: &[&str],
    timings: Option<&Path>,
) -> anyhow::Result<(Child, Instant, Lines)> {
    let mut cmd = Command::new(vmm);
    cmd.args(args);
    if let Some(t) = timings {
        cmd.arg("--timings").arg(t);
    }
    let start = Instant::now();
    cmd.env("HUSK_LAUNCH_TIME_NS", monotonic_ns().to_string());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {}", vmm.display()))?;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(READY_LINE) || line.contains(IDLE_LINE) {
                let _ = tx.send((line, Instant::now()));
            }
        }
    });
    Ok((child, start, rx))
}

fn wait_line(rx: &Lines, want: &str) -> anyhow::Result<Instant> {
    loop {
        let (line, at) = rx
            .recv_timeout(TIMEOUT)
            .context("the guest never got ready")?;
        if line.contains(want) {
            return Ok(at);
        }
    }
}

fn timings_ms(path: &Path, key: &str) -> anyhow::Result<Option<f64>> {
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    Ok(t[key].as_u64().map(|us| us as f64 / 1e3))
}

/// PSS and RSS of a process in KiB, from smaps_rollup.
fn pss_rss(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("Pss:")?, field("Rss:")?))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vmm = vmm_binary(args.vmm.clone());
    let dir = std::env::temp_dir().join(format!("husk-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let initramfs = args
        .initramfs
        .to_str()
        .context("initramfs path")?
        .to_string();
    let memory = args.memory.to_string();
    let timings = dir.join("timings.json");

    // Cold boots: spawn to the init's first line.
    let mut cold = Vec::new();
    for _ in 0..args.cold_runs {
        let boot = ["--initramfs", &initramfs, "--memory", &memory];
        let (mut child, start, rx) = spawn(&vmm, &boot, Some(&timings))?;
        let ready = wait_line(&rx, READY_LINE)?;
        if !child.wait()?.success() {
            bail!("cold boot failed");
        }
        cold.push(Some((ready - start).as_secs_f64() * 1e3));
    }

    // Two snapshots at mark 2: one whose init powers off, one that idles.
    let snap = dir.join("snap");
    let idle_snap = dir.join("snap-idle");
    for (path, extra) in [(&snap, ""), (&idle_snap, "-- idle")] {
        let status = Command::new(&vmm)
            .args([
                "--initramfs",
                &initramfs,
                "--memory",
                &memory,
                "--cmdline",
                extra,
            ])
            .arg("--snapshot-dir")
            .arg(path)
            .args(["--snapshot-at-mark", "2"])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("snapshot boot failed");
        }
    }
    let snap_arg = snap.to_str().unwrap().to_string();

    // Restores, one after the other; each beside one with `--no-jail`
    // (the baseline: the VMM in the host's mount namespace), so that the
    // jail's cost is measured in the same run.
    let (mut restore_kvm_run, mut restore_ready, mut restore_exit) = (vec![], vec![], vec![]);
    let mut unjailed_kvm_run = vec![];
    for _ in 0..args.restore_runs {
        let (mut child, start, rx) = spawn(&vmm, &["--restore", &snap_arg], Some(&timings))?;
        let ready = wait_line(&rx, READY_LINE)?;
        if !child.wait()?.success() {
            bail!("restore failed");
        }
        restore_ready.push(Some((ready - start).as_secs_f64() * 1e3));
        restore_kvm_run.push(timings_ms(&timings, "first_kvm_run_us")?);
        restore_exit.push(timings_ms(&timings, "exit_us")?);
        let (mut child, _, rx) =
            spawn(&vmm, &["--restore", &snap_arg, "--no-jail"], Some(&timings))?;
        wait_line(&rx, READY_LINE)?;
        if !child.wait()?.success() {
            bail!("restore without the jail failed");
        }
        unjailed_kvm_run.push(timings_ms(&timings, "first_kvm_run_us")?);
    }

    // Memory: one idle restored VM alone, then `idle_vms` together.
    let idle_arg = idle_snap.to_str().unwrap().to_string();
    let measure = |n: usize| -> anyhow::Result<(u64, u64)> {
        let mut children = Vec::new();
        for _ in 0..n {
            let (child, _, rx) = spawn(&vmm, &["--restore", &idle_arg], None)?;
            wait_line(&rx, IDLE_LINE)?;
            children.push(child);
        }
        std::thread::sleep(Duration::from_millis(500));
        let (mut pss, mut rss) = (0, 0);
        for c in &children {
            let (p, r) = pss_rss(c.id()).context("reading smaps_rollup")?;
            pss += p;
            rss += r;
        }
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok((pss, rss))
    };
    let (one_pss, one_rss) = measure(1)?;
    let (many_pss, many_rss) = measure(args.idle_vms)?;
    if let Some(agent) = &args.agent_initramfs {
        agent_benchmark(&args, &vmm, agent, &dir)?;
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\n{} MiB guest, 1 vCPU; {} cold boots, {} restores, {} idle restored VMs\n",
        args.memory, args.cold_runs, args.restore_runs, args.idle_vms
    );
    println!(
        "| ms from spawn | restore p50 | restore p90 | cold boot p50 | cold boot p90 | restore/cold |"
    );
    println!("|---|---|---|---|---|---|");
    row("first KVM_RUN (host-side restore)", &restore_kvm_run, &[]);
    row(
        "first KVM_RUN, --no-jail (baseline)",
        &unjailed_kvm_run,
        &[],
    );
    row("init's first console line (ready)", &restore_ready, &cold);
    row("VMM exit after power-off", &restore_exit, &[]);
    println!(
        "\n| host memory of idle restored VMs (KiB) | 1 VM | {} VMs | ratio |",
        args.idle_vms
    );
    println!("|---|---|---|---|");
    println!(
        "| PSS (shared pages split among sharers) | {one_pss} | {many_pss} | {:.2}x |",
        many_pss as f64 / one_pss as f64
    );
    println!(
        "| RSS (shared pages counted in each) | {one_rss} | {many_rss} | {:.2}x |",
        many_rss as f64 / one_rss as f64
    );
    Ok(())
}
