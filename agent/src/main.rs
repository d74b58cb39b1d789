//! husk-agent: PID 1 of a Husk guest.
//!
//! It mounts /proc, /sys and /dev, listens on vsock for the runtime
//! ([`husk_protocol::CONTROL_PORT`] for requests, [`STDIO_PORT`] for stdio
//! streams), runs the processes it is asked to, streams their stdio, reports
//! their exit status as a shell does (128 + N for a signal), and powers the
//! guest off when told to.
//!
//! This first version runs processes from the guest's own root (the
//! initramfs); mounting the container's root filesystem from virtio-fs,
//! applying the OCI spec's namespaces, mounts, capabilities and limits, and
//! reaping orphans come with the rest of issue 4. The agent never comes from
//! a container image: the runtime packs it into the initramfs.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use husk_protocol::{
    CONTROL_PORT, Process, READY_PORT, Request, Response, STDIO_PORT, StdioAttach, Stream,
    handshake, read_frame, vsock, write_frame,
};

/// A process the agent started, and the stdio ends not yet attached.
#[derive(Default)]
struct Proc {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
}

type Procs = Arc<Mutex<HashMap<String, Proc>>>;

fn log(line: &str) {
    eprintln!("husk-agent: {line}");
}

fn mount(source: &str, target: &str, fstype: &str) {
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (c_source, c_target, c_fstype) = (c(source), c(target), c(fstype));
    // SAFETY: mount with valid C strings and no data.
    let r = unsafe {
        libc::mount(
            c_source.as_ptr(),
            c_target.as_ptr(),
            c_fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        log(&format!(
            "cannot mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn spawn(process: &Process) -> Result<Proc, String> {
    let Some((program, args)) = process.args.split_first() else {
        return Err("the process has no args".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(process.env.iter().filter_map(|kv| kv.split_once('=')))
        .current_dir(if process.cwd.is_empty() {
            "/"
        } else {
            &process.cwd
        })
        .uid(process.uid)
        .gid(process.gid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("exec {program}: {e}"))?;
    Ok(Proc {
        stdin: child.stdin.take(),
        stdout: child.stdout.take(),
        stderr: child.stderr.take(),
        child: Some(child),
    })
}

fn key(id: &str, exec_id: &str) -> String {
    format!("{id}/{exec_id}")
}

fn handle(request: Request, procs: &Procs) -> Response {
    match request {
        Request::Exec {
            id,
            exec_id,
            process,
        } => match spawn(&process) {
            Ok(proc) => {
                procs.lock().unwrap().insert(key(&id, &exec_id), proc);
                Response::Ok
            }
            Err(message) => Response::Error { message },
        },
        Request::Wait { id, exec_id } => {
            let child = procs
                .lock()
                .unwrap()
                .get_mut(&key(&id, &exec_id))
                .and_then(|p| p.child.take());
            match child {
                None => Response::Error {
                    message: format!("no process {exec_id:?} in container {id:?}"),
                },
                Some(mut child) => match child.wait() {
                    Ok(status) => Response::Exited {
                        status: status
                            .code()
                            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
                    },
                    Err(e) => Response::Error {
                        message: format!("wait: {e}"),
                    },
                },
            }
        }
        Request::Signal {
            id,
            exec_id,
            signal,
            ..
        } => {
            let pid = procs
                .lock()
                .unwrap()
                .get(&key(&id, &exec_id))
                .and_then(|p| p.child.as_ref().map(|c| c.id()));
            match pid {
                // SAFETY: kill takes no pointers.
                Some(pid) if unsafe { libc::kill(pid as i32, signal) } == 0 => Response::Ok,
                Some(_) => Response::Error {
                    message: format!("signal {signal}: {}", std::io::Error::last_os_error()),
                },
                None => Response::Error {
                    message: format!("no running process {exec_id:?} in container {id:?}"),
                },
            }
        }
        Request::Shutdown => {
            // SAFETY: sync and reboot take no pointers; PID 1 may power off.
            unsafe {
                libc::sync();
                libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
            }
            Response::Error {
                message: format!("power-off failed: {}", std::io::Error::last_os_error()),
            }
        }
        other => Response::Error {
            message: format!("{other:?} is not supported by this agent yet"),
        },
    }
}

fn serve_control(mut conn: std::fs::File, procs: Procs) {
    if let Err(e) = handshake(&mut conn, concat!("husk-agent ", env!("CARGO_PKG_VERSION"))) {
        log(&format!("control connection refused: {e}"));
        return;
    }
    while let Ok(request) = read_frame::<_, Request>(&mut conn) {
        let response = handle(request, &procs);
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

fn serve_stdio(mut conn: std::fs::File, procs: Procs) {
    let Ok(attach) = read_frame::<_, StdioAttach>(&mut conn) else {
        return;
    };
    let k = key(&attach.id, &attach.exec_id);
    let mut table = procs.lock().unwrap();
    let Some(proc) = table.get_mut(&k) else {
        return;
    };
    match attach.stream {
        Stream::Stdout => {
            if let Some(out) = proc.stdout.take() {
                drop(table);
                pump(out, &conn);
            }
        }
        Stream::Stderr => {
            if let Some(err) = proc.stderr.take() {
                drop(table);
                pump(err, &conn);
            }
        }
        Stream::Stdin => {
            if let Some(stdin) = proc.stdin.take() {
                drop(table);
                pump(&conn, stdin);
            }
        }
        Stream::Terminal => {}
    }
    // SAFETY: shutdown on the connection's descriptor, which conn owns.
    unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&conn), libc::SHUT_WR) };
}

/// Tells the VMM the agent is ready: a connection to the host's ready
/// port, which the VMM answers with a reset (and may snapshot the guest
/// right there: a restored agent continues from this call).
fn signal_ready() {
    // Refused by design; only the attempt matters.
    let _ = vsock::connect(vsock::HOST_CID, READY_PORT);
}

fn listen_forever(listener: OwnedFd, port: u32, procs: Procs, serve: fn(std::fs::File, Procs)) {
    loop {
        match vsock::accept(&listener) {
            Ok(conn) => {
                let procs = procs.clone();
                std::thread::spawn(move || serve(conn, procs));
            }
            Err(e) => log(&format!("accept on port {port}: {e}")),
        }
    }
}

fn main() {
    if std::process::id() == 1 {
        mount("proc", "/proc", "proc");
        mount("sysfs", "/sys", "sysfs");
        mount("devtmpfs", "/dev", "devtmpfs");
    }
    let procs: Procs = Arc::default();
    let (control, stdio) = match (vsock::listen(CONTROL_PORT), vsock::listen(STDIO_PORT)) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => {
            log(&format!("cannot listen on vsock: {e}"));
            return;
        }
    };
    let stdio = {
        let procs = procs.clone();
        std::thread::spawn(move || listen_forever(stdio, STDIO_PORT, procs, serve_stdio))
    };
    log(&format!(
        "listening on vsock ports {CONTROL_PORT} and {STDIO_PORT}"
    ));
    signal_ready();
    listen_forever(control, CONTROL_PORT, procs, serve_control);
    let _ = stdio.join();
}
