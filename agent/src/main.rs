//! husk-agent: PID 1 of a Husk guest.
//!
//! It mounts /proc, /sys, /dev and /dev/pts, listens on vsock for the
//! runtime ([`husk_protocol::CONTROL_PORT`] for requests, [`STDIO_PORT`] for
//! stdio streams), and runs containers: `create` mounts the container's root
//! filesystem from the virtio-fs share [`husk_protocol::ROOTFS_TAG`] and
//! turns the OCI spec into a start plan (`container.rs`); `start` forks the
//! container's process, which builds its namespaces and mount tree, pivots
//! into its root and takes its identity before exec (`setup.rs`); `exec`
//! runs further processes inside the same namespaces. The agent reaps every
//! process (orphans included: it is PID 1), reports exit statuses as a shell
//! does (128 + N for a signal), and powers the guest off when told to.
//!
//! The agent never comes from a container image: the runtime packs it into
//! the initramfs.

mod cgroup;
mod container;
mod setup;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};

use husk_protocol::{
    CONTROL_PORT, CloneSeed, Process, READY_PORT, Request, Response, STDIO_PORT, StdioAttach,
    Stream, handshake, read_frame, vsock, write_frame,
};
use oci_spec::runtime::Spec;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

use setup::Plan;

/// A process the agent started: its PID and the stdio ends not yet
/// attached.
#[derive(Default)]
struct Proc {
    pid: i32,
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    /// The terminal's master side, for a process with a terminal.
    terminal: Option<File>,
    /// Output read from stdout, stderr or the terminal whose host end went
    /// away before it was delivered: the next attach of that stream gets
    /// it first.
    held: HashMap<Stream, Vec<u8>>,
    /// The process's own ends, made at `create`, used at `start`.
    child_stdio: Option<[File; 3]>,
    /// The status it was given when it could not be started.
    failed: Option<i32>,
}

/// A process's stdio: the agent's ends in a [`Proc`], and the child's.
fn make_stdio(terminal: bool, stdin_null: bool) -> std::io::Result<(Proc, [File; 3])> {
    let mut proc = Proc::default();
    if stdin_null && !terminal {
        let (mut proc, [_, out, err]) = make_stdio(false, false)?;
        proc.stdin = None;
        return Ok((proc, [File::open("/dev/null")?, out, err]));
    }
    if terminal {
        let (master, slave) = openpty()?;
        proc.terminal = Some(master);
        return Ok((proc, [slave.try_clone()?, slave.try_clone()?, slave]));
    }
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    proc.stdin = Some(in_w);
    proc.stdout = Some(out_r);
    proc.stderr = Some(err_r);
    Ok((proc, [in_r, out_w, err_w]))
}

/// A created container.
struct Container {
    /// The plan for its process, until `start` uses it.
    plan: Option<Plan>,
    process: Process,
    /// Whether it has a PID namespace of its own.
    pid_ns: bool,
    /// Its process, once started.
    init: Option<i32>,
}

/// How a process's PID namespace is set.
enum PidNs {
    /// The agent's own.
    Guest,
    /// A new one (the container's process).
    New,
    /// The running container's (an exec).
    Join(OwnedFd),
}

#[derive(Default)]
struct Agent {
    containers: Mutex<HashMap<String, Container>>,
    procs: Mutex<HashMap<String, Proc>>,
    /// Exit statuses by PID, from the reaper.
    exits: Mutex<HashMap<i32, i32>>,
    exited: Condvar,
    /// Held while a process is spawned, so the reaper does not collect a
    /// child whose exec failed before std's own waitpid does.
    spawning: Mutex<()>,
}

fn log(line: &str) {
    eprintln!("husk-agent: {line}");
}

fn mount(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let flags = rustix::mount::MountFlags::empty();
    if let Err(e) = rustix::mount::mount(source, target, fstype, flags, None) {
        log(&format!(
            "cannot mount {fstype} on {target}: {}",
            std::io::Error::from(e)
        ));
    }
}

fn key(id: &str, exec_id: &str) -> String {
    format!("{id}/{exec_id}")
}

/// A pipe whose both ends close on exec.
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

fn pipe() -> std::io::Result<(File, File)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    Ok((File::from(r), File::from(w)))
}

/// A new pseudo-terminal: (master, slave).
fn openpty() -> std::io::Result<(File, File)> {
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open("/dev/ptmx")?;
    rustix::pty::unlockpt(&master)?;
    // `/dev/pts/N`, from TIOCGPTN.
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(std::ffi::OsStr::from_bytes(name.as_bytes()))?;
    Ok((master, slave))
}

