//! A guest driver for one virtio device behind its real virtio-mmio
//! transport ([`MmioTransport`]), run from fuzz input.
//!
//! Guest memory is 4 MiB. Queue `i` has its descriptor table at
//! `i * 0x4000`, its available ring 0x1000 above it and its used ring
//! 0x2000 above it, with [`QUEUE_SIZE`] entries (or the device's maximum,
//! if smaller). Buffers are placed from 256 KiB on, wrapping around.
//!
//! The input is a program of operations, each a tag byte (taken modulo 8)
//! and its operands, little-endian:
//!
//! | tag | operation | operands |
//! |---|---|---|
//! | 0 | a descriptor chain made available | queue `u8`, count `u8` (1 + count % 8), descriptors |
//! | 1 | `QueueNotify` | queue `u8` |
//! | 2 | guest memory written | address `u32` (modulo the size), length `u8`, bytes |
//! | 3 | register write | offset `u16` (bits 0-8 the offset, bits 12-13 the width 4, 1, 2 or 8 bytes), value `u64` |
//! | 4 | register read | offset `u16`, as for a write |
//! | 5 | the host side's operation ([`Host::op`]) | the device's own |
//! | 6 | the available ring's index set | index `u16` |
//! | 7 | the host side's turn ([`Host::tick`]) | none |
//!
//! A descriptor is a kind byte (modulo 4) and its operands: 0, readable
//! bytes (length `u16`, the bytes); 1, a writable buffer (length `u32`,
//! modulo 128 KiB + 1); 2, a raw descriptor written as given (address
//! `u64`, length `u32`, flags `u16`, next `u16`; the harness does not link
//! it); 3, an indirect table (count `u8`, 1 + count % 4 entries, each a
//! kind byte, modulo 2, and the operands of kind 0 or 1). The harness links
//! the descriptors it makes with `NEXT`. After the program, every queue is
//! notified and the host side takes a last turn.

use std::sync::{Arc, Mutex};

