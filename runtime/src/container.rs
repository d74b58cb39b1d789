//! runc's container lifecycle over husk's VMs: `create`, `start`,
//! `state`, `kill`, `delete`, `run`, `exec`, `ps`, `list`, `pause`,
//! `resume`. Each checks the container's state first and fails with a
//! message naming the state when the command does not apply, changing
//! nothing.

use std::path::Path;

use husk_protocol::api::ApiRequest;
use husk_protocol::{Process, Request, Response};
use thiserror::Error;

use crate::bundle::{Bundle, BundleError};
use crate::handoff::{self, Handoff, Monitor, Restore, Stdio3};
use crate::monitor::Terminal;
use crate::sandbox::{Agent, SandboxError, vmm_api};
use crate::state::{self, ContainerState, StateError, Status};

/// Errors of the lifecycle commands.
#[derive(Debug, Error)]
pub enum LifecycleError {
    /// The bundle is unusable.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The container's state cannot be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// The container ID is not valid.
    #[error(
        "container ID {0:?} is not valid: use letters, digits, '_', '-' and '.', not starting with '.'"
    )]
    BadId(String),
    /// A container of that ID exists.
    #[error("container {0:?} exists")]
    Exists(String),
    /// The command does not apply in the container's state.
    #[error("container {id:?} is {status}: {why}")]
    WrongState {
        /// Container ID.
        id: String,
        /// Its status.
        status: Status,
        /// What the command needs.
        why: &'static str,
    },
    /// A file or directory of husk's cannot be made.
    #[error(transparent)]
    Io(#[from] husk_sys::PathError),
    /// The monitor failed to set the container up; what it said.
    #[error("{0}")]
    SetUp(String),
    /// The VM or its agent failed or refused.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// A checkpoint to restore from is unusable.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The container's process could not be started: `status` is what a
    /// shell would report (127: no such program).
    #[error("{message}")]
    NotStarted {
        /// What failed.
        message: String,
        /// Its exit status.
        status: i32,
    },
    /// The container's VM ended under it; what the monitor recorded.
    #[error("{0}")]
    VmEnded(String),
    /// A signal name or number that is not one.
    #[error("{0:?} is not a signal")]
    BadSignal(String),
    /// Resources a container's VM cannot give it.
    #[error("container {id:?}: {message}")]
    Resources {
        /// Container ID.
        id: String,
        /// What cannot be given.
        message: String,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LifecycleError {
    let path = path.to_owned();
    move |source| husk_sys::PathError { what, path, source }.into()
}

/// Checks a container ID as runc does.
pub fn check_id(id: &str) -> Result<(), LifecycleError> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(LifecycleError::BadId(id.to_owned()))
    }
}

fn wrong(state: &ContainerState, why: &'static str) -> LifecycleError {
    LifecycleError::WrongState {
        id: state.id.clone(),
        status: state.status(),
        why,
    }
}

/// Options of `create` (and `run`).
pub struct CreateOptions<'a> {
    /// Husk's root.
    pub root: &'a Path,
    /// Container ID.
    pub id: &'a str,
    /// The bundle.
    pub bundle: &'a Path,
    /// `--pid-file`.
    pub pid_file: Option<&'a Path>,
    /// `--console-socket`.
    pub console_socket: Option<&'a Path>,
    /// The monitor outlives this command (`create`, `run -d`).
    pub detach: bool,
    /// `restore`: the checkpoint's directory; the container runs at once.
    pub restore: Option<&'a Path>,
    /// The container's stdio (its monitor's); `None`: this process's.
    pub stdio: Option<Stdio3<'a>>,
    /// Its place in a pod (containerd's shim); `None`: a VM of its own.
    pub pod: Option<crate::pod::Pod>,
}

/// `create`: the container's VM restored and its process made, not
/// started. Returns the monitor.
pub fn create(o: &CreateOptions) -> Result<Monitor, LifecycleError> {
    create_with(o, false).map(|(child, _)| child)
}

