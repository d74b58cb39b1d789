//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): the
//! register window through which the guest's driver finds a device,
//! negotiates features, sets up queues and notifies.
//!
//! Queue notifications are handled on the vCPU thread that wrote
//! `QueueNotify`; the interrupt is the device's GSI, pulsed by the thread
//! that has something for the guest ([`Irq`]). Every guest value is checked before use: a queue size that
//! is not a power of two or exceeds the maximum, a queue index out of range,
//! or a queue the guest marks ready with bad addresses is ignored or left not
//! ready, never trusted.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceState, PersistError, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::devices::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "HUSK", the vendor ID the guest sees.
const VENDOR_ID: u32 = 0x4b53_5548;

/// Register offset (virtio 1.2, section 4.2.2): `MAGIC`.
pub const REG_MAGIC: u64 = 0x000;
/// Register offset (virtio 1.2, section 4.2.2): `VERSION`.
pub const REG_VERSION: u64 = 0x004;
/// Register offset (virtio 1.2, section 4.2.2): `DEVICE_ID`.
pub const REG_DEVICE_ID: u64 = 0x008;
/// Register offset (virtio 1.2, section 4.2.2): `VENDOR_ID`.
pub const REG_VENDOR_ID: u64 = 0x00c;
/// Register offset (virtio 1.2, section 4.2.2): `DEVICE_FEATURES`.
pub const REG_DEVICE_FEATURES: u64 = 0x010;
/// Register offset (virtio 1.2, section 4.2.2): `DEVICE_FEATURES_SEL`.
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
/// Register offset (virtio 1.2, section 4.2.2): `DRIVER_FEATURES`.
pub const REG_DRIVER_FEATURES: u64 = 0x020;
/// Register offset (virtio 1.2, section 4.2.2): `DRIVER_FEATURES_SEL`.
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
/// Register offset (virtio 1.2, section 4.2.2): `QUEUE_SEL`.
pub const REG_QUEUE_SEL: u64 = 0x030;
/// Register offset (virtio 1.2, section 4.2.2): `QUEUE_NUM_MAX`.
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
/// Register offset (virtio 1.2, section 4.2.2): `QUEUE_NUM`.
pub const REG_QUEUE_NUM: u64 = 0x038;
/// Register offset (virtio 1.2, section 4.2.2): `QUEUE_READY`.
pub const REG_QUEUE_READY: u64 = 0x044;
/// Register offset (virtio 1.2, section 4.2.2): `QUEUE_NOTIFY`.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
/// Register offset (virtio 1.2, section 4.2.2): `INTERRUPT_STATUS`.
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
/// Register offset (virtio 1.2, section 4.2.2): `INTERRUPT_ACK`.
pub const REG_INTERRUPT_ACK: u64 = 0x064;
/// Register offset (virtio 1.2, section 4.2.2): `STATUS`.
pub const REG_STATUS: u64 = 0x070;
/// Register offset (virtio 1.2, section 4.2.2): `QUEUE_DESC_LOW`.
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
/// Register offset (virtio 1.2, section 4.2.2): `QUEUE_DESC_HIGH`.
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
/// Register offset (virtio 1.2, section 4.2.2): `QUEUE_AVAIL_LOW`.
pub const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
/// Register offset (virtio 1.2, section 4.2.2): `QUEUE_AVAIL_HIGH`.
pub const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
/// Register offset (virtio 1.2, section 4.2.2): `QUEUE_USED_LOW`.
pub const REG_QUEUE_USED_LOW: u64 = 0x0a0;
/// Register offset (virtio 1.2, section 4.2.2): `QUEUE_USED_HIGH`.
pub const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
/// Register offset (virtio 1.2, section 4.2.2): `CONFIG_GENERATION`.
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Register offset (virtio 1.2, section 4.2.2): `CONFIG`.
pub const REG_CONFIG: u64 = 0x100;

/// Device status bits.
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 128;
/// Interrupt status: the device used buffers.
const INT_USED_RING: u32 = 1;

/// The driver is running the device: DRIVER_OK, which the transport
/// accepts only together with FEATURES_OK.
fn driver_ok(status: u32) -> bool {
    let ok = STATUS_FEATURES_OK | STATUS_DRIVER_OK;
    status & ok == ok
}

/// One queue's registers and ring positions, for a snapshot
/// (virtio-queue's `QueueState`, which has no serde of its own).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueRegs {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl From<QueueState> for QueueRegs {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueueRegs> for QueueState {
    fn from(q: &QueueRegs) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The transport's state, for a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MmioState {
    /// The device behind it.
    pub device_type: u32,
    queues: Vec<QueueRegs>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    /// The device's own state ([`VirtioDevice::save_state`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<DeviceState>,
}

