//! What a command hands the monitor it starts, and what the monitor
//! answers: one socket pair, the monitor's end at its descriptor 3.
//!
//! `create` (and `restore`) reads and checks the bundle, claims the
//! container's state directory and writes its first state; a detached
//! `exec` builds the process to run. Each then starts `husk _monitor` and
//! sends it what it made ([`Handoff`], JSON, then end of file), so that the
//! monitor neither reads `config.json` again (a bundle changed in between
//! would otherwise be read as two different specs) nor rereads the state
//! its starter just wrote (issue 15: the path without back-and-forth). The
//! monitor answers on the same socket: `ok` once the container (or
//! process) is set up, or what failed.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use husk_guest::shape::Shape;
use husk_protocol::Process;
use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::state::ContainerState;

/// The monitor's end of the socket, in the monitor.
pub const FD: RawFd = 3;

/// What the monitor is to do.
#[derive(Debug, Serialize, Deserialize)]
pub enum Handoff {
    /// Hold container `state.id`'s VM.
    Container {
        /// The state as its starter wrote it (status `creating`).
        state: Box<ContainerState>,
        /// The bundle as its starter read and checked it.
        bundle: Box<Bundle>,
        /// The checkpoint it is restored from, already checked.
        restore: Option<Restore>,
        /// `run`: the monitor also starts the process once it is made, as
        /// `start` would (no second connection to the agent, no second
        /// command), and answers once it started.
        #[serde(default)]
        start: bool,
    },
    /// Run another process in running container `id`.
    Exec {
        /// Container ID.
        id: String,
        /// The process's ID in the guest.
        exec_id: String,
        /// The process.
        process: Box<Process>,
    },
}

/// A checkpoint to restore, as `create` checked it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Restore {
    /// The checkpoint's VM snapshot directory (absolute).
    pub snapshot: PathBuf,
    /// The VM's shape, from the checkpoint.
    pub shape: Shape,
}

/// The descriptors a monitor gets as its stdio; each is duplicated, so
/// the caller keeps its own. `None` in [`start`]: the caller's stdio.
#[derive(Clone, Copy)]
pub struct Stdio3<'a> {
    /// Its standard input.
    pub stdin: BorrowedFd<'a>,
    /// Its standard output.
    pub stdout: BorrowedFd<'a>,
    /// Its standard error.
    pub stderr: BorrowedFd<'a>,
}

/// The `husk` binary monitors run as, where the calling program is not
/// husk itself (containerd's shim); unset: this program.
static HUSK: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Monitors are started from the `husk` binary at `path` from now on
/// (once per process; a second call changes nothing).
pub fn use_husk_at(path: PathBuf) {
    let _ = HUSK.set(path);
}

fn dup(fd: BorrowedFd<'_>) -> Result<Stdio, String> {
    fd.try_clone_to_owned()
        .map(Stdio::from)
        .map_err(|e| format!("cannot pass the monitor its stdio: {e}"))
}

/// How the monitor of a `run` ([`Handoff::Container`]'s `start`) answers
/// that the process it made could not start: `not started STATUS`, a line,
/// then what the guest said.
const NOT_STARTED: &str = "not started ";

/// A process that was made and could not start (no such program, not
/// executable): what the guest said, and the status a shell would give.
pub type NotStarted = (String, i32);

/// Starts a monitor (`husk --root ROOT _monitor ARGS`) with `stdio` (or
/// this process's), hands it `handoff`, and returns it once it answered
/// that it is set up; else what it said (with its exit status, once it
/// exited).
pub fn start(
    root: &Path,
    args: &[String],
    handoff: &Handoff,
    stdio: Option<Stdio3<'_>>,
) -> Result<Child, (String, Option<i32>)> {
    start_told(root, args, handoff, stdio).map(|(child, _)| child)
}

