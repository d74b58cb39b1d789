//! The monitor: the host process that stands for a container's process
//! (or an exec'd one) on the host, as runc's init process does.
//!
//! `husk create` starts it detached (its own session) with the stdio it
//! was given; it is the PID in `husk state`, in `--pid-file`, and what
//! containerd's shim waits for. For a container it restores the VM (the
//! VMM is its child and dies with it), makes the guest its own, has the
//! agent create the container, attaches the container's stdio, reports
//! "ready" to `create` on the pipe at fd 3, then waits for the container's
//! process to exit, records the status, powers the VM off and exits with
//! that status. For an exec it does the same around one process of a
//! running container.
//!
//! Stdio: the monitor's own stdin, stdout and stderr are the process's
//! (pipes to the guest), or one terminal: with `--console-socket` a host
//! pseudo-terminal whose master goes to that socket (SCM_RIGHTS, as runc
//! does) and whose slave the monitor joins to the guest's terminal, else
//! the monitor's own stdin/stdout (in raw mode when it is a terminal).
//! Size changes of the host side are followed.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::pty::{self, OpenptFlags};
use rustix::termios::{self, OptionalActions, Termios};

use husk_protocol::share::Share;
use husk_protocol::{Process, Request, Response, Stream};

use crate::bundle::Bundle;
use crate::sandbox::{Agent, Control, Sandbox, SandboxError};
use crate::state::{self, ContainerState, HostProcess, Status};
use husk_guest::binaries::Binaries;

/// The descriptor on which the monitor reports readiness to its starter.
pub const READY_FD: RawFd = 3;

/// Where the container's terminal goes.
#[derive(Debug, Clone)]
pub enum Terminal {
    /// No terminal: three pipes.
    None,
    /// A host pty whose master is sent to this Unix socket.
    Socket(PathBuf),
    /// The monitor's own stdin and stdout.
    Inherit,
}

fn copy(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() || to.flush().is_err() {
                    return;
                }
            }
        }
    }
}

