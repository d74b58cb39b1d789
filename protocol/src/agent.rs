//! The messages between Husk's runtime on the host and its agent in the
//! guest, and how they travel.
//!
//! Transport: vsock (the VMM's hybrid vsock: a Unix socket on the host,
//! `CONNECT <port>\n`, then a byte stream). The agent listens on
//! [`CONTROL_PORT`] for requests and on [`STDIO_PORT`] for stdio streams.
//!
//! Framing: every message is one frame, a 4-byte big-endian length and that
//! many bytes of JSON. A frame longer than [`MAX_FRAME`] is refused before
//! anything is allocated for it, so neither side can make the other buffer
//! what it likes.
//!
//! Stdio is not framed: each stream of each process is its own vsock
//! connection, opened by the host with an [`StdioAttach`] frame and then
//! carrying raw bytes. vsock's credit-based flow control is the
//! back-pressure: a container that writes a gigabyte to stdout blocks in
//! its `write` until the host reads, and nothing in between grows.
//!
//! The one exception is a short exec whose host side has no input and no
//! terminal (`husk exec ID cmd` in the foreground, stdin `/dev/null`): its
//! `Exec` asks for `inline_output`, and the agent answers
//! [`Response::OutputFollows`] and then sends the process's output and its
//! exit status on the control connection itself, as [`Output`] records.
//! No stdio connection is opened: two connections fewer, on the host, in
//! the VMM and in the guest, for every such exec. An agent that does not
//! know the field answers `Ok`, and the host attaches the streams as
//! before.
//!
//! Versioning: the first frame each side sends on a control connection is
//! [`Hello`]; a peer with another [`PROTOCOL_VERSION`] is refused with an
//! error that names both versions.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Bumped whenever a message changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;
/// vsock port of the agent's control connection.
pub const CONTROL_PORT: u32 = 1024;
/// vsock port of the agent's stdio streams.
pub const STDIO_PORT: u32 = 1025;
/// Host vsock port (CID 2) the agent connects to once it listens, to say
/// it is ready. The VMM answers with a reset and takes it as the guest's
/// "ready" mark, where a warm-start snapshot is taken.
pub const READY_PORT: u32 = 1026;
/// vsock port of the agent's TCP forwards: a connection opened with a
/// [`Forward`] frame is answered with a [`Response`] frame (`Ok` once the
/// agent reached the guest's port, or `Error`), then carries raw bytes
/// both ways (a pod's port forwarding, docs/kubernetes.md).
pub const FORWARD_PORT: u32 = 1027;
/// The virtio-fs tag of the share that holds a container's root
/// filesystem.
pub const ROOTFS_TAG: &str = "rootfs";
/// The virtio-fs tags of the shares that carry a container's bind mounts
/// of host paths (each guest has them all; unused ones serve an empty
/// directory).
pub const VOLUME_TAGS: [&str; 4] = ["vol0", "vol1", "vol2", "vol3"];
/// Where the agent mounts the volume shares in the guest: a bind mount's
/// source `<VOLUMES_DIR>/<tag>/<path>` is `<path>` in share `<tag>`.
pub const VOLUMES_DIR: &str = "/run/husk/volumes";
/// The largest frame either side accepts (1 MiB): an OCI spec fits many
/// times over.
pub const MAX_FRAME: u32 = 1 << 20;

/// Errors reading or writing frames.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The connection failed or closed mid-frame.
    #[error("connection to the peer failed")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// A frame larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes is larger than the {MAX_FRAME} allowed")]
    TooLarge(u32),
    /// A frame that does not hold the expected message.
    #[error("malformed message from the peer")]
    Malformed(#[from] serde_json::Error),
    /// The peer speaks another protocol version.
    #[error("the peer speaks protocol version {peer}; this side speaks {PROTOCOL_VERSION}")]
    Version {
        /// The peer's version.
        peer: u32,
    },
}

