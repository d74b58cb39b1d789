//! The control port's requests: containers (`create`, `start`, `exec`,
//! `signal`, `ps`, `update`, ...), the guest's network (`network`, applied
//! in `net.rs`) and their dispatch. A request is answered with one
//! response; what runs is started through the process table
//! (`processes.rs`).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use husk_protocol::{Join, Process, Request, Response};
use oci_spec::runtime::Spec;
use rustix::thread::LinkNameSpaceType;

use crate::processes::{PidNs, Processes, key, processes_sharing_mounts};
use crate::setup::Plan;
use crate::stdio::make_stdio;
use crate::{cgroup, container, net, reseed, seccomp};

/// A created container.
struct Container {
    /// The plan for its process, until `start` uses it.
    plan: Option<Plan>,
    process: Process,
    /// Whether it has a PID namespace of its own (or its pod's).
    pid_ns: bool,
    /// The PID namespace it joins (its pod sandbox's), until `start`.
    pid_join: Option<OwnedFd>,
    /// Its process, once started.
    init: Option<i32>,
    /// Its seccomp program, for the processes exec'd in it too (as runc's).
    seccomp: Option<Arc<seccomp::Program>>,
    /// Whether it has a user namespace of its own (exec'd processes join
    /// it last).
    userns: bool,
}

/// The agent's state: its containers and its processes.
#[derive(Default)]
pub(crate) struct Agent {
    containers: Mutex<HashMap<String, Container>>,
    pub(crate) processes: Processes,
    /// The guest's network interfaces, by slot.
    links: net::Links,
}

/// The container's `cgroup.procs`, open for the child to join with.
fn cgroup_procs(id: &str) -> Result<OwnedFd, String> {
    let path = cgroup::dir(id).join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map(OwnedFd::from)
        .map_err(|e| format!("open {}: {e}", path.display()))
}

impl Agent {
    /// The namespaces of running container `join.container` that a new
    /// container joins, opened; and its PID namespace where that is one.
    fn joined(&self, join: &Join) -> Result<(Plan, Option<OwnedFd>), String> {
        let init = self
            .containers
            .lock()
            .unwrap()
            .get(&join.container)
            .and_then(|c| c.init)
            .filter(|&pid| self.processes.running_pid(&key(&join.container, "")) == Some(pid))
            .ok_or_else(|| format!("container {:?} is not running", join.container))?;
        let open = |ns: &str| {
            File::open(format!("/proc/{init}/ns/{ns}"))
                .map(OwnedFd::from)
                .map_err(|e| format!("container {:?}'s {ns} namespace: {e}", join.container))
        };
        let mut plan = Plan::default();
        let mut pid = None;
        for ns in &join.namespaces {
            match ns.as_str() {
                "ipc" => plan
                    .join
                    .push((open(ns)?, LinkNameSpaceType::InterProcessCommunication)),
                "uts" => plan
                    .join
                    .push((open(ns)?, LinkNameSpaceType::HostNameAndNISDomainName)),
                "pid" => pid = Some(open(ns)?),
                other => return Err(format!("the {other} namespace cannot be shared")),
            }
        }
        Ok((plan, pid))
    }

