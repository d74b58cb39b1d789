//! A container's state on the host, under `<root>/containers/<id>/`.
//!
//! `state.json` is written atomically (a temporary file swapped with it,
//! `husk_sys::replace`)
//! by whichever husk process changes the container: `create`, the
//! container's monitor, `start`, `pause`, `resume`. It is never the only
//! source of truth: a container whose monitor process is gone is stopped,
//! whatever the file says, so a crash of any husk process leaves a state
//! that a later command reads correctly. Processes are named by PID and
//! start time, so a recycled PID is not mistaken for the monitor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The OCI runtime spec's container statuses (plus `creating`, while the
/// VM is being made).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `create` is making the VM.
    Creating,
    /// Made; its process not started.
    Created,
    /// Its process runs.
    Running,
    /// Its VM is paused.
    Paused,
    /// Its process has exited (or its VM is gone).
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// A host process, by PID and the start time the kernel gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProcess {
    /// PID.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot.
    pub start_time: u64,
}

impl HostProcess {
    /// The process `pid` as it is now, if it exists.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces: count from its end.
        let after = stat.rsplit_once(')')?.1;
        let start_time = after.split_whitespace().nth(19)?.parse().ok()?;
        Some(Self { pid, start_time })
    }

    /// Whether this very process still runs (not a zombie, not a PID
    /// reused by another).
    pub fn alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let Some((_, after)) = stat.rsplit_once(')') else {
            return false;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        fields.first() != Some(&"Z")
            && fields.get(19).and_then(|t| t.parse::<u64>().ok()) == Some(self.start_time)
    }

    /// Sends `signal`, a named one (not a real-time signal), if this very
    /// process still runs.
    pub fn signal(&self, signal: i32) -> bool {
        let (Some(pid), Some(signal)) = (
            i32::try_from(self.pid).ok().and_then(Pid::from_raw),
            Signal::from_named_raw(signal),
        ) else {
            return false;
        };
        self.alive() && rustix::process::kill_process(pid, signal).is_ok()
    }
}

/// What husk records about a container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerState {
    /// Container ID.
    pub id: String,
    /// The bundle directory.
    pub bundle: PathBuf,
    /// Status as last recorded (see [`ContainerState::status`]).
    pub status: Status,
    /// When it was created, RFC 3339.
    pub created: String,
    /// The monitor: the host process that holds the container's stdio and
    /// exits with its exit status (`pid` of `husk state`, `--pid-file`).
    pub monitor: Option<HostProcess>,
    /// The VMM.
    pub vmm: Option<HostProcess>,
    /// The container's exit status, once known.
    pub exit_status: Option<i32>,
    /// The spec's annotations.
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// What ended the container other than its process (its VM died).
    #[serde(default)]
    pub error: Option<String>,
    /// The container's process as its bundle says: the defaults of an
    /// `exec` (read here, not from the bundle, on every exec).
    #[serde(default)]
    pub process: Option<husk_protocol::Process>,
    /// The host cgroup (relative path) the VMM and monitor were put in.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The size of its VM.
    #[serde(default)]
    pub shape: Option<husk_guest::shape::Shape>,
    /// OOM kills in the container's guest cgroup, recorded when it ended.
    #[serde(default)]
    pub oom_kills: Option<u64>,
    /// Once stopped: its monitor has carried all of the process's output
    /// and recorded its last figures (`oom_kills`). `stopped` is recorded
    /// at the exit, before that; `delete` and `events` wait for it
    /// ([`ContainerState::drained_or_gone`]).
    #[serde(default)]
    pub drained: bool,
    /// The spec's poststart and poststop hooks as at `create` (`start` and
    /// `delete` run these, as runc runs its recorded config's, without
    /// reading the bundle again).
    #[serde(default)]
    pub hooks: Option<oci_spec::runtime::Hooks>,
    /// The network namespace whose interfaces were joined to the VM, and
    /// those interfaces (their redirection is taken off at the end).
    #[serde(default)]
    pub network: Option<NetworkState>,
    /// Its place in a pod (containerd's shim): a sandbox, whose VM is the
    /// pod's, or a container made in its sandbox's VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<crate::pod::Pod>,
}

