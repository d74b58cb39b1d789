//! `husk run --bundle` end to end: real microVMs restored from the warm
//! snapshot, real virtio-fs, a busybox bundle made from Debian's
//! busybox-static. Each test is one or two container runs; checks that can
//! share a guest run as one script in it.
//!
//! The warm snapshot lives in a root under the cache
//! (`$HUSK_CACHE/test-root`), so the suite boots a guest cold only when the
//! kernel or the agent changed.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxNamespaceType;
use rustix::process::Signal;

use common::{Bundle, HUSK, id, output_within, root, text};

/// The longest one run may take (a first run boots the guest cold).
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// `husk run --bundle BUNDLE ID` with the tests' root and no stdin.
fn run_command(bundle: &Path, id: &str) -> Command {
    let mut cmd = Command::new(HUSK);
    cmd.arg("--root")
        .arg(root())
        .arg("run")
        .arg("--bundle")
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null());
    cmd
}

/// Debian's `runc run` of `bundle` as `id`, with a state root of its own
/// (removed after), no stdin: what runc makes of the same bundle.
fn runc_run(bundle: &Path, id: &str) -> Output {
    let root = std::env::temp_dir().join(format!("husk-runc-{id}"));
    let out = Command::new("runc")
        .arg("--root")
        .arg(&root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&root);
    out
}

/// Runs `husk run` on `bundle` with `stdin`, within [`RUN_TIMEOUT`].
fn husk_run(bundle: &Path, id: &str, stdin: &[u8]) -> Output {
    husk_run_within(bundle, id, stdin, RUN_TIMEOUT)
}

/// [`husk_run`] within `limit`.
fn husk_run_within(bundle: &Path, id: &str, stdin: &[u8], limit: Duration) -> Output {
    let mut child = run_command(bundle, id)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = output_within(child, limit, "husk run");
    writer.join().unwrap();
    // Nothing of the container is left in husk's state. What the run
    // printed comes with the failure (a run stopped from outside, such as
    // issue 13's long one, still shows its crashes).
    assert!(
        !root().join("containers").join(id).exists(),
        "the state directory of {id} was left behind; the run printed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

#[test]
fn output_and_exit_status_are_the_containers() {
    let b = Bundle::new(
        "echo",
        &["sh", "-c", "echo hello from husk; echo oops >&2; exit 7"],
        |_| {},
    );
    let out = husk_run(&b.0, &id("echo"), b"");
    assert_eq!(text(&out.stdout), "hello from husk\n");
    assert_eq!(text(&out.stderr), "oops\n");
    assert_eq!(out.status.code(), Some(7));
}

#[test]
fn a_process_killed_by_sigkill_gives_137() {
    // Without a PID namespace the shell is not its namespace's init, so a
    // SIGKILL it sends itself is delivered.
    let b = Bundle::new("kill", &["sh", "-c", "kill -9 $$; echo survived"], |spec| {
        let linux = spec.linux_mut().as_mut().unwrap();
        let namespaces = linux.namespaces().clone().unwrap_or_default();
        linux.set_namespaces(Some(
            namespaces
                .into_iter()
                .filter(|ns| ns.typ() != LinuxNamespaceType::Pid)
                .collect(),
        ));
    });
    let out = husk_run(&b.0, &id("kill"), b"");
    assert_eq!(text(&out.stdout), "");
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
}

#[test]
fn ten_mib_of_stdin_arrive_byte_exact() {
    let data: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let expected = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(&data)?;
            c.wait_with_output()
        })
        .unwrap();
    let b = Bundle::new("stdin", &["sh", "-c", "sha256sum; wc -c"], |_| {});
    let out = husk_run(&b.0, &id("stdin"), &data);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Only the first command reads stdin to its end; wc then sees none.
    assert_eq!(text(&out.stdout), format!("{}0\n", text(&expected.stdout)));
}

