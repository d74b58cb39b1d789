//! A containerd of a test's own with its CRI plugin on, two runtime
//! handlers (`husk`: husk's shim, `runc`: containerd's runc shim with
//! Debian's runc), a CNI bridge of its own, and the images husk makes
//! (busybox, and a pause image of it) imported; a Rust CRI client (CRI's
//! v1 API over tonic) talks to it as a kubelet does. Everything is
//! removed when it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
pub use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub use husk_test_support::{processes_with, text};

/// The image containers run.
pub const BUSYBOX: &str = "docker.io/husk/busybox:latest";
/// The pod sandbox (pause) image: busybox sleeping.
pub const PAUSE: &str = "docker.io/husk/pause:test";

/// The workspace's debug binaries (`husk`, the shim), built by `cargo
/// nextest run --workspace`.
pub fn binary(name: &str) -> PathBuf {
    let path = husk_test_support::target_dir().join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace (cargo build --workspace)",
        path.display()
    );
    path
}

/// What containerd's port forwarding does: from inside the network
/// namespace at `netns`, connects to 127.0.0.1:`port`, sends `request`,
/// half-closes and returns everything read back.
pub fn dial_in_netns(netns: &Path, port: u16, request: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let ns = std::fs::File::open(netns)?;
    let request = request.to_vec();
    std::thread::spawn(move || {
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&ns),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
        conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        conn.write_all(&request)?;
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer)?;
        Ok(answer)
    })
    .join()
    .unwrap()
}

/// A containerd with CRI, stopped and removed when dropped.
pub struct Containerd {
    /// Its directory (config, root, state, sockets, CNI, logs).
    pub dir: PathBuf,
    child: Child,
    /// Its CNI bridge.
    pub bridge: String,
    /// The CRI runtime service.
    pub runtime: RuntimeServiceClient<Channel>,
    /// The CRI image service.
    pub images: ImageServiceClient<Channel>,
}

