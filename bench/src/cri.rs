//! Kubernetes through containerd's CRI, in one run on one containerd
//! (the CRI tests' harness, tests/cri):
//!
//! 1. a one-container pod's start, RunPodSandbox + CreateContainer +
//!    StartContainer, with the `husk` handler (husk's shim: the pod's VM)
//!    and the `runc` handler (containerd's runc shim), p50 and p90 of wall
//!    time;
//! 2. the host memory of N idle pods (husk handler, one `sleep`
//!    container each): the proportional set size (PSS) of every process
//!    serving them (shim, monitors, VMM with the guest's memory), at each
//!    N asked for, and what each pod past the last count cost.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use husk_bench::percentile;
use husk_cri_tests::{Containerd, processes_with};

#[derive(Parser)]
#[command(about = "CRI pod start, husk against runc; PSS of idle husk pods")]
struct Args {
    /// Where husk and containerd-shim-husk-v2 are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// husk's warm-start cache.
    #[arg(long, default_value = "/var/lib/husk")]
    warm_cache: PathBuf,
    /// Measured pod starts per handler.
    #[arg(long, default_value_t = 8)]
    runs: usize,
    /// Idle pod counts at which memory is measured (ascending).
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    pods: Vec<usize>,
}

/// PSS in KiB of every process whose command line names `dir`.
fn pss_kib(dir: &str) -> u64 {
    processes_with(&[dir])
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}

async fn one_pod(ctd: &mut Containerd, name: &str, handler: &str) -> (String, f64) {
    let config = ctd.pod_config(name);
    let started = Instant::now();
    let pod = ctd.run_pod(&config, handler).await;
    let c = Containerd::container_config("sleeper", &["sleep", "100000"]);
    ctd.start_container(&pod, &config, c).await;
    (pod, started.elapsed().as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = args.bin_dir.canonicalize()?;
    let mut ctd = Containerd::start_in("bench", 19, &bin_dir, &args.warm_cache).await;
    let dir = ctd.dir.display().to_string();

    // Warm both paths once (the warm snapshot, the images' snapshots).
    for handler in ["husk", "runc"] {
        let (pod, _) = one_pod(&mut ctd, &format!("warm-{handler}"), handler).await;
        ctd.remove_pod(&pod).await;
    }
    println!("pod start through CRI (RunPodSandbox + CreateContainer + StartContainer), ms:");
    for handler in ["husk", "runc"] {
        let mut times = Vec::new();
        for i in 0..args.runs {
            let (pod, ms) = one_pod(&mut ctd, &format!("{handler}-{i}"), handler).await;
            times.push(ms);
            ctd.remove_pod(&pod).await;
        }
        println!(
            "  {handler:5} p50 {:7.1}  p90 {:7.1}  (n={})",
            percentile(&mut times, 50.0),
            percentile(&mut times, 90.0),
            times.len()
        );
    }

    println!("host memory of idle husk pods (PSS of shims, monitors, VMMs with guest memory):");
    let base = pss_kib(&dir);
    let mut pods = Vec::new();
    let mut last = (0usize, base);
    for &n in &args.pods {
        while pods.len() < n {
            let (pod, _) = one_pod(&mut ctd, &format!("idle-{}", pods.len()), "husk").await;
            pods.push(pod);
        }
        // Let the guests settle (their first seconds fault pages in).
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let kib = pss_kib(&dir);
        let per_new = (kib.saturating_sub(last.1)) as f64 / (n - last.0).max(1) as f64 / 1024.0;
        println!(
            "  N={n:3}  total {:8.1} MiB  per pod {:6.1} MiB  each of the last {} pods {:6.1} MiB",
            (kib - base) as f64 / 1024.0,
            (kib - base) as f64 / 1024.0 / n as f64,
            n - last.0,
            per_new
        );
        last = (n, kib);
    }
    for pod in pods {
        ctd.remove_pod(&pod).await;
    }
    Ok(())
}
