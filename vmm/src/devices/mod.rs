//! Devices and the buses that route guest I/O to them.
//!
//! A device sees only reads and writes at an offset inside its own window; it
//! does not know about vCPUs, the event loop or how its interrupt reaches the
//! guest (it is handed an [`vmm_sys_util::eventfd::EventFd`] wired to a GSI).
//! The port-I/O bus holds the legacy PC devices; the MMIO bus is where
//! virtio-mmio transports are registered.

pub mod console_log;
pub mod legacy;
pub mod serial;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device's host side served on another device's thread (the network
/// devices' on the vsock thread: one thread fewer to start, filter and
/// end per VM): its epoll descriptor, readable while it has work, and
/// one round of that work, which must not block.
pub struct Polled {
    /// Its epoll descriptor (an epoll set nests in another).
    pub fd: std::os::fd::RawFd,
    /// One round: what is ready now, no waiting.
    pub serve: Box<dyn FnMut() + Send>,
}

/// A device on a bus: the vCPU thread that takes the exit calls it.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` into the device's window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` into the device's window.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The new window overlaps a registered one.
    #[error("bus window {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the refused window.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A window of zero length.
    #[error("bus window at {0:#x} has zero length")]
    Empty(u64),
}

struct Window {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address space (port I/O or MMIO) split into device windows.
#[derive(Default)]
pub struct Bus {
    windows: BTreeMap<u64, Window>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let overlaps_before = self
            .windows
            .range(..=base)
            .next_back()
            .is_some_and(|(b, w)| b + w.len > base);
        let overlaps_after = self
            .windows
            .range(base..)
            .next()
            .is_some_and(|(b, _)| *b < base + len);
        if overlaps_before || overlaps_after {
            return Err(BusError::Overlap { base, len });
        }
        self.windows.insert(base, Window { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, window) = self.windows.range(..=addr).next_back()?;
        (addr < base + window.len).then_some((addr - base, &window.device))
    }

    /// Routes a read; returns false (and fills `data` with ones, as an
    /// unclaimed ISA or MMIO read does) when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on past a poisoned lock: a vCPU thread that
/// panicked mid-access has already ended the VM.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_window_and_offset() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, vec![9])]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff]);
        assert!(!bus.write(0x3f7, &[1]));
    }

    #[test]
    fn refuses_overlaps_and_empty_windows() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(dev(), 0x1000, 0x100).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x10ff, 1),
            Err(BusError::Overlap {
                base: 0x10ff,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev(), 0xf00, 0x101),
            Err(BusError::Overlap {
                base: 0xf00,
                len: 0x101
            })
        );
        assert_eq!(bus.insert(dev(), 0x2000, 0), Err(BusError::Empty(0x2000)));
        bus.insert(dev(), 0x1100, 0x100).unwrap();
        bus.insert(dev(), 0xf00, 0x100).unwrap();
    }
}