/// `run`'s `create` and `start` in one step: the monitor starts the
/// process as soon as it is made, on the connection to the agent it holds
/// (what `start` does, poststart hooks included). Returns the monitor,
/// and what the guest said where the process could not start (no such
/// program): the container then ends as such a process does.
pub fn create_started(
    o: &CreateOptions,
) -> Result<(Monitor, Option<crate::handoff::NotStarted>), LifecycleError> {
    create_with(o, o.restore.is_none())
}

fn create_with(
    o: &CreateOptions,
    start: bool,
) -> Result<(Monitor, Option<crate::handoff::NotStarted>), LifecycleError> {
    check_id(o.id)?;
    let restore = match o.restore {
        Some(checkpoint) => {
            let (at, manifest) = crate::checkpoint::open(checkpoint, o.id)?;
            Some(Restore {
                snapshot: at.join(crate::checkpoint::VM_DIR),
                shape: manifest.shape,
            })
        }
        None => None,
    };
    let bundle_dir = o
        .bundle
        .canonicalize()
        .map_err(io("find the bundle", o.bundle))?;
    let bundle = Bundle::load(&bundle_dir)?;
    crate::hooks::refuse_guest_hooks(&bundle.spec).map_err(|message| {
        LifecycleError::Resources {
            id: o.id.to_owned(),
            message,
        }
    })?;
    husk_guest::shape::Shape::of(
        bundle
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref()),
    )
    .map_err(|message| LifecycleError::Resources {
        id: o.id.to_owned(),
        message,
    })?;
    let containers = o.root.join("containers");
    std::fs::create_dir_all(&containers).map_err(io("create", &containers))?;
    let dir = state::dir(o.root, o.id);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(LifecycleError::Exists(o.id.to_owned()));
        }
        Err(e) => return Err(io("create", &dir)(e)),
    }
    let cleanup = |e: LifecycleError| {
        // A monitor that died while it set the VM up recorded its host
        // cgroup first: removed too (its VMM, ended with it, may hold it
        // for a moment).
        if let Ok(left) = ContainerState::load(o.root, o.id)
            && let Some(rel) = &left.cgroup
        {
            crate::cgroup::remove(rel);
        }
        let _ = std::fs::remove_dir_all(&dir);
        e
    };
    let state = ContainerState {
        id: o.id.to_owned(),
        bundle: bundle_dir.clone(),
        status: Status::Creating,
        created: state::now_rfc3339(),
        monitor: None,
        vmm: None,
        exit_status: None,
        annotations: bundle.spec.annotations().clone().unwrap_or_default(),
        error: None,
        process: Some(bundle.process()),
        // The VM's host cgroup (docs/runtime.md, "cgroups"), recorded
        // before the monitor makes it; a pod's container has its
        // sandbox's VM.
        cgroup: match &o.pod {
            Some(crate::pod::Pod::Member { .. }) => None,
            _ => crate::monitor::host_cgroup(&bundle, o.id)
                .map_err(|e| cleanup(LifecycleError::SetUp(e)))?,
        },
        shape: None,
        oom_kills: None,
        drained: false,
        hooks: bundle.spec.hooks().clone(),
        network: None,
        pod: o.pod.clone(),
    };
    state.save(o.root).map_err(|e| cleanup(e.into()))?;
    // The monitor is handed the state and the checked bundle: it reads
    // neither again.
    let handoff = Handoff::Container {
        state: Box::new(state),
        bundle: Box::new(bundle),
        restore,
        start,
    };
    let (child, not_started) = handoff::start_told(
        o.root,
        &monitor_args(o.id, o.console_socket),
        handoff,
        o.stdio,
    )
    .map_err(|(said, _)| cleanup(LifecycleError::SetUp(said)))?;
    if let Some(path) = o.pid_file {
        std::fs::write(path, child.id().to_string())
            .map_err(io("write the pid file", path))
            .map_err(|e| {
                let _ = kill_vm(o.root, o.id);
                cleanup(e)
            })?;
    }
    Ok((child, not_started))
}

