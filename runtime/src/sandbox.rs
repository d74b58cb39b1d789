//! A container's microVM as the runtime drives it: a `husk-vmm` process
//! restored from the warm-start snapshot, with the container's root shared
//! over virtio-fs, and the agent in it reached over hybrid vsock.
//!
//! Dropping a [`Sandbox`] kills the VMM if it still runs and removes its
//! sockets: nothing of it outlives the runtime's handle.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_protocol::api::{ApiRequest, ApiResponse};
use husk_protocol::share::Share;
use husk_protocol::{
    CONTROL_PORT, FORWARD_PORT, Forward, Request, Response, STDIO_PORT, StdioAttach, Stream,
    handshake, read_frame, write_frame,
};
use rustix::net::RecvFlags;
use rustix::rand::GetRandomFlags;
use thiserror::Error;

use husk_guest::binaries::{Binaries, guest_image};
use husk_guest::shape::Shape;
use husk_guest::warm;

/// Errors starting or talking to a container's VM.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// The warm-start snapshot could not be found or made.
    #[error("no warm guest to start from")]
    Warm(#[from] warm::WarmError),
    /// The VMM could not be started.
    #[error("cannot start {}", .0.display())]
    Spawn(PathBuf, #[source] std::io::Error),
    /// The VMM exited before its time.
    #[error("the VM ended: {0}")]
    VmEnded(String),
    /// The agent could not be reached or broke the protocol.
    #[error("the agent does not answer")]
    Agent(#[source] husk_protocol::ProtocolError),
    /// The agent refused a request.
    #[error("{0}")]
    Refused(String),
}

/// The directory in a container's state directory that holds its VMM's
/// sockets: the only part of it the VMM's jail holds (docs/security.md,
/// "The VMM process"), so that a VMM a guest took over cannot touch the
/// container's `state.json` or logs.
pub const VM_DIR: &str = "vm";
/// The vsock socket in [`VM_DIR`].
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// The VMM's control socket (pause, resume) in [`VM_DIR`].
pub const API_SOCKET: &str = "api.sock";

/// The VMM's sockets' directory of the container whose state directory is
/// `state_dir`.
pub fn vm_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(VM_DIR)
}

/// The agent of a running container VM, reached through its vsock socket
/// by any husk process (`start`, `kill`, `exec`, ...).
#[derive(Clone)]
pub struct Agent {
    socket: PathBuf,
}

impl Agent {
    /// The agent of the container whose state directory is `state_dir`.
    pub fn at(state_dir: &Path) -> Self {
        Self {
            socket: vm_dir(state_dir).join(VSOCK_SOCKET),
        }
    }

    /// A control connection, handshake done.
    pub fn control(&self) -> Result<Control, SandboxError> {
        let mut stream =
            connect(&self.socket, CONTROL_PORT).map_err(|e| SandboxError::Agent(e.into()))?;
        handshake(&mut stream, concat!("husk ", env!("CARGO_PKG_VERSION")))
            .map_err(SandboxError::Agent)?;
        Control::over(stream, true)
    }

    /// A control connection whose hello is answered with its first
    /// request's answer: one round trip fewer, for short commands (`husk
    /// exec`). A guest that does not answer is not retried.
    pub fn control_pipelined(&self) -> Result<Control, SandboxError> {
        let hello = husk_protocol::frame(&husk_protocol::Hello {
            version: husk_protocol::PROTOCOL_VERSION,
            peer: concat!("husk ", env!("CARGO_PKG_VERSION")).into(),
        })
        .map_err(SandboxError::Agent)?;
        let stream = connect_with(&self.socket, CONTROL_PORT, &hello)
            .map_err(|e| SandboxError::Agent(e.into()))?;
        Control::over(stream, false)
    }

    /// One stdio stream of a process.
    pub fn attach(
        &self,
        id: &str,
        exec_id: &str,
        stream: Stream,
    ) -> Result<UnixStream, SandboxError> {
        let attach = husk_protocol::frame(&StdioAttach {
            id: id.into(),
            exec_id: exec_id.into(),
            stream,
        })
        .map_err(SandboxError::Agent)?;
        connect_with(&self.socket, STDIO_PORT, &attach).map_err(|e| SandboxError::Agent(e.into()))
    }

    /// A byte stream to TCP `port` on the guest's loopback (port
    /// forwarding), or what the agent said when it could not reach it.
    pub fn forward(&self, port: u16) -> Result<UnixStream, SandboxError> {
        let open = husk_protocol::frame(&Forward { port }).map_err(SandboxError::Agent)?;
        let mut stream = connect_with(&self.socket, FORWARD_PORT, &open)
            .map_err(|e| SandboxError::Agent(e.into()))?;
        match read_frame::<_, Response>(&mut stream).map_err(SandboxError::Agent)? {
            Response::Ok => Ok(stream),
            Response::Error { message } => Err(SandboxError::Refused(message)),
            other => Err(SandboxError::Refused(format!(
                "unexpected answer to a forward: {other:?}"
            ))),
        }
    }
}

/// Sends one request to the VMM's control socket (pause, resume, stop,
/// snapshot) and waits for its answer.
pub fn vmm_api(state_dir: &Path, request: &ApiRequest) -> Result<(), SandboxError> {
    vmm_api_with(state_dir, request, None)
}

/// [`vmm_api`] with a descriptor on the same message (`attach_net`'s TAP).
pub fn vmm_api_with(
    state_dir: &Path,
    request: &ApiRequest,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(), SandboxError> {
    vmm_api_with_fds(state_dir, request, fd.as_slice())
}

/// [`vmm_api`] with descriptors on the same message (`snapshot`'s files).
pub fn vmm_api_with_fds(
    state_dir: &Path,
    request: &ApiRequest,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<(), SandboxError> {
    let path = vm_dir(state_dir).join(API_SOCKET);
    let fail = |e: std::io::Error| SandboxError::Refused(format!("the VMM's control socket: {e}"));
    let mut stream = husk_sys::unix::connect(&path).map_err(fail)?;
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    if fds.is_empty() {
        stream.write_all(&line).map_err(fail)?;
    } else {
        husk_sys::fd::send_fds(&stream, fds, &line).map_err(fail)?;
    }
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut answer)
        .map_err(fail)?;
    let v: ApiResponse = serde_json::from_str(&answer)
        .map_err(|e| SandboxError::Refused(format!("the VMM answered {answer:?}: {e}")))?;
    if v.ok {
        Ok(())
    } else {
        let action = serde_json::to_value(request).expect("requests serialize")["action"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Err(SandboxError::Refused(format!(
            "the VMM refused to {action}: {}",
            v.error.as_deref().unwrap_or("no reason given")
        )))
    }
}

/// Fresh host entropy and the host's wall clock for a restored guest.
pub fn clone_seed() -> husk_protocol::CloneSeed {
    let mut entropy = vec![0u8; 32];
    let n = rustix::rand::getrandom(&mut entropy[..], GetRandomFlags::empty()).unwrap_or(0);
    entropy.truncate(n);
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    husk_protocol::CloneSeed {
        entropy,
        realtime_ns,
    }
}

/// A VM's network slots.
#[derive(Clone, Copy, Default)]
pub struct Nets<'a> {
    /// TAPs bound to the first slots, in order.
    pub taps: &'a [std::os::fd::OwnedFd],
    /// The guest's slots (a guest with slots is another warm snapshot;
    /// slots left unbound are bound later with [`vmm_api_with`]'s
    /// `attach_net`).
    pub slots: u8,
    /// The calling process is in a network namespace it made for this
    /// VM's container alone (a spec's new namespace): the VMM keeps it
    /// (`--container-netns`) rather than making an empty one of its own,
    /// a second namespace per container (docs/security.md).
    pub container_netns: bool,
}

/// A running container VM.
pub struct Sandbox {
    vmm: Option<Child>,
    /// Held while the VMM is to live: its end tells a VMM that started
    /// after this process died to end (`husk_sys::child::spawn_vmm`).
    _starter: std::os::fd::OwnedFd,
    /// Where the VMM tells that its sockets are bound
    /// (`husk_sys::child::ready_pipe`), until [`Sandbox::control`] waited.
    ready: Option<std::os::fd::OwnedFd>,
    socket: PathBuf,
    stderr_log: PathBuf,
}

/// Opens a stream to guest `port` over the VMM's hybrid vsock socket.
pub fn connect(socket: &Path, port: u32) -> std::io::Result<UnixStream> {
    connect_with(socket, port, &[])
}

/// [`connect`], sending `first` right behind the CONNECT line: the VMM
/// reads exactly the line and forwards the rest once the guest accepted,
/// so a first frame costs no round trip of its own.
pub fn connect_with(socket: &Path, port: u32, first: &[u8]) -> std::io::Result<UnixStream> {
    let mut stream = husk_sys::unix::connect(socket)?;
    // A guest that does not answer the connection within 5 s is an error,
    // not a hang (Sandbox::control tries again: see docs/vsock.md).
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut hello = husk_protocol::vsock::connect_line(port).into_bytes();
    hello.extend_from_slice(first);
    stream.write_all(&hello)?;
    // The answer is one line, which the VMM writes at once: peek at what
    // has arrived and take exactly the line, so nothing after it is
    // consumed (two system calls, not one per byte). A line that arrives
    // in pieces is read byte by byte.
    let mut buf = [0u8; 64];
    let (n, _) = rustix::net::recv(&stream, &mut buf[..], RecvFlags::PEEK)?;
    let line = match buf[..n].iter().position(|&b| b == b'\n') {
        Some(end) => {
            let mut line = vec![0u8; end + 1];
            stream.read_exact(&mut line)?;
            line
        }
        None => {
            let mut line = Vec::new();
            let mut byte = [0u8];
            while line.last() != Some(&b'\n') && line.len() <= 64 {
                if stream.read(&mut byte)? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
                }
                line.push(byte[0]);
            }
            line
        }
    };
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::other(format!(
            "vsock port {port} refused: {}",
            String::from_utf8_lossy(&line).trim()
        )));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

impl Sandbox {
    /// Restores a container guest in `state_dir` (its sockets and logs go
    /// there) with `shares` bound to its virtio-fs shares (the root and
    /// every volume slot).
    /// `from`: a checkpoint's snapshot to restore instead of the warm
    /// one. `nets`: the guest's network slots and the TAPs bound to the
    /// first of them.
    pub fn start(
        root: &Path,
        bins: &Binaries,
        state_dir: &Path,
        shares: &[Share],
        shape: Shape,
        from: Option<&Path>,
        nets: Nets<'_>,
    ) -> Result<Self, SandboxError> {
        let Nets {
            taps,
            slots: nets,
            container_netns,
        } = nets;
        // The VMM's `--share TAG=DIR` is text: a directory whose name is
        // not UTF-8 would reach it changed (another directory).
        if let Some(bad) = shares.iter().find(|s| s.dir.to_str().is_none()) {
            return Err(SandboxError::Refused(format!(
                "cannot share {}: husk shares only directories whose paths are UTF-8",
                bad.dir.display()
            )));
        }
        let snapshot = match from {
            Some(dir) => dir.to_owned(),
            None => warm::snapshot(root, &bins.vmm, &guest_image(bins, shape, nets))?.0,
        };
        // The TAPs go to the VMM as inherited descriptors (`--net
        // SLOT=FD`); this process's duplicates close once it has started.
        let inherited = taps
            .iter()
            .map(husk_sys::net::inheritable)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| SandboxError::Spawn(bins.vmm.clone(), e))?;
        // Its sockets' directory, the VMM's alone to make things in.
        let sockets = vm_dir(state_dir);
        husk_sys::private::dir(&sockets).map_err(|e| SandboxError::Refused(e.to_string()))?;
        let socket = sockets.join(VSOCK_SOCKET);
        let stderr_log = state_dir.join("vmm.log");
        let console = state_dir.join("console.log");
        let log = std::fs::File::create(&stderr_log)
            .map_err(|e| SandboxError::Spawn(stderr_log.clone(), e))?;
        let mut cmd = Command::new(&bins.vmm);
        // A debugging and benchmarking aid: the VMM's timings (set-up
        // steps, CPU time of guest and device work) written where asked.
        if let Some(prefix) = std::env::var_os(crate::timings::TIMINGS_ENV) {
            let mut path = prefix;
            path.push(".vmm.json");
            cmd.arg("--timings").arg(path);
        }
        if container_netns {
            cmd.arg("--container-netns");
        }
        cmd.arg("--restore")
            .arg(&snapshot)
            .arg("--vsock-socket")
            .arg(&socket)
            .args(
                shares
                    .iter()
                    .flat_map(|s| ["--share".to_owned(), s.to_string()]),
            )
            .args(inherited.iter().enumerate().flat_map(|(slot, fd)| {
                [
                    "--net".to_owned(),
                    format!("{slot}={}", std::os::fd::AsRawFd::as_raw_fd(fd)),
                ]
            }))
            .arg("--console")
            .arg(&console)
            .arg("--api-socket")
            .arg(sockets.join(API_SOCKET))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // The VMM dies with the process that runs it (the container's
        // monitor): no VM outlives the husk process responsible for it.
        // It starts with no signal blocked or ignored (SIGTERM ends it),
        // as PID 1 of a PID namespace of its own.
        let (ready, ready_end) = husk_sys::child::ready_pipe(&mut cmd)
            .map_err(|e| SandboxError::Spawn(bins.vmm.clone(), e))?;
        let (vmm, starter) = husk_sys::child::spawn_vmm(&mut cmd)
            .map_err(|e| SandboxError::Spawn(bins.vmm.clone(), e))?;
        drop((inherited, ready_end));
        Ok(Self {
            vmm: Some(vmm),
            _starter: starter,
            ready: Some(ready),
            socket,
            stderr_log,
        })
    }

    /// PID of the VMM process.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.as_ref().map(Child::id)
    }

    /// What the VMM said, for an error.
    fn vmm_said(&mut self) -> String {
        let status = self
            .vmm
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
            .map(|s| format!("husk-vmm {s}"))
            .unwrap_or_else(|| "husk-vmm".into());
        let said = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        match said.trim() {
            "" => status,
            said => format!("{status}: {said}"),
        }
    }

    /// `e`, or what happened to the VM if it has ended: a broken agent
    /// connection is the symptom, the VM's end the cause.
    pub fn explain(&mut self, e: SandboxError) -> SandboxError {
        if matches!(e, SandboxError::VmEnded(_)) {
            return e;
        }
        // The VMM may take a moment to be reaped after its socket closed.
        for _ in 0..100 {
            let ended = self
                .vmm
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if ended {
                return SandboxError::VmEnded(self.vmm_said());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        e
    }

    /// A control connection to the agent of the restored guest, waiting
    /// (60 s at most) for the VMM's socket and the agent to answer; a VMM
    /// that ends meanwhile is named.
    pub fn control(&mut self) -> Result<Control, SandboxError> {
        let agent = Agent {
            socket: self.socket.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        // The VMM says when its socket is bound: one connect then, not a
        // try every 2 ms. One that ends first is found below.
        if let (Some(ready), Some(vmm)) = (self.ready.take(), &self.vmm) {
            husk_sys::child::wait_ready(vmm, &ready, Duration::from_secs(60));
        }
        loop {
            match agent.control() {
                Ok(control) => return Ok(control),
                Err(e) => {
                    let ended = self
                        .vmm
                        .as_mut()
                        .is_none_or(|c| c.try_wait().ok().flatten().is_some());
                    if ended {
                        return Err(SandboxError::VmEnded(self.vmm_said()));
                    }
                    if Instant::now() > deadline {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// Waits up to `timeout` for the VMM to exit (after a shutdown); kills
    /// it after that. Returns what it said when it failed.
    pub fn finish(&mut self, timeout: Duration) -> Result<(), SandboxError> {
        let Some(mut child) = self.vmm.take() else {
            return Ok(());
        };
        match husk_sys::child::wait_timeout(&mut child, timeout) {
            Ok(Some(status)) if status.success() => Ok(()),
            Ok(Some(_)) => {
                self.vmm = Some(child);
                let said = self.vmm_said();
                self.vmm = None;
                Err(SandboxError::VmEnded(said))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(SandboxError::VmEnded(
                    "the VM did not power off in time and was killed".into(),
                ))
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut child) = self.vmm.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(self.socket.with_file_name(API_SOCKET));
        if let Some(sockets) = self.socket.parent() {
            let _ = std::fs::remove_dir(sockets);
        }
    }
}

/// A control connection to the agent.
pub struct Control {
    stream: UnixStream,
    /// Frames are read through a buffer: one read per frame, not two.
    reader: std::io::BufReader<UnixStream>,
    /// The agent's hello has been read.
    greeted: bool,
}

impl Control {
    fn over(stream: UnixStream, greeted: bool) -> Result<Self, SandboxError> {
        let reader = std::io::BufReader::with_capacity(
            4096,
            stream
                .try_clone()
                .map_err(|e| SandboxError::Agent(e.into()))?,
        );
        Ok(Self {
            stream,
            reader,
            greeted,
        })
    }

    /// Sends `request` and returns the answer.
    pub fn ask(&mut self, request: &Request) -> Result<Response, SandboxError> {
        write_frame(&mut self.stream, request).map_err(SandboxError::Agent)?;
        if !self.greeted {
            husk_protocol::hear_greeting(&mut self.reader).map_err(SandboxError::Agent)?;
            self.greeted = true;
        }
        read_frame(&mut self.reader).map_err(SandboxError::Agent)
    }

    /// Sends `request`; an error answer becomes [`SandboxError::Refused`].
    pub fn expect_ok(&mut self, request: &Request) -> Result<(), SandboxError> {
        match self.ask(request)? {
            Response::Ok => Ok(()),
            Response::Error { message } | Response::NotStarted { message, .. } => {
                Err(SandboxError::Refused(message))
            }
            other => Err(SandboxError::Refused(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// The next record of an exec's output sent on this connection
    /// (after [`Response::OutputFollows`]).
    pub fn read_output(&mut self) -> Result<husk_protocol::Output, SandboxError> {
        husk_protocol::read_output(&mut self.reader).map_err(SandboxError::Agent)
    }

    /// Sends `request` without waiting for an answer (a shutdown).
    pub fn send(&mut self, request: &Request) -> Result<(), SandboxError> {
        write_frame(&mut self.stream, request).map_err(SandboxError::Agent)
    }

    /// Whether an answer's bytes are read already (then polling the
    /// connection would not say so).
    pub fn answer_buffered(&self) -> bool {
        !self.reader.buffer().is_empty()
    }

    /// The answer to the request [`send`](Self::send) sent.
    pub fn answer(&mut self) -> Result<Response, SandboxError> {
        if !self.greeted {
            husk_protocol::hear_greeting(&mut self.reader).map_err(SandboxError::Agent)?;
            self.greeted = true;
        }
        read_frame(&mut self.reader).map_err(SandboxError::Agent)
    }
}

impl std::os::fd::AsFd for Control {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.as_fd()
    }
}
