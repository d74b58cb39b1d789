//! Checkpoints: runc's `checkpoint` and `restore`, and docker's
//! `checkpoint create|ls|rm` (docs/snapshots.md).

use std::path::Path;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use husk_runtime::container::CreateOptions;

use crate::status_code;

// The arguments of `checkpoint`.
#[derive(clap::Args)]
pub struct CheckpointArgs {
    /// Where the checkpoint goes (made if missing; an earlier
    /// checkpoint there is replaced).
    #[arg(long, default_value = "checkpoint")]
    pub image_path: PathBuf,
    /// The container goes on running.
    #[arg(long)]
    pub leave_running: bool,
    #[command(flatten)]
    pub criu: CriuOptions,
    /// Container ID.
    pub id: String,
}

/// Runs `husk checkpoint`.
pub fn checkpoint(root: &Path, args: CheckpointArgs) -> anyhow::Result<u8> {
    let CheckpointArgs {
        image_path,
        leave_running,
        id,
        ..
    } = args;
    let upper = husk_docker::upper_dir(root, &id);
    husk_runtime::checkpoint::checkpoint(root, &id, &image_path, leave_running, upper.as_deref())?;
    Ok(0)
}

// The arguments of `restore`.
#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The checkpoint.
    #[arg(long, default_value = "checkpoint")]
    pub image_path: PathBuf,
    /// The OCI bundle (default: the current directory; for a container
    /// made from an image, its own).
    #[arg(long, short)]
    pub bundle: Option<PathBuf>,
    /// Return once it runs.
    #[arg(long, short)]
    pub detach: bool,
    /// Write the PID of the process that stands for the container's.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Send the terminal's master here (SCM_RIGHTS).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_subreaper: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_pivot: bool,
    #[command(flatten)]
    pub criu: CriuOptions,
    /// Container ID (the checkpointed container's).
    pub id: String,
}

/// Runs `husk restore`.
pub fn restore(root: &Path, args: RestoreArgs) -> anyhow::Result<u8> {
    let RestoreArgs {
        image_path,
        bundle,
        detach,
        pid_file,
        console_socket,
        id,
        ..
    } = args;
    let options = CreateOptions {
        root,
        id: &id,
        bundle: bundle.as_deref().unwrap_or(Path::new(".")),
        pid_file: pid_file.as_deref(),
        console_socket: console_socket.as_deref(),
        detach,
        restore: Some(&image_path),
        stdio: None,
        pod: None,
    };
    let status = match (&bundle, husk_docker::upper_dir(root, &id)) {
        (None, Some(_)) => husk_docker::restore(root, &id, &image_path, &options)?,
        _ => husk_runtime::run::run(&options)?,
    };
    Ok(status_code(status))
}

// The arguments of `docker-checkpoint`.
#[derive(clap::Args)]
pub struct DockerCheckpointArgs {
    #[command(subcommand)]
    pub action: DockerCheckpoint,
}

/// Runs `husk checkpoint create|ls|rm`.
pub fn docker_checkpoint(root: &Path, args: DockerCheckpointArgs) -> anyhow::Result<u8> {
    let DockerCheckpointArgs { action } = args;
    use husk_docker as docker;
    match action {
        DockerCheckpoint::Create {
            leave_running,
            checkpoint_dir,
            container,
            checkpoint,
        } => {
            let at =
                docker::checkpoint_path(root, &container, &checkpoint, checkpoint_dir.as_deref())?;
            if at.join(husk_runtime::checkpoint::MANIFEST).exists() {
                anyhow::bail!("container {container} already has a checkpoint named {checkpoint}");
            }
            let upper = docker::upper_dir(root, &container);
            husk_runtime::checkpoint::checkpoint(
                root,
                &container,
                &at,
                leave_running,
                upper.as_deref(),
            )?;
            println!("{checkpoint}");
        }
        DockerCheckpoint::Ls {
            checkpoint_dir,
            container,
        } => {
            println!("CHECKPOINT NAME");
            for name in docker::checkpoints(root, &container, checkpoint_dir.as_deref())? {
                println!("{name}");
            }
        }
        DockerCheckpoint::Rm {
            checkpoint_dir,
            container,
            checkpoint,
        } => {
            let at =
                docker::checkpoint_path(root, &container, &checkpoint, checkpoint_dir.as_deref())?;
            if !at.join(husk_runtime::checkpoint::MANIFEST).exists() {
                anyhow::bail!("container {container} has no checkpoint named {checkpoint}");
            }
            std::fs::remove_dir_all(&at)
                .with_context(|| format!("cannot remove {}", at.display()))?;
        }
    }
    Ok(0)
}

// docker's checkpoint commands, for containers made from images.
#[derive(Subcommand)]
pub enum DockerCheckpoint {
    /// Checkpoint a running container; it stops unless `--leave-running`.
    Create {
        /// The container goes on running.
        #[arg(long)]
        leave_running: bool,
        /// Where its checkpoints are (default: the container's own).
        #[arg(long)]
        checkpoint_dir: Option<PathBuf>,
        /// The container.
        container: String,
        /// The checkpoint's name.
        checkpoint: String,
    },
    /// List a container's checkpoints.
    Ls {
        /// Where its checkpoints are (default: the container's own).
        #[arg(long)]
        checkpoint_dir: Option<PathBuf>,
        /// The container.
        container: String,
    },
    /// Remove a checkpoint.
    Rm {
        /// Where its checkpoints are (default: the container's own).
        #[arg(long)]
        checkpoint_dir: Option<PathBuf>,
        /// The container.
        container: String,
        /// The checkpoint's name.
        checkpoint: String,
    },
}

// runc's CRIU options of `checkpoint` and `restore`: accepted, and
// nothing to do here, since a checkpoint keeps the whole VM (its
// connections, locks and terminals included).
#[derive(clap::Args)]
pub struct CriuOptions {
    /// Accepted for runc compatibility (CRIU's working directory).
    #[arg(long)]
    pub work_path: Option<PathBuf>,
    /// Accepted for runc compatibility (the VM keeps its connections).
    #[arg(long)]
    pub tcp_established: bool,
    /// Accepted for runc compatibility (CRIU's external Unix sockets).
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Accepted for runc compatibility (CRIU's shell job).
    #[arg(long)]
    pub shell_job: bool,
    /// Accepted for runc compatibility (locks are guest memory).
    #[arg(long)]
    pub file_locks: bool,
    /// Accepted for runc compatibility (CRIU's cgroup mode).
    #[arg(long)]
    pub manage_cgroups_mode: Option<String>,
}
