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

use husk_protocol::{
    CONTROL_PORT, Request, Response, STDIO_PORT, StdioAttach, Stream, handshake, read_frame,
    write_frame,
};
use husk_vmm::api::{ApiRequest, ApiResponse};
use husk_vmm::devices::virtio::fs::Share;
use thiserror::Error;

use crate::warm::{self, GuestImage};

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

/// Where the runtime's pieces are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `husk-vmm`.
    pub vmm: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The agent's initramfs.
    pub initramfs: PathBuf,
}

/// The vsock socket in a container's state directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// The VMM's control socket (pause, resume) in a container's state
/// directory.
pub const API_SOCKET: &str = "api.sock";

/// The agent of a running container VM, reached through its vsock socket
/// by any husk process (`start`, `kill`, `exec`, ...).
pub struct Agent {
    socket: PathBuf,
}

impl Agent {
    /// The agent of the container whose state directory is `state_dir`.
    pub fn at(state_dir: &Path) -> Self {
        Self {
            socket: state_dir.join(VSOCK_SOCKET),
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
}

/// Sends one request to the VMM's control socket (pause, resume, stop,
/// snapshot) and waits for its answer.
pub fn vmm_api(state_dir: &Path, request: &ApiRequest) -> Result<(), SandboxError> {
    let path = state_dir.join(API_SOCKET);
    let fail = |e: std::io::Error| SandboxError::Refused(format!("the VMM's control socket: {e}"));
    let mut stream = UnixStream::connect(&path).map_err(fail)?;
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    stream.write_all(&line).map_err(fail)?;
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

/// The VM shape of a container guest with no CPU limit.
pub const VCPUS: u8 = 1;
/// Guest memory of a container guest with no memory limit (or a small
/// one), MiB.
pub const MEMORY_MIB: u64 = 256;
/// What the guest's kernel and agent need beside the container's limit,
/// MiB.
pub const GUEST_RESERVE_MIB: u64 = 64;
/// Guest memory is a multiple of this, MiB: few shapes, so few warm-start
/// snapshots.
pub const MEMORY_STEP_MIB: u64 = 256;
/// The most vCPUs husk gives a VM.
pub const MAX_VCPUS: u8 = 8;
/// The most memory husk gives a VM, MiB.
pub const MAX_MEMORY_MIB: u64 = 16 << 10;
/// What the VMM process itself needs beside guest memory, for the host
/// cgroup's limit, MiB.
pub const VMM_RESERVE_MIB: u64 = 64;

/// The size of a container's VM: what its spec's limits need (docs/
/// runtime.md, "Resources"). The guest enforces the limits themselves in
/// the container's cgroup; the VM only has to hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    /// vCPUs: the CPU quota rounded up (1 without one).
    pub vcpus: u8,
    /// Guest memory, MiB: the memory limit and the guest's reserve, rounded
    /// up to 256 MiB (256 without a limit).
    pub memory_mib: u64,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            vcpus: VCPUS,
            memory_mib: MEMORY_MIB,
        }
    }
}

impl Shape {
    /// The shape `resources` need.
    pub fn of(resources: Option<&oci_spec::runtime::LinuxResources>) -> Result<Self, String> {
        Self::on_host(resources, host_cpus())
    }

