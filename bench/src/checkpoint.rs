//! Checkpoint and restore, in one run, each beside its baseline:
//!
//! - `husk checkpoint --leave-running` of a running container (a shell
//!   counting in a 256 MiB VM) against `husk pause` + `husk resume` of it:
//!   what writing the VM out adds to stopping and starting it;
//! - `husk restore -d` of that checkpoint against a warm start, `husk run
//!   -d --bundle`, of the same bundle: each until the command returns (the
//!   container runs), then until `husk exec ID true` answers;
//! - the checkpoint's size on disk against the VM's memory.
//!
//! The runs alternate. Wall times include the guest's own work, which on
//! a host without VMX/SVM is emulated (docs/benchmarks.md).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::bail;
use clap::Parser;
use husk_bench::percentile;

#[derive(Parser)]
#[command(about = "husk checkpoint vs pause+resume; husk restore vs a warm start")]
struct Args {
    /// The husk binary.
    #[arg(long, default_value = "target/release/husk")]
    husk: PathBuf,
    /// Measured runs of each.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where husk's warm-start snapshot is cached (no cold boot here).
    #[arg(long, default_value = "/var/lib/husk")]
    warm_cache: PathBuf,
}

struct Husk<'a> {
    bin: &'a Path,
    root: &'a Path,
    warm_cache: &'a Path,
}

impl Husk<'_> {
    /// Runs husk to completion with no stdio (a detached container's
    /// monitor keeps what it is given); returns the wall time in ms.
    fn timed(&self, args: &[&str]) -> anyhow::Result<f64> {
        let start = Instant::now();
        let out = Command::new(self.bin)
            .arg("--root")
            .arg(self.root)
            .args(args)
            .env(husk_guest::warm::CACHE_ENV, self.warm_cache)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        if !out.success() {
            bail!("husk {args:?}: {out}");
        }
        Ok(ms)
    }

    /// Ends container `id`, quietly.
    fn gone(&self, id: &str) {
        let _ = self.timed(&["delete", "--force", id]);
    }
}

/// Bytes `path` takes on disk (`du`).
fn du_bytes(path: &Path) -> u64 {
    let out = Command::new("du").arg("-sk").arg(path).output();
    out.ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        * 1024
}

fn report(name: &str, values: &mut [f64]) {
    println!(
        "{name:<44} p50 {:>8.1} ms   min {:>8.1}   max {:>8.1}",
        percentile(values, 50.0),
        values.iter().copied().fold(f64::INFINITY, f64::min),
        values.iter().copied().fold(0.0, f64::max)
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let work = std::env::temp_dir().join(format!("husk-bench-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let root = work.join("root");
    let bundle = work.join("bundle");
    let script = "i=0; exec 3>>/counter; while :; do i=$((i+1)); echo $i >&3; sleep 0.2; done";
    husk_docker::busybox::make_bundle(&bundle, &["sh", "-c", script])
        .map_err(anyhow::Error::msg)?;
    let mut spec = husk_docker::busybox::config(&["sh", "-c", script]);
    if let Some(r) = spec.root_mut() {
        r.set_readonly(Some(false));
    }
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    let husk = Husk {
        bin: &args.husk,
        root: &root,
        warm_cache: &args.warm_cache,
    };
    let b = bundle.to_str().unwrap();
    let id = "bench-ckpt";
    let warm = "bench-warm";
    husk.timed(&["run", "-d", "--bundle", b, id])?;
    husk.timed(&["exec", id, "true"])?;

    let (mut ckpt, mut pause_resume) = (Vec::new(), Vec::new());
    let mut size = 0;
    let image = work.join("image");
    for i in 0..args.runs {
        let _ = std::fs::remove_dir_all(&image);
        ckpt.push(husk.timed(&[
            "checkpoint",
            "--leave-running",
            "--image-path",
            image.to_str().unwrap(),
            id,
        ])?);
        let start = Instant::now();
        husk.timed(&["pause", id])?;
        husk.timed(&["resume", id])?;
        pause_resume.push(start.elapsed().as_secs_f64() * 1000.0);
        if i == 0 {
            size = du_bytes(&image);
        }
    }
    // The checkpoint restored from now is the last one made.
    husk.timed(&["checkpoint", "--image-path", image.to_str().unwrap(), id])?;
    husk.gone(id);

    let (mut restore, mut restore_answer) = (Vec::new(), Vec::new());
    let (mut start_warm, mut warm_answer) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let t = Instant::now();
        restore.push(husk.timed(&[
            "restore",
            "-d",
            "--image-path",
            image.to_str().unwrap(),
            "--bundle",
            b,
            id,
        ])?);
        husk.timed(&["exec", id, "true"])?;
        restore_answer.push(t.elapsed().as_secs_f64() * 1000.0);
        husk.gone(id);

        let t = Instant::now();
        start_warm.push(husk.timed(&["run", "-d", "--bundle", b, warm])?);
        husk.timed(&["exec", warm, "true"])?;
        warm_answer.push(t.elapsed().as_secs_f64() * 1000.0);
        husk.gone(warm);
    }
    println!(
        "husk checkpoint/restore, {} runs each, alternating",
        args.runs
    );
    report("checkpoint --leave-running (256 MiB VM)", &mut ckpt);
    report("  baseline: pause + resume", &mut pause_resume);
    report("restore -d (returns: container running)", &mut restore);
    report("  baseline: run -d --bundle (warm start)", &mut start_warm);
    report("restore -d, then exec true answers", &mut restore_answer);
    report(
        "  baseline: run -d, then exec true answers",
        &mut warm_answer,
    );
    println!(
        "checkpoint on disk: {:.1} MiB (guest memory 256 MiB; unwritten pages are holes)",
        size as f64 / f64::from(1u32 << 20)
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
