//! virtio devices and the virtio-mmio transport (virtio 1.2, section 4.2).
//!
//! A device implements [`VirtioDevice`]: its type, its queues' sizes, its
//! feature bits and configuration space, and what it does with the buffers
//! the guest makes available on a queue. The transport
//! ([`mmio::MmioTransport`]) owns the registers, the feature negotiation, the
//! queues and the interrupt; a device never sees a register or a GSI.
//!
//! Devices read and write guest memory only through vm-memory's checked
//! accessors, at addresses the guest gave: a bad address is the guest's
//! error and yields an empty buffer, never a host access outside guest RAM.

pub mod fs;
pub mod mmio;
pub mod rng;
pub mod vsock;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: the device is a modern (1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device type (4: entropy source, 26: fs, 19: vsock, ...).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; their number is the device's queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device feature bits, `VIRTIO_F_VERSION_1` excluded (the transport
    /// adds it).
    fn features(&self) -> u64 {
        0
    }
    /// Reads from the device-specific configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// Handles the buffers the guest made available on queue `index`;
    /// returns true when it used any (the guest is then interrupted).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// The device's own state for a snapshot (what lives outside guest
    /// memory and the transport), if it has any; refused, saying why,
    /// when it cannot be kept now.
    fn save_state(&self) -> Result<Option<serde_json::Value>, String> {
        Ok(None)
    }
    /// Takes up state [`VirtioDevice::save_state`] gave, in a restored VM.
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Err("this device keeps no state of its own".into())
    }
}