use husk_vmm::devices::BusDevice;
use husk_vmm::devices::virtio::VirtioDevice;
use husk_vmm::devices::virtio::mmio::{
    MmioTransport, REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL, REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL, REG_QUEUE_AVAIL_HIGH, REG_QUEUE_AVAIL_LOW, REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DESC_LOW, REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_READY, REG_QUEUE_SEL,
    REG_QUEUE_USED_HIGH, REG_QUEUE_USED_LOW, REG_STATUS,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::Input;

/// Guest memory.
pub const MEM_SIZE: u64 = 4 << 20;
/// Entries per queue (or the device's maximum, if smaller).
pub const QUEUE_SIZE: u16 = 64;
const QUEUE_STRIDE: u64 = 0x4000;
const DATA_START: u64 = 0x4_0000;
/// The largest writable buffer a kind-1 descriptor asks for.
const MAX_WRITABLE: u32 = 128 << 10;

/// `VIRTQ_DESC_F_*`.
pub const F_NEXT: u16 = 1;
/// The device writes this buffer.
pub const F_WRITE: u16 = 2;
/// The buffer is a table of descriptors.
pub const F_INDIRECT: u16 = 4;

/// Operation tags (see the module's table).
pub mod op {
    /// A descriptor chain made available.
    pub const CHAIN: u8 = 0;
    /// `QueueNotify`.
    pub const NOTIFY: u8 = 1;
    /// Guest memory written.
    pub const POKE: u8 = 2;
    /// A register written.
    pub const REG_WRITE: u8 = 3;
    /// A register read.
    pub const REG_READ: u8 = 4;
    /// The host side's operation.
    pub const HOST: u8 = 5;
    /// The available index set.
    pub const AVAIL_IDX: u8 = 6;
    /// The host side's turn.
    pub const TICK: u8 = 7;
}

/// Where queue `index` lies: descriptor table, available ring, used ring.
pub fn rings(index: usize) -> (u64, u64, u64) {
    let base = index as u64 * QUEUE_STRIDE;
    (base, base + 0x1000, base + 0x2000)
}

/// What the host side of a device does between the guest's operations:
/// nothing, for devices without one.
pub trait Host {
    /// Operation 5: reads its operands from `input`.
    fn op(&mut self, _guest: &mut Guest, _input: &mut Input) {}
    /// Operation 7, and the end of the program: the host side's turn.
    fn tick(&mut self, _guest: &mut Guest) {}
}

/// No host side.
pub struct NoHost;

impl Host for NoHost {}

struct Queue {
    desc: u64,
    avail: u64,
    size: u16,
    next_slot: u16,
    avail_idx: u16,
}

/// A device, its transport and guest memory, and where the driver is.
pub struct Guest {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The transport, shared as the VMM shares it with device threads.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The transport's interrupt.
    pub irq: EventFd,
    queues: Vec<Queue>,
    next_data: u64,
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory")
}

impl Guest {
    /// `device` behind a new transport, in new guest memory, its driver
    /// not started.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(i, &max)| {
                let (desc, avail, _) = rings(i);
                Queue {
                    desc,
                    avail,
                    size: max.min(QUEUE_SIZE),
                    next_slot: 0,
                    avail_idx: 0,
                }
            })
            .collect();
        let mem = memory();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let transport = MmioTransport::new(device, mem.clone(), irq.try_clone().expect("eventfd"));
        Self {
            mem,
            transport: Arc::new(Mutex::new(transport)),
            irq,
            queues,
            next_data: DATA_START,
        }
    }

    /// The sizes the driver gives the queues.
    pub fn queue_sizes(&self) -> Vec<u16> {
        self.queues.iter().map(|q| q.size).collect()
    }

    fn write_reg(&self, offset: u64, value: u32) {
        self.transport
            .lock()
            .unwrap()
            .write(offset, &value.to_le_bytes());
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.lock().unwrap().read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Starts the driver as Linux's virtio_mmio does: every feature the
    /// device offers accepted (`all`), or VERSION_1 alone, then the
    /// queues at their places, then DRIVER_OK.
    pub fn bring_up(&mut self, all: bool) {
        self.write_reg(REG_STATUS, 1 | 2);
        self.write_reg(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.read_reg(REG_DEVICE_FEATURES);
        self.write_reg(REG_DEVICE_FEATURES_SEL, 1);
        let high = self.read_reg(REG_DEVICE_FEATURES);
        let (low, high) = if all { (low, high) } else { (0, 1) };
        self.write_reg(REG_DRIVER_FEATURES_SEL, 0);
        self.write_reg(REG_DRIVER_FEATURES, low);
        self.write_reg(REG_DRIVER_FEATURES_SEL, 1);
        self.write_reg(REG_DRIVER_FEATURES, high);
        self.write_reg(REG_STATUS, 1 | 2 | 8);
        for (i, size) in self.queue_sizes().into_iter().enumerate() {
            for (offset, value) in queue_setup(i, size) {
                self.write_reg(offset, value);
            }
        }
        self.write_reg(REG_STATUS, 1 | 2 | 8 | 4);
    }

    fn alloc(&mut self, len: u64) -> u64 {
        if self.next_data + len > MEM_SIZE {
            self.next_data = DATA_START;
        }
        let at = self.next_data;
        self.next_data = (at + len + 7) & !7;
        at
    }

    fn write_desc(&self, table: u64, slot: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = self
            .mem
            .write_slice(&d, GuestAddress(table + 16 * u64::from(slot)));
    }

    /// A readable (kind 0) or writable (kind 1) buffer from `input`.
    fn buffer(&mut self, writable: bool, input: &mut Input) -> (u64, u32, u16) {
        if writable {
            let len = input.u32() % (MAX_WRITABLE + 1);
            (self.alloc(u64::from(len)), len, F_WRITE)
        } else {
            let len = input.u16();
            let bytes = input.bytes(len.into());
            let at = self.alloc(bytes.len() as u64);
            let _ = self.mem.write_slice(bytes, GuestAddress(at));
            (at, bytes.len() as u32, 0)
        }
    }

    fn chain(&mut self, input: &mut Input) {
        let q = usize::from(input.u8());
        let count = 1 + input.u8() % 8;
        if self.queues.is_empty() {
            return;
        }
        let q = q % self.queues.len();
        // (slot, addr, len, flags, next, linked by the harness)
        let mut descs: Vec<(u16, u64, u32, u16, u16, bool)> = Vec::new();
        for _ in 0..count {
            let queue = &mut self.queues[q];
            let slot = queue.next_slot % queue.size;
            queue.next_slot = queue.next_slot.wrapping_add(1) % queue.size;
            let desc = match input.u8() % 4 {
                0 => {
                    let (a, l, f) = self.buffer(false, input);
                    (slot, a, l, f, 0, true)
                }
                1 => {
                    let (a, l, f) = self.buffer(true, input);
                    (slot, a, l, f, 0, true)
                }
                2 => {
                    let (addr, len, flags, next) =
                        (input.u64(), input.u32(), input.u16(), input.u16());
                    (slot, addr, len, flags, next, false)
                }
                _ => {
                    let entries = 1 + input.u8() % 4;
                    let table = self.alloc(16 * u64::from(entries));
                    for i in 0..u16::from(entries) {
                        let writable = input.u8() % 2 == 1;
                        let (a, l, f) = self.buffer(writable, input);
                        let last = i + 1 == u16::from(entries);
                        let f = if last { f } else { f | F_NEXT };
                        self.write_desc(table, i, a, l, f, i + 1);
                    }
                    (slot, table, 16 * u32::from(entries), F_INDIRECT, 0, true)
                }
            };
            descs.push(desc);
        }
        let table = self.queues[q].desc;
        for i in 0..descs.len() {
            let (slot, addr, len, mut flags, mut next, linked) = descs[i];
            if linked && i + 1 < descs.len() {
                flags |= F_NEXT;
                next = descs[i + 1].0;
            }
            self.write_desc(table, slot, addr, len, flags, next);
        }
        let queue = &mut self.queues[q];
        let ring_slot = u64::from(queue.avail_idx % queue.size);
        let head = descs[0].0;
        let _ = self
            .mem
            .write_obj(head.to_le(), GuestAddress(queue.avail + 4 + 2 * ring_slot));
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        let _ = self
            .mem
            .write_obj(queue.avail_idx.to_le(), GuestAddress(queue.avail + 2));
    }

    /// Runs the program in `input`, with `host` as the device's host side.
    pub fn run(&mut self, input: &mut Input, host: &mut dyn Host) {
        while !input.is_empty() {
            match input.u8() % 8 {
                op::CHAIN => self.chain(input),
                op::NOTIFY => {
                    let q = input.u8();
                    self.write_reg(REG_QUEUE_NOTIFY, u32::from(q));
                }
                op::POKE => {
                    let at = u64::from(input.u32()) % MEM_SIZE;
                    let len = usize::from(input.u8());
                    let bytes = input.bytes(len);
                    let room = (MEM_SIZE - at) as usize;
                    let _ = self
                        .mem
                        .write_slice(&bytes[..bytes.len().min(room)], GuestAddress(at));
                }
                op::REG_WRITE => {
                    let (offset, width) = reg(input.u16());
                    let value = input.u64().to_le_bytes();
                    self.transport
                        .lock()
                        .unwrap()
                        .write(offset, &value[..width]);
                }
                op::REG_READ => {
                    let (offset, width) = reg(input.u16());
                    let mut buf = [0u8; 8];
                    self.transport
                        .lock()
                        .unwrap()
                        .read(offset, &mut buf[..width]);
                }
                op::HOST => host.op(self, input),
                op::AVAIL_IDX => {
                    let idx = input.u16();
                    let q = usize::from(input.u8());
                    if let Some(queue) = self.queues.get_mut(q) {
                        queue.avail_idx = idx;
                        let _ = self
                            .mem
                            .write_obj(idx.to_le(), GuestAddress(queue.avail + 2));
                    }
                }
                _ => host.tick(self),
            }
        }
        for q in 0..self.queues.len() {
            self.write_reg(REG_QUEUE_NOTIFY, q as u32);
        }
        host.tick(self);
    }
}

/// A register operand: its offset and width.
fn reg(operand: u16) -> (u64, usize) {
    let width = [4, 1, 2, 8][usize::from(operand >> 12) & 3];
    (u64::from(operand & 0x1ff), width)
}

/// The register writes that set queue `index` up with `size` entries at
/// its place and make it ready.
pub fn queue_setup(index: usize, size: u16) -> Vec<(u64, u32)> {
    let (desc, avail, used) = rings(index);
    vec![
        (REG_QUEUE_SEL, index as u32),
        (REG_QUEUE_NUM, u32::from(size)),
        (REG_QUEUE_DESC_LOW, desc as u32),
        (REG_QUEUE_DESC_HIGH, (desc >> 32) as u32),
        (REG_QUEUE_AVAIL_LOW, avail as u32),
        (REG_QUEUE_AVAIL_HIGH, (avail >> 32) as u32),
        (REG_QUEUE_USED_LOW, used as u32),
        (REG_QUEUE_USED_HIGH, (used >> 32) as u32),
        (REG_QUEUE_READY, 1),
    ]
}
