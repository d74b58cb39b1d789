//! runc's lifecycle commands on real microVMs (warm starts from the
//! cached snapshot), each wrong-state error, and what a killed VMM or
//! monitor leaves behind: nothing, once `delete` has run.

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_runtime::state::{ContainerState, HostProcess};

use common::{Bundle, HUSK, husk, id, ok, root, status, text};

/// Fails with exit 1 and a message containing `says`.
fn refused(args: &[&str], says: &str) {
    let out = common::refused(args, says);
    assert_eq!(
        out.status.code(),
        Some(1),
        "husk {args:?} should fail with 1"
    );
}

fn wait_for_status(id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(id) != want {
        assert!(Instant::now() < deadline, "{id} never became {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Nothing of container `id` is left: no state, and none of `procs` runs.
fn nothing_left(id: &str, procs: &[HostProcess]) {
    assert!(!root().join("containers").join(id).exists());
    for p in procs {
        assert!(!p.alive(), "process {} outlived its container", p.pid);
    }
    refused(&["state", id], "does not exist");
}

#[test]
fn create_start_exec_pause_resume_kill_delete() {
    let b = Bundle::new("life", &["sleep", "1000"], |_| {});
    let id = id("life");
    let pid_file = b.0.join("pid");
    let bundle = b.0.to_str().unwrap();
    ok(&[
        "create",
        "--bundle",
        bundle,
        "--pid-file",
        pid_file.to_str().unwrap(),
        &id,
    ]);
    let state: serde_json::Value = serde_json::from_str(&ok(&["state", &id])).unwrap();
    assert_eq!(state["status"], "created");
    // The version husk implements, as `features` and `--version` say.
    assert_eq!(state["ociVersion"], "1.2.0");
    let features: serde_json::Value = serde_json::from_str(&ok(&["features"])).unwrap();
    assert_eq!(features["ociVersionMax"], state["ociVersion"]);
    assert!(
        ok(&["--version"]).ends_with("\nspec: 1.2.0\n"),
        "{}",
        ok(&["--version"])
    );
    assert_eq!(
        state["bundle"],
        b.0.canonicalize().unwrap().to_str().unwrap()
    );
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert_eq!(state["pid"], pid);
    let recorded = ContainerState::load(&root(), &id).unwrap();
    let procs: Vec<HostProcess> = [recorded.monitor, recorded.vmm]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(procs.len(), 2);
    // Created: nothing to exec into, no second create.
    refused(
        &["exec", &id, "true"],
        "is created: only a running container",
    );
    refused(&["create", "--bundle", bundle, &id], "exists");

    ok(&["start", &id]);
    assert_eq!(status(&id), "running");
    refused(
        &["start", &id],
        "is running: only a created container can be started",
    );
    assert_eq!(status(&id), "running", "a refused start changes nothing");

    // exec: output and status of another process in the container (stdin
    // /dev/null: both sent on the control connection).
    assert_eq!(ok(&["exec", &id, "echo", "from exec"]), "from exec\n");
    let out = husk(&["exec", "-e", "N=4", &id, "sh", "-c", "echo e >&2; exit $N"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(text(&out.stderr), "e\n");
    // With input, the streams are connections of their own.
    let mut cat = Command::new(HUSK)
        .args(common::with_root(&[
            "exec",
            &id,
            "sh",
            "-c",
            "cat; echo x >&2; exit 3",
        ]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut cat.stdin.take().unwrap(), b"to the guest\n").unwrap();
    let out = cat.wait_with_output().unwrap();
    assert_eq!(
        (
            out.status.code(),
            text(&out.stdout).as_str(),
            text(&out.stderr).as_str()
        ),
        (Some(3), "to the guest\n", "x\n")
    );
    let out = husk(&["exec", &id, "/no/such"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("/no/such"),
        "{}",
        text(&out.stderr)
    );
    let pids: Vec<i32> = serde_json::from_str(&ok(&["ps", "--format", "json", &id])).unwrap();
    // Guest PIDs of the container's processes: `sleep` at least.
    assert!(!pids.is_empty() && pids.iter().all(|&p| p > 1), "{pids:?}");

    // list shows it.
    let list: serde_json::Value = serde_json::from_str(&ok(&["list", "--format", "json"])).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == id.as_str())
    );

    ok(&["pause", &id]);
    assert_eq!(status(&id), "paused");
    refused(
        &["pause", &id],
        "is paused: only a running container can be paused",
    );
    refused(&["exec", &id, "true"], "is paused");
    ok(&["resume", &id]);
    assert_eq!(status(&id), "running");
    refused(
        &["resume", &id],
        "is running: only a paused container can be resumed",
    );

    // A running container is not deleted without --force.
    refused(
        &["delete", &id],
        "is running: stop it first, or delete it with --force",
    );
    assert_eq!(status(&id), "running");
    refused(
        &["kill", &id, "NOTASIGNAL"],
        "\"NOTASIGNAL\" is not a signal",
    );

    ok(&["kill", &id, "KILL"]);
    wait_for_status(&id, "stopped");
    let recorded = ContainerState::load(&root(), &id).unwrap();
    assert_eq!(recorded.exit_status, Some(137));
    refused(&["exec", &id, "true"], "is stopped");
    refused(&["kill", &id], "is stopped");
    assert_eq!(ok(&["ps", "--format", "json", &id]).trim(), "[]");
    ok(&["delete", &id]);
    nothing_left(&id, &procs);
}

#[test]
fn the_specs_seccomp_profile_holds_for_its_process_and_its_execs() {
    // Without no_new_privileges (loaded before the identity is set), a
    // profile that refuses sethostname with EPERM and chmod with ENOSYS.
    let with_profile = |profile: serde_json::Value| {
        move |spec: &mut oci_spec::runtime::Spec| {
            spec.process_mut()
                .as_mut()
                .unwrap()
                .set_no_new_privileges(Some(false));
            spec.linux_mut()
                .as_mut()
                .unwrap()
                .set_seccomp(Some(serde_json::from_value(profile).unwrap()));
        }
    };
    let b = Bundle::new(
        "seccomp",
        &["sleep", "1000"],
        with_profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["chmod", "fchmodat", "fchmodat2"], "action": "SCMP_ACT_ERRNO",
                 "errnoRet": 38}
            ]
        })),
    );
    let id = id("seccomp");
    ok(&["create", "--bundle", b.0.to_str().unwrap(), &id]);
    ok(&["start", &id]);
    let out = ok(&[
        "exec",
        &id,
        "sh",
        "-c",
        "grep Seccomp /proc/1/status; hostname other 2>&1; echo $?; \
         chmod 700 /tmp 2>&1; echo $?; ls / >/dev/null && echo allowed",
    ]);
    assert_eq!(
        out,
        "Seccomp:\t2\nSeccomp_filters:\t1\n\
         hostname: sethostname: Operation not permitted\n1\n\
         chmod: /tmp: Function not implemented\n1\nallowed\n"
    );
    ok(&["delete", "--force", &id]);

    // A profile the guest cannot honour: refused by name, nothing left.
    let bad = Bundle::new(
        "seccomp-bad",
        &["true"],
        with_profile(serde_json::json!({"defaultAction": "SCMP_ACT_NOTIFY"})),
    );
    let bad_id = common::id("seccomp-bad");
    refused(
        &["create", "--bundle", bad.0.to_str().unwrap(), &bad_id],
        "linux.seccomp: seccomp action SCMP_ACT_NOTIFY is not supported",
    );
    nothing_left(&bad_id, &[]);
}

