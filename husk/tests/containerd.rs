//! husk behind containerd: Debian's containerd, started by the test with
//! its own config, root, state and socket in a temporary directory, the
//! busybox image husk makes imported into it, and `ctr` driving
//! containers two ways: through containerd's runc v2 shim with
//! `--runc-binary <husk>` (husk as runc), and through husk's own shim,
//! `containerd-shim-husk-v2` (`--runtime io.containerd.husk.v2`), found
//! on containerd's `PATH` next to the husk binary.
//!
//! The runc shim gives husk a `--root` under /run/containerd per
//! namespace; husk's shim keeps a task's state in its bundle.
//! `HUSK_WARM_CACHE` points husk's warm-start cache at the suite's, so no
//! guest is booted cold here.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{HUSK, text};
use husk_test_support::processes_with;

const IMAGE: &str = husk_docker::busybox::IMAGE_NAME;

/// A containerd of the test's own, stopped (and its files removed) when
/// dropped.
struct Containerd {
    dir: PathBuf,
    child: Child,
    runtime: Runtime,
}

/// How containerd runs husk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Runtime {
    /// containerd's runc v2 shim, with husk as its runc binary.
    RuncShim,
    /// husk's own shim.
    HuskShim,
}

/// husk's shim, built next to husk (the workspace's binaries).
fn husk_shim() -> PathBuf {
    let shim = std::path::Path::new(HUSK).with_file_name("containerd-shim-husk-v2");
    assert!(
        shim.exists(),
        "{} is missing: build the workspace (cargo build -p husk-shim)",
        shim.display()
    );
    shim
}

impl Containerd {
    fn start(name: &str) -> Self {
        Self::start_with(name, Runtime::RuncShim)
    }