#[test]
fn env_cwd_user_groups_and_hostname_are_the_specs() {
    let b = Bundle::new(
        "identity",
        &[
            "sh",
            "-c",
            "echo $GREETING; pwd; id -u; id -g; id -G; hostname; umask",
        ],
        |spec| {
            let process = spec.process_mut().as_mut().unwrap();
            process.set_env(Some(vec![
                "PATH=/bin:/usr/bin:/sbin:/usr/sbin".into(),
                "GREETING=hi there".into(),
            ]));
            process.set_cwd("/tmp".into());
            let user = process.user_mut();
            user.set_uid(65534);
            user.set_gid(65534);
            user.set_additional_gids(Some(vec![10, 20]));
            user.set_umask(Some(0o027));
            spec.set_hostname(Some("box-1".into()));
        },
    );
    let out = husk_run(&b.0, &id("identity"), b"");
    assert_eq!(
        text(&out.stdout),
        "hi there\n/tmp\n65534\n65534\n65534 10 20\nbox-1\n0027\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_read_only_root_refuses_writes_and_a_writable_one_keeps_them() {
    let script = "touch /made-here && echo wrote; echo done";
    let ro = Bundle::new("ro", &["sh", "-c", script], |_| {});
    let out = husk_run(&ro.0, &id("ro"), b"");
    assert_eq!(text(&out.stdout), "done\n");
    assert!(
        text(&out.stderr).contains("Read-only file system"),
        "{}",
        text(&out.stderr)
    );
    assert!(!ro.rootfs().join("made-here").exists());

    let rw = Bundle::new("rw", &["sh", "-c", script], |spec| {
        spec.root_mut().as_mut().unwrap().set_readonly(Some(false));
    });
    let out = husk_run(&rw.0, &id("rw"), b"");
    assert_eq!(text(&out.stdout), "wrote\ndone\n", "{}", text(&out.stderr));
    assert!(rw.rootfs().join("made-here").exists());
}

#[test]
fn a_terminal_is_a_terminal() {
    let b = Bundle::new(
        "tty",
        &[
            "sh",
            "-c",
            "tty; test -t 0 && test -t 1 && echo is-a-tty; exit 3",
        ],
        |spec| {
            spec.process_mut()
                .as_mut()
                .unwrap()
                .set_terminal(Some(true));
        },
    );
    let out = husk_run(&b.0, &id("tty"), b"");
    // A terminal turns \n into \r\n.
    assert_eq!(text(&out.stdout), "/dev/pts/0\r\nis-a-tty\r\n");
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn a_missing_program_exits_127_with_a_message() {
    let b = Bundle::new("missing", &["/no/such/program"], |_| {});
    let out = husk_run(&b.0, &id("missing"), b"");
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(
        text(&out.stderr),
        "husk: exec /no/such/program: No such file or directory (os error 2)\n"
    );
}

#[test]
fn bad_bundles_and_ids_are_refused_before_any_vm_starts() {
    let b = Bundle::new("bad", &["true"], |_| {});
    let config = b.0.join("config.json");
    let cases: [(&str, &str); 6] = [
        // Issue 19: the version is checked, and named.
        (
            r#"{"ociVersion":"invalid","root":{"path":"rootfs"},"process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
            "is not usable: ociVersion \"invalid\" is not a runtime-spec version husk takes",
        ),
        // Issue 14: a negative memory limit hung the container in
        // `created`; too many CPUs were clamped silently.
        (
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}},"linux":{"resources":{"memory":{"limit":-5}}}}"#,
            "linux.resources.memory.limit -5: must be a number of bytes, or -1 for no limit",
        ),
        (
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}},"linux":{"resources":{"cpu":{"quota":100000000,"period":100000}}}}"#,
            "linux.resources.cpu quota 100000000 per period 100000 asks for 1000 CPUs",
        ),
        (
            "{not json",
            "is not a valid OCI spec: key must be a string at line 1 column 2",
        ),
        (
            r#"{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
            "is not usable: root: missing",
        ),
        (
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":[]}}}"#,
            "is not a valid OCI spec: process.user.gid: invalid type: sequence, expected u32",
        ),
    ];
    for (json, why) in cases {
        std::fs::write(&config, json).unwrap();
        let out = husk_run(&b.0, &id("bad"), b"");
        assert_eq!(out.status.code(), Some(125));
        let err = text(&out.stderr);
        // Limits are named with the container; the spec's own faults
        // with its file.
        let named = if why.starts_with("linux.resources") {
            err.starts_with("husk: container ") && err.contains(why)
        } else {
            err.starts_with(&format!("husk: {} {why}", config.display()))
        };
        assert!(named, "{err}");
    }
    let out = husk_run(&b.0, "../escape", b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).starts_with("husk: container ID \"../escape\" is not valid"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_container_cannot_reach_host_files_outside_its_root() {
    // Host files outside the share: a secret next to the bundle, and one
    // at a fixed absolute path.
    let b = Bundle::new("confine", &["sh", "/probe.sh"], |spec| {
        spec.root_mut().as_mut().unwrap().set_readonly(Some(false));
    });
    let secret = b.0.join("secret");
    std::fs::write(&secret, "HOST-SECRET").unwrap();
    let abs_secret = std::env::temp_dir().join(format!("husk-secret-{}", std::process::id()));
    std::fs::write(&abs_secret, "HOST-SECRET").unwrap();
    let rootfs = b.rootfs();
    // Symlinks planted in the root filesystem: absolute host paths and
    // climbs out of the share.
    std::os::unix::fs::symlink(&abs_secret, rootfs.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../secret", rootfs.join("up-link")).unwrap();
    std::os::unix::fs::symlink("../../../../../../..", rootfs.join("root-link")).unwrap();
    // A directory the host swaps for a symlink to its own root while the
    // guest looks names up through it.
    std::fs::create_dir(rootfs.join("swap")).unwrap();
    std::fs::write(rootfs.join("swap/marker"), "inside").unwrap();
    // The probe's control: a file inside the share with the same content
    // is reported, so a silent probe means nothing was reached.
    std::fs::write(rootfs.join("inside-secret"), "HOST-SECRET").unwrap();
    let abs = abs_secret.display().to_string();
    let probe = format!(
        r#"
try() {{ out=; read -r out < "$1" 2>/dev/null; case "$out" in *HOST-SECRET*) echo "LEAK $1";; esac; }}
try /inside-secret
try /abs-link
try /up-link
try /root-link{abs}
try /root-link/../secret
try /../secret
try /../../..{abs}
try /proc/self/root/../secret
try /proc/self/fd/../../../../..{abs}
try /proc/1/root/../..{abs}
# A hard link out of the share would cross file systems.
ln /bin/busybox /dev/shm/escape 2>/dev/null && echo "LINK crossed"
i=0
while [ $i -lt 300 ]; do try /swap/marker; try /swap{abs}; i=$((i+1)); done
echo probed
"#
    );
    std::fs::write(rootfs.join("probe.sh"), probe).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let swap = rootfs.join("swap");
        let parked = rootfs.join("swap.real");
        std::thread::spawn(move || {
            let mut swaps = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if std::fs::rename(&swap, &parked).is_ok() {
                    let _ = std::os::unix::fs::symlink("/", &swap);
                    std::thread::yield_now();
                    let _ = std::fs::remove_file(&swap);
                    let _ = std::fs::rename(&parked, &swap);
                    swaps += 1;
                }
            }
            swaps
        })
    };
    let out = husk_run(&b.0, &id("confine"), b"");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    std::fs::remove_file(&abs_secret).unwrap();
    assert_eq!(
        text(&out.stdout),
        "LEAK /inside-secret\nprobed\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(
        swaps > 10,
        "the host swapped the directory only {swaps} times"
    );
}

