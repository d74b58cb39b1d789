//! Husk's host-side runtime library: what the `husk` CLI (and later the
//! containerd shim) are thin faces over.
//!
//! For now it writes the guest's initramfs and keeps the warm-start
//! snapshots; container lifecycle, state and images build on top of it.
#![deny(missing_docs)]

pub mod bundle;
pub mod cgroup;
pub mod checkpoint;
pub mod container;
pub mod hooks;
pub mod monitor;
pub mod private;
pub mod run;
pub mod sandbox;
pub mod state;
pub mod timings;
pub mod volumes;