/// The status a shell reports when `program` cannot be executed.
fn not_started_status(e: &std::io::Error) -> i32 {
    match e.raw_os_error() {
        Some(libc::ENOENT) => 127,
        Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EISDIR) => 126,
        _ => 1,
    }
}

impl Agent {
    /// Forks `process` with `plan` applied before exec; records it under
    /// `key`.
    fn spawn(
        &self,
        key: &str,
        process: &Process,
        plan: Plan,
        pid_ns: PidNs,
        [stdin, stdout, stderr]: [File; 3],
    ) -> Result<i32, Response> {
        let failed = |message: String, status| Response::NotStarted { message, status };
        let Some((program, args)) = process.args.split_first() else {
            return Err(failed("the process has no args".into(), 1));
        };
        let (mut err_r, err_w) = pipe().map_err(|e| failed(format!("pipe: {e}"), 1))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(process.env.iter().filter_map(|kv| kv.split_once('=')));
        cmd.stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let last_cap = setup::kernel_last_cap();
        // SAFETY: the closure runs in the forked child before exec and
        // makes only system calls (setup.rs).
        unsafe {
            cmd.pre_exec(move || setup::apply(&plan, last_cap, err_w.as_fd()));
        }
        // The PID namespace is a property of the thread that forks: a
        // short-lived thread takes it, so the agent's own threads keep the
        // guest's.
        let spawned = std::thread::scope(|s| {
            s.spawn(|| {
                match &pid_ns {
                    PidNs::Guest => Ok(()),
                    // SAFETY: a new PID namespace only, no CLONE_FILES: this
                    // thread keeps the agent's descriptor table.
                    PidNs::New => unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWPID) },
                    PidNs::Join(fd) => rustix::thread::move_into_link_name_space(
                        fd.as_fd(),
                        Some(LinkNameSpaceType::ProcessID),
                    ),
                }?;
                let _guard = self.spawning.lock().unwrap();
                cmd.spawn()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawning thread panicked")))
        });
        // The command holds the child's stdio ends and the error pipe's
        // write end: closed here, so the agent's ends see EOF when the
        // process is done with them.
        drop(cmd);
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let mut why = String::new();
                let _ = err_r.read_to_string(&mut why);
                let response = if why.is_empty() {
                    failed(format!("exec {program}: {e}"), not_started_status(&e))
                } else {
                    failed(why, 1)
                };
                if let Response::NotStarted { status, .. } = &response
                    && let Some(proc) = self.procs.lock().unwrap().get_mut(key)
                {
                    proc.failed = Some(*status);
                }
                self.notify_exited();
                return Err(response);
            }
        };
        let pid = child.id() as i32;
        // The reaper collects it: std's Child is dropped without a wait.
        drop(child);
        if let Some(proc) = self.procs.lock().unwrap().get_mut(key) {
            proc.pid = pid;
        }
        self.notify_exited();
        Ok(pid)
    }

    fn create(&self, id: String, spec: &str, process: Process) -> Response {
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
        let (pid_ns, mut plan) = match container::namespaces(&spec).and_then(|(_, pid)| {
            container::mount_rootfs(&rootfs, false)?;
            Ok((pid, container::create_plan(&spec, &rootfs, &process)?))
        }) {
            Ok(made) => made,
            Err(e) => return error(e),
        };
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
        self.procs.lock().unwrap().insert(key(&id, ""), proc);
        self.containers.lock().unwrap().insert(
            id,
            Container {
                plan: Some(plan),
                process,
                pid_ns,
                init: None,
            },
        );
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
            (plan, c.process.clone(), c.pid_ns)
        };
        let ns = if pid_ns { PidNs::New } else { PidNs::Guest };
        let stdio = self
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
        match self.spawn(&key(id, ""), &process, plan, ns, stdio) {
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
        if self.procs.lock().unwrap().contains_key(&k) {
            return Response::Error {
                message: format!("process {exec_id:?} exists in container {id:?}"),
            };
        }
        let stdio = |process: &Process| -> Result<[File; 3], Response> {
            let (proc, ends) =
                make_stdio(process.terminal, process.stdin_null).map_err(|e| Response::Error {
                    message: format!("stdio: {e}"),
                })?;
            self.procs.lock().unwrap().insert(k.clone(), proc);
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
                self.spawn(&k, &process, plan, PidNs::Guest, stdio(&process)?)
            })
        } else {
            let (init, pid_ns) = {
                let containers = self.containers.lock().unwrap();
                match containers.get(id) {
                    Some(Container {
                        init: Some(pid),
                        pid_ns,
                        ..
                    }) => (*pid, *pid_ns),
                    _ => {
                        return Response::Error {
                            message: format!("container {id:?} is not running"),
                        };
                    }
                }
            };
            if self.status_of(init).is_some() {
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
            ] {
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
                        ..Default::default()
                    };
                    self.spawn(&k, &process, plan, ns, stdio(&process)?)
                })
        };
        match result {
            Ok(_) => Response::Ok,
            Err(response) => response,
        }
    }

    fn status_of(&self, pid: i32) -> Option<i32> {
        self.exits.lock().unwrap().get(&pid).copied()
    }

    /// Waits for a process to exit; a container's own process may not have
    /// been started yet (the host waits from `create` on). One that could
    /// not be started is reported with the status it was given.
    fn wait(&self, id: &str, exec_id: &str) -> Response {
        // The exits lock is held from the checks until the wait begins, and
        // whoever changes a process's pid or failure notifies under it
        // (`notify_exited`), so no wake-up falls between the two: the wait
        // needs no timeout, and an idle guest stays idle (a 50 ms poll here
        // cost a fifth of a host core per container where kernel mode is
        // emulated). Lock order: exits, then procs.
        let mut exits = self.exits.lock().unwrap();
        loop {
            let Some((pid, failed)) = self
                .procs
                .lock()
                .unwrap()
                .get(&key(id, exec_id))
                .map(|p| (p.pid, p.failed))
            else {
                return Response::Error {
                    message: format!("no process {exec_id:?} in container {id:?}"),
                };
            };
            if let Some(status) = failed {
                return Response::Exited { status };
            }
            if pid > 0
                && let Some(&status) = exits.get(&pid)
            {
                return Response::Exited { status };
            }
            exits = self.exited.wait(exits).unwrap();
        }
    }

    /// Wakes `wait`ers after a process's pid or failure changed; called
    /// with no procs lock held (lock order: exits, then procs).
    fn notify_exited(&self) {
        let _exits = self.exits.lock().unwrap();
        self.exited.notify_all();
    }

    /// The guest PIDs of the container's processes.
    fn ps(&self, id: &str) -> Response {
        // Two statements: the containers lock is released before status_of
        // takes the exits lock (signal holds procs, then containers; wait
        // holds exits, then procs).
        let init = self.containers.lock().unwrap().get(id).and_then(|c| c.init);
        let init = init.filter(|&pid| self.status_of(pid).is_none());
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
            let mut procs = self.procs.lock().unwrap();
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
                    self.notify_exited();
                }
                return Response::Ok;
            }
        }
        // Two statements: the procs lock is released before status_of takes
        // the exits lock (lock order: exits, then procs).
        let pid = self
            .procs
            .lock()
            .unwrap()
            .get(&key(id, exec_id))
            .map(|p| p.pid);
        let Some(pid) = pid.filter(|&pid| pid > 0 && self.status_of(pid).is_none()) else {
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
        let procs = self.procs.lock().unwrap();
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

    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Create { id, spec, process } => self.create(id, &spec, process),
            Request::Clone(seed) => match make_clone_unique(&seed) {
                Ok(()) => Response::Ok,
                Err(message) => Response::Error { message },
            },
            Request::Start { id } => self.start(&id),
            Request::Exec {
                id,
                exec_id,
                process,
            } => self.exec(&id, &exec_id, process),
            Request::Wait { id, exec_id } => self.wait(&id, &exec_id),
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

    /// Collects every exited child (orphans of containers included) and
    /// wakes the waiters. SIGCHLD is blocked in every thread and read from
    /// `signals`.
    fn reap_forever(&self, mut signals: File) {
        let mut info = [0u8; 128];
        loop {
            {
                let _guard = self.spawning.lock().unwrap();
                let mut reaped = Vec::new();
                while let Ok(Some((pid, status))) =
                    rustix::process::wait(rustix::process::WaitOptions::NOHANG)
                {
                    let (pid, status) = (pid.as_raw_pid(), status.as_raw());
                    let code = if libc::WIFSIGNALED(status) {
                        128 + libc::WTERMSIG(status)
                    } else {
                        libc::WEXITSTATUS(status)
                    };
                    reaped.push((pid, code));
                }
                if !reaped.is_empty() {
                    self.exits.lock().unwrap().extend(reaped);
                    self.exited.notify_all();
                }
            }
            if signals.read(&mut info).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// `RNDADDENTROPY`: mix bytes into the pool, crediting entropy.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: reseed the CRNG from the pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Makes this guest differ from every other restored from the same
/// snapshot: the host's entropy and 64 bytes from the virtio-rng device
/// (fresh per VM) mixed into the RNG, which is reseeded at once, and the
/// wall clock set to the host's.
fn make_clone_unique(clone: &CloneSeed) -> Result<(), String> {
    let mut seed = clone.entropy.clone();
    // The device's bytes are a bonus: never wait on them for long.
    if let Ok(hwrng) = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/hwrng")
    {
        let mut buf = [0u8; 64];
        let mut pfd = [PollFd::new(&hwrng, PollFlags::IN)];
        let timeout = Timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        if rustix::event::poll(&mut pfd, Some(&timeout)).is_ok_and(|n| n > 0)
            && let Ok(n) = (&hwrng).read(&mut buf)
        {
            seed.extend_from_slice(&buf[..n]);
        }
    }
    if seed.is_empty() {
        return Err(
            "no entropy to reseed the guest with: neither the host's nor /dev/hwrng".into(),
        );
    }
    // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(&seed);
    info.resize(info.len().next_multiple_of(4), 0);
    let random = File::options()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("open /dev/urandom: {e}"))?;
    // SAFETY: the ioctls read a rand_pool_info of the stated size, and
    // take no argument.
    unsafe {
        if libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) < 0
            || libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) < 0
        {
            return Err(format!(
                "reseed the guest's RNG: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    if clone.realtime_ns > 0 {
        let now = rustix::time::Timespec {
            tv_sec: (clone.realtime_ns / 1_000_000_000) as _,
            tv_nsec: (clone.realtime_ns % 1_000_000_000) as _,
        };
        rustix::time::clock_settime(rustix::time::ClockId::Realtime, now)
            .map_err(|e| format!("set the guest's clock: {}", std::io::Error::from(e)))?;
    }
    Ok(())
}

/// Every process whose mount namespace is `pid`'s (the container's
/// processes: `kill --all`).
fn processes_sharing_mounts(pid: i32) -> Vec<i32> {
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).ok();
    let Some(target) = ns(&pid.to_string()) else {
        return vec![pid];
    };
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p != 1 && ns(&p.to_string()).as_ref() == Some(&target))
        .collect();
    if !pids.contains(&pid) {
        pids.push(pid);
    }
    pids
}

fn serve_control(mut conn: File, agent: Arc<Agent>) {
    if let Err(e) = handshake(&mut conn, concat!("husk-agent ", env!("CARGO_PKG_VERSION"))) {
        log(&format!("control connection refused: {e}"));
        return;
    }
    while let Ok(request) = read_frame::<_, Request>(&mut conn) {
        let response = agent.handle(request);
        if write_frame(&mut conn, &response).is_err() {
            return;
        }
    }
}

fn pump(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Copies a process's output (`end`: a pipe, or a terminal's master) to
/// the host connection `conn`, `pending` first. Returns true once the
/// process's side has ended; false when the host's end went away first
/// (its monitor ended, or this guest was restored from a checkpoint and
/// the connection reset): `pending` then holds what was read and not
/// delivered, and the end stays the process's for the next attach.
fn deliver(end: &File, pending: &mut Vec<u8>, conn: &File) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !pending.is_empty() {
            if (&*conn).write_all(pending).is_err() {
                return false;
            }
            pending.clear();
        }
        let mut fds = [
            PollFd::new(end, PollFlags::IN),
            PollFd::new(conn, PollFlags::RDHUP),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            // Kept for the next attach rather than lost.
            Err(_) => return false,
        }
        if fds[1]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
        {
            return false;
        }
        if !fds[0].revents().is_empty() {
            match (&*end).read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A terminal's master reads EIO once every process holding
                // the slave has exited: the output has all been delivered.
                Err(_) => return true,
            }
        }
    }
}