/// `start`: the created container's process starts.
pub fn start(root: &Path, id: &str) -> Result<(), LifecycleError> {
    let mut state = ContainerState::load(root, id)?;
    if state.status() != Status::Created {
        return Err(wrong(&state, "only a created container can be started"));
    }
    let dir = state::dir(root, id);
    let mut control = Agent::at(&dir).control()?;
    // A namespace husk made, empty after the hooks: what the client put
    // there since (`ctr run --cni`) goes to the guest before the process
    // starts.
    let monitor = state.monitor.as_ref().map(|m| m.pid);
    if let (Some(net), Some(pid)) = (&state.network, monitor)
        && net.links.is_empty()
        && net.netns == crate::network::netns_of(pid)
    {
        let slots = crate::monitor::NEW_NAMESPACE_SLOTS;
        if let Some(found) = crate::network::into_vm(&dir, &mut control, pid, slots)
            .map_err(SandboxError::Refused)?
        {
            state.network = Some(found);
            state.save(root)?;
        }
    }
    match control.ask(&Request::Start { id: id.into() })? {
        Response::Ok => {
            state.status = Status::Running;
            state.save(root)?;
            // The spec: a failed poststart hook is a warning; the
            // container runs on.
            if state.hooks.is_some() {
                let oci = state.oci_state().to_string();
                if let Err(e) = crate::hooks::run_these(
                    state.hooks.as_ref(),
                    crate::hooks::Point::Poststart,
                    &oci,
                ) {
                    eprintln!("husk: warning: {e}");
                }
            }
            Ok(())
        }
        Response::NotStarted { message, status } => {
            Err(LifecycleError::NotStarted { message, status })
        }
        Response::Error { message } => Err(SandboxError::Refused(message).into()),
        other => Err(SandboxError::Refused(format!("unexpected answer {other:?}")).into()),
    }
}

/// The number of a signal given as `KILL`, `SIGKILL` or `9`.
pub fn parse_signal(s: &str) -> Result<i32, LifecycleError> {
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(LifecycleError::BadSignal(s.to_owned()))
        };
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "CHLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => libc::SIGPWR,
        "SYS" => libc::SIGSYS,
        _ => return Err(LifecycleError::BadSignal(s.to_owned())),
    };
    Ok(n)
}

/// `kill`: a signal to the container's process (or all its processes).
/// A created container that was never started is stopped by any signal
/// that would end it, as its process would have been.
pub fn kill(root: &Path, id: &str, signal: i32, all: bool) -> Result<(), LifecycleError> {
    kill_process(root, id, "", signal, all)
}

/// A signal to process `exec_id` of container `id` (`""`: its own
/// process), as containerd's task API names processes.
pub fn kill_process(
    root: &Path,
    id: &str,
    exec_id: &str,
    signal: i32,
    all: bool,
) -> Result<(), LifecycleError> {
    let state = ContainerState::load(root, id)?;
    match state.status() {
        Status::Created | Status::Running | Status::Paused => {}
        _ => {
            return Err(wrong(
                &state,
                "only a created, running or paused container can be signalled",
            ));
        }
    }
    let mut control = Agent::at(&state::dir(root, id)).control()?;
    control.expect_ok(&Request::Signal {
        id: id.into(),
        exec_id: exec_id.into(),
        signal,
        all,
    })?;
    Ok(())
}