    /// The shape `resources` need on a host of `host_cpus` CPUs: limits
    /// that make no sense, and more vCPUs than the host or husk has, are
    /// refused by name (runc's -1 is "no limit").
    pub fn on_host(
        resources: Option<&oci_spec::runtime::LinuxResources>,
        host_cpus: u64,
    ) -> Result<Self, String> {
        let mut shape = Self::default();
        let Some(r) = resources else {
            return Ok(shape);
        };
        if let Some(m) = r.memory() {
            for (name, value) in [
                ("limit", m.limit()),
                ("reservation", m.reservation()),
                ("swap", m.swap()),
            ] {
                if let Some(v) = value.filter(|&v| v < -1) {
                    return Err(format!(
                        "linux.resources.memory.{name} {v}: must be a number of bytes, or -1 for no limit"
                    ));
                }
            }
        }
        if let Some(cpu) = r.cpu() {
            if let Some(q) = cpu.quota().filter(|&q| q < -1) {
                return Err(format!(
                    "linux.resources.cpu.quota {q}: must be a number of microseconds, or -1 for no limit"
                ));
            }
            if cpu.period() == Some(0) {
                return Err("linux.resources.cpu.period 0: must be at least 1 microsecond".into());
            }
        }
        if let Some(limit) = r
            .memory()
            .as_ref()
            .and_then(|m| m.limit())
            .filter(|&l| l > 0)
        {
            let need = (limit as u64).div_ceil(1 << 20) + GUEST_RESERVE_MIB;
            let mib = need.div_ceil(MEMORY_STEP_MIB) * MEMORY_STEP_MIB;
            if mib > MAX_MEMORY_MIB {
                return Err(format!(
                    "linux.resources.memory.limit {limit}: more than husk gives a VM ({} GiB)",
                    MAX_MEMORY_MIB >> 10
                ));
            }
            shape.memory_mib = mib.max(MEMORY_MIB);
        }
        if let Some(cpu) = r.cpu() {
            if let Some(quota) = cpu.quota().filter(|&q| q > 0) {
                let period = cpu.period().filter(|&p| p > 0).unwrap_or(100_000);
                let cpus = (quota as u64).div_ceil(period);
                let most = host_cpus.clamp(1, u64::from(MAX_VCPUS));
                if cpus > most {
                    return Err(format!(
                        "linux.resources.cpu quota {quota} per period {period} asks for {cpus} CPUs; \
                         a VM gets at most {most} here (this host has {host_cpus}, husk's limit is {MAX_VCPUS})"
                    ));
                }
                shape.vcpus = cpus.max(1) as u8;
            }
        }
        Ok(shape)
    }

    /// The most memory a container of this VM may be given (`update`).
    pub fn memory_limit_max(&self) -> u64 {
        (self.memory_mib - GUEST_RESERVE_MIB) << 20
    }
}

/// The host's online CPUs.
pub fn host_cpus() -> u64 {
    // SAFETY: sysconf takes no pointers.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u64::try_from(n).unwrap_or(1).max(1)
}

/// The warm-start image of container guests made from `bins`.
pub fn guest_image(bins: &Binaries, shape: Shape) -> GuestImage {
    GuestImage {
        kernel: bins.kernel.clone(),
        initramfs: bins.initramfs.clone(),
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
        ready_mark: husk_protocol::READY_MARK,
        vsock: true,
        shares: std::iter::once(husk_protocol::ROOTFS_TAG)
            .chain(husk_protocol::VOLUME_TAGS)
            .map(str::to_owned)
            .collect(),
    }
}