/// `KVM_IRQ_LINE` (linux/kvm.h: `_IOW(KVMIO, 0x61, struct
/// kvm_irq_level)`).
pub const KVM_IRQ_LINE: u64 = 0x4008_ae61;

/// How a transport raises its interrupt.
pub enum Irq {
    /// An eventfd (a unit test's, or one registered as the GSI's irqfd).
    EventFd(EventFd),
    /// The VM's GSI `gsi`, pulsed (`KVM_IRQ_LINE` high, then low, as an
    /// irqfd does) by the calling thread itself. An irqfd's write wakes a
    /// kernel worker that then injects: 11-13 µs of the writer's time on
    /// this host per interrupt, and the vCPU may re-enter the guest before
    /// the injection (docs/benchmarks.md). `vm` is the VM's descriptor.
    Line {
        /// The VM (a duplicate of its descriptor).
        vm: OwnedFd,
        /// The line.
        gsi: u32,
    },
}

impl From<EventFd> for Irq {
    fn from(fd: EventFd) -> Self {
        Irq::EventFd(fd)
    }
}

impl Irq {
    /// Raises the interrupt (edge: the line goes high and low again).
    pub fn raise(&self) {
        match self {
            Irq::EventFd(fd) => {
                let _ = fd.write(1);
            }
            Irq::Line { vm, gsi } => {
                for level in [1, 0] {
                    let mut line = kvm_bindings::kvm_irq_level::default();
                    line.__bindgen_anon_1.irq = *gsi;
                    line.level = level;
                    // SAFETY: KVM_IRQ_LINE reads one kvm_irq_level, which
                    // `line` is, for as long as the call.
                    unsafe {
                        libc::ioctl(vm.as_raw_fd(), KVM_IRQ_LINE as _, &line);
                    }
                }
            }
        }
    }
}

/// One virtio device's register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Irq,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: AtomicU32,
}

impl MmioTransport {
    /// A transport for `device`, reading guest memory `mem` and raising its
    /// interrupt through `irq`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: impl Into<Irq>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        Self {
            device,
            mem,
            irq: irq.into(),
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: AtomicU32::new(0),
        }
    }

    /// The registers, queues and the device's own state, for a snapshot;
    /// refused, saying why, when the device cannot be kept now.
    pub fn save(&self) -> Result<MmioState, PersistError> {
        Ok(MmioState {
            device_type: self.device.device_type(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            device: self.device.save_state()?,
        })
    }

    /// A transport for `device` in the state `state` (from a snapshot).
    /// Fails, saying why, when the state does not fit the device or guest
    /// memory.
    pub fn restore(
        mut device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: impl Into<Irq>,
        state: &MmioState,
    ) -> Result<Self, PersistError> {
        if state.device_type != device.device_type()
            || state.queues.len() != device.queue_max_sizes().len()
        {
            return Err(PersistError::WrongDevice {
                saved: state.device_type,
                device: device.device_type(),
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (regs, &max) in state.queues.iter().zip(device.queue_max_sizes()) {
            if regs.max_size != max {
                return Err(PersistError::QueueSize {
                    saved: regs.max_size,
                    expected: max,
                });
            }
            let queue = Queue::try_from(QueueState::from(regs))
                .map_err(|e| PersistError::Queue(e.to_string()))?;
            if queue.ready() && !queue.is_valid(&mem) {
                return Err(PersistError::QueueOutsideMemory);
            }
            queues.push(queue);
        }
        if let Some(saved) = &state.device {
            device.restore_state(saved)?;
        }
        if driver_ok(state.status) {
            device.activate(state.driver_features);
        }
        Ok(Self {
            device,
            mem,
            irq: irq.into(),
            queues,
            queue_sel: state.queue_sel,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            status: state.status,
            interrupt_status: AtomicU32::new(state.interrupt_status),
        })
    }

    /// Settles a restored transport: buffers the guest made available
    /// before the snapshot are handled now, and the interrupt is raised
    /// again if any was pending. A snapshot can catch an interrupt between
    /// the device's raising it and KVM's injection; without this the
    /// guest's driver would wait for it forever.
    pub fn settle_after_restore(&mut self) {
        if self.status & STATUS_DRIVER_OK == 0 {
            return;
        }
        for index in 0..self.queues.len() as u32 {
            self.notify(index);
        }
        if self.interrupt_status.load(Ordering::SeqCst) != 0 {
            self.irq.raise();
        }
    }

    fn device_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
    }

    fn set_status(&mut self, status: u32) {
        if status == 0 {
            self.reset();
            self.device.reset();
            return;
        }
        // FEATURES_OK only holds if the driver accepted nothing the device
        // did not offer, and VERSION_1 (legacy drivers are not supported).
        if status & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                self.status = status & !STATUS_FEATURES_OK;
                return;
            }
        }
        if status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            self.status = status | STATUS_FAILED;
            return;
        }
        let was_ok = driver_ok(self.status);
        self.status = status;
        if !was_ok && driver_ok(status) {
            self.device.activate(self.driver_features);
        }
    }

    /// Has the device handle queue `index` as if the guest had notified
    /// it: for devices whose host side produces buffers for the guest.
    pub fn notify_device(&mut self, index: u32) {
        self.notify(index);
    }

    fn notify(&mut self, index: u32) {
        if self.status & STATUS_DRIVER_OK == 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(index as usize) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        if self.device.process_queue(index as usize, queue, &self.mem) {
            self.interrupt_status
                .fetch_or(INT_USED_RING, Ordering::SeqCst);
            self.irq.raise();
        }
    }

    fn set_queue_addr(&mut self, offset: u64, value: u32) {
        // Queue addresses may change only while the queue is not ready.
        let Some(q) = self.selected_queue() else {
            return;
        };
        if q.ready() {
            return;
        }
        match offset {
            REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            REG_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
            REG_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_USED_LOW => q.set_used_ring_address(Some(value), None),
            REG_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue()
                    && !q.ready()
                    && value <= u32::from(q.max_size())
                    && (value as u16).is_power_of_two()
                {
                    q.set_size(value as u16);
                }
            }
            REG_QUEUE_READY => {
                let mem = self.mem.clone();
                if let Some(q) = self.selected_queue() {
                    // A queue becomes ready only if its rings lie in guest
                    // memory (virtio-queue's check needs it marked ready).
                    q.set_ready(value == 1);
                    if q.ready() && !q.is_valid(&mem) {
                        q.set_ready(false);
                    }
                }
            }
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            REG_STATUS => self.set_status(value),
            REG_QUEUE_DESC_LOW..=REG_QUEUE_USED_HIGH => self.set_queue_addr(offset, value),
            _ => {}
        }
    }
}

