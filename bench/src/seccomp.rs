//! What loading a VMM thread's seccomp filter costs: the filter as
//! seccompiler lays it out (a chain of syscall numbers, what husk-vmm
//! loaded before) against the same rules in husk-seccomp's binary search
//! (what it loads now), side by side in one run. Each load is made by a
//! forked child (a filter cannot be taken off again), which times the
//! `seccomp(2)` call alone with its thread CPU clock: the kernel runs a new
//! filter for every syscall number to fill its action cache, so the load
//! costs the program's walk times ~450. Rows alternate per round.

use anyhow::bail;
use clap::Parser;
use husk_bench::percentile;
use husk_vmm::seccomp::{Thread, seccompiler_chain};

#[derive(Parser)]
#[command(
    about = "a VMM thread's seccomp filter load: seccompiler's chain against husk-seccomp's tree"
)]
struct Args {
    /// Loads per filter.
    #[arg(long, default_value_t = 50)]
    runs: usize,
}

/// CPU time of one load of `program` in a forked child, µs.
fn load_us(program: &[husk_seccomp::sock_filter]) -> anyhow::Result<f64> {
    let (read, write) = rustix::pipe::pipe()?;
    // SAFETY: the child makes system calls only (no allocation), then
    // _exits; the program was built before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        let now = || rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        let ns = |t: rustix::time::Timespec| t.tv_sec * 1_000_000_000 + t.tv_nsec;
        let _ = rustix::thread::set_no_new_privs(true);
        let before = now();
        let loaded = husk_seccomp::load(program, 0).is_ok();
        let took = if loaded { ns(now()) - ns(before) } else { -1 };
        let _ = rustix::io::write(&write, &took.to_ne_bytes());
        // SAFETY: ends the child without running the parent's exit code.
        unsafe { libc::_exit(0) };
    }
    drop(write);
    let mut buf = [0u8; 8];
    let n = rustix::io::read(&read, &mut buf)?;
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let took = i64::from_ne_bytes(buf);
    if n != 8 || took < 0 {
        bail!("the child could not load the filter");
    }
    Ok(took as f64 / 1000.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "| thread | chain insns | tree insns | chain load p50 µs | tree load p50 µs | chain p90 | tree p90 |"
    );
    println!("|---|---|---|---|---|---|---|");
    let (mut chain_sum, mut tree_sum) = (0.0, 0.0);
    for thread in Thread::ALL {
        let chain = seccompiler_chain(thread).map_err(anyhow::Error::msg)?;
        let tree = husk_vmm::seccomp::filter(thread).map_err(anyhow::Error::msg)?;
        let (mut c, mut t) = (Vec::new(), Vec::new());
        for _ in 0..args.runs {
            c.push(load_us(&chain)?);
            t.push(load_us(&tree)?);
        }
        let (c50, t50) = (percentile(&mut c, 50.0), percentile(&mut t, 50.0));
        chain_sum += c50;
        tree_sum += t50;
        println!(
            "| {thread:?} | {} | {} | {c50:.1} | {t50:.1} | {:.1} | {:.1} |",
            chain.len(),
            tree.len(),
            percentile(&mut c, 90.0),
            percentile(&mut t, 90.0)
        );
    }
    println!("| all five (sum of p50s) | | | {chain_sum:.1} | {tree_sum:.1} | | |");
    Ok(())
}
