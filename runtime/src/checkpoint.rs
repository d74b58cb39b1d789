//! `husk checkpoint` and `husk restore`: a running container saved to a
//! directory, and a container made from that directory that goes on where
//! the saved one was (runc's commands of those names).
//!
//! A checkpoint is the container's whole VM, not a dump of its processes:
//! the VMM snapshots it (guest memory, vCPUs, devices, and the virtio-fs
//! session: which files the guest has looked up and opened) through its
//! API socket, which leaves the VM paused. For a container made from an
//! image the writable layer (`upper/` of its overlay) is copied next to it
//! while the VM is paused; a bundle's root file system is the bundle's, and
//! stays where it is, as with runc. Then the VM is resumed
//! (`--leave-running`) or ended, and the container is stopped.
//!
//! The directory holds:
//!
//! - `checkpoint.json`: this format's name, the husk version that made
//!   it, the container's ID and VM shape, and whether `upper/` is there;
//! - `vm/`: the VM snapshot (docs/snapshots.md has its format);
//! - `upper/`: the writable layer, for a container made from an image.
//!
//! `restore` starts a monitor as `create` does, but its VMM restores the
//! checkpoint's snapshot with the container's shares bound again (the
//! bundle's root, its volumes). The guest is told that its old vsock
//! connections were reset; its agent keeps the container's output until
//! the new monitor attaches, and the new monitor waits for the same
//! process. What is not carried: the container's stdin (its old stream
//! ends; the process reads end-of-file), and processes `exec`'d into the
//! container keep running without their stdio.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_protocol::api::ApiRequest;
use husk_sys::PathError;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::sandbox::{SandboxError, vmm_api};
use crate::state::{self, ContainerState, StateError, Status};
use husk_guest::shape::Shape;

/// The description of a checkpoint, in its directory.
pub const MANIFEST: &str = "checkpoint.json";
/// The VM snapshot, in a checkpoint's directory.
pub const VM_DIR: &str = "vm";
/// The writable layer, in a checkpoint's directory.
pub const UPPER_DIR: &str = "upper";
/// In a container's state directory: its VM was ended by a checkpoint
/// (the monitor then records no error).
pub const CHECKPOINTED: &str = "checkpointed";
const FORMAT: &str = "husk-checkpoint";

/// Why a checkpoint cannot be made or restored; each names the container
/// or the directory.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// The container's state cannot be read.
    #[error(transparent)]
    State(#[from] StateError),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] PathError),
    /// The container is not running or paused.
    #[error("container {id:?} is {status}: only a running or paused container can be checkpointed")]
    NotRunning {
        /// Container ID.
        id: String,
        /// Its status.
        status: Status,
    },
    /// The container is part of a pod, whose VM holds its other
    /// containers too.
    #[error(
        "container {0:?} is part of a pod: a pod's VM holds all its containers, so one cannot be checkpointed alone"
    )]
    Pod(String),
    /// The container's state has no VM shape.
    #[error("container {0:?} has no VM shape recorded")]
    NoShape(String),
    /// The checkpoint's directory is not one to write a checkpoint into.
    #[error("{} {why}", .dir.display())]
    UnsafeDir {
        /// The directory.
        dir: PathBuf,
        /// Why it is refused.
        why: String,
    },
    /// `cp -a` failed.
    #[error("cannot copy {} to {}: {why}", .from.display(), .to.display())]
    Copy {
        /// From.
        from: PathBuf,
        /// To.
        to: PathBuf,
        /// What cp said.
        why: String,
    },
    /// The VMM refused or failed the snapshot.
    #[error("cannot checkpoint container {id:?}: {why}")]
    Snapshot {
        /// Container ID.
        id: String,
        /// What the VMM said.
        why: SandboxError,
    },
    /// The VMM could not be resumed or stopped.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// Saved, but the container could not be stopped.
    #[error("container {id:?} was checkpointed but {why}")]
    NotStopped {
        /// Container ID.
        id: String,
        /// What happened.
        why: String,
    },
    /// The directory holds no checkpoint of this husk's for this container.
    #[error("{}", .0)]
    Refused(String),
    /// `checkpoint.json` is not JSON of the manifest's form.
    #[error("{} is corrupt", .path.display())]
    Corrupt {
        /// checkpoint.json.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// What `checkpoint.json` says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Always "husk-checkpoint".
    pub format: String,
    /// The husk version that made it: only the same version restores it.
    pub husk_version: String,
    /// The container's ID (the agent in the guest knows it by this name).
    pub id: String,
    /// When it was made (RFC 3339).
    pub created: String,
    /// The VM's shape.
    pub shape: Shape,
    /// `upper/` holds the container's writable layer.
    pub upper: bool,
}