    fn create(
        &self,
        id: String,
        spec: &str,
        process: Process,
        root: Option<String>,
        join: Option<Join>,
    ) -> Response {
        let error = |message: String| Response::Error { message };
        if self.containers.lock().unwrap().contains_key(&id) {
            return error(format!("container {id:?} exists"));
        }
        let spec: Spec = match serde_json::from_str(spec) {
            Ok(spec) => spec,
            Err(e) => return error(format!("the OCI spec is not valid: {e}")),
        };
        let rootfs = match container::rootfs_of(&id) {
            Ok(r) => r,
            Err(e) => return error(e),
        };
        let (joined, pid_join) = match join.as_ref().map(|j| self.joined(j)).transpose() {
            Ok(Some((plan, pid))) => (plan.join, pid),
            Ok(None) => (Vec::new(), None),
            Err(e) => return error(e),
        };
        let joined_names = join.map(|j| j.namespaces).unwrap_or_default();
        let (pid_ns, mut plan) = match container::namespaces(&spec).and_then(|(_, pid)| {
            match &root {
                Some(from) => container::bind_rootfs(from, &rootfs)?,
                None => container::mount_rootfs(&rootfs, false)?,
            }
            Ok((
                pid || pid_join.is_some(),
                container::create_plan(&spec, &rootfs, &process, &joined_names)?,
            ))
        }) {
            Ok(made) => made,
            Err(e) => return error(e),
        };
        plan.join = joined;
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        match cgroup::create(&id, resources).and_then(|()| cgroup_procs(&id)) {
            Ok(fd) => plan.cgroup = Some(fd),
            Err(e) => return error(format!("the container's resources: {e}")),
        }
        // The container's stdio exists from now on: the host attaches to
        // it before `start`, as runc's `create` hands its stdio over.
        let (mut proc, child_ends) = match make_stdio(process.terminal, process.stdin_null) {
            Ok(made) => made,
            Err(e) => return error(format!("the container's stdio: {e}")),
        };
        proc.child_stdio = Some(child_ends);
        self.processes
            .procs
            .lock()
            .unwrap()
            .insert(key(&id, ""), proc);
        self.containers.lock().unwrap().insert(
            id,
            Container {
                seccomp: plan.seccomp.clone(),
                userns: plan.userns.is_some(),
                plan: Some(plan),
                process,
                pid_ns,
                pid_join,
                init: None,
            },
        );
        Response::Ok
    }