fn serve_stdio(mut conn: File, agent: Arc<Agent>) {
    let Ok(attach) = read_frame::<_, StdioAttach>(&mut conn) else {
        return;
    };
    let k = key(&attach.id, &attach.exec_id);
    let (end, mut pending) = {
        let mut procs = agent.procs.lock().unwrap();
        let Some(proc) = procs.get_mut(&k) else {
            return;
        };
        let end = match attach.stream {
            Stream::Stdout => proc.stdout.take(),
            Stream::Stderr => proc.stderr.take(),
            Stream::Stdin => proc.stdin.take(),
            Stream::Terminal => proc.terminal.as_ref().and_then(|t| t.try_clone().ok()),
        };
        (end, proc.held.remove(&attach.stream).unwrap_or_default())
    };
    let Some(end) = end else {
        return;
    };
    let delivered = match attach.stream {
        Stream::Stdout | Stream::Stderr => deliver(&end, &mut pending, &conn),
        Stream::Stdin => {
            pump(&conn, end);
            return;
        }
        Stream::Terminal => {
            let (input, output) = match (conn.try_clone(), end.try_clone()) {
                (Ok(c), Ok(e)) => (c, e),
                _ => return,
            };
            std::thread::spawn(move || pump(input, output));
            deliver(&end, &mut pending, &conn)
        }
    };
    if !delivered {
        // The host's end went first: the stream waits for its next attach.
        let mut procs = agent.procs.lock().unwrap();
        if let Some(proc) = procs.get_mut(&k) {
            match attach.stream {
                Stream::Stdout => proc.stdout = Some(end),
                Stream::Stderr => proc.stderr = Some(end),
                _ => {}
            }
            proc.held.insert(attach.stream, pending);
        }
        return;
    }
    let _ = rustix::net::shutdown(&conn, rustix::net::Shutdown::Write);
}

