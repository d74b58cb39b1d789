//! The errors of the docker layer (issue 15: typed at each library
//! boundary). [`DockerError`] wraps the typed errors of the crates below
//! (runtime, image store, [`husk_sys::PathError`]) and names its own
//! failures: a container that is not there, a name in use, a flag that is
//! not a valid value. The `husk` binary prints an error with its sources
//! (`outer: inner`), so a variant that adds what was being done keeps the
//! reason as its source rather than in its message.

use std::path::PathBuf;

use husk_runtime::state::Status;

/// What can go wrong in the docker layer.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// A lifecycle command of the runtime failed.
    #[error(transparent)]
    Lifecycle(#[from] husk_runtime::container::LifecycleError),
    /// A checkpoint cannot be read or copied.
    #[error(transparent)]
    Checkpoint(#[from] husk_runtime::checkpoint::CheckpointError),
    /// The image store failed.
    #[error(transparent)]
    Store(#[from] husk_image::store::StoreError),
    /// An image cannot be read, loaded or pulled.
    #[error(transparent)]
    Image(#[from] husk_image::ImageError),
    /// An image reference does not parse.
    #[error(transparent)]
    Reference(#[from] husk_image::reference::ReferenceError),
    /// A network operation failed (`--network`, `-p`, `husk network`).
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    /// The built-in busybox image cannot be made.
    #[error(transparent)]
    Busybox(#[from] BusyboxError),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] husk_sys::PathError),
    /// JSON (a spec, a record, an image's config) cannot be read or
    /// written.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// No container of that name was made from an image.
    #[error("no such container: {0}")]
    NoSuchContainer(String),
    /// Neither a container nor an image of that name (`inspect`).
    #[error("no such container or image: {0}")]
    NoSuchContainerOrImage(String),
    /// `--name` names a container that exists.
    #[error("the container name {0:?} is already in use")]
    NameInUse(String),
    /// A container's `container.json` is not a record.
    #[error("{} is corrupt", .path.display())]
    Corrupt {
        /// container.json.
        path: PathBuf,
        /// What does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// Not a size such as `512m` or `2g`.
    #[error("{value:?} is not a size (like 512m or 2g)")]
    BadSize {
        /// As given.
        value: String,
        /// Why its digits are not a number, when that is why.
        #[source]
        source: Option<std::num::ParseIntError>,
    },
    /// A flag's value is not valid (the flag, and the reason as source).
    #[error("{flag}")]
    BadFlag {
        /// The flag, such as `--memory`.
        flag: &'static str,
        /// What is wrong with its value.
        #[source]
        source: Box<DockerError>,
    },
    /// `--hostname` that is not a host name.
    #[error("--hostname {0:?}: not a host name (letters, digits, '-', '.', at most 63)")]
    BadHostname(String),
    /// `--cpus` of 0 or less.
    #[error("--cpus {0}: must be more than 0")]
    BadCpus(f64),
    /// A `-v` that is not `HOST:CONTAINER[:ro]` of an absolute container
    /// path and a host path or volume name.
    #[error("-v {spec:?}: {why}")]
    BadVolume {
        /// The `-v` as given.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// The host directory of a `-v` cannot be made.
    #[error("-v {spec:?}")]
    VolumeHost {
        /// The `-v` as given.
        spec: String,
        /// What failed.
        #[source]
        source: husk_sys::PathError,
    },
    /// A named volume's directory cannot be made.
    #[error("cannot create volume {name}")]
    CreateVolume {
        /// The volume.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `-w` (or the image's working directory) is not absolute.
    #[error("the working directory {0:?} is not an absolute path")]
    RelativeWorkdir(String),
    /// No command given, and the image has none.
    #[error("{image}: no command given, and the image has none")]
    NoCommand {
        /// The image.
        image: String,
    },
    /// `--user` names a user not in the image's /etc/passwd.
    #[error("unable to find user {0}: no matching entries in passwd file")]
    NoSuchUser(String),
    /// `--user` names a group not in the image's /etc/group.
    #[error("unable to find group {0}: no matching entries in group file")]
    NoSuchGroup(String),
    /// The image's /etc/passwd or /etc/group has an ID that is not a
    /// number.
    #[error(transparent)]
    BadUserEntry(std::num::ParseIntError),
    /// A path handed to the kernel holds a NUL byte.
    #[error(transparent)]
    Nul(#[from] std::ffi::NulError),
    /// The overlayfs root of a container cannot be mounted.
    #[error("cannot mount the container's root (overlayfs over {layers} layers)")]
    Mount {
        /// The image's layers.
        layers: usize,
        /// What mount said.
        #[source]
        source: std::io::Error,
    },
    /// Standard input, output and error cannot be handed to the container
    /// (or taken back).
    #[error("cannot redirect standard input and output for the container")]
    Stdio(#[source] std::io::Error),
    /// `logs` cannot write what it read.
    #[error("cannot write the container's log out")]
    WriteOut(#[source] std::io::Error),
    /// `run -d --rm`'s remover cannot be started.
    #[error("cannot start husk _autoremove")]
    Autoremove(#[source] std::io::Error),
    /// A checkpoint's name is not a plain one.
    #[error("{0:?} is not a checkpoint name: use letters, digits, '-', '_' or '.' (not first)")]
    BadCheckpointName(String),
    /// A checkpoint made without the writable layer, for a container
    /// made from an image.
    #[error(
        "checkpoint {} holds no writable layer, and container {name} was made from an image",
        .checkpoint.display()
    )]
    NoWritableLayer {
        /// The checkpoint's directory.
        checkpoint: PathBuf,
        /// The container.
        name: String,
    },
    /// The container's image was removed.
    #[error("the image of container {name} is gone")]
    ImageGone {
        /// The container.
        name: String,
        /// What the store said.
        #[source]
        source: husk_image::store::StoreError,
    },
    /// The command does not apply in the container's state.
    #[error("container {name} is {status}: {why}")]
    WrongState {
        /// The container.
        name: String,
        /// Its status.
        status: Status,
        /// What to do first.
        why: &'static str,
    },
    /// `stop`: the container ran on after SIGKILL.
    #[error("container {0} did not stop after SIGKILL")]
    DidNotStop(String),
}

/// What can go wrong making the built-in busybox bundle or image. Its
/// message carries the system's reason itself (it has no source), as its
/// callers may print it alone.
#[derive(Debug, thiserror::Error)]
pub enum BusyboxError {
    /// A file operation (or running busybox) failed.
    #[error("{0}: {src}", src = .0.source)]
    Io(husk_sys::PathError),
    /// The bundle's config cannot be written as JSON.
    #[error("{0}")]
    Json(serde_json::Error),
}

impl BusyboxError {
    /// A `map_err` adapter, as [`husk_sys::PathError::at`].
    pub(crate) fn at(
        what: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let at = husk_sys::PathError::at(what, path);
        move |e| Self::Io(at(e))
    }
}
