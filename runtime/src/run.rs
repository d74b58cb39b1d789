//! `husk run --bundle DIR ID`: one container, in the foreground, in its own
//! microVM; husk exits with the container's exit status.
//!
//! The path of a run: the bundle is checked ([`Bundle::load`]), the
//! container's state directory is made under `<root>/containers/<id>`, a
//! VMM is restored from the warm-start snapshot with the bundle's root
//! shared over virtio-fs ([`Sandbox`]), the agent is asked to create and
//! start the container, and stdio is forwarded: three streams, or one
//! terminal stream with the host's terminal in raw mode and its size
//! followed. SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are
//! forwarded to the container's process. When it exits and its output has
//! been delivered, the guest is powered off and the state directory
//! removed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_protocol::{Request, Response, Stream};
use husk_vmm::devices::virtio::fs::Share;
use thiserror::Error;

use crate::bundle::{Bundle, BundleError};
use crate::sandbox::{Binaries, Sandbox, SandboxError};

/// Environment variable naming a path prefix: when set, a run writes its
/// timings to `<prefix>.runtime.json` (phases and husk's own CPU time) and
/// has the VMM write its own to `<prefix>.vmm.json`. For benchmarks and
/// debugging.
pub const TIMINGS_ENV: &str = "HUSK_TIMINGS";

/// Wall-clock phases of a run and husk's own CPU time.
struct Phases {
    start: std::time::Instant,
    marks: Vec<(&'static str, u64)>,
}

impl Phases {
    fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
            marks: Vec::new(),
        }
    }

    fn mark(&mut self, what: &'static str) {
        self.marks
            .push((what, self.start.elapsed().as_micros() as u64));
    }

    /// Writes the phases and this process's CPU time (all its threads, no
    /// children) where [`TIMINGS_ENV`] says.
    fn write(&self) {
        let Some(prefix) = std::env::var_os(TIMINGS_ENV) else {
            return;
        };
        // SAFETY: getrusage writes into a zeroed rusage.
        let usage = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut u);
            u
        };
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        let json = serde_json::json!({
            "phases_us": self.marks,
            "runtime_cpu_us": us(usage.ru_utime) + us(usage.ru_stime),
        });
        let mut path = prefix;
        path.push(".runtime.json");
        let _ = std::fs::write(path, json.to_string());
    }
}

/// Why a run failed (the container's own exit status is not a failure).
#[derive(Debug, Error)]
pub enum RunError {
    /// The bundle is unusable.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The container ID is not valid.
    #[error(
        "container ID {0:?} is not valid: use letters, digits, '_', '-' and '.', not starting with '.'"
    )]
    BadId(String),
    /// A container of that ID exists.
    #[error("container {0:?} exists")]
    Exists(String),
    /// The state directory cannot be made.
    #[error("cannot create {}", .0.display())]
    State(PathBuf, #[source] std::io::Error),
    /// The VM or its agent failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// Checks a container ID as runc does.
pub fn check_id(id: &str) -> Result<(), RunError> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RunError::BadId(id.to_owned()))
    }
}

/// The container's state directory, removed when dropped.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The host terminal in raw mode until dropped.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn enter() -> Self {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a live termios.
        unsafe {
            if libc::isatty(0) != 1 {
                return Self(None);
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return Self(None);
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
            Self(Some(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the settings read in enter().
            unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
        }
    }
}

/// The host terminal's size, if stdin is one.
fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ writes a winsize.
    unsafe {
        let mut size: libc::winsize = std::mem::zeroed();
        (libc::ioctl(0, libc::TIOCGWINSZ, &mut size) == 0 && size.ws_row > 0)
            .then_some((size.ws_row, size.ws_col))
    }
}

/// Signals forwarded to the container (SIGWINCH resizes its terminal).
const FORWARDED: [libc::c_int; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: the set is initialised before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

fn copy(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() || to.flush().is_err() {
                    return;
                }
            }
        }
    }
}

/// Runs the container of `bundle_dir` as `id` in the foreground; returns
/// its exit status.
pub fn run(root: &Path, bins: &Binaries, bundle_dir: &Path, id: &str) -> Result<i32, RunError> {
    let mut phases = Phases::new();
    check_id(id)?;
    let bundle = Bundle::load(bundle_dir)?;
    let containers = root.join("containers");
    std::fs::create_dir_all(&containers).map_err(|e| RunError::State(containers.clone(), e))?;
    let dir = containers.join(id);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(RunError::Exists(id.to_owned()));
        }
        Err(e) => return Err(RunError::State(dir, e)),
    }
    let _state = StateDir(dir.clone());
    // Signals are taken by the forwarding thread, not delivered: block
    // them before any thread exists, so every thread inherits the mask.
    let set = forwarded_set();
    // SAFETY: blocks the signals of a live, initialised set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };

    let share = Share {
        tag: husk_protocol::ROOTFS_TAG.into(),
        dir: bundle.rootfs.clone(),
        read_only: bundle.readonly,
    };
    let mut sandbox = Sandbox::start(root, bins, &dir, &share)?;
    // A failure while the VM runs is named by what happened to the VM, if
    // it ended (a guest panic, a VMM killed), rather than by the broken
    // connection it left.
    let status = drive(&mut sandbox, &mut phases, &bundle, &dir, id, set).map_err(|e| match e {
        RunError::Sandbox(e) => RunError::Sandbox(sandbox.explain(e)),
        other => other,
    })?;
    phases.write();
    Ok(status)
}