#[test]
fn a_created_container_is_deleted_and_run_detached_writes_its_pid() {
    let b = Bundle::new("created", &["sleep", "1000"], |_| {});
    let bundle = b.0.to_str().unwrap();
    let id1 = id("created");
    ok(&["create", "--bundle", bundle, &id1]);
    let recorded = ContainerState::load(&root(), &id1).unwrap();
    // runc deletes a created container without --force.
    ok(&["delete", &id1]);
    nothing_left(&id1, &[recorded.monitor.unwrap(), recorded.vmm.unwrap()]);

    let id2 = id("detached");
    let pid_file = b.0.join("pid2");
    ok(&[
        "run",
        "-d",
        "--bundle",
        bundle,
        "--pid-file",
        pid_file.to_str().unwrap(),
        &id2,
    ]);
    assert_eq!(status(&id2), "running");
    let recorded = ContainerState::load(&root(), &id2).unwrap();
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert_eq!(recorded.monitor.unwrap().pid, pid);
    ok(&["delete", "--force", &id2]);
    nothing_left(&id2, &[recorded.monitor.unwrap(), recorded.vmm.unwrap()]);
    refused(
        &["start", "nope-nothing"],
        "container \"nope-nothing\" does not exist",
    );
}

#[test]
fn a_killed_vmm_or_monitor_leaves_nothing_after_delete() {
    let b = Bundle::new("crash", &["sleep", "1000"], |_| {});
    let bundle = b.0.to_str().unwrap();
    // The VMM killed under a running container.
    let id1 = id("crash-vmm");
    ok(&["run", "-d", "--bundle", bundle, &id1]);
    let recorded = ContainerState::load(&root(), &id1).unwrap();
    assert!(recorded.vmm.unwrap().signal(libc::SIGKILL));
    wait_for_status(&id1, "stopped");
    let after = ContainerState::load(&root(), &id1).unwrap();
    assert!(
        after
            .error
            .as_deref()
            .unwrap_or("")
            .starts_with("the VM ended: husk-vmm signal: 9"),
        "{:?}",
        after.error
    );
    ok(&["delete", &id1]);
    nothing_left(&id1, &[recorded.monitor.unwrap(), recorded.vmm.unwrap()]);

    // The monitor killed: its VMM dies with it; the state says stopped.
    let id2 = id("crash-monitor");
    ok(&["create", "--bundle", bundle, &id2]);
    let recorded = ContainerState::load(&root(), &id2).unwrap();
    assert!(recorded.monitor.unwrap().signal(libc::SIGKILL));
    wait_for_status(&id2, "stopped");
    let deadline = Instant::now() + Duration::from_secs(10);
    while recorded.vmm.unwrap().alive() {
        assert!(Instant::now() < deadline, "the VMM outlived its monitor");
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(&["delete", &id2]);
    nothing_left(&id2, &[recorded.monitor.unwrap(), recorded.vmm.unwrap()]);
}

/// Receives one descriptor sent over `listener` with SCM_RIGHTS.
fn receive_fd(listener: &UnixListener) -> OwnedFd {
    let (conn, _) = listener.accept().unwrap();
    husk_sys::fd::recv_fd(&conn).unwrap()
}

#[test]
fn the_console_socket_receives_the_containers_terminal() {
    let b = Bundle::new(
        "console",
        &["sh", "-c", "read line; echo \"got $line\"; exit 5"],
        |spec| {
            spec.process_mut()
                .as_mut()
                .unwrap()
                .set_terminal(Some(true));
        },
    );
    let id = id("console");
    let socket = b.0.join("console.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let bundle = b.0.to_str().unwrap().to_owned();
    let (socket_arg, id_arg) = (socket.to_str().unwrap().to_owned(), id.clone());
    let creating = std::thread::spawn(move || {
        husk(&[
            "create",
            "--bundle",
            &bundle,
            "--console-socket",
            &socket_arg,
            &id_arg,
        ])
    });
    let master = receive_fd(&listener);
    assert!(rustix::termios::isatty(&master), "a terminal's master");
    let out = creating.join().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    ok(&["start", &id]);
    let mut term = std::fs::File::from(master);
    use std::io::{Read, Write};
    term.write_all(b"hello\n").unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 256];
    while !seen.contains("got hello") {
        assert!(
            Instant::now() < deadline,
            "no answer on the terminal: {seen:?}"
        );
        match term.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    assert!(seen.contains("got hello"), "{seen:?}");
    wait_for_status(&id, "stopped");
    assert_eq!(
        ContainerState::load(&root(), &id).unwrap().exit_status,
        Some(5)
    );
    ok(&["delete", &id]);
    let _ = Path::new(&socket);
}

/// Reads the terminal until `want` appears (60 s at most).
fn read_until(term: &mut std::fs::File, want: &str) -> String {
    use std::io::Read;
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 256];
    while !seen.contains(want) {
        assert!(
            Instant::now() < deadline,
            "no {want:?} on the terminal: {seen:?}"
        );
        match term.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    assert!(seen.contains(want), "{seen:?}");
    seen
}

/// Creates (or restores, `restore` naming the checkpoint) container `id`
/// of bundle `b` with a console socket; returns the terminal's master.
fn with_console(b: &Bundle, id: &str, restore: Option<&Path>) -> std::fs::File {
    let socket = b.0.join(format!("console-{}.sock", restore.is_some()));
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    let mut args: Vec<String> = match restore {
        Some(image) => vec![
            "restore".into(),
            "-d".into(),
            "--image-path".into(),
            image.display().to_string(),
        ],
        None => vec!["create".into()],
    };
    args.extend([
        "--bundle".into(),
        b.0.display().to_string(),
        "--console-socket".into(),
        socket.display().to_string(),
        id.to_owned(),
    ]);
    let making = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        husk(&args)
    });
    let master = receive_fd(&listener);
    let out = making.join().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::File::from(master)
}