/// Writes `msg` as one frame.
pub fn write_frame<W: Write, T: Serialize>(out: &mut W, msg: &T) -> Result<(), ProtocolError> {
    // One write: over vsock each write can become a packet of its own.
    out.write_all(&frame(msg)?)?;
    out.flush()?;
    Ok(())
}

/// One frame's bytes: the length, then the JSON.
pub fn frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or(ProtocolError::TooLarge(u32::MAX))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Reads one frame and decodes it as `T`.
pub fn read_frame<R: Read, T: DeserializeOwned>(input: &mut R) -> Result<T, ProtocolError> {
    let mut len = [0u8; 4];
    // A clean close before a frame starts is not an error of the frame.
    let mut got = 0;
    while got < 4 {
        match input.read(&mut len[got..])? {
            0 if got == 0 => return Err(ProtocolError::Closed),
            0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    input.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// The first frame on a control connection, from each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Free text: the sender's name and version, for logs.
    pub peer: String,
}

/// Sends our [`Hello`] and checks the peer's.
pub fn handshake<S: Read + Write>(stream: &mut S, me: &str) -> Result<Hello, ProtocolError> {
    greet(stream, me)?;
    hear_greeting(stream)
}

/// The first half of [`handshake`]: says this side's hello. A peer may
/// send its first request right after it and read the answer later with
/// [`hear_greeting`] (one round trip fewer).
pub fn greet<W: Write>(stream: &mut W, me: &str) -> Result<(), ProtocolError> {
    write_frame(
        stream,
        &Hello {
            version: PROTOCOL_VERSION,
            peer: me.to_owned(),
        },
    )
}

/// The second half of [`handshake`]: reads the peer's hello and checks its
/// version.
pub fn hear_greeting<R: Read>(stream: &mut R) -> Result<Hello, ProtocolError> {
    let theirs: Hello = read_frame(stream)?;
    if theirs.version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version {
            peer: theirs.version,
        });
    }
    Ok(theirs)
}

/// A process to run: what the OCI spec's `process` says, resolved by the
/// runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// Program and arguments.
    pub args: Vec<String>,
    /// Environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    /// User, group and additional groups.
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Additional groups.
    pub additional_gids: Vec<u32>,
    /// File mode creation mask.
    pub umask: Option<u32>,
    /// A terminal instead of three pipes.
    pub terminal: bool,
    /// Resource limits, name (`RLIMIT_NOFILE`) to (soft, hard).
    pub rlimits: BTreeMap<String, (u64, u64)>,
    /// `no_new_privileges`.
    pub no_new_privileges: bool,
    /// Capability sets; `None` keeps the agent's own (all of them).
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// Its stdin is /dev/null in the guest and no stdin stream is attached
    /// (the host's was /dev/null: one connection fewer per exec).
    #[serde(default)]
    pub stdin_null: bool,
    /// `process.oomScoreAdj`: written to its `/proc/self/oom_score_adj`
    /// before it drops its capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
}

/// A process's capability sets, by name (`CAP_CHOWN`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The bounding set.
    pub bounding: Vec<String>,
    /// Effective.
    pub effective: Vec<String>,
    /// Permitted.
    pub permitted: Vec<String>,
    /// Inheritable.
    pub inheritable: Vec<String>,
    /// Ambient.
    pub ambient: Vec<String>,
}

/// What makes a guest restored from a shared snapshot its own: the agent
/// applies it before the container is created (docs/snapshots.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSeed {
    /// Host randomness, mixed into the guest's RNG, which is then reseeded
    /// (its state is otherwise the snapshot's, the same in every clone).
    pub entropy: Vec<u8>,
    /// The host's CLOCK_REALTIME in nanoseconds: the guest's wall clock is
    /// otherwise the snapshot's.
    pub realtime_ns: u64,
}

/// Namespaces a container takes from another container of its guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    /// The container whose namespaces it joins.
    pub container: String,
    /// Which: any of `ipc`, `uts`, `pid`.
    pub namespaces: Vec<String>,
}

