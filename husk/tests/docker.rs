//! husk as a runtime of Debian's docker engine (`dockerd --add-runtime
//! husk=<husk>`, `docker run --runtime husk`): a dockerd of the test's
//! own (data root, exec root, socket, pid file in a temporary directory;
//! its bridge one the test makes, on a subnet of its own), the busybox
//! image husk makes loaded into it. Docker's bridge driver puts the
//! container's veth into the namespace husk made from a `prestart` hook;
//! husk mirrors it into the VM. A web server is reached through a port
//! published on 127.0.0.1; `docker exec`, `docker logs` and a foreground
//! container's exit status work as with runc.
//!
//! docker gives husk a `--root` under its exec root: with a container's
//! 64-digit ID, the VM's sockets are past the 107 bytes a Unix socket's
//! path may have, which husk goes around (husk-sys `unix`).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{HUSK, Husk, text};

/// A dockerd of the test's own, stopped and its files, bridge and
/// iptables rules removed when dropped.
struct Dockerd {
    dir: PathBuf,
    bridge: String,
    subnet: String,
    child: Child,
}

impl Dockerd {
    fn start(name: &str) -> Self {
        common::reap_on_exit();
        // A short directory: dockerd's own containerd socket lives under
        // the exec root.
        let dir = PathBuf::from(format!("/tmp/hd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let n = std::process::id() % 200 + 20;
        let bridge = format!("huskdk{n}");
        let subnet = format!("10.97.{n}.0/24");
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
        };
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("10.97.{n}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("--host")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .args(["--bridge", &bridge])
            .arg("--add-runtime")
            .arg(format!("husk={HUSK}"))
            .env(
                husk_guest::warm::CACHE_ENV,
                husk_protocol::paths::cache_dir().join("test-root"),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd (Debian's docker.io; make test installs it)");
        let me = Self {
            dir,
            bridge,
            subnet,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !me.docker(&["info"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "dockerd did not start: {}",
                std::fs::read_to_string(me.dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // The image, as `docker save` writes one (husk's `save`).
        let husk = Husk::new("docker-image");
        let archive = me.dir.join("busybox.tar");
        let oci = me.dir.join("busybox-oci.tar");
        husk.ok(&["busybox-image", "--output", oci.to_str().unwrap()]);
        husk.ok(&["load", "-i", oci.to_str().unwrap()]);
        husk.ok(&[
            "save",
            "-o",
            archive.to_str().unwrap(),
            husk_docker::busybox::IMAGE_NAME,
        ]);
        me.ok(&["load", "-i", archive.to_str().unwrap()]);
        me
    }

    /// `docker args` against this dockerd, to completion (120 s at most).
    fn docker(&self, args: &[&str]) -> Output {
        let child = Command::new("docker")
            .arg("--host")
            .arg(format!("unix://{}", self.dir.join("docker.sock").display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        common::output_within(child, Duration::from_secs(120), &format!("docker {args:?}"))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let listed = self.docker(&["ps", "-aq"]);
        for id in text(&listed.stdout).lines() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        husk_test_support::kill(self.child.id(), rustix::process::Signal::TERM);
        let _ = self.child.wait();
        // What dockerd put in iptables for its bridge and subnet.
        for table in ["filter", "nat"] {
            let saved = Command::new("iptables-save")
                .args(["-t", table])
                .output()
                .unwrap();
            for rule in text(&saved.stdout).lines() {
                let Some(rule) = rule.strip_prefix("-A ") else {
                    continue;
                };
                if rule.contains(&self.bridge) || rule.contains(&self.subnet) {
                    let _ = Command::new("iptables")
                        .args(["-t", table, "-D"])
                        .args(rule.split_whitespace())
                        .output();
                }
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("data"))
            .output();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("exec"))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn dockerd_runs_husk_containers_with_published_ports_exec_and_logs() {
    let docker = Dockerd::start("web");
    // Foreground: the bridge's address in the guest, and the exit status.
    let out = docker.docker(&[
        "run",
        "--rm",
        "--runtime",
        "husk",
        husk_docker::busybox::IMAGE_NAME,
        "sh",
        "-c",
        "ip -4 -o addr show eth0; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let prefix = &docker.subnet[..docker.subnet.rfind('.').unwrap()];
    assert!(
        text(&out.stdout).contains(&format!("inet {prefix}.")),
        "{}",
        text(&out.stdout)
    );

    let port = husk_test_support::free_port();
    let id = docker.ok(&[
        "run", "-d", "--runtime", "husk", "--name", "web", "-p", &format!("127.0.0.1:{port}:80"),
        husk_docker::busybox::IMAGE_NAME, "sh", "-c",
        "mkdir -p /www && echo hello from a husk VM under docker > /www/index.html && echo serving && exec httpd -f -p 80 -h /www",
    ]);
    let id = id.trim().to_owned();
    let page = husk_test_support::http_get(&format!("127.0.0.1:{port}"), Duration::from_secs(60));
    assert!(page.contains("hello from a husk VM under docker"), "{page}");
    let inspect: serde_json::Value = serde_json::from_str(&docker.ok(&["inspect", "web"])).unwrap();
    let ip = inspect[0]["NetworkSettings"]["IPAddress"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(ip.starts_with(prefix), "{ip}");
    assert!(
        husk_test_support::http_get(&format!("{ip}:80"), Duration::from_secs(30))
            .contains("docker")
    );
    assert_eq!(
        docker.ok(&["exec", "web", "cat", "/www/index.html"]),
        "hello from a husk VM under docker\n"
    );
    let out = docker.docker(&["exec", "web", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert!(docker.ok(&["logs", "web"]).contains("serving"));
    assert!(docker.ok(&["ps"]).contains(&id[..12]));

    // Its VM is the runtime's: gone with the container.
    let state = docker
        .dir
        .join("exec/runtime-runc/moby/containers")
        .join(&id);
    assert!(state.exists(), "husk's state is at {}", state.display());
    docker.ok(&["rm", "-f", "web"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while state.exists() {
        assert!(Instant::now() < deadline, "{} stayed", state.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}
