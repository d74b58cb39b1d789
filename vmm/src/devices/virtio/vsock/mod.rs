//! virtio-vsock with its host side on a Unix socket ("hybrid vsock", as
//! Firecracker has it): no /dev/vhost-vsock is needed or used.
//!
//! Host to guest: connect to the Unix socket, write `CONNECT <port>\n`; once
//! the guest accepts, the VMM answers `OK <host port>\n` and the socket is a
//! byte stream to the guest's listener on `<port>`. Guest to host: a guest
//! connection to CID 2 port `P` is forwarded to the Unix socket `<path>_P`.
//!
//! Threads: guest packets (tx queue) are handled on the vCPU thread that
//! notified; the host side runs on one thread, `husk-vsock`, with an epoll
//! over the listener, every connection and a kick eventfd, and delivers
//! packets to the guest (rx queue) through the transport. Lock order is
//! always transport, then backend.
//!
//! Flow control is vsock's own: the VMM sends a guest no more than the
//! credit the guest advertised, and advertises a fixed buffer per
//! connection ([`BUF_ALLOC`]), keeping guest bytes the host side has not
//! taken yet in that buffer and no more. A host reader that stops reading
//! stops the guest's writer; nothing grows.

mod device;
mod host;
mod muxer;
mod packet;

pub use self::device::{Vsock, VsockState};
pub use self::host::VsockHost;
use self::muxer::*;
use self::packet::*;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
#[cfg(test)]
use std::os::fd::OwnedFd;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::{DeviceState, PersistError, VirtioDevice};
use crate::devices::lock;

/// virtio device type of a socket device.
pub const TYPE_VSOCK: u32 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Bytes of guest data the VMM holds per connection (the credit it gives).
pub const BUF_ALLOC: u32 = 256 * 1024;

const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
const RX: usize = 0;
const TX: usize = 1;

