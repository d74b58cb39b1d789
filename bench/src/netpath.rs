//! The network path end to end, in one run, side by side:
//!
//! - **start cost**: `husk run --rm husk/busybox true` on `--network
//!   none`, on a husk network, and on a husk network with a published
//!   port (`-p 80`, a host port the kernel picks): wall time, host-side
//!   CPU time (husk, the monitor, the VMM's own threads and device
//!   models, the CNI plugins and the iptables they run) and guest time;
//! - **TCP ping-pong** (one byte each way, one connection) and **iperf3**
//!   (host to container, and back with `-R`) from the host to a husk
//!   container and to a runc container on the same husk network (its
//!   namespace wired with the network's own CNI list).
//!
//! Both containers run the host's iperf3 and this program's echo server
//! (`--serve-echo PORT`) from the host's root, shared read-only at /host,
//! through the host's dynamic loader: the busybox image has neither.
//! Everything is made in a network of its own and removed at the end.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use husk_bench::{one_run, percentile};

#[derive(Parser)]
#[command(about = "husk networks: start cost with and without a network, and TCP to husk vs runc")]
struct Args {
    /// The husk binary.
    #[arg(long, default_value = "target/release/husk")]
    husk: PathBuf,
    /// husk's root (its warm-start cache lives there).
    #[arg(long, default_value = "/var/lib/husk")]
    root: PathBuf,
    /// Measured runs per start-cost variant (0: the start cost is not
    /// measured).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Round trips of the ping-pong.
    #[arg(long, default_value_t = 2000)]
    pings: usize,
    /// Seconds of each iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// (internal) Serve TCP echo on this port, for ever.
    #[arg(long, hide = true)]
    serve_echo: Option<u16>,
}

const NETWORK: &str = "husk-bench-net";
const ECHO_PORT: u16 = 7000;
const LIB: &str = "/host/usr/lib/x86_64-linux-gnu";

