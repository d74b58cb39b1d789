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
//! second, so a test can see whether the guest runs (pause, resume).

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
        // SAFETY: writes from a live buffer of the given length to fd 1.
        let n = unsafe { libc::write(1, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            return;
        }
        rest = &rest[n as usize..];
    }
}

fn wait_status(pid: libc::pid_t) -> Result<i32, String> {
    let mut status = 0;
    // SAFETY: waitpid writes the status into our local.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r != pid {
        return Err(format!("waitpid returned {r}"));
    }
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
    // SAFETY: sched_getaffinity fills the zeroed set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 0;
        }
        libc::CPU_COUNT(&set) as usize
    }
}

fn mem_mib() -> u64 {
    // SAFETY: sysinfo fills the zeroed struct we own.
    unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) != 0 {
            return 0;
        }
        info.totalram as u64 * info.mem_unit as u64 / (1 << 20)
    }
}

/// Reads from the virtio-rng device if the guest has one: mounts devtmpfs
/// on /dev (the kernel made /dev/hwrng there) and reads 32 bytes.
fn check_hwrng() -> String {
    let devtmpfs = CString::new("devtmpfs").unwrap();
    let dev = CString::new("/dev").unwrap();
    // SAFETY: mount with valid C strings and no data.
    let mounted = unsafe {
        libc::mount(
            devtmpfs.as_ptr(),
            dev.as_ptr(),
            devtmpfs.as_ptr(),
            0,
            std::ptr::null(),
        )
    } == 0;
    if !mounted {
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

fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; as PID 1 we may power off.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
    say("FAIL power-off returned");
    loop {
        // SAFETY: pause takes no arguments.
        unsafe { libc::pause() };
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
    if std::env::args().any(|a| a == "ticks") {
        for n in 0u64.. {
            say(&format!("tick {n}"));
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
    if std::env::args().any(|a| a == "idle") {
        say("idle");
        loop {
            // SAFETY: pause takes no arguments.
            unsafe { libc::pause() };
        }
    }
    power_off();
}