    fn start_with(name: &str, runtime: Runtime) -> Self {
        common::reap_on_exit();
        // Checked before anything is made: a test that fails here leaves
        // no directory behind.
        husk_shim();
        let dir = std::env::temp_dir().join(format!("husk-ctd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n",
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let child = Self::spawn(&dir);
        let me = Self {
            dir,
            child,
            runtime,
        };
        me.wait_socket();
        let archive = me.dir.join("busybox.tar");
        let made = Command::new(HUSK)
            .arg("busybox-image")
            .arg("--output")
            .arg(&archive)
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", text(&made.stderr));
        let out = me.ctr(&["images", "import", archive.to_str().unwrap()]);
        assert!(out.status.success(), "import: {}", text(&out.stderr));
        me
    }

    /// containerd on the config in `dir`, its log appended to.
    fn spawn(dir: &std::path::Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("containerd.log"))
            .unwrap();
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let path = format!(
            "{}:{}",
            husk_shim().parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            // containerd's checkpoint work directories (which 1.6 leaves
            // behind) go with the test's.
            .env("TMPDIR", &tmp)
            .env(
                husk_guest::warm::CACHE_ENV,
                husk_protocol::paths::cache_dir().join("test-root"),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (Debian's containerd package; make test installs it)")
    }

    fn wait_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket().exists() {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// containerd stopped and started again on the same root and state:
    /// its shims live on, and it reconnects to them.
    fn restart(&mut self) {
        husk_test_support::kill(self.child.id(), rustix::process::Signal::TERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.socket());
        self.child = Self::spawn(&self.dir);
        self.wait_socket();
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// `ctr` against this containerd, to completion (120 s at most).
    fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(self.socket()).args(args);
        run(cmd)
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(out.status.success(), "ctr {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// `ctr run --runtime io.containerd.runc.v2 --runc-binary <husk>`, or
    /// `ctr run --runtime io.containerd.husk.v2`.
    fn run_args<'a>(&self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = match self.runtime {
            Runtime::RuncShim => vec![
                "run",
                "--runtime",
                "io.containerd.runc.v2",
                "--runc-binary",
                HUSK,
            ],
            Runtime::HuskShim => vec!["run", "--runtime", "io.containerd.husk.v2"],
        };
        args.extend_from_slice(extra);
        args
    }

    /// The task bundles containerd holds in namespace `default`.
    fn bundles(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("state/io.containerd.runtime.v2.task/default"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }

    /// What of task `id` is left: husk state, a bundle, a VMM, a shim
    /// serving this containerd.
    fn leftovers_of(&self, id: &str) -> Vec<String> {
        let mut left = Vec::new();
        if husk_containers().iter().any(|c| c == id) {
            left.push(format!("husk state of {id}"));
        }
        if self.bundles().iter().any(|b| b == id) {
            left.push(format!("bundle of {id}"));
        }
        if husk_vmm_of(id) {
            left.push(format!("husk-vmm of {id}"));
        }
        left
    }

    /// PIDs of husk shims serving this containerd.
    fn husk_shims(&self) -> Vec<u32> {
        let address = self.socket().display().to_string();
        processes_with(&["containerd-shim-husk-v2", &address])
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        husk_test_support::kill(self.child.id(), rustix::process::Signal::TERM);
        let _ = self.child.wait();
        // A failed test's shims and their VMs; then whatever they left
        // mounted (a killed monitor's pod share).
        for pid in processes_with(&[&self.dir.display().to_string()]) {
            husk_test_support::kill(pid, rustix::process::Signal::KILL);
        }
        husk_test_support::unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::output_within(child, Duration::from_secs(120), &format!("{cmd:?}"))
}

/// husk's state directories the shim made (one per container).
fn husk_containers() -> Vec<String> {
    std::fs::read_dir("/run/containerd/runc/default/containers")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

fn task_status(ctd: &Containerd, id: &str) -> String {
    ctd.ctr_ok(&["task", "ls"])
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .unwrap_or_default()
}

fn wait_status(ctd: &Containerd, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while task_status(ctd, id) != want {
        assert!(Instant::now() < deadline, "task {id} never became {want}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ctr_runs_execs_signals_pauses_and_deletes_through_husk() {
    lifecycle(Runtime::RuncShim);
}

#[test]
fn ctr_runs_execs_signals_pauses_and_deletes_through_the_husk_shim() {
    lifecycle(Runtime::HuskShim);
}

fn lifecycle(runtime: Runtime) {
    let ctd = Containerd::start_with(&format!("life{runtime:?}"), runtime);
    let id = format!("ctr-{}", std::process::id());

    // Output and exit status of a foreground run.
    let out = ctd.ctr(&ctd.run_args(&[
        "--rm",
        IMAGE,
        &format!("{id}-echo"),
        "sh",
        "-c",
        "echo hello through containerd; exit 3",
    ]));
    assert_eq!(
        text(&out.stdout),
        "hello through containerd\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3));

    // -t: a terminal, through the shim's console socket (script gives
    // ctr a terminal of its own).
    let line = format!(
        "ctr --address {} {} --rm -t {IMAGE} {id}-tty sh -c 'tty; exit 6'",
        ctd.socket().display(),
        ctd.run_args(&[]).join(" ")
    );
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"]);
    let out = run(cmd);
    assert!(
        text(&out.stdout).contains("/dev/pts/0"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(6));

    // A detached task: exec, ps, pause, resume, SIGTERM, delete.
    let script = "trap 'echo got TERM; exit 7' TERM; sleep 1000 & wait";
    ctd.ctr_ok(&ctd.run_args(&["-d", IMAGE, &id, "sh", "-c", script]));
    wait_status(&ctd, &id, "RUNNING");
    let out = ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo in exec; exit 4",
    ]);
    assert_eq!(text(&out.stdout), "in exec\n");
    assert_eq!(out.status.code(), Some(4));
    let ps = ctd.ctr_ok(&["task", "ps", &id]);
    assert!(ps.lines().count() >= 3, "the shell and its sleep: {ps}");
    ctd.ctr_ok(&["task", "pause", &id]);
    wait_status(&ctd, &id, "PAUSED");
    ctd.ctr_ok(&["task", "resume", &id]);
    wait_status(&ctd, &id, "RUNNING");
    ctd.ctr_ok(&["task", "kill", "--signal", "SIGTERM", &id]);
    wait_status(&ctd, &id, "STOPPED");
    ctd.ctr_ok(&["task", "delete", &id]);
    ctd.ctr_ok(&["container", "rm", &id]);

    // SIGKILL.
    ctd.ctr_ok(&ctd.run_args(&["-d", IMAGE, &id, "sleep", "1000"]));
    wait_status(&ctd, &id, "RUNNING");
    ctd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", &id]);
    wait_status(&ctd, &id, "STOPPED");
    ctd.ctr_ok(&["task", "delete", &id]);
    ctd.ctr_ok(&["container", "rm", &id]);
    for id in [id.clone(), format!("{id}-echo"), format!("{id}-tty")] {
        let left = ctd.leftovers_of(&id);
        assert!(left.is_empty(), "{left:?}");
    }
    // Each shim ended with its last task.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ctd.husk_shims().is_empty() {
        assert!(
            Instant::now() < deadline,
            "shims left: {:?}",
            ctd.husk_shims()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The numbers the counting container wrote to /log, read through `ctr
/// task exec`.
fn counted(ctd: &Containerd, id: &str, exec_id: &str) -> Vec<u64> {
    ctd.ctr_ok(&["task", "exec", "--exec-id", exec_id, id, "cat", "/log"])
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn ctr_checkpoints_a_task_and_restores_it_through_husk() {
    checkpoint_and_restore(Runtime::RuncShim);
}

#[test]
fn ctr_checkpoints_a_task_and_restores_it_through_the_husk_shim() {
    checkpoint_and_restore(Runtime::HuskShim);
}

fn checkpoint_and_restore(runtime: Runtime) {
    let ctd = Containerd::start_with(&format!("ckpt{runtime:?}"), runtime);
    let id = format!("ctr-ckpt-{}", std::process::id());
    let script = "i=0; while :; do i=$((i+1)); echo $i >> /log; sleep 0.2; done";
    ctd.ctr_ok(&ctd.run_args(&["-d", IMAGE, &id, "sh", "-c", script]));
    wait_status(&ctd, &id, "RUNNING");
    let deadline = Instant::now() + Duration::from_secs(60);
    // Until its first line, /log is not there (a loaded machine starts
    // the shell later than the task shows RUNNING).
    let so_far = || {
        let cat = ["task", "exec", "--exec-id", "wait", &id, "sh", "-c"];
        let out = ctd.ctr_ok(&[&cat[..], &["cat /log 2>/dev/null; true"]].concat());
        out.lines()
            .filter(|l| l.trim().parse::<u64>().is_ok())
            .count()
    };
    while so_far() < 3 {
        assert!(Instant::now() < deadline, "it never counted");
    }
    // containerd's own checkpoint: husk's directory (the VM) and the
    // container's writable layer (which containerd keeps itself), as an
    // image in containerd's store. The task goes on.
    let image = format!("checkpoint/{id}:1");
    ctd.ctr_ok(&["containers", "checkpoint", "--task", "--rw", &id, &image]);
    assert_eq!(task_status(&ctd, &id), "RUNNING");
    ctd.ctr_ok(&["task", "kill", "-s", "KILL", &id]);
    wait_status(&ctd, &id, "STOPPED");
    ctd.ctr_ok(&["task", "delete", &id]);
    ctd.ctr_ok(&["containers", "delete", &id]);

    // Restored: the same shell counts on from its memory, with no number
    // missing or repeated.
    ctd.ctr_ok(&["containers", "restore", "--rw", "--live", &id, &image]);
    assert_eq!(task_status(&ctd, &id), "RUNNING");
    let first = counted(&ctd, &id, "after1");
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let got = counted(&ctd, &id, "after2");
        if got.len() > first.len() {
            break got;
        }
        assert!(Instant::now() < deadline, "it stopped counting");
    };
    let want: Vec<u64> = (1..=got.len() as u64).collect();
    assert_eq!(got, want, "the count restarted or skipped");
    ctd.ctr_ok(&["task", "kill", "-s", "KILL", &id]);
    wait_status(&ctd, &id, "STOPPED");
    ctd.ctr_ok(&["task", "delete", &id]);
    ctd.ctr_ok(&["containers", "delete", &id]);
    let left = ctd.leftovers_of(&id);
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn ten_containers_at_once_are_all_cleaned_up() {
    ten_at_once(Runtime::RuncShim);
}

#[test]
fn ten_containers_at_once_through_the_husk_shim_are_all_cleaned_up() {
    ten_at_once(Runtime::HuskShim);
}

fn ten_at_once(runtime: Runtime) {
    let ctd = Containerd::start_with(&format!("ten{runtime:?}"), runtime);
    let ids: Vec<String> = (0..10)
        .map(|i| format!("ten-{i}-{}", std::process::id()))
        .collect();
    for id in &ids {
        ctd.ctr_ok(&ctd.run_args(&["-d", IMAGE, id, "sleep", "1000"]));
    }
    for id in &ids {
        wait_status(&ctd, id, "RUNNING");
    }
    for id in &ids {
        ctd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", id]);
    }
    for id in &ids {
        wait_status(&ctd, id, "STOPPED");
        ctd.ctr_ok(&["task", "delete", id]);
        ctd.ctr_ok(&["container", "rm", id]);
    }
    let left: Vec<String> = ids.iter().flat_map(|id| ctd.leftovers_of(id)).collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Whether a husk-vmm of container `id` still runs.
fn husk_vmm_of(id: &str) -> bool {
    !processes_with(&["husk-vmm", &format!("/{id}/")]).is_empty()
}

/// A network namespace wired by Debian's CNI bridge plugin (as a CRI
/// plugin or `ctr run --cni` would wire one), removed with CNI DEL when
/// dropped.
struct CniNetns {
    path: PathBuf,
    list: serde_json::Value,
    ip: String,
}

impl CniNetns {
    fn new(name: &str) -> Self {
        let n = std::process::id() % 200 + 20;
        let bridge = format!("huskcd{n}");
        let ns = format!("husk-cni-{name}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &ns])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let path = PathBuf::from("/run/netns").join(&ns);
        let list = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": bridge,
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("10.98.{n}.0/24")}]],
                    "dataDir": std::env::temp_dir().join(format!("husk-cni-ipam-{}", std::process::id())),
                }
            }]
        });
        let result = husk_docker::cni::add(&list, &Self::invocation(&path)).unwrap();
        let ip = husk_docker::cni::ipv4(&result).unwrap().to_string();
        Self { path, list, ip }
    }

    fn invocation(path: &std::path::Path) -> husk_docker::cni::Invocation<'_> {
        husk_docker::cni::Invocation {
            container_id: "husk-containerd-cni-test",
            netns: path,
            ifname: "eth0",
            runtime_config: &serde_json::Value::Null,
        }
    }
}

impl Drop for CniNetns {
    fn drop(&mut self) {
        let _ = husk_docker::cni::del(&self.list, &Self::invocation(&self.path), None);
        let ns = self.path.file_name().unwrap().to_str().unwrap();
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        let bridge = self.list["name"].as_str().unwrap();
        let _ = Command::new("ip").args(["link", "del", bridge]).output();
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("husk-cni-ipam-{}", std::process::id())),
        );
    }
}

#[test]
fn a_task_in_a_namespace_cni_wired_is_reached_at_its_cni_address() {
    let ctd = Containerd::start("cni");
    let net = CniNetns::new("ctd");
    let id = format!("ctr-cni-{}", std::process::id());
    let with_ns = format!("network:{}", net.path.display());
    ctd.ctr_ok(&ctd.run_args(&[
        "-d",
        "--with-ns",
        &with_ns,
        IMAGE,
        &id,
        "sh",
        "-c",
        "mkdir -p /www && echo hello over CNI > /www/index.html && exec httpd -f -p 80 -h /www",
    ]));
    wait_status(&ctd, &id, "RUNNING");
    let page = husk_test_support::http_get(&format!("{}:80", net.ip), Duration::from_secs(60));
    assert!(page.contains("hello over CNI"), "{page}");
    let addr = ctd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "ip",
        &id,
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
        "eth0",
    ]);
    assert!(addr.contains(&format!("inet {}/24", net.ip)), "{addr}");
    ctd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", &id]);
    wait_status(&ctd, &id, "STOPPED");
    ctd.ctr_ok(&["task", "delete", &id]);
    ctd.ctr_ok(&["container", "rm", &id]);
    // The namespace's interface is let go: no TAP, no ingress qdisc.
    let links = Command::new("ip")
        .args([
            "-n",
            net.path.file_name().unwrap().to_str().unwrap(),
            "-o",
            "link",
        ])
        .output()
        .unwrap();
    assert!(
        !text(&links.stdout).contains("husk-tap"),
        "{}",
        text(&links.stdout)
    );
}

/// `ctr run` arguments of a task of pod `pod` as CRI annotates it:
/// `kind` is `sandbox` or `container`.
fn pod_annotations(kind: &str, pod: &str) -> [String; 4] {
    [
        "--annotation".into(),
        format!("io.kubernetes.cri.container-type={kind}"),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={pod}"),
    ]
}

/// The PID containerd reports for task `id`.
fn task_pid(ctd: &Containerd, id: &str) -> u32 {
    ctd.ctr_ok(&["task", "ls"])
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("task {id} has no PID"))
}

/// Mounts under containerd's directory (its bundles' roots, husk's pod
/// shares).
fn mounts_under(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&dir.display().to_string()))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_pod_is_one_vm_sharing_localhost_and_volumes_through_the_husk_shim() {
    let ctd = Containerd::start_with("pod", Runtime::HuskShim);
    let pod = format!("pod-{}", std::process::id());
    let (c1, c2) = (format!("{pod}-c1"), format!("{pod}-c2"));
    let shared = ctd.dir.join("emptydir");
    std::fs::create_dir_all(&shared).unwrap();
    let volume = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        shared.display()
    );
    let run = |kind: &str, id: &str, extra: &[&str], cmd: &[&str]| {
        let annotations = pod_annotations(kind, &pod);
        let mut args: Vec<&str> = annotations.iter().map(String::as_str).collect();
        args.extend(extra);
        args.extend(["-d", IMAGE, id]);
        args.extend(cmd);
        ctd.ctr_ok(&ctd.run_args(&args));
    };
    let exec = |id: &str, exec_id: &str, cmd: &[&str]| {
        let mut args = vec!["task", "exec", "--exec-id", exec_id, id];
        args.extend(cmd);
        ctd.ctr_ok(&args)
    };

    // The sandbox serves on the pod's localhost.
    run(
        "sandbox",
        &pod,
        &[],
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello-from-the-sandbox > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    );
    wait_status(&ctd, &pod, "RUNNING");
    let ipc = format!("ipc:/proc/{}/ns/ipc", task_pid(&ctd, &pod));
    run(
        "container",
        &c1,
        &["--with-ns", &ipc, "--mount", &volume],
        &["sleep", "1000"],
    );
    run("container", &c2, &["--mount", &volume], &["sleep", "1000"]);
    wait_status(&ctd, &c1, "RUNNING");
    wait_status(&ctd, &c2, "RUNNING");

    // One shim and one VM for the pod.
    assert_eq!(ctd.husk_shims().len(), 1);
    assert_eq!(
        processes_with(&["husk-vmm", &format!("/{pod}/")]).len(),
        1,
        "the pod's VM"
    );
    assert!(!husk_vmm_of(&c1) && !husk_vmm_of(&c2), "a VM per container");

    // localhost is the pod's.
    let page = exec(
        &c1,
        "web",
        &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"],
    );
    assert!(page.contains("hello-from-the-sandbox"), "{page}");

    // c1 joined the sandbox's IPC namespace (by the path CRI would give);
    // c2 did not; each has a PID namespace of its own.
    let ns = |id: &str, kind: &str| {
        exec(
            id,
            &format!("ns-{kind}"),
            &["readlink", &format!("/proc/self/ns/{kind}")],
        )
    };
    assert_eq!(ns(&c1, "ipc"), ns(&pod, "ipc"));
    assert_ne!(ns(&c2, "ipc"), ns(&pod, "ipc"));
    assert_ne!(ns(&c1, "pid"), ns(&pod, "pid"));
    assert_ne!(ns(&c1, "pid"), ns(&c2, "pid"));

    // An emptyDir-style volume: one directory, seen by both and the host.
    exec(&c1, "write", &["sh", "-c", "echo written-by-c1 > /data/f"]);
    assert_eq!(exec(&c2, "read", &["cat", "/data/f"]), "written-by-c1\n");
    assert_eq!(
        std::fs::read_to_string(shared.join("f")).unwrap(),
        "written-by-c1\n"
    );

    // A container's metrics are its own cgroup's.
    let metrics = ctd.ctr_ok(&["task", "metrics", "--format", "json", &c2]);
    let m: serde_json::Value = serde_json::from_str(&metrics).unwrap();
    assert!(m["pids"]["current"].as_u64().unwrap_or(0) >= 1, "{metrics}");

    // One container ends; the pod goes on, and nothing of it is left in
    // the pod share.
    ctd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", &c1]);
    wait_status(&ctd, &c1, "STOPPED");
    assert_eq!(task_status(&ctd, &pod), "RUNNING");
    ctd.ctr_ok(&["task", "delete", &c1]);
    ctd.ctr_ok(&["container", "rm", &c1]);
    assert!(
        !mounts_under(&ctd.dir)
            .iter()
            .any(|m| m.contains(&format!("c-{c1}"))),
        "{:?}",
        mounts_under(&ctd.dir)
    );
    let page = exec(
        &c2,
        "web2",
        &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"],
    );
    assert!(page.contains("hello-from-the-sandbox"), "{page}");

    // The pod's VM killed: every container of it exits.
    let vmm = processes_with(&["husk-vmm", &format!("/{pod}/")]);
    husk_test_support::kill(vmm[0], rustix::process::Signal::KILL);
    wait_status(&ctd, &pod, "STOPPED");
    wait_status(&ctd, &c2, "STOPPED");
    for id in [&c2, &pod] {
        ctd.ctr_ok(&["task", "delete", id]);
        ctd.ctr_ok(&["container", "rm", id]);
        let left = ctd.leftovers_of(id);
        assert!(left.is_empty(), "{left:?}");
    }
    assert_eq!(
        std::fs::read_to_string(shared.join("f")).unwrap(),
        "written-by-c1\n",
        "the volume's files"
    );
    let root = ctd.dir.join("root");
    let mounts: Vec<String> = mounts_under(&ctd.dir)
        .into_iter()
        .filter(|m| !m.starts_with(&root.display().to_string()))
        .collect();
    assert!(mounts.is_empty(), "{mounts:?}");
}