#[test]
fn a_terminal_container_restored_from_a_checkpoint_gets_a_new_terminal() {
    let b = Bundle::new(
        "ckpt-tty",
        &[
            "sh",
            "-c",
            "i=0; while read line; do i=$((i+1)); echo \"got $line #$i\"; done",
        ],
        |spec| {
            spec.process_mut()
                .as_mut()
                .unwrap()
                .set_terminal(Some(true));
        },
    );
    let id = id("ckpt-tty");
    let mut term = with_console(&b, &id, None);
    ok(&["start", &id]);
    use std::io::Write;
    term.write_all(b"one\n").unwrap();
    read_until(&mut term, "got one #1");
    let image = b.0.join("checkpoint");
    ok(&["checkpoint", "--image-path", image.to_str().unwrap(), &id]);
    assert_eq!(status(&id), "stopped");
    ok(&["delete", &id]);
    // The shell, its count and its terminal's line go on in the restored
    // VM; the terminal the host sees is a new one.
    let mut term = with_console(&b, &id, Some(&image));
    assert_eq!(status(&id), "running");
    term.write_all(b"two\n").unwrap();
    read_until(&mut term, "got two #2");
    ok(&["kill", &id, "KILL"]);
    wait_for_status(&id, "stopped");
    ok(&["delete", &id]);
    refused(&["state", &id], "does not exist");
}

