//! The process table: every process the agent started, by container and
//! exec ID, with its stdio ends until the host attaches them; spawning
//! (the fork, the PID namespace, the reasons a process could not start),
//! and exit reporting: one reaper collects every child (orphans included,
//! as PID 1 must) and wakes whoever waits.
//!
//! Containers and their plans live in `server.rs`, which decides what
//! runs; `stdio.rs` moves the bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex};

use husk_protocol::{Process, Response, Stream};
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

use crate::setup::{self, Plan};

/// A process the agent started: its PID and the stdio ends not yet
/// attached.
#[derive(Default)]
pub(crate) struct Proc {
    pub(crate) pid: i32,
    pub(crate) stdin: Option<File>,
    pub(crate) stdout: Option<File>,
    pub(crate) stderr: Option<File>,
    /// The terminal's master side, for a process with a terminal.
    pub(crate) terminal: Option<File>,
    /// Output read from stdout, stderr or the terminal whose host end went
    /// away before it was delivered: the next attach of that stream gets
    /// it first.
    pub(crate) held: HashMap<Stream, Vec<u8>>,
    /// The process's own ends, made at `create`, used at `start`.
    pub(crate) child_stdio: Option<[File; 3]>,
    /// The status it was given when it could not be started.
    pub(crate) failed: Option<i32>,
    /// When it was spawned, on the table's clock ([`Processes`]): an exit
    /// of its PID reaped before then is an earlier process's.
    pub(crate) spawned: u64,
}

/// How a process's PID namespace is set.
pub(crate) enum PidNs {
    /// The agent's own.
    Guest,
    /// A new one (the container's process).
    New,
    /// The running container's (an exec).
    Join(OwnedFd),
}

/// The agent's processes and their exit statuses.
#[derive(Default)]
pub(crate) struct Processes {
    /// By [`key`].
    pub(crate) procs: Mutex<HashMap<String, Proc>>,
    /// Exit statuses by PID, from the reaper, each with when it was
    /// reaped. PIDs come round again: a status counts for a process only
    /// when it was reaped after the process was spawned. (At most one
    /// entry per PID the kernel can give.)
    exits: Mutex<HashMap<i32, (i32, u64)>>,
    /// The clock of spawns and reaps, moved under `spawning`.
    clock: std::sync::atomic::AtomicU64,
    /// Execs whose exit a `wait` reported, oldest first: past
    /// [`FINISHED_KEPT`] the oldest leave the table, so a container that
    /// is exec'd into for ever (a liveness probe) does not grow it for
    /// ever. Lock order: exits, finished, procs.
    finished: Mutex<std::collections::VecDeque<String>>,
    exited: Condvar,
    /// Held while a process is spawned, so the reaper does not collect a
    /// child whose exec failed before std's own waitpid does.
    spawning: Mutex<()>,
}

/// How many finished execs the table keeps (a `wait` sent again, as after
/// a lost answer, still finds a recent one).
const FINISHED_KEPT: usize = 256;

/// A process's name in the table: its container's ID and its exec ID
/// (empty for the container's own process).
pub(crate) fn key(id: &str, exec_id: &str) -> String {
    format!("{id}/{exec_id}")
}

/// The status a shell reports when `program` cannot be executed.
fn not_started_status(e: &std::io::Error) -> i32 {
    match e.raw_os_error() {
        Some(libc::ENOENT) => 127,
        Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EISDIR) => 126,
        _ => 1,
    }
}