#[test]
fn the_husk_shim_refuses_a_podless_container_and_cleans_up_after_a_killed_shim() {
    let ctd = Containerd::start_with("faults", Runtime::HuskShim);
    let pod = format!("pod-{}", std::process::id());
    let member = format!("{pod}-c");
    let run = |kind: &str, id: &str| {
        let annotations = pod_annotations(kind, &pod);
        let mut args: Vec<&str> = annotations.iter().map(String::as_str).collect();
        args.extend(["-d", IMAGE, id, "sleep", "1000"]);
        ctd.ctr(&ctd.run_args(&args))
    };
    let out = run("sandbox", &pod);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run("container", &member);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_status(&ctd, &pod, "RUNNING");
    wait_status(&ctd, &member, "RUNNING");

    // A container of a pod that has no sandbox: refused by name, nothing
    // left of it.
    let orphan = format!("{pod}-orphan");
    let annotations = pod_annotations("container", "no-such-pod");
    let mut args: Vec<&str> = annotations.iter().map(String::as_str).collect();
    args.extend(["-d", IMAGE, &orphan, "true"]);
    let out = ctd.ctr(&ctd.run_args(&args));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("pod no-such-pod has no running sandbox"),
        "{}",
        text(&out.stderr)
    );
    let _ = ctd.ctr(&["container", "rm", &orphan]);
    assert!(ctd.leftovers_of(&orphan).is_empty());

    // A checkpoint of one container of a pod (containerd pauses it
    // first): refused, naming the pod, and the pod runs on.
    let out = ctd.ctr(&["task", "checkpoint", &member]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("a container of a pod shares its VM"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(task_status(&ctd, &member), "RUNNING");

    // Metrics from the guest's cgroup.
    let metrics = ctd.ctr_ok(&["task", "metrics", "--format", "json", &pod]);
    let m: serde_json::Value = serde_json::from_str(&metrics).unwrap();
    assert!(
        m["memory"]["usage"].as_u64().unwrap_or(0) > 0,
        "no memory use in {metrics}"
    );

    // The shim killed: containerd cleans up after it, and nothing of the
    // pod is left running.
    let shim = ctd.husk_shims();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", shim[0])).unwrap();
    let socket = text(&cmdline)
        .split('\0')
        .find_map(|a| a.strip_prefix("unix://").map(PathBuf::from))
        .expect("the shim's -socket");
    assert!(socket.exists());
    husk_test_support::kill(shim[0], rustix::process::Signal::KILL);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let running = processes_with(&["husk", &format!("/{pod}")]);
        if running.is_empty() && ctd.bundles().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left after the shim was killed: processes {running:?}, bundles {:?}",
            ctd.bundles()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!socket.exists(), "the dead shim's socket is left");
    for id in [&pod, &member] {
        let _ = ctd.ctr(&["task", "delete", id]);
        ctd.ctr_ok(&["container", "rm", id]);
        let left = ctd.leftovers_of(id);
        assert!(left.is_empty(), "{left:?}");
    }
    let root = ctd.dir.join("root");
    let mounts: Vec<String> = mounts_under(&ctd.dir)
        .into_iter()
        .filter(|m| !m.starts_with(&root.display().to_string()))
        .collect();
    assert!(mounts.is_empty(), "{mounts:?}");
}

