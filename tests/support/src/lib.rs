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
pub fn output_within(child: Child, limit: Duration, what: &str) -> Output {
    let pid = Pid::from_child(&child);
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            if rustix::process::test_kill_process(pid).is_err() {
                return false;
            }
        }
        let _ = rustix::process::kill_process(pid, Signal::KILL);
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

/// Sends `signal` to process `pid`; false when there is no such process
/// (or it may not be signalled).
pub fn kill(pid: u32, signal: Signal) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .is_some_and(|pid| rustix::process::kill_process(pid, signal).is_ok())
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
}