#[test]
fn doctor_names_what_this_host_has_and_what_is_missing() {
    // This host runs husk: every check printed, none failed.
    let out = husk(&["doctor"]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}");
    for name in [
        "kvm:",
        "hardware virtualization:",
        "seccomp:",
        "husk's builds:",
        "cgroups:",
        "overlayfs:",
        "tun:",
        "CNI plugins:",
        "iptables:",
        "containerd:",
    ] {
        assert!(report.contains(name), "{name} missing from\n{report}");
    }
    assert!(report.contains("ok   kvm: /dev/kvm (API 12)"), "{report}");
    assert!(report.ends_with("husk can run containers on this host\n"));
    // Without its VMM, it cannot, and says what to do.
    let out = Command::new(HUSK)
        .arg("doctor")
        .env("HUSK_VMM", "/nonexistent/husk-vmm")
        .output()
        .unwrap();
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("FAIL husk's builds: ") && report.contains("HUSK_VMM"),
        "{report}"
    );
    assert!(
        report.contains("fix: `make kernel agent build`"),
        "{report}"
    );
    assert!(
        report.ends_with("husk cannot run containers on this host: husk's builds\n"),
        "{report}"
    );
}

#[test]
fn features_and_spec_are_runcs() {
    let v: serde_json::Value = serde_json::from_str(&ok(&["features"])).unwrap();
    // Seccomp is applied in the guest, with what the agent compiles.
    assert_eq!(v["linux"]["seccomp"]["enabled"], true);
    assert_eq!(
        v["linux"]["seccomp"]["archs"],
        serde_json::json!(["SCMP_ARCH_X86_64"])
    );
    assert_eq!(v["ociVersionMin"], "1.0.0");
    // Namespaces by path: what husk does with them is said (issue 19).
    let said = v["annotations"]["io.husk.namespaces"].as_str().unwrap();
    assert!(said.contains("given by path is refused"), "{said}");
    for ns in ["pid", "user"] {
        assert!(
            v["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .contains(&ns.into()),
            "{ns}"
        );
    }
    assert!(v["annotations"]["io.husk.userns"].is_string());
    let dir = std::env::temp_dir().join(format!("husk-spec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    ok(&["spec", "--bundle", dir.to_str().unwrap()]);
    let spec: oci_spec::runtime::Spec =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(spec.root().as_ref().unwrap().path(), Path::new("rootfs"));
    refused(&["spec", "--bundle", dir.to_str().unwrap()], "exists");
    std::fs::remove_dir_all(&dir).unwrap();
    // checkpoint/restore of a container that does not exist, or from a
    // directory that is no checkpoint: refused by name, nothing written.
    let image = dir.with_extension("ckpt");
    refused(
        &["checkpoint", "--image-path", image.to_str().unwrap(), "c1"],
        "container \"c1\" does not exist",
    );
    assert!(!image.exists());
    refused(
        &["restore", "--image-path", image.to_str().unwrap(), "c1"],
        "is not a husk checkpoint",
    );
    refused(&["state", "c1"], "does not exist");
}

/// Issues 18 and 19: the VM's host cgroup, the spec's `cgroupsPath` or
/// `husk/<id>` without one, in every hierarchy (cpuset too), holding the
/// VM's bounds, with the VMM (PID 1 of its own PID namespace; in the
/// container's new network namespace or one of its own, never the
/// host's) and the monitor in it until `delete` removes it; a path out of
/// the hierarchy is refused by name.
#[test]
fn the_vm_sits_in_its_host_cgroup_under_its_bounds_until_delete() {
    let named = id("cgroup");
    let path = format!("husk-test/{named}/vm");
    // A parent made by someone else, with no CPUs or memory nodes yet in
    // v1's cpuset: it gets its parent's, or nothing could join below it.
    let cpuset_parent = Path::new("/sys/fs/cgroup/cpuset/husk-test").join(&named);
    if Path::new("/sys/fs/cgroup/cpuset").is_dir() {
        std::fs::create_dir_all(&cpuset_parent).unwrap();
        assert_eq!(
            std::fs::read_to_string(cpuset_parent.join("cpuset.cpus"))
                .unwrap()
                .trim(),
            ""
        );
    }
    // Pinned to the host's last CPU, as runc pins a container.
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = (host_cpus - 1).to_string();
    let cpus = |spec: &mut oci_spec::runtime::Spec, list: &str| {
        let mut resources = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().clone())
            .unwrap_or_default();
        let cpu = oci_spec::runtime::LinuxCpuBuilder::default()
            .cpus(list)
            .build()
            .unwrap();
        resources.set_cpu(Some(cpu));
        spec.linux_mut()
            .as_mut()
            .unwrap()
            .set_resources(Some(resources));
    };
    // This one also has no network namespace of its own (the host's, as
    // runc would give it; loopback only in its guest).
    let b = Bundle::new("cgroup", &["sleep", "1000"], |spec| {
        let linux = spec.linux_mut().as_mut().unwrap();
        linux.set_cgroups_path(Some(PathBuf::from(format!("/{path}"))));
        let mut namespaces = linux.namespaces().clone().unwrap();
        namespaces.retain(|ns| ns.typ() != oci_spec::runtime::LinuxNamespaceType::Network);
        linux.set_namespaces(Some(namespaces));
        cpus(spec, &pin);
    });
    let plain = id("cgroup-default");
    let plain_id = plain.clone();
    let b2 = Bundle::new("cgroup-default", &["sleep", "1000"], |_| {});
    ok(&["create", "--bundle", b.0.to_str().unwrap(), &named]);
    ok(&["create", "--bundle", b2.0.to_str().unwrap(), &plain]);
    // The hierarchies mounted, and whether the VM's cgroup goes in each:
    // v2, and v1's of the controllers husk bounds (cpu, memory, pids;
    // cpuset for the pinned one) and, for the cgroup the spec named, those
    // the host accounts with too (cpuacct, blkio); not devices, freezer,
    // named ones (docs/runtime.md).
    let mounted: Vec<(PathBuf, bool, bool)> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let v2 = f[2] == "cgroup2";
            let has = |set: &[&str]| f[3].split(',').any(|o| set.contains(&o));
            let named = v2 || has(&["cpu", "cpuacct", "cpuset", "memory", "pids", "blkio"]);
            let plain = v2 || has(&["cpu", "memory", "pids"]);
            (f[0].starts_with("cgroup") && f[1].starts_with("/sys/fs/cgroup"))
                .then(|| (f[1].into(), named, plain))
        })
        .collect();
    let hierarchies: Vec<PathBuf> = mounted.iter().map(|(h, _, _)| h.clone()).collect();
    assert!(hierarchies.len() >= 2, "{hierarchies:?}");
    let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    let mut recorded = Vec::new();
    for (id, rel) in [(&named, path.clone()), (&plain, format!("husk/{plain}"))] {
        let state = ContainerState::load(&root(), id).unwrap();
        for p in [state.vmm.unwrap(), state.monitor.unwrap()] {
            // Each joined hierarchy's line names the cgroup; the others
            // are left as they were (this test's own).
            let cgroups = read(format!("/proc/{}/cgroup", p.pid).into());
            assert_eq!(cgroups.lines().count(), hierarchies.len(), "{cgroups}");
            let named = cgroups
                .lines()
                .filter(|l| l.ends_with(&format!(":/{rel}")))
                .count();
            let joined = mounted
                .iter()
                .filter(|(_, named, plain)| if id == &plain_id { *plain } else { *named })
                .count();
            assert_eq!(named, joined, "{cgroups}");
            for line in cgroups.lines() {
                let (key, _) = line.rsplit_once(':').unwrap();
                assert!(
                    line.ends_with(&format!(":/{rel}"))
                        || mine
                            .lines()
                            .any(|l| l.rsplit_once(':').unwrap().0 == key && l == line),
                    "{} in {line}",
                    p.pid
                );
            }
        }
        // The VMM is PID 1 of a PID namespace of its own (issue 18).
        let status = read(format!("/proc/{}/status", state.vmm.unwrap().pid).into());
        let nspid = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .unwrap();
        assert_eq!(nspid.split_whitespace().last(), Some("1"), "{nspid}");
        // Its network namespace: never the host's; the container's new
        // one where the spec asks for one (the monitor's, made for it
        // alone), else one of its own. IPC and UTS are its own either way.
        let ns = |pid: u32, kind: &str| {
            std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
                .unwrap_or_else(|e| panic!("{pid} {kind}: {e}"))
        };
        let (vmm, monitor) = (state.vmm.unwrap().pid, state.monitor.unwrap().pid);
        let host = std::process::id();
        assert_ne!(ns(vmm, "net"), ns(host, "net"), "{id}");
        match id == &plain {
            true => assert_eq!(ns(vmm, "net"), ns(monitor, "net")),
            false => assert_ne!(ns(vmm, "net"), ns(monitor, "net")),
        }
        for kind in ["ipc", "uts"] {
            assert_ne!(ns(vmm, kind), ns(monitor, kind), "{kind}");
        }
        // The VM's bounds: the default shape's 256 MiB and the VMM's
        // 64; one vCPU and one more CPU's time; 256 tasks.
        let at = |h: &str, f: &str| Path::new("/sys/fs/cgroup").join(h).join(&rel).join(f);
        if at("memory", "").is_dir() {
            assert_eq!(
                read(at("memory", "memory.limit_in_bytes")).trim(),
                (320u64 << 20).to_string()
            );
            assert_eq!(read(at("pids", "pids.max")).trim(), "256");
            assert_eq!(read(at("cpu", "cpu.cfs_quota_us")).trim(), "200000");
            assert_eq!(read(at("cpu", "cpu.cfs_period_us")).trim(), "100000");
            // The spec's CPUs; husk's own cgroup of a VM not pinned is
            // in no cpuset (nor cpuacct, blkio) hierarchy.
            match id == &named {
                true => assert_eq!(read(at("cpuset", "cpuset.cpus")), format!("{pin}\n")),
                false => {
                    for h in ["cpuset", "cpuacct", "blkio"] {
                        assert!(!at(h, "").exists(), "{}", at(h, "").display());
                    }
                }
            }
        } else {
            assert_eq!(
                read(at("", "memory.max")).trim(),
                (320u64 << 20).to_string()
            );
            assert_eq!(read(at("", "cpu.max")).trim(), "200000 100000");
        }
        recorded.push((state, rel));
    }
    for (state, rel) in recorded {
        ok(&["delete", "--force", &state.id]);
        for h in &hierarchies {
            assert!(!h.join(&rel).exists(), "{}", h.join(&rel).display());
        }
        // Parents left empty go too.
        assert!(!cpuset_parent.exists());
        nothing_left(&state.id, &[state.monitor.unwrap(), state.vmm.unwrap()]);
    }
    // A path that climbs out is refused before any VM is made.
    let bad = id("cgroup-bad");
    let b3 = Bundle::new("cgroup-bad", &["true"], |spec| {
        spec.linux_mut()
            .as_mut()
            .unwrap()
            .set_cgroups_path(Some(PathBuf::from("/husk-test/../../etc")));
    });
    refused(
        &["create", "--bundle", b3.0.to_str().unwrap(), &bad],
        "linux.cgroupsPath \"/husk-test/../../etc\" is not a cgroup path",
    );
    refused(&["state", &bad], "does not exist");
    for h in &hierarchies {
        assert!(!h.join("etc").exists(), "{}", h.display());
    }
    // CPUs the host does not have: the kernel's refusal, naming the
    // spec's field; nothing is left.
    if Path::new("/sys/fs/cgroup/cpuset").is_dir() {
        let absent = id("cgroup-cpus");
        let b4 = Bundle::new("cgroup-cpus", &["true"], |spec| cpus(spec, "4095"));
        refused(
            &["create", "--bundle", b4.0.to_str().unwrap(), &absent],
            "linux.resources.cpu.cpus \"4095\" cannot be applied to the VM's host cgroup",
        );
        refused(&["state", &absent], "does not exist");
        assert!(
            !Path::new("/sys/fs/cgroup/cpuset/husk")
                .join(&absent)
                .exists()
        );
    }
}