/// What [`ContainerState::network`] records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkState {
    /// The spec's namespace path.
    pub netns: PathBuf,
    /// The interfaces joined to the VM's TAPs.
    pub links: Vec<String>,
}

/// Errors reading or writing container state.
#[derive(Debug, Error)]
pub enum StateError {
    /// No such container.
    #[error("container {0:?} does not exist")]
    NotFound(String),
    /// The state cannot be read or written.
    #[error(transparent)]
    Io(#[from] husk_sys::PathError),
    /// The state file is damaged.
    #[error("the state of container {0:?} is damaged: {1}")]
    Damaged(String, String),
}

/// The directory of container `id`.
pub fn dir(root: &Path, id: &str) -> PathBuf {
    root.join("containers").join(id)
}

const FILE: &str = "state.json";

impl ContainerState {
    /// Reads the state of container `id`.
    pub fn load(root: &Path, id: &str) -> Result<Self, StateError> {
        let path = dir(root, id).join(FILE);
        let json = match std::fs::read_to_string(&path) {
            Ok(json) => json,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(id.to_owned()));
            }
            Err(source) => {
                return Err(StateError::from(husk_sys::PathError {
                    what: "read",
                    path,
                    source,
                }));
            }
        };
        serde_json::from_str(&json).map_err(|e| StateError::Damaged(id.to_owned(), e.to_string()))
    }

    /// Writes the state atomically.
    pub fn save(&self, root: &Path) -> Result<(), StateError> {
        let json = serde_json::to_string_pretty(self).unwrap_or_default();
        husk_sys::replace::replace(&dir(root, &self.id).join(FILE), json.as_bytes())
            .map_err(Into::into)
    }

    /// The status as it is: `stopped` once the monitor is gone, whatever
    /// was recorded.
    pub fn status(&self) -> Status {
        match self.status {
            Status::Stopped => Status::Stopped,
            recorded => match self.monitor {
                Some(m) if m.alive() => recorded,
                // Still being made by `create`, which has not started the
                // monitor yet.
                None if recorded == Status::Creating => Status::Creating,
                _ => Status::Stopped,
            },
        }
    }

    /// This state, once its monitor has drained a stopped container's
    /// output and recorded its last figures, or is gone; reread from
    /// `root` every 5 ms, for at most `limit` (a process in the guest that
    /// holds the output open keeps it from draining: past the limit the
    /// caller goes on with what it has).
    pub fn drained_or_gone(self, root: &Path, limit: std::time::Duration) -> Self {
        let deadline = std::time::Instant::now() + limit;
        let mut state = self;
        while state.status() == Status::Stopped
            && !state.drained
            && state.monitor.is_some_and(|m| m.alive())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
            match Self::load(root, &state.id) {
                Ok(s) => state = s,
                Err(_) => break,
            }
        }
        state
    }

    /// The state the OCI runtime spec defines, as `runc state` prints it.
    pub fn oci_state(&self) -> serde_json::Value {
        let status = self.status();
        let pid = match (status, self.monitor) {
            (Status::Stopped, _) | (_, None) => 0,
            (_, Some(m)) => m.pid,
        };
        serde_json::json!({
            "ociVersion": crate::bundle::OCI_VERSION,
            "id": self.id,
            "status": status.to_string(),
            "pid": pid,
            "bundle": self.bundle,
            "rootfs": self.bundle.join("rootfs"),
            "created": self.created,
            "annotations": self.annotations,
        })
    }
}

