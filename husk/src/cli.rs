//! husk's command line as clap parses it: the global flags and every
//! command, runc's and docker's; each command's arguments are defined
//! beside the code that runs it.

use std::path::PathBuf;

use clap::Parser;
use clap::Subcommand;
use clap::ValueEnum;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Parser)]
#[command(
    name = "husk",
    // As runc's: the runtime-spec version too (docs/runtime.md).
    version = concat!(env!("CARGO_PKG_VERSION"), "\nspec: ", husk_runtime::oci_version!()),
    about = "Husk: OCI containers, each in its own KVM microVM (runc's command line)"
)]
pub struct Cli {
    /// Where husk keeps its state: containers, warm-start snapshots, the
    /// guest's initramfs.
    #[arg(long, global = true, default_value = "/var/lib/husk")]
    pub root: PathBuf,
    /// Also write errors to this file.
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Format of --log.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// The most one image layer may unpack to (bytes, or with k/m/g);
    /// a layer beyond it is refused (docs/security.md).
    #[arg(long, global = true, value_name = "SIZE", default_value = "8g")]
    pub max_layer_size: String,
    /// The most entries one image layer may have.
    #[arg(long, global = true, value_name = "N", default_value_t = husk_image::unpack::Limits::DEFAULT.max_entries)]
    pub max_layer_entries: u64,
    /// The most bytes of extended headers (PAX records, long names) one
    /// layer entry may have.
    #[arg(long, global = true, value_name = "SIZE", default_value = "1m")]
    pub max_header_size: String,
    /// Accepted for runc compatibility (husk logs errors only).
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for runc compatibility: the VMM sits in the cgroup it is
    /// started in.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility.
    #[arg(long, global = true)]
    pub rootless: Option<String>,
    /// Accepted for runc compatibility (checkpoints are husk's own).
    #[arg(long, global = true)]
    pub criu: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
#[command(defer = true)]
pub enum Command {
    /// Create a container: its VM restored, its process made, not started.
    Create(crate::oci::CreateArgs),
    /// Start a created container's process.
    Start(crate::oci::StartArgs),
    /// Print a container's state (the OCI runtime spec's JSON).
    State(crate::oci::StateArgs),
    /// Send a signal to a container's process (default SIGTERM).
    Kill(crate::oci::KillArgs),
    /// Delete a container's state (a running one only with --force).
    Delete(crate::oci::DeleteArgs),
    /// Create and start a container; in the foreground, wait for it and
    /// exit with its status. `husk run --bundle DIR ID` is runc's form;
    /// without --bundle, `husk run [OPTIONS] IMAGE [CMD]...` is docker's
    /// (see `husk _docker-run --help`).
    Run(crate::oci::RunArgs),
    /// Run another process in a running container.
    Exec(crate::oci::ExecArgs),
    /// List a container's processes (their PIDs in its guest).
    Ps(crate::oci::PsArgs),
    /// List containers.
    List(crate::oci::ListArgs),
    /// Pause a running container's VM.
    Pause(crate::oci::PauseArgs),
    /// Resume a paused container's VM.
    Resume(crate::oci::ResumeArgs),
    /// Print a container's events: with --stats, its resource usage at
    /// every interval; else its exit (and OOM events) until it stops.
    Events(crate::oci::EventsArgs),
    /// Save a running container to a directory (its whole VM and, for one
    /// made from an image, its writable layer); it stops unless
    /// `--leave-running` (runc's checkpoint).
    Checkpoint(crate::checkpoints::CheckpointArgs),
    /// Make and run a container from a checkpoint (runc's restore); it
    /// goes on where the checkpointed one was.
    Restore(crate::checkpoints::RestoreArgs),
    /// Print what this runtime supports (JSON, as `runc features`).
    Features,
    /// Check this host for what husk needs (KVM, seccomp, husk's builds,
    /// cgroups, overlayfs, tun, CNI, iptables, containerd) and name each
    /// lack with its fix; exit status 1 when husk cannot run here.
    Doctor,
    /// Change a running container's resources (applied in its guest; its
    /// VM keeps its size).
    Update(crate::oci::UpdateArgs),
    /// Write a default config.json (as `runc spec` does) into the bundle.
    Spec(crate::oci::SpecArgs),
    /// Make the built-in busybox bundle (from Debian's busybox-static) in
    /// a new directory, running CMD (default: sh).
    BusyboxBundle(crate::tools::BusyboxBundleArgs),
    /// Write the built-in busybox image as an OCI image archive (for
    /// `ctr images import` and other OCI tools); prints its digest.
    BusyboxImage(crate::tools::BusyboxImageArgs),
    /// Write a guest initramfs whose /init is the given static binary.
    Mkinitramfs(crate::tools::MkinitramfsArgs),
    /// Docker's `run`: a container from an image (what `husk run` without
    /// --bundle is).
    #[command(name = "_docker-run", hide = true)]
    DockerRun(crate::docker::DockerRunArgs),
    /// Docker's `checkpoint create|ls|rm` (what `husk checkpoint` followed
    /// by one of those is).
    #[command(name = "_docker-checkpoint", hide = true)]
    DockerCheckpoint(crate::checkpoints::DockerCheckpointArgs),
    /// Docker's `ps`: containers made from images (what `husk ps` without
    /// a container ID is).
    #[command(name = "_docker-ps", hide = true)]
    DockerPs(crate::docker::DockerPsArgs),
    /// Build an image from a Dockerfile, every RUN step in a microVM.
    Build(crate::images::BuildArgs),
    /// Pull an image from a registry.
    Pull(crate::images::PullArgs),
    /// Push an image to its registry.
    Push(crate::images::PushArgs),
    /// Give an image another name.
    Tag(crate::images::TagArgs),
    /// List images.
    Images(crate::images::ImagesArgs),
    /// Remove images (then what nothing uses).
    Rmi(crate::images::RmiArgs),
    /// Load images from a docker save archive or an OCI image layout.
    Load(crate::images::LoadArgs),
    /// Save images to an archive (OCI image layout with docker's
    /// manifest.json).
    Save(crate::images::SaveArgs),
    /// Make an image from a root filesystem tarball.
    Import(crate::images::ImportArgs),
    /// Stop containers: SIGTERM, then SIGKILL.
    Stop(crate::docker::StopArgs),
    /// Remove containers made from images.
    Rm(crate::docker::RmArgs),
    /// Print a detached container's output.
    Logs(crate::docker::LogsArgs),
    /// Print a container's or an image's details (JSON).
    Inspect(crate::docker::InspectArgs),
    /// Make, list, inspect and remove networks (bridges the CNI plugins
    /// make) that `husk run --network` joins.
    Network(crate::networks::NetworkArgs),
    /// (internal) Removes a `run -d --rm` container when it stops.
    #[command(name = "_autoremove", hide = true)]
    Autoremove(crate::docker::AutoremoveArgs),
    /// (internal) The process that stands for a container's process.
    #[command(name = "_monitor", hide = true)]
    Monitor(crate::tools::MonitorArgs),
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Subcommands are built only when used (`defer`, a third of `husk
    /// exec`'s start-up): each one's help still opens with the line the
    /// command list gives it, and global flags still follow it.
    #[test]
    fn every_deferred_command_keeps_its_description_and_the_global_flags() {
        let cli = Cli::command();
        let mut checked = 0;
        for sub in cli.get_subcommands() {
            let name = sub.get_name();
            let about = sub.get_about().map(ToString::to_string);
            let Some(about) = about else {
                assert!(sub.is_hide_set(), "{name} has no description");
                continue;
            };
            let err = match Cli::try_parse_from(["husk", name, "--help"]) {
                Err(e) => e,
                Ok(_) => panic!("{name} --help parsed as a command"),
            };
            assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp, "{name}");
            let help = err.render().to_string();
            assert_eq!(help.lines().next(), Some(about.as_str()), "{name}");
            checked += 1;
        }
        assert!(checked > 30, "only {checked} commands");
        let cli = Cli::try_parse_from(["husk", "exec", "--root", "/r", "c1", "true"]).unwrap();
        assert_eq!(cli.root, PathBuf::from("/r"));
        let Command::Exec(args) = cli.command else {
            panic!("not exec");
        };
        assert_eq!(
            (args.id.as_str(), args.command.as_slice()),
            ("c1", &["true".to_owned()][..])
        );
    }
}
