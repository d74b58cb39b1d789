//! A guest that floods its vsock or its virtio-fs share (issue 18): the
//! VMM's own memory (its resident set less the guest's memory) stays under
//! a fixed bound, the VMM still answers its control socket, and the guest
//! goes on running. The console flood is in boot.rs; the figures of all
//! three are in docs/benchmarks.md.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::{Scratch, kernel, read_line_unbuffered, test_initramfs, vmm_command};

/// The VMM's resident memory less its guest's (KiB): the mappings of
/// /proc/PID/smaps but the guest's (the one mapping of 64 MiB or more).
fn own_rss_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut total, mut guest) = (0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
        {
            guest = hi - lo >= 64 << 20;
        } else if let Some(kib) = line.strip_prefix("Rss:")
            && !guest
        {
            total += kib.trim().trim_end_matches(" kB").parse::<u64>().unwrap();
        }
    }
    total
}

/// A VMM killed when the test ends, also on failure.
struct Vm(std::process::Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the VMM (its open files limited to `nofile` if given); its
/// console comes line by line.
fn start(args: &[&std::ffi::OsStr], nofile: Option<u64>) -> (Vm, Receiver<String>) {
    use std::os::unix::process::CommandExt;
    let mut cmd = vmm_command();
    cmd.args(["--kernel".as_ref(), kernel().as_os_str()])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    if let Some(n) = nofile {
        // SAFETY: setrlimit in the forked child, before exec.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().expect("spawn husk-vmm");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Vm(child), lines)
}

/// The next console line that contains `want`.
fn wait_for(lines: &Receiver<String>, want: &str) -> String {
    loop {
        let line = lines
            .recv_timeout(common::BOOT_TIMEOUT)
            .unwrap_or_else(|_| panic!("the guest never printed {want:?}"));
        if line.contains(want) {
            return line;
        }
    }
}

/// Sends one control request and returns the answer line.
fn ask(socket: &std::path::Path, request: &str) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    writeln!(stream, "{request}").unwrap();
    let mut answer = String::new();
    let _ = BufReader::new(stream).read_line(&mut answer);
    answer.trim().to_owned()
}

/// The VMM answers pause and resume, and the guest ticks on after.
fn still_answers_and_runs(api: &std::path::Path, lines: &Receiver<String>) {
    assert_eq!(ask(api, r#"{"action":"pause"}"#), r#"{"ok":true}"#);
    assert_eq!(ask(api, r#"{"action":"resume"}"#), r#"{"ok":true}"#);
    while lines.try_recv().is_ok() {}
    wait_for(lines, "husk-test-init: tick ");
}

/// Stops the VMM through its socket and waits for it.
fn stop(api: &std::path::Path, mut vm: Vm) {
    assert_eq!(ask(api, r#"{"action":"stop"}"#), r#"{"ok":true}"#);
    let status = vm.0.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn a_guest_flooding_vsock_either_way_grows_the_vmm_by_a_bounded_amount() {
    let scratch = Scratch::new("vsock-flood");
    let initramfs = test_initramfs(&scratch);
    let socket = scratch.path("v.sock");
    let api = scratch.path("api.sock");
    // The host listener the guest floods: accepts every connection and
    // never reads.
    let listener = UnixListener::bind(scratch.path("v.sock_5000")).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    let (vm, lines) = start(
        &[
            "--initramfs".as_ref(),
            initramfs.as_os_str(),
            "--cmdline=-- vsock-flood vsock-sink".as_ref(),
            "--vsock-socket".as_ref(),
            socket.as_os_str(),
            "--api-socket".as_ref(),
            api.as_os_str(),
        ],
        None,
    );
    let pid = vm.0.id();
    wait_for(&lines, "husk-test-init: started");
    let before = own_rss_kib(pid);

    // Guest to host: 300 connections tried, each filled to its credit.
    let verdict = wait_for(&lines, "husk-test-init: vsock-flood ");
    assert!(
        verdict.contains("conns=256 refused=44 "),
        "the guest opened more (or fewer) connections than the VMM allows: {verdict}"
    );
    // Host to guest: 32 clients write into a guest that never reads.
    wait_for(&lines, "husk-test-init: vsock-sink listening");
    let mut clients = Vec::new();
    let mut written = 0usize;
    for _ in 0..32 {
        let mut client = UnixStream::connect(&socket).unwrap();
        client.write_all(b"CONNECT 1235\n").unwrap();
        let ok = read_line_unbuffered(&mut client).unwrap();
        assert!(ok.starts_with("OK "), "{ok:?}");
        client.set_nonblocking(true).unwrap();
        let chunk = [0x33u8; 65536];
        while let Ok(n) = client.write(&chunk) {
            written += n;
        }
        clients.push(client);
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = own_rss_kib(pid);
    // Each guest connection holds at most BUF_ALLOC (256 KiB) of the
    // guest's bytes the host did not read; each host one at most that of
    // the host's bytes the guest did not take (and Linux guests take it).
    let bound = 256 * 256 + 32 * 256 + 16 * 1024;
    eprintln!(
        "own RSS {before} KiB before, {after} KiB after; guest sent {verdict}; host wrote {written} bytes"
    );
    assert!(
        after.saturating_sub(before) < bound,
        "the VMM grew by {} KiB (bound {bound} KiB)",
        after - before
    );
    still_answers_and_runs(&api, &lines);
    drop(clients);
    stop(&api, vm);
}

#[test]
fn a_guest_flooding_virtio_fs_runs_out_of_files_not_the_vmm() {
    // The VMM's open files limited to 2048 (the default is 65536 or the
    // inherited hard limit), so the guest reaches it in seconds: each file
    // it holds open holds an O_PATH descriptor of its inode and one of the
    // open file in the VMM.
    let scratch = Scratch::new("fs-flood");
    let initramfs = test_initramfs(&scratch);
    let share = scratch.path("share");
    std::fs::create_dir(&share).unwrap();
    let api = scratch.path("api.sock");
    let mut share_arg = std::ffi::OsString::from("flood=");
    share_arg.push(&share);
    let (vm, lines) = start(
        &[
            "--initramfs".as_ref(),
            initramfs.as_os_str(),
            "--cmdline=-- fs-flood".as_ref(),
            "--share".as_ref(),
            &share_arg,
            "--api-socket".as_ref(),
            api.as_os_str(),
        ],
        Some(2048),
    );
    let pid = vm.0.id();
    wait_for(&lines, "husk-test-init: started");
    let before = own_rss_kib(pid);
    let full = wait_for(&lines, "husk-test-init: fs-flood open=");
    let open: usize = full
        .split("open=")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!((500..2048).contains(&open), "{full}");
    // EMFILE, the VMM's, passed on (two descriptors a file: ~1020 files).
    assert!(full.contains("(os_error_24)"), "{full}");
    // While the guest holds them (it waits 3 s): the VMM answers.
    assert_eq!(ask(&api, r#"{"action":"pause"}"#), r#"{"ok":true}"#);
    assert_eq!(ask(&api, r#"{"action":"resume"}"#), r#"{"ok":true}"#);
    // Closed and forgotten, the descriptors come back: a 16 MiB write.
    let verdict = wait_for(&lines, "husk-test-init: fs-flood open=");
    assert!(verdict.ends_with("big_write=ok"), "{verdict}");
    assert_eq!(
        std::fs::metadata(share.join("big")).unwrap().len(),
        16 << 20
    );
    let after = own_rss_kib(pid);
    eprintln!("own RSS {before} KiB before, {after} KiB after; {verdict}");
    assert!(
        after.saturating_sub(before) < 16 * 1024,
        "the VMM grew by {} KiB",
        after - before
    );
    still_answers_and_runs(&api, &lines);
    stop(&api, vm);
}