    /// Container `id`'s end in a guest that goes on: its processes
    /// killed, its root unmounted, its cgroup and table entries removed.
    fn remove(&self, id: &str) -> Response {
        let Some(c) = self.containers.lock().unwrap().remove(id) else {
            return Response::Error {
                message: format!("no container {id:?}"),
            };
        };
        if let Some(init) = c.init {
            for pid in processes_sharing_mounts(init) {
                // SAFETY: kill takes no pointers.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // What the container's processes left in its cgroup (an exec's).
        let _ = std::fs::write(cgroup::dir(id).join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(cgroup::dir(id)).is_ok() || !cgroup::dir(id).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if let Ok(rootfs) = container::rootfs_of(id) {
            let _ = rustix::mount::unmount(rootfs.as_str(), rustix::mount::UnmountFlags::DETACH);
            let _ = std::fs::remove_dir(&rootfs);
            let _ = std::fs::remove_dir(format!("/run/husk/{id}"));
        }
        self.processes.forget(id);
        Response::Ok
    }

    fn start(&self, id: &str) -> Response {
        let (plan, process, pid_ns) = {
            let mut containers = self.containers.lock().unwrap();
            let Some(c) = containers.get_mut(id) else {
                return Response::Error {
                    message: format!("no container {id:?}"),
                };
            };
            let Some(plan) = c.plan.take() else {
                return Response::Error {
                    message: format!("container {id:?} has already been started"),
                };
            };
            (plan, c.process.clone(), (c.pid_join.take(), c.pid_ns))
        };
        let ns = match pid_ns {
            (Some(fd), _) => PidNs::Join(fd),
            (None, true) => PidNs::New,
            (None, false) => PidNs::Guest,
        };
        let stdio = self
            .processes
            .procs
            .lock()
            .unwrap()
            .get_mut(&key(id, ""))
            .and_then(|p| p.child_stdio.take());
        let Some(stdio) = stdio else {
            return Response::Error {
                message: format!("container {id:?} has no stdio"),
            };
        };
        match self
            .processes
            .spawn(&key(id, ""), &process, plan, ns, stdio)
        {
            Ok(pid) => {
                if let Some(c) = self.containers.lock().unwrap().get_mut(id) {
                    c.init = Some(pid);
                }
                Response::Ok
            }
            Err(response) => response,
        }
    }

    fn exec(&self, id: &str, exec_id: &str, process: Process) -> Response {
        let plan_for = |process: &Process| {
            container::process_plan(process).map_err(|message| Response::Error { message })
        };
        let k = key(id, exec_id);
        if self.processes.procs.lock().unwrap().contains_key(&k) {
            return Response::Error {
                message: format!("process {exec_id:?} exists in container {id:?}"),
            };
        }
        let stdio = |process: &Process| -> Result<[File; 3], Response> {
            let (proc, ends) =
                make_stdio(process.terminal, process.stdin_null).map_err(|e| Response::Error {
                    message: format!("stdio: {e}"),
                })?;
            self.processes.procs.lock().unwrap().insert(k.clone(), proc);
            Ok(ends)
        };
        let result = if id.is_empty() {
            // The guest itself (the agent's own root): for the runtime's
            // checks and the tests of the agent.
            plan_for(&process).and_then(|p| {
                let plan = Plan {
                    terminal: process.terminal,
                    process: Some(p),
                    ..Default::default()
                };
                self.processes
                    .spawn(&k, &process, plan, PidNs::Guest, stdio(&process)?)
            })
        } else {
            let (init, pid_ns, seccomp, userns) = {
                let containers = self.containers.lock().unwrap();
                match containers.get(id) {
                    Some(Container {
                        init: Some(pid),
                        pid_ns,
                        seccomp,
                        userns,
                        ..
                    }) => (*pid, *pid_ns, seccomp.clone(), *userns),
                    _ => {
                        return Response::Error {
                            message: format!("container {id:?} is not running"),
                        };
                    }
                }
            };
            if self.processes.running_pid(&key(id, "")) != Some(init) {
                return Response::Error {
                    message: format!("container {id:?} has stopped"),
                };
            }
            let open = |ns: &str| {
                File::open(format!("/proc/{init}/ns/{ns}"))
                    .map(OwnedFd::from)
                    .map_err(|e| Response::Error {
                        message: format!("container {id:?}'s {ns} namespace: {e}"),
                    })
            };
            let mut join = Vec::new();
            let mut plan_result = Ok(());
            for (ns, kind) in [
                ("ipc", LinkNameSpaceType::InterProcessCommunication),
                ("uts", LinkNameSpaceType::HostNameAndNISDomainName),
                ("net", LinkNameSpaceType::Network),
                ("cgroup", LinkNameSpaceType::ControlGroup),
                ("mnt", LinkNameSpaceType::Mount),
                // Last: the others are the guest root's, joined with its
                // capabilities.
                ("user", LinkNameSpaceType::User),
            ]
            .into_iter()
            .filter(|&(ns, _)| ns != "user" || userns)
            {
                match open(ns) {
                    Ok(fd) => join.push((fd, kind)),
                    Err(e) => {
                        plan_result = Err(e);
                        break;
                    }
                }
            }
            plan_result
                .and_then(|()| {
                    let ns = if pid_ns {
                        PidNs::Join(open("pid")?)
                    } else {
                        PidNs::Guest
                    };
                    Ok((plan_for(&process)?, ns))
                })
                .and_then(|(p, ns)| {
                    let plan = Plan {
                        join,
                        cgroup: cgroup_procs(id).ok(),
                        terminal: process.terminal,
                        process: Some(p),
                        seccomp,
                        ..Default::default()
                    };
                    self.processes
                        .spawn(&k, &process, plan, ns, stdio(&process)?)
                })
        };
        match result {
            Ok(_) => Response::Ok,
            Err(response) => response,
        }
    }

    /// The guest PIDs of the container's processes.
    fn ps(&self, id: &str) -> Response {
        // Two statements: the containers lock is released before
        // running_pid takes the exits lock (signal holds procs, then
        // containers; wait holds exits, then procs).
        let init = self.containers.lock().unwrap().get(id).and_then(|c| c.init);
        let init = init.filter(|&pid| self.processes.running_pid(&key(id, "")) == Some(pid));
        match init {
            Some(pid) => Response::Pids {
                pids: processes_sharing_mounts(pid),
            },
            None => Response::Pids { pids: Vec::new() },
        }
    }

    fn signal(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> Response {
        // A container created but never started: a signal that would end
        // its process ends it before it runs (its waiters learn 128 + N).
        if exec_id.is_empty() {
            let mut procs = self.processes.procs.lock().unwrap();
            if let Some(proc) = procs.get_mut(&key(id, exec_id))
                && proc.pid == 0
                && proc.failed.is_none()
            {
                if [
                    libc::SIGKILL,
                    libc::SIGTERM,
                    libc::SIGINT,
                    libc::SIGHUP,
                    libc::SIGQUIT,
                ]
                .contains(&signal)
                {
                    proc.failed = Some(128 + signal);
                    proc.child_stdio = None;
                    if let Some(c) = self.containers.lock().unwrap().get_mut(id) {
                        c.plan = None;
                    }
                    drop(procs);
                    self.processes.notify_exited();
                }
                return Response::Ok;
            }
        }
        // No procs lock is held here: running_pid takes exits, then procs
        // (the lock order).
        let Some(pid) = self.processes.running_pid(&key(id, exec_id)) else {
            return Response::Error {
                message: format!("no running process {exec_id:?} in container {id:?}"),
            };
        };
        let targets = if all {
            processes_sharing_mounts(pid)
        } else {
            vec![pid]
        };
        for target in targets {
            // SAFETY: kill takes no pointers.
            if unsafe { libc::kill(target, signal) } != 0 && target == pid {
                return Response::Error {
                    message: format!("signal {signal}: {}", std::io::Error::last_os_error()),
                };
            }
        }
        Response::Ok
    }

    fn resize(&self, id: &str, exec_id: &str, rows: u16, cols: u16) -> Response {
        let procs = self.processes.procs.lock().unwrap();
        let Some(term) = procs
            .get(&key(id, exec_id))
            .and_then(|p| p.terminal.as_ref())
        else {
            return Response::Error {
                message: format!("process {exec_id:?} in container {id:?} has no terminal"),
            };
        };
        let size = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        match rustix::termios::tcsetwinsize(term, size) {
            Ok(()) => Response::Ok,
            Err(e) => Response::Error {
                message: format!("resize: {}", std::io::Error::from(e)),
            },
        }
    }

    /// Answers one request of the control port.
    pub(crate) fn handle(&self, request: Request) -> Response {
        match request {
            Request::Create {
                id,
                spec,
                process,
                root,
                join,
            } => self.create(id, &spec, process, root, join),
            Request::Remove { id } => self.remove(&id),
            Request::Clone(seed) => match reseed::make_clone_unique(&seed) {
                Ok(()) => Response::Ok,
                Err(message) => Response::Error { message },
            },
            Request::Start { id } => self.start(&id),
            // `inline_output` is the connection's (main.rs), not the
            // process's.
            Request::Exec {
                id,
                exec_id,
                process,
                inline_output: _,
            } => self.exec(&id, &exec_id, process),
            Request::Wait { id, exec_id } => match self.processes.wait(&id, &exec_id) {
                // A container's own process: its OOM kills come with its
                // end (no `Stats` round trip after it).
                Response::Exited { status, .. } if exec_id.is_empty() => Response::Exited {
                    status,
                    oom_kills: cgroup::oom_kills(&id),
                },
                other => other,
            },
            Request::Signal {
                id,
                exec_id,
                signal,
                all,
            } => self.signal(&id, &exec_id, signal, all),
            Request::ResizeTerminal {
                id,
                exec_id,
                rows,
                cols,
            } => self.resize(&id, &exec_id, rows, cols),
            Request::Shutdown => {
                rustix::fs::sync();
                // A power-off that works does not return.
                match rustix::system::reboot(rustix::system::RebootCommand::PowerOff) {
                    Ok(()) => Response::Ok,
                    Err(e) => Response::Error {
                        message: format!("power-off failed: {}", std::io::Error::from(e)),
                    },
                }
            }
            Request::Network { interfaces } => match self.links.configure(&interfaces) {
                Ok(()) => Response::Ok,
                Err(message) => Response::Error { message },
            },
            Request::Ps { id } => self.ps(&id),
            Request::Stats { id } => match cgroup::stats(&id) {
                Ok(stats) => Response::Stats(stats),
                Err(message) => Response::Error { message },
            },
            Request::Update { id, resources } => {
                if !self.containers.lock().unwrap().contains_key(&id) {
                    return Response::Error {
                        message: format!("no container {id:?}"),
                    };
                }
                match serde_json::from_str::<oci_spec::runtime::LinuxResources>(&resources) {
                    Ok(r) => match cgroup::apply(&id, &r) {
                        Ok(()) => Response::Ok,
                        Err(message) => Response::Error { message },
                    },
                    Err(e) => Response::Error {
                        message: format!("the resources are not valid: {e}"),
                    },
                }
            }
        }
    }
}
