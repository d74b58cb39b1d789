//! `husk run` in the foreground: `create` with this process's stdio (the
//! monitor is this process's child), `start`, signals forwarded to the
//! container's process, then the container deleted; husk exits with the
//! container's exit status.

use husk_sys::signals::SignalSet;

use crate::container::{self, CreateOptions, LifecycleError};

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
    // Forwarded signals are taken while waiting, not delivered: blocked
    // before any thread exists (the monitor unblocks nothing it inherits:
    // it is exec'd with the mask reset below).
    let set = SignalSet::of(&FORWARDED);
    if !o.detach {
        set.block();
    }
    let mut steps = vec![("started", crate::timings::cpu_us())];
    // The monitor starts the process once it has made it (a restored
    // container is running already).
    let (mut monitor, not_started) = container::create_started(o)?;
    steps.push(("created", crate::timings::cpu_us()));
    if let Some((message, status)) = not_started {
        // As a shell reports a command it cannot run: the message, and
        // 127 or 126 as the container's status.
        eprintln!("husk: {message}");
        let _ = monitor.wait();
        let _ = container::delete(o.root, o.id, true);
        return Ok(status);
    }
    if o.detach {
        return Ok(0);
    }
    steps.push(("container_started", crate::timings::cpu_us()));
    let (root, id) = (o.root.to_owned(), o.id.to_owned());
    let status = set
        .wait_child(&mut monitor, move |sig| {
            let _ = container::kill(&root, &id, sig, false);
        })
        .map(|s| s.code().unwrap_or(128 + libc::SIGKILL))
        .unwrap_or(128 + libc::SIGKILL);
    steps.push(("waited", crate::timings::cpu_us()));
    let ended_by = crate::state::ContainerState::load(o.root, o.id)
        .ok()
        .and_then(|s| s.error);
    let _ = container::delete(o.root, o.id, true);
    steps.push(("deleted", crate::timings::cpu_us()));
    crate::timings::write_client(&steps);
    match ended_by {
        Some(error) => Err(LifecycleError::VmEnded(error)),
        None => Ok(status),
    }
}
