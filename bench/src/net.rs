//! The virtio-net device model on its own, on the host, against a raw TAP
//! read/write loop, in one run (no VM).
//!
//! Two TAPs, t0 and t1 (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), live in a
//! network namespace this program makes on a thread of its own (the
//! host's is never touched), joined both ways by traffic control (an
//! ingress qdisc and a u32 filter redirecting everything to the other's
//! egress, the "tcfilter" wiring the runtime will use). The device
//! (husk_vmm::devices::virtio::net) has t0; a guest driver is played here
//! on rings in guest memory, through the device's virtio-mmio transport,
//! as Linux's virtio_net would drive it (every offered feature accepted,
//! MRG_RXBUF included).
//!
//! - raw TAP loop: frames written to t0 (after a 12-byte virtio header of
//!   zeros, or a GSO header), read from t1, in batches, on one thread;
//! - the same with t1 read on a thread of its own, woken by t1 and
//!   signalling the writer through an eventfd, as the device's rx path
//!   has it;
//! - device TX: chains of header and frame queued on the tx queue and
//!   notified, as a vCPU would (the device gathers each chain and writes
//!   it to t0), read from t1;
//! - device RX: frames written to t1 come out of t0, where the device's
//!   thread `husk-net` moves them into the rx queue's buffers and raises
//!   the interrupt (an eventfd), on which the driver here waits, takes
//!   the frames and gives the buffers back.
//!
//! Sizes: 64-byte and 1514-byte (MTU 1500) Ethernet frames, and 64 KiB
//! TCP/IPv4 GSO frames (TSO4, 45 segments of 1448 bytes: 65214 bytes).
//! Rates count Ethernet frames and their bytes, without the virtio
//! header; CPU time is the whole process's (the device's thread
//! included) per frame.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use husk_bench::percentile;
use husk_vmm::devices::lock;
use husk_vmm::devices::virtio::mmio::MmioTransport;
use husk_vmm::devices::virtio::net::{Net, NetHandle};
use rustix::event::{PollFd, PollFlags};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

#[derive(Parser)]
#[command(about = "virtio-net device model vs a raw TAP read/write loop: packets/s and Gbit/s")]
struct Args {
    /// Seconds of each path (raw, raw with a reader thread, device TX,
    /// device RX) per size, split over the rounds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds, raw and device interleaved; the median round is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Only these sizes (64, 1514, gso); all by default.
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<String>,
    /// Only these paths (raw, raw2, tx, rx), for a profile; all by default.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Where in a page (hex) the raw loops' read buffers start. The
    /// kernel's copy into a buffer depends on it (see docs/benchmarks.md);
    /// fc0 is where the device's own frame buffer happened to lie.
    #[arg(long, default_value = "0", value_parser = page_offset)]
    read_offset: usize,
}

fn page_offset(s: &str) -> Result<usize, String> {
    let v = usize::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|e| e.to_string())?;
    if v < 4096 {
        Ok(v)
    } else {
        Err("a page offset is below 1000 (hex)".into())
    }
}

/// A read buffer of 128 KiB that starts `offset` bytes into a page.
struct ReadBuf {
    mem: Vec<u8>,
    at: usize,
}

impl ReadBuf {
    const LEN: usize = 128 * 1024;

    fn new(offset: usize) -> Self {
        let mem = vec![0u8; Self::LEN + 4096];
        let at = (offset + 4096 - mem.as_ptr() as usize % 4096) % 4096;
        Self { mem, at }
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.mem[self.at..self.at + Self::LEN]
    }
}

/// `virtio_net_hdr_v1`, in front of every frame on the queues and on the
/// TAPs.
const VNET_HDR: usize = 12;
const QSIZE: u16 = 256;

// Guest memory: the rings, then the rx buffers (side by side, as Linux
// carves them from a page fragment), then the tx chains (their pieces
// 4 KiB apart, one after the other).
const RX_DESC: u64 = 0x0000;
const RX_AVAIL: u64 = 0x1000;
const RX_USED: u64 = 0x2000;
const TX_DESC: u64 = 0x4000;
const TX_AVAIL: u64 = 0x5000;
const TX_USED: u64 = 0x6000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
const MEM_SIZE: usize = 8 << 20;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

