//! `husk checkpoint` and `husk restore` on real microVMs (warm starts):
//! a container saved while it runs, with a file open and a counter in its
//! shell's memory, goes on counting where it stopped, writing through the
//! same open file; a container made from an image gets its writable layer
//! back as it was at the checkpoint; and each kind of bad checkpoint or
//! wrong request is refused by name, leaving nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Bundle, HUSK, counted, husk, id, ok, refused, root, status, text, with_root};

/// `args` with the tests' `--root` in front, unless they name one.
/// Runs `husk --root <root> args...` to completion (60 s at most), its
/// stdout going to `out` (kept: a detached container's monitor writes
/// there after husk returns), its stderr returned.
fn husk_to(args: &[&str], out: &Path) -> Output {
    let err = out.with_extension(format!("err{}", rand_suffix()));
    let mut child = Command::new(HUSK)
        .args(with_root(args))
        .stdin(Stdio::null())
        .stdout(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(out)
                .unwrap(),
        )
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let status = common::exit_within_a_minute(&mut child, args);
    let stderr = std::fs::read(&err).unwrap_or_default();
    let _ = std::fs::remove_file(&err);
    Output {
        status,
        stdout: Vec::new(),
        stderr,
    }
}

fn rand_suffix() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("ckpt", name)
}

/// `husk restore -d` of the checkpoint at `image` as container `id`, its
/// output into `out`.
fn restore_to(image: &Path, bundle: &str, id: &str, out: &Path) -> Output {
    let image = image.to_str().unwrap();
    husk_to(
        &[
            "restore",
            "-d",
            "--image-path",
            image,
            "--bundle",
            bundle,
            id,
        ],
        out,
    )
}

/// Waits (30 s at most) until the counter file holds at least `n` lines.
fn wait_for_count(path: &Path, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = counted(path);
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} reached {} lines, not {n}",
            path.display(),
            got.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 1, 2, 3, ... with no number missing or repeated: one shell counted
/// them all, from its memory.
fn assert_one_count(got: &[u64]) {
    let want: Vec<u64> = (1..=got.len() as u64).collect();
    assert_eq!(got, want, "the count restarted or skipped");
}

/// A shell that counts in memory, appending each number through one file
/// descriptor it opened once, and printing it.
const COUNTER: &str =
    "i=0; exec 3>>/counter; while :; do i=$((i+1)); echo $i >&3; echo tick $i; sleep 0.2; done";

