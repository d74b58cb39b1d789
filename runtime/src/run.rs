//! `husk run` in the foreground: `create` with this process's stdio (the
//! monitor is this process's child), `start`, signals forwarded to the
//! container's process, then the container deleted; husk exits with the
//! container's exit status. Also the run timings (`HUSK_TIMINGS`) and the
//! seed that makes a restored guest its own.

use husk_protocol::CloneSeed;

use crate::container::{self, CreateOptions, LifecycleError};

/// Environment variable naming a path prefix: when set, a container's
/// monitor writes its timings to `<prefix>.runtime.json` (phases and its
/// own CPU time) and has the VMM write its own to `<prefix>.vmm.json`. For
/// benchmarks and debugging.
pub const TIMINGS_ENV: &str = "HUSK_TIMINGS";

/// Wall-clock phases of a container's monitor and its own CPU time.
pub struct Phases {
    start: std::time::Instant,
    marks: Vec<(&'static str, u64)>,
}

impl Default for Phases {
    fn default() -> Self {
        Self::new()
    }
}

impl Phases {
    /// Starts the clock.
    pub fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
            marks: Vec::new(),
        }
    }

    /// Records that `what` happened now.
    pub fn mark(&mut self, what: &'static str) {
        self.marks
            .push((what, self.start.elapsed().as_micros() as u64));
    }

    /// Writes the phases and this process's CPU time (all its threads, no
    /// children) where [`TIMINGS_ENV`] says.
    pub fn write(&self) {
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

/// Fresh host entropy and the host's wall clock for a restored guest.
pub fn clone_seed() -> CloneSeed {
    let mut entropy = vec![0u8; 32];
    // SAFETY: getrandom fills the live buffer of the given length.
    let n = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
    entropy.truncate(n.max(0) as usize);
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    CloneSeed {
        entropy,
        realtime_ns,
    }
}

/// Signals forwarded to the container by a foreground `run`.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// `run`: create and start; in the foreground, wait and delete. Returns
/// the container's exit status (0 when detached).
pub fn run(o: &CreateOptions) -> Result<i32, LifecycleError> {
    // Forwarded signals are taken by a thread, not delivered: blocked
    // before any thread exists (the monitor unblocks nothing it inherits:
    // it is exec'd with the mask reset below).
    let set = {
        // SAFETY: the set is initialised before use.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in FORWARDED {
                libc::sigaddset(&mut set, sig);
            }
            set
        }
    };
    if !o.detach {
        // SAFETY: blocks the signals of a live, initialised set.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    }
    let mut monitor = container::create(o)?;
    // A restored container is running already.
    let started = match o.restore {
        Some(_) => Ok(()),
        None => container::start(o.root, o.id),
    };
    if let Err(e) = started {
        if let LifecycleError::NotStarted { message, status } = e {
            // As a shell reports a command it cannot run: the message,
            // and 127 or 126 as the container's status.
            eprintln!("husk: {message}");
            let _ = monitor.wait();
            let _ = container::delete(o.root, o.id, true);
            return Ok(status);
        }
        let _ = container::delete(o.root, o.id, true);
        let _ = monitor.wait();
        return Err(e);
    }
    if o.detach {
        return Ok(0);
    }
    let (root, id) = (o.root.to_owned(), o.id.to_owned());
    std::thread::spawn(move || {
        loop {
            let mut sig = 0;
            // SAFETY: sigwait on an initialised set, writing a live int.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            let _ = container::kill(&root, &id, sig, false);
        }
    });
    let status = monitor
        .wait()
        .map(|s| s.code().unwrap_or(128 + libc::SIGKILL))
        .unwrap_or(128 + libc::SIGKILL);
    let ended_by = crate::state::ContainerState::load(o.root, o.id)
        .ok()
        .and_then(|s| s.error);
    let _ = container::delete(o.root, o.id, true);
    match ended_by {
        Some(error) => Err(LifecycleError::VmEnded(error)),
        None => Ok(status),
    }
}
