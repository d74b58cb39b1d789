//! The task service: containerd's 17 task calls over husk's container
//! lifecycle (`husk_runtime::container`).
//!
//! Each task is a husk container with its root in its bundle
//! ([`crate::husk_root`]); its monitor and each exec's monitor are this
//! process's children, and a thread per monitor waits for it: the
//! monitor's exit status is the process's. Exits are published to
//! containerd after the start they follow.

use husk_runtime::handoff::Monitor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::shim::oci::CheckpointOptions;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::protos::{cgroups_v2, topics};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, ExitSignal, TtrpcContext, TtrpcResult};
use husk_runtime::container;
use husk_runtime::container::LifecycleError;
use husk_runtime::pod::Pod;

use crate::stdio::{self, Console, Paths, Pump};

/// The CRI annotation that says whether a task is a pod's sandbox.
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The CRI annotation naming a container's pod.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Which shim serves a task.
#[derive(Debug, PartialEq, Eq)]
pub struct Grouping {
    /// The group (a pod's sandbox ID, else the task's own).
    pub group: String,
    /// The group's shim already runs (a container of a pod).
    pub joins: bool,
}

/// What a task is to its pod, as CRI's annotations say.
#[derive(Debug, PartialEq, Eq)]
pub enum Role {
    /// A pod's sandbox: it starts the pod's VM.
    Sandbox,
    /// A container of pod (sandbox) `0`, made in its VM.
    Member(String),
    /// No pod: a VM of its own (`ctr run`).
    Alone,
}

/// The group of task `id` whose bundle is `bundle`: one shim per pod, as
/// CRI's annotations say; a task without them is a group of its own.
pub fn grouping(bundle: &Path, id: &str) -> Result<Grouping, String> {
    Ok(match role(bundle, id)? {
        Role::Member(sandbox) => Grouping {
            group: sandbox,
            joins: true,
        },
        Role::Sandbox | Role::Alone => Grouping {
            group: id.to_owned(),
            joins: false,
        },
    })
}