/// A request from the runtime to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Prepare the container (root filesystem, mounts, namespaces) without
    /// starting its process. `spec` is the OCI runtime spec, as JSON.
    Create {
        /// Container ID.
        id: String,
        /// The OCI `config.json`.
        spec: String,
        /// The process to start later.
        process: Process,
        /// Where its root is in the guest, for a container of a pod: a
        /// directory under a volume share (`<VOLUMES_DIR>/<tag>/...`).
        /// `None`: the root share ([`ROOTFS_TAG`]), a VM's own container.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root: Option<String>,
        /// The namespaces it shares with another container of the guest
        /// (its pod's sandbox), where its spec named them by path.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        join: Option<Join>,
    },
    /// Make this guest its own after a restore: sent once, before
    /// `create`, to every guest restored from a shared snapshot.
    Clone(CloneSeed),
    /// Start the created container's process.
    Start {
        /// Container ID.
        id: String,
    },
    /// Run another process in the container.
    Exec {
        /// Container ID.
        id: String,
        /// Names this process in later requests and stdio attaches.
        exec_id: String,
        /// What to run.
        process: Process,
        /// The process's output and exit status on this connection
        /// ([`Output`] records after [`Response::OutputFollows`]) rather
        /// than on stdio connections. Only for a process with no terminal
        /// and no input (`stdin_null`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        inline_output: bool,
    },
    /// Send a signal to a process (`exec_id` empty: the container's).
    Signal {
        /// Container ID.
        id: String,
        /// The process.
        exec_id: String,
        /// Signal number.
        signal: i32,
        /// To every process of the container (`kill --all`).
        all: bool,
    },
    /// Resize a process's terminal.
    ResizeTerminal {
        /// Container ID.
        id: String,
        /// The process.
        exec_id: String,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Wait for a process to exit; answered with [`Response::Exited`].
    Wait {
        /// Container ID.
        id: String,
        /// The process.
        exec_id: String,
    },
    /// A container's end in a guest that goes on (a pod's): whatever of
    /// it still runs is killed, its root and cgroup are removed, and its
    /// processes are forgotten.
    Remove {
        /// Container ID.
        id: String,
    },
    /// The guest PIDs of the container's processes; answered with
    /// [`Response::Pids`].
    Ps {
        /// Container ID.
        id: String,
    },
    /// Resource usage of the container; answered with
    /// [`Response::Stats`].
    Stats {
        /// Container ID.
        id: String,
    },
    /// Configure the guest's network interfaces; answered
    /// [`Response::Ok`], or [`Response::Error`] naming the interface and
    /// the step that failed. Idempotent: a restored guest is sent it again,
    /// and the interfaces end up as described whatever they were before
    /// (addresses not listed are removed; routes are made anew).
    Network {
        /// The guest's virtio-net interfaces to configure; slots not
        /// named are left alone.
        interfaces: Vec<NetInterface>,
    },
    /// New resource limits for a running container (`husk update`).
    Update {
        /// Container ID.
        id: String,
        /// The OCI spec's `linux.resources`, as JSON: what it sets is
        /// changed, what it leaves out is kept.
        resources: String,
    },
    /// Power the guest off once every process's output is delivered.
    Shutdown,
}

/// One of the guest's network interfaces, as the container should see it
/// (the host copies it from the interface the container was given on the
/// host, e.g. the veth of a CNI or docker network namespace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// The VM's virtio-net slot (`husk-vmm --net SLOT=FD`): the interface
    /// the guest kernel named `eth<slot>` at boot.
    pub slot: u8,
    /// The name the container sees (the host interface's, e.g. `eth0`):
    /// 1 to 15 bytes, as the kernel allows.
    pub name: String,
    /// The MAC address, on the wire as `"02:42:ac:11:00:02"`.
    #[serde(with = "mac_text")]
    pub mac: [u8; 6],
    /// The MTU, bytes.
    pub mtu: u32,
    /// The addresses and their prefix lengths (`10.0.3.15`, 24). IPv6
    /// ones skip duplicate address detection: the host made them unique.
    pub addresses: Vec<(IpAddr, u8)>,
    /// The routes through this interface (main table). A route without a
    /// gateway that is an address's own subnet is skipped: the kernel made
    /// it when the address was added.
    pub routes: Vec<NetRoute>,
}

