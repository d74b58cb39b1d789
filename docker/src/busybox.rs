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

use crate::BusyboxError;

/// Where Debian's busybox-static puts busybox.
pub const BUSYBOX: &str = "/bin/busybox";

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BusyboxError {
    BusyboxError::at(what, path)
}

/// Writes a busybox root filesystem into `rootfs` (which must not exist).
pub fn make_rootfs(rootfs: &Path) -> Result<(), BusyboxError> {
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
pub fn make_bundle(dir: &Path, args: &[&str]) -> Result<(), BusyboxError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    make_rootfs(&dir.join("rootfs"))?;
    let path = dir.join("config.json");
    let json = serde_json::to_string_pretty(&config(args)).map_err(BusyboxError::Json)?;
    std::fs::write(&path, json).map_err(io("write", &path))
}

/// The name the busybox image is given in an archive's index.
pub const IMAGE_NAME: &str = "docker.io/husk/busybox:latest";

/// The hex digits of a blob's sha256 (the store's digest, less its
/// `sha256:`).
fn sha256_hex(bytes: &[u8]) -> String {
    husk_image::store::sha256(bytes)["sha256:".len()..].to_owned()
}

/// Writes the busybox root filesystem as a one-layer OCI image archive
/// (an OCI image layout in a tar: `oci-layout`, `index.json`, `blobs/`),
/// named [`IMAGE_NAME`], that `ctr images import` and other OCI tools
/// read. Layer entries are owned by root with a fixed time, so the same
/// busybox gives the same digests.
pub fn write_oci_archive(path: &Path) -> Result<String, BusyboxError> {
    write_oci_archive_as(path, IMAGE_NAME, &["sh"])
}

/// [`write_oci_archive`] with the image named `name` and running `cmd`.
pub fn write_oci_archive_as(path: &Path, name: &str, cmd: &[&str]) -> Result<String, BusyboxError> {
    let work = std::env::temp_dir().join(format!("husk-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io("create", &work))?;
    let rootfs = work.join("rootfs");
    let result = (|| {
        make_rootfs(&rootfs)?;
        let mut layer = tar::Builder::new(Vec::new());
        layer.mode(tar::HeaderMode::Deterministic);
        layer.follow_symlinks(false);
        layer
            .append_dir_all(".", &rootfs)
            .map_err(io("pack", &rootfs))?;
        let layer = layer.into_inner().map_err(io("pack", &rootfs))?;
        let layer_digest = sha256_hex(&layer);
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": cmd,
            },
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
            // One entry for its one layer, as every builder writes (a
            // builder on top, buildah's among them, checks the two agree).
            "history": [{"created_by": "husk busybox-image: Debian's busybox-static"}],
        })
        .to_string()
        .into_bytes();
        let config_digest = sha256_hex(&config);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{config_digest}"),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{layer_digest}"),
                "size": layer.len(),
            }],
        })
        .to_string()
        .into_bytes();
        let manifest_digest = sha256_hex(&manifest);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_digest}"),
                "size": manifest.len(),
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name
                        .rsplit('/')
                        .next()
                        .and_then(|last| last.rsplit_once(':'))
                        .map_or("latest", |(_, tag)| tag),
                },
                "platform": {"architecture": "amd64", "os": "linux"},
            }],
        })
        .to_string()
        .into_bytes();
        let file = std::fs::File::create(path).map_err(io("create", path))?;
        let mut archive = tar::Builder::new(file);
        let mut add = |name: &str, bytes: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_cksum();
            archive
                .append_data(&mut header, name, bytes)
                .map_err(io("write", path))
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        add("index.json", &index)?;
        add(&format!("blobs/sha256/{layer_digest}"), &layer)?;
        add(&format!("blobs/sha256/{config_digest}"), &config)?;
        add(&format!("blobs/sha256/{manifest_digest}"), &manifest)?;
        archive.into_inner().map_err(io("write", path))?;
        Ok(format!("sha256:{manifest_digest}"))
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}