/// The spec's limits, applied in the container's cgroup in its guest:
/// what the container sees, `update` changing them (and refusing what the
/// VM cannot hold), `events --stats`, and an OOM kill as runc's `oom`
/// event, with the host's cgroup bounding the VM.
#[test]
fn limits_are_the_specs_and_update_changes_them() {
    let cgroups_path = format!("/husk-test/limits-{}", std::process::id());
    let b = Bundle::new(
        "limits",
        &["sh", "-c", "cat /proc/self/cgroup; sleep 600"],
        |spec| {
            let mut linux = spec.linux().clone().unwrap_or_default();
            let r: oci_spec::runtime::LinuxResources = serde_json::from_value(serde_json::json!({
                "memory": {"limit": 48 << 20},
                "cpu": {"quota": 50000, "period": 100000, "shares": 1024},
                "pids": {"limit": 64},
            }))
            .unwrap();
            linux.set_resources(Some(r));
            linux.set_cgroups_path(Some(cgroups_path.clone().into()));
            spec.set_linux(Some(linux));
        },
    );
    let bundle = b.0.to_str().unwrap();
    let cid = id("limits");
    ok(&["run", "-d", "--bundle", bundle, &cid]);
    // The spec's cgroup namespace: the container sees its own cgroup as
    // the root of /sys/fs/cgroup.
    let read = |file: &str| ok(&["exec", &cid, "cat", &format!("/sys/fs/cgroup/{file}")]);
    assert_eq!(read("memory.max"), format!("{}\n", 48 << 20));
    assert_eq!(read("cpu.max"), "50000 100000\n");
    assert_eq!(read("cpu.weight"), "39\n");
    assert_eq!(read("pids.max"), "64\n");
    // Exec'd processes are in the container's cgroup too (its root).
    assert_eq!(ok(&["exec", &cid, "cat", "/proc/self/cgroup"]), "0::/\n");
    assert_eq!(
        read("cgroup.procs").lines().count(),
        2,
        "sleep (sh execs its last command) and cat"
    );
    // The VM has the default 256 MiB; its host cgroup bounds it (and the
    // VMM's own) when the spec limits memory.
    let rel = cgroups_path.trim_start_matches('/');
    let v1 = Path::new("/sys/fs/cgroup/memory")
        .join(rel)
        .join("memory.limit_in_bytes");
    let v2 = Path::new("/sys/fs/cgroup").join(rel).join("memory.max");
    let limit = std::fs::read_to_string(&v1)
        .or_else(|_| std::fs::read_to_string(&v2))
        .expect("the VMM's memory cgroup");
    assert_eq!(limit.trim(), ((256u64 + 64) << 20).to_string());

    ok(&["update", "--memory", "32m", "--pids-limit", "10", &cid]);
    assert_eq!(read("memory.max"), format!("{}\n", 32 << 20));
    assert_eq!(read("pids.max"), "10\n");
    refused(
        &["update", "--memory", "1g", &cid],
        "needs a bigger VM: it has 256 MiB",
    );
    let bad = b.0.join("bad-resources.json");
    std::fs::write(&bad, "{\"memory\": {\"limit\": \"lots\"}}").unwrap();
    refused(
        &["update", "-r", bad.to_str().unwrap(), &cid],
        "--resources",
    );
    assert_eq!(
        read("memory.max"),
        format!("{}\n", 32 << 20),
        "a refused update changed nothing"
    );

    let mut events = Command::new(HUSK)
        .arg("--root")
        .arg(root())
        .args(["events", "--stats", "--interval", "100ms", &cid])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(events.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _ = events.kill();
    let _ = events.wait();
    let stats: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(stats["type"], "stats", "{line}");
    assert_eq!(
        stats["data"]["memory"]["usage"]["limit"],
        32 << 20,
        "{line}"
    );
    assert!(
        stats["data"]["pids"]["current"].as_u64() >= Some(1),
        "{line}"
    );
    assert!(
        stats["data"]["memory"]["usage"]["usage"].as_u64() > Some(0),
        "{line}"
    );
    ok(&["kill", &cid, "KILL"]);
    wait_for_status(&cid, "stopped");
    ok(&["delete", &cid]);
}

#[test]
fn a_container_past_its_memory_limit_is_oom_killed_and_reported() {
    let b = Bundle::new(
        "oom",
        // 16 MiB in one buffer under a 4 MiB limit (small: every page the
        // guest kernel faults in is emulated here).
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=16M", "count=1"],
        |spec| {
            let mut linux = spec.linux().clone().unwrap_or_default();
            let r: oci_spec::runtime::LinuxResources =
                serde_json::from_value(serde_json::json!({"memory": {"limit": 4 << 20}})).unwrap();
            linux.set_resources(Some(r));
            spec.set_linux(Some(linux));
        },
    );
    let cid = id("oom");
    let created = husk(&["create", "--bundle", b.0.to_str().unwrap(), &cid]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let events = Command::new(HUSK)
        .arg("--root")
        .arg(root())
        .args(["events", "--interval", "100ms", &cid])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ok(&["start", &cid]);
    let out = common::output_within(events, Duration::from_secs(180), "husk events");
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!("{{\"id\":\"{cid}\",\"type\":\"oom\"}}")),
        "{said}"
    );
    assert!(said.contains("\"status\":137"), "{said}");
    // The kills are recorded with the end (the agent's exit answer
    // carries them): drained, and at least the one above.
    let deadline = Instant::now() + Duration::from_secs(60);
    let recorded = loop {
        let state = ContainerState::load(&root(), &cid).unwrap();
        if state.drained || Instant::now() > deadline {
            break state;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(recorded.drained, "{recorded:?}");
    assert!(recorded.oom_kills.unwrap_or(0) >= 1, "{recorded:?}");
    ok(&["delete", &cid]);
}

#[test]
fn hooks_run_on_the_host_at_their_points() {
    let dir = std::env::temp_dir().join(format!("husk-hooks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let hook = |name: &str| {
        serde_json::json!({
            "path": "/bin/sh",
            "args": ["sh", "-c", format!("cat > {}/{name}.json; echo $HOOK_ENV > {}/{name}.env", dir.display(), dir.display())],
            "env": ["HOOK_ENV=from-the-spec"],
        })
    };
    let hooks = serde_json::json!({
        "createRuntime": [hook("createRuntime")],
        "prestart": [hook("prestart")],
        "poststart": [hook("poststart")],
        "poststop": [hook("poststop")],
    });
    let b = Bundle::new("hooks", &["true"], |spec| {
        spec.set_hooks(Some(serde_json::from_value(hooks.clone()).unwrap()));
    });
    let bundle = b.0.to_str().unwrap();
    let cid = id("hooks");
    ok(&["create", "--bundle", bundle, &cid]);
    let state = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap()).unwrap()
    };
    for name in ["createRuntime", "prestart"] {
        let s = state(name);
        assert_eq!(
            (s["id"].as_str(), s["status"].as_str()),
            (Some(cid.as_str()), Some("creating"))
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(format!("{name}.env"))).unwrap(),
            "from-the-spec\n"
        );
    }
    assert!(!dir.join("poststart.json").exists());
    ok(&["start", &cid]);
    assert_eq!(state("poststart")["status"], "running");
    wait_for_status(&cid, "stopped");
    assert!(!dir.join("poststop.json").exists());
    ok(&["delete", &cid]);
    assert_eq!(state("poststop")["status"], "stopped");
    // `run` has its monitor start the process: the poststart hook runs
    // there, with the state `running`.
    std::fs::remove_file(dir.join("poststart.json")).unwrap();
    let rid = id("hooks-run");
    ok(&["run", "--bundle", bundle, &rid]);
    let s = state("poststart");
    assert_eq!(
        (s["id"].as_str(), s["status"].as_str()),
        (Some(rid.as_str()), Some("running"))
    );
    assert_eq!(state("poststop")["id"].as_str(), Some(rid.as_str()));

    // A failing createRuntime hook fails create, naming it; nothing is
    // left.
    let b = Bundle::new("hooks-fail", &["true"], |spec| {
        spec.set_hooks(Some(
            serde_json::from_value(serde_json::json!({"createRuntime": [
                {"path": "/bin/sh", "args": ["sh", "-c", "echo no way >&2; exit 3"]}
            ]}))
            .unwrap(),
        ));
    });
    let cid = id("hooks-fail");
    refused(
        &["create", "--bundle", b.0.to_str().unwrap(), &cid],
        "createRuntime hook /bin/sh failed: exit status: 3: no way",
    );
    assert!(!husk_runtime::state::dir(&root(), &cid).exists());
    // Hooks that would run inside the guest are refused by name.
    let b = Bundle::new("hooks-guest", &["true"], |spec| {
        spec.set_hooks(Some(
            serde_json::from_value(serde_json::json!({"startContainer": [{"path": "/bin/true"}]}))
                .unwrap(),
        ));
    });
    refused(
        &[
            "create",
            "--bundle",
            b.0.to_str().unwrap(),
            &id("hooks-guest"),
        ],
        "hooks.startContainer",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_listing_ends_quietly_when_its_reader_goes_away() {
    use std::os::unix::process::ExitStatusExt;
    // The pipe's reader is gone before husk writes a byte.
    let (reader, writer) = rustix::pipe::pipe().unwrap();
    drop(reader);
    let out = Command::new(HUSK)
        .arg("features")
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

/// Issue 19: `kill TERM` reaches the container's process (its trap runs),
/// and `state` says `stopped` as soon as it exited, without waiting for
/// the VM's shutdown; `delete` (no --force) then ends what is left of the
/// VM, and nothing remains, its host cgroup included.
#[test]
fn a_terms_trap_runs_and_the_container_is_stopped_at_its_exit() {
    let b = Bundle::new(
        "term",
        &[
            "sh",
            "-c",
            "trap 'echo trapped > /trap; seq 1 5000; exit 42' TERM; while :; do sleep 0.1; done",
        ],
        |spec| {
            spec.root_mut().as_mut().unwrap().set_readonly(Some(false));
        },
    );
    let id = id("term");
    // The container's output goes to a file the test reads at the end.
    let output = b.0.join("output");
    let mut create = Command::new(common::HUSK)
        .args(common::with_root(&[
            "create",
            "--bundle",
            b.0.to_str().unwrap(),
            &id,
        ]))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&output).unwrap())
        .spawn()
        .unwrap();
    assert!(common::exit_within_a_minute(&mut create, &["create"]).success());
    ok(&["start", &id]);
    let recorded = ContainerState::load(&root(), &id).unwrap();
    let cgroup = recorded.cgroup.clone().unwrap();
    // The shell is in its loop (its trap set) once a sleep runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok(&[
        "exec",
        &id,
        "sh",
        "-c",
        "pidof sleep >/dev/null && echo up || true",
    ])
    .contains("up")
    {
        assert!(Instant::now() < deadline, "the loop never ran");
    }
    ok(&["kill", &id, "TERM"]);
    let killed = Instant::now();
    wait_for_status(&id, "stopped");
    // A client waiting 5 s, as the reviewer's did, sees it.
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "{:?}",
        killed.elapsed()
    );
    // Stopped is recorded at the exit report, with its status, before
    // the output in flight is all out.
    let stopped = ContainerState::load(&root(), &id).unwrap();
    assert_eq!(stopped.exit_status, Some(42));
    // The trap ran: its file is in the container's root.
    assert_eq!(
        std::fs::read_to_string(b.rootfs().join("trap")).unwrap(),
        "trapped\n"
    );
    // A `delete` right at `stopped` waits for that output: none is lost.
    ok(&["delete", &id]);
    let printed = std::fs::read_to_string(&output).unwrap();
    let want: String = (1..=5000).map(|n| format!("{n}\n")).collect();
    assert!(
        printed == want,
        "{} lines, last {:?}",
        printed.lines().count(),
        printed.lines().last()
    );
    nothing_left(&id, &[recorded.monitor.unwrap(), recorded.vmm.unwrap()]);
    assert!(!Path::new("/sys/fs/cgroup/memory").join(&cgroup).exists());
}
