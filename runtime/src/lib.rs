//! Husk's host-side runtime library: runc's container lifecycle over
//! husk's microVMs (create, start, kill, delete, exec, pause, checkpoint
//! and restore), the container's state, its bundle and hooks, its host
//! cgroup and volumes, and the monitor that holds its VM. The `husk` CLI
//! (and later the containerd shim) are thin faces over it. Errors are
//! typed per module (thiserror); no anyhow.
#![deny(missing_docs)]

pub mod bundle;
pub mod cgroup;
pub mod checkpoint;
pub mod container;
pub mod handoff;
pub mod hooks;
pub mod monitor;
pub mod network;
pub mod pod;
pub mod portforward;
pub mod private;
pub mod run;
pub mod sandbox;
pub mod state;
pub mod timings;
pub mod volumes;

/// An error with its sources, `outer: inner: innermost`, as a line for a
/// person (what the monitor reports to its starter).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        line.push_str(": ");
        line.push_str(&inner.to_string());
        source = inner.source();
    }
    line
}
