//! The system calls husk's host side makes that no well-kept crate
//! covers, or that more than one of its crates would otherwise each wrap
//! again, kept in one named place so the `unsafe` they need is easy to
//! find and review (docs/design.md, "unsafe").
//!
//! - [`child`]: what a forked child does before exec;
//! - [`signals`]: signals blocked and taken by a thread;
//! - [`fd`]: descriptors passed over Unix sockets;
//! - [`net`]: TAP devices and network namespaces;
//! - [`private`]: files for one user's eyes only (snapshots);
//! - [`replace`]: a small file replaced whole (a container's state);
//! - [`PathError`]: a failed file operation, named by what and where.
#![deny(missing_docs)]

pub mod child;
mod error;
pub mod fd;
pub mod net;
pub mod private;
pub mod replace;
pub mod signals;
pub mod unix;

pub use error::PathError;
