//! Pause, resume and stop through the control socket, on a real guest that
//! prints a tick four times a second: while paused it prints none, after
//! resume it goes on, and stop ends the VMM with status 0 and no socket
//! left behind.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Scratch, kernel, spawn_vmm, test_initramfs};

/// Sends one request and returns the answer line.
fn ask(socket: &std::path::Path, request: &str) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    writeln!(stream, "{request}").unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).unwrap();
    answer.trim().to_owned()
}

/// Waits for the next tick line, returning its number.
fn next_tick(ticks: &mpsc::Receiver<u64>, within: Duration) -> Option<u64> {
    ticks.recv_timeout(within).ok()
}

#[test]
fn pause_stops_the_guest_resume_continues_it_stop_ends_it() {
    let scratch = Scratch::new("pause");
    let initramfs = test_initramfs(&scratch);
    let socket = scratch.path("api.sock");
    let (mut child, lines) = spawn_vmm(&[
        "--kernel".as_ref(),
        kernel().as_os_str(),
        "--initramfs".as_ref(),
        initramfs.as_os_str(),
        "--cmdline=-- ticks".as_ref(),
        "--api-socket".as_ref(),
        socket.as_os_str(),
    ]);
    let (tx, ticks) = mpsc::channel();
    std::thread::spawn(move || {
        for line in lines {
            if let Some(n) = line.strip_prefix("husk-test-init: tick ") {
                let _ = tx.send(n.trim().parse::<u64>().unwrap());
            }
        }
    });

    // Booted and ticking.
    let first = next_tick(&ticks, common::BOOT_TIMEOUT).expect("the guest never ticked");
    assert!(next_tick(&ticks, Duration::from_secs(30)).unwrap() > first);

    assert_eq!(ask(&socket, r#"{"action":"pause"}"#), r#"{"ok":true}"#);
    // Ticks already on their way out may still arrive; then none.
    while next_tick(&ticks, Duration::from_millis(500)).is_some() {}
    let quiet_from = Instant::now();
    assert_eq!(
        next_tick(&ticks, Duration::from_secs(2)),
        None,
        "the guest ticked while paused"
    );
    assert!(quiet_from.elapsed() >= Duration::from_secs(2));
    // Pausing twice is fine.
    assert_eq!(ask(&socket, r#"{"action":"pause"}"#), r#"{"ok":true}"#);

    assert_eq!(ask(&socket, r#"{"action":"resume"}"#), r#"{"ok":true}"#);
    assert!(
        next_tick(&ticks, Duration::from_secs(30)).is_some(),
        "the guest did not go on after resume"
    );

    let answer = ask(&socket, r#"{"action":"dance"}"#);
    assert!(
        answer.starts_with(r#"{"ok":false,"error":"bad request"#),
        "{answer}"
    );

    assert_eq!(ask(&socket, r#"{"action":"stop"}"#), r#"{"ok":true}"#);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the VMM left its socket behind");
}

/// Issue 14: a VMM whose starter blocked and ignored SIGTERM (as `husk run`
/// did) still ends on SIGTERM, with status 0 and no socket left behind;
/// its control socket is its user's alone while it runs.
#[test]
fn sigterm_ends_the_vmm_cleanly_whatever_its_starter_ignored() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let scratch = Scratch::new("sigterm");
    let initramfs = test_initramfs(&scratch);
    let socket = scratch.path("api.sock");
    let mut cmd = common::vmm_command();
    cmd.arg("--kernel")
        .arg(kernel())
        .arg("--initramfs")
        .arg(&initramfs)
        .arg("--cmdline=-- ticks")
        .arg("--api-socket")
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // SAFETY: signal and sigprocmask in the forked child, before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, ticks) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("husk-test-init: tick ") {
                let _ = tx.send(0);
            }
        }
    });
    assert!(
        next_tick(&ticks, common::BOOT_TIMEOUT).is_some(),
        "the guest never ticked"
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "socket mode {mode:o}");
    // SAFETY: kill of our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the VMM did not end on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the VMM left its socket behind");
}
