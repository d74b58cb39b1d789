//! Husk's VMM: boots a Linux guest in a KVM microVM.
//!
//! The library does the work; `husk-vmm` (src/main.rs) is a thin command
//! line over [`vm::Vm`]. The VMM never reads or writes host files other than
//! the kernel, the initramfs and the console file it is given.
#![deny(missing_docs)]

pub mod api;
pub mod boot;
pub mod cpu;
pub mod devices;
pub mod host;
pub mod layout;
pub mod paths;
pub mod snapshot;
pub mod timing;
pub mod vcpu;
pub mod vm;
