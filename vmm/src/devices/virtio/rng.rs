//! virtio-rng: the guest's entropy source (virtio 1.2, section 5.4).
//!
//! One queue; every writable buffer the guest posts is filled from the
//! host's `getrandom(2)`. The guest's hw_random driver feeds what it reads
//! to the kernel's RNG, so the guest has entropy at boot, and a restored
//! clone draws fresh entropy instead of its snapshot's.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::VirtioDevice;

/// virtio device type of an entropy source.
pub const TYPE_RNG: u32 = 4;
const QUEUE_SIZES: [u16; 1] = [256];
/// The most a single buffer gets filled with, so one request cannot make
/// the VMM allocate guest-chosen amounts.
const MAX_CHUNK: usize = 64 * 1024;

/// The entropy device.
#[derive(Default)]
pub struct Rng;

fn getrandom(buf: &mut [u8]) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the live buffer.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n <= 0 {
            return false;
        }
        filled += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written: u32 = 0;
            let mut buf = Vec::new();
            for desc in chain.writable() {
                let len = (desc.len() as usize).min(MAX_CHUNK);
                buf.resize(len, 0);
                if !getrandom(&mut buf) || mem.write_slice(&buf, desc.addr()).is_err() {
                    break;
                }
                // Saturating: a chain of 255 descriptors and an indirect
                // table of 65,535, each 64 KiB, adds up past u32::MAX.
                written = written.saturating_add(len as u32);
            }
            // A used element even for a bad buffer: the guest must get its
            // descriptor back.
            if queue.add_used(mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}
