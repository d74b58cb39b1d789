//! Every contract between Husk's processes, and nothing else: what the
//! runtime, the VMM, the agent and the guest kernel say to each other and
//! the names they agree on. The only crate all of them depend on; it links
//! no KVM, FUSE or seccomp code, so the runtime can speak to the VMM
//! without linking it (docs/design.md).
//!
//! - [`agent`]: the runtime ↔ agent messages over vsock (re-exported at the
//!   top, where the agent's side has always found them);
//! - [`vsock`]: AF_VSOCK sockets for the guest side; the host side's
//!   `CONNECT <port>` line is [`vsock::connect_line`];
//! - [`api`]: the VMM's control socket (pause, resume, stop, snapshot);
//! - [`share`]: the `TAG=DIR[:ro]` syntax of a virtio-fs share;
//! - [`snapshot`]: the names and version of a VM snapshot directory;
//! - [`marks`]: the debug-port values the guest writes;
//! - [`paths`]: where husk keeps what it builds, and the guest kernel.
#![deny(missing_docs)]

pub mod agent;
pub mod api;
pub mod ids;
pub mod marks;
pub mod paths;
pub mod share;
pub mod snapshot;
pub mod vsock;

pub use agent::*;
pub use marks::READY_MARK;
