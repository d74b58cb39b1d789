//! A tiny init for boot tests: PID 1 of a guest booted with an initramfs.
//!
//! It proves that guest processes can make system calls (on hosts where a
//! guest `syscall` faults instead of entering the kernel, the guest kernel
//! patch in kernel-config/patches must turn each fault into the call): it
//! writes with write(2), forks, execs, waits, takes a signal and returns from
//! its handler, reports the CPUs and memory it sees, prints one line and
//! powers the guest off. Every line it prints starts with `husk-test-init:`.
//!
//! With `idle` among its arguments (kernel command line `-- idle`) it stays
//! up instead of powering off, for benchmarks that measure idle guests;
//! with `ticks` it stays up printing `husk-test-init: tick N` four times a
//! second, so a test can see whether the guest runs (pause, resume); with
//! `net-echo` it brings `eth0` up as 10.0.2.15/24 and echoes UDP on port 7
//! (the virtio-net boot test).
//!
//! The flood modes (issue 18's DoS bounds, vmm/tests/flood.rs,
//! scripts/bench-vsock-flood.sh, scripts/bench-fs-flood.sh) do their
//! flood, print one line of counts, then tick as `ticks` does:
//! `vsock-flood` opens up to 300 connections to host port 5000 and fills
//! each with as much as its credit takes; `vsock-sink` accepts every
//! connection to its port 1235 and never reads; `fs-flood` mounts the
//! virtio-fs tag `flood` and creates and holds open files until an open
//! fails, drops its caches, then writes a 16 MiB file.

use std::ffi::CString;

use husk_protocol::vsock;
use std::sync::atomic::{AtomicBool, Ordering};

const EXEC_CHILD_ARG: &str = "exec-child";
const EXEC_CHILD_STATUS: i32 = 7;
const FORK_CHILD_STATUS: i32 = 42;

/// A named check of one kind of system call.
type Check = (&'static str, fn() -> Result<(), String>);

static SIGNAL_SEEN: AtomicBool = AtomicBool::new(false);

/// One write(2) per line, so the line is the proof of the system call.
fn say(line: &str) {
    let text = format!("husk-test-init: {line}\n");
    let mut rest = text.as_bytes();
    while !rest.is_empty() {
        match rustix::io::write(rustix::stdio::stdout(), rest) {
            Ok(0) | Err(_) => return,
            Ok(n) => rest = &rest[n..],
        }
    }
}

fn wait_status(pid: libc::pid_t) -> Result<i32, String> {
    let waited = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| format!("no process {pid}"))
        .and_then(|p| {
            rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty())
                .map_err(|e| format!("waitpid: {e}"))
        })?;
    let status = match waited {
        Some((p, status)) if p.as_raw_nonzero().get() == pid => status.as_raw(),
        other => return Err(format!("waitpid returned {other:?}")),
    };
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Err(format!("child ended abnormally (status {status:#x})"))
    }
}

fn check_fork() -> Result<(), String> {
    // SAFETY: the child only calls _exit.
    match unsafe { libc::fork() } {
        -1 => Err("fork failed".into()),
        // SAFETY: _exit ends the child without running the parent's state.
        0 => unsafe { libc::_exit(FORK_CHILD_STATUS) },
        pid => match wait_status(pid)? {
            FORK_CHILD_STATUS => Ok(()),
            s => Err(format!("fork child exited {s}")),
        },
    }
}