impl Containerd {
    /// Starts one named `name` (unique per test), its CNI bridge numbered
    /// `n` (its subnet 10.95.n.0/24).
    pub async fn start(name: &str, n: u8) -> Self {
        let cache = std::env::var_os("HUSK_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/husk"))
            .join("test-root");
        let husk = binary("husk");
        Self::start_in(name, n, husk.parent().unwrap(), &cache).await
    }

    /// [`Containerd::start`] with husk and its shim from `bin_dir` and
    /// husk's warm-start cache at `warm_cache`.
    pub async fn start_in(name: &str, n: u8, bin_dir: &Path, warm_cache: &Path) -> Self {
        let husk = bin_dir.join("husk");
        assert!(
            bin_dir.join("containerd-shim-husk-v2").exists(),
            "no containerd-shim-husk-v2 in {}",
            bin_dir.display()
        );
        let dir = husk_test_support::scratch("cri", name);
        let bridge = format!("huskcri{n}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        let cni = dir.join("cni");
        std::fs::create_dir_all(&cni).unwrap();
        std::fs::write(
            cni.join("10-husk.conflist"),
            serde_json::json!({
                "cniVersion": "1.0.0",
                "name": bridge,
                "plugins": [{
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": format!("10.95.{n}.0/24")}]],
                        "dataDir": dir.join("ipam"),
                    }
                }]
            })
            .to_string(),
        )
        .unwrap();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # A pod's sandbox asks for oom_score_adj -998, which this machine's
  # root may not set (runc fails on it); capped at containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
      runtime_type = "io.containerd.husk.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
            d = dir.display(),
            cni = cni.display(),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .env("TMPDIR", &tmp)
            .env("HUSK_WARM_CACHE", warm_cache)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (Debian's containerd package; make test installs it)");
        let socket = dir.join("containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "containerd did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let channel = connect(&socket).await;
        let mut me = Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            dir,
            child,
            bridge,
        };
        me.import(&husk, BUSYBOX, &[]);
        me.import(&husk, PAUSE, &["--cmd", "sleep", "--cmd", "inf"]);
        me.wait_ready().await;
        me
    }

    fn import(&self, husk: &Path, name: &str, cmd: &[&str]) {
        let archive = self.dir.join("image.tar");
        let made = Command::new(husk)
            .args(["busybox-image", "--output"])
            .arg(&archive)
            .args(["--name", name])
            .args(cmd)
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", text(&made.stderr));
        let out = self.ctr(&[
            "-n",
            "k8s.io",
            "images",
            "import",
            archive.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "import: {}", text(&out.stderr));
    }

    /// `ctr` against this containerd.
    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        let child = Command::new("ctr")
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        husk_test_support::output_within(child, Duration::from_secs(120), "ctr")
    }

    /// Waits until CRI says its runtime and network are ready.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self
                .runtime
                .status(cri::StatusRequest { verbose: false })
                .await
                .map(|r| r.into_inner());
            let ready = status
                .as_ref()
                .ok()
                .and_then(|s| s.status.as_ref())
                .is_some_and(|s| s.conditions.iter().all(|c| c.status));
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "CRI never became ready: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A pod sandbox config named `name`, its logs under this
    /// containerd's directory.
    pub fn pod_config(&self, name: &str) -> cri::PodSandboxConfig {
        let logs = self.dir.join("logs").join(name);
        std::fs::create_dir_all(&logs).unwrap();
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: logs.display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig::default()),
            ..Default::default()
        }
    }

    /// A container config of image [`BUSYBOX`] running `command`, its log
    /// at `<name>.log` in the pod's log directory.
    pub fn container_config(name: &str, command: &[&str]) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: BUSYBOX.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        }
    }

    /// RunPodSandbox with `handler`; returns the pod's ID.
    pub async fn run_pod(&mut self, config: &cri::PodSandboxConfig, handler: &str) -> String {
        self.runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"))
            .into_inner()
            .pod_sandbox_id
    }

    /// CreateContainer and StartContainer; returns the container's ID.
    pub async fn start_container(
        &mut self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> String {
        let id = self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {e}"))
            .into_inner()
            .container_id;
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartContainer: {e}"));
        id
    }

    /// ExecSync: (exit code, stdout, stderr).
    pub async fn exec(&mut self, id: &str, cmd: &[&str]) -> (i32, String, String) {
        let r = self
            .runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 60,
            })
            .await
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"))
            .into_inner();
        (r.exit_code, text(&r.stdout), text(&r.stderr))
    }

    /// The pod's network namespace on the host (the sandbox's spec, in
    /// containerd's verbose PodSandboxStatus).
    pub async fn pod_netns(&mut self, pod: &str) -> PathBuf {
        let status = self
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: true,
            })
            .await
            .unwrap_or_else(|e| panic!("PodSandboxStatus: {e}"))
            .into_inner();
        let info: serde_json::Value =
            serde_json::from_str(status.info.get("info").expect("verbose info")).unwrap();
        let namespaces = info["runtimeSpec"]["linux"]["namespaces"].as_array();
        let path = namespaces
            .into_iter()
            .flatten()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str());
        PathBuf::from(path.unwrap_or_else(|| panic!("no network namespace in {info}")))
    }

    /// ContainerStatus.
    pub async fn container_status(&mut self, id: &str) -> cri::ContainerStatus {
        self.runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap_or_else(|e| panic!("ContainerStatus: {e}"))
            .into_inner()
            .status
            .expect("a status")
    }

    /// Waits (60 s at most) until container `id` has exited; returns its
    /// status.
    pub async fn wait_exited(&mut self, id: &str) -> cri::ContainerStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.container_status(id).await;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} never exited: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// StopPodSandbox and RemovePodSandbox.
    pub async fn remove_pod(&mut self, pod: &str) {
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("StopPodSandbox: {e}"));
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}"));
    }

    /// What of pod `pod` (and its containers `ids`) is left on the host:
    /// processes naming them, mounts and task bundles under this
    /// containerd's directories.
    pub fn leftovers(&self, pod: &str, ids: &[&str]) -> Vec<String> {
        let mut left = Vec::new();
        for id in std::iter::once(pod).chain(ids.iter().copied()) {
            for pid in processes_with(&[id]) {
                left.push(format!("process {pid} of {id}"));
            }
        }
        let dir = self.dir.display().to_string();
        for m in std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
        {
            if m.starts_with(&dir)
                && std::iter::once(pod)
                    .chain(ids.iter().copied())
                    .any(|id| m.contains(id))
            {
                left.push(format!("mount {m}"));
            }
        }
        let bundles = self.dir.join("state/io.containerd.runtime.v2.task/k8s.io");
        for e in std::fs::read_dir(bundles).into_iter().flatten().flatten() {
            left.push(format!("bundle {}", e.file_name().to_string_lossy()));
        }
        left
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A test that failed left pods: removed as a kubelet would, so that
        // CRI takes their network namespaces down. (On a thread of its
        // own with a connection of its own: the test's runtime, which the
        // test's connection runs on, may be this thread's.)
        // Every VM and shim of the test's first (a guest that stopped
        // answering would hold CRI's StopPodSandbox for ever), then its
        // pods through CRI.
        let dir = self.dir.display().to_string();
        for pid in processes_with(&[&dir]) {
            if pid != self.child.id() {
                husk_test_support::kill(pid, rustix::process::Signal::KILL);
            }
        }
        let socket = self.dir.join("containerd.sock");
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let teardown = async {
                let mut runtime = RuntimeServiceClient::new(connect(&socket).await);
                let pods = runtime
                    .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                    .await;
                let Ok(pods) = pods else {
                    return;
                };
                for pod in pods.into_inner().items {
                    let id = pod.id;
                    let _ = tokio::time::timeout(Duration::from_secs(60), async {
                        let _ = runtime
                            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                                pod_sandbox_id: id.clone(),
                            })
                            .await;
                        let _ = runtime
                            .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                            .await;
                    })
                    .await;
                }
            };
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(120), teardown).await })
        })
        .join();
        husk_test_support::kill(self.child.id(), rustix::process::Signal::TERM);
        let _ = self.child.wait();
        // Whatever a failed test left: its shims' VMs end with them.
        for pid in processes_with(&[&self.dir.display().to_string()]) {
            husk_test_support::kill(pid, rustix::process::Signal::KILL);
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        // What containerd and the killed shims left mounted; again if a
        // cleanup of theirs still ran the first time.
        for _ in 0..5 {
            husk_test_support::unmount_under(&self.dir);
            let _ = std::fs::remove_dir_all(&self.dir);
            if !self.dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

async fn connect(socket: &Path) -> Channel {
    let socket = socket.to_owned();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect to containerd's CRI")
}