impl Processes {
    /// Forks `process` with `plan` applied before exec; records it under
    /// `key`.
    pub(crate) fn spawn(
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
        // The error pipe: both ends close on exec.
        let (err_r, err_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| failed(format!("pipe: {}", std::io::Error::from(e)), 1))?;
        let mut err_r = File::from(err_r);
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(process.env.iter().filter_map(|kv| kv.split_once('=')));
        cmd.stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let last_cap = setup::kernel_last_cap();
        // A user namespace: the child's end of the socket goes in the plan,
        // the agent's to a thread that writes the maps while the spawn
        // waits for the exec.
        let mut plan = plan;
        let mapper = match plan.userns.as_mut() {
            Some(userns) => {
                let (agent_end, child_end) = rustix::net::socketpair(
                    rustix::net::AddressFamily::UNIX,
                    rustix::net::SocketType::SEQPACKET,
                    rustix::net::SocketFlags::CLOEXEC,
                    None,
                )
                .map_err(|e| failed(format!("socketpair: {}", std::io::Error::from(e)), 1))?;
                userns.sock = Some(child_end);
                Some((agent_end, userns.uid_map.clone(), userns.gid_map.clone()))
            }
            None => None,
        };
        // SAFETY: the closure runs in the forked child before exec and
        // makes only system calls (setup.rs).
        unsafe {
            cmd.pre_exec(move || setup::apply(&plan, last_cap, err_w.as_fd()));
        }
        // The PID namespace is a property of the thread that forks: a
        // short-lived thread takes it, so the agent's own threads keep the
        // guest's.
        let spawned = std::thread::scope(|s| {
            if let Some((sock, uid_map, gid_map)) = mapper {
                s.spawn(move || setup::write_maps(sock, &uid_map, &gid_map));
            }
            s.spawn(move || {
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
                let spawned = cmd.spawn().map(|child| (child, self.tick()));
                // The command holds the child's stdio ends, the error
                // pipe's write end and the user namespace's socket end:
                // closed here, so the agent's ends see EOF when the
                // process is done with them (and the map writer ends).
                drop(cmd);
                spawned
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawning thread panicked")))
        });
        let (child, spawned) = match spawned {
            Ok(spawned) => spawned,
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
            proc.spawned = spawned;
        }
        self.notify_exited();
        Ok(pid)
    }

    /// The next tick of the table's clock (called under `spawning`).
    fn tick(&self) -> u64 {
        self.clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// The exit status of `proc`, if its own process was reaped.
    fn exit_of(exits: &HashMap<i32, (i32, u64)>, proc: &Proc) -> Option<i32> {
        match exits.get(&proc.pid) {
            Some(&(status, reaped)) if proc.pid > 0 && reaped > proc.spawned => Some(status),
            _ => None,
        }
    }

    /// The PID of process `key` while it runs (started, not reaped).
    pub(crate) fn running_pid(&self, key: &str) -> Option<i32> {
        // Lock order: exits, then procs.
        let exits = self.exits.lock().unwrap();
        let procs = self.procs.lock().unwrap();
        let proc = procs.get(key)?;
        (proc.pid > 0 && Self::exit_of(&exits, proc).is_none()).then_some(proc.pid)
    }

    /// Waits for a process to exit; a container's own process may not have
    /// been started yet (the host waits from `create` on). One that could
    /// not be started is reported with the status it was given.
    pub(crate) fn wait(&self, id: &str, exec_id: &str) -> Response {
        // The exits lock is held from the checks until the wait begins, and
        // whoever changes a process's pid or failure notifies under it
        // (`notify_exited`), so no wake-up falls between the two: the wait
        // needs no timeout, and an idle guest stays idle (a 50 ms poll here
        // cost a fifth of a host core per container where kernel mode is
        // emulated). Lock order: exits, then procs.
        let mut exits = self.exits.lock().unwrap();
        loop {
            let Some(status) = self
                .procs
                .lock()
                .unwrap()
                .get(&key(id, exec_id))
                .map(|p| p.failed.or_else(|| Self::exit_of(&exits, p)))
            else {
                return Response::Error {
                    message: format!("no process {exec_id:?} in container {id:?}"),
                };
            };
            if let Some(status) = status {
                if !exec_id.is_empty() {
                    self.finish(key(id, exec_id));
                }
                return Response::Exited {
                    status,
                    oom_kills: None,
                };
            }
            exits = self.exited.wait(exits).unwrap();
        }
    }

    /// Records that exec `key`'s exit was reported; the oldest finished
    /// execs past [`FINISHED_KEPT`] leave the table (called with the
    /// exits lock held, no other).
    fn finish(&self, key: String) {
        let mut finished = self.finished.lock().unwrap();
        if finished.back() != Some(&key) {
            finished.push_back(key);
        }
        while finished.len() > FINISHED_KEPT {
            if let Some(old) = finished.pop_front()
                && !finished.contains(&old)
            {
                self.procs.lock().unwrap().remove(&old);
            }
        }
    }

    /// Forgets every process of container `id` (it was removed).
    pub(crate) fn forget(&self, id: &str) {
        let prefix = key(id, "");
        self.finished
            .lock()
            .unwrap()
            .retain(|k| !k.starts_with(&prefix));
        self.procs
            .lock()
            .unwrap()
            .retain(|k, _| !k.starts_with(&prefix));
        self.notify_exited();
    }

    /// Wakes `wait`ers after a process's pid or failure changed; called
    /// with no procs lock held (lock order: exits, then procs).
    pub(crate) fn notify_exited(&self) {
        let _exits = self.exits.lock().unwrap();
        self.exited.notify_all();
    }

    /// Collects every exited child (orphans of containers included) and
    /// wakes the waiters. SIGCHLD is blocked in every thread and read from
    /// `signals`.
    pub(crate) fn reap_forever(&self, mut signals: File) {
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
                    reaped.push((pid, (code, self.tick())));
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

/// Every process whose mount namespace is `pid`'s (the container's
/// processes: `kill --all`).
pub(crate) fn processes_sharing_mounts(pid: i32) -> Vec<i32> {
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

/// Blocks SIGCHLD in this thread (and so in every thread made after) and
/// returns a descriptor that reads it.
pub(crate) fn sigchld_fd() -> std::io::Result<File> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_that_comes_round_again_is_not_taken_for_exited() {
        let table = Processes::default();
        let k = key("c", "e2");
        // An earlier process had PID 42 and was reaped at tick 2; the new
        // one got 42 at tick 5.
        table.exits.lock().unwrap().insert(42, (3, 2));
        table.procs.lock().unwrap().insert(
            k.clone(),
            Proc {
                pid: 42,
                spawned: 5,
                ..Default::default()
            },
        );
        assert_eq!(table.running_pid(&k), Some(42));
        // Its own exit, reaped at tick 9, counts.
        table.exits.lock().unwrap().insert(42, (7, 9));
        assert_eq!(table.running_pid(&k), None);
        assert_eq!(
            table.wait("c", "e2"),
            Response::Exited {
                status: 7,
                oom_kills: None
            }
        );
        assert!(matches!(table.wait("c", "none"), Response::Error { .. }));
        // One that could not start is reported with its status.
        table.procs.lock().unwrap().insert(
            key("c", "bad"),
            Proc {
                failed: Some(127),
                ..Default::default()
            },
        );
        assert_eq!(
            table.wait("c", "bad"),
            Response::Exited {
                status: 127,
                oom_kills: None
            }
        );
        assert_eq!(table.running_pid(&key("c", "bad")), None);
    }

    #[test]
    fn finished_execs_leave_the_table_past_the_last_few() {
        let table = Processes::default();
        let n = FINISHED_KEPT + 50;
        for i in 0..n {
            let exec = format!("probe-{i}");
            table.procs.lock().unwrap().insert(
                key("c", &exec),
                Proc {
                    failed: Some(0),
                    ..Default::default()
                },
            );
            assert_eq!(
                table.wait("c", &exec),
                Response::Exited {
                    status: 0,
                    oom_kills: None
                }
            );
            // Asked again (a lost answer): still there.
            assert_eq!(
                table.wait("c", &exec),
                Response::Exited {
                    status: 0,
                    oom_kills: None
                }
            );
        }
        // The container's own process is never dropped.
        table.procs.lock().unwrap().insert(
            key("c", ""),
            Proc {
                failed: Some(1),
                ..Default::default()
            },
        );
        assert_eq!(
            table.wait("c", ""),
            Response::Exited {
                status: 1,
                oom_kills: None
            }
        );
        let procs = table.procs.lock().unwrap();
        assert_eq!(procs.len(), FINISHED_KEPT + 1);
        assert!(procs.contains_key(&key("c", &format!("probe-{}", n - 1))));
        assert!(!procs.contains_key(&key("c", "probe-0")));
        assert!(procs.contains_key(&key("c", "")));
    }
}