/// Makes `dir` ready for a checkpoint: made if missing (0700), emptied if
/// it holds an earlier checkpoint, refused if it holds anything else, is
/// a symlink, belongs to another user or is open to others' writes (a
/// checkpoint holds the container's memory and files; docs/security.md).
fn prepare(dir: &Path) -> Result<PathBuf, CheckpointError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(PathError::at("create", dir))?;
    let meta = std::fs::symlink_metadata(dir).map_err(PathError::at("read", dir))?;
    let me = rustix::process::geteuid().as_raw();
    let refuse = |why: String| CheckpointError::UnsafeDir {
        dir: dir.to_owned(),
        why,
    };
    if meta.file_type().is_symlink() {
        return Err(refuse("is a symlink: give the directory itself".into()));
    }
    if meta.uid() != me {
        return Err(refuse(format!(
            "belongs to uid {}, not {me}: a checkpoint goes into a directory of husk's user",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "is open to others' writes (mode {:o}): a checkpoint goes into a directory only its owner writes",
            meta.mode() & 0o7777
        )));
    }
    let dir = dir.canonicalize().map_err(PathError::at("find", dir))?;
    let mut entries = std::fs::read_dir(&dir)
        .map_err(PathError::at("read", &dir))?
        .flatten()
        .map(|e| e.file_name())
        .peekable();
    if entries.peek().is_some() {
        if !dir.join(MANIFEST).exists() {
            return Err(CheckpointError::UnsafeDir {
                dir,
                why: "is not empty and holds no checkpoint: give an empty or new directory".into(),
            });
        }
        clear(&dir);
    }
    Ok(dir)
}

/// Removes what a checkpoint wrote in `dir`.
fn clear(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(MANIFEST));
    let _ = std::fs::remove_dir_all(dir.join(VM_DIR));
    let _ = std::fs::remove_dir_all(dir.join(UPPER_DIR));
}