fn check_exec() -> Result<(), String> {
    let path = CString::new("/init").unwrap();
    let arg0 = CString::new("/init").unwrap();
    let arg1 = CString::new(EXEC_CHILD_ARG).unwrap();
    let argv = [arg0.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: the child only calls execve and _exit with live pointers.
    match unsafe { libc::fork() } {
        -1 => Err("fork for exec failed".into()),
        0 => unsafe {
            // SAFETY: argv and envp are NULL-terminated arrays of C strings
            // that outlive the call.
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127)
        },
        pid => match wait_status(pid)? {
            EXEC_CHILD_STATUS => Ok(()),
            s => Err(format!("exec child exited {s}")),
        },
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    SIGNAL_SEEN.store(true, Ordering::SeqCst);
}

fn check_signal() -> Result<(), String> {
    // SAFETY: installs a handler that only stores to an atomic; the
    // sigaction struct is fully initialised from zero.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        if libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) != 0 {
            return Err("sigaction failed".into());
        }
        if libc::raise(libc::SIGUSR1) != 0 {
            return Err("raise failed".into());
        }
    }
    // Reaching here means rt_sigreturn brought us back after the handler.
    if SIGNAL_SEEN.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err("handler did not run".into())
    }
}

fn cpus() -> usize {
    rustix::thread::sched_getaffinity(None).map_or(0, |set| set.count() as usize)
}

fn mem_mib() -> u64 {
    let info = rustix::system::sysinfo();
    info.totalram as u64 * info.mem_unit as u64 / (1 << 20)
}

/// Reads from the virtio-rng device if the guest has one: mounts devtmpfs
/// on /dev (the kernel made /dev/hwrng there) and reads 32 bytes.
fn check_hwrng() -> String {
    let flags = rustix::mount::MountFlags::empty();
    if rustix::mount::mount("devtmpfs", "/dev", "devtmpfs", flags, None).is_err() {
        return "hwrng unknown (devtmpfs)".into();
    }
    let mut buf = [0u8; 32];
    match std::fs::File::open("/dev/hwrng") {
        Err(_) => "hwrng absent".into(),
        Ok(mut f) => match std::io::Read::read_exact(&mut f, &mut buf) {
            Ok(()) if buf != [0u8; 32] => "hwrng ok 32 bytes".into(),
            Ok(()) => "hwrng FAIL all zero".into(),
            // The hw_random core makes /dev/hwrng with or without a device.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => "hwrng absent".into(),
            Err(e) => format!("hwrng FAIL {e}"),
        },
    }
}

/// The vsock port the echo mode listens on.
const VSOCK_ECHO_PORT: u32 = 1234;

/// Listens on a vsock port, echoes one connection until it closes, and
/// says how many bytes went through.
fn vsock_echo(port: u32) -> String {
    use std::io::{Read, Write};
    let listener = match vsock::listen(port) {
        Ok(l) => l,
        Err(e) => return format!("vsock FAIL listen: {e}"),
    };
    say(&format!("vsock listening on {port}"));
    let mut conn = match vsock::accept(&listener) {
        Ok(c) => c,
        Err(e) => return format!("vsock FAIL accept: {e}"),
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if conn.write_all(&buf[..n]).is_err() {
            return format!("vsock FAIL write after {total} bytes");
        }
        total += n as u64;
    }
    format!("vsock echoed {total} bytes")
}

/// The guest's address in the net-echo mode (the host's TAP is .1).
const NET_GUEST_IP: [u8; 4] = [10, 0, 2, 15];
/// The UDP port the net-echo mode serves.
const NET_ECHO_PORT: u16 = 7;

