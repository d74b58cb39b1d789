//! The monitor's side of a process's stdio: pipes to the guest's streams
//! (polled on the monitor's own thread while it waits for the process, or
//! copied by threads for a pod's member), or one terminal: with `--console-socket` a host
//! pseudo-terminal whose master goes to that socket (SCM_RIGHTS, as runc
//! does) and whose slave the monitor joins to the guest's terminal, else
//! the monitor's own stdin/stdout (in raw mode when it is a terminal).
//! Size changes of the host side are followed.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::pty::{self, OpenptFlags};
use rustix::termios::{self, OptionalActions, Termios};

use husk_protocol::{Output, Request, Stream};

use crate::sandbox::{Agent, Control, SandboxError};

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

/// Copies `from` to `to` until either ends.
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
    let sock = husk_sys::unix::connect(path)?;
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
pub(super) fn attach_stdio(
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
pub(super) type Outputs = Vec<std::thread::JoinHandle<()>>;

pub(super) fn resizer(agent_dir: PathBuf, id: String, exec_id: String) -> impl Fn(u16, u16) + Send {
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

/// Writes an exec's output sent on its control connection to this
/// process's stdout and stderr until its exit status comes, and returns
/// it. Output this process cannot write (its stdout closed) is dropped,
/// as a pipe's reader that went away drops it, and the status still
/// comes.
pub(super) fn receive_inline(control: &mut Control) -> Result<i32, SandboxError> {
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    loop {
        match control.read_output()? {
            Output::Stdout(data) => {
                let _ = out.write_all(&data).and_then(|()| out.flush());
            }
            Output::Stderr(data) => {
                let _ = err.write_all(&data);
            }
            Output::Exited(status) => return Ok(status),
        }
    }
}

/// Sends `request` on `control` and, on this thread, copies each of
/// `streams` to its file while the answer is awaited (one `poll` on all
/// of them); returns the answer. A stream that ends, or whose file takes
/// no more, leaves `streams`.
pub(super) fn ask_pumping(
    control: &mut Control,
    request: &Request,
    streams: &mut Vec<(UnixStream, File)>,
) -> Result<husk_protocol::Response, SandboxError> {
    control.send(request)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if streams.is_empty() || control.answer_buffered() {
            return control.answer();
        }
        match poll_copy(streams, Some(&*control), None, &mut buf) {
            Ok(Some(true)) => return control.answer(),
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(SandboxError::Agent(std::io::Error::from(e).into())),
        }
    }
}

/// One `poll` over `streams` (and `control` first, where given) for at
/// most `timeout`; one read of each ready stream is written to its file,
/// and a stream that ended (or whose file takes no more) leaves
/// `streams`. `Some(whether control is ready)`, or `None` where the time
/// ran out.
fn poll_copy(
    streams: &mut Vec<(UnixStream, File)>,
    control: Option<&Control>,
    timeout: Option<&rustix::time::Timespec>,
    buf: &mut [u8],
) -> Result<Option<bool>, Errno> {
    let first = usize::from(control.is_some());
    let mut fds: Vec<PollFd> = control
        .map(|c| PollFd::new(c, PollFlags::IN))
        .into_iter()
        .chain(streams.iter().map(|(s, _)| PollFd::new(s, PollFlags::IN)))
        .collect();
    if rustix::event::poll(&mut fds, timeout)? == 0 {
        return Ok(None);
    }
    let ready: Vec<bool> = fds.iter().map(|fd| !fd.revents().is_empty()).collect();
    drop(fds);
    let mut i = first;
    streams.retain_mut(|(stream, to)| {
        let ready = ready[i];
        i += 1;
        !ready || copy_once(stream, to, buf)
    });
    Ok(Some(first == 1 && ready[0]))
}

/// One read of `stream` written to `to`: whether both may go on.
fn copy_once(stream: &mut UnixStream, to: &mut File, buf: &mut [u8]) -> bool {
    match stream.read(buf) {
        Ok(0) | Err(_) => false,
        Ok(n) => to.write_all(&buf[..n]).is_ok(),
    }
}

/// Copies each stream to its file, on this thread, until every one has
/// ended (`true`: those that did leave `streams`) or `limit` (if any) ran
/// out (`false`).
pub(super) fn pump_within(streams: &mut Vec<(UnixStream, File)>, limit: Option<Duration>) -> bool {
    let deadline = limit.map(|l| std::time::Instant::now() + l);
    let mut buf = vec![0u8; 64 * 1024];
    while !streams.is_empty() {
        let left = deadline
            .map(|d| {
                rustix::time::Timespec::try_from(
                    d.saturating_duration_since(std::time::Instant::now()),
                )
            })
            .transpose();
        let Ok(left) = left else {
            return false;
        };
        match poll_copy(streams, None, left.as_ref(), &mut buf) {
            Ok(Some(_)) | Err(Errno::INTR) => {}
            Ok(None) | Err(_) => return false,
        }
    }
    true
}

/// Copies each stream to its file until every one has ended, on this
/// thread (poll).
pub(super) fn pump(mut streams: Vec<(UnixStream, File)>) {
    pump_within(&mut streams, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream pair whose host end is pumped into a file of its own.
    fn stream(dir: &Path, name: &str) -> (UnixStream, (UnixStream, File), PathBuf) {
        let (guest, host) = UnixStream::pair().unwrap();
        let path = dir.join(name);
        (guest, (host, File::create(&path).unwrap()), path)
    }

    /// Output that has ended is all copied within the limit, and the
    /// streams leave; one still open keeps its stream, what came is
    /// copied, and the limit is kept.
    #[test]
    fn pump_within_copies_what_ended_and_keeps_to_its_limit() {
        let dir = std::env::temp_dir().join(format!("husk-pump-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (mut out, out_host, out_path) = stream(&dir, "out");
        let (mut err, err_host, err_path) = stream(&dir, "err");
        out.write_all(b"to stdout\n").unwrap();
        err.write_all(b"to stderr\n").unwrap();
        drop((out, err));
        let mut streams = vec![out_host, err_host];
        assert!(pump_within(&mut streams, Some(Duration::from_secs(10))));
        assert!(streams.is_empty());
        assert_eq!(std::fs::read_to_string(&out_path).unwrap(), "to stdout\n");
        assert_eq!(std::fs::read_to_string(&err_path).unwrap(), "to stderr\n");

        let (mut open, open_host, open_path) = stream(&dir, "open");
        open.write_all(b"so far").unwrap();
        let mut streams = vec![open_host];
        let start = std::time::Instant::now();
        assert!(!pump_within(&mut streams, Some(Duration::from_millis(200))));
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert_eq!(streams.len(), 1);
        assert_eq!(std::fs::read_to_string(&open_path).unwrap(), "so far");
        drop(open);
        pump(streams);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