impl MmioTransport {
    /// The 32-bit register (or configuration word) at `offset`, read as a
    /// driver reads it through the bus: for tests and benchmarks that
    /// drive the transport as Linux's virtio_mmio driver does.
    pub fn read_u32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        BusDevice::read(self, offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes `value` to the 32-bit register at `offset` through the bus.
    pub fn write_u32(&mut self, offset: u64, value: u32) {
        BusDevice::write(self, offset, &value.to_le_bytes());
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            // Registers are 32-bit; other widths read as zero.
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < REG_CONFIG
            && let Ok(bytes) = <[u8; 4]>::try_from(data)
        {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    /// `KVM_IRQ_LINE` is `_IOW(KVMIO, 0x61, struct kvm_irq_level)`.
    #[test]
    fn the_irq_line_request_is_linux_s() {
        let size = std::mem::size_of::<kvm_bindings::kvm_irq_level>() as u64;
        assert_eq!(KVM_IRQ_LINE, (1 << 30) | (size << 16) | (0xae << 8) | 0x61);
    }

    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::rng::{Rng, TYPE_RNG};

    const VIRTQ_DESC_F_WRITE: u16 = 2;

    /// Drives the transport as Linux's virtio_mmio driver does.
    fn bring_up(t: &mut MmioTransport, q: &MockSplitQueue<GuestMemoryMmap>) {
        assert_eq!(t.read_u32(REG_MAGIC), MAGIC);
        assert_eq!(t.read_u32(REG_VERSION), 2);
        t.write_u32(REG_STATUS, 1 | 2); // ACKNOWLEDGE | DRIVER
        t.write_u32(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(t.read_u32(REG_DEVICE_FEATURES), 1, "VERSION_1 is offered");
        t.write_u32(REG_DRIVER_FEATURES_SEL, 1);
        t.write_u32(REG_DRIVER_FEATURES, 1);
        t.write_u32(REG_STATUS, 1 | 2 | STATUS_FEATURES_OK);
        assert_ne!(t.read_u32(REG_STATUS) & STATUS_FEATURES_OK, 0);
        t.write_u32(REG_QUEUE_SEL, 0);
        assert_eq!(t.read_u32(REG_QUEUE_NUM_MAX), 256);
        t.write_u32(REG_QUEUE_NUM, 16);
        let addr = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
        let (dl, dh) = addr(q.desc_table_addr());
        let (al, ah) = addr(q.avail_addr());
        let (ul, uh) = addr(q.used_addr());
        t.write_u32(REG_QUEUE_DESC_LOW, dl);
        t.write_u32(REG_QUEUE_DESC_HIGH, dh);
        t.write_u32(REG_QUEUE_AVAIL_LOW, al);
        t.write_u32(REG_QUEUE_AVAIL_HIGH, ah);
        t.write_u32(REG_QUEUE_USED_LOW, ul);
        t.write_u32(REG_QUEUE_USED_HIGH, uh);
        t.write_u32(REG_QUEUE_READY, 1);
        assert_eq!(t.read_u32(REG_QUEUE_READY), 1);
        t.write_u32(REG_STATUS, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    #[test]
    fn rng_fills_the_guests_buffer_and_interrupts() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let q = MockSplitQueue::new(&mem, 16);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(Rng), mem.clone(), irq.try_clone().unwrap());
        assert_eq!(t.read_u32(REG_DEVICE_ID), TYPE_RNG);
        bring_up(&mut t, &q);

        let buf = GuestAddress(0x10_0000);
        mem.write_slice(&[0u8; 64], buf).unwrap();
        let desc = RawDescriptor::from(SplitDescriptor::new(buf.0, 64, VIRTQ_DESC_F_WRITE, 0));
        q.add_desc_chains(&[desc], 0).unwrap();
        t.write_u32(REG_QUEUE_NOTIFY, 0);

        assert_eq!(q.used().idx().load(), 1);
        let used = q.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 64);
        let mut got = [0u8; 64];
        mem.read_slice(&mut got, buf).unwrap();
        assert_ne!(got, [0u8; 64], "the buffer holds random bytes");
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(t.read_u32(REG_INTERRUPT_STATUS), INT_USED_RING);
        t.write_u32(REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(t.read_u32(REG_INTERRUPT_STATUS), 0);

        // Saved and restored, the transport goes on where it was: the next
        // buffer lands in the next used slot.
        let state = t.save().unwrap();
        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t2 = MmioTransport::restore(Box::new(Rng), mem.clone(), irq2, &state).unwrap();
        assert_eq!(t2.save().unwrap(), state);
        assert_eq!(t2.read_u32(REG_QUEUE_READY), 1);
        let desc = RawDescriptor::from(SplitDescriptor::new(buf.0, 16, VIRTQ_DESC_F_WRITE, 0));
        q.add_desc_chains(&[desc], 1).unwrap();
        t2.write_u32(REG_QUEUE_NOTIFY, 0);
        assert_eq!(q.used().idx().load(), 2);

        // An interrupt the snapshot caught pending is raised again once
        // the restored transport settles.
        let irq4 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut pending = state.clone();
        pending.interrupt_status = INT_USED_RING;
        let mut t4 = MmioTransport::restore(
            Box::new(Rng),
            mem.clone(),
            irq4.try_clone().unwrap(),
            &pending,
        )
        .unwrap();
        assert!(irq4.read().is_err(), "nothing raised before settling");
        t4.settle_after_restore();
        // Raised (twice: the chain the snapshot's state had not consumed
        // yet is handled too).
        assert!(irq4.read().unwrap() >= 1);

        // A state for another kind of device is refused.
        let mut other = state.clone();
        other.device_type = 26;
        let irq3 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let err = MmioTransport::restore(Box::new(Rng), mem, irq3, &other)
            .err()
            .unwrap();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn bad_guest_values_are_not_trusted() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(Rng), mem, irq);
        // Features the device never offered: FEATURES_OK does not stick.
        t.write_u32(REG_DRIVER_FEATURES_SEL, 0);
        t.write_u32(REG_DRIVER_FEATURES, 1 << 5);
        t.write_u32(REG_DRIVER_FEATURES_SEL, 1);
        t.write_u32(REG_DRIVER_FEATURES, 1);
        t.write_u32(REG_STATUS, 1 | 2 | STATUS_FEATURES_OK);
        assert_eq!(t.read_u32(REG_STATUS) & STATUS_FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK marks the device failed.
        t.write_u32(REG_STATUS, 1 | 2 | STATUS_DRIVER_OK);
        assert_ne!(t.read_u32(REG_STATUS) & STATUS_FAILED, 0);
        // A queue outside guest memory never becomes ready.
        t.write_u32(REG_STATUS, 0);
        t.write_u32(REG_QUEUE_NUM, 16);
        t.write_u32(REG_QUEUE_DESC_LOW, 0xffff_f000);
        t.write_u32(REG_QUEUE_READY, 1);
        assert_eq!(t.read_u32(REG_QUEUE_READY), 0);
        // Sizes above the maximum or not a power of two are ignored, and
        // so is a queue index that does not exist.
        t.write_u32(REG_QUEUE_NUM, 3);
        t.write_u32(REG_QUEUE_NUM, 4096);
        t.write_u32(REG_QUEUE_SEL, 7);
        assert_eq!(t.read_u32(REG_QUEUE_NUM_MAX), 0);
        t.write_u32(REG_QUEUE_NOTIFY, 7);
        // Narrow accesses do nothing.
        t.write(REG_STATUS, &[0xff]);
        assert_eq!(t.read_u32(REG_STATUS), 0);
    }
}