/// The host terminal in raw mode until dropped.
struct RawMode(BorrowedFd<'static>, Option<Termios>);

impl RawMode {
    fn enter(fd: BorrowedFd<'static>) -> Self {
        if !termios::isatty(fd) {
            return Self(fd, None);
        }
        let Ok(saved) = termios::tcgetattr(fd) else {
            return Self(fd, None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = termios::tcsetattr(fd, OptionalActions::Now, &raw);
        Self(fd, Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.1 {
            let _ = termios::tcsetattr(self.0, OptionalActions::Now, saved);
        }
    }
}

fn window_size(tty: &File) -> Option<(u16, u16)> {
    let size = termios::tcgetwinsize(tty).ok()?;
    (size.ws_row > 0).then_some((size.ws_row, size.ws_col))
}

/// A new host pseudo-terminal: (master, slave), as openpty(3) makes them.
fn host_pty() -> std::io::Result<(File, File)> {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY;
    let master = pty::openpt(flags)?;
    pty::grantpt(&master)?;
    pty::unlockpt(&master)?;
    let slave = match pty::ioctl_tiocgptpeer(&master, flags) {
        Ok(slave) => slave,
        // A kernel before 4.13: open the slave by name.
        Err(_) => rustix::fs::open(
            pty::ptsname(&master, Vec::new())?,
            OFlags::RDWR | OFlags::NOCTTY,
            Mode::empty(),
        )?,
    };
    Ok((master.into(), slave.into()))
}

/// Sends `fd` over the Unix socket at `path` (SCM_RIGHTS), as runc sends a
/// container's terminal master to `--console-socket`.
pub fn send_fd(path: &Path, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let sock = UnixStream::connect(path)?;
    husk_sys::fd::send_fd(&sock, fd, b"/dev/ptmx")
}

/// Whether this process's stdin is /dev/null: the guest process then gets
/// its own /dev/null and no stdin stream is attached.
pub fn stdin_is_null() -> bool {
    let Ok(st) = rustix::fs::fstat(rustix::stdio::stdin()) else {
        return false;
    };
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice
        && st.st_rdev == rustix::fs::makedev(1, 3)
}

/// Connects a process's stdio in the guest to the monitor's side; returns
/// the threads that carry output (done when the process's output is).
fn attach_stdio(
    agent: &Agent,
    id: &str,
    exec_id: &str,
    stdin_null: bool,
    terminal: &Terminal,
    resize: impl Fn(u16, u16) + Send + 'static,
    inline: Option<&mut Vec<(UnixStream, File)>>,
) -> Result<Outputs, SandboxError> {
    let io = |e: std::io::Error| SandboxError::Refused(format!("stdio: {e}"));
    let io_errno = |e: rustix::io::Errno| io(e.into());
    match terminal {
        Terminal::None => {
            if !stdin_null {
                let stdin = agent.attach(id, exec_id, Stream::Stdin)?;
                std::thread::spawn(move || {
                    copy(std::io::stdin(), &stdin);
                    let _ = stdin.shutdown(std::net::Shutdown::Write);
                });
            }
            let out = agent.attach(id, exec_id, Stream::Stdout)?;
            let err = agent.attach(id, exec_id, Stream::Stderr)?;
            if let Some(inline) = inline {
                inline.push((
                    out,
                    File::from(rustix::stdio::stdout().try_clone_to_owned().map_err(io)?),
                ));
                inline.push((
                    err,
                    File::from(rustix::stdio::stderr().try_clone_to_owned().map_err(io)?),
                ));
                return Ok(Vec::new());
            }
            Ok(vec![
                std::thread::spawn(move || copy(out, std::io::stdout())),
                std::thread::spawn(move || copy(err, std::io::stderr())),
            ])
        }
        Terminal::Socket(_) | Terminal::Inherit => {
            let conn = agent.attach(id, exec_id, Stream::Terminal)?;
            let (input, output): (File, File) = match terminal {
                Terminal::Socket(path) => {
                    let (master, slave) = host_pty().map_err(io)?;
                    send_fd(path, master.as_fd()).map_err(|e| {
                        SandboxError::Refused(format!(
                            "send the terminal to {}: {e}",
                            path.display()
                        ))
                    })?;
                    drop(master);
                    (slave.try_clone().map_err(io)?, slave)
                }
                _ => {
                    let i = rustix::io::dup(rustix::stdio::stdin()).map_err(io_errno)?;
                    let o = rustix::io::dup(rustix::stdio::stdout()).map_err(io_errno)?;
                    std::mem::forget(RawMode::enter(rustix::stdio::stdin()));
                    (i.into(), o.into())
                }
            };
            // The size of the input's terminal (the host side's).
            let tty = input.try_clone().map_err(io)?;
            let to_guest = conn.try_clone().map_err(io)?;
            std::thread::spawn(move || copy(input, to_guest));
            // Follow the host side's size.
            std::thread::spawn(move || {
                let mut last = None;
                loop {
                    let now = window_size(&tty);
                    if now.is_some() && now != last {
                        if let Some((rows, cols)) = now {
                            resize(rows, cols);
                        }
                        last = now;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            Ok(vec![std::thread::spawn(move || copy(conn, output))])
        }
    }
}

/// The threads that carry a process's output to the host.
type Outputs = Vec<std::thread::JoinHandle<()>>;

/// Reports readiness (`ok`) or what failed to whoever started the monitor.
fn report(result: &Result<(), String>) {
    // SAFETY: fd 3 is the ready pipe's write end the starter gave us, or
    // not open (then the write fails harmlessly).
    let mut ready = unsafe { File::from_raw_fd(READY_FD) };
    let _ = match result {
        Ok(()) => ready.write_all(b"ok\n"),
        Err(e) => ready.write_all(e.as_bytes()),
    };
}

fn resizer(agent_dir: PathBuf, id: String, exec_id: String) -> impl Fn(u16, u16) + Send {
    move |rows, cols| {
        if let Ok(mut c) = Agent::at(&agent_dir).control() {
            let _ = c.ask(&Request::ResizeTerminal {
                id: id.clone(),
                exec_id: exec_id.clone(),
                rows,
                cols,
            });
        }
    }
}

fn wait_status(control: &mut Control, id: &str, exec_id: &str) -> Result<i32, SandboxError> {
    match control.ask(&Request::Wait {
        id: id.into(),
        exec_id: exec_id.into(),
    })? {
        Response::Exited { status } => Ok(status),
        Response::Error { message } | Response::NotStarted { message, .. } => {
            Err(SandboxError::Refused(message))
        }
        other => Err(SandboxError::Refused(format!(
            "unexpected answer {other:?}"
        ))),
    }
}

/// Runs the monitor of container `id`; returns its exit status. With
/// `restore`, a checkpoint's directory, its VM is restored from there and
/// its process is already running.
pub fn container(
    root: &Path,
    bins: &Binaries,
    id: &str,
    terminal: &Terminal,
    restore: Option<&Path>,
) -> i32 {
    let dir = state::dir(root, id);
    let mut phases = crate::timings::Phases::new();
    let set_up = (|| -> Result<(Sandbox, Control, Outputs), String> {
        let mut state = ContainerState::load(root, id).map_err(|e| e.to_string())?;
        let bundle = Bundle::load(&state.bundle).map_err(|e| e.to_string())?;
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).map_err(|e| format!("create {}: {e}", empty.display()))?;
        let (spec_json, volumes) = crate::volumes::plan(&bundle.spec_json, &dir, &empty)?;
        crate::volumes::make_mount_points(&bundle.spec, &bundle.rootfs);
        let mut shares = vec![Share {
            tag: husk_protocol::ROOTFS_TAG.into(),
            dir: bundle.rootfs.clone(),
            read_only: bundle.readonly,
        }];
        shares.extend(volumes);
        let resources = bundle
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref());
        let (shape, snapshot) = match restore {
            Some(checkpoint) => {
                let (at, manifest) =
                    crate::checkpoint::open(checkpoint, id).map_err(|e| format!("{e:#}"))?;
                (manifest.shape, Some(at.join(crate::checkpoint::VM_DIR)))
            }
            None => (husk_guest::shape::Shape::of(resources)?, None),
        };
        let mut sandbox = Sandbox::start(root, bins, &dir, &shares, shape, snapshot.as_deref())
            .map_err(|e| e.to_string())?;
        state.shape = Some(shape);
        phases.mark("vmm_started");
        let explain = |sandbox: &mut Sandbox, e: SandboxError| {
            format!("{:#}", anyhow::Error::from(sandbox.explain(e)))
        };
        let mut control = match sandbox.control() {
            Ok(c) => c,
            Err(e) => return Err(explain(&mut sandbox, e)),
        };
        phases.mark("agent_connected");
        let mut process = bundle.process();
        process.stdin_null = !process.terminal && stdin_is_null();
        // A restored checkpoint's process exists already: the guest only
        // needs fresh entropy and the host's clock.
        let made = control
            .expect_ok(&Request::Clone(crate::sandbox::clone_seed()))
            .and_then(|()| match restore {
                Some(_) => Ok(()),
                None => control.expect_ok(&Request::Create {
                    id: id.into(),
                    spec: spec_json.clone(),
                    process: process.clone(),
                }),
            });
        if let Err(e) = made {
            return Err(explain(&mut sandbox, e));
        }
        phases.mark("created");
        // createRuntime and prestart hooks: the VM is up and the process
        // made; a failure fails `create`. A restored container ran them
        // when it was made.
        if restore.is_none() {
            let mut oci = state.oci_state();
            oci["status"] = "creating".into();
            oci["pid"] = std::process::id().into();
            crate::hooks::run(&bundle.spec, crate::hooks::Point::Create, &oci.to_string())?;
        }
        let terminal = if process.terminal {
            terminal.clone()
        } else {
            Terminal::None
        };
        let outputs = attach_stdio(
            &Agent::at(&dir),
            id,
            "",
            process.stdin_null,
            &terminal,
            resizer(dir.clone(), id.to_owned(), String::new()),
            None,
        )
        .map_err(|e| e.to_string())?;
        state.status = if restore.is_some() {
            Status::Running
        } else {
            Status::Created
        };
        state.monitor = HostProcess::of(std::process::id());
        state.vmm = sandbox.vmm_pid().and_then(HostProcess::of);
        // The VM is what the host accounts and limits for the container.
        if let Some(rel) = bundle
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .and_then(|p| crate::cgroup::relative(&p.to_string_lossy()))
        {
            let pids: Vec<u32> = [Some(std::process::id()), sandbox.vmm_pid()]
                .into_iter()
                .flatten()
                .collect();
            let limited = resources
                .and_then(|r| r.memory().as_ref())
                .and_then(|m| m.limit())
                .filter(|&l| l > 0);
            let placed = crate::cgroup::place(&rel, &pids).and_then(|()| match limited {
                // The VM's memory and the VMM's own: a container at its
                // limit is OOM-killed in its guest, not its VMM on the host.
                Some(_) => crate::cgroup::limit_memory(
                    &rel,
                    (shape.memory_mib + husk_guest::shape::VMM_RESERVE_MIB) << 20,
                ),
                None => Ok(()),
            });
            if let Err(e) = placed {
                crate::cgroup::remove(&rel);
                return Err(e);
            }
            state.cgroup = Some(rel);
        }
        state.save(root).map_err(|e| e.to_string())?;
        Ok((sandbox, control, outputs))
    })();
    let (mut sandbox, mut control, outputs) = match set_up {
        Ok(parts) => {
            report(&Ok(()));
            parts
        }
        Err(e) => {
            report(&Err(e));
            return 1;
        }
    };
    let waited = wait_status(&mut control, id, "");
    phases.mark("exited");
    let mut error = None;
    let mut oom_kills = None;
    let status = match waited {
        Ok(status) => {
            for output in outputs {
                let _ = output.join();
            }
            // What the guest's OOM killer did, for `events` after the end.
            if let Ok(Response::Stats(stats)) = control.ask(&Request::Stats { id: id.into() }) {
                oom_kills = Some(stats.oom_kills);
            }
            let _ = std::io::stdout().flush();
            let _ = control.send(&Request::Shutdown);
            let _ = sandbox.finish(Duration::from_secs(10));
            status
        }
        Err(_) if dir.join(crate::checkpoint::CHECKPOINTED).exists() => {
            // Ended by `checkpoint`: the container goes on from there.
            // The VMM is let finish (it removes its sockets as it exits)
            // before the container counts as stopped, so that a restore
            // under the same ID right after never has its new sockets
            // removed by the old VMM.
            let _ = sandbox.finish(Duration::from_secs(10));
            128 + libc::SIGKILL
        }
        Err(e) => {
            error = Some(format!("{:#}", anyhow::Error::from(sandbox.explain(e))));
            // The container's process died with its VM: killed.
            128 + libc::SIGKILL
        }
    };
    phases.mark("vm_ended");
    phases.write();
    if let Ok(mut state) = ContainerState::load(root, id) {
        state.status = Status::Stopped;
        state.exit_status = Some(status);
        state.error = error;
        state.oom_kills = oom_kills;
        let _ = state.save(root);
    }
    status
}

/// [`exec`] in the calling process (a foreground `husk exec`): a failure
/// to start is printed, not reported on a ready pipe.
pub fn exec_in_process(
    root: &Path,
    id: &str,
    exec_id: &str,
    process: Process,
    terminal: &Terminal,
) -> i32 {
    run_exec(root, id, exec_id, process, terminal, false)
}

/// Runs the monitor of process `exec_id` in running container `id`;
/// returns its exit status.
pub fn exec(root: &Path, id: &str, exec_id: &str, process: Process, terminal: &Terminal) -> i32 {
    run_exec(root, id, exec_id, process, terminal, true)
}

fn run_exec(
    root: &Path,
    id: &str,
    exec_id: &str,
    mut process: Process,
    terminal: &Terminal,
    ready_pipe: bool,
) -> i32 {
    process.stdin_null = !process.terminal && stdin_is_null();
    let dir = state::dir(root, id);
    let agent = Agent::at(&dir);
    let mut inline = Vec::new();
    let set_up = (|| -> Result<(Control, Outputs), (String, i32)> {
        let fail = |e: SandboxError| (format!("{:#}", anyhow::Error::from(e)), 1);
        let mut control = agent.control_pipelined().map_err(fail)?;
        match control
            .ask(&Request::Exec {
                id: id.into(),
                exec_id: exec_id.into(),
                process: process.clone(),
            })
            .map_err(fail)?
        {
            Response::Ok => {}
            Response::NotStarted { message, status } => return Err((message, status)),
            Response::Error { message } => return Err((message, 1)),
            other => return Err((format!("unexpected answer {other:?}"), 1)),
        }
        let terminal = if process.terminal {
            terminal.clone()
        } else {
            Terminal::None
        };
        let outputs = attach_stdio(
            &agent,
            id,
            exec_id,
            process.stdin_null,
            &terminal,
            resizer(dir.clone(), id.to_owned(), exec_id.to_owned()),
            // In the foreground (`husk exec` is the monitor), output is
            // copied by this thread: no thread per stream for a short exec.
            (!ready_pipe).then_some(&mut inline),
        )
        .map_err(fail)?;
        Ok((control, outputs))
    })();
    let (mut control, outputs) = match set_up {
        Ok(parts) => {
            if ready_pipe {
                report(&Ok(()));
            }
            parts
        }
        Err((message, status)) => {
            if ready_pipe {
                report(&Err(message));
            } else {
                eprintln!("husk: {}", message.trim());
            }
            return status;
        }
    };
    pump(inline);
    let status = wait_status(&mut control, id, exec_id).unwrap_or(128 + libc::SIGKILL);
    for output in outputs {
        let _ = output.join();
    }
    let _ = std::io::stdout().flush();
    status
}

/// Copies each stream to its file until every one has ended, on this
/// thread (poll).
fn pump(mut streams: Vec<(UnixStream, File)>) {
    let mut buf = vec![0u8; 64 * 1024];
    while !streams.is_empty() {
        let mut fds: Vec<PollFd> = streams
            .iter()
            .map(|(s, _)| PollFd::new(s, PollFlags::IN))
            .collect();
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(_) => return,
        }
        let ready: Vec<bool> = fds.iter().map(|fd| !fd.revents().is_empty()).collect();
        drop(fds);
        let mut i = 0;
        streams.retain_mut(|(stream, to)| {
            let ready = ready[i];
            i += 1;
            if !ready {
                return true;
            }
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => false,
                Ok(n) => to.write_all(&buf[..n]).is_ok(),
            }
        });
    }
}
