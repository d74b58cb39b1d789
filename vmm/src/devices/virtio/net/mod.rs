//! virtio-net backed by a TAP (virtio 1.2, section 5.1): the guest's
//! `eth<N>`, its frames written to and read from a TAP the VMM is handed.
//!
//! The VMM never opens `/dev/net/tun`: the runtime makes the TAP
//! (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) and hands its descriptor over,
//! at start, at restore or later through the API ([`NetHandle::bind`]). A
//! device without a TAP is a cable that goes nowhere: the guest's frames
//! are dropped and none arrive. Tests and benchmarks may bind a Unix
//! socket of `SOCK_SEQPACKET` or `SOCK_DGRAM` in the TAP's place, which
//! keeps frames apart as a TAP does; it carries exactly what a TAP would
//! (the 12-byte virtio header, then the frame), and has no header size or
//! offloads to set.
//!
//! Each frame crosses the TAP with the 12-byte `virtio_net_hdr_v1` in
//! front, so checksum and segmentation offloads pass between the guest
//! and the host's stack untouched. The TAP's offloads follow what the
//! driver accepted (`TUNSETOFFLOAD`): the host never hands the guest a
//! frame whose checksum or segmentation it did not agree to finish.
//!
//! Threads:
//! - guest to TAP (tx queue) on the vCPU thread that notified: each chain
//!   is gathered and written with one `write()`, since a TAP makes one
//!   packet of each call;
//! - TAP to guest (rx queue) on the device's thread `husk-net`, an epoll
//!   over the TAP and a kick eventfd: it takes the transport's lock, then
//!   the backend's (the order of the vCPU threads too), and delivers
//!   through [`MmioTransport::notify_device`]. A frame that finds too few
//!   buffers waits, the TAP unpolled, until the guest adds some (its rx
//!   notify kicks the thread); the vCPU never reads the TAP.
//!
//! Every guest address goes through vm-memory's checked accessors; a bad
//! chain is the guest's loss (dropped, its descriptor returned), never a
//! panic or a host access outside guest RAM. No chain is held between
//! calls, so a snapshot needs nothing of the device (a frame waiting for
//! buffers is dropped, as a wire may drop one).

mod device;
mod host;
mod tap;

pub use self::device::Net;
pub use self::host::{NetHandle, NetHost};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF, virtio_net_hdr_v1,
};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use self::tap::Tap;
use super::VirtioDevice;
use super::mmio::MmioTransport;
use crate::devices::lock;

/// virtio device type of a network card.
pub const TYPE_NET: u32 = 1;

const QUEUE_SIZES: [u16; 2] = [256, 256];
const RX: usize = 0;
const TX: usize = 1;

/// `virtio_net_hdr_v1`: what precedes every frame, on the queues and on
/// the TAP (`TUNSETVNETHDRSZ`).
const VNET_HDR_LEN: usize = 12;
/// Where `num_buffers` lies in the header.
const NUM_BUFFERS_AT: usize = 10;
const _: () = assert!(size_of::<virtio_net_hdr_v1>() == VNET_HDR_LEN);
const _: () = assert!(std::mem::offset_of!(virtio_net_hdr_v1, num_buffers) == NUM_BUFFERS_AT);

/// The largest frame either way, header included: a 64 KiB GSO packet,
/// its Ethernet header and the virtio header, as Firecracker has it.
/// Longer ones from the guest are dropped.
const MAX_FRAME: usize = 65562;

/// Frames one turn of the thread delivers at most, so that a busy TAP
/// does not keep the transport's lock (and the vCPUs that want it) for
/// long; the rest wait for the next turn.
const RX_BUDGET: usize = 64;

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// What the device offers (the transport adds VERSION_1). Not MAC: the
/// driver picks one and the agent sets the real one. Not STATUS: the link
/// is always up, so binding a TAP needs no config interrupt. Not MTU:
/// the agent sets it. No control queue, multiqueue or event index yet.
const FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_MRG_RXBUF);

/// The TAP offloads (`TUN_F_*`) for a driver that accepted `acked`: the
/// host may hand the guest partial checksums and TSO packets only where
/// the guest said it finishes them. The TAP refuses TSO without CSUM and
/// ECN without TSO, so neither is asked for.
fn tap_offloads(acked: u64) -> u32 {
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if acked & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    if flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0
        && acked & bit(VIRTIO_NET_F_GUEST_ECN) != 0
    {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

/// Why a network device's TAP cannot be bound, or its host side started.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The device already has a TAP.
    #[error("a TAP is already bound to this network device")]
    AlreadyBound,
    /// The descriptor's kind cannot be read.
    #[error("cannot inspect the descriptor handed over as a TAP")]
    Inspect(#[source] std::io::Error),
    /// The descriptor is neither a TAP nor a socket.
    #[error("the descriptor handed over is not a TAP (TUNGETIFF)")]
    NotTap(#[source] std::io::Error),
    /// A TAP opened without the flags the device needs.
    #[error(
        "the TAP's flags are {flags:#06x}, not IFF_TAP | IFF_NO_PI | IFF_VNET_HDR: a TUN or a \
         TAP without the virtio header cannot carry the guest's frames"
    )]
    TapFlags {
        /// Its flags (`IFF_*`).
        flags: u16,
    },
    /// A socket that does not keep frames apart.
    #[error(
        "a socket of type {kind} cannot stand in for a TAP: only SOCK_SEQPACKET and \
         SOCK_DGRAM keep frames apart"
    )]
    SocketType {
        /// Its `SO_TYPE`.
        kind: i32,
    },
    /// The TAP's virtio header size cannot be set.
    #[error("cannot set the TAP's virtio header size to {VNET_HDR_LEN} bytes (TUNSETVNETHDRSZ)")]
    HeaderSize(#[source] std::io::Error),
    /// The descriptor cannot be made non-blocking.
    #[error("cannot make the TAP non-blocking")]
    NonBlocking(#[source] std::io::Error),
    /// The TAP refuses the offloads the guest's driver accepted.
    #[error("cannot set the TAP's offloads to {flags:#x} (TUNSETOFFLOAD)")]
    Offloads {
        /// `TUN_F_*` asked for.
        flags: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TAP cannot join the device thread's epoll set.
    #[error("cannot add the TAP to the network thread's epoll set")]
    Poll(#[source] std::io::Error),
    /// The epoll set, the kick eventfd or the thread cannot be made.
    #[error("cannot set up the network device's host side")]
    HostSide(#[from] std::io::Error),
}

#[cfg(test)]
mod tests;
