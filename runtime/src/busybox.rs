//! The built-in default container: an OCI bundle made from Debian's
//! `busybox-static`, so that `husk run` has something to run with no
//! image registry at all (the README's first command, and the tests).
//!
//! The root filesystem holds `/bin/busybox`, a symlink per applet at the
//! path busybox lists for it, `/etc/passwd` and `/etc/group` with root and
//! nobody, and the usual empty directories. The config is the default spec
//! (`husk spec`) with the given command, no terminal, and hostname `husk`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use oci_spec::runtime::Spec;

/// Where Debian's busybox-static puts busybox.
pub const BUSYBOX: &str = "/bin/busybox";

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> String {
    let what = format!("cannot {what} {}", path.display());
    move |e| format!("{what}: {e}")
}

/// Writes a busybox root filesystem into `rootfs` (which must not exist).
pub fn make_rootfs(rootfs: &Path) -> Result<(), String> {
    std::fs::create_dir(rootfs).map_err(io("create", rootfs))?;
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run",
        "var/tmp",
    ] {
        let path = rootfs.join(dir);
        std::fs::create_dir_all(&path).map_err(io("create", &path))?;
    }
    for tmp in ["tmp", "var/tmp"] {
        let path = rootfs.join(tmp);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o1777))
            .map_err(io("set the mode of", &path))?;
    }
    let target = rootfs.join("bin/busybox");
    std::fs::copy(BUSYBOX, &target).map_err(io("copy", Path::new(BUSYBOX)))?;
    let list = Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .map_err(io("run", Path::new(BUSYBOX)))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = rootfs.join(applet);
        if applet.contains("..") || link.exists() {
            continue;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link).map_err(io("create", &link))?;
    }
    let files = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hostname", "husk\n"),
    ];
    for (name, content) in files {
        let path = rootfs.join(name);
        std::fs::write(&path, content).map_err(io("write", &path))?;
    }
    Ok(())
}

/// The config of a busybox bundle that runs `args`.
pub fn config(args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    if let Some(process) = spec.process_mut() {
        process.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        process.set_terminal(Some(false));
    }
    spec.set_hostname(Some("husk".into()));
    spec
}

/// Makes a busybox bundle in `dir` (created) that runs `args`.
pub fn make_bundle(dir: &Path, args: &[&str]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    make_rootfs(&dir.join("rootfs"))?;
    let path = dir.join("config.json");
    let json = serde_json::to_string_pretty(&config(args)).map_err(|e| e.to_string())?;
    std::fs::write(&path, json).map_err(io("write", &path))
}
