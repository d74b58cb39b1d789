//! The guest as the host builds and keeps it: where the VMM, kernel and
//! agent are ([`binaries`]), the agent's initramfs ([`initramfs`]), the
//! size of a container's VM ([`shape`]), and the warm-start snapshots each
//! container is restored from ([`warm`]). It starts VMMs only to boot a
//! warm snapshot, and links none of the VMM (docs/design.md).
#![deny(missing_docs)]

pub mod binaries;
pub mod initramfs;
pub mod shape;
pub mod warm;