#[test]
fn a_warm_snapshot_with_a_share_is_not_restored_without_one() {
    let root = root();
    let bins = husk_guest::binaries::locate_near(&root, Path::new(HUSK).parent().unwrap()).unwrap();
    let image = husk_guest::binaries::guest_image(&bins, husk_guest::shape::Shape::default(), 0);
    let (snap, _) = husk_guest::warm::snapshot(&root, &bins.vmm, &image).unwrap();
    let dir = std::env::temp_dir().join(format!("husk-noshare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(&bins.vmm)
        .arg("--restore")
        .arg(&snap)
        .arg("--vsock-socket")
        .arg(dir.join("v.sock"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim(),
        format!(
            "husk-vmm: snapshot {} cannot be restored: its guest has a virtio-fs share \"rootfs\": give --share rootfs=DIR",
            snap.display()
        )
    );
    // It left no socket behind.
    assert!(!dir.join("v.sock").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// PIDs of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

/// (Rss, Pss) in KiB of `pid`'s mappings of a snapshot's memory file.
fn snapshot_memory_rss_pss(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut rss, mut pss, mut inside) = (0, 0, false);
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            inside = fields.last().is_some_and(|p| {
                p.ends_with(&format!("/{}", husk_protocol::snapshot::MEMORY_FILE))
            });
        } else if inside && fields.len() >= 2 {
            let kib: u64 = fields[1].parse().unwrap_or(0);
            match fields[0] {
                "Rss:" => rss += kib,
                "Pss:" => pss += kib,
                _ => {}
            }
        }
    }
    (rss, pss)
}

#[test]
fn two_containers_from_one_snapshot_differ_where_they_must_and_share_memory() {
    let script =
        "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; hostname; sleep 6";
    let bundles: Vec<Bundle> = ["one", "two"]
        .iter()
        .map(|name| {
            Bundle::new(&format!("clone-{name}"), &["sh", "-c", script], |spec| {
                spec.set_hostname(Some(format!("host-{name}")));
            })
        })
        .collect();
    let runs: Vec<std::process::Child> = bundles
        .iter()
        .enumerate()
        .map(|(i, b)| {
            Command::new(HUSK)
                .arg("--root")
                .arg(root())
                .arg("run")
                .arg("--bundle")
                .arg(&b.0)
                .arg(id(&format!("clone{i}")))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // While both sleep: their VMMs map the same snapshot memory file.
    let deadline = Instant::now() + RUN_TIMEOUT;
    let vmms = loop {
        // husk run -> its monitor -> the VMM.
        let vmms: Vec<u32> = runs
            .iter()
            .flat_map(|c| children(c.id()))
            .flat_map(children)
            .collect();
        if vmms.len() == 2 && vmms.iter().all(|&p| snapshot_memory_rss_pss(p).0 > 0) {
            break vmms;
        }
        assert!(Instant::now() < deadline, "the two VMs did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Give both guests time to run their containers before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let (rss, pss) = vmms
        .iter()
        .map(|&p| snapshot_memory_rss_pss(p))
        .fold((0, 0), |(r, p), (r2, p2)| (r + r2, p + p2));
    let outs: Vec<Output> = runs
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let lines: Vec<Vec<String>> = outs
        .iter()
        .map(|o| {
            assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
            text(&o.stdout).lines().map(str::to_owned).collect()
        })
        .collect();
    // Entropy: each guest's RNG was reseeded from fresh host entropy.
    assert_eq!(lines[0][0].len(), 32, "{:?}", lines[0]);
    assert_ne!(
        lines[0][0], lines[1][0],
        "two clones drew the same random bytes"
    );
    // Clock: the host's, not the snapshot's.
    for l in &lines {
        let guest: i64 = l[1].parse().unwrap();
        assert!(
            (host_now - guest).abs() < 30,
            "guest clock {guest}, host {host_now}"
        );
    }
    // Hostnames: each its spec's.
    assert_eq!(lines[0][2], "host-one");
    assert_eq!(lines[1][2], "host-two");
    // Memory: pages of the snapshot that neither guest wrote are shared
    // between the two VMMs, so their proportional share is well below
    // what each has resident.
    assert!(rss > 0);
    assert!(
        pss * 4 <= rss * 3,
        "snapshot memory: Rss {rss} KiB, Pss {pss} KiB: too little is shared"
    );
}

#[test]
fn a_vm_that_dies_under_a_running_container_is_reported_and_cleaned_up() {
    let b = Bundle::new("vmdeath", &["sh", "-c", "echo started; sleep 100"], |_| {});
    let container = id("vmdeath");
    let mut child = run_command(&b.0, &container)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the container's first line, then kill its VMM.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 8];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    assert_eq!(&first, b"started\n");
    // husk run -> its monitor -> the VMM.
    let monitor = children(child.id());
    assert_eq!(monitor.len(), 1, "{monitor:?}");
    let vmm = children(monitor[0]);
    assert_eq!(vmm.len(), 1, "{vmm:?}");
    husk_test_support::kill(vmm[0], Signal::KILL);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        text(&out.stderr),
        "husk: the VM ended: husk-vmm signal: 9 (SIGKILL)\n"
    );
    assert!(!root().join("containers").join(&container).exists());
}

#[test]
fn host_directories_and_files_are_bound_in_as_the_spec_says() {
    let base = std::env::temp_dir().join(format!("husk-binds-{}", std::process::id()));
    let (rw, ro) = (base.join("rw"), base.join("ro"));
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("given"), "from the host\n").unwrap();
    std::fs::write(base.join("motd"), "a host file\n").unwrap();
    let script = "cat /in/given; cat /etc/motd; echo made > /out/made; \
                  touch /in/nope 2>/dev/null || echo read-only";
    let b = Bundle::new("binds", &["sh", "-c", script], |spec| {
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for (dest, source, opts) in [
            ("/out", rw.clone(), vec!["rbind", "rw"]),
            ("/in", ro.clone(), vec!["rbind", "ro"]),
            ("/etc/motd", base.join("motd"), vec!["bind", "ro"]),
        ] {
            mounts.push(
                oci_spec::runtime::MountBuilder::default()
                    .destination(dest)
                    .typ("bind")
                    .source(source)
                    .options(opts.into_iter().map(String::from).collect::<Vec<_>>())
                    .build()
                    .unwrap(),
            );
        }
        spec.set_mounts(Some(mounts));
    });
    let out = husk_run(&b.0, &id("binds"), b"");
    assert_eq!(
        text(&out.stdout),
        "from the host\na host file\nread-only\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
    // The container's write to the read-write directory is on the host;
    // nothing reached the read-only one.
    assert_eq!(std::fs::read_to_string(rw.join("made")).unwrap(), "made\n");
    assert!(!ro.join("nope").exists());
    // The unused volume slots' directory: one per root, shared by its
    // containers, read-only to everyone and empty.
    let empty = root().join("empty");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&empty).unwrap().permissions());
    assert_eq!(mode & 0o7777, 0o555, "{}", empty.display());
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    std::fs::remove_dir_all(&base).unwrap();
}

/// Issue 13: guest processes crashed at random (a three-stage pipeline
/// segfaulted one run in five) because user mode's AVX/AVX-512 register
/// state was lost at context switches (docs/guest-kernel.md, "Vector
/// state"). Four concurrent loops of pipelines doing string, memory and
/// floating-point work, beside the test's own register checker, all on one
/// vCPU of a warm-started guest: every pipeline's result is checked, not
/// one process may crash, and the shell's `wait` for the four loops ends.
#[test]
fn concurrent_pipelines_and_vector_registers_survive_preemption() {
    stress("stress", None);
}

/// The same on two vCPUs (a CPU quota of two CPUs sizes the VM): tasks
/// also move between CPUs, and each CPU has its own save slot.
#[test]
fn concurrent_pipelines_and_vector_registers_survive_preemption_on_two_vcpus() {
    stress("stress2", Some(200_000));
}

fn stress(name: &str, cpu_quota: Option<i64>) {
    // Two rounds (16 pipelines) fit the suite's budget; issue 13's long run
    // (1,000 pipelines: HUSK_STRESS_ROUNDS=125, about an hour of guest
    // work here) sets more, outside CI (docs/guest-kernel.md).
    let rounds: u32 = std::env::var("HUSK_STRESS_ROUNDS")
        .ok()
        .map(|r| r.parse().expect("HUSK_STRESS_ROUNDS: a number of rounds"))
        .unwrap_or(2);
    let script = format!(
        "echo cpus=$(grep -c ^processor /proc/cpuinfo)\n/vc {} &\n{}",
        rounds * 3,
        common::pipeline_loops(rounds, ":", "")
    );
    let b = Bundle::new(name, &["sh", "-c", &script], |spec| {
        if let Some(quota) = cpu_quota {
            let mut linux = spec.linux().clone().unwrap_or_default();
            let r: oci_spec::runtime::LinuxResources = serde_json::from_value(
                serde_json::json!({"cpu": {"quota": quota, "period": 100_000}}),
            )
            .unwrap();
            linux.set_resources(Some(r));
            spec.set_linux(Some(linux));
        }
    });
    std::fs::copy(common::vector_checker(), b.rootfs().join("vc")).unwrap();
    // A long run (issue 13's 1,000 pipelines took 2 h 9 min here, beside
    // a full test run) gets two minutes a round.
    let limit = RUN_TIMEOUT.max(Duration::from_secs(120 * u64::from(rounds)));
    let out = husk_run_within(&b.0, &id(name), b"", limit);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let all = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{all}");
    let cpus = if cpu_quota.is_some() { 2 } else { 1 };
    assert!(stdout.lines().any(|x| x == format!("cpus={cpus}")), "{all}");
    common::assert_pipelines_and_vectors_ok(&all);
}

/// The agent reads SIGCHLD from a signalfd with it blocked in every thread;
/// the container's process must not inherit that mask (a shell's `wait`
/// hung on it: docs/agent.md). Nothing blocked, nothing ignored, and a
/// background job is waited for.
#[test]
fn the_process_starts_with_no_signal_blocked_or_ignored() {
    let b = Bundle::new(
        "sigmask",
        &[
            "sh",
            "-c",
            "grep -E '^Sig(Blk|Ign)' /proc/self/status; sleep 1 & wait; echo waited",
        ],
        |_| {},
    );
    let out = husk_run(&b.0, &id("sigmask"), b"");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.lines().any(|l| l == "SigBlk:\t0000000000000000"),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l == "SigIgn:\t0000000000000000"),
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l == "waited"), "{stdout}");
}

