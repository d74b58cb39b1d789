//! AF_VSOCK stream sockets for the guest side (the agent, test programs):
//! listen, accept, connect. The host side reaches the guest through the
//! VMM's Unix socket instead, opening each connection with a
//! [`connect_line`] (docs/vsock.md).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn stream_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A socket listening on `port` for any CID.
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    let sock = stream_socket()?;
    let addr = sockaddr(libc::VMADDR_CID_ANY, port);
    // SAFETY: bind and listen on our socket with a sockaddr_vm that lives
    // across the call and its exact size.
    let ok = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            ADDR_LEN,
        ) == 0
            && libc::listen(sock.as_raw_fd(), 16) == 0
    };
    if ok {
        Ok(sock)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Accepts one connection, as a File (a byte stream both ways).
pub fn accept(listener: &OwnedFd) -> io::Result<File> {
    // SAFETY: accept on our listening socket, no address wanted.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Connects to `port` on `cid`.
pub fn connect(cid: u32, port: u32) -> io::Result<File> {
    let sock = stream_socket()?;
    let addr = sockaddr(cid, port);
    // SAFETY: connect on our socket with a sockaddr_vm that lives across
    // the call and its exact size.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            ADDR_LEN,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
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
