//! virtio-net on a real guest: a TAP made in a network namespace of the
//! test's own is handed to the VMM (at boot, at restore, or over the API
//! socket); the guest's init brings `eth0` up and echoes UDP, and the host
//! side, in that namespace, sends a small datagram and one that IP
//! fragments into many frames each way, and gets both back byte-exact.

mod common;

use std::io::Write;
use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::{Netns, Scratch, kernel, open_tap, spawn_vmm, test_initramfs};

/// A TAP in namespace `ns`, addressed 10.0.2.1/24 and up.
fn tap_in(ns: &Netns) -> OwnedFd {
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun (the tun module)"
    );
    let tap = ns.run(|| open_tap("tap0"));
    ns.ip(&["addr", "add", "10.0.2.1/24", "dev", "tap0"]);
    ns.ip(&["link", "set", "tap0", "up"]);
    tap
}

/// Waits for the guest's echo, sends a small datagram and one that IP
/// fragments into many frames each way, checks both come back
/// byte-exact, ends the guest's echo and checks the VMM's exit.
fn echo_through(ns: &Netns, mut child: std::process::Child, lines: &Receiver<String>) {
    let wait_for = |want: &str| loop {
        let line = lines
            .recv_timeout(common::BOOT_TIMEOUT)
            .unwrap_or_else(|_| panic!("the guest never printed {want:?}"));
        assert!(!line.contains("net FAIL"), "{line}");
        if line.contains(want) {
            return line;
        }
    };
    wait_for("husk-test-init: net listening on 7");
    let big: Vec<u8> = (0..30_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let echoed = ns.run(move || {
        let udp = UdpSocket::bind("10.0.2.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut back = Vec::new();
        for datagram in [b"hello through virtio-net".to_vec(), big] {
            udp.send_to(&datagram, "10.0.2.15:7").unwrap();
            let mut buf = vec![0u8; 65536];
            let (n, from) = udp.recv_from(&mut buf).unwrap();
            assert_eq!(from.to_string(), "10.0.2.15:7");
            back.push((datagram, buf[..n].to_vec()));
        }
        udp.send_to(b"end", "10.0.2.15:7").unwrap();
        back
    });
    for (sent, got) in echoed {
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the echo of {} bytes differs", sent.len());
    }
    assert_eq!(
        wait_for("husk-test-init: net "),
        "husk-test-init: net echoed 2 datagrams"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// The TAP given at boot (`--net 0=FD`).
#[test]
fn a_guest_on_a_tap_echoes_udp_byte_exact() {
    let scratch = Scratch::new("net");
    let initramfs = test_initramfs(&scratch);
    let ns = Netns::new("net");
    let tap = tap_in(&ns);
    let net = format!("0={}", tap.as_raw_fd());
    let (child, lines) = spawn_vmm(&[
        "--kernel".as_ref(),
        kernel().as_os_str(),
        "--initramfs".as_ref(),
        initramfs.as_os_str(),
        "--cmdline=-- net-echo".as_ref(),
        "--nets".as_ref(),
        "1".as_ref(),
        "--net".as_ref(),
        net.as_ref(),
    ]);
    // The VMM holds its own copy now.
    drop(tap);
    echo_through(&ns, child, &lines);
}

/// The warm start's way: a snapshot taken with an unbound slot (before
/// anyone knows the container's network), restored twice: once with the
/// TAP bound over the API socket after the restore (`attach_net`, the
/// descriptor as SCM_RIGHTS), once with it given at restore
/// (`--net 0=FD`). Both carry traffic.
#[test]
fn a_restored_guest_gets_its_tap_at_restore_or_over_the_api() {
    let scratch = Scratch::new("net-restore");
    let initramfs = test_initramfs(&scratch);
    let snap = scratch.path("snap");
    let made = common::run_with_timeout(common::vmm(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initramfs",
        initramfs.to_str().unwrap(),
        "--cmdline=-- net-echo",
        "--nets",
        "1",
        "--snapshot-dir",
        snap.to_str().unwrap(),
        "--snapshot-at-mark",
        "2",
    ]));
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    // Over the API, after the restore.
    let ns = Netns::new("net-api");
    let tap = tap_in(&ns);
    let api = scratch.path("api.sock");
    let (child, lines) = spawn_vmm(&[
        "--restore".as_ref(),
        snap.as_os_str(),
        "--api-socket".as_ref(),
        api.as_os_str(),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let stream = loop {
        match UnixStream::connect(&api) {
            Ok(s) => break s,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "api socket: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let ask = |line: &[u8], fd: Option<&OwnedFd>| {
        match fd {
            Some(fd) => husk_sys::fd::send_fd(&stream, fd.as_fd(), line).unwrap(),
            None => (&stream).write_all(line).unwrap(),
        }
        common::read_line_unbuffered(&mut &stream).unwrap()
    };
    assert_eq!(
        ask(b"{\"action\":\"attach_net\",\"slot\":3}\n", Some(&tap)),
        "{\"ok\":false,\"error\":\"no network slot 3: this VM has 1\"}\n"
    );
    assert_eq!(
        ask(b"{\"action\":\"attach_net\",\"slot\":0}\n", Some(&tap)),
        "{\"ok\":true}\n"
    );
    let again = ask(b"{\"action\":\"attach_net\",\"slot\":0}\n", Some(&tap));
    assert!(again.contains("network slot 0"), "{again}");
    drop(tap);
    echo_through(&ns, child, &lines);
    drop(ns);

    // Given at restore.
    let ns = Netns::new("net-at-restore");
    let tap = tap_in(&ns);
    let net = format!("0={}", tap.as_raw_fd());
    let (child, lines) = spawn_vmm(&[
        "--restore".as_ref(),
        snap.as_os_str(),
        "--net".as_ref(),
        net.as_ref(),
    ]);
    drop(tap);
    echo_through(&ns, child, &lines);
}

#[test]
fn taps_for_slots_the_vm_lacks_are_refused_by_name() {
    let scratch = Scratch::new("net-bad");
    let initramfs = test_initramfs(&scratch);
    // An open, inheritable descriptor to name.
    // SAFETY: open of a NUL-terminated path; without O_CLOEXEC on purpose.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
    // SAFETY: `fd` was just opened and is owned here alone.
    let _null = unsafe { OwnedFd::from_raw_fd(fd) };
    let slot1 = format!("1={fd}");
    let twice = format!("0={fd}");
    for (args, want) in [
        (
            vec!["--nets", "1", "--net", &slot1],
            "a TAP was given for network slot 1, but this VM has 1",
        ),
        (
            vec!["--nets", "2", "--net", &twice, "--net", &slot1],
            "is given twice",
        ),
        (vec!["--nets", "5"], "5 network slots asked for"),
        (vec!["--nets", "1", "--net", "0=2"], "is stdio, not a TAP"),
        (
            vec!["--nets", "1", "--net", "0=250"],
            "descriptor 250 is not open",
        ),
        (vec!["--nets", "1", "--net", "zero"], "is not SLOT=FD"),
    ] {
        let out = common::vmm_command()
            .arg("--kernel")
            .arg(kernel())
            .arg("--initramfs")
            .arg(&initramfs)
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