#[test]
fn a_checkpointed_container_goes_on_where_it_was_with_its_open_file() {
    let b = Bundle::new("ckpt", &["sh", "-c", COUNTER], |spec| {
        if let Some(root) = spec.root_mut() {
            root.set_readonly(Some(false));
        }
    });
    let id = id("ckpt");
    let bundle = b.0.to_str().unwrap();
    let work = scratch("bundle");
    let counter = b.rootfs().join("counter");
    let first_out = work.join("first.out");
    let out = husk_to(&["run", "-d", "--bundle", bundle, &id], &first_out);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for_count(&counter, 3);

    // Not into a directory that holds something else.
    let busy = work.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("precious"), b"keep").unwrap();
    refused(
        &["checkpoint", "--image-path", busy.to_str().unwrap(), &id],
        "is not empty and holds no checkpoint",
    );
    assert_eq!(std::fs::read(busy.join("precious")).unwrap(), b"keep");
    assert_eq!(status(&id), "running");

    // Left running: it goes on counting.
    let kept = work.join("kept");
    ok(&[
        "checkpoint",
        "--leave-running",
        "--image-path",
        kept.to_str().unwrap(),
        &id,
    ]);
    assert_eq!(status(&id), "running");
    let n = counted(&counter).len();
    wait_for_count(&counter, n + 2);

    // Paused, then checkpointed and left running: still paused (it counts
    // no further) until resumed.
    ok(&["pause", &id]);
    let paused = work.join("paused");
    ok(&[
        "checkpoint",
        "--leave-running",
        "--image-path",
        paused.to_str().unwrap(),
        &id,
    ]);
    assert_eq!(status(&id), "paused");
    let paused_at = counted(&counter);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(counted(&counter), paused_at, "a paused VM ran");
    ok(&["resume", &id]);
    wait_for_count(&counter, paused_at.len() + 2);

    // Checkpointed: it stops, and counts no more.
    let image = work.join("image");
    ok(&["checkpoint", "--image-path", image.to_str().unwrap(), &id]);
    assert_eq!(status(&id), "stopped");
    let at_checkpoint = counted(&counter);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        counted(&counter),
        at_checkpoint,
        "it ran on after its checkpoint"
    );
    assert_one_count(&at_checkpoint);
    refused(
        &["checkpoint", "--image-path", image.to_str().unwrap(), &id],
        "is stopped: only a running or paused container can be checkpointed",
    );
    ok(&["delete", &id]);

    // Refused: another container's checkpoint, a directory that is none,
    // a corrupted snapshot. None of them leaves a container behind.
    let other = id.replace("ckpt", "other");
    refused(
        &[
            "restore",
            "-d",
            "--image-path",
            image.to_str().unwrap(),
            "--bundle",
            bundle,
            &other,
        ],
        &format!("is of container \"{id}\""),
    );
    refused(&["state", &other], "does not exist");
    refused(
        &[
            "restore",
            "-d",
            "--image-path",
            busy.to_str().unwrap(),
            "--bundle",
            bundle,
            &id,
        ],
        "is not a husk checkpoint",
    );
    let broken = work.join("broken");
    let copied = Command::new("cp")
        .args(["-a", image.to_str().unwrap(), broken.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(copied.success());
    let state_file = broken.join("vm").join("state");
    let mut bytes = std::fs::read(&state_file).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 1;
    std::fs::write(&state_file, bytes).unwrap();
    refused(
        &[
            "restore",
            "-d",
            "--image-path",
            broken.to_str().unwrap(),
            "--bundle",
            bundle,
            &id,
        ],
        "its checksum does not match",
    );
    refused(&["state", &id], "does not exist");

    // Restored: the same shell goes on from its next number, through the
    // file it had open, and its output reaches the new monitor.
    let restored_out = work.join("restored.out");
    let out = restore_to(&image, bundle, &id, &restored_out);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(status(&id), "running");
    let got = wait_for_count(&counter, at_checkpoint.len() + 3);
    assert_one_count(&got);
    let next = at_checkpoint.len() + 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text(&std::fs::read(&restored_out).unwrap()).contains(&format!("tick {}\n", next + 1)) {
        assert!(Instant::now() < deadline, "no output after the restore");
        std::thread::sleep(Duration::from_millis(100));
    }
    let printed = text(&std::fs::read(&restored_out).unwrap());
    assert!(printed.contains(&format!("tick {next}\n")), "{printed}");
    assert!(!printed.contains("tick 1\n"), "{printed}");
    // The agent answers as before.
    assert!(ok(&["exec", &id, "cat", "/counter"]).starts_with("1\n2\n"));

    // Moved: checkpointed again, its bundle copied elsewhere, restored
    // under another root. It counts on in the copy; the original's file
    // stands still.
    let moved_image = work.join("moved-image");
    ok(&[
        "checkpoint",
        "--image-path",
        moved_image.to_str().unwrap(),
        &id,
    ]);
    ok(&["delete", &id]);
    let before_move = counted(&counter);
    assert_one_count(&before_move);
    let elsewhere = work.join("elsewhere");
    let copied = Command::new("cp")
        .args(["-a", bundle, elsewhere.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(copied.success());
    let other_root = work.join("other-root");
    let moved_out = work.join("moved.out");
    let out = husk_to(
        &[
            "--root",
            other_root.to_str().unwrap(),
            "restore",
            "-d",
            "--image-path",
            moved_image.to_str().unwrap(),
            "--bundle",
            elsewhere.to_str().unwrap(),
            &id,
        ],
        &moved_out,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let moved_counter = elsewhere.join("rootfs").join("counter");
    let got = wait_for_count(&moved_counter, before_move.len() + 3);
    assert_one_count(&got);
    assert_eq!(counted(&counter), before_move);
    let in_other = |args: &[&str]| {
        let mut all = vec!["--root", other_root.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = husk(&all);
        assert!(out.status.success(), "husk {all:?}: {}", text(&out.stderr));
    };
    in_other(&["kill", &id, "KILL"]);
    in_other(&["delete", "--force", &id]);
    assert!(!other_root.join("containers").join(&id).exists());
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn an_image_containers_writable_layer_comes_back_from_its_checkpoint() {
    let name = id("ckimg");
    let work = scratch("image");
    let image = work.join("image");
    ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "husk/busybox",
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo $i >> /log; sleep 0.2; done",
    ]);
    let upper = root().join("docker").join(&name).join("upper");
    wait_for_count(&upper.join("log"), 3);
    ok(&["checkpoint", "--image-path", image.to_str().unwrap(), &name]);
    let at_checkpoint = counted(&upper.join("log"));
    assert_one_count(&at_checkpoint);
    assert_eq!(counted(&image.join("upper").join("log")), at_checkpoint);
    let listed = ok(&["ps", "-a"]);
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&name) && l.contains("Exited")),
        "{listed}"
    );
    // What happens to its layer after the checkpoint is not what the
    // restored container sees: it gets the checkpoint's.
    std::fs::write(upper.join("later"), b"after the checkpoint").unwrap();
    std::fs::write(upper.join("log"), b"1\n").unwrap();

    ok(&[
        "restore",
        "--image-path",
        image.to_str().unwrap(),
        "-d",
        &name,
    ]);
    let listed = ok(&["ps"]);
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&name) && l.contains("Up")),
        "{listed}"
    );
    let got = wait_for_count(&upper.join("log"), at_checkpoint.len() + 3);
    assert_one_count(&got);
    // Its network (the root's default one) came back with it: the
    // restored guest reaches a server on the host through the gateway.
    let inspect: serde_json::Value = serde_json::from_str(&ok(&["inspect", &name])).unwrap();
    let gateway = inspect[0]["NetworkSettings"]["Gateway"]
        .as_str()
        .unwrap()
        .to_owned();
    let listener = std::net::TcpListener::bind((gateway.as_str(), 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&conn), &mut line).unwrap();
        line
    });
    ok(&[
        "exec",
        &name,
        "sh",
        "-c",
        &format!("echo from the restored guest | timeout 30 nc {gateway} {port}"),
    ]);
    assert_eq!(server.join().unwrap(), "from the restored guest\n");
    let out = husk(&["exec", &name, "ls", "/later"]);
    assert!(!out.status.success(), "the layer is not the checkpoint's");
    // A running container is not restored over.
    refused(
        &[
            "restore",
            "--image-path",
            image.to_str().unwrap(),
            "-d",
            &name,
        ],
        "is running: stop it before restoring a checkpoint into it",
    );

    // docker's form: checkpoint create (it stops), ls, start --checkpoint,
    // rm; the checkpoints are the container's own.
    assert_eq!(ok(&["checkpoint", "create", &name, "cp1"]), "cp1\n");
    let listed = ok(&["ps", "-a"]);
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&name) && l.contains("Exited")),
        "{listed}"
    );
    refused(
        &["checkpoint", "create", &name, "cp1"],
        "already has a checkpoint named cp1",
    );
    refused(
        &["checkpoint", "create", &name, "../out"],
        "is not a checkpoint name",
    );
    assert_eq!(ok(&["checkpoint", "ls", &name]), "CHECKPOINT NAME\ncp1\n");
    let at_cp1 = counted(&upper.join("log"));
    ok(&["start", "--checkpoint", "cp1", &name]);
    let got = wait_for_count(&upper.join("log"), at_cp1.len() + 2);
    assert_one_count(&got);
    refused(
        &["checkpoint", "rm", &name, "nope"],
        "has no checkpoint named nope",
    );
    ok(&["checkpoint", "rm", &name, "cp1"]);
    assert_eq!(ok(&["checkpoint", "ls", &name]), "CHECKPOINT NAME\n");
    // A checkpoint without a writable layer is not restored into a
    // container made from an image (its layer is kept).
    ok(&["stop", "-t", "1", &name]);
    let manifest = image.join("checkpoint.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    m["upper"] = false.into();
    std::fs::write(&manifest, m.to_string()).unwrap();
    let before = std::fs::read(upper.join("log")).unwrap();
    refused(
        &[
            "restore",
            "--image-path",
            image.to_str().unwrap(),
            "-d",
            &name,
        ],
        "holds no writable layer",
    );
    assert_eq!(std::fs::read(upper.join("log")).unwrap(), before);
    ok(&["rm", "-f", &name]);
    assert!(!root().join("docker").join(&name).exists());
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn a_deleted_open_file_refuses_the_checkpoint_and_a_paused_container_stays_paused() {
    let b = Bundle::new(
        "ckpt-gone",
        &[
            "sh",
            "-c",
            "exec 4>/scratch; rm /scratch; i=0; while :; do i=$((i+1)); echo $i >> /counter; sleep 0.2; done",
        ],
        |spec| {
            if let Some(root) = spec.root_mut() {
                root.set_readonly(Some(false));
            }
        },
    );
    let id = id("ckpt-gone");
    let work = scratch("gone");
    let out = husk_to(
        &["run", "-d", "--bundle", b.0.to_str().unwrap(), &id],
        &work.join("out"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let counter = b.rootfs().join("counter");
    wait_for_count(&counter, 2);
    // The shell holds /scratch open after deleting it: a new VM could not
    // open it again. Refused by name; nothing written; it runs on.
    let image = work.join("image");
    refused(
        &["checkpoint", "--image-path", image.to_str().unwrap(), &id],
        "the guest holds open /scratch, which was deleted",
    );
    assert!(!image.join("checkpoint.json").exists());
    assert!(!image.join("vm").exists());
    assert_eq!(status(&id), "running");
    let n = counted(&counter).len();
    wait_for_count(&counter, n + 2);

    // Paused, checkpointed (left running): still paused, and not counting
    // until resumed. The refusal above needs no paused VM; this one is
    // refused the same way, paused.
    ok(&["pause", &id]);
    refused(
        &[
            "checkpoint",
            "--leave-running",
            "--image-path",
            image.to_str().unwrap(),
            &id,
        ],
        "which was deleted",
    );
    assert_eq!(status(&id), "paused");
    let paused_at = counted(&counter);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(counted(&counter), paused_at, "a paused VM ran");
    ok(&["resume", &id]);
    wait_for_count(&counter, paused_at.len() + 2);
    ok(&["delete", "--force", &id]);
    refused(&["state", &id], "does not exist");
    std::fs::remove_dir_all(&work).unwrap();
}

/// Issue 13 through a checkpoint: a restored guest resumes with saved
/// register state. Four concurrent loops of pipelines (results checked)
/// beside the vector-register checker are checkpointed mid-run and
/// restored; every loop must finish with no failure and no crash, and the
/// checker must find its registers intact.
#[test]
fn pipelines_and_vector_registers_survive_a_checkpoint_and_restore() {
    let script = format!(
        "/vc 8 > /vc.out 2>&1 &\n{}echo finished >> /results\nsleep 1000\n",
        common::pipeline_loops(
            3,
            r#"echo "loop$l round $i" >> /progress"#,
            ">> /results 2>&1"
        )
    );
    let b = Bundle::new("ckvec", &["sh", "-c", &script], |spec| {
        if let Some(root) = spec.root_mut() {
            root.set_readonly(Some(false));
        }
    });
    std::fs::copy(common::vector_checker(), b.rootfs().join("vc")).unwrap();
    let id = id("ckvec");
    let bundle = b.0.to_str().unwrap();
    let work = scratch("ckvec");
    let out = husk_to(
        &["run", "-d", "--bundle", bundle, &id],
        &work.join("first.out"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = |name: &str| {
        std::fs::read_to_string(b.rootfs().join(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: {:?}", lines("results"));
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    until("two rounds done", &|| lines("progress").len() >= 2);
    let image = work.join("image");
    ok(&["checkpoint", "--image-path", image.to_str().unwrap(), &id]);
    let at_checkpoint = lines("progress").len();
    ok(&["delete", &id]);
    let out = restore_to(&image, bundle, &id, &work.join("restored.out"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    until("all loops finished", &|| {
        lines("results").iter().any(|l| l == "finished")
    });
    let results = lines("results");
    assert!(lines("progress").len() > at_checkpoint, "{results:?}");
    let printed = [results, lines("vc.out")].concat().join("\n");
    common::assert_pipelines_and_vectors_ok(&printed);
    ok(&["kill", &id, "KILL"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&id) != "stopped" {
        assert!(Instant::now() < deadline, "it did not stop");
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(&["delete", &id]);
    let _ = std::fs::remove_dir_all(&work);
}