/// One `ifreq` ioctl on `eth0`: `data` goes after the 16-byte name.
fn ifreq(sock: i32, request: u64, data: &[u8]) -> Result<(), String> {
    let mut req = [0u8; 40];
    req[..4].copy_from_slice(b"eth0");
    req[16..16 + data.len()].copy_from_slice(data);
    // SAFETY: the ioctl reads (and may write) one 40-byte ifreq, which
    // `req` is.
    if unsafe { libc::ioctl(sock, request as libc::Ioctl, req.as_mut_ptr()) } < 0 {
        return Err(format!(
            "ioctl {request:#x} on eth0: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A sockaddr_in of `ip` (port 0), as an ifreq's data.
fn sockaddr_in(ip: [u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    a[4..8].copy_from_slice(&ip);
    a
}

/// Brings `eth0` up as 10.0.2.15/24 and echoes UDP datagrams on port 7
/// until one says `end`; says how many it echoed.
fn net_echo() -> String {
    use std::os::fd::AsRawFd;
    let Ok(owned) = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    ) else {
        return "net FAIL socket".into();
    };
    let sock = owned.as_raw_fd();
    let up = ifreq(sock, libc::SIOCSIFADDR, &sockaddr_in(NET_GUEST_IP))
        .and_then(|()| ifreq(sock, libc::SIOCSIFNETMASK, &sockaddr_in([255, 255, 255, 0])))
        .and_then(|()| {
            let flags = (libc::IFF_UP | libc::IFF_RUNNING) as u16;
            ifreq(sock, libc::SIOCSIFFLAGS, &flags.to_ne_bytes())
        });
    drop(owned);
    if let Err(e) = up {
        return format!("net FAIL {e}");
    }
    let udp = match std::net::UdpSocket::bind(("0.0.0.0", NET_ECHO_PORT)) {
        Ok(s) => s,
        Err(e) => return format!("net FAIL bind: {e}"),
    };
    say(&format!("net listening on {NET_ECHO_PORT}"));
    let mut buf = vec![0u8; 65536];
    let mut echoed = 0u64;
    loop {
        let (n, from) = match udp.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) => return format!("net FAIL recv: {e}"),
        };
        if &buf[..n] == b"end" {
            return format!("net echoed {echoed} datagrams");
        }
        if let Err(e) = udp.send_to(&buf[..n], from) {
            return format!("net FAIL send: {e}");
        }
        echoed += 1;
    }
}

/// The host port `vsock-flood` connects to (the host listens on
/// `<socket>_5000`).
const VSOCK_FLOOD_PORT: u32 = 5000;
/// How many connections `vsock-flood` tries.
const VSOCK_FLOOD_CONNS: usize = 300;
/// The guest port `vsock-sink` listens on.
const VSOCK_SINK_PORT: u32 = 1235;

/// Raises this process's open-file limit as far as the kernel lets it.
fn raise_nofile() {
    let most = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let limit = rustix::process::Rlimit {
        current: Some(most),
        maximum: Some(most),
    };
    let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit);
}

fn mount_proc() {
    let _ = std::fs::create_dir_all("/proc");
    let flags = rustix::mount::MountFlags::empty();
    let _ = rustix::mount::mount("proc", "/proc", "proc", flags, None);
}

/// Opens connections to the host and writes into each until its credit
/// is spent (a host listener that never reads); keeps them open.
fn vsock_flood() -> (String, Vec<std::fs::File>) {
    use std::io::Write;
    let chunk = vec![0x5au8; 64 * 1024];
    let (mut conns, mut refused, mut bytes) = (Vec::new(), 0, 0u64);
    let mut first_error = String::from("none");
    for _ in 0..VSOCK_FLOOD_CONNS {
        let mut conn = match vsock::connect(vsock::HOST_CID, VSOCK_FLOOD_PORT) {
            Ok(c) => c,
            Err(e) => {
                if refused == 0 {
                    first_error = e.to_string().replace(' ', "_");
                }
                refused += 1;
                continue;
            }
        };
        let _ = rustix::io::ioctl_fionbio(&conn, true);
        while let Ok(n) = conn.write(&chunk) {
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
        conns.push(conn);
    }
    let line = format!(
        "vsock-flood conns={} refused={refused} bytes={bytes} first_error={first_error}",
        conns.len()
    );
    (line, conns)
}

/// Accepts every connection to [`VSOCK_SINK_PORT`] and never reads, on a
/// thread of its own.
fn vsock_sink() {
    let listener = match vsock::listen(VSOCK_SINK_PORT) {
        Ok(l) => l,
        Err(e) => return say(&format!("vsock-sink FAIL listen: {e}")),
    };
    say(&format!("vsock-sink listening on {VSOCK_SINK_PORT}"));
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok(conn) = vsock::accept(&listener) {
            held.push(conn);
        }
    });
}