// The device's queues.
const RX: u32 = 0;
const TX: u32 = 1;

// virtio-mmio registers (the transport's own).
use husk_vmm::devices::virtio::mmio::{
    REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL, REG_DEVICE_ID, REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL, REG_QUEUE_DESC_LOW, REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_READY,
    REG_QUEUE_SEL, REG_STATUS,
};

/// How long a frame may take before it counts as lost (and the run fails).
const PATIENCE: Duration = Duration::from_secs(2);

/// One frame size.
struct Case {
    name: &'static str,
    /// The virtio header and the Ethernet frame.
    frame: Vec<u8>,
    /// Frames per batch: written, then all read back.
    batch: usize,
    /// The rx buffers' length, as Linux's virtio_net sizes mergeable
    /// buffers: 1536 (1518 + 12, aligned to 64) for an MTU of 1500, a
    /// whole page once its average packet is large.
    rx_buf: u32,
    /// The tx chain's pieces, one descriptor each: the whole frame in one
    /// (Linux pushes the header into the skb's headroom), or the header
    /// and the packet's headers, then 4 KiB page fragments.
    pieces: Vec<(usize, usize)>,
}

impl Case {
    fn eth_len(&self) -> usize {
        self.frame.len() - VNET_HDR
    }
}

const DST: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

/// A frame of `len` bytes of a local experimental ethertype, no offload.
fn plain(name: &'static str, len: usize) -> Case {
    let mut frame = vec![0u8; VNET_HDR];
    frame.extend(DST);
    frame.extend(SRC);
    frame.extend(0x88b5u16.to_be_bytes());
    frame.extend((frame.len()..VNET_HDR + len).map(|i| i as u8));
    let all = frame.len();
    Case {
        name,
        frame,
        batch: 128,
        rx_buf: 1536,
        pieces: vec![(0, all)],
    }
}

