//! husk's command line as clap parses it: the global flags and every
//! command, runc's and docker's; each command's arguments are defined
//! beside the code that runs it.

use std::path::PathBuf;

use clap::FromArgMatches;
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

/// Global flags that take a value, for finding the command's name.
const GLOBAL_VALUED: &[&str] = &[
    "--root",
    "--log",
    "--log-format",
    "--max-layer-size",
    "--max-layer-entries",
    "--max-header-size",
    "--rootless",
    "--criu",
];

impl Cli {
    /// Parses `args` as [`Parser::parse_from`] does. The parser is first
    /// built for the one command the arguments name: clap copies every
    /// global flag into every command it builds (ten flags into forty
    /// commands, a third of a short command's CPU time). Whatever that
    /// parser does not take (a mistake, `--help`, `--version`, `help`)
    /// goes through the whole parser, which says what it says today.
    pub fn parse_args(args: Vec<std::ffi::OsString>) -> Self {
        match one_command(&args).and_then(|m| Self::from_arg_matches(&m).ok()) {
            Some(cli) => cli,
            None => Self::parse_from(args),
        }
    }
}

/// `args` parsed by a parser that holds only the command they name.
fn one_command(args: &[std::ffi::OsString]) -> Option<clap::ArgMatches> {
    let mut i = 1;
    let name = loop {
        let a = args.get(i)?.to_str()?;
        if !a.starts_with('-') {
            break a;
        }
        if a == "--" {
            return None;
        }
        i += if GLOBAL_VALUED.contains(&a) { 2 } else { 1 };
    };
    let whole = <Cli as clap::CommandFactory>::command();
    let command = whole.find_subcommand(name)?.clone();
    let one = whole
        .get_arguments()
        .cloned()
        .fold(clap::Command::new("husk"), clap::Command::arg)
        .subcommand_required(true)
        .subcommand(command);
    one.try_get_matches_from(args).ok()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
        args.iter().map(Into::into).collect()
    }

    /// A flag's values and where they came from, as parsed.
    fn raw(m: &clap::ArgMatches, id: &str) -> String {
        let values = m
            .get_raw(id)
            .map(|v| v.map(|x| x.to_owned()).collect::<Vec<_>>());
        format!("{values:?} {:?}", m.value_source(id))
    }

    /// The parser of the one command named takes what the whole parser
    /// takes, to the same values; what it does not take (mistakes, help,
    /// the version) is left to the whole parser.
    #[test]
    fn the_one_command_parser_agrees_with_the_whole_one() {
        let taken: &[&[&str]] = &[
            &[
                "husk",
                "--root",
                "/r",
                "--log",
                "/l.json",
                "--log-format",
                "json",
                "create",
                "--bundle",
                "/b",
                "--pid-file",
                "/p",
                "c1",
            ],
            &["husk", "exec", "--root", "/r", "c1", "sh", "-c", "--root x"],
            &["husk", "--root=/r", "run", "--bundle", "/b", "-d", "c2"],
            &["husk", "--debug", "--systemd-cgroup", "kill", "c1", "KILL"],
            &["husk", "delete", "--force", "c1"],
            &["husk", "state", "c1"],
            &[
                "husk",
                "--root",
                "/r",
                "_monitor",
                "c1",
                "--console-socket",
                "/s",
            ],
            &[
                "husk",
                "_docker-run",
                "--rm",
                "-e",
                "A=1",
                "husk/busybox",
                "true",
            ],
            &["husk", "--max-layer-size", "1g", "pull", "localhost:5000/x"],
            &["husk", "list", "-q"],
            &["husk", "features"],
            &["husk", "--rootless", "false", "--criu", "/c", "ps", "c1"],
            &["husk", "start", "--max-layer-entries", "7", "c1"],
        ];
        let globals: Vec<String> = Cli::command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(globals.len() >= 10, "{globals:?}");
        for args in taken {
            let whole = Cli::command().try_get_matches_from(*args).unwrap();
            let one = one_command(&os(args)).unwrap_or_else(|| panic!("{args:?} not taken"));
            let (name, one_sub) = one.subcommand().unwrap();
            let (whole_name, whole_sub) = whole.subcommand().unwrap();
            assert_eq!(name, whole_name);
            assert_eq!(format!("{one_sub:?}"), format!("{whole_sub:?}"), "{args:?}");
            for id in &globals {
                assert_eq!(raw(&one, id), raw(&whole, id), "{id} in {args:?}");
            }
        }
        let left: &[&[&str]] = &[
            &["husk"],
            &["husk", "--help"],
            &["husk", "--version"],
            &["husk", "help", "run"],
            &["husk", "run", "--help"],
            &["husk", "nosuch"],
            &["husk", "state"],
            &["husk", "--root", "/r", "--", "state", "c1"],
        ];
        for args in left {
            assert!(one_command(&os(args)).is_none(), "{args:?} taken");
        }
    }

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