/// Kills the container's VM and monitor outright (a container of a pod:
/// its monitor; the pod's VM is its sandbox's).
pub fn kill_vm(root: &Path, id: &str) -> Result<(), LifecycleError> {
    let state = ContainerState::load(root, id)?;
    for p in [state.monitor, state.vmm].into_iter().flatten() {
        p.signal(libc::SIGKILL);
    }
    // Wait (briefly) until they are gone, so nothing holds the state dir.
    for _ in 0..200 {
        if [state.monitor, state.vmm]
            .iter()
            .flatten()
            .all(|p| !p.alive())
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(())
}

/// `delete`: the container's state removed. A running or paused one only
/// with `force` (its VM is killed); a created one is stopped first, as
/// runc does.
pub fn delete(root: &Path, id: &str, force: bool) -> Result<(), LifecycleError> {
    let state = match ContainerState::load(root, id) {
        Ok(s) => s,
        // runc: deleting with --force what does not exist succeeds
        // (containerd's shim deletes again when it cleans up).
        Err(StateError::NotFound(_)) if force && !state::dir(root, id).exists() => return Ok(()),
        // A state directory whose file was never written (a create that
        // was killed) is removed too.
        Err(StateError::NotFound(_)) if state::dir(root, id).is_dir() && check_id(id).is_ok() => {
            let dir = state::dir(root, id);
            return std::fs::remove_dir_all(&dir).map_err(io("remove", &dir));
        }
        Err(e) => return Err(e.into()),
    };
    match state.status() {
        // Its monitor may still be carrying the last output, then shutting
        // its VM down (the container counts as stopped from its exit on):
        // the output is waited for, the VM ended.
        Status::Stopped => {
            let state = state.clone().drained_or_gone(root, DRAIN_LIMIT);
            if [state.monitor, state.vmm]
                .iter()
                .flatten()
                .any(|p| p.alive())
            {
                kill_vm(root, id)?;
            }
        }
        Status::Created | Status::Creating => kill_vm(root, id)?,
        _ if force => kill_vm(root, id)?,
        _ => {
            return Err(wrong(&state, "stop it first, or delete it with --force"));
        }
    }
    // A pod's container: out of its sandbox's guest and pod share (its
    // monitor does so at its end; one that was killed did not).
    if let Some(crate::pod::Pod::Member {
        root: pod_root,
        sandbox,
    }) = &state.pod
    {
        let sandbox_dir = state::dir(pod_root, sandbox);
        if let Ok(mut control) = Agent::at(&sandbox_dir).control() {
            let _ = control.ask(&Request::Remove { id: id.into() });
        }
        crate::pod::remove_member(&crate::pod::dir(&sandbox_dir), id);
    }
    // A pod's sandbox: the pod share's binds, before anything under the
    // state directory is removed (they hold containers' roots).
    let pod_dir = crate::pod::dir(&state::dir(root, id));
    if state.pod == Some(crate::pod::Pod::Sandbox) || pod_dir.exists() {
        crate::pod::remove(&pod_dir);
        if pod_dir.exists() {
            return Err(LifecycleError::SetUp(format!(
                "cannot remove the pod directory {}: something is still mounted under it",
                pod_dir.display()
            )));
        }
    }
    if let Some(rel) = &state.cgroup {
        crate::cgroup::remove(rel);
    }
    // The monitor takes the redirection off when the VM ends; one that
    // was killed left it.
    if let Some(net) = &state.network {
        crate::network::unmirror(&net.netns, &net.links);
    }
    let dir = state::dir(root, id);
    std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
    // poststop hooks, as the spec had them at `create`: after the
    // container's resources are gone; a failure is a warning.
    if state.hooks.is_some() {
        let mut oci = state.oci_state();
        oci["status"] = "stopped".into();
        oci["pid"] = 0.into();
        if let Err(e) = crate::hooks::run_these(
            state.hooks.as_ref(),
            crate::hooks::Point::Poststop,
            &oci.to_string(),
        ) {
            eprintln!("husk: warning: {e}");
        }
    }
    Ok(())
}

/// `pause` / `resume`: the container's VM stopped or continued.
pub fn pause(root: &Path, id: &str, pause: bool) -> Result<(), LifecycleError> {
    let mut state = ContainerState::load(root, id)?;
    let (from, to, why) = if pause {
        (
            Status::Running,
            Status::Paused,
            "only a running container can be paused",
        )
    } else {
        (
            Status::Paused,
            Status::Running,
            "only a paused container can be resumed",
        )
    };
    if state.status() != from {
        return Err(wrong(&state, why));
    }
    if matches!(state.pod, Some(crate::pod::Pod::Member { .. })) {
        return Err(wrong(
            &state,
            "a container of a pod shares its VM: pause the pod's sandbox, which pauses the VM",
        ));
    }
    vmm_api(
        &state::dir(root, id),
        &if pause {
            ApiRequest::Pause
        } else {
            ApiRequest::Resume
        },
    )?;
    state.status = to;
    state.save(root)?;
    Ok(())
}

/// `ps`: the container's processes, by their PIDs in the guest.
pub fn ps(root: &Path, id: &str) -> Result<Vec<i32>, LifecycleError> {
    let state = ContainerState::load(root, id)?;
    match state.status() {
        Status::Running | Status::Paused | Status::Created => {}
        _ => return Ok(Vec::new()),
    }
    let mut control = Agent::at(&state::dir(root, id)).control()?;
    match control.ask(&Request::Ps { id: id.into() })? {
        Response::Pids { pids } => Ok(pids),
        Response::Error { message } => Err(SandboxError::Refused(message).into()),
        other => Err(SandboxError::Refused(format!("unexpected answer {other:?}")).into()),
    }
}

/// Resource usage of a running container, from its cgroup in the guest.
pub fn stats(root: &Path, id: &str) -> Result<husk_protocol::Stats, LifecycleError> {
    let state = ContainerState::load(root, id)?;
    match state.status() {
        Status::Running | Status::Paused | Status::Created => {}
        _ => return Err(wrong(&state, "only a live container has stats")),
    }
    let mut control = Agent::at(&state::dir(root, id)).control()?;
    match control.ask(&Request::Stats { id: id.into() })? {
        Response::Stats(stats) => Ok(stats),
        Response::Error { message } => Err(SandboxError::Refused(message).into()),
        other => Err(SandboxError::Refused(format!("unexpected answer {other:?}")).into()),
    }
}

/// `update`: new limits for a created, running or paused container,
/// applied to its cgroup in the guest. Its VM keeps its size: a memory
/// limit the VM cannot hold is refused (memory is not hot-plugged).
pub fn update(
    root: &Path,
    id: &str,
    resources: &oci_spec::runtime::LinuxResources,
) -> Result<(), LifecycleError> {
    let state = ContainerState::load(root, id)?;
    match state.status() {
        Status::Running | Status::Paused | Status::Created => {}
        _ => return Err(wrong(&state, "only a live container can be updated")),
    }
    let shape = state.shape.unwrap_or_default();
    // The same checks as at create: nonsense refused by name.
    husk_guest::shape::Shape::of(Some(resources)).map_err(|message| LifecycleError::Resources {
        id: id.into(),
        message,
    })?;
    if let Some(limit) = resources
        .memory()
        .as_ref()
        .and_then(|m| m.limit())
        .filter(|&l| l > 0)
    {
        if limit as u64 > shape.memory_limit_max() {
            return Err(LifecycleError::Resources {
                id: id.into(),
                message: format!(
                    "a memory limit of {limit} bytes needs a bigger VM: it has {} MiB, so at most {} bytes (memory is not hot-plugged)",
                    shape.memory_mib,
                    shape.memory_limit_max()
                ),
            });
        }
    }
    let json = serde_json::to_string(resources).expect("resources serialise");
    let mut control = Agent::at(&state::dir(root, id)).control()?;
    match control.ask(&Request::Update {
        id: id.into(),
        resources: json,
    })? {
        Response::Ok => Ok(()),
        Response::Error { message } => Err(LifecycleError::Resources {
            id: id.into(),
            message,
        }),
        other => Err(SandboxError::Refused(format!("unexpected answer {other:?}")).into()),
    }
}

/// Options of `exec`.
pub struct ExecOptions<'a> {
    /// Husk's root.
    pub root: &'a Path,
    /// Container ID.
    pub id: &'a str,
    /// The process.
    pub process: Process,
    /// `--detach`.
    pub detach: bool,
    /// `--pid-file`.
    pub pid_file: Option<&'a Path>,
    /// `--console-socket`.
    pub console_socket: Option<&'a Path>,
    /// The process's stdio (its monitor's); `None`: this process's.
    pub stdio: Option<Stdio3<'a>>,
}

