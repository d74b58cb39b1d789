//! The device against mock queues, with a `SOCK_SEQPACKET` socket pair
//! standing in for the TAP (no root needed), and one story on a real TAP
//! in a network namespace of the test's own (root only).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;

use super::device::publish;
use super::*;
use crate::devices::virtio::VIRTIO_F_VERSION_1;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const MRG: u64 = bit(VIRTIO_NET_F_MRG_RXBUF);

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap()
}

/// The rx queue's mock rings at 0, the tx queue's at 64 KiB; buffers lie
/// from 1 MiB.
fn rx_queue(mem: &GuestMemoryMmap) -> MockSplitQueue<'_, GuestMemoryMmap> {
    MockSplitQueue::create(mem, GuestAddress(0), 256)
}

fn tx_queue(mem: &GuestMemoryMmap) -> MockSplitQueue<'_, GuestMemoryMmap> {
    MockSplitQueue::create(mem, GuestAddress(0x1_0000), 256)
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Writable buffers, one chain each, at descriptor `first` on.
fn add_buffers(q: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16, bufs: &[(u64, u32)]) {
    let descs: Vec<_> = bufs
        .iter()
        .map(|&(addr, len)| desc(addr, len, F_WRITE, 0))
        .collect();
    q.add_desc_chains(&descs, first).unwrap();
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both were just made and are owned here alone.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// One message from `fd` if one is there now.
fn try_recv(fd: RawFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_FRAME + 16];
    // SAFETY: recv writes at most `len` bytes into the live buffer.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    let n = usize::try_from(n).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn send(peer: &File, frame: &[u8]) {
    assert_eq!((&*peer).write(frame).unwrap(), frame.len());
}

/// A 12-byte virtio header (its `num_buffers` deliberately not 1) and a
/// frame of `len` patterned bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xee, 0xee];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

/// A device whose driver runs with `acked` (VERSION_1 added), and the
/// handle that binds its TAP. No thread: the tests take its turns.
fn device(acked: u64) -> (Net, NetHandle) {
    let (mut net, _host) = Net::new().unwrap();
    net.activate(VIRTIO_F_VERSION_1 | acked);
    let handle = NetHandle {
        backend: net.backend.clone(),
    };
    (net, handle)
}

/// A device with a socket pair bound: the device, the peer's end.
fn bound_device(acked: u64) -> (Net, NetHandle, File) {
    let (net, handle) = device(acked);
    let (tap, peer) = seqpacket_pair();
    handle.bind(tap).unwrap();
    (net, handle, File::from(peer))
}

/// The thread's turn, as it takes it: the host delivers what it has.
fn host_turn(net: &mut Net, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    lock(&net.backend).host_turn = true;
    net.process_queue(RX, q, mem)
}

fn used(q: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let e = q.used().ring().ref_at(i).unwrap().load();
    (e.id(), e.len())
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// The frame as the guest must see it: `num_buffers` set.
fn with_buffers(frame: &[u8], n: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[NUM_BUFFERS_AT..VNET_HDR_LEN].copy_from_slice(&n.to_le_bytes());
    f
}

#[test]
fn net_offers_its_features_and_a_config_of_zeros() {
    let (net, _) = device(0);
    let ours = [0, 1, 7, 8, 9, 11, 12, 13, 15];
    let expected = ours.iter().fold(0u64, |f, b| f | (1 << b));
    assert_eq!(net.features(), expected);
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), [256, 256]);
    let mut config = [0xffu8; 8];
    net.read_config(0, &mut config);
    assert_eq!(config, [0; 8]);
    assert!(
        net.save_state().unwrap().is_none(),
        "a snapshot keeps nothing"
    );
    fn send_sync<T: Send + Sync>() {}
    fn sends<T: Send>() {}
    send_sync::<NetHandle>();
    sends::<Net>();
}

