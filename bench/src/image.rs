//! Images, in one run: pulling a multi-layer image (busybox and five
//! layers of 10 MiB of incompressible bytes, gzip'd: about 52 MiB) from a
//! local registry (Debian's docker-registry on 127.0.0.1) with `husk pull`
//! and with `skopeo copy` to an OCI layout, alternately, each into a fresh
//! store; then `husk run --rm IMAGE true` against `husk run --bundle` of
//! the same busybox files running `true`, alternately.
//!
//! husk's pull also unpacks every layer (skopeo's copy only writes the
//! blobs): what `husk run` needs, and what skopeo leaves to a later step.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use husk_bench::{one_run, percentile};
use sha2::Digest as _;

#[derive(Parser)]
#[command(about = "husk pull vs skopeo copy; husk run IMAGE vs husk run --bundle")]
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

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// The benchmark image as an OCI layout in `dir`; returns its size.
fn make_image(dir: &Path) -> anyhow::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let rootfs = dir.join("rootfs");
    husk_docker::busybox::make_rootfs(&rootfs).map_err(anyhow::Error::msg)?;
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", &rootfs)?;
    let mut tars = vec![b.into_inner()?];
    std::fs::remove_dir_all(&rootfs)?;
    for i in 0..5 {
        let data = noise(10 << 20, 0x9e37_79b9 + i);
        tars.push(tar_of(&[(&format!("data/layer{i}.bin"), &data)]));
    }
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> anyhow::Result<String> {
        let d = sha256(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes)?;
        Ok(d)
    };
    let mut layers = Vec::new();
    let mut size = 0;
    for t in &tars {
        let z = gzip(t);
        size += z.len() as u64;
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": put(&z)?, "size": z.len(),
        }));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": tars.iter().map(|t| sha256(t)).collect::<Vec<_>>()},
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config)?, "size": config.len()},
        "layers": layers,
    }))?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(&manifest)?, "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }]});
    std::fs::write(dir.join("index.json"), index.to_string())?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(size)
}

struct Registry(Child, PathBuf);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn start_registry(dir: &Path) -> anyhow::Result<(Registry, u16)> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    std::fs::create_dir_all(dir)?;
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
        dir.join("storage").display()
    );
    std::fs::write(dir.join("config.yml"), config)?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("docker-registry (Debian's docker-registry)")?;
    let registry = Registry(child, dir.to_owned());
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("docker-registry did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((registry, port))
}

fn timed(cmd: &mut Command) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = cmd.stdin(Stdio::null()).output()?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(ms)
}

fn row(name: &str, v: &mut [f64]) {
    println!(
        "| {name} | {:.0} | {:.0} |",
        percentile(v, 50.0),
        percentile(v, 90.0)
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let work = std::env::temp_dir().join(format!("husk-bench-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let layout = work.join("layout");
    let size = make_image(&layout)?;
    let (_registry, port) = start_registry(&work.join("registry"))?;
    let image = format!("127.0.0.1:{port}/bench/big:latest");
    let pushed = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker://{image}"))
        .output()?;
    if !pushed.status.success() {
        bail!("skopeo push: {}", String::from_utf8_lossy(&pushed.stderr));
    }
    println!(
        "image: 6 layers, {:.1} MiB compressed; {} runs each, alternating\n",
        size as f64 / f64::from(1 << 20),
        args.runs
    );
    println!("| pull from 127.0.0.1 | p50 ms | p90 ms |");
    println!("|---|---|---|");
    let (mut husk, mut skopeo) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        let root = work.join(format!("root-{i}"));
        husk.push(timed(
            Command::new(&args.husk)
                .arg("--root")
                .arg(&root)
                .args(["pull", &image]),
        )?);
        std::fs::remove_dir_all(&root)?;
        let dest = work.join(format!("skopeo-{i}"));
        skopeo.push(timed(
            Command::new("skopeo")
                .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
                .arg(format!("docker://{image}"))
                .arg(format!("oci:{}:latest", dest.display())),
        )?);
        std::fs::remove_dir_all(&dest)?;
    }
    row("husk pull (download, verify, unpack)", &mut husk);
    row(
        "skopeo copy to an OCI layout (download, verify)",
        &mut skopeo,
    );

    // husk run of the image against husk run --bundle of the same files:
    // wall time (nearly all of it guest time here) and host-side time.
    let root = work.join("root-run");
    let timings = work.join("timings");
    let husk = |args_: &[&str]| {
        let mut cmd = Command::new(&args.husk);
        cmd.arg("--root")
            .arg(&root)
            .args(args_)
            .env(husk_guest::warm::CACHE_ENV, &args.warm_cache)
            .env("HUSK_TIMINGS", &timings);
        cmd
    };
    one_run(
        "husk",
        &mut husk(&["run", "--rm", "husk/busybox", "true"]),
        Some(&timings),
    )?;
    let bundle = work.join("bundle");
    husk_docker::busybox::make_bundle(&bundle, &["true"]).map_err(anyhow::Error::msg)?;
    let bundle = bundle.display().to_string();
    let (mut image_runs, mut bundle_runs) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        image_runs.push(one_run(
            "husk",
            &mut husk(&["run", "--rm", "husk/busybox", "true"]),
            Some(&timings),
        )?);
        bundle_runs.push(one_run(
            "husk",
            &mut husk(&["run", "--bundle", &bundle, &format!("bench-{i}")]),
            Some(&timings),
        )?);
    }
    println!("\n| run `true` | wall p50 ms | wall p90 ms | host-side p50 ms | host-side p90 ms |");
    println!("|---|---|---|---|---|");
    for (name, samples) in [
        ("husk run --rm husk/busybox true", &image_runs),
        ("husk run --bundle (same files) true", &bundle_runs),
    ] {
        let mut wall: Vec<f64> = samples.iter().map(|s| s.wall_ms).collect();
        let mut host: Vec<f64> = samples.iter().filter_map(|s| s.host_ms).collect();
        let host = if host.is_empty() {
            " - | - ".to_owned()
        } else {
            format!(
                "{:.1} | {:.1}",
                percentile(&mut host, 50.0),
                percentile(&mut host, 90.0)
            )
        };
        println!(
            "| {name} | {:.0} | {:.0} | {host} |",
            percentile(&mut wall, 50.0),
            percentile(&mut wall, 90.0)
        );
    }
    std::fs::remove_dir_all(&root)?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
