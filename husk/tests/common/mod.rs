//! Helpers shared by the runtime's tests: husk's test root (whose
//! warm-start cache survives between runs) and busybox bundles.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use husk_docker::busybox;
use oci_spec::runtime::Spec;

/// The `husk` binary cargo built for these tests.
pub const HUSK: &str = env!("CARGO_BIN_EXE_husk");

/// The tests' `--root`: under the cache, so its warm-start snapshot is
/// made once per kernel and agent, not once per run.
pub fn root() -> PathBuf {
    reap_on_exit();
    husk_protocol::paths::cache_dir().join("test-root")
}

/// A busybox bundle in a temporary directory, removed when dropped.
pub struct Bundle(pub PathBuf);

impl Bundle {
    /// A busybox bundle running `args`, its spec changed by `edit`.
    pub fn new(name: &str, args: &[&str], edit: impl FnOnce(&mut Spec)) -> Self {
        let dir = std::env::temp_dir().join(format!("husk-bundle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        busybox::make_bundle(&dir, args).unwrap();
        let mut spec = busybox::config(args);
        edit(&mut spec);
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&spec).unwrap(),
        )
        .unwrap();
        Self(dir)
    }

    /// Its root filesystem.
    pub fn rootfs(&self) -> PathBuf {
        self.0.join("rootfs")
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A container ID unique to this test process.
pub fn id(name: &str) -> String {
    reap_on_exit();
    format!("{name}-{}", std::process::id())
}

/// The reaper's script: waits for process `$1` to end, then SIGKILLs every
/// husk, husk-vmm and containerd process whose command line holds `-$1`
/// as a word's end (the test's IDs and directories all end so), and
/// lazily unmounts every mount whose path does.
const REAPER: &str = r#"
t=$1
while kill -0 "$t" 2>/dev/null; do sleep 1; done
mark="-$t([^0-9]|\$)"
for p in /proc/[0-9]*; do
  n=${p#/proc/}
  [ "$n" = $$ ] && continue
  c=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null) || continue
  case "$c" in *husk*|*containerd*) ;; *) continue ;; esac
  printf '%s\n' "$c" | grep -Eq -- "$mark" && kill -9 "$n" 2>/dev/null
done
grep -E -- "$mark" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
exit 0
"#;

/// Starts a reaper for process `pid`, in a session of its own so that
/// whatever kills `pid` (nextest's timeout: SIGTERM, then SIGKILL to the
/// test's process group) does not reach it: when `pid` ends, the
/// containers, VMMs, monitors and containerds it started (named with
/// `-PID`) are killed and their mounts let go. Issue 14: timed-out tests
/// left VMs running for 40 minutes.
pub fn spawn_reaper(pid: u32) -> Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(REAPER)
        .arg("husk-test-reaper")
        .arg(pid.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // A process group of its own: nextest's kill of the test's group does
    // not reach it.
    cmd.process_group(0);
    cmd.spawn().expect("/bin/sh for the test reaper")
}

/// Starts this test process's reaper ([`spawn_reaper`]), once.
pub fn reap_on_exit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Not waited for: it ends after this process does.
        std::mem::forget(spawn_reaper(std::process::id()));
    });
}

// Not every test binary uses each of these.
#[allow(unused_imports)]
pub use husk_test_support::{output_within, scratch, text};

/// `--root <root>` in front of `args`, unless they name a root.
pub fn with_root(args: &[&str]) -> Vec<std::ffi::OsString> {
    let mut all: Vec<std::ffi::OsString> = Vec::new();
    if args.first() != Some(&"--root") {
        all.push("--root".into());
        all.push(root().into());
    }
    all.extend(args.iter().map(Into::into));
    all
}

/// Runs `husk --root <root> args...` to completion (60 s at most). Its
/// output goes to files, not pipes: `create` and `restore -d` hand their
/// stdio to the container's monitor, which keeps it open after they exit.
pub fn husk(args: &[&str]) -> Output {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("husk-cmd-out-{}-{n}", std::process::id()));
    let (out_path, err_path) = (base.with_extension("out"), base.with_extension("err"));
    let mut child = std::process::Command::new(HUSK)
        .args(with_root(args))
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let status = exit_within_a_minute(&mut child, args);
    let out = Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(out_path);
    let _ = std::fs::remove_file(err_path);
    out
}

