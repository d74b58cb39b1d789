//! Harnesses shared by the fuzz targets (docs/fuzzing.md): a reader of
//! fuzz input, a guest driver that lays descriptor chains out in guest
//! memory and drives a device through its real virtio-mmio transport, the
//! devices as the VMM makes them, and scratch directories that are checked
//! for anything written outside them.
//!
//! A harness never makes the code under test easier to pass: it builds the
//! inputs a guest or an image could build, and checks what must hold
//! whatever the input (no panic, nothing outside the scratch directory).

pub mod devices;
pub mod input;
pub mod scratch;
pub mod seeds;
pub mod targets;
pub mod virtq;

pub use input::Input;