/// IDs of every container under `root`.
pub fn list(root: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(root.join("containers"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join(FILE).is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    ids.sort();
    ids
}

/// Now, RFC 3339 in UTC with nanoseconds, as runc writes `created`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_or_recycled_monitor_means_stopped() {
        let me = HostProcess::of(std::process::id()).unwrap();
        assert!(me.alive());
        let mut state = ContainerState {
            id: "c".into(),
            bundle: "/b".into(),
            status: Status::Running,
            created: now_rfc3339(),
            monitor: Some(me),
            vmm: None,
            exit_status: None,
            annotations: HashMap::new(),
            error: None,
            process: None,
            cgroup: None,
            shape: None,
            oom_kills: None,
            drained: false,
            hooks: None,
            network: None,
            pod: None,
        };
        assert_eq!(state.status(), Status::Running);
        assert_eq!(state.oci_state()["pid"], me.pid);
        // The same PID with another start time is another process.
        state.monitor = Some(HostProcess {
            pid: me.pid,
            start_time: me.start_time + 1,
        });
        assert_eq!(state.status(), Status::Stopped);
        assert_eq!(state.oci_state()["pid"], 0);
        assert_eq!(state.oci_state()["status"], "stopped");
        state.monitor = Some(HostProcess {
            pid: u32::MAX - 1,
            start_time: 0,
        });
        assert_eq!(state.status(), Status::Stopped);
    }

    /// Issue 19, item 1: `delete` and `events` wait for a stopped
    /// container's live monitor to drain its output, within their limit,
    /// and not for a monitor that is gone.
    #[test]
    fn a_stopped_container_is_waited_for_until_drained_or_its_monitor_is_gone() {
        use std::time::{Duration, Instant};
        let root = std::env::temp_dir().join(format!("husk-drain-{}", std::process::id()));
        std::fs::create_dir_all(dir(&root, "d1")).unwrap();
        let mut state = ContainerState {
            id: "d1".into(),
            bundle: "/b".into(),
            status: Status::Stopped,
            created: now_rfc3339(),
            monitor: HostProcess::of(std::process::id()),
            vmm: None,
            exit_status: Some(0),
            annotations: HashMap::new(),
            error: None,
            process: None,
            cgroup: None,
            shape: None,
            oom_kills: None,
            drained: false,
            hooks: None,
            network: None,
            pod: None,
        };
        state.save(&root).unwrap();
        // Not drained, the monitor alive: waited for until the limit.
        let start = Instant::now();
        let seen = state
            .clone()
            .drained_or_gone(&root, Duration::from_millis(300));
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(!seen.drained);
        // Drained meanwhile, by the monitor: seen as soon as recorded.
        let writer = {
            let (root, mut state) = (root.clone(), state.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                state.oom_kills = Some(2);
                state.drained = true;
                state.save(&root).unwrap();
            })
        };
        let start = Instant::now();
        let seen = state
            .clone()
            .drained_or_gone(&root, Duration::from_secs(30));
        writer.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(seen.drained);
        assert_eq!(seen.oom_kills, Some(2));
        // A monitor that is gone leaves nothing to wait for.
        state.monitor = Some(HostProcess {
            pid: u32::MAX - 1,
            start_time: 0,
        });
        let start = Instant::now();
        let seen = state.drained_or_gone(&root, Duration::from_secs(30));
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(!seen.drained);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn state_round_trips_and_a_missing_one_is_named() {
        let root = std::env::temp_dir().join(format!("husk-state-{}", std::process::id()));
        std::fs::create_dir_all(dir(&root, "c1")).unwrap();
        let state = ContainerState {
            id: "c1".into(),
            bundle: "/b".into(),
            status: Status::Created,
            created: now_rfc3339(),
            monitor: None,
            vmm: None,
            exit_status: Some(3),
            annotations: [("a".to_string(), "b".to_string())].into(),
            error: None,
            process: None,
            cgroup: None,
            shape: None,
            oom_kills: None,
            drained: false,
            hooks: None,
            network: None,
            pod: None,
        };
        state.save(&root).unwrap();
        let back = ContainerState::load(&root, "c1").unwrap();
        assert_eq!(back.exit_status, Some(3));
        assert_eq!(list(&root), ["c1"]);
        assert_eq!(
            ContainerState::load(&root, "nope").unwrap_err().to_string(),
            "container \"nope\" does not exist"
        );
        std::fs::write(dir(&root, "c1").join(FILE), "{").unwrap();
        assert!(
            ContainerState::load(&root, "c1")
                .unwrap_err()
                .to_string()
                .starts_with("the state of container \"c1\" is damaged")
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
