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
pub mod net;
pub mod rng;
pub mod vsock;

use serde::{Deserialize, Serialize};
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
    /// The driver set DRIVER_OK, which the transport accepted, having
    /// negotiated `acked`; also called when a transport is restored with
    /// its driver running. The default does nothing.
    fn activate(&mut self, _acked: u64) {}
    /// The driver reset the device (wrote status 0). The default does
    /// nothing.
    fn reset(&mut self) {}
    /// Handles the buffers the guest made available on queue `index`;
    /// returns true when it used any (the guest is then interrupted).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// The device's own state for a snapshot (what lives outside guest
    /// memory and the transport), if it has any; refused, saying why,
    /// when it cannot be kept now.
    fn save_state(&self) -> Result<Option<DeviceState>, PersistError> {
        Ok(None)
    }
    /// Takes up state [`VirtioDevice::save_state`] gave, in a restored VM.
    fn restore_state(&mut self, _state: &DeviceState) -> Result<(), PersistError> {
        Err(PersistError::NotMine {
            device: self.device_type(),
        })
    }
}

/// What a device keeps outside guest memory and its transport, in a
/// snapshot: one variant per device that has any.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// vsock: the connections open when it was saved (the guest is told
    /// they were reset) and the next host port.
    Vsock(vsock::VsockState),
    /// virtio-fs: the session's nodes and handles, by path beneath the
    /// share.
    Fs(fs::session::SessionState),
}

/// Why a device's or a transport's state cannot be saved or taken up.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The saved transport is of another device.
    #[error("virtio device state of type {saved} does not fit a device of type {device}")]
    WrongDevice {
        /// The saved device's type.
        saved: u32,
        /// This device's type.
        device: u32,
    },
    /// A saved queue is not the size this device has.
    #[error("virtio queue of size {saved} where {expected} is expected")]
    QueueSize {
        /// The saved size.
        saved: u16,
        /// This device's.
        expected: u16,
    },
    /// A saved queue's registers are not a queue.
    #[error("virtio queue state: {0}")]
    Queue(String),
    /// A ready queue's rings are not in guest memory.
    #[error("a ready virtio queue lies outside guest memory")]
    QueueOutsideMemory,
    /// State saved for another kind of device.
    #[error("device of type {device} was handed state that is not its own")]
    NotMine {
        /// This device's type.
        device: u32,
    },
    /// The device itself cannot save or take up its state now.
    #[error("{device}: {why}")]
    Device {
        /// Which device (a virtio-fs share names its tag).
        device: String,
        /// Why.
        why: String,
    },
}
