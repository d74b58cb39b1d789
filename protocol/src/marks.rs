//! The debug port: one byte the guest writes to an I/O port to say where
//! it is (boot-phase marks) or how it ends. The guest kernel's patches
//! (kernel-config/patches) write the kernel's marks; the VMM writes the
//! agent's ready mark on its behalf when the agent says it is ready.

/// The I/O port.
pub const DEBUG_PORT: u64 = 0x3f0;
/// `start_kernel()` was entered.
pub const MARK_KERNEL_START: u8 = 0x01;
/// The kernel executed init and is about to return to it.
pub const MARK_INIT_START: u8 = 0x02;
/// The agent is listening (the mark where a warm-start snapshot is taken).
pub const READY_MARK: u8 = 0x03;
/// Orderly power-off.
pub const EXIT_POWER_OFF: u8 = 0x10;
/// The guest kernel panicked.
pub const EXIT_PANIC: u8 = 0x11;
