//! Through containerd, in one run: `ctr run --rm IMAGE ID true` (create,
//! start, wait, delete) with husk, runc and gVisor's runsc as the runc v2
//! shim's binary, p50 and p90 of wall time; and `husk exec ID true` into a
//! running container, split into host-side CPU time (husk exec, and the
//! VMM's threads other than its vCPUs) and guest time (the vCPU threads).
//!
//! A containerd of its own is started in a temporary directory (the test
//! suite's way, husk/tests/containerd.rs); the image is the busybox one
//! husk writes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use husk_bench::percentile;

#[derive(Parser)]
#[command(about = "ctr run of `true` with husk, runc and runsc; husk exec host/guest split")]
struct Args {
    /// The husk binary.
    #[arg(long, default_value = "target/release/husk")]
    husk: PathBuf,
    /// Measured runs per runtime.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// husk's warm-start cache.
    #[arg(long, default_value = "/var/lib/husk")]
    warm_cache: PathBuf,
}

struct Containerd {
    dir: PathBuf,
    child: Child,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let _ = self.child.wait();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("root"))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ctr(sock: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run ctr")?;
    if !out.status.success() {
        bail!(
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// CPU time (ms) of `pid`'s threads whose names start (or not) with
/// `husk-vcpu`.
fn thread_cpu_ms(pid: u32, vcpu: bool) -> f64 {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("husk-vcpu") != vcpu {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e6
}

fn stats(v: &[f64]) -> (f64, f64) {
    let mut v = v.to_vec();
    (percentile(&mut v, 50.0), percentile(&mut v, 90.0))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let husk = args.husk.canonicalize().context("the husk binary")?;
    let dir = std::env::temp_dir().join(format!("husk-bench-ctr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("containerd.sock");
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n",
            d = dir.display()
        ),
    )?;
    let child = Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .env("HUSK_WARM_CACHE", &args.warm_cache)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start containerd")?;
    let ctd = Containerd {
        dir: dir.clone(),
        child,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!("containerd did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let archive = dir.join("busybox.tar");
    let made = Command::new(&husk)
        .args(["busybox-image", "--output"])
        .arg(&archive)
        .output()?;
    if !made.status.success() {
        bail!("husk busybox-image failed");
    }
    ctr(&sock, &["images", "import", archive.to_str().unwrap()])?;
    let image = "docker.io/husk/busybox:latest";

    println!("| runtime (runc v2 shim's binary) | runs | ctr run --rm true p50 ms | p90 ms |");
    println!("|---|---|---|---|");
    // runsc refuses a container without a network namespace of its own
    // unless its network is off; the shim runs the binary it is given.
    let runsc = dir.join("runsc-network-none");
    std::fs::write(
        &runsc,
        "#!/bin/sh\nexec /usr/bin/runsc --network=none \"$@\"\n",
    )?;
    std::fs::set_permissions(&runsc, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    for (name, binary) in [
        ("husk", husk.clone()),
        ("runc", PathBuf::from("/usr/bin/runc")),
        ("runsc --network=none", runsc.clone()),
    ] {
        if name.starts_with("runsc") && !Path::new("/usr/bin/runsc").exists() {
            println!("| {name} | not installed | | |");
            continue;
        }
        if !binary.exists() {
            println!("| {name} | not installed | | |");
            continue;
        }
        let mut wall = Vec::new();
        let mut failed = None;
        for i in 0..=args.runs {
            let id = format!("bench-{}-{i}", name.split(' ').next().unwrap_or(name));
            let start = Instant::now();
            let r = ctr(
                &sock,
                &[
                    "run",
                    "--rm",
                    "--runtime",
                    "io.containerd.runc.v2",
                    "--runc-binary",
                    binary.to_str().unwrap(),
                    image,
                    &id,
                    "true",
                ],
            );
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            match r {
                Ok(()) if i > 0 => wall.push(ms),
                Ok(()) => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            Some(e) => println!("| {name} | failed: {e:#} | | |"),
            None => {
                let (p50, p90) = stats(&wall);
                println!("| {name} | {} | {p50:.1} | {p90:.1} |", wall.len());
            }
        }
    }

    // husk exec into a running container (husk's own CLI, no containerd).
    let root = dir.join("husk-root");
    let bundle = dir.join("bundle");
    let made = Command::new(&husk)
        .arg("busybox-bundle")
        .arg(&bundle)
        .args(["--", "sleep", "1000"])
        .status()?;
    if !made.success() {
        bail!("husk busybox-bundle failed");
    }
    let husk_cmd = |a: &[&str]| {
        let mut c = Command::new(&husk);
        c.env("HUSK_WARM_CACHE", &args.warm_cache)
            .arg("--root")
            .arg(&root)
            .args(a)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let up = husk_cmd(&[
        "run",
        "-d",
        "--bundle",
        bundle.to_str().unwrap(),
        "exec-bench",
    ])
    .status()?;
    if !up.success() {
        bail!("husk run -d failed");
    }
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("containers/exec-bench/state.json"),
    )?)?;
    let vmm = state["vmm"]["pid"].as_u64().context("the VMM's pid")? as u32;
    let (mut wall, mut host, mut guest) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=args.runs {
        let (vcpu0, other0) = (thread_cpu_ms(vmm, true), thread_cpu_ms(vmm, false));
        let start = Instant::now();
        let child = husk_cmd(&["exec", "exec-bench", "true"]).spawn()?;
        let (code, husk_ms) = husk_bench::wait_rusage(child.id())?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let (vcpu1, other1) = (thread_cpu_ms(vmm, true), thread_cpu_ms(vmm, false));
        if code != 0 {
            bail!("husk exec exited {code}");
        }
        if i > 0 {
            wall.push(ms);
            host.push(husk_ms + (other1 - other0));
            guest.push(vcpu1 - vcpu0);
        }
    }
    let _ = husk_cmd(&["delete", "--force", "exec-bench"]).status();
    let (w50, w90) = stats(&wall);
    let (h50, h90) = stats(&host);
    let (g50, g90) = stats(&guest);
    println!();
    println!(
        "| husk exec true | runs | wall p50 ms | wall p90 ms | host-side p50 ms | host-side p90 ms | guest p50 ms | guest p90 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| husk exec | {} | {w50:.1} | {w90:.1} | {h50:.2} | {h90:.2} | {g50:.1} | {g90:.1} |",
        wall.len()
    );
    drop(ctd);
    Ok(())
}