/// What task `id` whose bundle is `bundle` is to its pod.
pub fn role(bundle: &Path, id: &str) -> Result<Role, String> {
    let path = bundle.join("config.json");
    let json = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let spec: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let annotation = |key: &str| {
        spec.get("annotations")
            .and_then(|a| a.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    match (
        annotation(CONTAINER_TYPE).as_deref(),
        annotation(SANDBOX_ID),
    ) {
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() && sandbox != id => {
            container::check_id(&sandbox).map_err(|e| e.to_string())?;
            Ok(Role::Member(sandbox))
        }
        (Some("container"), _) => Err(format!(
            "container {id} names no pod: its {SANDBOX_ID} annotation is missing"
        )),
        (Some("sandbox"), _) => Ok(Role::Sandbox),
        _ => Ok(Role::Alone),
    }
}

/// After a shim died: task `id`'s VM killed, its state and root mount
/// removed.
pub fn clean_up(bundle: &Path, id: &str) {
    let root = crate::husk_root(bundle);
    if root.is_dir() {
        let _ = container::delete(&root, id, true);
        let _ = std::fs::remove_dir_all(&root);
    }
    let _ = rustix::mount::unmount(bundle.join("rootfs"), rustix::mount::UnmountFlags::DETACH);
    // The dead shim's socket, unless another shim listens on it.
    if let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
        let path = Path::new(address.trim().trim_start_matches("unix://"));
        if path.starts_with(containerd_shim::SOCKET_ROOT) && husk_sys::unix::connect(path).is_err()
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Mounts the root filesystem containerd prepared (an overlay of the
/// image's snapshots, or a bind) at `target`, with util-linux's `mount`:
/// containerd-shim's own helper forks and waits through a reaper of every
/// child, which this shim does not run (its monitors are waited for).
fn mount_rootfs(
    m: &containerd_shim::protos::types::mount::Mount,
    target: &Path,
) -> Result<(), String> {
    let mut cmd = std::process::Command::new("mount");
    cmd.arg("-t").arg(&m.type_);
    if !m.options.is_empty() {
        cmd.arg("-o").arg(m.options.join(","));
    }
    let out = cmd
        .arg(&m.source)
        .arg(target)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot mount the {} root filesystem at {}: {}",
            m.type_,
            target.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn status_error(code: Code, message: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

fn lifecycle(e: LifecycleError) -> ttrpc::Error {
    let code = match &e {
        LifecycleError::WrongState { .. } => Code::FAILED_PRECONDITION,
        LifecycleError::BadId(_) | LifecycleError::Resources { .. } => Code::INVALID_ARGUMENT,
        LifecycleError::Exists(_) => Code::ALREADY_EXISTS,
        _ => Code::UNKNOWN,
    };
    status_error(code, husk_runtime::error_chain(&e))
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Created,
    Running,
    Stopped,
}

/// One process of a task: its own (exec ID `""`) or an exec'd one.
struct Proc {
    /// Its monitor's PID (0 before an exec starts).
    pid: u32,
    life: Life,
    stdio: Paths,
    /// Exit status and time, once it ended.
    exit: Option<(u32, Timestamp)>,
    /// Its exit is held back until its start is published.
    starting: bool,
    exit_held: bool,
    pump: Option<Pump>,
    console: Option<Console>,
    /// An exec's process, kept from `Exec` until `Start`.
    process: Option<husk_protocol::Process>,
    /// Its ID in the guest: containerd's exec ID with a number of the
    /// shim's, as containerd lets a deleted exec's ID be used again but
    /// the agent keeps finished processes for a while.
    guest_id: String,
}

impl Proc {
    fn new(stdio: Paths) -> Self {
        Proc {
            pid: 0,
            life: Life::Created,
            stdio,
            exit: None,
            starting: false,
            exit_held: false,
            pump: None,
            console: None,
            process: None,
            guest_id: String::new(),
        }
    }
}

/// One task: a husk container.
struct Task {
    bundle: PathBuf,
    root: PathBuf,
    /// containerd mounted nothing: the bundle's rootfs is its own.
    mounted_rootfs: bool,
    /// A pod's sandbox: its VM holds the pod's other tasks.
    sandbox: bool,
    paused: bool,
    /// Its own process and its execs, by exec ID (`""`: its own).
    procs: HashMap<String, Proc>,
}

#[derive(Default)]
struct Tasks {
    tasks: HashMap<String, Task>,
    /// Console sockets and execs made, for unique names.
    made: u64,
}

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    tasks: Mutex<Tasks>,
    changed: Condvar,
}

/// The shim's task service.
#[derive(Clone)]
pub struct Service(Arc<Inner>);

impl Service {
    /// A service publishing to containerd in `namespace`; `exit` ends the
    /// shim.
    pub fn new(namespace: String, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        Service(Arc::new(Inner {
            namespace,
            publisher,
            exit,
            tasks: Mutex::new(Tasks::default()),
            changed: Condvar::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Tasks> {
        self.0.tasks.lock().expect("task table lock")
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) =
            self.0
                .publisher
                .publish(Context::default(), topic, &self.0.namespace, event)
        {
            log::warn!("cannot publish {topic}: {e}");
        }
    }

    /// Runs `f` on process `exec_id` of task `id`.
    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Task, &mut Proc) -> TtrpcResult<T>,
    ) -> TtrpcResult<T> {
        let mut tasks = self.lock();
        let task = tasks
            .tasks
            .get_mut(id)
            .ok_or_else(|| status_error(Code::NOT_FOUND, format!("task {id} does not exist")))?;
        let mut proc = task.procs.remove(exec_id).ok_or_else(|| {
            status_error(
                Code::NOT_FOUND,
                format!("task {id} has no process {exec_id:?}"),
            )
        })?;
        let result = f(task, &mut proc);
        task.procs.insert(exec_id.to_owned(), proc);
        result
    }

    fn root_of(&self, id: &str) -> TtrpcResult<PathBuf> {
        self.lock()
            .tasks
            .get(id)
            .map(|t| t.root.clone())
            .ok_or_else(|| status_error(Code::NOT_FOUND, format!("task {id} does not exist")))
    }

    fn console_socket(&self, root: &Path) -> PathBuf {
        let mut tasks = self.lock();
        tasks.made += 1;
        root.join(format!("console-{}.sock", tasks.made))
    }

    /// A thread waits for `monitor`, the monitor of process `exec_id` of
    /// task `id`, and records and publishes its exit.
    fn wait_for(&self, id: &str, exec_id: &str, mut monitor: Monitor) {
        let this = self.clone();
        let (id, exec_id) = (id.to_owned(), exec_id.to_owned());
        std::thread::spawn(move || {
            let status = match monitor.wait() {
                Ok(s) => s
                    .code()
                    .or_else(|| std::os::unix::process::ExitStatusExt::signal(&s).map(|n| 128 + n))
                    .unwrap_or(128 + libc::SIGKILL),
                Err(_) => 128 + libc::SIGKILL,
            };
            this.exited(&id, &exec_id, status as u32);
        });
    }

    fn exited(&self, id: &str, exec_id: &str, status: u32) {
        let at = now();
        let mut publish = None;
        let mut oom_root = None;
        {
            let mut tasks = self.lock();
            if let Some(task) = tasks.tasks.get_mut(id)
                && let Some(proc) = task.procs.get_mut(exec_id)
            {
                proc.life = Life::Stopped;
                proc.exit = Some((status, at.clone()));
                if let Some(pump) = proc.pump.take() {
                    pump.close();
                }
                if exec_id.is_empty() {
                    oom_root = Some(task.root.clone());
                    task.paused = false;
                }
                if proc.starting {
                    proc.exit_held = true;
                } else {
                    publish = Some(proc.pid);
                }
            }
        }
        self.0.changed.notify_all();
        // The guest's OOM killer, as containerd learns of it: before the
        // exit (CRI takes the reason `OOMKilled` from it).
        if let Some(root) = oom_root
            && husk_runtime::state::ContainerState::load(&root, id)
                .ok()
                .and_then(|s| s.oom_kills)
                .unwrap_or(0)
                > 0
        {
            self.publish(
                topics::TASK_OOM_EVENT_TOPIC,
                Box::new(TaskOOM {
                    container_id: id.to_owned(),
                    ..Default::default()
                }),
            );
        }
        if let Some(pid) = publish {
            self.publish_exit(id, exec_id, pid, status, at);
        }
    }

    fn publish_exit(&self, id: &str, exec_id: &str, pid: u32, status: u32, at: Timestamp) {
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: id.to_owned(),
                id: if exec_id.is_empty() { id } else { exec_id }.to_owned(),
                pid,
                exit_status: status,
                exited_at: Some(at).into(),
                ..Default::default()
            }),
        );
    }

    fn create_task(&self, req: &CreateTaskRequest) -> TtrpcResult<u32> {
        container::check_id(&req.id).map_err(lifecycle)?;
        if self.lock().tasks.contains_key(&req.id) {
            return Err(status_error(
                Code::ALREADY_EXISTS,
                format!("task {} already exists", req.id),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let pod = self.pod_of(&bundle, &req.id)?;
        let sandbox = pod == Some(Pod::Sandbox);
        let rootfs = bundle.join("rootfs");
        let mut mounted_rootfs = false;
        if req.rootfs.len() > 1 {
            return Err(status_error(
                Code::INVALID_ARGUMENT,
                format!(
                    "task {} has {} root filesystem mounts; husk takes one",
                    req.id,
                    req.rootfs.len()
                ),
            ));
        }
        for m in &req.rootfs {
            mount_rootfs(m, &rootfs).map_err(|e| status_error(Code::UNKNOWN, e))?;
            mounted_rootfs = true;
        }
        let undo_mount = || {
            if mounted_rootfs {
                let _ = rustix::mount::unmount(&rootfs, rustix::mount::UnmountFlags::DETACH);
            }
        };
        let root = crate::husk_root(&bundle);
        let made = husk_runtime::private::root(&root).and_then(|()| {
            self.start_init(req, &bundle, &root, pod)
                .map_err(|e| e.to_string())
        });
        match made {
            Ok((pid, monitor, proc)) => {
                let mut procs = HashMap::new();
                procs.insert(String::new(), proc);
                self.lock().tasks.insert(
                    req.id.clone(),
                    Task {
                        bundle,
                        root,
                        mounted_rootfs,
                        sandbox,
                        paused: false,
                        procs,
                    },
                );
                self.wait_for(&req.id, "", monitor);
                Ok(pid)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&root);
                undo_mount();
                Err(status_error(Code::UNKNOWN, e))
            }
        }
    }

    /// The task's VM and monitor, with its stdio.
    /// Task `id`'s place in its pod: a container of a pod is made in the
    /// VM of its sandbox, which this shim must hold.
    fn pod_of(&self, bundle: &Path, id: &str) -> TtrpcResult<Option<Pod>> {
        let role = role(bundle, id).map_err(|e| status_error(Code::INVALID_ARGUMENT, e))?;
        let tasks = self.lock();
        let sandbox_held = tasks
            .tasks
            .iter()
            .find(|(_, t)| t.sandbox)
            .map(|(k, _)| k.clone());
        match role {
            Role::Alone => Ok(None),
            Role::Sandbox => match sandbox_held {
                Some(other) => Err(status_error(
                    Code::FAILED_PRECONDITION,
                    format!("this shim serves pod {other}: sandbox {id} needs a shim of its own"),
                )),
                None => Ok(Some(Pod::Sandbox)),
            },
            Role::Member(sandbox) => match tasks.tasks.get(&sandbox) {
                Some(t) if t.sandbox => Ok(Some(Pod::Member {
                    root: t.root.clone(),
                    sandbox,
                })),
                _ => Err(status_error(
                    Code::NOT_FOUND,
                    format!("pod {sandbox} has no sandbox in this shim"),
                )),
            },
        }
    }

    fn start_init(
        &self,
        req: &CreateTaskRequest,
        bundle: &Path,
        root: &Path,
        pod: Option<Pod>,
    ) -> Result<(u32, Monitor, Proc), ttrpc::Error> {
        let paths = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let socket = self.console_socket(root);
        let opened = stdio::open(&paths, &socket).map_err(|e| status_error(Code::UNKNOWN, e))?;
        let checkpoint = (!req.checkpoint.is_empty()).then(|| PathBuf::from(&req.checkpoint));
        let console_path = opened.console.as_ref().map(|c| c.path.clone());
        let monitor = container::create(&container::CreateOptions {
            root,
            id: &req.id,
            bundle,
            pid_file: None,
            console_socket: console_path.as_deref(),
            detach: true,
            restore: checkpoint.as_deref(),
            stdio: Some(opened.monitor_stdio()),
            pod,
        })
        .map_err(lifecycle)?;
        let mut proc = Proc::new(paths);
        proc.pid = monitor.id();
        proc.pump = opened.pump;
        if let Some(console) = opened.console {
            match console.attach() {
                Ok((console, pump)) => {
                    proc.console = Some(console);
                    proc.pump = pump;
                }
                Err(e) => {
                    let _ = container::delete(root, &req.id, true);
                    return Err(status_error(Code::UNKNOWN, e));
                }
            }
        }
        if checkpoint.is_some() {
            // Restored: its process runs already.
            proc.life = Life::Running;
        }
        Ok((monitor.id(), monitor, proc))
    }

    fn start_exec(&self, id: &str, exec_id: &str) -> TtrpcResult<u32> {
        let (root, process, paths, guest_id) = self.with_proc(id, exec_id, |task, proc| {
            if proc.life != Life::Created {
                return Err(status_error(
                    Code::FAILED_PRECONDITION,
                    format!("exec {exec_id} of {id} was started already"),
                ));
            }
            let process = proc
                .process
                .take()
                .ok_or_else(|| status_error(Code::FAILED_PRECONDITION, "exec has no process"))?;
            proc.starting = true;
            Ok((
                task.root.clone(),
                process,
                proc.stdio.clone(),
                proc.guest_id.clone(),
            ))
        })?;
        let socket = self.console_socket(&root);
        let started = stdio::open(&paths, &socket).and_then(|opened| {
            let console_path = opened.console.as_ref().map(|c| c.path.clone());
            let monitor = container::start_exec(
                &root,
                id,
                &guest_id,
                process,
                console_path.as_deref(),
                Some(opened.monitor_stdio()),
            )
            .map_err(|(said, _)| said.trim().to_owned())?;
            let (console, pump) = match opened.console {
                Some(c) => {
                    let (console, pump) = c.attach()?;
                    (Some(console), pump)
                }
                None => (None, opened.pump),
            };
            Ok((monitor, console, pump))
        });
        match started {
            Ok((monitor, console, pump)) => {
                let pid = monitor.id();
                self.with_proc(id, exec_id, |_, proc| {
                    proc.pid = pid;
                    proc.life = Life::Running;
                    proc.console = console;
                    proc.pump = pump;
                    Ok(())
                })?;
                self.wait_for(id, exec_id, monitor);
                Ok(pid)
            }
            Err(e) => {
                let _ = self.with_proc(id, exec_id, |_, proc| {
                    proc.starting = false;
                    proc.life = Life::Stopped;
                    proc.exit = Some((1, now()));
                    Ok(())
                });
                Err(status_error(Code::UNKNOWN, e))
            }
        }
    }

    /// After a start was published: an exit held back is published now.
    fn started(&self, id: &str, exec_id: &str) {
        let held = self
            .with_proc(id, exec_id, |_, proc| {
                proc.starting = false;
                Ok(if std::mem::take(&mut proc.exit_held) {
                    proc.exit.clone().map(|(s, at)| (proc.pid, s, at))
                } else {
                    None
                })
            })
            .ok()
            .flatten();
        if let Some((pid, status, at)) = held {
            self.publish_exit(id, exec_id, pid, status, at);
        }
    }

    fn delete_task(&self, id: &str) -> TtrpcResult<DeleteResponse> {
        let task = {
            let mut tasks = self.lock();
            let task = tasks.tasks.get(id).ok_or_else(|| {
                status_error(Code::NOT_FOUND, format!("task {id} does not exist"))
            })?;
            let init = &task.procs[""];
            if init.life == Life::Running {
                return Err(status_error(
                    Code::FAILED_PRECONDITION,
                    format!("task {id} is running: kill it first"),
                ));
            }
            tasks.tasks.remove(id).expect("looked up above")
        };
        let init = &task.procs[""];
        // A created task that never started: its VM goes with it.
        container::delete(&task.root, id, true).map_err(lifecycle)?;
        let _ = std::fs::remove_dir_all(&task.root);
        if task.mounted_rootfs {
            let _ = rustix::mount::unmount(
                task.bundle.join("rootfs"),
                rustix::mount::UnmountFlags::DETACH,
            );
        }
        let (status, at) = init
            .exit
            .clone()
            .unwrap_or((128 + libc::SIGKILL as u32, now()));
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: id.to_owned(),
                pid: init.pid,
                exit_status: status,
                exited_at: Some(at.clone()).into(),
                ..Default::default()
            }),
        );
        Ok(DeleteResponse {
            pid: init.pid,
            exit_status: status,
            exited_at: Some(at).into(),
            ..Default::default()
        })
    }
}

fn any_json<T: serde::de::DeserializeOwned>(
    any: &containerd_shim::protos::protobuf::MessageField<
        containerd_shim::protos::protobuf::well_known_types::any::Any,
    >,
    what: &str,
) -> TtrpcResult<T> {
    let value = any
        .as_ref()
        .map(|a| a.value.as_slice())
        .ok_or_else(|| status_error(Code::INVALID_ARGUMENT, format!("no {what} given")))?;
    serde_json::from_slice(value).map_err(|e| {
        status_error(
            Code::INVALID_ARGUMENT,
            format!("the {what} is not valid JSON of its OCI type: {e}"),
        )
    })
}

impl containerd_shim::Task for Service {
    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        self.with_proc(&req.id, &req.exec_id, |task, proc| {
            let status = match proc.life {
                Life::Created => Status::CREATED,
                Life::Running if task.paused => Status::PAUSED,
                Life::Running => Status::RUNNING,
                Life::Stopped => Status::STOPPED,
            };
            let (exit_status, exited_at) = proc.exit.clone().unwrap_or((0, Timestamp::new()));
            Ok(StateResponse {
                id: req.id.clone(),
                bundle: task.bundle.display().to_string(),
                pid: proc.pid,
                status: status.into(),
                stdin: proc.stdio.stdin.clone(),
                stdout: proc.stdio.stdout.clone(),
                stderr: proc.stdio.stderr.clone(),
                terminal: proc.stdio.terminal,
                exit_status,
                exited_at: proc.exit.as_ref().map(|_| exited_at).into(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        })
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let pid = self.create_task(&req)?;
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = if req.exec_id.is_empty() {
            let (root, pid, already) = self.with_proc(&req.id, "", |task, proc| {
                if proc.life == Life::Stopped {
                    return Err(status_error(
                        Code::FAILED_PRECONDITION,
                        format!("task {} has stopped", req.id),
                    ));
                }
                let already = proc.life == Life::Running;
                proc.starting = true;
                Ok((task.root.clone(), proc.pid, already))
            })?;
            if !already && let Err(e) = container::start(&root, &req.id) {
                self.started(&req.id, "");
                return Err(lifecycle(e));
            }
            let _ = self.with_proc(&req.id, "", |_, proc| {
                if proc.life == Life::Created {
                    proc.life = Life::Running;
                }
                Ok(())
            });
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
            pid
        } else {
            let pid = self.start_exec(&req.id, &req.exec_id)?;
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
            pid
        };
        self.started(&req.id, &req.exec_id);
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        if req.exec_id.is_empty() {
            return self.delete_task(&req.id);
        }
        let mut tasks = self.lock();
        let task = tasks.tasks.get_mut(&req.id).ok_or_else(|| {
            status_error(Code::NOT_FOUND, format!("task {} does not exist", req.id))
        })?;
        match task.procs.get(&req.exec_id) {
            None => Err(status_error(
                Code::NOT_FOUND,
                format!("task {} has no exec {}", req.id, req.exec_id),
            )),
            Some(p) if p.life == Life::Running => Err(status_error(
                Code::FAILED_PRECONDITION,
                format!("exec {} is running", req.exec_id),
            )),
            Some(_) => {
                let p = task.procs.remove(&req.exec_id).expect("looked up above");
                let (status, at) = p.exit.unwrap_or((0, now()));
                Ok(DeleteResponse {
                    pid: p.pid,
                    exit_status: status,
                    exited_at: Some(at).into(),
                    ..Default::default()
                })
            }
        }
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let root = self.root_of(&req.id)?;
        let pids = container::ps(&root, &req.id).map_err(lifecycle)?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid: pid as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        let root = self.root_of(&req.id)?;
        container::pause(&root, &req.id, true).map_err(lifecycle)?;
        if let Some(t) = self.lock().tasks.get_mut(&req.id) {
            t.paused = true;
        }
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        );
        Ok(Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        let root = self.root_of(&req.id)?;
        container::pause(&root, &req.id, false).map_err(lifecycle)?;
        if let Some(t) = self.lock().tasks.get_mut(&req.id) {
            t.paused = false;
        }
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        );
        Ok(Empty::new())
    }

    fn checkpoint(&self, _ctx: &TtrpcContext, req: CheckpointTaskRequest) -> TtrpcResult<Empty> {
        let root = self.root_of(&req.id)?;
        let exit = match req.options.as_ref() {
            Some(any) if !any.value.is_empty() => {
                CheckpointOptions::parse_from_bytes(&any.value)
                    .map_err(|e| {
                        status_error(
                            Code::INVALID_ARGUMENT,
                            format!("the checkpoint options are not runc's CheckpointOptions: {e}"),
                        )
                    })?
                    .exit
            }
            _ => false,
        };
        if req.path.is_empty() {
            return Err(status_error(
                Code::INVALID_ARGUMENT,
                "a checkpoint needs a path",
            ));
        }
        husk_runtime::checkpoint::checkpoint(&root, &req.id, Path::new(&req.path), !exit, None)
            .map_err(|e| status_error(Code::UNKNOWN, husk_runtime::error_chain(&e)))?;
        Ok(Empty::new())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let (root, guest_id) =
            self.with_proc(&req.id, &req.exec_id, |task, proc| match proc.life {
                Life::Stopped => Err(status_error(Code::NOT_FOUND, "process already finished")),
                Life::Created if !req.exec_id.is_empty() => Err(status_error(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} was not started", req.exec_id),
                )),
                _ => Ok((task.root.clone(), proc.guest_id.clone())),
            })?;
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| {
                status_error(
                    Code::INVALID_ARGUMENT,
                    format!("{} is not a signal", req.signal),
                )
            })?;
        match container::kill_process(&root, &req.id, &guest_id, signal, req.all) {
            Ok(()) => {
                if signal == libc::SIGKILL && req.exec_id.is_empty() {
                    self.watch_kill(root, req.id.clone());
                }
                Ok(Empty::new())
            }
            // SIGKILL is final: a guest that does not answer has its VM
            // killed (and a container of a pod, its monitor).
            Err(e) if signal == libc::SIGKILL && req.exec_id.is_empty() => {
                log::warn!(
                    "task {}'s guest did not take SIGKILL ({}): its VM is killed",
                    req.id,
                    husk_runtime::error_chain(&e)
                );
                container::kill_vm(&root, &req.id).map_err(lifecycle)?;
                Ok(Empty::new())
            }
            // It ended while the signal was on its way.
            Err(e) if self.has_stopped(&req.id, &req.exec_id) => Err(status_error(
                Code::NOT_FOUND,
                format!(
                    "process already finished ({})",
                    husk_runtime::error_chain(&e)
                ),
            )),
            Err(e) => Err(lifecycle(e)),
        }
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let oci: oci_spec::runtime::Process = any_json(&req.spec, "exec's process")?;
        let spec = oci_spec::runtime::SpecBuilder::default()
            .process(oci)
            .build()
            .map_err(|e| status_error(Code::INVALID_ARGUMENT, e.to_string()))?;
        let process = husk_runtime::bundle::process_of(&spec);
        {
            let mut tasks = self.lock();
            let task = tasks.tasks.get_mut(&req.id).ok_or_else(|| {
                status_error(Code::NOT_FOUND, format!("task {} does not exist", req.id))
            })?;
            if req.exec_id.is_empty() || task.procs.contains_key(&req.exec_id) {
                return Err(status_error(
                    Code::ALREADY_EXISTS,
                    format!("exec {:?} of {} already exists", req.exec_id, req.id),
                ));
            }
            if task.procs[""].life != Life::Running {
                return Err(status_error(
                    Code::FAILED_PRECONDITION,
                    format!("task {} is not running", req.id),
                ));
            }
            let mut proc = Proc::new(Paths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            });
            proc.process = Some(process);
            tasks.made += 1;
            proc.guest_id = format!("{}.{}", req.exec_id, tasks.made);
            let task = tasks.tasks.get_mut(&req.id).expect("looked up above");
            task.procs.insert(req.exec_id.clone(), proc);
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.with_proc(&req.id, &req.exec_id, |_, proc| match &proc.console {
            Some(console) => console
                .resize(req.width, req.height)
                .map_err(|e| status_error(Code::UNKNOWN, e)),
            None => Err(status_error(
                Code::FAILED_PRECONDITION,
                "the process has no terminal",
            )),
        })?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        self.with_proc(&req.id, &req.exec_id, |_, proc| {
            if let Some(pump) = proc.pump.take() {
                pump.close();
            }
            Ok(())
        })?;
        Ok(Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let root = self.root_of(&req.id)?;
        let resources: oci_spec::runtime::LinuxResources = any_json(&req.resources, "resources")?;
        container::update(&root, &req.id, &resources).map_err(lifecycle)?;
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let mut tasks = self.lock();
        loop {
            let proc = tasks
                .tasks
                .get(&req.id)
                .and_then(|t| t.procs.get(&req.exec_id))
                .ok_or_else(|| {
                    status_error(
                        Code::NOT_FOUND,
                        format!("task {} has no process {:?}", req.id, req.exec_id),
                    )
                })?;
            if let Some((status, at)) = &proc.exit {
                return Ok(WaitResponse {
                    exit_status: *status,
                    exited_at: Some(at.clone()).into(),
                    ..Default::default()
                });
            }
            tasks = self.0.changed.wait(tasks).expect("task table lock");
        }
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let root = self.root_of(&req.id)?;
        let s = container::stats(&root, &req.id).map_err(lifecycle)?;
        let mut m = cgroups_v2::metrics::Metrics::new();
        m.cpu.mut_or_insert_default().usage_usec = s.cpu_ns / 1000;
        let memory = m.memory.mut_or_insert_default();
        memory.usage = s.memory_bytes;
        memory.usage_limit = s.memory_limit.unwrap_or(u64::MAX);
        m.pids.mut_or_insert_default().current = s.pids;
        m.memory_events.mut_or_insert_default().oom_kill = s.oom_kills;
        let any = containerd_shim::util::convert_to_any(Box::new(m))
            .map_err(|e| status_error(Code::INTERNAL, e.to_string()))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self
            .lock()
            .tasks
            .get(&req.id)
            .and_then(|t| t.procs.get(""))
            .map(|p| p.pid)
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        // containerd asks after each task's delete: the shim ends with its
        // last task.
        if self.lock().tasks.is_empty() {
            self.0.exit.signal();
        }
        Ok(Empty::new())
    }
}

/// How long a SIGKILLed task's process may take to be reported gone
/// before its VM (or, for a container of a pod, its monitor) is killed.
const KILL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl Service {
    /// A SIGKILL is final: a task whose guest does not report its end
    /// within [`KILL_GRACE`] (a guest that stopped answering) has its VM
    /// killed, so that its exit comes and containerd's wait ends.
    fn watch_kill(&self, root: PathBuf, id: String) {
        let this = self.clone();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + KILL_GRACE;
            let mut tasks = this.lock();
            while !tasks
                .tasks
                .get(&id)
                .and_then(|t| t.procs.get(""))
                .is_none_or(|p| p.life == Life::Stopped)
            {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    drop(tasks);
                    log::warn!("task {id} outlived SIGKILL by {KILL_GRACE:?}: its VM is killed");
                    let _ = container::kill_vm(&root, &id);
                    return;
                }
                tasks = this
                    .0
                    .changed
                    .wait_timeout(tasks, left)
                    .expect("task table lock")
                    .0;
            }
        });
    }

    fn has_stopped(&self, id: &str, exec_id: &str) -> bool {
        self.lock()
            .tasks
            .get(id)
            .and_then(|t| t.procs.get(exec_id))
            .is_none_or(|p| p.life == Life::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(annotations: serde_json::Value) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "husk-shim-grouping-{}-{}",
            std::process::id(),
            annotations.to_string().len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            serde_json::json!({ "annotations": annotations }).to_string(),
        )
        .unwrap();
        dir
    }

    #[test]
    fn a_pods_containers_join_their_sandboxs_shim() {
        let sandbox = bundle_with(serde_json::json!({
            CONTAINER_TYPE: "sandbox", SANDBOX_ID: "pod1"
        }));
        assert_eq!(
            grouping(&sandbox, "pod1").unwrap(),
            Grouping {
                group: "pod1".into(),
                joins: false
            }
        );
        let member = bundle_with(serde_json::json!({
            CONTAINER_TYPE: "container", SANDBOX_ID: "pod1", "x": "padding"
        }));
        assert_eq!(
            grouping(&member, "c1").unwrap(),
            Grouping {
                group: "pod1".into(),
                joins: true
            }
        );
        let plain = bundle_with(serde_json::json!({}));
        assert_eq!(
            grouping(&plain, "t").unwrap(),
            Grouping {
                group: "t".into(),
                joins: false
            }
        );
        for d in [sandbox, member, plain] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn a_container_naming_no_pod_or_a_bad_one_is_refused() {
        let orphan = bundle_with(serde_json::json!({ CONTAINER_TYPE: "container" }));
        let e = grouping(&orphan, "c1").unwrap_err();
        assert!(e.contains("names no pod"), "{e}");
        let bad = bundle_with(serde_json::json!({
            CONTAINER_TYPE: "container", SANDBOX_ID: "../../etc", "pad": "dd"
        }));
        let e = grouping(&bad, "c1").unwrap_err();
        assert!(e.contains("../../etc"), "{e}");
        let missing = std::env::temp_dir().join("husk-shim-no-such-bundle");
        let e = grouping(&missing, "c1").unwrap_err();
        assert!(e.contains("config.json"), "{e}");
        std::fs::remove_dir_all(orphan).unwrap();
        std::fs::remove_dir_all(bad).unwrap();
    }
}