/// The PIDs of processes whose command line holds every one of `parts`.
fn pids_with(parts: &[&str]) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            parts.iter().all(|p| cmdline.contains(p))
        })
        .collect()
}

/// Issue 14: the warm-start boot's VMM has no parent-death signal, so
/// killing the process that ran it (the container's monitor) left it
/// running. Now it dies with it; what the boot left in the cache is swept
/// once nobody holds its lock.
#[test]
fn a_warm_boot_dies_with_its_starter_and_its_leftovers_are_swept() {
    let cache = std::env::temp_dir().join(format!("husk-orphan-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();
    let b = Bundle::new("orphan", &["true"], |_| {});
    let name = id("orphan");
    let mut run = run_command(&b.0, &name)
        .env(husk_guest::warm::CACHE_ENV, &cache)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cache_str = cache.to_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    let vmm = loop {
        if let Some(&pid) = pids_with(&["husk-vmm", "--snapshot-dir", &cache_str]).first() {
            break pid;
        }
        assert!(Instant::now() < deadline, "no warm boot started");
        std::thread::sleep(Duration::from_millis(20));
    };
    let stat = std::fs::read_to_string(format!("/proc/{vmm}/stat")).unwrap();
    let starter: i32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(husk_test_support::kill(starter as u32, Signal::KILL));
    let deadline = Instant::now() + Duration::from_secs(15);
    while Path::new(&format!("/proc/{vmm}")).exists() {
        let state = std::fs::read_to_string(format!("/proc/{vmm}/stat")).unwrap_or_default();
        if state
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
        {
            break;
        }
        if Instant::now() > deadline {
            husk_test_support::kill(vmm as u32, Signal::KILL);
            panic!("the warm boot's VMM {vmm} outlived its starter {starter}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = run.kill();
    let _ = run.wait();
    let _ = Command::new(HUSK)
        .arg("--root")
        .arg(root())
        .args(["delete", "-f", &name])
        .output();
    // Its host cgroup, made before the boot, went with it.
    let cgroup = Path::new("/sys/fs/cgroup/memory/husk").join(&name);
    assert!(!cgroup.exists(), "{} was left", cgroup.display());
    let snapshots = cache.join("snapshots");
    husk_guest::warm::sweep(&snapshots);
    let left: Vec<String> = std::fs::read_dir(&snapshots)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "left in the cache: {left:?}");
    std::fs::remove_dir_all(&cache).unwrap();
}

/// The signals a process blocks (`SigBlk`) and ignores (`SigIgn`).
fn signal_masks(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap_or(0)
    };
    (field("SigBlk:"), field("SigIgn:"))
}

/// Issue 14: a foreground `husk run` blocks the signals it forwards, and
/// its monitor and VMM inherited that, and the VMM the monitor's ignored
/// ones, so a VMM did not end on SIGTERM. Neither blocks a stop signal;
/// the VMM ignores none (the monitor ignores them by design: only
/// `delete --force` ends it early). And the foreground `run` forwards
/// SIGTERM to the container's process (taken from a signalfd while it
/// waits for its monitor): the process's trap runs, and its status is
/// `run`'s.
#[test]
fn the_monitor_and_the_vmm_neither_block_nor_ignore_stop_signals() {
    let b = Bundle::new(
        "masks",
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 7' TERM; echo up; while :; do sleep 1; done",
        ],
        |_| {},
    );
    let name = id("masks");
    let mut child = run_command(&b.0, &name)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut up = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut up).unwrap();
    assert_eq!(up, "up\n");
    let monitors = pids_with(&["_monitor", &name]);
    let vmms = pids_with(&["husk-vmm", &name]);
    let result = std::panic::catch_unwind(|| {
        assert_eq!(monitors.len(), 1, "monitors: {monitors:?}");
        assert_eq!(vmms.len(), 1, "VMMs: {vmms:?}");
        let stop = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT]
            .iter()
            .fold(0u64, |m, &s| m | 1 << (s - 1));
        for pid in [monitors[0], vmms[0]] {
            let (blocked, _) = signal_masks(pid);
            assert_eq!(blocked & stop, 0, "pid {pid} blocks {blocked:#x}");
        }
        let (_, ignored) = signal_masks(vmms[0]);
        assert_eq!(ignored & stop, 0, "the VMM ignores {ignored:#x}");
    });
    husk_test_support::kill(child.id(), Signal::TERM);
    let out = output_within(child, Duration::from_secs(60), "husk run");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
    if out.status.code() != Some(7) {
        for cmd in [&["kill", &name, "KILL"][..], &["delete", "--force", &name]] {
            let _ = Command::new(HUSK)
                .arg("--root")
                .arg(root())
                .args(cmd)
                .output();
        }
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert_eq!(
        (out.status.code(), rest.as_str()),
        (Some(7), "got TERM\n"),
        "{}",
        text(&out.stderr)
    );
}

/// Issue 14: a test killed by nextest's timeout left its containers' VMMs
/// running. Every test process has a reaper ([`common::spawn_reaper`]);
/// here one watches a stand-in for a test (a `sleep`) whose container
/// runs, and the stand-in is killed with SIGKILL, as a timeout does: the
/// container's monitor and VMM are gone soon after, and its state can
/// be deleted.
#[test]
fn a_killed_test_leaves_no_vm_behind() {
    let mut stand_in = Command::new("sleep").arg("600").spawn().unwrap();
    let pid = stand_in.id();
    let mut reaper = common::spawn_reaper(pid);
    let name = format!("reaped-{pid}");
    let b = Bundle::new("reaped", &["sleep", "600"], |_| {});
    // The detached container keeps its stdio: a file, not a pipe this
    // test would wait on.
    let log = b.0.join("run.log");
    let created = run_command(&b.0, &name)
        .arg("--detach")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    assert!(
        created.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let vmms = pids_with(&["husk-vmm", &name]);
    let monitors = pids_with(&["_monitor", &name]);
    assert_eq!(
        (vmms.len(), monitors.len()),
        (1, 1),
        "{vmms:?} {monitors:?}"
    );
    stand_in.kill().unwrap();
    stand_in.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let alive = |pid: i32| husk_test_support::alive(pid as u32);
    while alive(vmms[0]) || alive(monitors[0]) {
        if Instant::now() > deadline {
            for p in [vmms[0], monitors[0]] {
                husk_test_support::kill(p as u32, Signal::KILL);
            }
            panic!("the reaper left the container's VMM or monitor running");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(reaper.wait().unwrap().success());
    let deleted = Command::new(HUSK)
        .arg("--root")
        .arg(root())
        .args(["delete", "--force", &name])
        .output()
        .unwrap();
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
}

/// Issue 19: spec fields the guest applies as runc applies them, the same
/// bundle run by Debian's runc in the same test: a device node's mode
/// (mknod's umask no longer shows), `process.oomScoreAdj`, and
/// `linux.rootfsPropagation` on the container's `/`; a propagation no
/// kernel knows is refused by name.
#[test]
fn devices_oom_score_and_root_propagation_are_the_specs_as_with_runc() {
    let script = "stat -c %a /dev/husk-null; cat /proc/self/oom_score_adj; \
                  awk '$5 == \"/\"' /proc/self/mountinfo | grep -q unbindable && echo unbindable || echo bindable";
    let b = Bundle::new("specfields", &["sh", "-c", script], |_| {});
    let config = b.0.join("config.json");
    let edit = |propagation: &str| {
        let mut spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        spec["process"]["oomScoreAdj"] = 500.into();
        if propagation.is_empty() {
            spec["linux"]
                .as_object_mut()
                .unwrap()
                .remove("rootfsPropagation");
        } else {
            spec["linux"]["rootfsPropagation"] = propagation.into();
        }
        spec["linux"]["devices"] = serde_json::json!([{
            "path": "/dev/husk-null", "type": "c", "major": 1, "minor": 3,
            "fileMode": 0o660, "uid": 0, "gid": 0
        }]);
        std::fs::write(&config, spec.to_string()).unwrap();
    };
    edit("unbindable");
    let want = "660\n500\nunbindable\n";
    let out = husk_run(&b.0, &id("specfields"), b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), want);
    // runc, on the same bundle but for the propagation: Debian's runc
    // 1.1.5 cannot start a container whose root is unbindable (its bind
    // of the root under the unbindable `/` fails with EINVAL), so it
    // gets runc's default there.
    edit("");
    let want = "660\n500\nbindable\n";
    let runc = runc_run(&b.0, &id("specfields-runc"));
    assert!(runc.status.success(), "runc: {}", text(&runc.stderr));
    assert_eq!(text(&runc.stdout), want, "runc");
    // A propagation that is none of runc's names.
    edit("sideways");
    let out = husk_run(&b.0, &id("specfields-bad"), b"");
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("linux.rootfsPropagation \"sideways\" is not one of"),
        "{}",
        text(&out.stderr)
    );
}

/// Issue 19, item 2: a user namespace with the spec's ID maps, as runc
/// makes one, on the same bundle in the same test: the maps, the process's
/// IDs, the root's files seen through them (a file the host's root owns is
/// the overflow ID), /dev the container root's, a file the container makes
/// owned by its mapped root on the host; a process exec'd into the
/// container is in the same namespace; maps without a namespace are
/// refused by name.
#[test]
fn a_user_namespace_maps_the_roots_files_as_runc_does() {
    use std::os::unix::fs::MetadataExt;
    let script = "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; \
                  stat -c %u:%g /bin/busybox /hostroot /dev /dev/null; echo made > /made";
    let b = Bundle::new("userns", &["sh", "-c", script], |_| {});
    let config = b.0.join("config.json");
    let edit = |args: &[&str], user_ns: bool| {
        let mut spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        spec["process"]["args"] = serde_json::json!(args);
        spec["root"]["readonly"] = false.into();
        let namespaces = spec["linux"]["namespaces"].as_array_mut().unwrap();
        namespaces.retain(|ns| ns["type"] != "user");
        if user_ns {
            namespaces.push(serde_json::json!({"type": "user"}));
        }
        let map = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        spec["linux"]["uidMappings"] = map.clone();
        spec["linux"]["gidMappings"] = map;
        std::fs::write(&config, spec.to_string()).unwrap();
    };
    edit(&["sh", "-c", script], true);
    // The root as a client that maps IDs prepares it: the namespace's
    // root owns it; one file stays the host root's.
    let chown = Command::new("chown")
        .args(["-R", "100000:100000"])
        .arg(b.rootfs())
        .status()
        .unwrap();
    assert!(chown.success());
    std::fs::write(b.rootfs().join("hostroot"), "").unwrap();
    let want = "         0     100000      65536\n         0     100000      65536\n\
                0\n0\n0:0\n65534:65534\n0:0\n65534:65534\n";
    let made = b.rootfs().join("made");
    let owner = |path: &Path| {
        let meta = std::fs::metadata(path).unwrap();
        (meta.uid(), meta.gid())
    };
    let out = husk_run(&b.0, &id("userns"), b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), want);
    assert_eq!(owner(&made), (100000, 100000), "husk's file on the host");
    std::fs::remove_file(&made).unwrap();
    let runc = runc_run(&b.0, &id("userns-runc"));
    assert!(runc.status.success(), "runc: {}", text(&runc.stderr));
    assert_eq!(text(&runc.stdout), want, "runc");
    assert_eq!(owner(&made), (100000, 100000), "runc's file on the host");
    // An exec'd process joins the container's user namespace.
    edit(&["sleep", "60"], true);
    let exec_id = id("userns-exec");
    common::ok(&["create", "--bundle", b.0.to_str().unwrap(), &exec_id]);
    common::ok(&["start", &exec_id]);
    let seen = common::ok(&[
        "exec",
        &exec_id,
        "sh",
        "-c",
        "cat /proc/self/uid_map; id -u; stat -c %u:%g /made /hostroot; touch /by-exec",
    ]);
    common::ok(&["delete", "--force", &exec_id]);
    assert_eq!(
        seen,
        "         0     100000      65536\n0\n0:0\n65534:65534\n"
    );
    assert_eq!(owner(&b.rootfs().join("by-exec")), (100000, 100000));
    // Maps without a user namespace: refused by name, as runc refuses them.
    edit(&["true"], false);
    let out = husk_run(&b.0, &id("userns-bad"), b"");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(
            "linux.uidMappings and linux.gidMappings need a user namespace in linux.namespaces"
        ),
        "{}",
        text(&out.stderr)
    );
}
