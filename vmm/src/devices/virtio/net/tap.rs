//! The descriptor a device's frames go through: a TAP the runtime made,
//! or a frame-keeping socket in its place. Each raw call is wrapped once
//! here.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;

use super::{NetError, VNET_HDR_LEN};

/// `struct ifreq` as `TUNGETIFF` fills it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}
const _: () = assert!(size_of::<IfReq>() == 40);

/// The flags the device needs of a TAP.
const TAP_FLAGS: libc::c_short = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _;

/// A TAP (or a stand-in), non-blocking, its virtio header size set.
pub(super) struct Tap {
    file: File,
    /// A socket stands in: it has no header size or offloads to set.
    socket: bool,
}

impl Tap {
    /// Takes `fd` as the device's TAP: a TAP with `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`, or a `SOCK_SEQPACKET` or `SOCK_DGRAM` socket.
    /// Anything else is refused, saying why.
    pub(super) fn new(fd: OwnedFd) -> Result<Self, NetError> {
        let file = File::from(fd);
        let socket = file
            .metadata()
            .map_err(NetError::Inspect)?
            .file_type()
            .is_socket();
        if socket {
            let kind = socket_type(file.as_raw_fd()).map_err(NetError::Inspect)?;
            if kind != libc::SOCK_SEQPACKET && kind != libc::SOCK_DGRAM {
                return Err(NetError::SocketType { kind });
            }
        } else {
            let flags = tap_flags(file.as_raw_fd()).map_err(NetError::NotTap)?;
            if flags & TAP_FLAGS != TAP_FLAGS {
                return Err(NetError::TapFlags {
                    flags: flags as u16,
                });
            }
            set_vnet_hdr_len(file.as_raw_fd()).map_err(NetError::HeaderSize)?;
        }
        set_nonblocking(file.as_raw_fd()).map_err(NetError::NonBlocking)?;
        Ok(Self { file, socket })
    }

    /// Sets the TAP's offloads (`TUN_F_*`); a stand-in has none.
    pub(super) fn set_offloads(&self, flags: u32) -> std::io::Result<()> {
        if self.socket {
            return Ok(());
        }
        set_offloads(self.file.as_raw_fd(), flags)
    }

    /// Reads one frame (header included) into `buf`.
    pub(super) fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header included) with one call: the TAP makes one
    /// packet of each.
    pub(super) fn write(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }

    pub(super) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `TUNGETIFF`: the TAP's `IFF_*` flags; fails on anything not a TUN/TAP.
fn tap_flags(fd: RawFd) -> std::io::Result<libc::c_short> {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _rest: [0; 22],
    };
    // SAFETY: TUNGETIFF writes one struct ifreq (40 bytes), which `req`
    // is, and keeps no pointer to it.
    check(unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req as *mut IfReq) })?;
    Ok(req.flags)
}

/// `TUNSETVNETHDRSZ`: frames carry the 12-byte `virtio_net_hdr_v1`.
fn set_vnet_hdr_len(fd: RawFd) -> std::io::Result<()> {
    let len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
    // points at `len`, alive for the call.
    check(unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &len as *const libc::c_int) })
}

/// `TUNSETOFFLOAD`: which offloads the TAP may leave to the guest.
fn set_offloads(fd: RawFd, flags: u32) -> std::io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value: no memory is
    // passed.
    check(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) })
}

/// `FIONBIO`: reads and writes return EAGAIN instead of waiting.
fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: FIONBIO reads one int through the pointer, which points at
    // `on`, alive for the call.
    check(unsafe { libc::ioctl(fd, libc::FIONBIO, &on as *const libc::c_int) })
}

/// `SO_TYPE`: `SOCK_STREAM`, `SOCK_DGRAM`, `SOCK_SEQPACKET`, ...
fn socket_type(fd: RawFd) -> std::io::Result<libc::c_int> {
    let mut kind: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes (one int) into `kind`
    // and the length into `len`, both alive for the call.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(kind)
}
