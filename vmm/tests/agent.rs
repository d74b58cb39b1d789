//! The agent as PID 1 of a real guest, started warm: the runtime's cache
//! boots it once and snapshots it when the agent signals it is ready; the
//! test restores that snapshot and drives the agent over hybrid vsock with
//! the host-agent protocol: run a process, stream its stdout and stderr,
//! get its exit status, refuse a program that does not exist, power off;
//! and configure the guest's network as the host describes it, a TAP in a
//! network namespace of the test's own on the other side.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    Netns, Scratch, VMM, agent_binary, kernel, open_tap, read_line_unbuffered, wait_with_timeout,
};
use husk_guest::initramfs::Initramfs;
use husk_guest::warm::{self, GuestImage, Origin};
use husk_protocol::{
    CONTROL_PORT, NetInterface, NetRoute, Process, Request, Response, STDIO_PORT, StdioAttach,
    Stream, handshake, read_frame, write_frame,
};
use husk_vmm::vm::READY_MARK;

/// Connects to a guest vsock port, retrying while the agent starts.
fn vsock(socket: &Path, port: u32) -> UnixStream {
    let deadline = Instant::now() + common::BOOT_TIMEOUT;
    loop {
        if let Ok(mut stream) = UnixStream::connect(socket) {
            // A guest that never answers fails the test instead of
            // hanging it.
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            writeln!(stream, "CONNECT {port}").unwrap();
            if read_line_unbuffered(&mut stream).is_ok_and(|answer| answer.starts_with("OK ")) {
                // A stuck guest fails the test instead of hanging it.
                stream
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                return stream;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the agent never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn attach(socket: &Path, exec_id: &str, stream: Stream) -> UnixStream {
    let mut conn = vsock(socket, STDIO_PORT);
    write_frame(
        &mut conn,
        &StdioAttach {
            id: String::new(),
            exec_id: exec_id.into(),
            stream,
        },
    )
    .unwrap();
    conn
}

fn process(args: &[&str]) -> Process {
    Process {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        ..Default::default()
    }
}

/// An initramfs whose init is the agent, with busybox at /bin/busybox.
fn agent_initramfs(scratch: &Scratch) -> PathBuf {
    let mut fs = Initramfs::with_base();
    fs.host_file("init", 0o755, &agent_binary()).unwrap();
    fs.dir("bin", 0o755).unwrap();
    fs.host_file("bin/busybox", 0o755, Path::new("/bin/busybox"))
        .unwrap();
    let initramfs = scratch.path("initramfs.cpio");
    fs.write_to(std::fs::File::create(&initramfs).unwrap())
        .unwrap();
    initramfs
}

#[test]
fn a_warm_started_agent_runs_a_process_and_reports_its_output_and_status() {
    let scratch = Scratch::new("agent");
    let initramfs = agent_initramfs(&scratch);

    // Cold boot once, snapshot at the agent's ready signal.
    let image = GuestImage {
        kernel: kernel(),
        initramfs,
        vcpus: 1,
        memory_mib: 128,
        ready_mark: READY_MARK,
        vsock: true,
        shares: Vec::new(),
        nets: 0,
    };
    let (snap, origin) = warm::snapshot(&scratch.path("root"), Path::new(VMM), &image).unwrap();
    assert_eq!(origin, Origin::Created);

    // Its guest has a vsock device: a restore without a socket for it is
    // refused before any VM starts.
    let out = common::run_with_timeout({
        let mut cmd = common::vmm_command();
        cmd.arg("--restore").arg(&snap);
        cmd
    });
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "husk-vmm: snapshot {} cannot be restored: its guest has a vsock device: give --vsock-socket",
            snap.display()
        )
    );

    // A warm start: the restored agent is listening already.
    let socket = scratch.path("vsock.sock");
    let child = common::vmm_command()
        .arg("--restore")
        .arg(&snap)
        .arg("--vsock-socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let mut control = vsock(&socket, CONTROL_PORT);
    let agent = handshake(&mut control, "husk-tests").unwrap();
    assert!(agent.peer.starts_with("husk-agent "), "{agent:?}");

    // Inline output is read from the control connection too.
    let mut records = control.try_clone().unwrap();
    let mut ask = |req: Request| -> Response {
        write_frame(&mut control, &req).unwrap();
        read_frame(&mut control).unwrap()
    };
    let exec = |exec_id: &str, args: &[&str]| Request::Exec {
        id: String::new(),
        exec_id: exec_id.into(),
        process: process(args),
        inline_output: false,
    };

    // A restored guest is made its own: the host's entropy mixed in and
    // its wall clock set, here to a date no snapshot could carry.
    let in_2031 = 1_925_000_000u64 * 1_000_000_000;
    assert_eq!(
        ask(Request::Clone(husk_protocol::CloneSeed {
            entropy: vec![7; 32],
            realtime_ns: in_2031,
        })),
        Response::Ok
    );
    assert_eq!(
        ask(exec("date", &["/bin/busybox", "date", "+%Y"])),
        Response::Ok
    );
    let mut year = String::new();
    attach(&socket, "date", Stream::Stdout)
        .read_to_string(&mut year)
        .unwrap();
    assert_eq!(year, "2031\n");

    let script = "echo hello from the guest; echo oops >&2; exit 7";
    assert_eq!(
        ask(exec("e1", &["/bin/busybox", "sh", "-c", script])),
        Response::Ok
    );
    let mut out = String::new();
    attach(&socket, "e1", Stream::Stdout)
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    attach(&socket, "e1", Stream::Stderr)
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(out, "hello from the guest\n");
    assert_eq!(err, "oops\n");
    let wait = |exec_id: &str| Request::Wait {
        id: String::new(),
        exec_id: exec_id.into(),
    };
    assert_eq!(
        ask(wait("e1")),
        Response::Exited {
            status: 7,
            oom_kills: None
        }
    );

    // Inline output: a process with no input and no terminal has its
    // output, in order, and then its status on the control connection;
    // the connection then takes requests again.
    let mut quiet = process(&[
        "/bin/busybox",
        "sh",
        "-c",
        "echo one; echo two >&2; /bin/busybox yes x | /bin/busybox head -c 200000; exit 5",
    ]);
    quiet.stdin_null = true;
    assert_eq!(
        ask(Request::Exec {
            id: String::new(),
            exec_id: "inline".into(),
            process: quiet.clone(),
            inline_output: true,
        }),
        Response::OutputFollows
    );
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = loop {
        match husk_protocol::read_output(&mut records).unwrap() {
            husk_protocol::Output::Stdout(d) => out.extend(d),
            husk_protocol::Output::Stderr(d) => err.extend(d),
            husk_protocol::Output::Exited(status) => break status,
        }
    };
    assert_eq!(status, 5);
    assert_eq!(err, b"two\n");
    let mut expected = b"one\n".to_vec();
    expected.extend(b"x\n".repeat(100_000));
    assert!(out == expected, "stdout: {} bytes", out.len());
    // With input (or a terminal) the request's inline_output does not
    // apply: the streams are attached as usual.
    quiet.stdin_null = false;
    quiet.args = vec!["/bin/busybox".into(), "true".into()];
    assert_eq!(
        ask(Request::Exec {
            id: String::new(),
            exec_id: "not-inline".into(),
            process: quiet,
            inline_output: true,
        }),
        Response::Ok
    );
    assert_eq!(
        ask(wait("not-inline")),
        Response::Exited {
            status: 0,
            oom_kills: None
        }
    );

    // A process killed by SIGKILL: 128 + 9.
    assert_eq!(
        ask(exec("e2", &["/bin/busybox", "sleep", "60"])),
        Response::Ok
    );
    assert_eq!(
        ask(Request::Signal {
            id: String::new(),
            exec_id: "e2".into(),
            signal: 9,
            all: false,
        }),
        Response::Ok
    );
    assert_eq!(
        ask(wait("e2")),
        Response::Exited {
            status: 137,
            oom_kills: None
        }
    );

    // A program that does not exist is refused by name, with the status
    // a shell gives it.
    match ask(exec("e3", &["/bin/nonexistent"])) {
        Response::NotStarted { message, status } => {
            assert!(message.starts_with("exec /bin/nonexistent: "), "{message}");
            assert_eq!(status, 127);
        }
        other => panic!("expected an error, got {other:?}"),
    }

    // Shutdown powers the guest off; the VMM exits 0 and removes its socket.
    write_frame(&mut control, &Request::Shutdown).unwrap();
    let out = wait_with_timeout(child);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!socket.exists());
}

/// The guest's network, configured by the agent. The warm snapshot is
/// taken with the VM's one network slot unbound (before anyone knows the
/// container's network); the restore binds a TAP made in a network
/// namespace of the test's own. `network` renames eth0, sets its MAC and
/// MTU, and addresses and routes it; a second request (as after a restore)
/// finds it under its new name and leaves nothing of the first. A process
/// in the guest then reaches a TCP listener in the namespace at an address
/// beyond its subnet, i.e. through its default route.
#[test]
fn a_warm_started_agent_configures_the_network_the_host_describes() {
    assert!(
        Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun (the tun module)"
    );
    let scratch = Scratch::new("agent-net");
    let initramfs = agent_initramfs(&scratch);
    let snap = scratch.path("snap");
    let made = common::run_with_timeout(common::vmm(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initramfs",
        initramfs.to_str().unwrap(),
        "--vsock-socket",
        scratch.path("boot.sock").to_str().unwrap(),
        "--nets",
        "1",
        "--snapshot-dir",
        snap.to_str().unwrap(),
        "--snapshot-at-mark",
        &READY_MARK.to_string(),
    ]));
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    let ns = Netns::new("agent-net");
    let tap = ns.run(|| open_tap("tap0"));
    ns.ip(&["addr", "add", "10.0.3.1/24", "dev", "tap0"]);
    // Outside the guest's subnet: only its default route leads here.
    ns.ip(&["addr", "add", "10.0.4.1/32", "dev", "tap0"]);
    ns.ip(&["link", "set", "tap0", "up"]);
    let listener = ns.run(|| TcpListener::bind("10.0.4.1:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        conn.write_all(b"hello from the host\n").unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        (peer.ip().to_string(), got)
    });

    let socket = scratch.path("vsock.sock");
    let child = common::vmm_command()
        .arg("--restore")
        .arg(&snap)
        .arg("--vsock-socket")
        .arg(&socket)
        .arg("--net")
        .arg(format!("0={}", tap.as_raw_fd()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The VMM holds its own copy now.
    drop(tap);

    let mut control = vsock(&socket, CONTROL_PORT);
    handshake(&mut control, "husk-tests").unwrap();
    let mut ask = |req: Request| -> Response {
        write_frame(&mut control, &req).unwrap();
        read_frame(&mut control).unwrap()
    };
    let mac = [0x02, 0x42, 0x0a, 0x00, 0x03, 0x0f];
    let network = |name: &str, address: [u8; 4]| Request::Network {
        interfaces: vec![NetInterface {
            slot: 0,
            name: name.into(),
            mac,
            mtu: 1400,
            addresses: vec![(address.into(), 24)],
            routes: vec![
                // The kernel's own route for the address: skipped.
                NetRoute {
                    dst: [10, 0, 3, 0].into(),
                    prefix: 24,
                    gateway: None,
                    metric: 0,
                },
                NetRoute {
                    dst: [0, 0, 0, 0].into(),
                    prefix: 0,
                    gateway: Some([10, 0, 3, 1].into()),
                    metric: 0,
                },
            ],
        }],
    };
    assert_eq!(ask(network("net0", [10, 0, 3, 99])), Response::Ok);
    assert_eq!(ask(network("eth0", [10, 0, 3, 15])), Response::Ok);
    assert_eq!(ask(network("eth0", [10, 0, 3, 15])), Response::Ok);
    // A slot the VM does not have is named.
    let Request::Network { mut interfaces } = network("eth1", [10, 0, 3, 16]) else {
        unreachable!()
    };
    interfaces[0].slot = 1;
    assert_eq!(
        ask(Request::Network { interfaces }),
        Response::Error {
            message: "network slot 1: no interface eth1 in the guest: No such device (os error 19)"
                .into()
        }
    );

    let script = format!(
        "cd /sys/class/net && busybox cat eth0/address eth0/mtu lo/flags && busybox ls && \
         echo hello from the guest | busybox nc -w 10 10.0.4.1 {port} && \
         busybox ip -4 addr show dev eth0 && busybox ip route && \
         echo ipv6 off: $(busybox cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6)"
    );
    let mut proc = process(&["/bin/busybox", "sh", "-c", &script]);
    proc.stdin_null = true;
    assert_eq!(
        ask(Request::Exec {
            id: String::new(),
            exec_id: "net".into(),
            process: proc,
            inline_output: false,
        }),
        Response::Ok
    );
    let mut out = String::new();
    attach(&socket, "net", Stream::Stdout)
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    attach(&socket, "net", Stream::Stderr)
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(
        ask(Request::Wait {
            id: String::new(),
            exec_id: "net".into(),
        }),
        Response::Exited {
            status: 0,
            oom_kills: None
        },
        "{out}{err}"
    );
    // MAC, MTU, lo up (IFF_UP | IFF_LOOPBACK), the interfaces, the
    // listener's answer.
    let want = "02:42:0a:00:03:0f\n1400\n0x9\neth0\nlo\nhello from the host\n";
    assert!(out.starts_with(want), "{out}");
    let (peer, got) = server.join().unwrap();
    assert_eq!(
        (peer.as_str(), got.as_str()),
        ("10.0.3.15", "hello from the guest\n")
    );
    // The first request's address is gone; the kernel's subnet route
    // stands, beside the default route.
    assert!(out.contains("inet 10.0.3.15/24 "), "{out}");
    assert!(!out.contains("10.0.3.99"), "{out}");
    assert!(out.contains("default via 10.0.3.1 dev eth0"), "{out}");
    assert!(out.contains("10.0.3.0/24 dev eth0"), "{out}");
    // No IPv6 address given: IPv6 is off on the interface.
    assert!(out.contains("ipv6 off: 1\n"), "{out}");

    write_frame(&mut control, &Request::Shutdown).unwrap();
    let out = wait_with_timeout(child);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
