//! Helpers the end-to-end tests of `husk` and `husk-vmm` share: output as
//! text, a program's output within a time limit, a fresh scratch
//! directory, and the static guest binaries the Makefile builds.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// Bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The child's output once it exits (spawned with piped stdout and
/// stderr, which are drained as it runs); killed, and the test failed, if
/// it runs longer than `limit`. What it printed until then is in the
/// failure: the end of a long run says what it was doing.
///
/// At the limit, whatever else holds the child's output pipes open (its
/// monitor, a VMM: processes it started that outlive it) is killed too,
/// so that the failure comes at the limit rather than when the test
/// harness gives up on the test.
pub fn output_within(child: Child, limit: Duration, what: &str) -> Output {
    let pid = Pid::from_child(&child);
    let pipes: Vec<u64> = [
        child
            .stdout
            .as_ref()
            .and_then(|f| rustix::fs::fstat(f).ok()),
        child
            .stderr
            .as_ref()
            .and_then(|f| rustix::fs::fstat(f).ok()),
    ]
    .into_iter()
    .flatten()
    .map(|st| st.st_ino)
    .collect();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            if rustix::process::test_kill_process(pid).is_err() {
                return false;
            }
        }
        let _ = rustix::process::kill_process(pid, Signal::KILL);
        for holder in pipe_holders(&pipes) {
            let _ = rustix::process::kill_process(holder, Signal::KILL);
        }
        true
    });
    let out = child.wait_with_output().unwrap();
    assert!(
        !watchdog.join().unwrap(),
        "{what} did not finish in time ({limit:?}); it printed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Other processes with a descriptor on one of the pipes `inodes`.
fn pipe_holders(inodes: &[u64]) -> Vec<Pid> {
    let me = std::process::id();
    let names: Vec<String> = inodes.iter().map(|i| format!("pipe:[{i}]")).collect();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if n == me {
            continue;
        }
        let holds = std::fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|l| names.iter().any(|name| l.as_os_str() == name.as_str()))
            });
        if holds && let Some(p) = i32::try_from(n).ok().and_then(Pid::from_raw) {
            out.push(p);
        }
    }
    out
}

/// Whether process `pid` is there and not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Sends `signal` to process `pid`; false when there is no such process
/// (or it may not be signalled).
pub fn kill(pid: u32, signal: Signal) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .is_some_and(|pid| rustix::process::kill_process(pid, signal).is_ok())
}

/// Detaches every mount under `dir` (deepest first): what a test's
/// daemon left mounted when it was killed.
pub fn unmount_under(dir: &Path) {
    let dir = dir.display().to_string();
    let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&dir))
        .map(str::to_owned)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = rustix::mount::unmount(p.as_str(), rustix::mount::UnmountFlags::DETACH);
    }
}

/// A fresh, empty directory `husk-<kind>-<name>-<pid>` under the temporary
/// directory.
pub fn scratch(kind: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("husk-{kind}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The workspace's target directory (`$CARGO_TARGET_DIR`, else
/// `target/` at the workspace root).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// A static guest binary the Makefile builds for musl (`make
/// <make_target>`); a missing one fails the test, naming the target that
/// builds it.
pub fn musl_binary(name: &str, make_target: &str) -> PathBuf {
    let path = target_dir()
        .join("x86_64-unknown-linux-musl/release")
        .join(name);
    assert!(
        path.exists(),
        "no {name} at {}: build it with `make {make_target}` (make test does)",
        path.display()
    );
    path
}

/// A network namespace of the test's own (`ip netns add`), removed when
/// dropped.
pub struct Netns(pub String);

impl Netns {
    /// `husk-<name>-<pid>`, made afresh.
    pub fn new(name: &str) -> Self {
        let name = format!("husk-{name}-{}", std::process::id());
        // A namespace left by an earlier run of the same PID, if any.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let made = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(made.success(), "ip netns add {name}");
        Self(name)
    }

    /// The namespace's file, as a spec or `setns` names it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns");
            f()
        })
        .join()
        .unwrap()
    }

    /// `ip -n <ns> args`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let ok = std::process::Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .status()
            .unwrap();
        assert!(ok.success(), "ip -n {} {args:?}", self.0);
    }

    /// What `program args` prints in the namespace (`ip netns exec`).
    pub fn output(&self, program: &str, args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .output()
            .unwrap();
        text(&out.stdout) + &text(&out.stderr)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// `GET /` over HTTP/1.0 from `addr` (`IP:PORT`), tried again until it
/// answers 200 (a server in a VM takes a while to listen): the whole
/// response. Panics after `within`.
pub fn http_get(addr: &str, within: Duration) -> String {
    use std::io::{Read, Write};
    let deadline = Instant::now() + within;
    loop {
        let got =
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                    let mut body = String::new();
                    s.read_to_string(&mut body)?;
                    Ok(body)
                });
        match got {
            Ok(body) if body.contains("200") => return body,
            other => {
                assert!(Instant::now() < deadline, "GET {addr}: {other:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel's
/// pick).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a TCP port on 127.0.0.1")
        .port()
}

/// PIDs of the processes (other than this one) whose command lines hold
/// every one of `words`.
pub fn processes_with(words: &[&str]) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let c = std::fs::read(e.path().join("cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c);
            (pid != me && words.iter().all(|w| c.contains(w))).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn output_comes_back_and_a_hung_child_is_killed_and_named() {
        let child = Command::new("sh")
            .args(["-c", "echo out; echo err >&2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = output_within(child, Duration::from_secs(30), "sh");
        assert_eq!(
            (text(&out.stdout), text(&out.stderr)),
            ("out\n".into(), "err\n".into())
        );
        let hung = Command::new("sh")
            .args(["-c", "echo started; exec sleep 60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let failed = std::panic::catch_unwind(|| {
            output_within(hung, Duration::from_millis(500), "the sleeper")
        })
        .unwrap_err();
        let message = failed.downcast_ref::<String>().unwrap();
        assert!(
            message.contains("the sleeper did not finish in time"),
            "{message}"
        );
        assert!(message.contains("started"), "{message}");
    }

    #[test]
    fn scratch_is_fresh_and_the_target_dir_is_the_workspaces() {
        let dir = scratch("support", "fresh");
        std::fs::write(dir.join("x"), b"x").unwrap();
        let again = scratch("support", "fresh");
        assert_eq!(dir, again);
        assert!(!again.join("x").exists());
        std::fs::remove_dir_all(again).unwrap();
        assert!(target_dir().ends_with("target"));
    }

    /// A child past its limit fails the test at the limit, with what it
    /// printed, even when a process it started holds its output open.
    #[test]
    fn a_child_past_its_limit_is_ended_with_what_holds_its_output() {
        let child = Command::new("sh")
            .args(["-c", "sleep 300 & echo started; sleep 300"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            output_within(child, Duration::from_secs(1), "the sleeper")
        }));
        let message = failed.expect_err("it ran past its limit");
        let message = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(
            message.contains("the sleeper did not finish in time"),
            "{message}"
        );
        assert!(message.contains("started"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(60));
    }
}
