//! Every way `husk-vmm` can be given bad input or a bad host, each with the
//! one clear line it prints. None of these boots a Linux guest.

mod common;

use std::process::Command;

use common::{Scratch, VMM, kernel, run_with_timeout, text, tiny_elf, vmm};

/// Runs husk-vmm and returns (exit code, stderr).
fn fails(cmd: Command) -> (i32, String) {
    let out = run_with_timeout(cmd);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "should have failed: {stderr}");
    (out.status.code().unwrap_or(-1), stderr.trim().to_owned())
}

#[test]
fn missing_kernel_is_named() {
    let (code, err) = fails(vmm(&["--kernel", "/nonexistent/vmlinux"]));
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "husk-vmm: cannot open kernel /nonexistent/vmlinux: No such file or directory (os error 2)"
    );
}

#[test]
fn a_file_that_is_not_elf_is_refused() {
    let scratch = Scratch::new("not-elf");
    let path = scratch.path("bzImage");
    std::fs::write(&path, b"MZ this is not an ELF kernel").unwrap();
    let (code, err) = fails(vmm(&["--kernel", path.to_str().unwrap()]));
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "husk-vmm: kernel {} is not an ELF vmlinux",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn an_elf_without_pvh_entry_is_refused() {
    let scratch = Scratch::new("no-pvh");
    let path = scratch.path("vmlinux");
    std::fs::write(&path, tiny_elf(&[0xf4], false)).unwrap();
    let (code, err) = fails(vmm(&["--kernel", path.to_str().unwrap()]));
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "husk-vmm: kernel {} has no PVH entry point: it is not a Linux vmlinux built with CONFIG_PVH=y",
            path.display()
        )
    );
}

#[test]
fn memory_too_small_or_larger_than_the_host_is_refused() {
    let k = kernel();
    let (code, err) = fails(vmm(&["--kernel", k.to_str().unwrap(), "--memory", "16"]));
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "husk-vmm: guest memory of 16 MiB is too small: Husk needs at least 64 MiB"
    );
    let (code, err) = fails(vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "100000000",
    ]));
    assert_eq!(code, 1);
    assert!(
        err.starts_with("husk-vmm: guest memory of 100000000 MiB is more than this host has ("),
        "{err}"
    );
}

#[test]
fn zero_vcpus_is_refused() {
    let k = kernel();
    let (code, err) = fails(vmm(&["--kernel", k.to_str().unwrap(), "--cpus", "0"]));
    assert_eq!(code, 1);
    assert!(
        err.starts_with("husk-vmm: 0 vCPUs requested: Husk boots 1 to "),
        "{err}"
    );
}

#[test]
fn a_bad_console_path_is_named() {
    let k = kernel();
    let (code, err) = fails(vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--console",
        "/nonexistent/dir/console.log",
    ]));
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "husk-vmm: cannot create console file /nonexistent/dir/console.log: \
         No such file or directory (os error 2)"
    );
}

#[test]
fn a_host_without_dev_kvm_is_named() {
    // A private mount namespace whose /dev is an empty tmpfs: a host where
    // KVM does not exist, made without touching the real /dev.
    let k = kernel();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {VMM} --kernel {}",
            k.display()
        ));
    let (code, err) = fails(cmd);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "husk-vmm: /dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, \
         or run on a machine with virtualization enabled)"
    );
}

#[test]
fn a_user_without_access_to_dev_kvm_is_told_so() {
    // In a private mount namespace, /dev holds only a /dev/kvm node that is
    // root's alone (0600), whatever the host's own permissions; the VMM
    // runs as uid 65534 from a copy any user may execute (the checkout may
    // sit in a directory only root can enter).
    let scratch = Scratch::new("kvm-perm");
    let vmm_copy = scratch.path("husk-vmm");
    std::fs::copy(VMM, &vmm_copy).unwrap();
    std::process::Command::new("chmod")
        .args([
            "755",
            scratch.0.to_str().unwrap(),
            vmm_copy.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && mknod -m 600 /dev/kvm c 10 232 && \
             exec setpriv --reuid=65534 --regid=65534 --clear-groups {} --kernel /nonexistent",
            vmm_copy.display()
        ));
    let (code, err) = fails(cmd);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        "husk-vmm: permission denied opening /dev/kvm: run as root or as a member of the kvm group"
    );
}

#[test]
fn a_guest_that_dies_in_kernel_mode_is_reported_with_its_rip() {
    // A "kernel" whose PVH entry executes int3 in ring 0. Where KVM emulates
    // guest kernel mode, int3 is an instruction it cannot emulate; with
    // hardware virtualization the empty boot IDT turns it into a triple
    // fault. Either way the vCPU dies at the entry point and says where.
    let scratch = Scratch::new("int3");
    let path = scratch.path("vmlinux");
    std::fs::write(&path, tiny_elf(&[0xcc, 0xf4], true)).unwrap();
    let (code, err) = fails(vmm(&["--kernel", path.to_str().unwrap()]));
    assert_eq!(code, 3, "{err}");
    assert!(err.starts_with("husk-vmm: guest vCPU 0 died: "), "{err}");
    if husk_vmm::host::kernel_mode_emulated() {
        // KVM reports the bytes it fetched from the rip on.
        assert!(
            err.starts_with(
                "husk-vmm: guest vCPU 0 died: KVM could not emulate the guest instruction \
                 at rip 0x1000000 (bytes cc f4"
            ),
            "{err}"
        );
    } else {
        assert!(err.contains("triple-faulted at rip"), "{err}");
    }
}

#[test]
fn a_share_that_cannot_be_served_is_named() {
    let kernel = kernel();
    let kernel = kernel.to_str().unwrap();
    let (code, err) = fails(vmm(&[
        "--kernel",
        kernel,
        "--share",
        "rootfs=/nonexistent/share",
    ]));
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "husk-vmm: virtio-fs: cannot share /nonexistent/share: No such file or directory (os error 2)"
    );
    // Not TAG=DIR: a usage error.
    let (code, err) = fails(vmm(&["--kernel", kernel, "--share", "/tmp"]));
    assert_eq!(code, 2);
    assert!(err.contains("share \"/tmp\" is not TAG=DIR[:ro]"), "{err}");
}