/// A route through a [`NetInterface`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRoute {
    /// The destination network (`0.0.0.0` or `::` with `prefix` 0: the
    /// default route).
    pub dst: IpAddr,
    /// The destination's prefix length.
    pub prefix: u8,
    /// The next hop; `None` for a destination on the link itself. Of the
    /// same family as `dst`.
    pub gateway: Option<IpAddr>,
    /// The route's metric (priority); 0 is the kernel's default for the
    /// family (0 for IPv4, 1024 for IPv6).
    pub metric: u32,
}

/// A MAC address from its text form, `aa:bb:cc:dd:ee:ff` (as `ip` prints
/// it).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    mac_text::parse(text)
}

/// A MAC address as text, `aa:bb:cc:dd:ee:ff`: frames stay readable in a
/// log.
mod mac_text {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
        let [a, b, c, d, e, f] = mac;
        s.serialize_str(&format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 6], D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).ok_or_else(|| {
            D::Error::custom(format!(
                "MAC address {text:?} is not six hex bytes like 02:42:ac:11:00:02"
            ))
        })
    }

    pub(super) fn parse(text: &str) -> Option<[u8; 6]> {
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut mac {
            let part = parts.next()?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            *byte = u8::from_str_radix(part, 16).ok()?;
        }
        parts.next().is_none().then_some(mac)
    }
}

/// Which stdio stream a stdio connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Host to process.
    Stdin,
    /// Process to host.
    Stdout,
    /// Process to host.
    Stderr,
    /// Both ways, for a terminal.
    Terminal,
}

/// The one frame that opens a stdio connection; raw bytes follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioAttach {
    /// Container ID.
    pub id: String,
    /// The process (empty: the container's own).
    pub exec_id: String,
    /// The stream.
    pub stream: Stream,
}

/// The one frame that opens a forward connection: the guest's TCP port
/// on its loopback (127.0.0.1, else ::1) to reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// The TCP port.
    pub port: u16,
}

/// Resource usage of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// CPU time used, nanoseconds.
    pub cpu_ns: u64,
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// Processes.
    pub pids: u64,
    /// Processes the guest kernel's OOM killer killed in the container.
    #[serde(default)]
    pub oom_kills: u64,
    /// The container's memory limit, bytes (None: no limit).
    #[serde(default)]
    pub memory_limit: Option<u64>,
}

/// The agent's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    /// Done.
    Ok,
    /// The process ended: its exit code, or 128 + the signal that killed it.
    Exited {
        /// Exit status as a shell reports it.
        status: i32,
        /// A container's own process (a `Wait` with no exec ID): the OOM
        /// kills in its cgroup, so that its monitor need not ask for
        /// `Stats` after the end. An older agent sends none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        oom_kills: Option<u64>,
    },
    /// Resource usage.
    Stats(Stats),
    /// Processes, by their PIDs in the guest.
    Pids {
        /// PIDs.
        pids: Vec<i32>,
    },
    /// The process could not be started: `status` is what a shell would
    /// report (127: no such program, 126: not executable, 1: the
    /// container's set-up failed), `message` names what failed.
    NotStarted {
        /// What failed.
        message: String,
        /// Exit status to report for it.
        status: i32,
    },
    /// The request failed; the message names what failed.
    Error {
        /// What went wrong, for the user.
        message: String,
    },
    /// The process of an `Exec` with `inline_output` started: its output
    /// follows on this connection as [`Output`] records, the last of which
    /// is its exit status.
    OutputFollows,
}

/// One record of an exec's inline output (after
/// [`Response::OutputFollows`]): a tag byte (`o` stdout, `e` stderr, `x`
/// exit), a 4-byte big-endian length, and that many bytes (for `x`, the
/// exit status as a 4-byte big-endian integer). Raw bytes, not JSON: a
/// process's output is not text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Bytes the process wrote to its stdout.
    Stdout(Vec<u8>),
    /// Bytes the process wrote to its stderr.
    Stderr(Vec<u8>),
    /// The process ended with this status; nothing follows.
    Exited(i32),
}