fn serve_echo(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    for conn in listener.incoming() {
        let mut conn = conn?;
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// The servers' command line: iperf3 in the background, the echo server
/// in front, both the host's binaries through its loader.
fn servers() -> anyhow::Result<Vec<String>> {
    let me = std::env::current_exe()?.canonicalize()?;
    let ld = format!("{LIB}/ld-linux-x86-64.so.2 --library-path {LIB}");
    Ok(vec![
        "sh".into(),
        "-c".into(),
        format!(
            "{ld} /host/usr/bin/iperf3 -s & exec {ld} /host{} --serve-echo {ECHO_PORT}",
            me.display()
        ),
    ])
}

fn husk(args: &Args, more: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(&args.husk)
        .arg("--root")
        .arg(&args.root)
        .args(more)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run husk {more:?}"))?;
    ensure!(
        out.status.success(),
        "husk {more:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn stats(values: &[f64]) -> (f64, f64) {
    let mut v = values.to_vec();
    (percentile(&mut v, 50.0), percentile(&mut v, 90.0))
}

/// Start cost of `husk run --rm ... true` with `flags`.
fn start_cost(args: &Args, work: &Path, label: &str, flags: &[&str]) -> anyhow::Result<()> {
    if args.runs == 0 {
        return Ok(());
    }
    let mut samples = Vec::new();
    for i in 0..=args.runs {
        let timings = work.join(format!("t-{label}-{i}"));
        let mut cmd = Command::new(&args.husk);
        cmd.arg("--root")
            .arg(&args.root)
            .args(["run", "--rm"])
            .args(flags)
            .args([husk_docker::busybox::IMAGE_NAME, "true"])
            .env("HUSK_TIMINGS", &timings);
        let s = one_run("husk", &mut cmd, Some(&timings))?;
        if i > 0 {
            samples.push(s);
        }
    }
    let wall: Vec<f64> = samples.iter().map(|s| s.wall_ms).collect();
    let host: Vec<f64> = samples.iter().filter_map(|s| s.host_ms).collect();
    let guest: Vec<f64> = samples.iter().filter_map(|s| s.guest_ms).collect();
    let ((w50, w90), (h50, h90), (g50, g90)) = (stats(&wall), stats(&host), stats(&guest));
    println!(
        "| {label} | {} | {w50:.1} | {w90:.1} | {h50:.1} | {h90:.1} | {g50:.0} | {g90:.0} |",
        samples.len()
    );
    Ok(())
}

/// Connects to `ip`'s echo server once it listens.
fn connect(ip: &str) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match TcpStream::connect_timeout(
            &format!("{ip}:{ECHO_PORT}").parse()?,
            Duration::from_secs(5),
        ) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => bail!("{ip}:{ECHO_PORT} never answered: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Round trips of one byte: p50 and p90 in µs.
fn ping_pong(ip: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut s = connect(ip)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut rtts = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for i in 0..n + 100 {
        let t = Instant::now();
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
        if i >= 100 {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(stats(&rtts))
}

/// iperf3 to `ip` for `seconds` (`reverse`: from it): Mbit/s received.
fn iperf(ip: &str, seconds: u32, reverse: bool) -> anyhow::Result<f64> {
    let mut cmd = Command::new("iperf3");
    cmd.args(["-c", ip, "-J", "-t", &seconds.to_string()]);
    if reverse {
        cmd.arg("-R");
    }
    let mut tries = 0;
    let v: serde_json::Value = loop {
        let out = cmd.output().context("run iperf3 (Debian's iperf3)")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3's JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
        // The server takes a moment to finish the run before.
        if tries < 20 && v["error"].as_str().is_some_and(|e| e.contains("busy")) {
            tries += 1;
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        break v;
    };
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e6)
        .with_context(|| format!("iperf3 to {ip}: {}", v["error"]))
}

/// A runc container running the servers on the husk network: its
/// namespace (`ip netns`) wired with the network's CNI list.
struct Runc {
    work: PathBuf,
    id: String,
    netns: String,
    list: serde_json::Value,
    ip: String,
}

impl Runc {
    fn invocation<'a>(netns: &'a Path, id: &'a str) -> husk_docker::cni::Invocation<'a> {
        husk_docker::cni::Invocation {
            container_id: id,
            netns,
            ifname: "eth0",
            runtime_config: &serde_json::Value::Null,
        }
    }

    fn start(args: &Args, work: &Path) -> anyhow::Result<Self> {
        let id = format!("husk-bench-runc-{}", std::process::id());
        let netns = id.clone();
        let list: serde_json::Value = serde_json::from_slice(&std::fs::read(
            args.root
                .join("networks")
                .join(format!("{NETWORK}.conflist")),
        )?)?;
        ensure!(
            Command::new("ip")
                .args(["netns", "add", &netns])
                .status()?
                .success(),
            "ip netns add"
        );
        let path = PathBuf::from("/run/netns").join(&netns);
        let result = husk_docker::cni::add(&list, &Self::invocation(&path, &id))?;
        let ip = husk_docker::cni::ipv4(&result)
            .context("no address")?
            .to_string();
        let me = Self {
            work: work.join("runc"),
            id,
            netns,
            list,
            ip,
        };
        let bundle = me.work.join("bundle");
        let mut made = Command::new(&args.husk);
        made.arg("busybox-bundle")
            .arg(&bundle)
            .arg("--")
            .args(servers()?);
        ensure!(made.status()?.success(), "husk busybox-bundle");
        let config = bundle.join("config.json");
        let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&config)?)?;
        for ns in spec["linux"]["namespaces"]
            .as_array_mut()
            .context("namespaces")?
        {
            if ns["type"] == "network" {
                ns["path"] = path.display().to_string().into();
            }
        }
        spec["mounts"]
            .as_array_mut()
            .context("mounts")?
            .push(serde_json::json!(
                {"destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "ro"]}
            ));
        spec["mounts"].as_array_mut().context("mounts")?.push(serde_json::json!(
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ));
        spec["process"]["terminal"] = false.into();
        std::fs::write(&config, serde_json::to_vec_pretty(&spec)?)?;
        let ran = Command::new("runc")
            .arg("--root")
            .arg(me.work.join("root"))
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg(&me.id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        ensure!(ran.success(), "runc run");
        Ok(me)
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(self.work.join("root"))
            .args(["delete", "--force", &self.id])
            .status();
        let path = PathBuf::from("/run/netns").join(&self.netns);
        let _ = husk_docker::cni::del(&self.list, &Self::invocation(&path, &self.id), None);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(port) = args.serve_echo {
        return serve_echo(port);
    }
    let work = std::env::temp_dir().join(format!("husk-bench-netpath-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let _ = husk(&args, &["rm", "-f", "husk-bench-srv"]);
    let _ = husk(&args, &["network", "rm", NETWORK]);
    husk(&args, &["network", "create", NETWORK])?;
    let result = measure(&args, &work);
    let _ = husk(&args, &["rm", "-f", "husk-bench-srv"]);
    let _ = husk(&args, &["network", "rm", NETWORK]);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn measure(args: &Args, work: &Path) -> anyhow::Result<()> {
    println!(
        "| husk run --rm husk/busybox true | runs | wall p50 ms | wall p90 ms | host-side p50 ms | host-side p90 ms | guest p50 ms | guest p90 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    start_cost(args, work, "--network none", &["--network", "none"])?;
    start_cost(
        args,
        work,
        "--network (husk network)",
        &["--network", NETWORK],
    )?;
    start_cost(
        args,
        work,
        "--network and -p 80",
        &["--network", NETWORK, "-p", "80"],
    )?;

    let mut run = vec![
        "run",
        "-d",
        "--name",
        "husk-bench-srv",
        "--network",
        NETWORK,
        "-v",
        "/:/host:ro",
    ];
    run.push(husk_docker::busybox::IMAGE_NAME);
    let cmd = servers()?;
    run.extend(cmd.iter().map(String::as_str));
    husk(args, &run)?;
    let inspect: serde_json::Value =
        serde_json::from_str(&husk(args, &["inspect", "husk-bench-srv"])?)?;
    let husk_ip = inspect[0]["NetworkSettings"]["IPAddress"]
        .as_str()
        .context("the container's address")?
        .to_owned();
    let runc = Runc::start(args, work)?;
    println!();
    println!(
        "| host to container | TCP ping-pong p50 µs | p90 µs | iperf3 host→container Mbit/s | container→host (-R) Mbit/s |"
    );
    println!("|---|---|---|---|---|");
    for (label, ip) in [("husk", husk_ip.as_str()), ("runc", runc.ip.as_str())] {
        let (p50, p90) = ping_pong(ip, args.pings)?;
        let up = iperf(ip, args.seconds, false)?;
        let down = iperf(ip, args.seconds, true)?;
        println!("| {label} ({ip}) | {p50:.0} | {p90:.0} | {up:.1} | {down:.1} |");
    }
    Ok(())
}
