//! The VMM's side of its control socket, whose messages are
//! [`husk_protocol::api`]'s: one JSON object per line each way. The
//! transport is here; requests reach the VM's owner as [`ApiCall`]s with a
//! channel for the answer, as Firecracker's `VmmAction`s do. A request may
//! carry a descriptor (SCM_RIGHTS: a TAP for `attach_net`); the socket is
//! read with `recvmsg`, and descriptors go, in order, to the requests that
//! take one. One that no request takes is closed.

use std::collections::VecDeque;
use std::io::{IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Sender, channel};

pub use husk_protocol::api::{ApiRequest, ApiResponse};
use thiserror::Error;

/// Errors setting up the socket.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The socket path is taken or cannot be bound.
    #[error("cannot listen on API socket {}", .0.display())]
    Bind(PathBuf, #[source] std::io::Error),
    /// The listener thread could not start.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// A request with the descriptor it carried, if it takes one, and the way
/// back to its connection.
pub struct ApiCall {
    /// What was asked.
    pub request: ApiRequest,
    /// The descriptors sent with it: `attach_net`'s TAP; `snapshot`'s
    /// state and memory files, in that order.
    pub fds: Vec<OwnedFd>,
    /// Where the answer goes.
    pub reply: Sender<ApiResponse>,
}

/// How long the API and vsock threads wait before they accept again
/// after an accept failed (the VMM out of descriptors).
pub const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// The longest request line read (a path in `snapshot` is the longest).
const MAX_LINE: usize = 64 * 1024;

/// The most descriptors kept for requests not yet read.
const MAX_PENDING_FDS: usize = 4;

/// Lines and descriptors from one connection.
struct Incoming {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Incoming {
    /// The next line, or None at the end (or an error, or a line too
    /// long to be a request).
    fn line(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                return Some(String::from_utf8_lossy(&line[..at]).into_owned());
            }
            if self.buf.len() > MAX_LINE {
                return None;
            }
            let mut chunk = [0u8; 4096];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
            let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
            let got = rustix::net::recvmsg(
                &self.stream,
                &mut [IoSliceMut::new(&mut chunk)],
                &mut control,
                rustix::net::RecvFlags::CMSG_CLOEXEC,
            );
            for message in control.drain() {
                if let rustix::net::RecvAncillaryMessage::ScmRights(fds) = message {
                    self.fds.extend(fds);
                }
            }
            // Descriptors no request takes are closed, not hoarded: a
            // client cannot fill the VMM's descriptor table through them.
            while self.fds.len() > MAX_PENDING_FDS {
                self.fds.pop_front();
            }
            match got {
                Ok(got) if got.bytes > 0 => self.buf.extend_from_slice(&chunk[..got.bytes]),
                Err(rustix::io::Errno::INTR) => {}
                _ => return None,
            }
        }
    }
}

/// Listens on `path` on a thread `husk-api`, handing each request to `send`.
/// The socket file is the caller's to remove ([`remove_socket`]).
pub fn serve(path: &Path, send: impl Fn(ApiCall) + Send + 'static) -> Result<(), ApiError> {
    let listener = husk_sys::unix::bind(path).map_err(|e| ApiError::Bind(path.to_owned(), e))?;
    std::thread::Builder::new()
        .name("husk-api".into())
        .spawn(move || {
            crate::confine::enter(crate::seccomp::Thread::Api);
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => handle(stream, &send),
                    // Out of descriptors (a guest holding them all through
                    // virtio-fs): the client waits in the backlog; try
                    // again shortly instead of spinning on accept.
                    Err(_) => std::thread::sleep(ACCEPT_RETRY),
                }
            }
        })
        .map_err(ApiError::Thread)?;
    Ok(())
}

