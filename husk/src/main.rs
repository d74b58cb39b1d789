//! `husk`: runc's command line, each container in its own microVM.
//!
//! Exit status: a container's (or exec'd process's) own exit status for
//! a foreground `run` or `exec`; otherwise 0 on success; 125 when husk
//! itself fails for `run` (as docker does, so it cannot be mistaken for
//! the container's), 1 for every other command's failure; 2 for a usage
//! error. Errors go to stderr, and to `--log` in `--log-format` when given
//! (containerd's shim reads the JSON form).

mod arena;
mod argv;
mod checkpoints;
mod cli;
mod docker;
mod doctor;
mod images;
mod networks;
mod oci;
mod tools;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use husk_runtime::state;

use crate::argv::{docker_form, go_flags};
use crate::cli::{Cli, Command, LogFormat};

/// First allocations from a static arena (husk/src/arena.rs: musl's
/// allocator maps and unmaps memory around small allocations).
#[global_allocator]
static ALLOCATOR: arena::Arena = arena::Arena;

/// Exit status when husk itself fails to run a container.
const EXIT_RUN_FAILED: u8 = 125;

fn main() -> ExitCode {
    // The monitors this command starts are its own forks, where it has
    // one thread then (no exec of `husk _monitor`: issue 18).
    husk_runtime::handoff::fork_monitors(tools::forked_monitor);
    let cli = Cli::parse_args(docker_form(go_flags(std::env::args_os().collect())));
    let failed = if matches!(cli.command, Command::Run(_) | Command::DockerRun(_)) {
        EXIT_RUN_FAILED
    } else {
        1
    };
    // Commands that only print what they read end on SIGPIPE when their
    // reader goes away (`husk inspect x | head`); the ones that carry a
    // container's stdio keep Rust's ignored SIGPIPE.
    if matches!(
        cli.command,
        Command::Inspect(_)
            | Command::DockerPs(_)
            | Command::Images(_)
            | Command::List(_)
            | Command::State(_)
            | Command::Features
            | Command::Doctor
            | Command::Network(_)
            | Command::Ps(_)
    ) {
        husk_sys::signals::default_action(&[libc::SIGPIPE]);
    }
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

/// The exit status husk reports for a container's (or process's) status.
pub(crate) fn status_code(status: i32) -> u8 {
    u8::try_from(status).unwrap_or(255)
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
        Command::Create(args) => oci::create(root, args),
        Command::Start(args) => oci::start(root, args),
        Command::State(args) => oci::state(root, args),
        Command::Kill(args) => oci::kill(root, args),
        Command::Delete(args) => oci::delete(root, args),
        Command::Run(args) => oci::run(root, args),
        Command::Exec(args) => oci::exec(root, args),
        Command::Ps(args) => oci::ps(root, args),
        Command::List(args) => oci::list(root, args),
        Command::Pause(args) => oci::pause(root, args),
        Command::Resume(args) => oci::resume(root, args),
        Command::Events(args) => oci::events(root, args),
        Command::Checkpoint(args) => checkpoints::checkpoint(root, args),
        Command::Restore(args) => checkpoints::restore(root, args),
        Command::Features => oci::features(),
        Command::Doctor => doctor::doctor(),
        Command::Update(args) => oci::update(root, args),
        Command::Spec(args) => oci::spec(args),
        Command::BusyboxBundle(args) => tools::busybox_bundle(args),
        Command::BusyboxImage(args) => tools::busybox_image(args),
        Command::Mkinitramfs(args) => tools::mkinitramfs(args),
        Command::DockerRun(args) => docker::docker_run(root, args),
        Command::DockerCheckpoint(args) => checkpoints::docker_checkpoint(root, args),
        Command::DockerPs(args) => docker::docker_ps(root, args),
        Command::Build(args) => images::build(root, args),
        Command::Pull(args) => images::pull(root, args),
        Command::Push(args) => images::push(root, args),
        Command::Tag(args) => images::tag(root, args),
        Command::Images(args) => images::images(root, args),
        Command::Rmi(args) => images::rmi(root, args),
        Command::Load(args) => images::load(root, args),
        Command::Save(args) => images::save(root, args),
        Command::Import(args) => images::import(root, args),
        Command::Stop(args) => docker::stop(root, args),
        Command::Rm(args) => docker::rm(root, args),
        Command::Logs(args) => docker::logs(root, args),
        Command::Inspect(args) => docker::inspect(root, args),
        Command::Network(args) => networks::network(root, args),
        Command::Autoremove(args) => docker::autoremove(root, args),
        Command::Monitor(args) => tools::monitor(root, args),
    }
}