/// Host port whose connection requests mean "the guest is ready";
/// answered with a reset.
pub use husk_protocol::READY_PORT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_wire_order() {
        let hdr = Hdr {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 1 << 30,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        };
        let b = hdr.bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Hdr::parse(&b), hdr);
    }

    #[test]
    fn a_host_hang_up_after_eof_resets_once_instead_of_repeating() {
        let dir = std::env::temp_dir().join(format!("husk-vsock-hup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (device, _host) = Vsock::new(3, &dir.join("v.sock")).unwrap();
        let mut b = lock(&device.backend);
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let key = (1 << 30, 1024);
        b.conns.insert(key, Conn::new(ours, false, BUF_ALLOC, 0));
        // The host half-closes: one SHUTDOWN(SEND) for the guest.
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        b.host_readable(key);
        let (hdr, _) = b.rx.pop_front().unwrap();
        assert_eq!((hdr.op, hdr.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        assert!(b.rx.is_empty());
        // Then it closes entirely; epoll keeps reporting the hang-up. The
        // first report resets the connection; later ones find nothing.
        drop(theirs);
        b.host_readable(key);
        b.host_readable(key);
        let ops: Vec<u16> = b.rx.drain(..).map(|(h, _)| h.op).collect();
        assert_eq!(ops, [OP_RST]);
        assert!(b.conns.is_empty());
        drop(b);
        drop(device);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A vsock device handed another device's saved state refuses it by
    /// name, and takes nothing of it up.
    #[test]
    fn state_of_another_device_is_refused() {
        use crate::devices::virtio::fs::session::SessionState;
        use crate::devices::virtio::{DeviceState, PersistError, VirtioDevice};
        let dir = std::env::temp_dir().join(format!("husk-vsock-notmine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (mut device, _host) = Vsock::new(3, &dir.join("v.sock")).unwrap();
        let foreign = DeviceState::Fs(SessionState {
            capable: 0,
            nodes: Vec::new(),
            handles: Vec::new(),
            next_node: 2,
            next_handle: 1,
        });
        let e = device.restore_state(&foreign).unwrap_err();
        assert!(
            matches!(e, PersistError::NotMine { device: TYPE_VSOCK }),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("was handed state that is not its own"),
            "{e}"
        );
        assert!(lock(&device.backend).rx.is_empty());
        drop(device);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A guest's connection request, from guest port `port` to host port
    /// 5000.
    fn request(port: u32) -> Hdr {
        Hdr {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: port,
            dst_port: 5000,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    /// A listener at `<dir>/v.sock_5000` with room for `backlog` waiting
    /// connections, and the device whose socket is `<dir>/v.sock`.
    fn device_with_listener(name: &str, backlog: i32) -> (PathBuf, OwnedFd, Vsock, VsockHost) {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
        let dir = std::env::temp_dir().join(format!("husk-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let listener = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        let at = SocketAddrUnix::new(dir.join("v.sock_5000")).unwrap();
        rustix::net::bind(&listener, &at).unwrap();
        rustix::net::listen(&listener, backlog).unwrap();
        let (device, host) = Vsock::new(3, &dir.join("v.sock")).unwrap();
        (dir, listener, device, host)
    }

    /// The ops of the packets waiting for the guest, counted by op.
    fn answers(b: &mut Backend) -> HashMap<u16, usize> {
        let mut ops = HashMap::new();
        for (hdr, _) in b.rx.drain(..) {
            *ops.entry(hdr.op).or_default() += 1;
        }
        ops
    }

    #[test]
    fn a_host_listener_that_never_accepts_resets_the_guest_instead_of_blocking() {
        // Linux queues backlog + 1 connections; the next connect would
        // wait for an accept that never comes, on the vCPU thread.
        let (dir, _listener, device, _host) = device_with_listener("backlog", 1);
        let mut b = lock(&device.backend);
        for port in 0..5 {
            b.guest_packet(request(1024 + port), Vec::new());
        }
        let ops = answers(&mut b);
        assert_eq!(ops.get(&OP_RESPONSE), Some(&2), "{ops:?}");
        assert_eq!(ops.get(&OP_RST), Some(&3), "{ops:?}");
        assert_eq!(b.conns.len(), 2);
        drop(b);
        drop(device);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_guest_opens_no_more_than_max_conns() {
        let (dir, _listener, device, _host) = device_with_listener("max", 4096);
        let mut b = lock(&device.backend);
        let tries = MAX_CONNS as u32 + 20;
        for port in 0..tries {
            b.guest_packet(request(1024 + port), Vec::new());
        }
        let ops = answers(&mut b);
        assert_eq!(ops.get(&OP_RESPONSE), Some(&MAX_CONNS), "{ops:?}");
        assert_eq!(ops.get(&OP_RST), Some(&20), "{ops:?}");
        assert_eq!(b.conns.len(), MAX_CONNS);
        // A reset one frees its place.
        b.guest_packet(
            Hdr {
                op: OP_RST,
                ..request(1024)
            },
            Vec::new(),
        );
        b.guest_packet(request(1024 + tries), Vec::new());
        assert_eq!(answers(&mut b).get(&OP_RESPONSE), Some(&1));
        drop(b);
        drop(device);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn credit_is_capped_whatever_the_guest_advertises() {
        // The credit is what the host side may read into the rx queue for
        // a guest that posts no buffers: a guest's huge buf_alloc must not
        // make it huge.
        let (a, _b) = UnixStream::pair().unwrap();
        let c = Conn::new(a, false, u32::MAX, 0);
        assert_eq!(c.credit(), BUF_ALLOC);
    }

    #[test]
    fn credit_follows_what_the_guest_consumed() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, false, 1000, 0);
        assert_eq!(c.credit(), 1000);
        c.tx_cnt = 800;
        assert_eq!(c.credit(), 200);
        c.peer_fwd_cnt = 500;
        assert_eq!(c.credit(), 700);
        c.tx_cnt = 2000;
        assert_eq!(c.credit(), 0, "never negative");
        // Counters wrap as the spec says they do.
        c.tx_cnt = 5;
        c.peer_fwd_cnt = u32::MAX - 4;
        assert_eq!(c.credit(), 990);
    }
}