/// The arguments of `husk _monitor`: the container, and where its
/// terminal goes.
fn monitor_args(id: &str, console_socket: Option<&Path>) -> Vec<String> {
    let mut args = vec![id.to_owned()];
    if let Some(socket) = console_socket {
        args.push("--console-socket".into());
        args.push(socket.display().to_string());
    }
    args
}

/// `exec`: another process in the running container whose state
/// (`ContainerState::load`, which the caller also takes the process's
/// defaults from) is `state`. Detached, returns once it runs (its monitor
/// is in `--pid-file`); else waits for it and returns its exit status.
pub fn exec(state: &ContainerState, o: &ExecOptions) -> Result<i32, LifecycleError> {
    if state.status() != Status::Running {
        return Err(wrong(
            state,
            "only a running container can run another process",
        ));
    }
    let exec_id = format!("exec-{}-{}", std::process::id(), state::now_rfc3339());
    // In the foreground with nothing to report elsewhere, this process is
    // the monitor: no second husk process on the path.
    if !o.detach && o.pid_file.is_none() && o.stdio.is_none() {
        let terminal = terminal(o.console_socket);
        return Ok(crate::monitor::exec_in_process(
            o.root,
            o.id,
            &exec_id,
            o.process.clone(),
            &terminal,
        ));
    }
    let started = start_exec(
        o.root,
        o.id,
        &exec_id,
        o.process.clone(),
        o.console_socket,
        o.stdio,
    );
    let mut child = match started {
        Ok(child) => child,
        Err((said, status)) => {
            eprintln!("husk: {}", said.trim());
            return Ok(status.unwrap_or(1));
        }
    };
    if let Some(path) = o.pid_file {
        std::fs::write(path, child.id().to_string()).map_err(io("write the pid file", path))?;
    }
    if o.detach {
        return Ok(0);
    }
    let status = child
        .wait()
        .map_err(io("wait for", Path::new("the exec monitor")))?;
    Ok(status.code().unwrap_or(128 + libc::SIGKILL))
}