/// A 64 KiB TCP/IPv4 TSO frame, its checksum and segmentation left to
/// whoever receives it: 45 segments of 1448 bytes, 65214 bytes in all,
/// under the 64 KiB GSO limit (a packet of 65536 bytes or more is
/// segmented by the host before the TAP: the limit counts the Ethernet
/// header).
fn gso() -> Case {
    let eth_len = 14 + 20 + 20 + 45 * 1448;
    let ip_len = (eth_len - 14) as u16;
    let mut frame = Vec::with_capacity(VNET_HDR + eth_len);
    // flags NEEDS_CSUM, gso_type TCPV4, hdr_len, gso_size, csum_start,
    // csum_offset, num_buffers.
    frame.push(1);
    frame.push(1);
    for v in [54u16, 1448, 34, 16, 0] {
        frame.extend(v.to_le_bytes());
    }
    frame.extend(DST);
    frame.extend(SRC);
    frame.extend(0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    frame.extend(ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    frame.extend(tcp);
    frame.extend((frame.len()..VNET_HDR + eth_len).map(|i| i as u8));
    let head = VNET_HDR + 54;
    let mut pieces = vec![(0, head)];
    let mut at = head;
    while at < frame.len() {
        let end = (at + 4096).min(frame.len());
        pieces.push((at, end));
        at = end;
    }
    Case {
        name: "65214 B GSO (TSO4, 45 × 1448)",
        batch: usize::from(QSIZE) / pieces.len(),
        frame,
        rx_buf: 4096,
        pieces,
    }
}

/// One split virtqueue as the guest's driver keeps it.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
}

impl Ring {
    fn new(desc: u64, avail: u64, used: u64) -> Self {
        Self {
            desc,
            avail,
            used,
            next_avail: 0,
            next_used: 0,
        }
    }

    fn set_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> anyhow::Result<()> {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(self.desc + 16 * u64::from(i)))?;
        Ok(())
    }

    /// Puts a chain in the avail ring, not yet visible to the device.
    fn offer(&mut self, mem: &GuestMemoryMmap, head: u16) -> anyhow::Result<()> {
        let slot = self.avail + 4 + 2 * u64::from(self.next_avail % QSIZE);
        mem.write_obj(head.to_le(), GuestAddress(slot))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Makes what was offered visible: one store of the avail index.
    fn publish(&self, mem: &GuestMemoryMmap) -> anyhow::Result<()> {
        mem.store(
            self.next_avail.to_le(),
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )?;
        Ok(())
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> anyhow::Result<u16> {
        let idx: u16 = mem.load(GuestAddress(self.used + 2), Ordering::Acquire)?;
        Ok(u16::from_le(idx))
    }

    /// The used element at `i`: its head and the length written.
    fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> anyhow::Result<(u16, u32)> {
        let at = self.used + 4 + 8 * u64::from(i % QSIZE);
        let elem = u64::from_le(mem.read_obj(GuestAddress(at))?);
        Ok((elem as u16, (elem >> 32) as u32))
    }
}

/// What one measurement counted.
#[derive(Clone, Copy, Default)]
struct Count {
    frames: u64,
    secs: f64,
    cpu_ns: u64,
}

/// Runs `round` (one batch each way; it returns the frames it moved)
/// until `until` has passed, or once when `check`: the frames, and the
/// wall and CPU time they took.
fn timed(
    until: Duration,
    check: bool,
    mut round: impl FnMut() -> anyhow::Result<u64>,
) -> anyhow::Result<Count> {
    let (t, cpu) = (Instant::now(), cpu_now());
    let mut frames = 0;
    loop {
        frames += round()?;
        if check || t.elapsed() >= until {
            break;
        }
    }
    Ok(Count {
        frames,
        secs: t.elapsed().as_secs_f64(),
        cpu_ns: cpu_now() - cpu,
    })
}

fn cpu_now() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Waits until `fd` is readable, or fails after [`PATIENCE`].
fn wait_readable(fd: impl AsFd, what: impl FnOnce() -> String) -> anyhow::Result<()> {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let timeout = rustix::time::Timespec {
        tv_sec: PATIENCE.as_secs() as i64,
        tv_nsec: 0,
    };
    loop {
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) => bail!("{}", what()),
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The device, its transport and the driver's rings, and the two TAPs.
struct Rig {
    mem: GuestMemoryMmap,
    transport: Arc<Mutex<MmioTransport>>,
    irq: EventFd,
    handle: NetHandle,
    rx: Ring,
    tx: Ring,
    t0: File,
    t1: File,
    buf: ReadBuf,
    read_offset: usize,
    /// Frames of other lengths seen (none expected).
    strays: u64,
}

impl Rig {
    /// The device with t0 bound, its driver up with every feature it
    /// offers accepted, its thread running; t1 for the bench.
    fn new(t0: File, t1: File, read_offset: usize) -> anyhow::Result<Self> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])?;
        let (net, host) = Net::new()?;
        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            Box::new(net),
            mem.clone(),
            irq.try_clone()?,
        )));
        {
            let mut t = lock(&transport);
            ensure!(t.read_u32(REG_DEVICE_ID) == 1, "not a network device");
            t.write_u32(REG_STATUS, 1 | 2);
            for sel in 0..2 {
                t.write_u32(REG_DEVICE_FEATURES_SEL, sel);
                let offered = t.read_u32(REG_DEVICE_FEATURES);
                t.write_u32(REG_DRIVER_FEATURES_SEL, sel);
                t.write_u32(REG_DRIVER_FEATURES, offered);
            }
            t.write_u32(REG_STATUS, 1 | 2 | 8);
            ensure!(t.read_u32(REG_STATUS) & 8 != 0, "features refused");
            for (q, addrs) in [
                (RX, [RX_DESC, RX_AVAIL, RX_USED]),
                (TX, [TX_DESC, TX_AVAIL, TX_USED]),
            ] {
                t.write_u32(REG_QUEUE_SEL, q);
                t.write_u32(REG_QUEUE_NUM, u32::from(QSIZE));
                for (j, a) in addrs.iter().enumerate() {
                    let at = REG_QUEUE_DESC_LOW + 0x10 * j as u64;
                    t.write_u32(at, *a as u32);
                    t.write_u32(at + 4, (*a >> 32) as u32);
                }
                t.write_u32(REG_QUEUE_READY, 1);
                ensure!(t.read_u32(REG_QUEUE_READY) == 1, "queue {q} not ready");
            }
            t.write_u32(REG_STATUS, 1 | 2 | 8 | 4);
        }
        let handle = host.start(transport.clone())?;
        handle
            .bind(OwnedFd::from(t0.try_clone()?))
            .context("bind t0 to the device")?;
        let mut rig = Self {
            mem,
            transport,
            irq,
            handle,
            rx: Ring::new(RX_DESC, RX_AVAIL, RX_USED),
            tx: Ring::new(TX_DESC, TX_AVAIL, TX_USED),
            t0,
            t1,
            buf: ReadBuf::new(read_offset),
            read_offset,
            strays: 0,
        };
        // Every rx buffer offered, one descriptor each; lengths per case.
        for i in 0..QSIZE {
            rig.rx.offer(&rig.mem, i)?;
        }
        Ok(rig)
    }

    fn notify(&self, queue: u32) {
        lock(&self.transport).write_u32(REG_QUEUE_NOTIFY, queue);
    }

    /// Lays out `case`: the rx buffers' length, the tx chains and their
    /// bytes in guest memory (written once, as a guest's sockets would
    /// have them).
    fn prepare(&mut self, case: &Case) -> anyhow::Result<()> {
        for i in 0..QSIZE {
            let addr = RX_BUFS + u64::from(case.rx_buf) * u64::from(i);
            self.rx
                .set_desc(&self.mem, i, addr, case.rx_buf, F_WRITE, 0)?;
        }
        self.rx.publish(&self.mem)?;
        self.notify(RX);
        let n = case.pieces.len() as u16;
        for k in 0..case.batch as u16 {
            for (j, &(from, to)) in case.pieces.iter().enumerate() {
                let j = j as u16;
                let addr = TX_BUFS + 4096 * u64::from(k * n + j);
                self.mem
                    .write_slice(&case.frame[from..to], GuestAddress(addr))?;
                let last = j + 1 == n;
                let flags = if last { 0 } else { F_NEXT };
                let next = if last { 0 } else { k * n + j + 1 };
                self.tx
                    .set_desc(&self.mem, k * n + j, addr, (to - from) as u32, flags, next)?;
            }
        }
        Ok(())
    }

    /// Reads `want` frames of `case`'s length from t1; the first one is
    /// checked byte for byte when `check` is set.
    fn read_t1(&mut self, case: &Case, want: usize, check: bool) -> anyhow::Result<()> {
        let mut got = 0;
        while got < want {
            let buf = self.buf.get();
            match (&self.t1).read(buf) {
                Ok(n) if n == case.frame.len() => {
                    if check && got == 0 {
                        ensure!(
                            buf[VNET_HDR..n] == case.frame[VNET_HDR..],
                            "{}: the frame read from t1 is not the one sent",
                            case.name
                        );
                    }
                    got += 1;
                }
                Ok(_) => self.strays += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let strays = self.strays;
                    wait_readable(&self.t1, || {
                        format!(
                            "{}: {got} of {want} frames reached t1 ({strays} frames of \
                             other lengths so far)",
                            case.name
                        )
                    })?;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("read t1"),
            }
        }
        Ok(())
    }

    fn write_tap(mut tap: &File, frame: &[u8]) -> anyhow::Result<()> {
        let n = tap.write(frame).context("write to a TAP")?;
        ensure!(n == frame.len(), "short write to a TAP");
        Ok(())
    }

    /// The baseline: `batch` frames written to t0, then read from t1.
    fn raw(&mut self, case: &Case, until: Duration, check: bool) -> anyhow::Result<Count> {
        timed(until, check, || {
            for _ in 0..case.batch {
                Self::write_tap(&self.t0, &case.frame)?;
            }
            self.read_t1(case, case.batch, check)?;
            Ok(case.batch as u64)
        })
    }

    /// The baseline with the reading on a thread of its own, as the
    /// device's rx path has it: `batch` frames written to t0; a thread
    /// woken by t1 reads them and signals an eventfd, on which the writer
    /// waits before the next batch.
    fn raw_threads(&mut self, case: &Case, until: Duration) -> anyhow::Result<Count> {
        let stop = AtomicBool::new(false);
        let strays = AtomicU64::new(0);
        let signal = EventFd::new(libc::EFD_NONBLOCK)?;
        let (t, cpu) = (Instant::now(), cpu_now());
        let mut frames = 0;
        let (t1, read_offset) = (&self.t1, self.read_offset);
        std::thread::scope(|s| -> anyhow::Result<()> {
            let reader = s.spawn(|| -> anyhow::Result<()> {
                let mut buf = ReadBuf::new(read_offset);
                let mut fds = [PollFd::new(t1, PollFlags::IN)];
                let timeout = rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                while !stop.load(Ordering::Relaxed) {
                    match rustix::event::poll(&mut fds, Some(&timeout)) {
                        Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                        Ok(_) => {}
                        Err(e) => return Err(e.into()),
                    }
                    let mut got = 0;
                    loop {
                        match (&*t1).read(buf.get()) {
                            Ok(n) if n == case.frame.len() => got += 1,
                            Ok(_) => {
                                strays.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) => return Err(e).context("read t1"),
                        }
                    }
                    if got > 0 {
                        signal.write(got)?;
                    }
                }
                Ok(())
            });
            let mut run = || -> anyhow::Result<()> {
                loop {
                    for _ in 0..case.batch {
                        Self::write_tap(&self.t0, &case.frame)?;
                    }
                    let mut got = 0;
                    while got < case.batch as u64 {
                        // SAFETY: the eventfd is open, on this stack, for
                        // the whole wait.
                        let fd = unsafe { BorrowedFd::borrow_raw(signal.as_raw_fd()) };
                        wait_readable(fd, || {
                            format!(
                                "{}: {got} of {} frames reached t1's reader",
                                case.name, case.batch
                            )
                        })?;
                        got += signal.read().unwrap_or(0);
                    }
                    frames += case.batch as u64;
                    if t.elapsed() >= until {
                        return Ok(());
                    }
                }
            };
            let result = run();
            stop.store(true, Ordering::Relaxed);
            let read = reader.join().expect("the reader panicked");
            result.and(read)
        })?;
        self.strays += strays.load(Ordering::Relaxed);
        Ok(Count {
            frames,
            secs: t.elapsed().as_secs_f64(),
            cpu_ns: cpu_now() - cpu,
        })
    }

    /// Guest to host: `batch` chains queued and notified (the device
    /// writes them to t0 on this thread, as on a vCPU's), read from t1,
    /// and queued again.
    fn device_tx(&mut self, case: &Case, until: Duration, check: bool) -> anyhow::Result<Count> {
        let n = case.pieces.len() as u16;
        timed(until, check, || {
            for k in 0..case.batch as u16 {
                self.tx.offer(&self.mem, k * n)?;
            }
            self.tx.publish(&self.mem)?;
            self.notify(TX);
            let used = self.tx.used_idx(&self.mem)?;
            let done = used.wrapping_sub(self.tx.next_used);
            ensure!(
                usize::from(done) == case.batch,
                "{}: the device used {done} of {} tx chains",
                case.name,
                case.batch
            );
            self.tx.next_used = used;
            self.read_t1(case, case.batch, check)?;
            Ok(case.batch as u64)
        })
    }

    /// Host to guest: `batch` frames written to t1; the device's thread
    /// moves them from t0 into the rx buffers and interrupts; the driver
    /// takes each frame (its `num_buffers` buffers) and, once the batch
    /// is in, gives the buffers back and notifies.
    fn device_rx(&mut self, case: &Case, until: Duration, check: bool) -> anyhow::Result<Count> {
        // Buffers of the frame being taken: left to come, and its bytes.
        let mut left = 0u16;
        let mut len = 0usize;
        let mut assembled = Vec::new();
        timed(until, check, || {
            for _ in 0..case.batch {
                Self::write_tap(&self.t1, &case.frame)?;
            }
            let mut got = 0;
            while got < case.batch {
                let used = self.rx.used_idx(&self.mem)?;
                while self.rx.next_used != used {
                    let (id, n) = self.rx.used_elem(&self.mem, self.rx.next_used)?;
                    self.rx.next_used = self.rx.next_used.wrapping_add(1);
                    let addr = RX_BUFS + u64::from(case.rx_buf) * u64::from(id);
                    if left == 0 {
                        let num: u16 = self.mem.read_obj(GuestAddress(addr + 10))?;
                        left = u16::from_le(num).max(1);
                        len = 0;
                    }
                    if check && got == 0 {
                        let at = assembled.len();
                        assembled.resize(at + n as usize, 0);
                        self.mem
                            .read_slice(&mut assembled[at..], GuestAddress(addr))?;
                    }
                    len += n as usize;
                    left -= 1;
                    self.rx.offer(&self.mem, id)?;
                    if left == 0 {
                        if len == case.frame.len() {
                            got += 1;
                        } else {
                            self.strays += 1;
                        }
                    }
                }
                if got < case.batch {
                    let strays = self.strays;
                    // SAFETY: the eventfd is open, in `self`, for the
                    // whole wait.
                    let irq = unsafe { BorrowedFd::borrow_raw(self.irq.as_raw_fd()) };
                    wait_readable(irq, || {
                        format!(
                            "{}: {got} of {} frames reached the rx queue ({strays} frames \
                             of other lengths so far)",
                            case.name, case.batch
                        )
                    })?;
                    let _ = self.irq.read();
                }
            }
            self.rx.publish(&self.mem)?;
            self.notify(RX);
            if check {
                ensure!(
                    assembled.len() == case.frame.len()
                        && assembled[VNET_HDR..] == case.frame[VNET_HDR..],
                    "{}: the frame in the rx buffers is not the one sent",
                    case.name
                );
            }
            Ok(case.batch as u64)
        })
    }
}