/// Creates files on the virtio-fs share `flood` and holds them open until
/// an open fails; closes them and drops the guest's caches (the VMM then
/// forgets their inodes); writes a 16 MiB file.
fn fs_flood() -> String {
    use std::io::Write;
    let _ = std::fs::create_dir_all("/flood");
    let flags = rustix::mount::MountFlags::empty();
    if let Err(e) = rustix::mount::mount("flood", "/flood", "virtiofs", flags, None) {
        return format!("fs-flood FAIL mount: {e}");
    }
    let mut held = Vec::new();
    let mut error = String::from("none");
    for n in 0..200_000 {
        match std::fs::File::create(format!("/flood/f{n:06}")) {
            Ok(f) => held.push(f),
            Err(e) => {
                error = e.to_string().replace(' ', "_");
                break;
            }
        }
    }
    let opened = held.len();
    say(&format!("fs-flood open={opened} error={error}"));
    // Held a while, for a test to see the VMM answer meanwhile.
    std::thread::sleep(std::time::Duration::from_secs(3));
    drop(held);
    rustix::fs::sync();
    let dropped = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    let chunk = vec![0xa5u8; 1 << 20];
    let written = std::fs::File::create("/flood/big").and_then(|mut f| {
        for _ in 0..16 {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    });
    let after = match written {
        Ok(()) => "ok".to_string(),
        Err(e) => e.to_string().replace(' ', "_"),
    };
    format!("fs-flood open={opened} error={error} caches_dropped={dropped} big_write={after}")
}

fn power_off() -> ! {
    rustix::fs::sync();
    let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    say("FAIL power-off returned");
    loop {
        std::thread::park();
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some(EXEC_CHILD_ARG) {
        // SAFETY: _exit ends this exec'd child with the agreed status.
        unsafe { libc::_exit(EXEC_CHILD_STATUS) };
    }
    say("started");
    let checks: [Check; 3] = [
        ("fork", check_fork),
        ("exec", check_exec),
        ("signal", check_signal),
    ];
    let mut failed = Vec::new();
    for (name, check) in checks {
        if let Err(e) = check() {
            failed.push(format!("{name}: {e}"));
        }
    }
    let shape = format!("cpus={} mem_mib={}", cpus(), mem_mib());
    if failed.is_empty() {
        say(&format!("ok {shape} fork=ok exec=ok signal=ok"));
    } else {
        say(&format!("FAIL {shape} {}", failed.join("; ")));
    }
    say(&check_hwrng());
    if std::env::args().any(|a| a == "vsock-echo") {
        say(&vsock_echo(VSOCK_ECHO_PORT));
    }
    if std::env::args().any(|a| a == "net-echo") {
        say(&net_echo());
    }
    if std::env::args().any(|a| a == "flood") {
        // A guest flooding its console: 3000 numbered lines, ~300 KB.
        for n in 0..3000 {
            say(&format!("flood {n:04} {}", "=".repeat(80)));
        }
        say("flood done");
    }
    let mut kept = Vec::new();
    if std::env::args().any(|a| a.ends_with("-flood") || a == "vsock-sink") {
        mount_proc();
        raise_nofile();
    }
    if std::env::args().any(|a| a == "vsock-flood") {
        let (line, conns) = vsock_flood();
        say(&line);
        kept = conns;
    }
    if std::env::args().any(|a| a == "vsock-sink") {
        vsock_sink();
    }
    if std::env::args().any(|a| a == "fs-flood") {
        say(&fs_flood());
    }
    let flooding = std::env::args().any(|a| a.ends_with("-flood") || a == "vsock-sink");
    if flooding || std::env::args().any(|a| a == "ticks") {
        for n in 0u64.. {
            say(&format!("tick {n}"));
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
    drop(kept);
    if std::env::args().any(|a| a == "idle") {
        say("idle");
        loop {
            std::thread::park();
        }
    }
    power_off();
}
