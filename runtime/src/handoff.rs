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
use std::process::{Child, Command, ExitStatus, Stdio};

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

/// A monitor this process started: `husk _monitor`, exec'd
/// ([`Child`]), or this process's own copy, forked without exec
/// ([`fork_monitors`]).
#[derive(Debug)]
pub enum Monitor {
    /// Exec'd.
    Spawned(Child),
    /// Forked.
    Forked(husk_sys::child::Forked),
}

impl Monitor {
    /// Its PID.
    pub fn id(&self) -> u32 {
        husk_sys::child::Waited::pid(self)
    }

    /// Waits for it to end.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        husk_sys::child::Waited::wait_end(self)
    }
}

impl husk_sys::child::Waited for Monitor {
    fn pid(&self) -> u32 {
        match self {
            Self::Spawned(child) => child.id(),
            Self::Forked(forked) => forked.pid(),
        }
    }
    fn wait_end(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            Self::Spawned(child) => child.wait(),
            Self::Forked(forked) => forked.wait_end(),
        }
    }
}

/// What a forked monitor runs: given husk's root, the monitor's
/// arguments (as `husk _monitor` takes them), what it was handed and its
/// channel; returns its exit status.
pub type Runner = fn(&Path, &[String], Handoff, Channel) -> u8;

static RUNNER: std::sync::OnceLock<Runner> = std::sync::OnceLock::new();

/// Monitors are forked from this process from now on and run `runner`
/// in the child, with no exec of `husk _monitor`, where this process has
/// one thread when it starts one (else they are exec'd as before). For
/// the `husk` command, which runs a monitor's code itself: an exec, the
/// loading of a 12 MB program and its start, and the handoff's encoding
/// both ways are saved (issue 18, docs/benchmarks.md). Once per process.
pub fn fork_monitors(runner: Runner) {
    let _ = RUNNER.set(runner);
}

/// Starts a monitor (`husk --root ROOT _monitor ARGS`) with `stdio` (or
/// this process's), hands it `handoff`, and returns it once it answered
/// that it is set up; else what it said (with its exit status, once it
/// exited).
pub fn start(
    root: &Path,
    args: &[String],
    handoff: Handoff,
    stdio: Option<Stdio3<'_>>,
) -> Result<Monitor, (String, Option<i32>)> {
    start_told(root, args, handoff, stdio).map(|(child, _)| child)
}

/// [`start`], for a handoff whose monitor also starts the process: with
/// what it said where the process could not start (the monitor then
/// goes on to record its end, as it does for any process).
pub fn start_told(
    root: &Path,
    args: &[String],
    handoff: Handoff,
    stdio: Option<Stdio3<'_>>,
) -> Result<(Monitor, Option<NotStarted>), (String, Option<i32>)> {
    let (mut ours, theirs) =
        UnixStream::pair().map_err(|e| (format!("cannot make a socket pair: {e}"), None))?;
    // A forked monitor shows `husk --root ROOT _monitor ARGS` as an
    // exec'd one does (ps, and whoever looks for monitors), written over
    // its starter's command line: where that has room.
    let argv0 = std::env::args_os().next().unwrap_or_else(|| "husk".into());
    let line: Vec<&std::ffi::OsStr> = [
        argv0.as_os_str(),
        "--root".as_ref(),
        root.as_os_str(),
        "_monitor".as_ref(),
    ]
    .into_iter()
    .chain(args.iter().map(std::ffi::OsStr::new))
    .collect();
    let forked = RUNNER.get().and_then(|&runner| {
        let own = husk_sys::child::Own::read()?;
        let fits = husk_sys::child::cmdline_bytes(&line).len() <= own.room();
        (own.threads == 1 && fits).then_some((runner, own))
    });
    let mut child = match forked {
        Some((runner, own)) => fork(root, args, handoff, stdio, theirs, (runner, &own, &line))?,
        _ => {
            let child = spawn(root, args, stdio, theirs)?;
            // A monitor that ended early leaves the write failing
            // (EPIPE); what it said, or its end, is read below either way.
            let json = serde_json::to_vec(&handoff).expect("plain data serializes");
            let _ = ours.write_all(&json);
            let _ = ours.shutdown(std::net::Shutdown::Write);
            child
        }
    };
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

/// Execs `husk _monitor` with `theirs` at [`FD`].
fn spawn(
    root: &Path,
    args: &[String],
    stdio: Option<Stdio3<'_>>,
    theirs: UnixStream,
) -> Result<Monitor, (String, Option<i32>)> {
    let exe = match HUSK.get() {
        Some(husk) => husk.clone(),
        None => {
            std::env::current_exe().map_err(|e| (format!("cannot find husk itself: {e}"), None))?
        }
    };
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
    cmd.spawn()
        .map(Monitor::Spawned)
        .map_err(|e| (format!("cannot start the monitor: {e}"), None))
}

/// Forks a monitor that runs `runner` on `handoff`, set up as [`spawn`]
/// sets up an exec'd one ([`husk_sys::child::detach_forked`]): `theirs`
/// at [`FD`], `stdio` at 0-2, nothing else of this process's
/// descriptors, a session and clean signals of its own, and `line` for
/// its command line. `own` is this process's, with one thread and room
/// for `line`.
fn fork(
    root: &Path,
    args: &[String],
    handoff: Handoff,
    stdio: Option<Stdio3<'_>>,
    theirs: UnixStream,
    (runner, own, line): (Runner, &husk_sys::child::Own, &[&std::ffi::OsStr]),
) -> Result<Monitor, (String, Option<i32>)> {
    // What this process buffered for its stdout would be written twice.
    let _ = std::io::stdout().flush();
    // SAFETY: this process has one thread (checked by the caller), so the
    // child's copy of every lock is free; the child runs on as this
    // program and ends with `exit`, never returning here.
    match unsafe { libc::fork() } {
        -1 => Err((
            format!(
                "cannot start the monitor: {}",
                std::io::Error::last_os_error()
            ),
            None,
        )),
        0 => {
            let stdio = stdio.map(|s| {
                [
                    s.stdin.as_raw_fd(),
                    s.stdout.as_raw_fd(),
                    s.stderr.as_raw_fd(),
                ]
            });
            let code = match husk_sys::child::detach_forked(stdio, theirs.as_raw_fd(), FD) {
                Ok(()) => {
                    // Its descriptor is at FD now, or closed: not to be
                    // closed again by its drop.
                    std::mem::forget(theirs);
                    // SAFETY: `own` was read by this process (its copy)
                    // just before the fork, and it has one thread.
                    unsafe { husk_sys::child::rewrite_cmdline(own, line) };
                    runner(root, args, handoff, Channel::take())
                }
                Err(e) => {
                    eprintln!("husk: cannot set up the monitor: {e}");
                    1
                }
            };
            let _ = std::io::stdout().flush();
            std::process::exit(i32::from(code))
        }
        pid => {
            drop(theirs);
            Ok(Monitor::Forked(husk_sys::child::Forked::new(pid as u32)))
        }
    }
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