#[test]
fn net_offloads_follow_what_the_driver_accepted() {
    let b = |fs: &[u32]| fs.iter().fold(0u64, |f, &x| f | bit(x));
    assert_eq!(tap_offloads(0), 0);
    // TSO without GUEST_CSUM: the TAP would refuse it, so nothing.
    assert_eq!(tap_offloads(b(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
    assert_eq!(
        tap_offloads(b(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN])),
        libc::TUN_F_CSUM,
        "ECN needs TSO"
    );
    assert_eq!(
        tap_offloads(b(&[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_HOST_TSO4,
        ])),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
    );
}

#[test]
fn net_tx_frame_reaches_the_tap_byte_exact() {
    let mem = memory();
    let q = tx_queue(&mem);
    let mut queue: Queue = q.create_queue().unwrap();
    let (mut net, _handle, peer) = bound_device(0);
    // Header and frame in two readable descriptors of one chain.
    let f = frame(1000, 3);
    mem.write_slice(&f[..VNET_HDR_LEN], GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(&f[VNET_HDR_LEN..], GuestAddress(0x20_0000))
        .unwrap();
    q.add_desc_chains(
        &[
            desc(0x10_0000, VNET_HDR_LEN as u32, F_NEXT, 1),
            desc(0x20_0000, 1000, 0, 0),
        ],
        0,
    )
    .unwrap();
    assert!(net.process_queue(TX, &mut queue, &mem));
    assert_eq!(try_recv(peer.as_raw_fd()).unwrap(), f, "header and frame");
    assert_eq!(q.used().idx().load(), 1);
    assert_eq!(used(&q, 0), (0, 0));
    assert!(
        try_recv(peer.as_raw_fd()).is_none(),
        "one frame, one message"
    );
}

#[test]
fn net_tx_drops_an_oversize_or_bad_frame_and_returns_its_descriptor() {
    let mem = memory();
    let q = tx_queue(&mem);
    let mut queue: Queue = q.create_queue().unwrap();
    let (mut net, _handle, peer) = bound_device(0);
    // One byte over MAX_FRAME, in two descriptors; a chain outside guest
    // memory; a runt shorter than its header; then a good frame.
    let good = frame(60, 9);
    mem.write_slice(&good, GuestAddress(0x30_0000)).unwrap();
    q.add_desc_chains(
        &[
            desc(0x10_0000, 40_000, F_NEXT, 1),
            desc(0x20_0000, (MAX_FRAME + 1 - 40_000) as u32, 0, 0),
            desc(0x7fff_0000, 100, 0, 0),
            desc(0x30_0000, 8, 0, 0),
            desc(0x30_0000, good.len() as u32, 0, 0),
        ],
        0,
    )
    .unwrap();
    assert!(net.process_queue(TX, &mut queue, &mem));
    assert_eq!(q.used().idx().load(), 4, "every chain goes back");
    assert_eq!(used(&q, 0), (0, 0));
    assert_eq!(used(&q, 1), (2, 0));
    assert_eq!(used(&q, 2), (3, 0));
    assert_eq!(
        try_recv(peer.as_raw_fd()).unwrap(),
        good,
        "only the good one"
    );
    assert!(try_recv(peer.as_raw_fd()).is_none());

    // MAX_FRAME itself goes through.
    let big = frame(MAX_FRAME - VNET_HDR_LEN, 1);
    mem.write_slice(&big, GuestAddress(0x40_0000)).unwrap();
    q.add_desc_chains(&[desc(0x40_0000, MAX_FRAME as u32, 0, 0)], 5)
        .unwrap();
    assert!(net.process_queue(TX, &mut queue, &mem));
    assert_eq!(try_recv(peer.as_raw_fd()).unwrap(), big);
}

#[test]
fn net_tx_without_a_tap_drops_and_returns_the_descriptor() {
    let mem = memory();
    let q = tx_queue(&mem);
    let mut queue: Queue = q.create_queue().unwrap();
    let (mut net, handle) = device(0);
    q.add_desc_chains(&[desc(0x10_0000, 100, 0, 0)], 0).unwrap();
    assert!(net.process_queue(TX, &mut queue, &mem));
    assert_eq!(q.used().idx().load(), 1);
    // Bound, then unbound: dropped again; the old peer sees its end
    // closed (an empty read) and no frame.
    let (tap, peer) = seqpacket_pair();
    handle.bind(tap).unwrap();
    handle.unbind();
    q.add_desc_chains(&[desc(0x10_0000, 100, 0, 0)], 1).unwrap();
    assert!(net.process_queue(TX, &mut queue, &mem));
    assert_eq!(q.used().idx().load(), 2);
    assert_eq!(try_recv(peer.as_raw_fd()), Some(Vec::new()));
}

#[test]
fn net_rx_frame_lands_in_one_buffer_with_num_buffers_1() {
    for acked in [0, MRG] {
        let mem = memory();
        let q = rx_queue(&mem);
        let mut queue: Queue = q.create_queue().unwrap();
        let (mut net, _handle, peer) = bound_device(acked);
        add_buffers(&q, 0, &[(0x10_0000, 2048), (0x20_0000, 2048)]);
        let f = frame(100, 5);
        send(&peer, &f);
        assert!(host_turn(&mut net, &mut queue, &mem));
        assert_eq!(q.used().idx().load(), 1, "acked {acked:#x}");
        assert_eq!(used(&q, 0), (0, f.len() as u32));
        assert_eq!(read(&mem, 0x10_0000, f.len()), with_buffers(&f, 1));
        // Nothing more: nothing used, no interrupt.
        assert!(!host_turn(&mut net, &mut queue, &mem));
        assert_eq!(queue.next_avail(), 1, "the second buffer is left");
    }
}

#[test]
fn net_rx_merges_a_large_frame_over_buffers_published_at_once() {
    let mem = memory();
    let q = rx_queue(&mem);
    let mut queue: Queue = q.create_queue().unwrap();
    let (mut net, _handle, peer) = bound_device(MRG);
    let bufs = [
        (0x10_0000, 1536),
        (0x20_0000, 1536),
        (0x30_0000, 1536),
        (0x40_0000, 1536),
    ];
    add_buffers(&q, 0, &bufs);
    let f = frame(4000, 11);
    send(&peer, &f);
    assert!(host_turn(&mut net, &mut queue, &mem));
    assert_eq!(q.used().idx().load(), 3);
    let expect = with_buffers(&f, 3);
    assert_eq!(used(&q, 0), (0, 1536));
    assert_eq!(used(&q, 1), (1, 1536));
    assert_eq!(used(&q, 2), (2, (f.len() - 2 * 1536) as u32));
    assert_eq!(read(&mem, 0x10_0000, 1536), expect[..1536]);
    assert_eq!(read(&mem, 0x20_0000, 1536), expect[1536..3072]);
    assert_eq!(read(&mem, 0x30_0000, f.len() - 3072), expect[3072..]);
    assert_eq!(queue.next_avail(), 3, "the fourth buffer is left");
    assert_eq!(queue.next_used(), 3);
}

#[test]
fn net_publish_writes_the_elements_then_one_index_across_the_wrap() {
    let mem = memory();
    let q = rx_queue(&mem);
    let mut queue: Queue = q.create_queue().unwrap();
    // The used index about to wrap, its slot about to wrap round the ring.
    queue.set_next_used(u16::MAX - 1);
    q.used().idx().store(u16::MAX - 1);
    assert!(publish(&mut queue, &mem, &[(7, 100), (8, 200), (9, 300)]));
    assert_eq!(q.used().idx().load(), 1);
    assert_eq!(queue.next_used(), 1);
    assert_eq!(used(&q, 254), (7, 100));
    assert_eq!(used(&q, 255), (8, 200));
    assert_eq!(used(&q, 0), (9, 300));
    assert!(!publish(&mut queue, &mem, &[]));
    assert_eq!(q.used().idx().load(), 1);
}

#[test]
fn net_rx_frame_waits_for_buffers_then_arrives() {
    let mem = memory();
    let q = rx_queue(&mem);
    let mut queue: Queue = q.create_queue().unwrap();
    let (mut net, _handle, peer) = bound_device(MRG);
    // One buffer, for a frame that needs three: none is taken.
    add_buffers(&q, 0, &[(0x10_0000, 1536)]);
    let f = frame(4000, 13);
    send(&peer, &f);
    assert!(!host_turn(&mut net, &mut queue, &mem));
    assert_eq!(q.used().idx().load(), 0);
    assert_eq!(queue.next_avail(), 0, "the buffer went back");
    assert_eq!(lock(&net.backend).pending, Some(f.len()));
    // The TAP is not polled while the frame waits.
    lock(&net.backend).watch();
    assert!(!lock(&net.backend).bound.as_ref().unwrap().armed);
    // A second frame behind it stays in the TAP.
    let g = frame(50, 17);
    send(&peer, &g);

    // The guest adds two buffers and notifies: its vCPU only kicks the
    // thread.
    add_buffers(&q, 1, &[(0x20_0000, 1536), (0x30_0000, 1536)]);
    let _ = lock(&net.backend).kick.read();
    assert!(!net.process_queue(RX, &mut queue, &mem));
    assert_eq!(lock(&net.backend).kick.read().unwrap(), 1, "kicked");
    assert_eq!(q.used().idx().load(), 0);
    // The thread's turn: the waiting frame over three buffers, then the
    // next one waits for a buffer of its own.
    assert!(host_turn(&mut net, &mut queue, &mem));
    assert_eq!(q.used().idx().load(), 3);
    let expect = with_buffers(&f, 3);
    assert_eq!(read(&mem, 0x10_0000, 1536), expect[..1536]);
    assert_eq!(read(&mem, 0x30_0000, f.len() - 3072), expect[3072..]);
    assert_eq!(lock(&net.backend).pending, Some(g.len()));
    add_buffers(&q, 3, &[(0x40_0000, 1536)]);
    assert!(host_turn(&mut net, &mut queue, &mem));
    assert_eq!(q.used().idx().load(), 4);
    assert_eq!(used(&q, 3), (3, g.len() as u32));
    assert_eq!(read(&mem, 0x40_0000, g.len()), with_buffers(&g, 1));
    assert_eq!(lock(&net.backend).pending, None);
    lock(&net.backend).watch();
    assert!(
        lock(&net.backend).bound.as_ref().unwrap().armed,
        "polled again"
    );
}

#[test]
fn net_rx_without_mrg_waits_for_a_buffer_and_drops_a_frame_none_can_hold() {
    let mem = memory();
    let q = rx_queue(&mem);
    let mut queue: Queue = q.create_queue().unwrap();
    let (mut net, _handle, peer) = bound_device(0);
    let f = frame(100, 19);
    send(&peer, &f);
    assert!(!host_turn(&mut net, &mut queue, &mem));
    assert_eq!(lock(&net.backend).pending, Some(f.len()));
    // A buffer too small for the frame: it will never fit one, so it is
    // dropped; the buffer stays the guest's, for the next frame.
    add_buffers(&q, 0, &[(0x10_0000, 64)]);
    let small = frame(20, 23);
    send(&peer, &small);
    assert!(host_turn(&mut net, &mut queue, &mem));
    assert_eq!(q.used().idx().load(), 1);
    assert_eq!(used(&q, 0), (0, small.len() as u32));
    assert_eq!(read(&mem, 0x10_0000, small.len()), with_buffers(&small, 1));
    assert_eq!(lock(&net.backend).pending, None);
}

#[test]
fn net_rx_bad_chains_go_back_empty() {
    for acked in [0, MRG] {
        let mem = memory();
        let q = rx_queue(&mem);
        let mut queue: Queue = q.create_queue().unwrap();
        let (mut net, _handle, peer) = bound_device(acked);
        // Outside guest memory; read-only (no writable bytes); then good.
        q.add_desc_chains(
            &[
                desc(0x7fff_0000, 2048, F_WRITE, 0),
                desc(0x10_0000, 2048, 0, 0),
                desc(0x20_0000, 2048, F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let f = frame(100, 29);
        send(&peer, &f);
        assert!(host_turn(&mut net, &mut queue, &mem));
        assert_eq!(q.used().idx().load(), 3, "acked {acked:#x}");
        assert_eq!(used(&q, 0), (0, 0));
        assert_eq!(used(&q, 1), (1, 0));
        assert_eq!(used(&q, 2), (2, f.len() as u32));
        assert_eq!(read(&mem, 0x20_0000, f.len()), with_buffers(&f, 1));
    }
}

#[test]
fn net_bind_refuses_what_will_not_do() {
    let (_net, handle) = device(0);
    let (stream, _) = std::os::unix::net::UnixStream::pair().unwrap();
    let e = handle.bind(stream.into()).unwrap_err();
    assert!(matches!(e, NetError::SocketType { kind } if kind == libc::SOCK_STREAM));
    assert!(e.to_string().contains("keep frames apart"), "{e}");
    let null = File::open("/dev/null").unwrap();
    let e = handle.bind(null.into()).unwrap_err();
    assert!(matches!(e, NetError::NotTap(_)), "{e:?}");
    assert!(e.to_string().contains("not a TAP"), "{e}");
    let (tap, _peer) = seqpacket_pair();
    handle.bind(tap).unwrap();
    let (other, _) = seqpacket_pair();
    let e = handle.bind(other).unwrap_err();
    assert!(matches!(e, NetError::AlreadyBound), "{e:?}");
    assert!(e.to_string().contains("already bound"), "{e}");
    handle.unbind();
    let (again, _) = seqpacket_pair();
    handle.bind(again).unwrap();
}

#[test]
fn net_reset_drops_the_waiting_frame_and_stops_polling() {
    let mem = memory();
    let q = rx_queue(&mem);
    let mut queue: Queue = q.create_queue().unwrap();
    let (mut net, _handle, peer) = bound_device(0);
    send(&peer, &frame(100, 31));
    assert!(!host_turn(&mut net, &mut queue, &mem));
    assert!(lock(&net.backend).pending.is_some());
    net.reset();
    let mut backend = lock(&net.backend);
    assert!(backend.pending.is_none());
    assert!(!backend.can_receive());
    backend.watch();
    assert!(!backend.bound.as_ref().unwrap().armed);
}

// virtio-mmio registers, as a driver writes them (the transport's own).
use crate::devices::virtio::mmio::{
    REG_CONFIG, REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL, REG_DEVICE_ID, REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL, REG_QUEUE_DESC_LOW, REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_READY,
    REG_QUEUE_SEL, REG_STATUS,
};

/// Brings the device up as Linux's virtio_mmio and virtio_net drivers do,
/// accepting `features`.
fn bring_up(t: &mut MmioTransport, queues: &[&MockSplitQueue<'_, GuestMemoryMmap>], features: u64) {
    assert_eq!(t.read_u32(REG_DEVICE_ID), TYPE_NET);
    t.write_u32(REG_STATUS, 1 | 2);
    t.write_u32(REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        u64::from(t.read_u32(REG_DEVICE_FEATURES)),
        FEATURES & 0xffff_ffff
    );
    for sel in 0..2 {
        t.write_u32(REG_DRIVER_FEATURES_SEL, sel);
        t.write_u32(REG_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
    }
    t.write_u32(REG_STATUS, 1 | 2 | 8);
    for (i, q) in queues.iter().enumerate() {
        t.write_u32(REG_QUEUE_SEL, i as u32);
        t.write_u32(REG_QUEUE_NUM, 256);
        let addrs = [q.desc_table_addr(), q.avail_addr(), q.used_addr()];
        for (j, a) in addrs.iter().enumerate() {
            let at = REG_QUEUE_DESC_LOW + 0x10 * j as u64;
            t.write_u32(at, a.0 as u32);
            t.write_u32(at + 4, (a.0 >> 32) as u32);
        }
        t.write_u32(REG_QUEUE_READY, 1);
        assert_eq!(t.read_u32(REG_QUEUE_READY), 1);
    }
    t.write_u32(REG_STATUS, 1 | 2 | 8 | 4);
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The transport tells the device when its driver starts and resets it,
/// and a restored transport whose driver ran starts its device too.
#[test]
fn net_transport_activates_and_resets_the_device() {
    let mem = memory();
    let (rx, tx) = (rx_queue(&mem), tx_queue(&mem));
    let (net, _host) = Net::new().unwrap();
    let backend = net.backend.clone();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(net), mem.clone(), irq);
    let acked = VIRTIO_F_VERSION_1 | MRG | bit(VIRTIO_NET_F_GUEST_CSUM);
    assert!(!lock(&backend).active);
    bring_up(&mut t, &[&rx, &tx], acked);
    assert!(lock(&backend).active);
    assert_eq!(lock(&backend).acked, acked);
    assert_eq!(t.read_u32(REG_CONFIG), 0);

    let state = t.save().unwrap();
    let (net2, _host2) = Net::new().unwrap();
    let backend2 = net2.backend.clone();
    let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let _t2 = MmioTransport::restore(Box::new(net2), mem.clone(), irq2, &state).unwrap();
    assert!(lock(&backend2).active, "restored running");
    assert_eq!(lock(&backend2).acked, acked);

    t.write_u32(REG_STATUS, 0);
    assert!(!lock(&backend).active);
    let state = t.save().unwrap();
    let (net3, _host3) = Net::new().unwrap();
    let backend3 = net3.backend.clone();
    let irq3 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let _t3 = MmioTransport::restore(Box::new(net3), mem, irq3, &state).unwrap();
    assert!(!lock(&backend3).active, "restored reset");
}

/// The whole path with the device's thread: a frame from the TAP reaches
/// the guest and interrupts it; one that finds no buffer waits, unpolled,
/// until the guest adds one and notifies; a guest frame reaches the TAP.
#[test]
fn net_thread_delivers_from_the_tap_through_the_transport() {
    let mem = memory();
    let (rx, tx) = (rx_queue(&mem), tx_queue(&mem));
    let (net, host) = Net::new().unwrap();
    let backend = net.backend.clone();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        Box::new(net),
        mem.clone(),
        irq.try_clone().unwrap(),
    )));
    bring_up(&mut lock(&transport), &[&rx, &tx], VIRTIO_F_VERSION_1 | MRG);
    let handle = host.start(transport.clone()).unwrap();
    let (tap, peer) = seqpacket_pair();
    let peer = File::from(peer);
    handle.bind(tap).unwrap();

    add_buffers(&rx, 0, &[(0x10_0000, 2048)]);
    let f = frame(500, 37);
    send(&peer, &f);
    wait_for("the first frame", || rx.used().idx().load() == 1);
    assert_eq!(used(&rx, 0), (0, f.len() as u32));
    assert_eq!(read(&mem, 0x10_0000, f.len()), with_buffers(&f, 1));
    wait_for("the interrupt", || irq.read().is_ok());

    // No buffer left: the next frame waits.
    let g = frame(700, 41);
    send(&peer, &g);
    wait_for("the frame to wait", || lock(&backend).pending.is_some());
    wait_for("the TAP to be unpolled", || {
        !lock(&backend).bound.as_ref().unwrap().armed
    });
    assert_eq!(rx.used().idx().load(), 1);
    add_buffers(&rx, 1, &[(0x20_0000, 2048)]);
    lock(&transport).write_u32(REG_QUEUE_NOTIFY, RX as u32);
    wait_for("the waiting frame", || rx.used().idx().load() == 2);
    assert_eq!(read(&mem, 0x20_0000, g.len()), with_buffers(&g, 1));
    wait_for("the TAP to be polled again", || {
        lock(&backend).bound.as_ref().unwrap().armed
    });

    // Guest to TAP, through the transport.
    let h = frame(300, 43);
    mem.write_slice(&h, GuestAddress(0x30_0000)).unwrap();
    tx.add_desc_chains(&[desc(0x30_0000, h.len() as u32, 0, 0)], 0)
        .unwrap();
    lock(&transport).write_u32(REG_QUEUE_NOTIFY, TX as u32);
    assert_eq!(try_recv(peer.as_raw_fd()).unwrap(), h);
    assert_eq!(tx.used().idx().load(), 1);

    // The peer hangs up: the TAP leaves the epoll set (no busy loop on
    // the hang-up epoll keeps reporting).
    drop(peer);
    wait_for("the hang-up", || {
        !lock(&backend).bound.as_ref().unwrap().registered
    });
    handle.unbind();
    assert!(lock(&backend).bound.is_none());
}

/// `struct ifreq` with a name and flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

fn ifreq(name: &str, flags: libc::c_int) -> IfReq {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: flags as libc::c_short,
        _rest: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req
}

/// Opens a TAP `name` with `flags` in the calling thread's network
/// namespace.
fn open_tap(name: &str, flags: libc::c_int) -> OwnedFd {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = ifreq(name, flags);
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req` is.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
    assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    tun.into()
}

/// A raw packet socket on interface `ifindex` for frames of `ethertype`.
fn packet_socket(ifindex: u32, ethertype: u16) -> OwnedFd {
    // SAFETY: socket takes no pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ethertype.to_be()),
        )
    };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: just made, owned here alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr = sockaddr_ll(ifindex, ethertype);
    addr.sll_halen = 0;
    // SAFETY: bind reads one sockaddr_ll of the length given.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    sock
}

fn sockaddr_ll(ifindex: u32, ethertype: u16) -> libc::sockaddr_ll {
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: ethertype.to_be(),
        sll_ifindex: ifindex as i32,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0],
    }
}

/// A real TAP, in a network namespace this test makes on a thread of its
/// own (the host's is never touched): a TAP without the virtio header is
/// refused; one with it takes the header size and the offloads a driver
/// with every guest offload asks for; a guest frame comes out of its
/// interface and a frame sent into it reaches the guest, each byte-exact.
#[test]
fn net_real_tap_in_a_network_namespace_of_its_own() {
    // SAFETY: geteuid takes no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    std::thread::spawn(real_tap_story).join().unwrap();
}

fn real_tap_story() {
    // SAFETY: unshare takes no pointers; it moves this thread alone into
    // a new network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        // Never go on in the host's namespace.
        eprintln!(
            "skipped: cannot make a network namespace: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    const ETHERTYPE: u16 = 0x88b5; // local experimental
    let vnet = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    let tap = open_tap("husknet0", vnet);
    let plain = open_tap("husknet1", libc::IFF_TAP | libc::IFF_NO_PI);
    // SAFETY: socket takes no pointers.
    let inet = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(inet >= 0);
    // SAFETY: just made, owned here alone.
    let inet = unsafe { OwnedFd::from_raw_fd(inet) };
    let mut up = ifreq("husknet0", libc::IFF_UP);
    // SAFETY: SIOCSIFFLAGS reads one struct ifreq, which `up` is.
    let r = unsafe { libc::ioctl(inet.as_raw_fd(), libc::SIOCSIFFLAGS, &mut up as *mut IfReq) };
    assert_eq!(r, 0, "SIOCSIFFLAGS: {}", std::io::Error::last_os_error());
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c"husknet0".as_ptr()) };
    assert_ne!(ifindex, 0);

    let every = [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_MRG_RXBUF,
    ]
    .iter()
    .fold(0, |f, &b| f | bit(b));
    let (mut net, handle) = device(every);
    let e = handle.bind(plain).unwrap_err();
    assert!(matches!(e, NetError::TapFlags { .. }), "{e:?}");
    assert!(e.to_string().contains("IFF_VNET_HDR"), "{e}");
    handle.bind(tap).unwrap();

    let mem = memory();
    let packets = packet_socket(ifindex, ETHERTYPE);
    let mut eth = vec![0xff; 6];
    eth.extend([0x02, 0, 0, 0, 0, 1]);
    eth.extend(ETHERTYPE.to_be_bytes());
    eth.extend((0..200).map(|i| i as u8));

    // Guest to host: a header of zeros (no offload asked), then the frame.
    let txq = tx_queue(&mem);
    let mut tx: Queue = txq.create_queue().unwrap();
    let mut out = vec![0u8; VNET_HDR_LEN];
    out.extend(&eth);
    mem.write_slice(&out, GuestAddress(0x10_0000)).unwrap();
    txq.add_desc_chains(&[desc(0x10_0000, out.len() as u32, 0, 0)], 0)
        .unwrap();
    assert!(net.process_queue(TX, &mut tx, &mem));
    let mut timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads one timeval of the length given.
    let r = unsafe {
        libc::setsockopt(
            packets.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&mut timeout as *mut libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    let mut got = vec![0u8; 4096];
    // SAFETY: recv writes at most `len` bytes into the live buffer.
    let n = unsafe { libc::recv(packets.as_raw_fd(), got.as_mut_ptr().cast(), got.len(), 0) };
    assert!(n > 0, "recv: {}", std::io::Error::last_os_error());
    got.truncate(n as usize);
    assert_eq!(got, eth, "the guest's frame, as the host's stack saw it");

    // Host to guest: sent out of the interface, read from the TAP.
    let rxq = rx_queue(&mem);
    let mut rx: Queue = rxq.create_queue().unwrap();
    let bufs: Vec<(u64, u32)> = (0..16).map(|i| (0x20_0000 + i * 0x1_0000, 2048)).collect();
    add_buffers(&rxq, 0, &bufs);
    let mut back = eth.clone();
    back[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    let to = sockaddr_ll(ifindex, ETHERTYPE);
    // SAFETY: sendto reads the frame and one sockaddr_ll of the lengths
    // given.
    let n = unsafe {
        libc::sendto(
            packets.as_raw_fd(),
            back.as_ptr().cast(),
            back.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(
        n,
        back.len() as isize,
        "sendto: {}",
        std::io::Error::last_os_error()
    );
    // The kernel may send frames of its own (IPv6 neighbour discovery):
    // look for ours among what arrives.
    let deadline = Instant::now() + Duration::from_secs(5);
    let found = loop {
        host_turn(&mut net, &mut rx, &mem);
        let n = rxq.used().idx().load();
        let ours = (0..n as usize).find_map(|i| {
            let (id, len) = used(&rxq, i);
            let data = read(&mem, bufs[id as usize].0, len as usize);
            (data[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == ETHERTYPE.to_be_bytes()).then_some(data)
        });
        if let Some(data) = ours {
            break data;
        }
        assert!(
            Instant::now() < deadline,
            "our frame never reached the guest"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut header = [0u8; VNET_HDR_LEN];
    header[NUM_BUFFERS_AT] = 1;
    assert_eq!(found[..VNET_HDR_LEN], header, "no offload, one buffer");
    assert_eq!(found[VNET_HDR_LEN..], back);
    handle.unbind();
}

/// The frame buffers start on a page boundary (4K aliasing made GSO
/// receives three times slower from a buffer 0xfc0 into a page) and hold
/// the largest frame.
#[test]
fn frame_buffers_are_page_aligned_and_whole() {
    for _ in 0..8 {
        let mut buf = super::device::FrameBuf::new();
        assert_eq!(buf.as_ptr() as usize % 4096, 0);
        assert_eq!(buf.len(), MAX_FRAME);
        buf[MAX_FRAME - 1] = 7;
        assert_eq!(buf[MAX_FRAME - 1], 7);
    }
}
