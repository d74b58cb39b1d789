//! Descriptors sent over Unix sockets (SCM_RIGHTS), as runc sends a
//! container's terminal master to `--console-socket`. Safe over rustix;
//! here so that the runtime and the tests that receive share one helper.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Marks descriptor `fd` close-on-exec if it is open (a descriptor a
/// process was handed by number, such as a ready pipe); nothing if not.
pub fn set_cloexec(fd: std::os::fd::RawFd) {
    // SAFETY: fcntl on a descriptor number reads or writes no memory;
    // on a number that is not open it fails with EBADF.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Sends `fd` on `socket`, with `data` as the message's bytes (a stream
/// socket sends no message of none).
pub fn send_fd(socket: impl AsFd, fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<()> {
    send_fds(socket, &[fd], data)
}

/// Sends `data` on `socket` with the descriptors `fds` (at most 4) on the
/// same message.
pub fn send_fds(socket: impl AsFd, fds: &[BorrowedFd<'_>], data: &[u8]) -> io::Result<()> {
    if fds.len() > 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "at most 4 descriptors on one message",
        ));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(fds));
    rustix::net::sendmsg(
        socket,
        &[io::IoSlice::new(data)],
        &mut control,
        SendFlags::empty(),
    )?;
    Ok(())
}

/// Receives one message on `socket` and the first descriptor it carries
/// (close-on-exec); any other is closed.
pub fn recv_fd(socket: impl AsFd) -> io::Result<OwnedFd> {
    let mut data = [0u8; 64];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        socket,
        &mut [io::IoSliceMut::new(&mut data)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let fd = control.drain().find_map(|message| match message {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    match fd {
        Some(fd) => Ok(fd),
        None if got.bytes == 0 => Err(io::ErrorKind::UnexpectedEof.into()),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the message carried no descriptor",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn a_sent_descriptor_arrives_as_the_same_file() {
        let (a, b) = UnixStream::pair().unwrap();
        let (pipe_r, pipe_w) = rustix::pipe::pipe().unwrap();
        send_fd(&a, pipe_w.as_fd(), b"/dev/ptmx").unwrap();
        drop(pipe_w);
        let mut got = std::fs::File::from(recv_fd(&b).unwrap());
        got.write_all(b"through").unwrap();
        drop(got);
        let mut said = String::new();
        std::fs::File::from(pipe_r)
            .read_to_string(&mut said)
            .unwrap();
        assert_eq!(said, "through");
        drop(a);
        let e = recv_fd(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