/// The exit status of `husk args...` (`child`); killed, and the test
/// failed, after 60 s. Output that goes to files is not waited for.
pub fn exit_within_a_minute(child: &mut Child, args: &[&str]) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("husk {args:?} did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`husk`], which must succeed; its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = husk(args);
    assert!(out.status.success(), "husk {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// [`husk`], which must fail with a message containing `says`.
pub fn refused(args: &[&str], says: &str) -> Output {
    let out = husk(args);
    assert!(!out.status.success(), "husk {args:?} should fail");
    let err = text(&out.stderr);
    assert!(err.contains(says), "husk {args:?}: {err}");
    out
}

/// A container's status, as `husk state` reports it.
pub fn status(id: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&ok(&["state", id])).unwrap();
    v["status"].as_str().unwrap().to_owned()
}

/// The numbers in a counter file, one per line.
pub fn counted(path: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The static vector-register checker (tests/test-init), built by `make
/// test-init`.
pub fn vector_checker() -> std::path::PathBuf {
    husk_test_support::musl_binary("husk-vector-check", "test-init")
}

/// Issue 13's stress load: four concurrent loops of `rounds` rounds of
/// pipelines doing string, memory and floating-point work, each result
/// checked; `after_round` runs after each round, each loop's output goes
/// where `redirect` says, and each loop ends with `loopN failures=F`. The
/// shell then waits for all four.
pub fn pipeline_loops(rounds: u32, after_round: &str, redirect: &str) -> String {
    format!(
        r#"for l in 1 2 3 4; do
  (f=0
   for i in $(seq {rounds}); do
     n=$(head -c 4096 /dev/urandom | od -An -tx1 | tr -d ' \n' | wc -c)
     [ "$n" = 8192 ] || {{ f=$((f+1)); echo "loop$l: od gave $n"; }}
     s=$(seq 1 300 | awk '{{ s += $1 * $1 }} END {{ print s }}' | cat | cat)
     [ "$s" = 9045050 ] || {{ f=$((f+1)); echo "loop$l: awk gave $s"; }}
     {after_round}
   done
   echo "loop$l failures=$f") {redirect} &
done
wait
"#
    )
}

/// What `pipeline_loops` and `husk-vector-check` printed: no crash, no
/// failed pipeline in any of the four loops, and the checker's registers
/// intact.
pub fn assert_pipelines_and_vectors_ok(output: &str) {
    assert!(!output.contains("Segmentation fault"), "{output}");
    assert!(!output.contains("Illegal instruction"), "{output}");
    for l in 1..=4 {
        let want = format!("loop{l} failures=0");
        assert!(output.lines().any(|x| x == want), "{output}");
    }
    assert!(
        output
            .lines()
            .any(|x| x.starts_with("husk-vector-check: ok ")),
        "{output}"
    );
}

/// husk with a root (and image store) of the test's own.
pub struct Husk {
    /// Its `--root`.
    pub root: PathBuf,
}

impl Husk {
    /// With a new root under the scratch directory.
    pub fn new(name: &str) -> Self {
        reap_on_exit();
        Self {
            root: scratch("img", &format!("root-{name}")),
        }
    }

    /// `husk --root <its root> args`, stdin from /dev/null.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(HUSK);
        cmd.arg("--root")
            .arg(&self.root)
            .args(args)
            .env(husk_guest::warm::CACHE_ENV, root())
            .stdin(Stdio::null());
        cmd
    }

    /// [`Husk::cmd`] to completion (180 s at most).
    pub fn run(&self, args: &[&str]) -> Output {
        let child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        output_within(child, Duration::from_secs(180), &format!("husk {args:?}"))
    }

    /// [`Husk::run`], which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "husk {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// [`Husk::run`], which must fail; its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "husk {args:?} succeeded: {}",
            text(&out.stdout)
        );
        text(&out.stderr)
    }
}

impl Drop for Husk {
    fn drop(&mut self) {
        // Containers left by a failed test: removed with their mounts.
        let docker = self.root.join("docker");
        for entry in std::fs::read_dir(&docker).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let _ = self.run(&["rm", "-f", &name]);
        }
        // Its networks (the default one, made on first use): their
        // bridges and the subnets they claim go too.
        let listed = self.run(&["network", "ls", "-q"]);
        for name in text(&listed.stdout).lines() {
            let _ = self.run(&["network", "rm", name]);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Debian's docker-registry on 127.0.0.1, its storage in a temporary
/// directory; stopped and removed when dropped.
pub struct Registry {
    dir: PathBuf,
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Registry {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, None)
    }

    /// With basic auth for `user:password` (an htpasswd file made with
    /// apache2-utils' htpasswd, bcrypt as the registry wants).
    pub fn start_with(name: &str, basic: Option<(&str, &str)>) -> Self {
        let dir = scratch("img", &format!("registry-{name}"));
        let port = husk_test_support::free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("storage").display()
        );
        if let Some((user, password)) = basic {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils; make test installs it)");
            assert!(out.status.success());
            std::fs::write(dir.join("htpasswd"), out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: husk-test\n    path: {}\n",
                dir.join("htpasswd").display()
            ));
        }
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (Debian's docker-registry; make test installs it)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { dir, child, port }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