#[test]
fn containerd_restarted_finds_the_husk_shims_tasks_still_running() {
    let mut ctd = Containerd::start_with("restart", Runtime::HuskShim);
    let id = format!("ctr-restart-{}", std::process::id());
    ctd.ctr_ok(&ctd.run_args(&["-d", IMAGE, &id, "sleep", "1000"]));
    wait_status(&ctd, &id, "RUNNING");
    let shims = ctd.husk_shims();
    ctd.restart();
    // The same shim and task: containerd reconnected (Connect), and the
    // task answers as before.
    wait_status(&ctd, &id, "RUNNING");
    assert_eq!(ctd.husk_shims(), shims);
    let out = ctd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        &id,
        "echo",
        "still here",
    ]);
    assert_eq!(out, "still here\n");
    ctd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", &id]);
    wait_status(&ctd, &id, "STOPPED");
    ctd.ctr_ok(&["task", "delete", &id]);
    ctd.ctr_ok(&["container", "rm", &id]);
    let left = ctd.leftovers_of(&id);
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_sigkill_the_guest_cannot_take_kills_the_vm_through_the_husk_shim() {
    let ctd = Containerd::start_with("frozen", Runtime::HuskShim);
    let id = format!("ctr-frozen-{}", std::process::id());
    ctd.ctr_ok(&ctd.run_args(&["-d", IMAGE, &id, "sleep", "1000"]));
    wait_status(&ctd, &id, "RUNNING");
    // The guest stops answering: its VMM stopped.
    let vmm = processes_with(&["husk-vmm", &format!("/{id}/")]);
    assert_eq!(vmm.len(), 1);
    husk_test_support::kill(vmm[0], rustix::process::Signal::STOP);
    // SIGKILL still ends the task: the shim kills the VM.
    ctd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", &id]);
    wait_status(&ctd, &id, "STOPPED");
    assert!(processes_with(&["husk-vmm", &format!("/{id}/")]).is_empty());
    ctd.ctr_ok(&["task", "delete", &id]);
    ctd.ctr_ok(&["container", "rm", &id]);
    let left = ctd.leftovers_of(&id);
    assert!(left.is_empty(), "{left:?}");
}