/// Creates and starts the container in the running `sandbox`, forwards its
/// stdio and signals, and returns its exit status once the VM is off.
fn drive(
    sandbox: &mut Sandbox,
    phases: &mut Phases,
    bundle: &Bundle,
    dir: &Path,
    id: &str,
    set: libc::sigset_t,
) -> Result<i32, RunError> {
    phases.mark("vmm_started");
    let mut control = sandbox.control()?;
    phases.mark("agent_connected");
    let process = bundle.process();
    control.expect_ok(&Request::Clone(clone_seed()))?;
    control.expect_ok(&Request::Create {
        id: id.into(),
        spec: bundle.spec_json.clone(),
        process: process.clone(),
    })?;
    phases.mark("created");
    match control.ask(&Request::Start { id: id.into() })? {
        Response::Ok => {}
        Response::NotStarted { message, status } => {
            eprintln!("husk: {message}");
            let _ = control.send(&Request::Shutdown);
            let _ = sandbox.finish(Duration::from_secs(5));
            return Ok(status);
        }
        Response::Error { message } => return Err(SandboxError::Refused(message).into()),
        other => {
            return Err(SandboxError::Refused(format!("unexpected answer {other:?}")).into());
        }
    }

    phases.mark("started");
    let mut outputs = Vec::new();
    let _raw;
    if process.terminal {
        let conn = sandbox.attach(id, "", Stream::Terminal)?;
        _raw = RawTerminal::enter();
        let input = conn
            .try_clone()
            .map_err(|e| RunError::State(dir.to_owned(), e))?;
        std::thread::spawn(move || copy(std::io::stdin(), input));
        outputs.push(std::thread::spawn(move || copy(conn, std::io::stdout())));
    } else {
        let stdin = sandbox.attach(id, "", Stream::Stdin)?;
        std::thread::spawn(move || {
            copy(std::io::stdin(), &stdin);
            let _ = stdin.shutdown(std::net::Shutdown::Write);
        });
        let out = sandbox.attach(id, "", Stream::Stdout)?;
        outputs.push(std::thread::spawn(move || copy(out, std::io::stdout())));
        let err = sandbox.attach(id, "", Stream::Stderr)?;
        outputs.push(std::thread::spawn(move || copy(err, std::io::stderr())));
    }

    let mut signals = sandbox.control()?;
    if process.terminal
        && let Some((rows, cols)) = terminal_size()
    {
        let _ = signals.ask(&resize(id, rows, cols));
    }
    let signal_id = id.to_owned();
    std::thread::spawn(move || {
        loop {
            let mut sig = 0;
            // SAFETY: sigwait on an initialised set, writing a live int.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            let request = if sig == libc::SIGWINCH {
                match terminal_size() {
                    Some((rows, cols)) => resize(&signal_id, rows, cols),
                    None => continue,
                }
            } else {
                Request::Signal {
                    id: signal_id.clone(),
                    exec_id: String::new(),
                    signal: sig,
                    all: false,
                }
            };
            if signals.ask(&request).is_err() {
                return;
            }
        }
    });

    let status = match control.ask(&Request::Wait {
        id: id.into(),
        exec_id: String::new(),
    })? {
        Response::Exited { status } => status,
        Response::Error { message } | Response::NotStarted { message, .. } => {
            return Err(SandboxError::Refused(message).into());
        }
        other => return Err(SandboxError::Refused(format!("unexpected answer {other:?}")).into()),
    };
    phases.mark("exited");
    for output in outputs {
        let _ = output.join();
    }
    let _ = std::io::stdout().flush();
    control.send(&Request::Shutdown)?;
    sandbox.finish(Duration::from_secs(10))?;
    phases.mark("vm_ended");
    Ok(status)
}

/// Fresh host entropy and the host's wall clock for a restored guest.
pub fn clone_seed() -> husk_protocol::CloneSeed {
    let mut entropy = vec![0u8; 32];
    // SAFETY: getrandom fills the live buffer of the given length.
    let n = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
    entropy.truncate(n.max(0) as usize);
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    husk_protocol::CloneSeed {
        entropy,
        realtime_ns,
    }
}

fn resize(id: &str, rows: u16, cols: u16) -> Request {
    Request::ResizeTerminal {
        id: id.into(),
        exec_id: String::new(),
        rows,
        cols,
    }
}
