//! The names and version of a VM snapshot directory, which the VMM writes
//! and the runtime's warm-start cache and checkpoints look into
//! (docs/snapshots.md).

/// Written in every header: a file without it is not a Husk snapshot.
pub const FORMAT: &str = "husk-vm-snapshot";
/// Bumped whenever the state's layout changes (3: a device's own state is
/// tagged with its kind; 4: each vCPU's CPUID table is kept).
pub const VERSION: u32 = 4;
/// The device and vCPU state (header, then JSON).
pub const STATE_FILE: &str = "state";
/// Guest memory file.
pub const MEMORY_FILE: &str = "memory";
