//! Boots of the real guest kernel with the test init, on real KVM.
//!
//! Each boot costs seconds to a minute where KVM emulates guest kernel mode
//! (../shared/HOST-KVM.md), so there are few of them and each checks
//! several things: the console, the exit status, the VM's shape as the
//! guest sees it, the system calls the test init makes, and the timings.

mod common;

use common::{Scratch, kernel, run_with_timeout, test_initramfs, text, vmm};

/// Boots the test init and returns (console, stderr, timings JSON).
fn boot(
    scratch: &Scratch,
    cpus: u8,
    memory_mib: u64,
    extra: &[&str],
) -> (String, String, serde_json::Value) {
    let initramfs = test_initramfs(scratch);
    let timings = scratch.path("timings.json");
    let mut cmd = vmm(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initramfs",
        initramfs.to_str().unwrap(),
        "--cpus",
        &cpus.to_string(),
        "--memory",
        &memory_mib.to_string(),
        "--timings",
        timings.to_str().unwrap(),
    ]);
    cmd.args(extra);
    let out = run_with_timeout(cmd);
    let console = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "husk-vmm failed ({}): {stderr}\nconsole:\n{console}",
        out.status
    );
    let timings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&timings).unwrap()).unwrap();
    (console, stderr, timings)
}

/// The test init's verdict line, parsed into (cpus, mem_mib).
fn verdict(console: &str) -> (u64, u64) {
    let line = console
        .lines()
        .find(|l| l.starts_with("husk-test-init: ok ") || l.starts_with("husk-test-init: FAIL"))
        .unwrap_or_else(|| panic!("no verdict from the test init:\n{console}"));
    assert!(
        line.starts_with("husk-test-init: ok ") && line.ends_with("fork=ok exec=ok signal=ok"),
        "{line}"
    );
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("cpus="), field("mem_mib="))
}

#[test]
fn one_vcpu_128_mib_boots_to_init_and_powers_off() {
    let scratch = Scratch::new("boot-1x128");
    let (console, _, timings) = boot(&scratch, 1, 128, &[]);
    // The kernel's own log reached the serial console...
    assert!(console.contains("Linux version 6.12"), "{console}");
    assert!(console.contains("Run /init as init process"), "{console}");
    // ...and so did the init's lines, each written with write(2).
    assert!(console.contains("husk-test-init: started"), "{console}");
    let (cpus, mem) = verdict(&console);
    assert_eq!(cpus, 1);
    assert!((100..=128).contains(&mem), "guest sees {mem} MiB");
    // The virtio-rng device (virtio-mmio transport, queue, irqfd) gave the
    // guest's /dev/hwrng random bytes.
    assert!(
        console.contains("husk-test-init: hwrng ok 32 bytes"),
        "{console}"
    );
    // The power-off ended the VM: nothing the kernel prints after it.
    assert!(!console.contains("Attempted to kill init"), "{console}");

    let us = |k: &str| {
        timings[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k}: {timings}"))
    };
    assert!(us("first_kvm_run_us") < us("kernel_start_us"));
    assert!(us("kernel_start_us") < us("init_start_us"));
    assert!(us("init_start_us") < us("exit_us"));
    assert!(timings["vmm_rss_kib"].as_u64().unwrap() > 0);
    let marks: Vec<u64> = timings["marks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_u64().unwrap())
        .collect();
    assert_eq!(marks, [0x01, 0x02, 0x10], "kernel start, init, power-off");
}

#[test]
fn two_vcpus_one_gib_boots_with_both_cpus_online() {
    let scratch = Scratch::new("boot-2x1024");
    let (console, _, _) = boot(&scratch, 2, 1024, &["--no-rng"]);
    // --no-rng: no device, and the guest says so. (Its line can be split
    // by a kernel message printed from the other vCPU meanwhile, so only
    // the words are looked for.)
    assert!(console.contains("hwrng absent"), "{console}");
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "{console}"
    );
    let (cpus, mem) = verdict(&console);
    assert_eq!(cpus, 2);
    assert!((960..=1024).contains(&mem), "guest sees {mem} MiB");
}

#[test]
fn guest_panic_is_reported_and_the_vmm_exits_non_zero() {
    let scratch = Scratch::new("panic");
    let initramfs = test_initramfs(&scratch);
    let out = run_with_timeout(vmm(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initramfs",
        initramfs.to_str().unwrap(),
        "--cmdline",
        "rdinit=/nonexistent init=/nonexistent",
    ]));
    let console = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}\n{console}");
    assert!(console.contains("Kernel panic - not syncing"), "{console}");
    assert_eq!(
        stderr.trim(),
        "husk-vmm: the guest kernel panicked (its console shows why)"
    );
    // The VMM left nothing behind: its scratch dir holds only our inputs.
    let mut left: Vec<_> = std::fs::read_dir(&scratch.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["initramfs.cpio"]);
}

#[test]
fn a_guest_flooding_its_console_fills_no_more_than_the_limit() {
    // The test init writes 3000 numbered lines (~300 KB) to its console;
    // the file keeps the newest 64 KiB at most, whole lines, in order.
    let scratch = Scratch::new("console-flood");
    let console = scratch.path("console.log");
    let (_, stderr, _) = boot(
        &scratch,
        1,
        128,
        &[
            "--console",
            console.to_str().unwrap(),
            "--console-limit",
            "65536",
            "--cmdline=-- flood",
        ],
    );
    let kept = std::fs::read_to_string(&console).unwrap();
    assert!(kept.len() <= 65536, "{} bytes kept", kept.len());
    assert!(kept.len() >= 16384, "only {} bytes kept", kept.len());
    assert!(
        kept.contains("husk-test-init: flood 2999 ") && kept.contains("husk-test-init: flood done"),
        "{stderr}\n{}",
        &kept[kept.len().saturating_sub(500)..]
    );
    assert!(!kept.contains("flood 0000 "), "the oldest lines were kept");
    // The newest lines, each whole and in order.
    let numbers: Vec<u32> = kept
        .lines()
        .filter_map(|l| l.strip_prefix("husk-test-init: flood "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    assert_eq!(numbers.last(), Some(&2999));
    // Cut at a line's start.
    assert!(
        kept.starts_with("husk-test-init: flood "),
        "{}",
        &kept[..80]
    );
}
