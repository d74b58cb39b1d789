//! `husk run` against crun, runc and gVisor's runsc, in one run, on the
//! same busybox bundle running `true`: wall time per run (p50, p90), and for
//! husk the split of its CPU time into host-side work (the runtime, the
//! VMM's own threads, and the device models the vCPU threads run) and guest
//! time (the vCPU threads, less the device models).
//!
//! Each runtime gets one warm-up run (husk's makes its warm-start snapshot
//! if the cache has none), then `--runs` measured runs, one after another.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::Parser;
use husk_bench::{one_run, percentile};

#[derive(Parser)]
#[command(about = "husk run vs crun, runc and runsc on a busybox bundle running `true`")]
struct Args {
    /// The husk binary.
    #[arg(long, default_value = "target/release/husk")]
    husk: PathBuf,
    /// The husk-vmm binary husk should use.
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Measured runs per runtime.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Another husk-vmm binary (say, an earlier build) run right after
    /// `--vmm`, in the same run: its row is the baseline of a change to the
    /// VMM.
    #[arg(long)]
    baseline_vmm: Option<PathBuf>,
    /// husk's root (its warm-start cache lives there).
    #[arg(long, default_value = "/var/lib/husk")]
    root: PathBuf,
}

fn stats(values: &[f64]) -> (f64, f64) {
    let mut v = values.to_vec();
    (percentile(&mut v, 50.0), percentile(&mut v, 90.0))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let work = std::env::temp_dir().join(format!("husk-bench-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let bundle = work.join("bundle");
    let made = Command::new(&args.husk)
        .arg("busybox-bundle")
        .arg(&bundle)
        .args(["--", "true"])
        .status()
        .context("run husk busybox-bundle")?;
    if !made.success() {
        bail!("husk busybox-bundle failed");
    }
    println!(
        "| runtime | runs | wall p50 ms | wall p90 ms | host-side p50 ms | host-side p90 ms | guest p50 ms | guest p90 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut runtimes = vec![("husk", args.vmm.clone())];
    if let Some(baseline) = &args.baseline_vmm {
        runtimes.push(("husk (baseline VMM)", Some(baseline.clone())));
    }
    runtimes.extend(["crun", "runc", "runsc"].map(|r| (r, None)));
    for (label, vmm) in runtimes {
        let runtime = if label.starts_with("husk") {
            "husk"
        } else {
            label
        };
        let binary = if runtime == "husk" {
            args.husk.clone()
        } else {
            match which(runtime) {
                Some(p) => p,
                None => {
                    println!("| {runtime} | not installed | | | | | | |");
                    continue;
                }
            }
        };
        let root = if runtime == "husk" {
            args.root.clone()
        } else {
            work.join(format!("root-{runtime}"))
        };
        let mut samples = Vec::new();
        let mut failure = None;
        for i in 0..=args.runs {
            let id = format!("bench-{}-{i}", std::process::id());
            let mut cmd = Command::new(&binary);
            cmd.arg("--root").arg(&root);
            if runtime == "runsc" {
                // The sandbox's own network stack is not what is measured.
                cmd.arg("--network=none");
            }
            if runtime == "crun" {
                // crun refuses this host's hybrid cgroup v1/v2 layout; the
                // others run without a cgroups path in the spec anyway.
                cmd.arg("--cgroup-manager=disabled");
            }
            cmd.arg("run").arg("--bundle").arg(&bundle).arg(&id);
            let timings = work.join(format!("t-{i}"));
            if runtime == "husk" {
                cmd.env("HUSK_TIMINGS", &timings);
                if let Some(vmm) = &vmm {
                    cmd.env("HUSK_VMM", vmm);
                }
            }
            match one_run(runtime, &mut cmd, (runtime == "husk").then_some(&timings)) {
                // Run 0 warms up (husk: makes the snapshot if needed).
                Ok(_) if i == 0 => {}
                Ok(s) => samples.push(s),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            println!("| {label} | failed: {e:#} | | | | | | |");
            continue;
        }
        let wall: Vec<f64> = samples.iter().map(|s| s.wall_ms).collect();
        let host: Vec<f64> = samples.iter().filter_map(|s| s.host_ms).collect();
        let guest: Vec<f64> = samples.iter().filter_map(|s| s.guest_ms).collect();
        let (w50, w90) = stats(&wall);
        let cell = |v: &[f64]| {
            if v.is_empty() {
                ("-".to_string(), "-".to_string())
            } else {
                let (a, b) = stats(v);
                (format!("{a:.1}"), format!("{b:.1}"))
            }
        };
        let (h50, h90) = cell(&host);
        let (g50, g90) = cell(&guest);
        println!(
            "| {label} | {} | {w50:.1} | {w90:.1} | {h50} | {h90} | {g50} | {g90} |",
            samples.len()
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
