//! OCI bundles: a directory with `config.json` and a root filesystem.
//!
//! The spec is read and checked on the host before any VM starts, so that a
//! bad `config.json` is refused with the JSON path of the field that is
//! wrong (`process.user.uid: invalid type: string "x", expected u32`). The
//! spec then travels to the agent as it is, which applies it in the guest;
//! the host resolves what only it can: the root filesystem's host path and
//! the process it sends the agent.

use std::path::{Path, PathBuf};

use husk_protocol::{Capabilities, Process};
use oci_spec::runtime::Spec;
use thiserror::Error;

/// Why a bundle cannot be used.
#[derive(Debug, Error)]
pub enum BundleError {
    /// `config.json` cannot be read.
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// `config.json` is not valid JSON or not a spec; names the field.
    #[error("{} is not a valid OCI spec: {why}", .path.display())]
    Spec {
        /// config.json.
        path: PathBuf,
        /// The field and the problem.
        why: String,
    },
    /// A field the runtime needs is missing or unusable.
    #[error("{} is not usable: {why}", .path.display())]
    Invalid {
        /// config.json.
        path: PathBuf,
        /// The field and the problem.
        why: String,
    },
}

/// A bundle, checked. It travels to the monitor as it is (serde), not as
/// a path to read again.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Bundle {
    /// The bundle directory.
    pub dir: PathBuf,
    /// The spec as parsed.
    pub spec: Spec,
    /// The spec's JSON, for the agent.
    pub spec_json: String,
    /// The root filesystem on the host (absolute).
    pub rootfs: PathBuf,
    /// `root.readonly`.
    pub readonly: bool,
}

fn names<T: serde::Serialize>(items: Option<&std::collections::HashSet<T>>) -> Vec<String> {
    let mut out: Vec<String> = items
        .into_iter()
        .flatten()
        .filter_map(|c| serde_json::to_value(c).ok()?.as_str().map(str::to_owned))
        .collect();
    out.sort();
    out
}

/// The runtime-spec version husk implements: what `state`, `features`
/// and `--version` report (docs/runtime.md, "Versions").
#[macro_export]
macro_rules! oci_version {
    () => {
        "1.2.0"
    };
}

/// [`oci_version!`] as a constant.
pub const OCI_VERSION: &str = oci_version!();

/// The oldest runtime-spec version husk takes.
pub const OCI_VERSION_MIN: &str = "1.0.0";

/// Checks a spec's `ociVersion`: a semantic version of major 1 (with a
/// pre-release or build suffix or not, as docker's `1.0.2-dev`). A newer
/// minor version only adds optional fields, and clients send newer ones
/// than their runtime implements; what husk cannot honour of them is
/// refused by its field. Anything else is refused, naming it.
pub fn check_oci_version(version: &str) -> Result<(), String> {
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    let numeric = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if parts.len() == 3 && parts.iter().all(numeric) && parts[0] == "1" {
        return Ok(());
    }
    Err(format!(
        "ociVersion {version:?} is not a runtime-spec version husk takes: it takes 1.x.y, from {OCI_VERSION_MIN} (it implements {OCI_VERSION})"
    ))
}

impl Bundle {
    /// Reads and checks the bundle at `dir`.
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let config = dir.join("config.json");
        let json =
            std::fs::read_to_string(&config).map_err(|e| BundleError::Read(config.clone(), e))?;
        let de = &mut serde_json::Deserializer::from_str(&json);
        let spec: Spec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let what = if path == "." || path == "?" {
                inner.to_string()
            } else {
                format!("{path}: {inner}")
            };
            BundleError::Spec {
                path: config.clone(),
                why: what,
            }
        })?;
        let invalid = |why: &str| BundleError::Invalid {
            path: config.clone(),
            why: why.to_owned(),
        };
        check_oci_version(spec.version()).map_err(|why| invalid(&why))?;
        let root = spec
            .root()
            .as_ref()
            .ok_or_else(|| invalid("root: missing"))?;
        if root.path().as_os_str().is_empty() {
            return Err(invalid("root.path: empty"));
        }
        let rootfs = dir.join(root.path());
        let rootfs = rootfs.canonicalize().map_err(|e| {
            invalid(&format!(
                "root.path: {} cannot be used: {e}",
                rootfs.display()
            ))
        })?;
        if !rootfs.is_dir() {
            return Err(invalid(&format!(
                "root.path: {} is not a directory",
                rootfs.display()
            )));
        }
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| invalid("process: missing"))?;
        if process.args().as_ref().is_none_or(Vec::is_empty) {
            return Err(invalid("process.args: missing or empty"));
        }
        if !process.cwd().is_absolute() {
            return Err(invalid(&format!(
                "process.cwd: {} is not absolute",
                process.cwd().display()
            )));
        }
        Ok(Self {
            dir: dir.to_owned(),
            readonly: root.readonly() == Some(true),
            spec,
            spec_json: json,
            rootfs,
        })
    }

    /// The container's process, as the agent takes it.
    pub fn process(&self) -> Process {
        process_of(&self.spec)
    }
}