/// Tells the VMM the agent is ready: a connection to the host's ready
/// port, which the VMM answers with a reset (and may snapshot the guest
/// right there: a restored agent continues from this call).
fn signal_ready() {
    // Refused by design; only the attempt matters.
    let _ = vsock::connect(vsock::HOST_CID, READY_PORT);
}

fn listen_forever(listener: OwnedFd, port: u32, agent: Arc<Agent>, serve: fn(File, Arc<Agent>)) {
    loop {
        match vsock::accept(&listener) {
            Ok(conn) => {
                let agent = agent.clone();
                std::thread::spawn(move || serve(conn, agent));
            }
            Err(e) => log(&format!("accept on port {port}: {e}")),
        }
    }
}

/// Blocks SIGCHLD in this thread (and so in every thread made after) and
/// returns a descriptor that reads it.
fn sigchld_fd() -> std::io::Result<File> {
    // SAFETY: the signal set is initialised before use; signalfd returns a
    // new descriptor owned by the File.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(File::from_raw_fd(fd))
    }
}

/// Moves the agent's root from the initramfs (the kernel's rootfs, which
/// pivot_root cannot leave) to a bind mount of it, so that a container's
/// process can pivot_root into its own root and detach the guest's.
fn leave_rootfs() -> std::io::Result<()> {
    let _ = std::fs::create_dir("/.root");
    // Every step is taken, in order, before the first failure is reported.
    for (r, what) in [
        (rustix::mount::mount_bind(c"/", c"/.root"), "bind"),
        (rustix::process::chdir(c"/.root"), "chdir"),
        (rustix::mount::mount_move(c".", c"/"), "move"),
        (rustix::process::chroot(c"."), "chroot"),
        (rustix::process::chdir(c"/"), "chdir"),
    ] {
        if let Err(e) = r {
            let e = std::io::Error::from(e);
            return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
        }
    }
    Ok(())
}

