//! AF_VSOCK stream sockets for the guest side (the agent, test programs):
//! listen, accept, connect. The host side reaches the guest through the
//! VMM's Unix socket instead, opening each connection with a
//! [`connect_line`] (docs/vsock.md).

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;

use rustix::net::addr::{SocketAddrArg, SocketAddrLen, SocketAddrOpaque};
use rustix::net::{AddressFamily, SocketFlags, SocketType};

/// The host's CID.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

/// The line a host client sends first on the VMM's vsock Unix socket to
/// reach guest port `port`. The VMM answers `OK <host port>\n`, or resets.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// The guest port a [`connect_line`] names, if it is one.
pub fn parse_connect(line: &str) -> Option<u32> {
    line.trim().strip_prefix("CONNECT ")?.parse().ok()
}

/// An AF_VSOCK address, which rustix has no type for.
struct VsockAddr(libc::sockaddr_vm);

impl VsockAddr {
    fn new(cid: u32, port: u32) -> Self {
        Self(libc::sockaddr_vm {
            svm_family: libc::AF_VSOCK as libc::sa_family_t,
            svm_reserved1: 0,
            svm_port: port,
            svm_cid: cid,
            svm_zero: [0; 4],
        })
    }
}

// SAFETY: `f` gets a pointer to the sockaddr_vm `self` holds, which lives
// across the call, and that struct's exact size.
unsafe impl SocketAddrArg for VsockAddr {
    unsafe fn with_sockaddr<R>(
        &self,
        f: impl FnOnce(*const SocketAddrOpaque, SocketAddrLen) -> R,
    ) -> R {
        f(
            std::ptr::from_ref(&self.0).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as SocketAddrLen,
        )
    }
}

fn stream_socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::VSOCK,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A socket listening on `port` for any CID.
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    let sock = stream_socket()?;
    rustix::net::bind(&sock, &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    rustix::net::listen(&sock, 16)?;
    Ok(sock)
}

/// Accepts one connection, as a File (a byte stream both ways).
pub fn accept(listener: &OwnedFd) -> io::Result<File> {
    Ok(rustix::net::accept_with(listener, SocketFlags::CLOEXEC)?.into())
}

/// Connects to `port` on `cid`.
pub fn connect(cid: u32, port: u32) -> io::Result<File> {
    let sock = stream_socket()?;
    rustix::net::connect(&sock, &VsockAddr::new(cid, port))?;
    Ok(File::from(sock))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_connect_line_reads_back_as_its_port() {
        assert_eq!(super::parse_connect(&super::connect_line(1024)), Some(1024));
        assert_eq!(super::parse_connect("CONNECT x"), None);
        assert_eq!(super::parse_connect("LISTEN 5"), None);
    }
}