/// The process of `spec`, as the agent takes it.
pub fn process_of(spec: &Spec) -> Process {
    let Some(p) = spec.process() else {
        return Process::default();
    };
    let user = p.user();
    Process {
        args: p.args().clone().unwrap_or_default(),
        env: p.env().clone().unwrap_or_default(),
        cwd: p.cwd().display().to_string(),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        umask: user.umask(),
        terminal: p.terminal() == Some(true),
        rlimits: p
            .rlimits()
            .iter()
            .flatten()
            .filter_map(|r| {
                let name = serde_json::to_value(r.typ()).ok()?.as_str()?.to_owned();
                Some((name, (r.soft(), r.hard())))
            })
            .collect(),
        no_new_privileges: p.no_new_privileges() == Some(true),
        oom_score_adj: p.oom_score_adj(),
        capabilities: p.capabilities().as_ref().map(|c| Capabilities {
            bounding: names(c.bounding().as_ref()),
            effective: names(c.effective().as_ref()),
            permitted: names(c.permitted().as_ref()),
            inheritable: names(c.inheritable().as_ref()),
            ambient: names(c.ambient().as_ref()),
        }),
        stdin_null: false,
    }
}

/// The default `config.json` (what `runc spec` writes): `sh` on a
/// terminal, a read-only root in `rootfs`, the standard mounts, masked and
/// read-only paths, and the mount, UTS, IPC, PID and network namespaces.
pub fn default_spec() -> String {
    serde_json::to_string_pretty(&Spec::default()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(name: &str, config: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-bundle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
        dir
    }

    fn error(name: &str, config: &str) -> String {
        let dir = bundle(name, config);
        let err = Bundle::load(&dir).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        err.replace(&dir.display().to_string(), "B")
    }

    const GOOD: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs","readonly":true},
        "process":{"args":["sh"],"cwd":"/","user":{"uid":1000,"gid":100,"additionalGids":[10]},
        "env":["A=1"],"terminal":false,"noNewPrivileges":true,
        "rlimits":[{"type":"RLIMIT_NOFILE","soft":1024,"hard":2048}],
        "capabilities":{"bounding":["CAP_KILL","CAP_CHOWN"]}}}"#;

    #[test]
    fn a_good_bundle_resolves_its_root_and_process() {
        let dir = bundle("good", GOOD);
        let b = Bundle::load(&dir).unwrap();
        assert_eq!(b.rootfs, dir.join("rootfs").canonicalize().unwrap());
        assert!(b.readonly);
        let p = b.process();
        assert_eq!(p.args, ["sh"]);
        assert_eq!(
            (p.uid, p.gid, p.additional_gids.clone()),
            (1000, 100, vec![10])
        );
        assert_eq!(p.rlimits["RLIMIT_NOFILE"], (1024, 2048));
        assert!(p.no_new_privileges);
        assert_eq!(p.capabilities.unwrap().bounding, ["CAP_CHOWN", "CAP_KILL"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_runtime_spec_versions_of_major_1_are_taken() {
        for good in [
            "1.0.0",
            "1.0.2-dev",
            "1.1.0-rc.1",
            "1.2.0",
            "1.3.0",
            "1.2.1+build",
        ] {
            assert_eq!(check_oci_version(good), Ok(()), "{good}");
        }
        for bad in [
            "", "invalid", "1.0", "2.0.0", "0.9.9", "1.x.0", "v1.0.0", "1.0.0.0",
        ] {
            let err = check_oci_version(bad).unwrap_err();
            assert!(
                err.starts_with(&format!("ociVersion {bad:?} is not a runtime-spec version")),
                "{err}"
            );
        }
        let cfg = GOOD.replace("1.0.2", "invalid");
        assert_eq!(
            error("badversion", &cfg),
            "B/config.json is not usable: ociVersion \"invalid\" is not a runtime-spec version husk takes: it takes 1.x.y, from 1.0.0 (it implements 1.2.0)"
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        assert_eq!(
            error("notjson", "not json"),
            "B/config.json is not a valid OCI spec: expected ident at line 1 column 2"
        );
        assert_eq!(
            error(
                "noroot",
                r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}}"#
            ),
            "B/config.json is not usable: root: missing"
        );
        assert_eq!(
            error(
                "wrongtype",
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["sh"],"cwd":"/","user":{"uid":"x","gid":0}}}"#
            ),
            "B/config.json is not a valid OCI spec: process.user.uid: invalid type: string \"x\", expected u32 at line 1 column 99"
        );
        assert_eq!(
            error(
                "noargs",
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"cwd":"/","user":{"uid":0,"gid":0}}}"#
            ),
            "B/config.json is not usable: process.args: missing or empty"
        );
        assert!(
            error("badroot", r#"{"ociVersion":"1.0.2","root":{"path":"nope"},"process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}}"#)
                .starts_with("B/config.json is not usable: root.path: B/nope cannot be used: No such file")
        );
        assert_eq!(
            error(
                "relcwd",
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["sh"],"cwd":"tmp","user":{"uid":0,"gid":0}}}"#
            ),
            "B/config.json is not usable: process.cwd: tmp is not absolute"
        );
        let dir = std::env::temp_dir().join("husk-bundle-missing-dir");
        assert!(
            Bundle::load(&dir)
                .unwrap_err()
                .to_string()
                .starts_with("cannot read /tmp/husk-bundle-missing-dir/config.json")
        );
    }
}