/// [`start`], for a handoff whose monitor also starts the process: with
/// what it said where the process could not start (the monitor then
/// goes on to record its end, as it does for any process).
pub fn start_told(
    root: &Path,
    args: &[String],
    handoff: &Handoff,
    stdio: Option<Stdio3<'_>>,
) -> Result<(Child, Option<NotStarted>), (String, Option<i32>)> {
    let exe = match HUSK.get() {
        Some(husk) => husk.clone(),
        None => {
            std::env::current_exe().map_err(|e| (format!("cannot find husk itself: {e}"), None))?
        }
    };
    let (mut ours, theirs) =
        UnixStream::pair().map_err(|e| (format!("cannot make a socket pair: {e}"), None))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root").arg(root).arg("_monitor").args(args);
    if let Some(stdio) = stdio {
        cmd.stdin(dup(stdio.stdin).map_err(|e| (e, None))?)
            .stdout(dup(stdio.stdout).map_err(|e| (e, None))?)
            .stderr(dup(stdio.stderr).map_err(|e| (e, None))?);
    }
    // A session of its own: a terminal's signals (Ctrl-C to a foreground
    // `husk run`) and hang-ups do not reach it; it outlives its starter.
    // No descriptor of the caller's but stdio reaches it: a caller that
    // waits for a pipe's end (containerd's shim) must not wait for the
    // container's.
    husk_sys::child::detached_with_fd(&mut cmd, theirs.as_raw_fd(), FD);
    let mut child = cmd
        .spawn()
        .map_err(|e| (format!("cannot start the monitor: {e}"), None))?;
    drop(theirs);
    // A monitor that ended early leaves the write failing (EPIPE); what it
    // said, or its end, is read below either way.
    let json = serde_json::to_vec(handoff).expect("plain data serializes");
    let _ = ours.write_all(&json);
    let _ = ours.shutdown(std::net::Shutdown::Write);
    let mut said = String::new();
    let _ = ours.read_to_string(&mut said);
    if said == "ok\n" {
        return Ok((child, None));
    }
    if let Some((status, message)) = said
        .strip_prefix(NOT_STARTED)
        .and_then(|rest| rest.split_once('\n'))
        && let Ok(status) = status.parse()
    {
        return Ok((child, Some((message.to_owned(), status))));
    }
    let status = child.wait().ok().and_then(|s| s.code());
    Err((
        if said.is_empty() {
            "the monitor ended before the container was set up".into()
        } else {
            said
        },
        status,
    ))
}

/// The monitor's side: what it was handed, and where it answers.
pub struct Channel(UnixStream);

impl Channel {
    /// Takes descriptor [`FD`], which its starter gave it, and marks it
    /// close-on-exec (the VMM must not hold it: its starter waits for its
    /// end). Call once, before anything else may open descriptors.
    pub fn take() -> Self {
        husk_sys::fd::set_cloexec(FD);
        // SAFETY: descriptor 3 was put there by `start` for this process
        // and nothing else in it owns it; `take` is called once.
        Self(unsafe { UnixStream::from_raw_fd(FD) })
    }

    /// Reads what the starter handed over, to its end.
    pub fn receive(&mut self) -> Result<Handoff, String> {
        let mut json = Vec::new();
        self.0
            .read_to_end(&mut json)
            .map_err(|e| format!("the monitor cannot read what it was handed: {e}"))?;
        serde_json::from_slice(&json)
            .map_err(|e| format!("the monitor was handed something it cannot read: {e}"))
    }

    /// Answers the starter of a `run` that the process was made and could
    /// not start ([`NotStarted`]). The channel ends here.
    pub fn report_not_started(mut self, message: &str, status: i32) {
        let _ = write!(self.0, "{NOT_STARTED}{status}\n{message}");
    }

    /// Answers the starter: set up, or what failed. The channel ends here.
    pub fn report(mut self, result: &Result<(), String>) {
        let _ = match result {
            Ok(()) => self.0.write_all(b"ok\n"),
            Err(e) => self.0.write_all(e.as_bytes()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handoff_comes_through_as_it_was_sent() {
        let process = Process {
            args: vec!["sh".into(), "-c".into(), "echo hi".into()],
            ..Process::default()
        };
        let sent = Handoff::Exec {
            id: "c".into(),
            exec_id: "e1".into(),
            process: Box::new(process.clone()),
        };
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut channel = Channel(b);
        a.write_all(&serde_json::to_vec(&sent).unwrap()).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        match channel.receive().unwrap() {
            Handoff::Exec {
                id,
                exec_id,
                process: got,
            } => {
                assert_eq!((id.as_str(), exec_id.as_str()), ("c", "e1"));
                assert_eq!(got.args, process.args);
            }
            other => panic!("{other:?}"),
        }
        channel.report(&Err("no such program".into()));
        let mut said = String::new();
        a.read_to_string(&mut said).unwrap();
        assert_eq!(said, "no such program");
    }

    #[test]
    fn a_truncated_handoff_is_refused_by_name() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut channel = Channel(b);
        a.write_all(br#"{"Exec":{"id":"c""#).unwrap();
        drop(a);
        let e = channel.receive().unwrap_err();
        assert!(
            e.contains("the monitor was handed something it cannot read"),
            "{e}"
        );
    }
}
