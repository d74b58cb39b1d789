//! Husk's VMM: boots a Linux guest in a KVM microVM.
//!
//! The library does the work; `husk-vmm` (src/main.rs) is a thin command
//! line over [`vm::Vm`]. The VMM never reads or writes host files other than
//! the kernel, the initramfs and the console file it is given (and, for a
//! snapshot, its directory; through virtio-fs, its shares). Each of its
//! threads runs under a seccomp filter of its own ([`seccomp`]).
#![deny(missing_docs)]

pub mod api;
pub mod boot;
pub mod confine;
pub mod cpu;
pub mod devices;
pub mod host;
pub mod jail;
pub mod layout;
pub use husk_protocol::paths;
pub mod seccomp;
pub mod self_test;
pub mod snapshot;
pub mod stop;
pub mod timing;
pub mod vcpu;
pub mod vm;
