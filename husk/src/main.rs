//! `husk`: runc's command line, each container in its own microVM.
//!
//! Exit status: a container's (or exec'd process's) own exit status for
//! a foreground `run` or `exec`; otherwise 0 on success; 125 when husk
//! itself fails for `run` (as docker does, so it cannot be mistaken for
//! the container's), 1 for every other command's failure; 2 for a usage
//! error. Errors go to stderr, and to `--log` in `--log-format` when given
//! (containerd's shim reads the JSON form).

mod arena;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use husk_guest::initramfs::Initramfs;
use husk_image::reference::Reference;
use husk_image::registry::Client;
use husk_image::store::Store;
use husk_runtime::container::{self, CreateOptions, ExecOptions};
use husk_runtime::monitor;
use husk_runtime::state::{self, ContainerState};

/// First allocations from a static arena (husk/src/arena.rs: musl's
/// allocator maps and unmaps memory around small allocations).
#[global_allocator]
static ALLOCATOR: arena::Arena = arena::Arena;

/// Exit status when husk itself fails to run a container.
const EXIT_RUN_FAILED: u8 = 125;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ListFormat {
    Table,
    Json,
}

#[derive(Parser)]
#[command(
    name = "husk",
    version,
    about = "Husk: OCI containers, each in its own KVM microVM (runc's command line)"
)]
struct Cli {
    /// Where husk keeps its state: containers, warm-start snapshots, the
    /// guest's initramfs.
    #[arg(long, global = true, default_value = "/var/lib/husk")]
    root: PathBuf,
    /// Also write errors to this file.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Format of --log.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// The most one image layer may unpack to (bytes, or with k/m/g);
    /// a layer beyond it is refused (docs/security.md).
    #[arg(long, global = true, value_name = "SIZE", default_value = "8g")]
    max_layer_size: String,
    /// The most entries one image layer may have.
    #[arg(long, global = true, value_name = "N", default_value_t = husk_image::unpack::Limits::DEFAULT.max_entries)]
    max_layer_entries: u64,
    /// The most bytes of extended headers (PAX records, long names) one
    /// layer entry may have.
    #[arg(long, global = true, value_name = "SIZE", default_value = "1m")]
    max_header_size: String,
    /// Accepted for runc compatibility (husk logs errors only).
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility: the VMM sits in the cgroup it is
    /// started in.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Accepted for runc compatibility.
    #[arg(long, global = true)]
    rootless: Option<String>,
    /// Accepted for runc compatibility (checkpoints are husk's own).
    #[arg(long, global = true)]
    criu: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// docker's checkpoint commands, for containers made from images.
#[derive(Subcommand)]
enum DockerCheckpoint {
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

/// runc's CRIU options of `checkpoint` and `restore`: accepted, and
/// nothing to do here, since a checkpoint keeps the whole VM (its
/// connections, locks and terminals included).
#[derive(clap::Args)]
struct CriuOptions {
    /// Accepted for runc compatibility (CRIU's working directory).
    #[arg(long)]
    work_path: Option<PathBuf>,
    /// Accepted for runc compatibility (the VM keeps its connections).
    #[arg(long)]
    tcp_established: bool,
    /// Accepted for runc compatibility (CRIU's external Unix sockets).
    #[arg(long)]
    ext_unix_sk: bool,
    /// Accepted for runc compatibility (CRIU's shell job).
    #[arg(long)]
    shell_job: bool,
    /// Accepted for runc compatibility (locks are guest memory).
    #[arg(long)]
    file_locks: bool,
    /// Accepted for runc compatibility (CRIU's cgroup mode).
    #[arg(long)]
    manage_cgroups_mode: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Create a container: its VM restored, its process made, not started.
    Create {
        /// The OCI bundle.
        #[arg(long, short, default_value = ".")]
        bundle: PathBuf,
        /// Write the PID of the process that stands for the container's.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Send the terminal's master here (SCM_RIGHTS).
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// Accepted for runc compatibility.
        #[arg(long)]
        no_pivot: bool,
        /// Accepted for runc compatibility.
        #[arg(long)]
        no_new_keyring: bool,
        /// Accepted for runc compatibility (no descriptors reach a guest).
        #[arg(long, default_value_t = 0)]
        preserve_fds: u32,
        /// Container ID.
        id: String,
    },
    /// Start a created container's process.
    Start {
        /// docker's `start --checkpoint`: a stopped container made from an
        /// image, restored from this checkpoint of its own.
        #[arg(long)]
        checkpoint: Option<String>,
        /// Where its checkpoints are (with `--checkpoint`).
        #[arg(long, requires = "checkpoint")]
        checkpoint_dir: Option<PathBuf>,
        /// Container ID.
        id: String,
    },
    /// Print a container's state (the OCI runtime spec's JSON).
    State {
        /// Container ID.
        id: String,
    },
    /// Send a signal to a container's process (default SIGTERM).
    Kill {
        /// To every process of the container.
        #[arg(long, short)]
        all: bool,
        /// Container ID.
        id: String,
        /// Signal name or number.
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a container's state (a running one only with --force).
    Delete {
        /// Kill a running container first.
        #[arg(long, short)]
        force: bool,
        /// Container ID.
        id: String,
    },
    /// Create and start a container; in the foreground, wait for it and
    /// exit with its status. `husk run --bundle DIR ID` is runc's form;
    /// without --bundle, `husk run [OPTIONS] IMAGE [CMD]...` is docker's
    /// (see `husk _docker-run --help`).
    Run {
        /// The OCI bundle.
        #[arg(long, short, default_value = ".")]
        bundle: PathBuf,
        /// Return once it runs.
        #[arg(long, short)]
        detach: bool,
        /// Write the PID of the process that stands for the container's.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Send the terminal's master here (SCM_RIGHTS).
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// Accepted for runc compatibility.
        #[arg(long)]
        no_pivot: bool,
        /// Accepted for runc compatibility.
        #[arg(long)]
        no_new_keyring: bool,
        /// Container ID.
        id: String,
    },
    /// Run another process in a running container.
    Exec {
        /// The process, as an OCI process JSON file.
        #[arg(long, short)]
        process: Option<PathBuf>,
        /// Return once it runs.
        #[arg(long, short)]
        detach: bool,
        /// A terminal.
        #[arg(long, short)]
        tty: bool,
        /// Accepted for docker compatibility: stdin is attached, as runc
        /// attaches it.
        #[arg(long, short)]
        interactive: bool,
        /// Send the terminal's master here (SCM_RIGHTS).
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// Write the PID of the process that stands for it.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Environment, KEY=VALUE (repeatable).
        #[arg(long, short)]
        env: Vec<String>,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
        /// UID[:GID].
        #[arg(long, short)]
        user: Option<String>,
        /// Accepted for runc compatibility.
        #[arg(long, default_value_t = 0)]
        preserve_fds: u32,
        /// Container ID.
        id: String,
        /// The command.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// List a container's processes (their PIDs in its guest).
    Ps {
        /// table or json.
        #[arg(long, short, value_enum, default_value = "table")]
        format: ListFormat,
        /// Container ID.
        id: String,
    },
    /// List containers.
    List {
        /// table or json.
        #[arg(long, short, value_enum, default_value = "table")]
        format: ListFormat,
        /// IDs only.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Pause a running container's VM.
    Pause {
        /// Container ID.
        id: String,
    },
    /// Resume a paused container's VM.
    Resume {
        /// Container ID.
        id: String,
    },
    /// Print a container's events: with --stats, its resource usage at
    /// every interval; else its exit (and OOM events) until it stops.
    Events {
        /// Resource usage.
        #[arg(long)]
        stats: bool,
        /// Seconds between stats.
        #[arg(long, default_value = "5s")]
        interval: String,
        /// Container ID.
        id: String,
    },
    /// Save a running container to a directory (its whole VM and, for one
    /// made from an image, its writable layer); it stops unless
    /// `--leave-running` (runc's checkpoint).
    Checkpoint {
        /// Where the checkpoint goes (made if missing; an earlier
        /// checkpoint there is replaced).
        #[arg(long, default_value = "checkpoint")]
        image_path: PathBuf,
        /// The container goes on running.
        #[arg(long)]
        leave_running: bool,
        #[command(flatten)]
        criu: CriuOptions,
        /// Container ID.
        id: String,
    },
    /// Make and run a container from a checkpoint (runc's restore); it
    /// goes on where the checkpointed one was.
    Restore {
        /// The checkpoint.
        #[arg(long, default_value = "checkpoint")]
        image_path: PathBuf,
        /// The OCI bundle (default: the current directory; for a container
        /// made from an image, its own).
        #[arg(long, short)]
        bundle: Option<PathBuf>,
        /// Return once it runs.
        #[arg(long, short)]
        detach: bool,
        /// Write the PID of the process that stands for the container's.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Send the terminal's master here (SCM_RIGHTS).
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// Accepted for runc compatibility.
        #[arg(long)]
        no_subreaper: bool,
        /// Accepted for runc compatibility.
        #[arg(long)]
        no_pivot: bool,
        #[command(flatten)]
        criu: CriuOptions,
        /// Container ID (the checkpointed container's).
        id: String,
    },
    /// Print what this runtime supports (JSON, as `runc features`).
    Features,
    /// Change a running container's resources (applied in its guest; its
    /// VM keeps its size).
    Update {
        /// A JSON file of linux resources (`-`: stdin), as runc takes.
        #[arg(long, short)]
        resources: Option<PathBuf>,
        /// Memory limit (bytes, or 512m, 1g).
        #[arg(long, short)]
        memory: Option<String>,
        /// Memory soft limit (bytes, or 512m, 1g).
        #[arg(long)]
        memory_reservation: Option<String>,
        /// CPU CFS quota, microseconds per period.
        #[arg(long)]
        cpu_quota: Option<i64>,
        /// CPU CFS period, microseconds.
        #[arg(long)]
        cpu_period: Option<u64>,
        /// CPU shares (relative weight).
        #[arg(long)]
        cpu_share: Option<u64>,
        /// Most processes.
        #[arg(long)]
        pids_limit: Option<i64>,
        /// Container ID.
        id: String,
    },
    /// Write a default config.json (as `runc spec` does) into the bundle.
    Spec {
        /// The bundle directory.
        #[arg(long, short, default_value = ".")]
        bundle: PathBuf,
    },
    /// Make the built-in busybox bundle (from Debian's busybox-static) in
    /// a new directory, running CMD (default: sh).
    BusyboxBundle {
        /// The bundle directory to create.
        dir: PathBuf,
        /// The command.
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Write the built-in busybox image as an OCI image archive (for
    /// `ctr images import` and other OCI tools); prints its digest.
    BusyboxImage {
        /// The archive to write.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Write a guest initramfs whose /init is the given static binary.
    Mkinitramfs {
        /// Static binary to run as the guest's PID 1.
        #[arg(long)]
        init: PathBuf,
        /// Where to write the newc cpio archive.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Docker's `run`: a container from an image (what `husk run` without
    /// --bundle is).
    #[command(name = "_docker-run", hide = true)]
    DockerRun {
        /// Return once it runs; output goes to `husk logs`.
        #[arg(long, short)]
        detach: bool,
        /// Keep stdin attached (else /dev/null).
        #[arg(long, short)]
        interactive: bool,
        /// A terminal.
        #[arg(long, short)]
        tty: bool,
        /// Remove the container when it exits.
        #[arg(long)]
        rm: bool,
        /// Its name (default: the first 12 digits of its ID).
        #[arg(long)]
        name: Option<String>,
        /// Environment, KEY=VALUE (repeatable).
        #[arg(long, short)]
        env: Vec<String>,
        /// HOST:CONTAINER[:ro] (HOST a path, or a volume name).
        #[arg(long, short)]
        volume: Vec<String>,
        /// Working directory.
        #[arg(long, short)]
        workdir: Option<String>,
        /// USER[:GROUP] (names or numbers).
        #[arg(long, short)]
        user: Option<String>,
        /// Override the image's entrypoint.
        #[arg(long)]
        entrypoint: Option<String>,
        /// Memory limit (512m, 1g).
        #[arg(long, short)]
        memory: Option<String>,
        /// CPUs (1.5).
        #[arg(long)]
        cpus: Option<f64>,
        /// The image.
        image: String,
        /// The command (default: the image's).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Docker's `checkpoint create|ls|rm` (what `husk checkpoint` followed
    /// by one of those is).
    #[command(name = "_docker-checkpoint", hide = true)]
    DockerCheckpoint {
        #[command(subcommand)]
        action: DockerCheckpoint,
    },
    /// Docker's `ps`: containers made from images (what `husk ps` without
    /// a container ID is).
    #[command(name = "_docker-ps", hide = true)]
    DockerPs {
        /// Stopped ones too.
        #[arg(long, short)]
        all: bool,
        /// IDs only.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Pull an image from a registry.
    Pull {
        /// The image (`busybox`, `127.0.0.1:5000/app:v1`).
        image: String,
    },
    /// Push an image to its registry.
    Push {
        /// The image, named for the registry (`husk tag` names it).
        image: String,
    },
    /// Give an image another name.
    Tag {
        /// The image.
        source: String,
        /// The new name.
        target: String,
    },
    /// List images.
    Images {
        /// IDs only.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Remove images (then what nothing uses).
    Rmi {
        /// Even when a container uses it.
        #[arg(long, short)]
        force: bool,
        /// Images.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Load images from a docker save archive or an OCI image layout.
    Load {
        /// The archive (tar or OCI layout directory; default stdin).
        #[arg(long, short)]
        input: Option<PathBuf>,
    },
    /// Save images to an archive (OCI image layout with docker's
    /// manifest.json).
    Save {
        /// The archive (default stdout).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Images.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Make an image from a root filesystem tarball.
    Import {
        /// The tarball (plain, gzip or zstd).
        file: PathBuf,
        /// The image's name.
        reference: String,
    },
    /// Stop containers: SIGTERM, then SIGKILL.
    Stop {
        /// Seconds before SIGKILL.
        #[arg(long, short, default_value_t = 10)]
        time: u64,
        /// Containers.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove containers made from images.
    Rm {
        /// Running ones too (killed).
        #[arg(long, short)]
        force: bool,
        /// Containers.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Print a detached container's output.
    Logs {
        /// Keep printing until it stops.
        #[arg(long, short)]
        follow: bool,
        /// The container.
        name: String,
    },
    /// Print a container's or an image's details (JSON).
    Inspect {
        /// Containers or images.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// (internal) Removes a `run -d --rm` container when it stops.
    #[command(name = "_autoremove", hide = true)]
    Autoremove { name: String },
    /// (internal) The process that stands for a container's process.
    #[command(name = "_monitor", hide = true)]
    Monitor {
        id: String,
        #[arg(long)]
        console_socket: Option<PathBuf>,
        #[arg(long, requires = "process")]
        exec: Option<String>,
        #[arg(long)]
        process: Option<PathBuf>,
        #[arg(long, conflicts_with = "exec")]
        restore: Option<PathBuf>,
    },
}

/// Flags (of runc's and docker's `run` and the global ones) that take a
/// value, for finding positional arguments.
const VALUED: &[&str] = &[
    "--root",
    "--log",
    "--log-format",
    "--rootless",
    "--criu",
    "-b",
    "--bundle",
    "--pid-file",
    "--console-socket",
    "--name",
    "-e",
    "--env",
    "-v",
    "--volume",
    "-w",
    "--workdir",
    "-u",
    "--user",
    "--entrypoint",
    "-m",
    "--memory",
    "--cpus",
    "-f",
    "--format",
    "--image-path",
    "--work-path",
    "--checkpoint",
    "--checkpoint-dir",
];

/// `husk run` and `husk ps` are runc's and docker's both: runc's `run`
/// names a bundle (`--bundle`), runc's `ps` a container. The others are
/// docker's, and go to the hidden commands that are.
fn docker_form(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut i = 1;
    let mut sub = None;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if !a.starts_with('-') {
            sub = Some(i);
            break;
        }
        i += if VALUED.contains(&a.as_ref()) { 2 } else { 1 };
    }
    let Some(sub) = sub else { return args };
    let rest: Vec<String> = args[sub + 1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut positional = None;
    let mut bundle = false;
    let mut j = 0;
    while j < rest.len() {
        let a = rest[j].as_str();
        if a == "-b" || a == "--bundle" || a.starts_with("--bundle=") {
            bundle = true;
        }
        if !a.starts_with('-') {
            positional = Some(a);
            break;
        }
        j += if VALUED.contains(&a) { 2 } else { 1 };
    }
    match (args[sub].to_str(), positional) {
        (Some("run"), _) if !bundle => args[sub] = "_docker-run".into(),
        (Some("ps"), None) => args[sub] = "_docker-ps".into(),
        // docker's `checkpoint create|ls|rm CONTAINER ...`; runc's is
        // `checkpoint ID` alone.
        (Some("checkpoint"), Some("create" | "ls" | "rm")) if rest.len() > j + 1 => {
            args[sub] = "_docker-checkpoint".into();
        }
        _ => {}
    }
    args
}

/// runc's long flags that callers pass with one dash, as Go's flag
/// parsing allows (containerd's go-runc passes `-no-subreaper` to
/// `restore`).
const ONE_DASH: &[&str] = &["-no-subreaper", "-no-pivot", "-no-new-keyring"];

/// `args` with [`ONE_DASH`] flags given their second dash.
fn go_flags(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some(flag) if ONE_DASH.contains(&flag) => format!("-{flag}").into(),
            _ => a,
        })
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(docker_form(go_flags(std::env::args_os().collect())));
    let failed = if matches!(cli.command, Command::Run { .. } | Command::DockerRun { .. }) {
        EXIT_RUN_FAILED
    } else {
        1
    };
    let (log, format) = (cli.log.clone(), cli.log_format);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let message = format!("{e:#}");
            eprintln!("husk: {message}");
            if let Some(path) = log {
                write_log(&path, format, &message);
            }
            ExitCode::from(failed)
        }
    }
}

fn write_log(path: &Path, format: LogFormat, message: &str) {
    let line = match format {
        LogFormat::Json => serde_json::json!({
            "level": "error",
            "msg": message,
            "time": state::now_rfc3339(),
        })
        .to_string(),
        LogFormat::Text => format!("{} error: {message}", state::now_rfc3339()),
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1}GB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1}MB", b as f64 / f64::from(1u32 << 20)),
        b => format!("{:.1}kB", b as f64 / 1024.0),
    }
}

/// `husk ps` (docker's): containers made from images.
fn docker_ps(root: &Path, all: bool, quiet: bool) {
    if !quiet {
        println!(
            "{:<14} {:<28} {:<24} {:<22} {:<14} NAMES",
            "CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS"
        );
    }
    for r in husk_docker::Record::all(root) {
        let (running, status) = husk_docker::status_text(root, &r);
        if !all && !running {
            continue;
        }
        if quiet {
            println!("{}", &r.id[..12]);
            continue;
        }
        let mut command = format!("\"{}\"", r.command.join(" "));
        if command.chars().count() > 22 {
            command = command.chars().take(20).collect::<String>() + "…\"";
        }
        println!(
            "{:<14} {:<28} {:<24} {:<22} {:<14} {}",
            &r.id[..12],
            r.image,
            command,
            r.created,
            status,
            r.name
        );
    }
}

fn status_code(status: i32) -> u8 {
    u8::try_from(status).unwrap_or(255)
}

/// Seconds in `5s`, `500ms`, `2`.
fn interval(s: &str) -> anyhow::Result<std::time::Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return Ok(std::time::Duration::from_millis(ms.parse()?));
    }
    let secs: f64 = s.strip_suffix('s').unwrap_or(s).parse()?;
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    let root = cli.root.as_path();
    husk_runtime::private::root(root).map_err(anyhow::Error::msg)?;
    let size = |flag: &str, value: &str| -> anyhow::Result<u64> {
        let n = husk_docker::parse_bytes(value).with_context(|| flag.to_owned())?;
        u64::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| anyhow::anyhow!("{flag} {value}: must be more than 0"))
    };
    husk_image::unpack::Limits::set(husk_image::unpack::Limits {
        max_bytes: size("--max-layer-size", &cli.max_layer_size)?,
        max_entries: cli.max_layer_entries,
        max_header_bytes: size("--max-header-size", &cli.max_header_size)?,
    });
    match cli.command {
        Command::Create {
            bundle,
            pid_file,
            console_socket,
            id,
            ..
        } => {
            container::create(&CreateOptions {
                root,
                id: &id,
                bundle: &bundle,
                pid_file: pid_file.as_deref(),
                console_socket: console_socket.as_deref(),
                detach: true,
                restore: None,
            })?;
            Ok(0)
        }
        Command::Start {
            checkpoint: Some(checkpoint),
            checkpoint_dir,
            id,
        } => {
            let at =
                husk_docker::checkpoint_path(root, &id, &checkpoint, checkpoint_dir.as_deref())?;
            let options = CreateOptions {
                root,
                id: &id,
                bundle: Path::new("."),
                pid_file: None,
                console_socket: None,
                detach: true,
                restore: Some(&at),
            };
            husk_docker::restore(root, &id, &at, &options)?;
            Ok(0)
        }
        Command::Start { id, .. } => {
            container::start(root, &id)?;
            Ok(0)
        }
        Command::DockerCheckpoint { action } => {
            use husk_docker as docker;
            match action {
                DockerCheckpoint::Create {
                    leave_running,
                    checkpoint_dir,
                    container,
                    checkpoint,
                } => {
                    let at = docker::checkpoint_path(
                        root,
                        &container,
                        &checkpoint,
                        checkpoint_dir.as_deref(),
                    )?;
                    if at.join(husk_runtime::checkpoint::MANIFEST).exists() {
                        anyhow::bail!(
                            "container {container} already has a checkpoint named {checkpoint}"
                        );
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
                    let at = docker::checkpoint_path(
                        root,
                        &container,
                        &checkpoint,
                        checkpoint_dir.as_deref(),
                    )?;
                    if !at.join(husk_runtime::checkpoint::MANIFEST).exists() {
                        anyhow::bail!("container {container} has no checkpoint named {checkpoint}");
                    }
                    std::fs::remove_dir_all(&at)
                        .with_context(|| format!("cannot remove {}", at.display()))?;
                }
            }
            Ok(0)
        }
        Command::State { id } => {
            let state = ContainerState::load(root, &id)?;
            println!("{}", serde_json::to_string_pretty(&state.oci_state())?);
            Ok(0)
        }
        Command::Kill {
            all, id, signal, ..
        } => {
            container::kill(root, &id, container::parse_signal(&signal)?, all)?;
            Ok(0)
        }
        Command::Delete { force, id } => {
            container::delete(root, &id, force)?;
            Ok(0)
        }
        Command::Run {
            bundle,
            detach,
            pid_file,
            console_socket,
            id,
            ..
        } => {
            let status = husk_runtime::run::run(&CreateOptions {
                root,
                id: &id,
                bundle: &bundle,
                pid_file: pid_file.as_deref(),
                console_socket: console_socket.as_deref(),
                detach,
                restore: None,
            })?;
            Ok(status_code(status))
        }
        Command::Exec {
            process,
            detach,
            tty,
            console_socket,
            pid_file,
            env,
            cwd,
            user,
            id,
            command,
            ..
        } => {
            let process = container::exec_process(
                process.as_deref(),
                &command,
                &env,
                cwd.as_deref(),
                user.as_deref(),
                tty,
                container::bundle_process(root, &id),
            )?;
            let status = container::exec(&ExecOptions {
                root,
                id: &id,
                process,
                detach,
                pid_file: pid_file.as_deref(),
                console_socket: console_socket.as_deref(),
            })?;
            Ok(status_code(status))
        }
        Command::Ps { format, id } => {
            let pids = container::ps(root, &id)?;
            match format {
                ListFormat::Json => println!("{}", serde_json::to_string(&pids)?),
                ListFormat::Table => {
                    println!("PID");
                    for pid in pids {
                        println!("{pid}");
                    }
                }
            }
            Ok(0)
        }
        Command::List { format, quiet } => {
            let states: Vec<serde_json::Value> = state::list(root)
                .iter()
                .filter_map(|id| ContainerState::load(root, id).ok())
                .map(|s| {
                    let mut v = s.oci_state();
                    v["owner"] = "root".into();
                    v
                })
                .collect();
            if quiet {
                for s in &states {
                    println!("{}", s["id"].as_str().unwrap_or_default());
                }
            } else if format == ListFormat::Json {
                println!("{}", serde_json::to_string(&states)?);
            } else {
                println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER");
                for s in &states {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\troot",
                        s["id"].as_str().unwrap_or_default(),
                        s["pid"],
                        s["status"].as_str().unwrap_or_default(),
                        s["bundle"].as_str().unwrap_or_default(),
                        s["created"].as_str().unwrap_or_default()
                    );
                }
            }
            Ok(0)
        }
        Command::Pause { id } => {
            container::pause(root, &id, true)?;
            Ok(0)
        }
        Command::Resume { id } => {
            container::pause(root, &id, false)?;
            Ok(0)
        }
        Command::Events {
            stats,
            interval: every,
            id,
        } => {
            let every = interval(&every).context("--interval")?;
            let mut ooms = None;
            loop {
                let state = ContainerState::load(root, &id)?;
                if state.status() == state::Status::Stopped {
                    if !stats && state.oom_kills.unwrap_or(0) > ooms.unwrap_or(0) {
                        println!("{}", serde_json::json!({"type": "oom", "id": id}));
                    }
                    if !stats {
                        println!(
                            "{}",
                            serde_json::json!({"type": "exit", "id": id, "data": {"status": state.exit_status}})
                        );
                    }
                    return Ok(0);
                }
                // Stats as runc prints them; an OOM kill in the container's
                // cgroup (in its guest) as runc's "oom" event.
                if let Ok(s) = container::stats(root, &id) {
                    if stats {
                        println!(
                            "{}",
                            serde_json::json!({"type": "stats", "id": id, "data": {
                                "cpu": {"usage": {"total": s.cpu_ns}},
                                "memory": {"usage": {"usage": s.memory_bytes, "limit": s.memory_limit}},
                                "pids": {"current": s.pids},
                            }})
                        );
                    } else if ooms.is_some_and(|seen| s.oom_kills > seen)
                        || (ooms.is_none() && s.oom_kills > 0)
                    {
                        println!("{}", serde_json::json!({"type": "oom", "id": id}));
                    }
                    ooms = Some(s.oom_kills);
                }
                std::io::stdout().flush()?;
                std::thread::sleep(every);
            }
        }
        Command::Checkpoint {
            image_path,
            leave_running,
            id,
            ..
        } => {
            let upper = husk_docker::upper_dir(root, &id);
            husk_runtime::checkpoint::checkpoint(
                root,
                &id,
                &image_path,
                leave_running,
                upper.as_deref(),
            )?;
            Ok(0)
        }
        Command::Restore {
            image_path,
            bundle,
            detach,
            pid_file,
            console_socket,
            id,
            ..
        } => {
            let options = CreateOptions {
                root,
                id: &id,
                bundle: bundle.as_deref().unwrap_or(Path::new(".")),
                pid_file: pid_file.as_deref(),
                console_socket: console_socket.as_deref(),
                detach,
                restore: Some(&image_path),
            };
            let status = match (&bundle, husk_docker::upper_dir(root, &id)) {
                (None, Some(_)) => husk_docker::restore(root, &id, &image_path, &options)?,
                _ => husk_runtime::run::run(&options)?,
            };
            Ok(status_code(status))
        }
        Command::Features => {
            println!(
                "{}",
                serde_json::to_string_pretty(&husk_runtime::container::features())?
            );
            Ok(0)
        }
        Command::Update {
            resources,
            memory,
            memory_reservation,
            cpu_quota,
            cpu_period,
            cpu_share,
            pids_limit,
            id,
        } => {
            let mut r: oci_spec::runtime::LinuxResources = match resources {
                Some(path) => {
                    let json = if path == Path::new("-") {
                        std::io::read_to_string(std::io::stdin())?
                    } else {
                        std::fs::read_to_string(&path)
                            .with_context(|| format!("cannot read {}", path.display()))?
                    };
                    serde_json::from_str(&json).context("--resources")?
                }
                None => Default::default(),
            };
            let bytes =
                |s: &str, what: &str| husk_docker::parse_bytes(s).with_context(|| what.to_owned());
            if memory.is_some() || memory_reservation.is_some() {
                let mut m = (*r.memory()).unwrap_or_default();
                if let Some(v) = &memory {
                    m.set_limit(Some(bytes(v, "--memory")?));
                }
                if let Some(v) = &memory_reservation {
                    m.set_reservation(Some(bytes(v, "--memory-reservation")?));
                }
                r.set_memory(Some(m));
            }
            if cpu_quota.is_some() || cpu_period.is_some() || cpu_share.is_some() {
                let mut c = r.cpu().clone().unwrap_or_default();
                if cpu_quota.is_some() {
                    c.set_quota(cpu_quota);
                }
                if cpu_period.is_some() {
                    c.set_period(cpu_period);
                }
                if cpu_share.is_some() {
                    c.set_shares(cpu_share);
                }
                r.set_cpu(Some(c));
            }
            if let Some(limit) = pids_limit {
                let mut p = oci_spec::runtime::LinuxPids::default();
                p.set_limit(limit);
                r.set_pids(Some(p));
            }
            container::update(root, &id, &r)?;
            Ok(0)
        }
        Command::Spec { bundle } => {
            let path = bundle.join("config.json");
            if path.exists() {
                anyhow::bail!("{} exists", path.display());
            }
            let spec = husk_runtime::bundle::default_spec();
            std::fs::write(&path, spec + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(0)
        }
        Command::BusyboxBundle { dir, cmd } => {
            let args: Vec<&str> = if cmd.is_empty() {
                vec!["sh"]
            } else {
                cmd.iter().map(String::as_str).collect()
            };
            husk_docker::busybox::make_bundle(&dir, &args).map_err(anyhow::Error::msg)?;
            Ok(0)
        }
        Command::BusyboxImage { output } => {
            let digest =
                husk_docker::busybox::write_oci_archive(&output).map_err(anyhow::Error::msg)?;
            println!("{digest}");
            Ok(0)
        }
        Command::Mkinitramfs { init, output } => {
            let mut fs = Initramfs::with_base();
            fs.host_file("init", 0o755, &init)?;
            let file = std::fs::File::create(&output)
                .with_context(|| format!("cannot create {}", output.display()))?;
            fs.write_to(std::io::BufWriter::new(file))
                .with_context(|| format!("writing {}", output.display()))?;
            Ok(0)
        }
        Command::DockerRun {
            detach,
            interactive,
            tty,
            rm,
            name,
            env,
            volume,
            workdir,
            user,
            entrypoint,
            memory,
            cpus,
            image,
            command,
        } => {
            let status = husk_docker::run(
                root,
                &husk_docker::RunOptions {
                    image,
                    command,
                    detach,
                    interactive,
                    tty,
                    rm,
                    name,
                    env,
                    volumes: volume,
                    workdir,
                    user,
                    entrypoint,
                    memory,
                    cpus,
                },
            )?;
            Ok(status_code(status))
        }
        Command::DockerPs { all, quiet } => {
            docker_ps(root, all, quiet);
            Ok(0)
        }
        Command::Pull { image } => {
            let store = Store::open(root)?;
            let reference = Reference::parse(&image)?;
            let pulled = Client::new(&reference.registry).pull(&store, &reference)?;
            println!("{}", pulled.manifest);
            Ok(0)
        }
        Command::Push { image } => {
            let store = Store::open(root)?;
            let found = store.find(&image)?;
            let reference = Reference::parse(&image)?;
            let digest = Client::new(&reference.registry).push(&store, &found, &reference)?;
            println!("{digest}");
            Ok(0)
        }
        Command::Tag { source, target } => {
            let store = Store::open(root)?;
            let mut image = store.find(&source)?;
            image.name = Reference::parse(&target)?.to_string();
            store.add_image(image)?;
            Ok(0)
        }
        Command::Images { quiet } => {
            let store = Store::open(root)?;
            let images = store.images()?;
            if !quiet {
                println!(
                    "{:<40} {:<12} {:<14} {:<22} SIZE",
                    "REPOSITORY", "TAG", "IMAGE ID", "STORED"
                );
            }
            for image in images {
                if quiet {
                    println!("{}", image.short_id());
                    continue;
                }
                let r = Reference::parse(&image.name)?;
                println!(
                    "{:<40} {:<12} {:<14} {:<22} {}",
                    r.short_name(),
                    r.tag.as_deref().unwrap_or("<none>"),
                    image.short_id(),
                    image.stored,
                    human_size(image.size())
                );
            }
            Ok(0)
        }
        Command::Rmi { force, images } => {
            let store = Store::open(root)?;
            let containers = husk_docker::Record::all(root);
            for what in &images {
                let image = store.find(what)?;
                if let Some(c) = containers.iter().find(|c| c.image_id == image.config) {
                    if !force {
                        anyhow::bail!(
                            "image {what} is used by container {} (remove it first, or rmi -f)",
                            c.name
                        );
                    }
                }
                store.remove_name(&image.name)?;
                println!("Untagged: {}", image.name);
            }
            let collected = store.collect_garbage(&husk_docker::layers_in_use(root))?;
            println!(
                "Deleted: {} blobs, {} layers",
                collected.blobs, collected.layers
            );
            Ok(0)
        }
        Command::Load { input } => {
            let store = Store::open(root)?;
            let path = input.unwrap_or_else(|| PathBuf::from("-"));
            for image in husk_image::archive::load(&store, &path)? {
                println!("Loaded image: {}", image.name);
            }
            Ok(0)
        }
        Command::Save { output, images } => {
            let store = Store::open(root)?;
            let found = images
                .iter()
                .map(|i| store.find(i))
                .collect::<Result<Vec<_>, _>>()?;
            match output {
                Some(path) => {
                    let tmp = path.with_extension("tmp");
                    let file = std::fs::File::create(&tmp)
                        .with_context(|| format!("cannot create {}", tmp.display()))?;
                    let saved =
                        husk_image::archive::save(&store, &found, std::io::BufWriter::new(file));
                    if let Err(e) = saved {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(e.into());
                    }
                    std::fs::rename(&tmp, &path)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                None => husk_image::archive::save(&store, &found, std::io::stdout().lock())?,
            }
            Ok(0)
        }
        Command::Import { file, reference } => {
            let store = Store::open(root)?;
            let image = husk_image::archive::import(&store, &file, &Reference::parse(&reference)?)?;
            println!("{}", image.config);
            Ok(0)
        }
        Command::Stop { time, names } => {
            for name in names {
                husk_docker::stop(root, &name, std::time::Duration::from_secs(time))?;
                println!("{name}");
            }
            Ok(0)
        }
        Command::Rm { force, names } => {
            for name in names {
                husk_docker::remove(root, &name, force)?;
                println!("{name}");
            }
            Ok(0)
        }
        Command::Logs { follow, name } => {
            husk_docker::logs(root, &name, follow, &mut std::io::stdout().lock())?;
            Ok(0)
        }
        Command::Inspect { names } => {
            let all = names
                .iter()
                .map(|n| husk_docker::inspect(root, n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            println!("{}", serde_json::to_string_pretty(&all)?);
            Ok(0)
        }
        Command::Autoremove { name } => {
            husk_docker::autoremove(root, &name)?;
            Ok(0)
        }
        Command::Monitor {
            id,
            console_socket,
            exec,
            process,
            restore,
        } => {
            // The ready pipe must not leak into the VMM (its reader waits
            // for the end of file).
            // SAFETY: fcntl on a descriptor number; harmless if not open.
            unsafe { libc::fcntl(monitor::READY_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
            // The monitor outlives terminals and stray signals; only an
            // explicit SIGKILL (delete --force) ends it early.
            for sig in [
                libc::SIGINT,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGTERM,
                libc::SIGPIPE,
            ] {
                // SAFETY: ignoring a signal installs no handler code.
                unsafe { libc::signal(sig, libc::SIG_IGN) };
            }
            let terminal = container::terminal(console_socket.as_deref());
            if console_socket.is_some() {
                // The terminal is the container's stdio: the caller's own
                // stdio (runc's caller reads it to its end) is let go.
                // SAFETY: open and dup2 of /dev/null over 0, 1 and 2.
                unsafe {
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                    if null >= 0 {
                        for fd in 0..3 {
                            libc::dup2(null, fd);
                        }
                        libc::close(null);
                    }
                }
            }
            let status = match (exec, process) {
                (Some(exec_id), Some(file)) => {
                    let json = std::fs::read_to_string(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    let process = serde_json::from_str(&json)?;
                    monitor::exec(root, &id, &exec_id, process, &terminal)
                }
                _ => {
                    let bins = husk_guest::binaries::locate(root)?;
                    monitor::container(root, &bins, &id, &terminal, restore.as_deref())
                }
            };
            Ok(status_code(status))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let args = args.iter().map(Into::into).collect();
        Cli::try_parse_from(docker_form(go_flags(args))).unwrap()
    }

    #[test]
    fn go_runcs_one_dash_flags_and_restores_arguments_parse() {
        // As containerd's shim runs it.
        let cli = parse(&[
            "husk",
            "--root",
            "/run/r",
            "--log",
            "/x/log.json",
            "--log-format",
            "json",
            "restore",
            "--image-path",
            "/tmp/ck",
            "--work-path",
            "/x/work",
            "--detach",
            "--pid-file",
            "/x/init.pid",
            "-no-subreaper",
            "--bundle",
            "/x",
            "c3",
        ]);
        match cli.command {
            Command::Restore {
                image_path,
                bundle,
                detach,
                no_subreaper,
                id,
                ..
            } => {
                assert_eq!(image_path, Path::new("/tmp/ck"));
                assert_eq!(bundle.as_deref(), Some(Path::new("/x")));
                assert!(detach && no_subreaper);
                assert_eq!(id, "c3");
            }
            _ => panic!("not restore"),
        }
        // A docker-style `-it` is left alone.
        let cli = parse(&["husk", "run", "-it", "husk/busybox", "sh"]);
        assert!(matches!(cli.command, Command::DockerRun { .. }));
    }
}
