//! SIGTERM, SIGINT and SIGHUP end the VMM cleanly (docs/security.md): its
//! sockets are removed and it exits 0, as after the API's `stop`.
//!
//! The signals are blocked before any thread starts ([`block`]), so every
//! thread inherits the block, and only the main thread, whose seccomp
//! filter allows `unlink`, takes them once the vCPUs run ([`unblock`]).
//! The handler makes only async-signal-safe calls.

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The signals that stop the VMM.
pub const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

static SOCKETS: OnceLock<Vec<CString>> = OnceLock::new();

fn set() -> libc::sigset_t {
    // SAFETY: the set is initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

extern "C" fn on_stop(_: libc::c_int) {
    if let Some(paths) = SOCKETS.get() {
        for path in paths {
            // SAFETY: unlink of a NUL-terminated path made before.
            unsafe { libc::unlink(path.as_ptr()) };
        }
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) };
}

/// Blocks the stop signals in the calling thread (before others start)
/// and installs the handler that removes `sockets` and exits.
pub fn block(sockets: &[PathBuf]) {
    use std::os::unix::ffi::OsStrExt;
    let _ = SOCKETS.set(
        sockets
            .iter()
            .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
            .collect(),
    );
    let set = set();
    // SAFETY: a live, initialised set; a handler of the plain shape.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_stop as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        for sig in SIGNALS {
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Lets the calling thread (the main thread, once the others run) take
/// the stop signals.
pub fn unblock() {
    let set = set();
    // SAFETY: a live, initialised set.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}