/// Makes TAP `name` in the calling thread's network namespace; it goes
/// with its descriptor.
fn open_tap(name: &str) -> anyhow::Result<File> {
    let tap = husk_sys::net::open_tap(name).with_context(|| format!("TAP {name}"))?;
    Ok(File::from(tap))
}

/// What the device does to its TAP, done to the bench's own: the 12-byte
/// header, the offloads of a driver that takes them all, non-blocking.
fn raw_tap(tap: &File) -> anyhow::Result<()> {
    let len = VNET_HDR as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
    // points at `len`, alive for the call.
    let r = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) };
    ensure!(
        r == 0,
        "TUNSETVNETHDRSZ: {}",
        std::io::Error::last_os_error()
    );
    let flags = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    let r = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
    ensure!(r == 0, "TUNSETOFFLOAD: {}", std::io::Error::last_os_error());
    rustix::io::ioctl_fionbio(tap, true)?;
    Ok(())
}

/// Runs `cmd` (iproute2) as a child of this thread, which is in its
/// network namespace.
fn run(cmd: &str) -> anyhow::Result<String> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let out = Command::new(words[0])
        .args(&words[1..])
        .output()
        .with_context(|| format!("run {cmd}"))?;
    ensure!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Results per case: raw, raw with a reader thread, device TX, device RX.
