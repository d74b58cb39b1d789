//! husk as podman's OCI runtime (`podman --runtime <husk>`), Debian's
//! podman with a root, run root, temporary directory and CNI network of
//! the test's own (a bridge and subnet no other test uses, its IPAM state
//! in the test's directory). Podman makes the container's network
//! namespace and names it in the spec: husk mirrors it into the VM. A web
//! server in the container is reached through the bridge and through a
//! published port on the host's 127.0.0.1, as with runc.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{HUSK, text};

/// A podman of the test's own, its files removed when dropped.
struct Podman {
    dir: PathBuf,
    network: String,
}

impl Podman {
    fn new(name: &str) -> Self {
        common::reap_on_exit();
        let dir = std::env::temp_dir().join(format!("husk-podman-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        let id = std::process::id() % 200 + 20;
        let network = format!("huskpm{id}");
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": network,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": network,
                    "isGateway": true,
                    "ipMasq": true,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": dir.join("ipam"),
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "ranges": [[{"subnet": format!("10.93.{id}.0/24"), "gateway": format!("10.93.{id}.1")}]]
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
                {"type": "tuning"}
            ]
        });
        std::fs::write(
            dir.join("net.d").join(format!("{network}.conflist")),
            serde_json::to_string_pretty(&conflist).unwrap(),
        )
        .unwrap();
        let me = Self { dir, network };
        let archive = me.dir.join("busybox.tar");
        let made = Command::new(HUSK)
            .args(["busybox-image", "--output"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", text(&made.stderr));
        let out = me.podman(&["load", "-i", archive.to_str().unwrap()]);
        assert!(out.status.success(), "load: {}", text(&out.stderr));
        me
    }

    /// `podman args` with this instance's directories and husk as its
    /// runtime, to completion (180 s at most).
    fn podman(&self, args: &[&str]) -> Output {
        let d = &self.dir;
        let child = Command::new("podman")
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .arg("--network-config-dir")
            .arg(d.join("net.d"))
            .args(["--storage-driver", "vfs", "--events-backend", "none"])
            .args(["--cgroup-manager", "cgroupfs", "--runtime", HUSK])
            .args(args)
            // The suite's warm-start cache: no guest is booted cold here.
            .env(
                husk_guest::warm::CACHE_ENV,
                husk_protocol::paths::cache_dir().join("test-root"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("podman (Debian's podman package; make test installs it)");
        common::output_within(child, Duration::from_secs(180), "podman")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-a", "-f"]);
        let _ = Command::new("ip")
            .args(["link", "del", &self.network])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn podman_runs_husk_containers_on_its_network_with_published_ports() {
    let podman = Podman::new("web");
    // Foreground: the CNI network's address and route, mirrored into the
    // guest, and the exit status.
    let out = podman.podman(&[
        "run",
        "--rm",
        "--network",
        &podman.network,
        "husk/busybox",
        "sh",
        "-c",
        "ip -o -4 addr show dev eth0 | grep -o 'inet [0-9./]*'; ip route | grep default; exit 3",
    ]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{said}{}", text(&out.stderr));
    let subnet = format!("10.93.{}.", std::process::id() % 200 + 20);
    assert!(said.contains(&format!("inet {subnet}")), "{said}");
    assert!(said.contains(&format!("default via {subnet}1")), "{said}");

    // Detached, with a published port: a web server reached through the
    // bridge and through 127.0.0.1.
    let www = podman.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(
        www.join("index.html"),
        "hello from a husk VM under podman\n",
    )
    .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let volume = format!("{}:/www:ro", www.display());
    let publish = format!("127.0.0.1:{port}:80");
    podman.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        &podman.network,
        "-v",
        &volume,
        "-p",
        &publish,
        "husk/busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    let ip = podman
        .ok(&[
            "inspect",
            "web",
            "--format",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                podman.network
            ),
        ])
        .trim()
        .to_owned();
    assert!(ip.starts_with(&subnet), "{ip}");
    assert!(
        husk_test_support::http_get(&format!("{ip}:80"), Duration::from_secs(60))
            .contains("hello from a husk VM under podman")
    );
    assert!(
        husk_test_support::http_get(&format!("127.0.0.1:{port}"), Duration::from_secs(60))
            .contains("hello from a husk VM under podman")
    );
    podman.ok(&["rm", "-f", "web"]);
    let left = podman.ok(&["ps", "-a", "-q"]);
    assert_eq!(left.trim(), "", "{left}");
}
