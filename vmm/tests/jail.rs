//! Issue 18: what a running VMM holds, read from the host as an operator
//! (or an attacker on the host) would: `/proc/<vmm>/task/*/status`, its
//! rlimits, its namespaces, its descriptors and its root (its jail).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use common::{Scratch, kernel, test_initramfs};

/// CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER and CAP_FSETID: what a vCPU
/// thread (the virtio-fs server) keeps, and what bounds every thread.
const VCPU_CAPS: u64 = 0x1b;
/// CAP_DAC_OVERRIDE: the main thread's (it removes its sockets and writes
/// its timings in root's directories).
const MAIN_CAPS: u64 = 0x2;

/// The `Name:\tvalue` fields of a status file.
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in\n{status}"))
        .trim()
}

fn hex(value: &str) -> u64 {
    u64::from_str_radix(value, 16).unwrap()
}

#[test]
fn every_thread_of_a_running_vmm_holds_only_what_its_kind_needs() {
    use std::os::unix::process::CommandExt;
    let scratch = Scratch::new("jail-threads");
    let initramfs = test_initramfs(&scratch);
    let api = scratch.path("api.sock");
    let vsock = scratch.path("vsock.sock");
    let mut cmd = common::vmm_command();
    cmd.arg("--kernel")
        .arg(kernel())
        .arg("--initramfs")
        .arg(&initramfs)
        .arg("--cmdline=-- ticks")
        .args(["--cpus", "2", "--nets", "1"])
        .arg("--api-socket")
        .arg(&api)
        .arg("--vsock-socket")
        .arg(&vsock)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // A descriptor the VMM inherits without asking for it (as a careless
    // starter would leave one): it must be closed in the VMM.
    // SAFETY: open and dup2 in the forked child, before exec.
    unsafe {
        cmd.pre_exec(|| {
            let fd = libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY);
            if fd >= 0 {
                libc::dup2(fd, 57);
            }
            Ok(())
        });
    }
    // As husk spawns every VMM: PID 1 of a PID namespace of its own.
    let (mut child, _starter) = husk_sys::child::spawn_vmm(&mut cmd).unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, ticks) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("husk-test-init: tick ") {
                let _ = tx.send(());
            }
        }
    });
    assert!(
        ticks.recv_timeout(common::BOOT_TIMEOUT).is_ok(),
        "the guest never ticked"
    );
    let pid = child.id();
    let proc = std::path::PathBuf::from(format!("/proc/{pid}"));

    // Its PID namespace is its own, and it is that namespace's 1; ours is
    // as it was (the spawner set its own back).
    let status = std::fs::read_to_string(proc.join("status")).unwrap();
    let nspid: Vec<&str> = field(&status, "NSpid").split_whitespace().collect();
    assert_eq!(nspid, [pid.to_string().as_str(), "1"]);
    let ns = |p: &str| std::fs::read_link(format!("{p}/ns/pid")).unwrap();
    assert_ne!(ns(&format!("/proc/{pid}")), ns("/proc/self"));
    assert_eq!(
        ns("/proc/thread-self"),
        std::fs::read_link("/proc/thread-self/ns/pid_for_children").unwrap()
    );

    // Every thread: its capabilities, no_new_privs, its filter.
    let mut kinds = Vec::new();
    for task in std::fs::read_dir(proc.join("task")).unwrap() {
        let task = task.unwrap().path();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let name = field(&status, "Name").to_owned();
        if name.starts_with("kvm-") {
            // KVM's own worker (kvm-nx-lpage-recovery), made by the kernel
            // in the VMM's process: it runs no user code.
            continue;
        }
        let keep = if name.starts_with("husk-vcpu") {
            VCPU_CAPS
        } else if name == "husk-vmm" {
            MAIN_CAPS
        } else {
            0
        };
        let permitted = hex(field(&status, "CapPrm"));
        let effective = hex(field(&status, "CapEff"));
        assert_eq!(permitted, keep, "{name}: CapPrm");
        // The file server drops its effective set while it acts as the
        // guest's user: never more than permitted.
        assert_eq!(effective & !keep, 0, "{name}: CapEff {effective:#x}");
        assert_eq!(hex(field(&status, "CapBnd")), VCPU_CAPS, "{name}: CapBnd");
        // Its own uid and gid, every one of real, effective, saved and fs.
        let id = (0x7000_0000u32 + pid).to_string();
        for ids in ["Uid", "Gid"] {
            let all: Vec<&str> = field(&status, ids).split_whitespace().collect();
            assert_eq!(all, [id.as_str(); 4], "{name}: {ids}");
        }
        assert_eq!(field(&status, "Groups"), "", "{name}: Groups");
        assert_eq!(hex(field(&status, "CapInh")), 0, "{name}: CapInh");
        assert_eq!(hex(field(&status, "CapAmb")), 0, "{name}: CapAmb");
        assert_eq!(field(&status, "NoNewPrivs"), "1", "{name}: NoNewPrivs");
        assert_eq!(field(&status, "Seccomp"), "2", "{name}: Seccomp");
        kinds.push(name);
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "husk-api",
            "husk-vcpu0",
            "husk-vcpu1",
            "husk-vmm",
            "husk-vsock"
        ],
        "the VMM's threads"
    );

    // Its rlimits.
    let limits = std::fs::read_to_string(proc.join("limits")).unwrap();
    let limit = |name: &str| -> Vec<String> {
        let line = limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{limits}"));
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(limit("Max core file size"), ["0", "0"]);
    // 65536, or the hard limit it inherited if lower (raising it needs
    // CAP_SYS_RESOURCE): soft and hard alike.
    let files = limit("Max open files");
    assert_eq!(files[0], files[1], "{files:?}");
    assert!(files[0].parse::<u64>().unwrap() <= 65536, "{files:?}");
    let fsize = (256u64 << 30).to_string();
    assert_eq!(limit("Max file size"), [fsize.as_str(), fsize.as_str()]);

    // Its namespaces: IPC, UTS and network its own.
    for ns in ["ipc", "uts", "net"] {
        let its = std::fs::read_link(proc.join("ns").join(ns)).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(its, ours, "the VMM is in the host's {ns} namespace");
    }

    // The inherited descriptor is gone; each one left is the VMM's own.
    for fd in std::fs::read_dir(proc.join("fd")).unwrap() {
        let fd = fd.unwrap();
        let target = std::fs::read_link(fd.path()).unwrap();
        assert_ne!(
            target,
            std::path::Path::new("/etc/hostname"),
            "descriptor {:?} was inherited and kept",
            fd.file_name()
        );
    }

    // Its root is its jail: a read-only tmpfs holding, at their own paths,
    // /dev/kvm, its own /proc/<pid> as /proc/self, the kernel, the
    // initramfs and its sockets' directory; nothing else of the host.
    let root = proc.join("root");
    let names = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("{dir} in the jail: {e}"))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names("dev"), ["kvm"]);
    assert_eq!(names("proc"), ["self"]);
    assert!(!root.join("etc").exists(), "the host's /etc is in the jail");
    assert!(!root.join("usr").exists(), "the host's /usr is in the jail");
    let mountinfo = std::fs::read_to_string(proc.join("mountinfo")).unwrap();
    let mut points: Vec<&str> = mountinfo
        .lines()
        .map(|l| l.split(' ').nth(4).unwrap())
        .collect();
    points.sort();
    let scratch_dir = scratch.0.to_str().unwrap();
    let kernel_path = kernel();
    let mut expected = vec![
        "/",
        "/dev/kvm",
        "/proc/self",
        kernel_path.to_str().unwrap(),
        scratch_dir,
    ];
    let initramfs_at = initramfs.to_str().unwrap();
    expected.push(initramfs_at);
    expected.sort();
    assert_eq!(points, expected, "the jail's mounts:\n{mountinfo}");
    let root_line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap();
    assert!(
        root_line.contains(" ro,") && root_line.contains(" - tmpfs "),
        "{root_line}"
    );
    let initramfs_size = std::fs::metadata(&initramfs).unwrap().len();

    let mut stream = UnixStream::connect(&api).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    writeln!(stream, r#"{{"action":"stop"}}"#).unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).unwrap();
    assert_eq!(answer.trim(), r#"{"ok":true}"#);
    assert!(child.wait().unwrap().success());
    // Making the jail wrote nothing on the host: the initramfs beside the
    // sockets is as it was.
    assert_eq!(std::fs::metadata(&initramfs).unwrap().len(), initramfs_size);
    assert!(initramfs_size > 0);
    assert!(!api.exists(), "the VMM left its socket behind");
}

/// The jail tried from inside (`husk-vmm --self-test`): with a real VMM
/// running beside it, a file of "another container", and a TCP listener on
/// the host, every attempt to get out is refused, by the jail alone and
/// with Landlock and seccomp on top, while its own share still serves.
#[test]
fn the_self_test_finds_every_escape_refused() {
    let scratch = Scratch::new("jail-self-test");
    let initramfs = test_initramfs(&scratch);
    let (mut other, lines) = common::spawn_vmm(&[
        "--kernel".as_ref(),
        kernel().as_os_str(),
        "--initramfs".as_ref(),
        initramfs.as_os_str(),
        "--cmdline=-- ticks".as_ref(),
    ]);
    // Running (jailed, with its own uid) before the probes aim at it.
    let ticked = lines
        .iter()
        .any(|l: String| l.starts_with("husk-test-init: tick "));
    assert!(ticked, "the other VMM never ticked");
    let secret = scratch.path("other-container/secret");
    std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
    std::fs::write(&secret, b"not yours").unwrap();
    let share = scratch.path("share");
    std::fs::create_dir_all(&share).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = common::run_with_timeout({
        let mut cmd = common::vmm(&[]);
        cmd.arg("--self-test")
            .arg("--kernel")
            .arg(kernel())
            .arg("--share")
            .arg(format!("s={}", share.display()))
            .arg("--self-test-pid")
            .arg(other.id().to_string())
            .arg("--self-test-file")
            .arg(&secret)
            .arg("--self-test-port")
            .arg(port.to_string());
        cmd
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut layers = std::collections::BTreeMap::<String, usize>::new();
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["as_it_must_be"], true, "{line}");
        let control = v["control"].as_bool().unwrap();
        assert_eq!(v["refused"].as_bool().unwrap(), !control, "{line}");
        *layers
            .entry(v["layer"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    // Every probe ran in both layers (23 probes and 1 control each).
    assert_eq!(
        layers.values().copied().collect::<Vec<_>>(),
        [24, 24],
        "{layers:?}\n{stdout}{stderr}"
    );
    assert!(out.status.success(), "{}\n{stdout}{stderr}", out.status);
    assert!(stdout.contains(r#""probe":"kill another VMM""#), "{stdout}");
    // Nothing reached the host, and the other VMM still runs.
    assert_eq!(std::fs::read(&secret).unwrap(), b"not yours");
    assert!(std::fs::read_dir(&share).unwrap().next().is_none());
    assert!(other.try_wait().unwrap().is_none(), "the other VMM ended");
    let _ = other.kill();
    let _ = other.wait();
}

/// A uid change clears the parent-death signal: the jail sets it again, so
/// a jailed VMM still dies with the process that started it (husk's
/// monitor, a test), here a shell killed with SIGKILL.
#[test]
fn a_jailed_vmm_still_dies_with_its_parent() {
    let scratch = Scratch::new("jail-pdeath");
    let initramfs = test_initramfs(&scratch);
    let mut shell = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "setpriv --pdeathsig KILL {} --kernel {} --initramfs {} '--cmdline=-- ticks' \
             > /dev/null 2>&1 & echo $!; wait",
            common::VMM,
            kernel().display(),
            initramfs.display()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(shell.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let vmm: u32 = line.trim().parse().unwrap();
    // Jailed: its own uid.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
        let uid = field(&status, "Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        if uid != "0" {
            assert_eq!(uid, (0x7000_0000u32 + vmm).to_string());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never jailed");
        std::thread::sleep(Duration::from_millis(20));
    }
    shell.kill().unwrap();
    shell.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while husk_test_support::alive(vmm) {
        if std::time::Instant::now() > deadline {
            husk_test_support::kill(vmm, rustix::process::Signal::KILL);
            panic!("the VMM outlived its parent");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