type Results = Vec<(&'static str, usize, [Vec<Count>; 4])>;

/// On a thread of its own: a new network namespace, the TAPs and the
/// wiring, then every measurement.
fn bench_in_namespace(args: &Args) -> anyhow::Result<Results> {
    let host_ns = std::fs::read_link("/proc/self/ns/net")?;
    // SAFETY: unshare takes no pointers; it moves this thread alone into
    // a new network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        // Never go on in the host's namespace.
        bail!(
            "cannot make a network namespace (root needed): {}",
            std::io::Error::last_os_error()
        );
    }
    let ours = std::fs::read_link("/proc/thread-self/ns/net")?;
    ensure!(
        ours != host_ns,
        "unshare left the thread in the host's namespace"
    );
    // Children start in the namespace of the thread that spawns them:
    // checked before any command changes anything.
    let child = run("readlink /proc/self/ns/net")?;
    ensure!(
        child.trim() == ours.to_string_lossy(),
        "a child of this thread is in network namespace {}, not this thread's {}",
        child.trim(),
        ours.display()
    );
    let t0 = open_tap("t0")?;
    let t1 = open_tap("t1")?;
    for (dev, peer) in [("t0", "t1"), ("t1", "t0")] {
        // No IPv6 link-local address: nothing of the kernel's own on the
        // wire (an error here only means IPv6 is off).
        let _ = run(&format!("ip link set dev {dev} addrgenmode none"));
        run(&format!("ip link set dev {dev} up"))?;
        run(&format!("tc qdisc add dev {dev} ingress"))?;
        run(&format!(
            "tc filter add dev {dev} parent ffff: protocol all u32 match u8 0 0 action mirred \
             egress redirect dev {peer}"
        ))?;
    }
    raw_tap(&t1)?;
    raw_tap(&t0)?;
    let mut rig = Rig::new(t0, t1, args.read_offset)?;

    let cases: Vec<Case> = [
        ("64", plain("64 B", 64)),
        ("1514", plain("1514 B (MTU 1500)", 1514)),
        ("gso", gso()),
    ]
    .into_iter()
    .filter(|(key, _)| args.sizes.is_empty() || args.sizes.iter().any(|s| s == key))
    .map(|(_, case)| case)
    .collect();
    ensure!(!cases.is_empty(), "--sizes: 64, 1514 or gso");
    let round = Duration::from_secs_f64(args.seconds / args.rounds as f64);
    let mut results = Vec::new();
    for case in &cases {
        rig.prepare(case)?;
        // Each path once, its frame checked.
        rig.raw(case, round, true)?;
        rig.device_tx(case, round, true)?;
        rig.device_rx(case, round, true)?;
        let mut counts: [Vec<Count>; 4] = Default::default();
        let on = |path: &str| args.paths.is_empty() || args.paths.iter().any(|p| p == path);
        for _ in 0..args.rounds {
            if on("raw") {
                counts[0].push(rig.raw(case, round, false)?);
            }
            if on("raw2") {
                counts[1].push(rig.raw_threads(case, round)?);
            }
            if on("tx") {
                counts[2].push(rig.device_tx(case, round, false)?);
            }
            if on("rx") {
                counts[3].push(rig.device_rx(case, round, false)?);
            }
        }
        results.push((case.name, case.eth_len(), counts));
    }
    if rig.strays > 0 {
        eprintln!(
            "husk-bench-net: {} frames of other lengths were seen and not counted",
            rig.strays
        );
    }
    rig.handle.unbind();
    Ok(results)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.rounds > 0 && args.seconds > 0.0, "nothing to measure");
    let results = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(s, || bench_in_namespace(&args))
            .map(|h| h.join().expect("the measuring thread panicked"))
    })??;

    println!(
        "| frame | path | packets/s | Gbit/s | of raw, 1 thread | of raw, 2 threads | CPU ns/packet |"
    );
    println!("|---|---|---|---|---|---|---|");
    let paths = [
        "raw TAP loop, 1 thread (write t0, read t1)",
        "raw TAP loop, 2 threads (t1 read on its own thread)",
        "device TX (tx queue → t0 → t1)",
        "device RX (t1 → t0 → rx queue)",
    ];
    for (name, eth_len, counts) in &results {
        let rate = |c: &[Count]| {
            let mut r: Vec<f64> = c.iter().map(|c| c.frames as f64 / c.secs).collect();
            percentile(&mut r, 50.0)
        };
        let of = |pps: f64, base: &[Count]| {
            if base.is_empty() {
                "-".to_string()
            } else {
                format!("{:.0}%", 100.0 * pps / rate(base))
            }
        };
        for (path, c) in paths.iter().zip(counts) {
            if c.is_empty() {
                continue;
            }
            let pps = rate(c);
            let gbit = pps * (*eth_len * 8) as f64 / 1e9;
            let frames: u64 = c.iter().map(|c| c.frames).sum();
            let cpu: u64 = c.iter().map(|c| c.cpu_ns).sum();
            println!(
                "| {name} | {path} | {pps:.0} | {gbit:.2} | {} | {} | {:.0} |",
                of(pps, &counts[0]),
                of(pps, &counts[1]),
                cpu as f64 / frames as f64
            );
        }
    }
    Ok(())
}
