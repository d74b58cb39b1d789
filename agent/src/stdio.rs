//! A process's stdio: pipes or one pseudo-terminal, made when the process
//! is, and the stdio port's streams. Each stream is attached when the host
//! opens a connection with a `StdioAttach` frame; output waits in its pipe
//! until the host reads, and what was read but not delivered when the
//! host's end went away waits for the next attach.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;

use husk_protocol::{
    MAX_OUTPUT_RECORD, Output, Response, StdioAttach, Stream, read_frame, write_output,
};
use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;

use crate::processes::{Proc, Processes, key};

/// A process's stdio: the agent's ends in a [`Proc`], and the child's.
pub(crate) fn make_stdio(terminal: bool, stdin_null: bool) -> std::io::Result<(Proc, [File; 3])> {
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

/// A pipe whose both ends close on exec.
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

/// Sends the output of process `exec_id` of container `id` (no terminal,
/// no input) on its control connection `conn` as `Output` records, then
/// its exit status. Returns false when the host's end went away first:
/// the process's output ends go with this function (nobody attaches to a
/// foreground exec's streams later), so its next write to them fails.
pub(crate) fn send_inline(conn: &File, processes: &Processes, id: &str, exec_id: &str) -> bool {
    let k = key(id, exec_id);
    let mut ends: Vec<(File, bool)> = {
        let mut procs = processes.procs.lock().unwrap();
        let Some(proc) = procs.get_mut(&k) else {
            return false;
        };
        [(proc.stdout.take(), true), (proc.stderr.take(), false)]
            .into_iter()
            .filter_map(|(end, out)| Some((end?, out)))
            .collect()
    };
    let mut buf = vec![0u8; MAX_OUTPUT_RECORD as usize];
    while !ends.is_empty() {
        let mut fds: Vec<PollFd> = ends
            .iter()
            .map(|(end, _)| PollFd::new(end, PollFlags::IN))
            .chain([PollFd::new(conn, PollFlags::RDHUP)])
            .collect();
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(_) => return false,
        }
        let ready: Vec<bool> = fds.iter().map(|fd| !fd.revents().is_empty()).collect();
        drop(fds);
        if ready[ends.len()] {
            return false;
        }
        let mut sent = true;
        let mut i = 0;
        ends.retain(|(end, stdout)| {
            let ready = ready[i];
            i += 1;
            if !ready || !sent {
                return true;
            }
            match (&*end).read(&mut buf) {
                Ok(0) => false,
                Ok(n) => {
                    let data = buf[..n].to_vec();
                    let record = if *stdout {
                        Output::Stdout(data)
                    } else {
                        Output::Stderr(data)
                    };
                    sent = write_output(&mut &*conn, &record).is_ok();
                    true
                }
                Err(e) => e.kind() == std::io::ErrorKind::Interrupted,
            }
        });
        if !sent {
            return false;
        }
    }
    let status = match processes.wait(id, exec_id) {
        Response::Exited { status, .. } => status,
        _ => 128 + libc::SIGKILL,
    };
    write_output(&mut &*conn, &Output::Exited(status)).is_ok()
}

/// Serves one connection to the stdio port: the stream its `StdioAttach`
/// frame names.
pub(crate) fn serve_stdio(mut conn: File, processes: &Processes) {
    let Ok(attach) = read_frame::<_, StdioAttach>(&mut conn) else {
        return;
    };
    let k = key(&attach.id, &attach.exec_id);
    let (end, mut pending) = {
        let mut procs = processes.procs.lock().unwrap();
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
        let mut procs = processes.procs.lock().unwrap();
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
