//! What issue 18's VM placement adds to each container's start and end,
//! side by side with the same work without it, in one run: the VM's host
//! cgroup (made in every hierarchy with the VM's bounds, joined, left and
//! removed: `husk_runtime::cgroup`) against nothing, and a VMM's spawn as
//! PID 1 of a PID namespace of its own (`husk_sys::child::spawn_vmm`)
//! against a plain spawn, both of `/bin/true`, waited for.
//!
//! CPU time is this process's and its children's (user + system, from
//! `getrusage`), as husk-bench-run counts host-side time; wall time is
//! per iteration. Rows alternate, so that load on the machine falls on
//! both alike. Needs root.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use husk_bench::percentile;

#[derive(Parser)]
#[command(about = "the cost of a VM's host cgroup and PID namespace, against none")]
struct Args {
    /// Iterations per row.
    #[arg(long, default_value_t = 200)]
    runs: usize,
}

/// CPU time of this process and its waited-for children, µs.
fn cpu_us() -> f64 {
    let of = |who| {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let u = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(who, &mut u);
            u
        };
        let t = |tv: libc::timeval| tv.tv_sec as f64 * 1e6 + tv.tv_usec as f64;
        t(u.ru_utime) + t(u.ru_stime)
    };
    of(libc::RUSAGE_SELF) + of(libc::RUSAGE_CHILDREN)
}

#[derive(Default)]
struct Row {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Row {
    fn time(&mut self, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        let (c0, t0) = (cpu_us(), Instant::now());
        f()?;
        self.wall.push(t0.elapsed().as_secs_f64() * 1e6);
        self.cpu.push(cpu_us() - c0);
        Ok(())
    }

    fn print(&mut self, name: &str) {
        let p = |v: &mut Vec<f64>, q| percentile(v, q) / 1000.0;
        println!(
            "| {name} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            self.wall.len(),
            p(&mut self.wall, 50.0),
            p(&mut self.wall, 90.0),
            p(&mut self.cpu, 50.0),
            p(&mut self.cpu, 90.0),
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !rustix::process::geteuid().is_root() {
        bail!("husk-bench-spawn makes cgroups and PID namespaces: run it as root");
    }
    let bounds = husk_runtime::cgroup::Bounds::of(husk_guest::shape::Shape::default());
    let (mut none, mut cgroup, mut plain, mut pidns) = Default::default();
    let spawn = |own_namespace: bool| -> anyhow::Result<()> {
        let mut cmd = Command::new("/bin/true");
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        let mut child = if own_namespace {
            husk_sys::child::spawn_vmm(&mut cmd).map(|(child, starter)| (child, Some(starter)))
        } else {
            cmd.spawn().map(|child| (child, None))
        }
        .context("spawn /bin/true")?;
        child.0.wait()?;
        Ok(())
    };
    for i in 0..args.runs {
        let rel = std::path::PathBuf::from(format!("husk/bench-{}-{i}", std::process::id()));
        Row::time(&mut none, || Ok(()))?;
        Row::time(&mut cgroup, || {
            husk_runtime::cgroup::enter(&rel, &bounds).map_err(anyhow::Error::msg)?;
            husk_runtime::cgroup::leave(&rel);
            Ok(())
        })?;
        Row::time(&mut plain, || spawn(false))?;
        Row::time(&mut pidns, || spawn(true))?;
    }
    println!("| step | runs | wall p50 ms | wall p90 ms | CPU p50 ms | CPU p90 ms |");
    println!("|---|---|---|---|---|---|");
    Row::print(&mut none, "nothing (baseline)");
    Row::print(
        &mut cgroup,
        "the VM's host cgroup: made, bounded, joined, left, removed",
    );
    Row::print(&mut plain, "spawn and wait /bin/true (baseline)");
    Row::print(
        &mut pidns,
        "the same as PID 1 of its own PID namespace (spawn_vmm)",
    );
    Ok(())
}