fn main() {
    if std::process::id() == 1 {
        if let Err(e) = leave_rootfs() {
            log(&format!("cannot leave the initramfs root: {e}"));
        }
        mount("proc", "/proc", "proc");
        mount("sysfs", "/sys", "sysfs");
        if let Err(e) = cgroup::init() {
            log(&format!("no cgroups for containers: {e}"));
        }
        mount("devtmpfs", "/dev", "devtmpfs");
        mount("devpts", "/dev/pts", "devpts");
        mount("tmpfs", "/run", "tmpfs");
    }
    let agent = Arc::new(Agent::default());
    match sigchld_fd() {
        Ok(signals) => {
            let agent = agent.clone();
            std::thread::spawn(move || agent.reap_forever(signals));
        }
        Err(e) => log(&format!("cannot watch for exited processes: {e}")),
    }
    let (control, stdio) = match (vsock::listen(CONTROL_PORT), vsock::listen(STDIO_PORT)) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => {
            log(&format!("cannot listen on vsock: {e}"));
            return;
        }
    };
    let stdio = {
        let agent = agent.clone();
        std::thread::spawn(move || listen_forever(stdio, STDIO_PORT, agent, serve_stdio))
    };
    log(&format!(
        "listening on vsock ports {CONTROL_PORT} and {STDIO_PORT}"
    ));
    signal_ready();
    listen_forever(control, CONTROL_PORT, agent, serve_control);
    let _ = stdio.join();
}