/// A running container VM.
pub struct Sandbox {
    vmm: Option<Child>,
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
    let mut stream = UnixStream::connect(socket)?;
    // A guest that does not answer the connection within 5 s is an error,
    // not a hang (Sandbox::control tries again: see docs/vsock.md).
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut hello = format!("CONNECT {port}\n").into_bytes();
    hello.extend_from_slice(first);
    stream.write_all(&hello)?;
    // The answer is one line, which the VMM writes at once: peek at what
    // has arrived and take exactly the line, so nothing after it is
    // consumed (two system calls, not one per byte). A line that arrives
    // in pieces is read byte by byte.
    let mut buf = [0u8; 64];
    // SAFETY: recv into a live buffer of the length given.
    let n = unsafe {
        libc::recv(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let line = match buf[..n as usize].iter().position(|&b| b == b'\n') {
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
    /// one.
    pub fn start(
        root: &Path,
        bins: &Binaries,
        state_dir: &Path,
        shares: &[Share],
        shape: Shape,
        from: Option<&Path>,
    ) -> Result<Self, SandboxError> {
        let snapshot = match from {
            Some(dir) => dir.to_owned(),
            None => warm::snapshot(root, &bins.vmm, &guest_image(bins, shape))?.0,
        };
        let socket = state_dir.join(VSOCK_SOCKET);
        let stderr_log = state_dir.join("vmm.log");
        let console = state_dir.join("console.log");
        let log = std::fs::File::create(&stderr_log)
            .map_err(|e| SandboxError::Spawn(stderr_log.clone(), e))?;
        let mut cmd = Command::new(&bins.vmm);
        // A debugging and benchmarking aid: the VMM's timings (set-up
        // steps, CPU time of guest and device work) written where asked.
        if let Some(prefix) = std::env::var_os(crate::run::TIMINGS_ENV) {
            let mut path = prefix;
            path.push(".vmm.json");
            cmd.arg("--timings").arg(path);
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
            .arg("--console")
            .arg(&console)
            .arg("--api-socket")
            .arg(state_dir.join(API_SOCKET))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // The VMM dies with the process that runs it (the container's
        // monitor): no VM outlives the husk process responsible for it.
        // It starts with no signal blocked or ignored (SIGTERM ends it).
        crate::child::vmm(&mut cmd);
        let vmm = cmd
            .spawn()
            .map_err(|e| SandboxError::Spawn(bins.vmm.clone(), e))?;
        Ok(Self {
            vmm: Some(vmm),
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
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(_)) => {
                    self.vmm = Some(child);
                    let said = self.vmm_said();
                    self.vmm = None;
                    return Err(SandboxError::VmEnded(said));
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(SandboxError::VmEnded(
                        "the VM did not power off in time and was killed".into(),
                    ));
                }
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

    /// Sends `request` without waiting for an answer (a shutdown).
    pub fn send(&mut self, request: &Request) -> Result<(), SandboxError> {
        write_frame(&mut self.stream, request).map_err(SandboxError::Agent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: serde_json::Value) -> oci_spec::runtime::LinuxResources {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_vm_is_sized_by_the_specs_limits() {
        assert_eq!(Shape::of(None).unwrap(), Shape::default());
        let small = resources(serde_json::json!({"memory": {"limit": 100 << 20}}));
        assert_eq!(Shape::of(Some(&small)).unwrap().memory_mib, 256);
        // 600 MiB + 64 MiB for the guest, rounded up to 256 MiB.
        let big = resources(serde_json::json!({"memory": {"limit": 600u64 << 20}}));
        let shape = Shape::of(Some(&big)).unwrap();
        assert_eq!(shape.memory_mib, 768);
        assert_eq!(shape.memory_limit_max(), 704 << 20);
        // Exactly at a step: 192 MiB + 64 = 256.
        let exact = resources(serde_json::json!({"memory": {"limit": 192 << 20}}));
        assert_eq!(Shape::of(Some(&exact)).unwrap().memory_mib, 256);
        let cpus = |quota: i64, period: u64| {
            let r = resources(serde_json::json!({"cpu": {"quota": quota, "period": period}}));
            Shape::on_host(Some(&r), 16).map(|s| s.vcpus)
        };
        assert_eq!(cpus(50_000, 100_000), Ok(1));
        assert_eq!(cpus(150_000, 100_000), Ok(2));
        assert_eq!(cpus(200_000, 100_000), Ok(2));
        assert_eq!(cpus(-1, 100_000), Ok(1));
        assert_eq!(cpus(800_000, 100_000), Ok(MAX_VCPUS));
        // Issue 14: more CPUs than husk or the host gives, and limits that
        // make no sense, are refused by name, not clamped or taken.
        let e = cpus(10_000_000, 100_000).unwrap_err();
        assert!(
            e.contains("asks for 100 CPUs; a VM gets at most 8 here"),
            "{e}"
        );
        let r = resources(serde_json::json!({"cpu": {"quota": 300_000, "period": 100_000}}));
        let e = Shape::on_host(Some(&r), 2).unwrap_err();
        assert!(
            e.contains("asks for 3 CPUs; a VM gets at most 2 here (this host has 2"),
            "{e}"
        );
        for (json, want) in [
            (
                serde_json::json!({"memory": {"limit": -5}}),
                "memory.limit -5: must be",
            ),
            (
                serde_json::json!({"memory": {"swap": -2}}),
                "memory.swap -2: must be",
            ),
            (
                serde_json::json!({"memory": {"reservation": -9}}),
                "memory.reservation -9",
            ),
            (
                serde_json::json!({"cpu": {"quota": -100}}),
                "cpu.quota -100: must be",
            ),
            (
                serde_json::json!({"cpu": {"quota": 100, "period": 0}}),
                "cpu.period 0",
            ),
        ] {
            let e = Shape::of(Some(&resources(json.clone()))).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
        assert_eq!(
            Shape::of(Some(&resources(
                serde_json::json!({"memory": {"limit": -1}})
            )))
            .unwrap()
            .memory_mib,
            MEMORY_MIB
        );
        let huge = resources(serde_json::json!({"memory": {"limit": 64u64 << 30}}));
        let e = Shape::of(Some(&huge)).unwrap_err();
        assert!(e.contains("more than husk gives a VM (16 GiB)"), "{e}");
    }
}