/// Starts process `exec_id` in running container `id` under a monitor of
/// its own (with `stdio`, or this process's), and returns the monitor
/// once the process runs; its exit status is the monitor's. Else what
/// the monitor said, with its exit status once it ended.
pub fn start_exec(
    root: &Path,
    id: &str,
    exec_id: &str,
    process: Process,
    console_socket: Option<&Path>,
    stdio: Option<Stdio3<'_>>,
) -> Result<Monitor, (String, Option<i32>)> {
    let handoff = Handoff::Exec {
        id: id.to_owned(),
        exec_id: exec_id.to_owned(),
        process: Box::new(process),
    };
    handoff::start(root, &monitor_args(id, console_socket), handoff, stdio)
}

/// The process of an exec: the runc `--process` file (an OCI process), or
/// args with `-e`, `--cwd`, `--user`, `-t`.
pub fn exec_process(
    process_file: Option<&Path>,
    args: &[String],
    env: &[String],
    cwd: Option<&str>,
    user: Option<&str>,
    tty: bool,
    bundle_process: Option<Process>,
) -> Result<Process, LifecycleError> {
    if let Some(path) = process_file {
        let json = std::fs::read_to_string(path).map_err(io("read", path))?;
        let p: oci_spec::runtime::Process = serde_json::from_str(&json).map_err(|e| {
            LifecycleError::SetUp(format!("{} is not an OCI process: {e}", path.display()))
        })?;
        let spec = oci_spec::runtime::SpecBuilder::default()
            .process(p)
            .build()
            .map_err(|e| LifecycleError::SetUp(e.to_string()))?;
        return Ok(crate::bundle::process_of(&spec));
    }
    if args.is_empty() {
        return Err(LifecycleError::SetUp(
            "exec needs a command or --process".into(),
        ));
    }
    // Defaults from the container's own process, as runc takes them.
    let mut p = bundle_process.unwrap_or_default();
    p.args = args.to_vec();
    p.terminal = tty;
    p.env.extend(env.iter().cloned());
    if let Some(cwd) = cwd {
        p.cwd = cwd.to_owned();
    }
    if let Some(user) = user {
        let (uid, gid) = user.split_once(':').unwrap_or((user, "0"));
        p.uid = uid
            .parse()
            .map_err(|_| LifecycleError::SetUp(format!("--user {user:?} is not UID[:GID]")))?;
        p.gid = gid
            .parse()
            .map_err(|_| LifecycleError::SetUp(format!("--user {user:?} is not UID[:GID]")))?;
        p.additional_gids.clear();
    }
    Ok(p)
}