/// Copies the directory tree `from` to `to` as it is: owners, modes,
/// times, extended attributes (overlayfs's among them), device nodes
/// (its whiteouts), hard links and holes. coreutils' `cp -a` does all of
/// that; no crate does (docs/checkpoint.md).
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg("--sparse=always")
        .arg("--no-target-directory")
        .arg(from)
        .arg(to)
        .output()
        .map_err(PathError::at("run", Path::new("cp")))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(to);
        return Err(CheckpointError::Copy {
            from: from.to_owned(),
            to: to.to_owned(),
            why: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// `husk checkpoint`: saves running (or paused) container `id` to
/// `image_path`; the container goes on running with `leave_running`, else
/// it is stopped. `upper`: the container's writable layer, for one made
/// from an image.
pub fn checkpoint(
    root: &Path,
    id: &str,
    image_path: &Path,
    leave_running: bool,
    upper: Option<&Path>,
) -> Result<(), CheckpointError> {
    let state = ContainerState::load(root, id)?;
    let status = state.status();
    if !matches!(status, Status::Running | Status::Paused) {
        return Err(CheckpointError::NotRunning {
            id: id.into(),
            status,
        });
    }
    if state.pod.is_some() {
        return Err(CheckpointError::Pod(id.into()));
    }
    let shape = state
        .shape
        .ok_or_else(|| CheckpointError::NoShape(id.into()))?;
    let dir = prepare(image_path)?;
    let state_dir = state::dir(root, id);
    // The VMM resumes a VM whose snapshot failed; a later failure resumes
    // it here. Either way nothing half-written stays.
    let undo = |e: CheckpointError| {
        clear(&dir);
        if status == Status::Running {
            let _ = vmm_api(&state_dir, &ApiRequest::Resume);
        }
        e
    };
    // The VMM sees no directory of ours from its jail: the snapshot's two
    // files are made here, private, and handed over with the request.
    let vm_dir = dir.join(VM_DIR);
    let files = husk_sys::private::create_files(
        &vm_dir,
        &[
            husk_protocol::snapshot::STATE_FILE,
            husk_protocol::snapshot::MEMORY_FILE,
        ],
    )
    .map_err(|e| {
        clear(&dir);
        CheckpointError::Snapshot {
            id: id.into(),
            why: crate::sandbox::SandboxError::Refused(e.to_string()),
        }
    })?;
    let fds: Vec<_> = files.iter().map(std::os::fd::AsFd::as_fd).collect();
    crate::sandbox::vmm_api_with_fds(
        &state_dir,
        &ApiRequest::Snapshot {
            dir: vm_dir.clone(),
        },
        &fds,
    )
    .map_err(|why| {
        clear(&dir);
        CheckpointError::Snapshot { id: id.into(), why }
    })?;
    drop(files);
    if let Some(upper) = upper {
        copy_tree(upper, &dir.join(UPPER_DIR)).map_err(undo)?;
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        husk_version: env!("CARGO_PKG_VERSION").into(),
        id: id.into(),
        created: state::now_rfc3339(),
        shape,
        upper: upper.is_some(),
    };
    std::fs::write(
        dir.join(MANIFEST),
        serde_json::to_vec_pretty(&manifest).expect("plain data serializes"),
    )
    .map_err(|e| undo(PathError::at("write", &dir.join(MANIFEST))(e).into()))?;
    if leave_running {
        if status == Status::Running {
            vmm_api(&state_dir, &ApiRequest::Resume)?;
        }
        return Ok(());
    }
    // The container ends here, as runc's does after a checkpoint.
    let marker = state_dir.join(CHECKPOINTED);
    std::fs::write(&marker, dir.as_os_str().as_encoded_bytes())
        .map_err(PathError::at("write", &marker))?;
    let not_stopped = |why: String| CheckpointError::NotStopped { id: id.into(), why };
    if let Err(e) = vmm_api(&state_dir, &ApiRequest::Stop) {
        let _ = std::fs::remove_file(&marker);
        return Err(not_stopped(format!("could not be stopped: {e}")));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while ContainerState::load(root, id).is_ok_and(|s| s.status() != Status::Stopped) {
        if Instant::now() > deadline {
            return Err(not_stopped("did not stop within 10 s".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Reads and checks the checkpoint in `dir` for restoring container `id`:
/// returns its directory (absolute) and description.
pub fn open(dir: &Path, id: &str) -> Result<(PathBuf, Manifest), CheckpointError> {
    let path = dir.join(MANIFEST);
    let refuse = |why: String| Err(CheckpointError::Refused(why));
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return refuse(format!(
                "{} is not a husk checkpoint: it has no {MANIFEST}",
                dir.display()
            ));
        }
        Err(e) => return Err(PathError::at("read", &path)(e).into()),
    };
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|source| CheckpointError::Corrupt {
            path: path.clone(),
            source,
        })?;
    if manifest.format != FORMAT {
        return refuse(format!("{} is not a husk checkpoint", path.display()));
    }
    let ours = env!("CARGO_PKG_VERSION");
    if manifest.husk_version != ours {
        return refuse(format!(
            "checkpoint {} was made by husk {}; this is husk {ours}, which cannot restore it",
            dir.display(),
            manifest.husk_version
        ));
    }
    if manifest.id != id {
        return refuse(format!(
            "checkpoint {} is of container {:?}: restore it as {:?} (the guest knows it by that name)",
            dir.display(),
            manifest.id,
            manifest.id
        ));
    }
    if manifest.upper && !dir.join(UPPER_DIR).is_dir() {
        return refuse(format!(
            "checkpoint {} has lost its {UPPER_DIR}/",
            dir.display()
        ));
    }
    let dir = dir.canonicalize().map_err(PathError::at("find", dir))?;
    Ok((dir, manifest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn manifest(id: &str) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            husk_version: env!("CARGO_PKG_VERSION").into(),
            id: id.into(),
            created: state::now_rfc3339(),
            shape: Shape {
                vcpus: 1,
                memory_mib: 256,
            },
            upper: false,
        }
    }

    #[test]
    fn a_directory_with_other_files_is_not_written_into() {
        let dir = temp("prepare");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("precious"), b"x").unwrap();
        let err = prepare(&dir).unwrap_err().to_string();
        assert!(
            err.contains("is not empty and holds no checkpoint"),
            "{err}"
        );
        assert_eq!(std::fs::read(dir.join("precious")).unwrap(), b"x");
        // An earlier checkpoint is replaced.
        std::fs::remove_file(dir.join("precious")).unwrap();
        std::fs::write(dir.join(MANIFEST), b"{}").unwrap();
        std::fs::create_dir_all(dir.join(VM_DIR)).unwrap();
        prepare(&dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 14: a checkpoint is not written through a planted symlink,
    /// nor into another user's directory or one others may write to.
    #[test]
    fn a_checkpoint_is_not_written_through_links_or_into_open_directories() {
        use std::os::unix::fs::PermissionsExt;
        let base = temp("ckpt-links");
        std::fs::create_dir_all(&base).unwrap();
        let target = base.join("target");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, base.join("link")).unwrap();
        let e = prepare(&base.join("link")).unwrap_err().to_string();
        assert!(e.contains("is a symlink"), "{e}");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare(&target).unwrap_err().to_string();
        assert!(e.contains("is open to others' writes (mode 777)"), "{e}");
        if rustix::process::geteuid().is_root() {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(&target, Some(65534), Some(65534)).unwrap();
            let e = prepare(&target).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 65534"), "{e}");
        }
        let fresh = base.join("fresh");
        prepare(&fresh).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn foreign_missing_and_mismatched_checkpoints_are_refused_by_name() {
        let dir = temp("open");
        std::fs::create_dir_all(&dir).unwrap();
        let err = open(&dir, "c").unwrap_err().to_string();
        assert!(
            err.contains("is not a husk checkpoint: it has no checkpoint.json"),
            "{err}"
        );
        std::fs::write(dir.join(MANIFEST), b"{not json").unwrap();
        let err = format!("{:#}", open(&dir, "c").unwrap_err());
        assert!(err.contains("is corrupt"), "{err}");
        let mut m = manifest("c");
        m.husk_version = "0.0.1-other".into();
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        let err = open(&dir, "c").unwrap_err().to_string();
        assert!(err.contains("was made by husk 0.0.1-other"), "{err}");
        std::fs::write(
            dir.join(MANIFEST),
            serde_json::to_vec(&manifest("c")).unwrap(),
        )
        .unwrap();
        let err = open(&dir, "d").unwrap_err().to_string();
        assert!(err.contains("is of container \"c\""), "{err}");
        let mut m = manifest("c");
        m.upper = true;
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        let err = open(&dir, "c").unwrap_err().to_string();
        assert!(err.contains("has lost its upper/"), "{err}");
        std::fs::write(
            dir.join(MANIFEST),
            serde_json::to_vec(&manifest("c")).unwrap(),
        )
        .unwrap();
        let (at, m) = open(&dir, "c").unwrap();
        assert!(at.is_absolute());
        assert_eq!(m.id, "c");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_tree_is_copied_with_its_whiteouts_and_links() {
        let dir = temp("copy");
        let from = dir.join("from");
        std::fs::create_dir_all(from.join("d")).unwrap();
        std::fs::write(from.join("d/f"), b"data").unwrap();
        std::fs::hard_link(from.join("d/f"), from.join("link")).unwrap();
        std::os::unix::fs::symlink("d/f", from.join("sym")).unwrap();
        // An overlayfs whiteout: a 0/0 character device.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            from.join("gone"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            0,
        )
        .unwrap();
        let to = dir.join("to");
        copy_tree(&from, &to).unwrap();
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        assert_eq!(std::fs::read(to.join("d/f")).unwrap(), b"data");
        assert_eq!(
            std::fs::metadata(to.join("d/f")).unwrap().ino(),
            std::fs::metadata(to.join("link")).unwrap().ino()
        );
        assert_eq!(
            std::fs::read_link(to.join("sym")).unwrap(),
            Path::new("d/f")
        );
        let gone = std::fs::symlink_metadata(to.join("gone")).unwrap();
        assert!(gone.file_type().is_char_device());
        assert_eq!(gone.rdev(), 0);
        let err = copy_tree(&dir.join("missing"), &dir.join("t2")).unwrap_err();
        assert!(err.to_string().contains("cannot copy"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
