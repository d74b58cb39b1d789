//! The crate map's rules (docs/design.md, "Crates and what each may
//! depend on"), checked on the real dependency graph: the host-side
//! libraries link nothing of the VMM, and the contracts crate links none
//! of husk's other crates.

use std::process::Command;

/// The crates `package` links in normal (non-dev, non-build) use.
fn normal_dependencies(package: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree", "--locked", "-e", "normal", "--prefix", "none", "-f", "{p}", "-p",
        ])
        .arg(package)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// What only husk-vmm may link.
const VMM_ONLY: [&str; 8] = [
    "husk-vmm",
    "husk-seccomp",
    "kvm-ioctls",
    "kvm-bindings",
    "fuse-backend-rs",
    "seccompiler",
    "landlock",
    "vm-memory",
];

#[test]
fn the_host_libraries_link_nothing_of_the_vmm() {
    for package in [
        "husk-protocol",
        "husk-sys",
        "husk-guest",
        "husk-image",
        "husk-runtime",
        "husk-docker",
        "husk-build",
        "husk",
        "husk-shim",
    ] {
        let deps = normal_dependencies(package);
        assert!(deps.iter().any(|d| d == package), "{package}: {deps:?}");
        let linked: Vec<_> = VMM_ONLY
            .iter()
            .filter(|c| deps.iter().any(|d| d == *c))
            .collect();
        assert!(linked.is_empty(), "{package} links {linked:?}");
    }
    // The VMM does link them: the check above looks in the right place.
    let vmm = normal_dependencies("husk-vmm");
    assert!(vmm.iter().any(|d| d == "kvm-ioctls"), "{vmm:?}");
}

#[test]
fn each_library_links_only_the_husk_crates_below_it() {
    // The layers of docs/design.md: a crate may use those listed for it.
    let allowed: [(&str, &[&str]); 11] = [
        ("husk-protocol", &[]),
        ("husk-sys", &[]),
        ("husk-seccomp", &[]),
        ("husk-guest", &["husk-protocol", "husk-sys"]),
        ("husk-image", &["husk-sys"]),
        ("husk-vmm", &["husk-protocol", "husk-sys", "husk-seccomp"]),
        ("husk-runtime", &["husk-protocol", "husk-sys", "husk-guest"]),
        (
            "husk-docker",
            &[
                "husk-protocol",
                "husk-sys",
                "husk-guest",
                "husk-image",
                "husk-runtime",
            ],
        ),
        (
            "husk-build",
            &[
                "husk-protocol",
                "husk-sys",
                "husk-guest",
                "husk-image",
                "husk-runtime",
                "husk-docker",
            ],
        ),
        ("husk-agent", &["husk-protocol", "husk-seccomp"]),
        (
            "husk-shim",
            &["husk-protocol", "husk-sys", "husk-guest", "husk-runtime"],
        ),
    ];
    for (package, may) in allowed {
        let husk: Vec<_> = normal_dependencies(package)
            .into_iter()
            .filter(|d| d.starts_with("husk-") && d != package)
            .collect();
        let extra: Vec<_> = husk.iter().filter(|d| !may.contains(&d.as_str())).collect();
        assert!(
            extra.is_empty(),
            "{package} links {extra:?}, beyond {may:?}"
        );
    }
}