/// The largest output record either side accepts (64 KiB, what the agent
/// reads from a pipe at once).
pub const MAX_OUTPUT_RECORD: u32 = 64 << 10;

/// Writes one [`Output`] record with one write (data over
/// [`MAX_OUTPUT_RECORD`] is the caller's to split).
pub fn write_output<W: Write>(out: &mut W, record: &Output) -> Result<(), ProtocolError> {
    let (tag, data): (u8, &[u8]) = match record {
        Output::Stdout(d) => (b'o', d),
        Output::Stderr(d) => (b'e', d),
        Output::Exited(status) => (b'x', &status.to_be_bytes()),
    };
    let len = u32::try_from(data.len())
        .ok()
        .filter(|&l| l <= MAX_OUTPUT_RECORD)
        .ok_or(ProtocolError::TooLarge(u32::MAX))?;
    let mut bytes = Vec::with_capacity(5 + data.len());
    bytes.push(tag);
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(data);
    out.write_all(&bytes)?;
    Ok(())
}

/// Reads one [`Output`] record. A record longer than
/// [`MAX_OUTPUT_RECORD`], an unknown tag, or an exit record that is not
/// four bytes is refused before anything is allocated for it.
pub fn read_output<R: Read>(input: &mut R) -> Result<Output, ProtocolError> {
    let mut head = [0u8; 5];
    match input.read(&mut head[..1])? {
        0 => return Err(ProtocolError::Closed),
        _ => input.read_exact(&mut head[1..])?,
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_OUTPUT_RECORD {
        return Err(ProtocolError::TooLarge(len));
    }
    let bad = |what: String| {
        ProtocolError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, what))
    };
    match head[0] {
        b'x' => {
            let mut status = [0u8; 4];
            if len != 4 {
                return Err(bad(format!("an exit record of {len} bytes")));
            }
            input.read_exact(&mut status)?;
            Ok(Output::Exited(i32::from_be_bytes(status)))
        }
        tag @ (b'o' | b'e') => {
            let mut data = vec![0u8; len as usize];
            input.read_exact(&mut data)?;
            Ok(if tag == b'o' {
                Output::Stdout(data)
            } else {
                Output::Stderr(data)
            })
        }
        tag => Err(bad(format!("an output record tagged {tag:#04x}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T) {
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).unwrap();
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 4);
        let back: T = read_frame(&mut Cursor::new(buf)).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn every_message_round_trips() {
        let process = Process {
            args: vec!["sh".into(), "-c".into(), "exit 7".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            uid: 1000,
            gid: 1000,
            additional_gids: vec![10],
            umask: Some(0o022),
            terminal: false,
            rlimits: [("RLIMIT_NOFILE".to_string(), (1024, 4096))].into(),
            no_new_privileges: true,
            capabilities: Some(Capabilities {
                bounding: vec!["CAP_KILL".into()],
                ..Default::default()
            }),
            stdin_null: true,
            oom_score_adj: Some(500),
        };
        let id = || "c1".to_string();
        for req in [
            Request::Create {
                id: id(),
                spec: "{\"ociVersion\":\"1.0.2\"}".into(),
                process: process.clone(),
                root: None,
                join: None,
            },
            Request::Create {
                id: id(),
                spec: "{}".into(),
                process: process.clone(),
                root: Some("/run/husk/volumes/vol3/c-x/rootfs".into()),
                join: Some(Join {
                    container: "pod".into(),
                    namespaces: vec!["ipc".into(), "uts".into()],
                }),
            },
            Request::Remove { id: id() },
            Request::Clone(CloneSeed {
                entropy: vec![1, 2, 3],
                realtime_ns: 1_700_000_000_000_000_000,
            }),
            Request::Start { id: id() },
            Request::Exec {
                id: id(),
                exec_id: "e1".into(),
                process: process.clone(),
                inline_output: false,
            },
            Request::Exec {
                id: id(),
                exec_id: "e2".into(),
                process,
                inline_output: true,
            },
            Request::Signal {
                id: id(),
                exec_id: String::new(),
                signal: 9,
                all: true,
            },
            Request::ResizeTerminal {
                id: id(),
                exec_id: "e1".into(),
                rows: 24,
                cols: 80,
            },
            Request::Wait {
                id: id(),
                exec_id: String::new(),
            },
            Request::Stats { id: id() },
            Request::Update {
                id: id(),
                resources: "{}".into(),
            },
            Request::Ps { id: id() },
            network(),
            Request::Network {
                interfaces: Vec::new(),
            },
            Request::Shutdown,
        ] {
            round_trip(req);
        }
        for resp in [
            Response::Ok,
            Response::Exited {
                status: 137,
                oom_kills: None,
            },
            Response::Exited {
                status: 0,
                oom_kills: Some(2),
            },
            Response::Pids { pids: vec![1, 7] },
            Response::Stats(Stats {
                cpu_ns: 1,
                memory_bytes: 2,
                pids: 3,
                oom_kills: 4,
                memory_limit: Some(5),
            }),
            Response::Error {
                message: "exec /nonexistent: no such file".into(),
            },
            Response::NotStarted {
                message: "exec nope: No such file or directory".into(),
                status: 127,
            },
            Response::OutputFollows,
        ] {
            round_trip(resp);
        }
        round_trip(StdioAttach {
            id: id(),
            exec_id: String::new(),
            stream: Stream::Stdout,
        });
    }

    fn network() -> Request {
        Request::Network {
            interfaces: vec![NetInterface {
                slot: 0,
                name: "eth0".into(),
                mac: [0x02, 0x42, 0x0a, 0x00, 0x03, 0x0f],
                mtu: 1500,
                addresses: vec![
                    ("10.0.3.15".parse().unwrap(), 24),
                    ("fd00::f".parse().unwrap(), 64),
                ],
                routes: vec![NetRoute {
                    dst: "0.0.0.0".parse().unwrap(),
                    prefix: 0,
                    gateway: Some("10.0.3.1".parse().unwrap()),
                    metric: 0,
                }],
            }],
        }
    }

    /// The runtime writes this form; the agent reads it.
    #[test]
    fn network_wire_form() {
        let json = serde_json::to_string(&network()).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"request":"network","interfaces":[{"slot":0,"name":"eth0","#,
                r#""mac":"02:42:0a:00:03:0f","mtu":1500,"#,
                r#""addresses":[["10.0.3.15",24],["fd00::f",64]],"#,
                r#""routes":[{"dst":"0.0.0.0","prefix":0,"gateway":"10.0.3.1","metric":0}]}]}"#
            )
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), network());
        // Upper case is read too.
        let upper = json.replace("02:42:0a:00:03:0f", "02:42:0A:00:03:0F");
        assert_eq!(serde_json::from_str::<Request>(&upper).unwrap(), network());
        for bad in [
            "02:42:0a:00:03",
            "02:42:0a:00:03:0f:00",
            "02-42-0a-00-03-0f",
            "02:42:0a:00:03:+f",
            "",
        ] {
            let err = serde_json::from_str::<Request>(&json.replace("02:42:0a:00:03:0f", bad))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!(
                    "MAC address {bad:?} is not six hex bytes like 02:42:ac:11:00:02"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn oversized_truncated_and_malformed_frames_are_refused() {
        // A length over the limit is refused before anything is read.
        let mut huge = (MAX_FRAME + 1).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let err = read_frame::<_, Response>(&mut Cursor::new(huge)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "frame of {} bytes is larger than the {MAX_FRAME} allowed",
                MAX_FRAME + 1
            )
        );
        // Cut off inside the body.
        let mut cut = 10u32.to_be_bytes().to_vec();
        cut.extend_from_slice(b"{\"resp");
        assert!(matches!(
            read_frame::<_, Response>(&mut Cursor::new(cut)),
            Err(ProtocolError::Io(_))
        ));
        // Cut off inside the length.
        assert!(matches!(
            read_frame::<_, Response>(&mut Cursor::new(vec![0u8, 0])),
            Err(ProtocolError::Io(_))
        ));
        // Closed between frames.
        assert!(matches!(
            read_frame::<_, Response>(&mut Cursor::new(Vec::new())),
            Err(ProtocolError::Closed)
        ));
        // Not the message expected.
        let mut wrong = Vec::new();
        write_frame(&mut wrong, &Request::Shutdown).unwrap();
        assert!(matches!(
            read_frame::<_, Response>(&mut Cursor::new(wrong)),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn output_records_round_trip_and_bad_ones_are_refused() {
        let records = [
            Output::Stdout(b"hello\n".to_vec()),
            Output::Stderr(vec![0, 0xff, b'\n']),
            Output::Stdout(vec![7; MAX_OUTPUT_RECORD as usize]),
            Output::Exited(-1),
        ];
        let mut wire = Vec::new();
        for r in &records {
            write_output(&mut wire, r).unwrap();
        }
        let mut input = Cursor::new(wire);
        for r in &records {
            assert_eq!(&read_output(&mut input).unwrap(), r);
        }
        assert!(matches!(
            read_output(&mut input),
            Err(ProtocolError::Closed)
        ));
        // Too large to write, too large to read (refused from the length).
        let big = Output::Stderr(vec![0; MAX_OUTPUT_RECORD as usize + 1]);
        assert!(write_output(&mut Vec::new(), &big).is_err());
        let mut huge = vec![b'o'];
        huge.extend_from_slice(&(MAX_OUTPUT_RECORD + 1).to_be_bytes());
        assert!(matches!(
            read_output(&mut Cursor::new(huge)),
            Err(ProtocolError::TooLarge(n)) if n == MAX_OUTPUT_RECORD + 1
        ));
        // An unknown tag, an exit of the wrong size, a cut-off record.
        let mut tag = vec![b'q'];
        tag.extend_from_slice(&0u32.to_be_bytes());
        let e = read_output(&mut Cursor::new(tag)).unwrap_err();
        assert!(format!("{e:?}").contains("tagged 0x71"), "{e:?}");
        let mut exit = vec![b'x'];
        exit.extend_from_slice(&2u32.to_be_bytes());
        exit.extend_from_slice(&[0, 1]);
        let e = read_output(&mut Cursor::new(exit)).unwrap_err();
        assert!(format!("{e:?}").contains("exit record of 2 bytes"), "{e:?}");
        let mut cut = vec![b'o'];
        cut.extend_from_slice(&10u32.to_be_bytes());
        cut.extend_from_slice(b"abc");
        assert!(matches!(
            read_output(&mut Cursor::new(cut)),
            Err(ProtocolError::Io(_))
        ));
        assert!(matches!(
            read_output(&mut Cursor::new(vec![b'o', 0])),
            Err(ProtocolError::Io(_))
        ));
    }

    #[test]
    fn handshake_refuses_another_version() {
        use std::os::unix::net::UnixStream;
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || {
            let _: Hello = read_frame(&mut b).unwrap();
            write_frame(
                &mut b,
                &Hello {
                    version: PROTOCOL_VERSION + 1,
                    peer: "husk-agent 9".into(),
                },
            )
            .unwrap();
        });
        let err = handshake(&mut a, "husk").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the peer speaks protocol version {}; this side speaks {PROTOCOL_VERSION}",
                PROTOCOL_VERSION + 1
            )
        );
        agent.join().unwrap();

        let (mut a, mut b) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || handshake(&mut b, "husk-agent"));
        let theirs = handshake(&mut a, "husk").unwrap();
        assert_eq!(theirs.peer, "husk-agent");
        assert_eq!(agent.join().unwrap().unwrap().peer, "husk");
    }
}