/// Terminal mode of a monitor from its options.
pub fn terminal(console_socket: Option<&Path>) -> Terminal {
    match console_socket {
        Some(p) => Terminal::Socket(p.to_owned()),
        None => Terminal::Inherit,
    }
}

/// How long `delete` and `events` wait for a stopped container's monitor
/// to carry its last output ([`ContainerState::drained_or_gone`]).
pub const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What this runtime supports, in the shape of `runc features`.
pub fn features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": crate::bundle::OCI_VERSION_MIN,
        "ociVersionMax": crate::bundle::OCI_VERSION,
        "hooks": [],
        "mountOptions": [
            "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "sync", "async",
            "dirsync", "noatime", "atime", "nodiratime", "diratime", "relatime", "norelatime",
            "strictatime", "bind", "rbind"
        ],
        "linux": {
            "namespaces": ["mount", "uts", "ipc", "pid", "network", "cgroup", "user"],
            "capabilities": [
                "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
                "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
                "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
                "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
                "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
                "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
                "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
                "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND",
                "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"
            ],
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            // Applied by the agent in the guest (agent/src/seccomp.rs).
            "seccomp": {
                "enabled": true,
                "actions": [
                    "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
                    "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"
                ],
                "operators": [
                    "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE", "SCMP_CMP_LT",
                    "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"
                ],
                "archs": ["SCMP_ARCH_X86_64"],
                "knownFlags": [
                    "SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                    "SECCOMP_FILTER_FLAG_SPEC_ALLOW", "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"
                ],
                "supportedFlags": [
                    "SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                    "SECCOMP_FILTER_FLAG_SPEC_ALLOW"
                ]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.husk.vm": "every container runs in its own KVM microVM",
            "io.husk.userns": "a user namespace is made in the guest with the spec's uidMappings and gidMappings, after the container's mounts; its other namespaces belong to the guest's root (docs/runtime.md)",
            "io.husk.namespaces": "a namespace given by path is refused, naming it, for a container with a VM of its own (nothing of the host's can be joined from a guest); a container of a pod joins its sandbox's ipc, uts and pid namespaces by their paths; a network namespace by path is mirrored into the VM (io.husk.network)",
            "io.husk.network": "the spec's network namespace is mirrored into the VM (a path: its interfaces; none given: a new one, whose interfaces the hooks or the client add before start); host networking cannot be shared by a VM: a spec without a network namespace gets loopback only, and a path to the host's own namespace is refused"
        }
    })
}
