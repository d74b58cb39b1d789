//! Snapshot and restore of a real guest on real KVM, as one story: one
//! cold boot makes the snapshot (the test init's guest, stopped as the
//! kernel executes init) through the runtime's warm-start cache, then every
//! check restores it, which takes a
//! fraction of a second instead of a boot. (nextest runs each test in its
//! own process, so separate tests could not share the snapshot.)

mod common;

use std::path::{Path, PathBuf};

use common::{Scratch, VMM, kernel, run_with_timeout, test_initramfs, text, vmm};
use husk_guest::warm::{self, GuestImage, Origin};

/// The runtime's warm-start cache makes the snapshot on first use: it
/// boots the test init on two vCPUs and snapshots it as the kernel executes
/// init (the vCPU that writes the mark stops itself, the other is kicked
/// out of KVM_RUN by a signal). Asked again, it finds it cached.
fn make_snapshot(scratch: &Scratch) -> PathBuf {
    let image = GuestImage {
        kernel: kernel(),
        initramfs: test_initramfs(scratch),
        vcpus: 2,
        memory_mib: 128,
        ready_mark: 2,
        vsock: false,
        shares: Vec::new(),
        nets: 0,
    };
    let root = scratch.path("root");
    let (snap, origin) = warm::snapshot(&root, Path::new(VMM), &image).unwrap();
    assert_eq!(origin, Origin::Created);
    assert!(
        snap.starts_with(root.join("snapshots")),
        "{}",
        snap.display()
    );
    let (again, origin) = warm::snapshot(&root, Path::new(VMM), &image).unwrap();
    assert_eq!((again, origin), (snap.clone(), Origin::Cached));
    snap
}

#[test]
fn snapshot_restore_and_bad_snapshots() {
    let scratch = Scratch::new("snapshot");
    let snap = make_snapshot(&scratch);
    a_restored_guest_continues_and_runs_its_init(&snap);
    a_corrupted_snapshot_is_refused(&scratch, &snap);
    a_snapshot_from_another_husk_version_is_refused(&scratch, &snap);
    a_truncated_memory_file_is_refused(&scratch, &snap);
    a_cpuid_table_kvm_cannot_take_is_refused(&scratch, &snap);
    a_directory_that_is_no_snapshot_is_named(&scratch);
}

/// Restores `dir` and returns (exit code, console, stderr).
fn restore(dir: &Path) -> (i32, String, String) {
    let out = run_with_timeout(vmm(&["--restore", dir.to_str().unwrap()]));
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

fn a_restored_guest_continues_and_runs_its_init(snap: &Path) {
    // Two VMs from one snapshot, one after the other: each runs the init
    // from where the snapshot stopped (fork, exec, a signal handler), then
    // powers off.
    for _ in 0..2 {
        let (code, console, stderr) = restore(snap);
        assert_eq!(code, 0, "{stderr}\n{console}");
        assert!(console.contains("husk-test-init: started"), "{console}");
        assert!(console.contains("husk-test-init: ok cpus=2 "), "{console}");
        assert!(console.contains("fork=ok exec=ok signal=ok"), "{console}");
        // Nothing of the boot is replayed.
        assert!(!console.contains("Linux version"), "{console}");
    }
}

/// A copy of the snapshot whose memory file is a hard link (no 128 MiB
/// copy), with its state file rewritten by `edit`.
fn altered(
    scratch: &Scratch,
    snap: &Path,
    name: &str,
    edit: impl FnOnce(Vec<u8>) -> Vec<u8>,
) -> PathBuf {
    let dir = scratch.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::hard_link(snap.join("memory"), dir.join("memory")).unwrap();
    let state = std::fs::read(snap.join("state")).unwrap();
    std::fs::write(dir.join("state"), edit(state)).unwrap();
    dir
}

fn a_corrupted_snapshot_is_refused(scratch: &Scratch, snap: &Path) {
    let dir = altered(scratch, snap, "corrupt", |mut state| {
        let at = state.len() - 10;
        state[at] ^= 0x01;
        state
    });
    let (code, console, stderr) = restore(&dir);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "husk-vmm: {} is corrupted: its checksum does not match",
            dir.join("state").display()
        )
    );
    assert!(console.is_empty(), "no VM may start: {console}");
}

fn a_snapshot_from_another_husk_version_is_refused(scratch: &Scratch, snap: &Path) {
    let dir = altered(scratch, snap, "foreign", |state| {
        let text = String::from_utf8(state).unwrap();
        let version = env!("CARGO_PKG_VERSION");
        text.replacen(
            &format!("\"husk_version\":\"{version}\""),
            "\"husk_version\":\"9.9.9\"",
            1,
        )
        .into_bytes()
    });
    let (code, _, stderr) = restore(&dir);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "was written by Husk 9.9.9 (snapshot format {}); this is Husk",
            husk_vmm::snapshot::VERSION
        )),
        "{stderr}"
    );
}

fn a_truncated_memory_file_is_refused(scratch: &Scratch, snap: &Path) {
    let dir = scratch.path("truncated");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(snap.join("state"), dir.join("state")).unwrap();
    let memory = std::fs::File::create(dir.join("memory")).unwrap();
    memory.set_len(64 << 20).unwrap();
    let (code, _, stderr) = restore(&dir);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "husk-vmm: {} is 67108864 bytes; the snapshot's guest has 134217728",
            dir.join("memory").display()
        )
    );
}

fn a_cpuid_table_kvm_cannot_take_is_refused(scratch: &Scratch, snap: &Path) {
    // A restore sets the CPUID table the snapshot kept: one longer than
    // KVM takes (256 entries) is named, with a checksum that matches.
    let dir = altered(scratch, snap, "cpuid", |state| {
        let text = String::from_utf8(state).unwrap();
        let (header, body) = text.split_once('\n').unwrap();
        let mut body: serde_json::Value = serde_json::from_str(body).unwrap();
        let cpuid = body["vcpus"][0]["cpuid"].as_array_mut().unwrap();
        assert!(!cpuid.is_empty(), "the snapshot keeps the vCPU's CPUID");
        let first = cpuid[0].clone();
        cpuid.resize(300, first);
        let body = serde_json::to_vec(&body).unwrap();
        let mut header: serde_json::Value = serde_json::from_str(header).unwrap();
        header["checksum"] = crc32fast::hash(&body).into();
        let mut out = serde_json::to_vec(&header).unwrap();
        out.push(b'\n');
        out.extend(body);
        out
    });
    let (code, console, stderr) = restore(&dir);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("vCPU 0's saved CPUID table has 300 entries, more than KVM takes"),
        "{stderr}"
    );
    assert!(console.is_empty(), "no VM may start: {console}");
}

fn a_directory_that_is_no_snapshot_is_named(scratch: &Scratch) {
    let empty = scratch.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, _, stderr) = restore(&empty);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "husk-vmm: cannot read {}: No such file or directory (os error 2)",
            empty.join("state").display()
        )
    );
    let (code, _, stderr) = {
        let out = run_with_timeout(vmm(&["--restore", "/tmp", "--memory", "256"]));
        (out.status.code().unwrap_or(-1), (), text(&out.stderr))
    };
    assert_eq!(
        code, 2,
        "a restore takes its shape from the snapshot: {stderr}"
    );
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}