fn handle(stream: UnixStream, send: &impl Fn(ApiCall)) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut incoming = Incoming {
        stream,
        buf: Vec::new(),
        fds: VecDeque::new(),
    };
    while let Some(line) = incoming.line() {
        let response = match serde_json::from_str::<ApiRequest>(&line) {
            Err(e) => ApiResponse::error(format!("bad request: {e}")),
            Ok(ApiRequest::Stop) => {
                // Answer first: the process ends as soon as the owner
                // sees the request.
                let _ = out.write_all(b"{\"ok\":true}\n");
                let (tx, _rx) = channel();
                send(ApiCall {
                    request: ApiRequest::Stop,
                    fds: Vec::new(),
                    reply: tx,
                });
                return;
            }
            Ok(ApiRequest::AttachNet { .. }) if incoming.fds.is_empty() => ApiResponse::error(
                "attach_net needs the TAP's descriptor with the request (SCM_RIGHTS)",
            ),
            Ok(ApiRequest::Snapshot { .. }) if incoming.fds.len() == 1 => ApiResponse::error(
                "snapshot takes two descriptors (state, memory) with the request, or none",
            ),
            Ok(request) => {
                let wanted = match request {
                    ApiRequest::AttachNet { .. } => 1,
                    ApiRequest::Snapshot { .. } => 2.min(incoming.fds.len()),
                    _ => 0,
                };
                let fds = (0..wanted)
                    .filter_map(|_| incoming.fds.pop_front())
                    .collect();
                let (tx, rx) = channel();
                send(ApiCall {
                    request,
                    fds,
                    reply: tx,
                });
                rx.recv()
                    .unwrap_or_else(|_| ApiResponse::error("the VM is gone"))
            }
        };
        let mut text = serde_json::to_string(&response).expect("response serializes");
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

/// Removes the socket file (at exit).
pub fn remove_socket(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use super::*;

    #[test]
    fn requests_reach_the_owner_and_answers_come_back() {
        let path = std::env::temp_dir().join(format!("husk-api-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        serve(&path, |call: ApiCall| {
            let _ = call
                .reply
                .send(match (call.request, call.fds.into_iter().next()) {
                    (ApiRequest::Pause, None) => ApiResponse::ok(),
                    (ApiRequest::AttachNet { slot: 2 }, Some(fd)) => {
                        // The descriptor is the one sent: write through it.
                        let mut f = std::fs::File::from(fd);
                        let _ = f.write_all(b"tap");
                        ApiResponse::ok()
                    }
                    _ => ApiResponse::error("not now"),
                });
        })
        .unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        let mut lines = BufReader::new(stream.try_clone().unwrap()).lines();
        let mut w = stream;
        for (req, want) in [
            ("{\"action\":\"pause\"}", "{\"ok\":true}"),
            (
                "{\"action\":\"resume\"}",
                "{\"ok\":false,\"error\":\"not now\"}",
            ),
        ] {
            writeln!(w, "{req}").unwrap();
            assert_eq!(lines.next().unwrap().unwrap(), want);
        }
        // A descriptor comes with the request that takes it.
        let (pipe_r, pipe_w) = rustix::pipe::pipe().unwrap();
        husk_sys::fd::send_fd(
            &w,
            std::os::fd::AsFd::as_fd(&pipe_w),
            b"{\"action\":\"attach_net\",\"slot\":2}\n",
        )
        .unwrap();
        drop(pipe_w);
        assert_eq!(lines.next().unwrap().unwrap(), "{\"ok\":true}");
        let mut got = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(pipe_r), &mut got).unwrap();
        assert_eq!(got, "tap");
        // Without one, attach_net is refused by name.
        writeln!(w, "{{\"action\":\"attach_net\",\"slot\":0}}").unwrap();
        let answer = lines.next().unwrap().unwrap();
        assert!(answer.contains("needs the TAP's descriptor"), "{answer}");
        // Descriptors sent with requests that take none are not hoarded:
        // all but the last few are closed (their pipes see the end).
        let mut readers = Vec::new();
        for _ in 0..10 {
            let (r, pipe_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::NONBLOCK).unwrap();
            husk_sys::fd::send_fd(
                &w,
                std::os::fd::AsFd::as_fd(&pipe_w),
                b"{\"action\":\"pause\"}\n",
            )
            .unwrap();
            readers.push(r);
        }
        for _ in 0..10 {
            assert_eq!(lines.next().unwrap().unwrap(), "{\"ok\":true}");
        }
        let ended = readers
            .iter()
            .filter(|r| matches!(rustix::io::read(r, &mut [0u8; 1]), Ok(0)))
            .count();
        assert!(ended >= 10 - MAX_PENDING_FDS, "{ended} of 10 closed");
        writeln!(w, "{{\"action\":\"fly\"}}").unwrap();
        let answer = lines.next().unwrap().unwrap();
        assert!(
            answer.starts_with("{\"ok\":false,\"error\":\"bad request: "),
            "{answer}"
        );
        // A second VMM cannot take the same socket path.
        let err = serve(&path, |_| {}).unwrap_err().to_string();
        assert!(err.starts_with("cannot listen on API socket"), "{err}");
        remove_socket(&path);
        assert!(!path.exists());
    }

    /// Issue 18 (guest floods): a VMM out of descriptors (a guest holding
    /// them all through virtio-fs) does not spin on the API socket's
    /// accept; the client waits in the backlog and is answered once
    /// descriptors come back.
    #[test]
    fn out_of_descriptors_the_api_waits_instead_of_spinning() {
        let path =
            std::env::temp_dir().join(format!("husk-api-emfile-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        // The child says on this pipe when it holds every descriptor, so
        // that the client connects only then (connected earlier, the API
        // thread could take the connection while descriptors were left,
        // then fail to serve it).
        let (ready_r, ready_w) = rustix::pipe::pipe().unwrap();
        // SAFETY: the child only sets a limit, serves, opens and closes
        // files, writes to a pipe and sleeps, then _exits.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let limit = rustix::process::Rlimit {
                current: Some(64),
                maximum: rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum,
            };
            let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit);
            let served = serve(&path, |call: ApiCall| {
                let _ = call.reply.send(ApiResponse::ok());
            });
            let mut hog = Vec::new();
            while let Ok(f) = std::fs::File::open("/dev/null") {
                hog.push(f);
            }
            let _ = rustix::io::write(&ready_w, b"x");
            std::thread::sleep(std::time::Duration::from_millis(1500));
            drop(hog);
            std::thread::sleep(std::time::Duration::from_secs(5));
            // SAFETY: ends the child.
            unsafe { libc::_exit(i32::from(served.is_err())) };
        }
        // The child ends with the test, failed or not.
        struct Reap(libc::pid_t);
        impl Drop for Reap {
            fn drop(&mut self) {
                // SAFETY: ends and reaps the forked child.
                unsafe {
                    libc::kill(self.0, libc::SIGKILL);
                    libc::waitpid(self.0, std::ptr::null_mut(), 0);
                }
            }
        }
        let _reap = Reap(child);
        drop(ready_w);
        let mut ready = [0u8; 1];
        assert_eq!(
            rustix::io::read(&ready_r, &mut ready).unwrap(),
            1,
            "the child never held every descriptor"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&path) {
                break s;
            }
            assert!(std::time::Instant::now() < deadline, "never listened");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        (&stream).write_all(b"{\"action\":\"pause\"}\n").unwrap();
        let cpu = || -> u64 {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap();
            let fields: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        let before = cpu();
        std::thread::sleep(std::time::Duration::from_millis(600));
        let spent = cpu() - before;
        // Clock ticks (1/100 s): a spinning accept would take ~60.
        assert!(spent <= 10, "the API thread spun: {spent} ticks in 0.6 s");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer).unwrap();
        assert_eq!(answer.trim(), r#"{"ok":true}"#);
        let _ = std::fs::remove_file(&path);
    }
}
