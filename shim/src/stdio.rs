//! A process's stdio as containerd hands it to the shim: up to three FIFO
//! paths (empty: none) and whether it has a terminal.
//!
//! - Without a terminal, stdout and stderr are the FIFOs themselves,
//!   passed to the process's monitor as its stdio. They are opened
//!   read-write, as containerd's runc shim holds both ends: the open never
//!   blocks, and a reader that goes away (containerd restarting) is not a
//!   broken pipe. The reader sees the end once the monitor exits.
//! - stdin is copied by a thread from the FIFO into a pipe whose read end
//!   is the monitor's stdin, so that `CloseIO` can end it: containerd
//!   keeps the FIFO open for writing and never closes it itself.
//! - With a terminal, the monitor sends the host pseudo-terminal's master
//!   to a console socket the shim listens on (as runc sends it to
//!   containerd's runc shim); threads copy the master to the stdout FIFO
//!   and the stdin FIFO to the master, and `ResizePty` sets its size.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};

/// The FIFOs containerd gave a process.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    /// stdin FIFO, or empty.
    pub stdin: String,
    /// stdout FIFO, or empty.
    pub stdout: String,
    /// stderr FIFO, or empty.
    pub stderr: String,
    /// A terminal.
    pub terminal: bool,
}

fn open_fifo(path: &str, what: &str) -> Result<File, String> {
    if path.is_empty() {
        return File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| format!("cannot open /dev/null for {what}: {e}"));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot open the {what} FIFO {path}: {e}"))
}

/// Copies stdin from its FIFO to a writer until the FIFO's writer closes
/// it, the process ends or `CloseIO` is asked.
#[derive(Clone)]
pub struct Pump {
    closed: Arc<AtomicBool>,
    to: Arc<Mutex<Option<File>>>,
}

impl Pump {
    fn start(fifo: File, to: File) -> Self {
        let pump = Self {
            closed: Arc::new(AtomicBool::new(false)),
            to: Arc::new(Mutex::new(Some(to))),
        };
        let p = pump.clone();
        std::thread::spawn(move || p.run(fifo));
        pump
    }

    fn run(&self, mut fifo: File) {
        let mut buf = vec![0u8; 32 * 1024];
        while !self.closed.load(Ordering::Acquire) {
            // The FIFO is held open for writing by this process too (it is
            // opened read-write), so a read never sees its end: poll, and
            // look at `closed` between.
            let mut fds = [PollFd::new(&fifo, PollFlags::IN)];
            let timeout = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 200_000_000,
            };
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break,
            }
            let n = match fifo.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut to = self.to.lock().expect("pump lock");
            let Some(w) = to.as_mut() else { break };
            if w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        self.close();
    }

    /// The process's stdin ends.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.to.lock().expect("pump lock").take();
    }
}

/// A process's stdio, opened.
pub struct Opened {
    /// What the monitor gets as stdin, stdout and stderr.
    pub stdin: OwnedFd,
    /// The monitor's stdout.
    pub stdout: OwnedFd,
    /// The monitor's stderr.
    pub stderr: OwnedFd,
    /// The stdin copier, where there is a stdin (not with a terminal: that
    /// one is started by [`Console::attach`]).
    pub pump: Option<Pump>,
    /// With a terminal: where the monitor sends its master, and the
    /// FIFOs to join it to.
    pub console: Option<ConsoleSocket>,
}

/// A console socket waiting for a terminal master.
pub struct ConsoleSocket {
    /// Its path, for the monitor.
    pub path: PathBuf,
    listener: UnixListener,
    stdin: Option<File>,
    stdout: File,
}

/// A process's terminal on the host side: its master.
pub struct Console {
    master: File,
}

impl Console {
    /// Sets the terminal's size (the monitor follows it into the guest).
    pub fn resize(&self, width: u32, height: u32) -> Result<(), String> {
        let size = rustix::termios::Winsize {
            ws_row: height.min(u16::MAX as u32) as u16,
            ws_col: width.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&self.master, size)
            .map_err(|e| format!("cannot resize the terminal: {e}"))
    }
}

impl ConsoleSocket {
    /// Takes the master the monitor sent (it did before it answered that
    /// the process is set up) and joins it to the FIFOs.
    pub fn attach(self) -> Result<(Console, Option<Pump>), String> {
        self.listener
            .set_nonblocking(true)
            .map_err(|e| format!("console socket: {e}"))?;
        let (conn, _) = self
            .listener
            .accept()
            .map_err(|e| format!("the monitor sent no terminal: {e}"))?;
        conn.set_nonblocking(false)
            .map_err(|e| format!("console socket: {e}"))?;
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let master = File::from(
            husk_sys::fd::recv_fd(&conn)
                .map_err(|e| format!("cannot receive the terminal: {e}"))?,
        );
        let _ = std::fs::remove_file(&self.path);
        let mut out = self.stdout;
        let mut from = master.try_clone().map_err(|e| format!("terminal: {e}"))?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            // EIO once the monitor, the slave's last holder, exits.
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let pump = match self.stdin {
            Some(fifo) => Some(Pump::start(
                fifo,
                master.try_clone().map_err(|e| format!("terminal: {e}"))?,
            )),
            None => None,
        };
        Ok((Console { master }, pump))
    }
}

/// Opens `paths` for a process whose console socket, if it has a
/// terminal, is `socket`.
pub fn open(paths: &Paths, socket: &Path) -> Result<Opened, String> {
    let null = || {
        File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|e| format!("cannot open /dev/null: {e}"))
    };
    if paths.terminal {
        let _ = std::fs::remove_file(socket);
        let listener = husk_sys::unix::bind(socket)
            .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
        let stdin = if paths.stdin.is_empty() {
            None
        } else {
            Some(open_fifo(&paths.stdin, "stdin")?)
        };
        return Ok(Opened {
            stdin: null()?,
            stdout: null()?,
            stderr: null()?,
            pump: None,
            console: Some(ConsoleSocket {
                path: socket.to_owned(),
                listener,
                stdin,
                stdout: open_fifo(&paths.stdout, "stdout")?,
            }),
        });
    }
    let stdout = open_fifo(&paths.stdout, "stdout")?.into();
    let stderr = open_fifo(&paths.stderr, "stderr")?.into();
    if paths.stdin.is_empty() {
        return Ok(Opened {
            stdin: null()?,
            stdout,
            stderr,
            pump: None,
            console: None,
        });
    }
    let fifo = open_fifo(&paths.stdin, "stdin")?;
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("cannot make a pipe for stdin: {e}"))?;
    let pump = Pump::start(fifo, File::from(write));
    Ok(Opened {
        stdin: read,
        stdout,
        stderr,
        pump: Some(pump),
        console: None,
    })
}

impl Opened {
    /// The monitor's stdio.
    pub fn monitor_stdio(&self) -> husk_runtime::handoff::Stdio3<'_> {
        husk_runtime::handoff::Stdio3 {
            stdin: self.stdin.as_fd(),
            stdout: self.stdout.as_fd(),
            stderr: self.stderr.as_fd(),
        }
    }
}
