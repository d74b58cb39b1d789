//! runc's lifecycle commands: create, start, state, kill, delete, run,
//! exec, ps, list, pause, resume, events, update, features, spec
//! (docs/runtime.md).

use std::io::Write;
use std::path::Path;
use std::path::PathBuf;

use anyhow::Context;
use husk_runtime::container;
use husk_runtime::container::CreateOptions;
use husk_runtime::container::ExecOptions;
use husk_runtime::state;
use husk_runtime::state::ContainerState;

use crate::status_code;

/// `--format` of `ps` and `list`.
#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum ListFormat {
    Table,
    Json,
}

// The arguments of `create`.
#[derive(clap::Args)]
pub struct CreateArgs {
    /// The OCI bundle.
    #[arg(long, short, default_value = ".")]
    pub bundle: PathBuf,
    /// Write the PID of the process that stands for the container's.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Send the terminal's master here (SCM_RIGHTS).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Accepted for runc compatibility (no descriptors reach a guest).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Container ID.
    pub id: String,
}

/// Runs `husk create`.
pub fn create(root: &Path, args: CreateArgs) -> anyhow::Result<u8> {
    let CreateArgs {
        bundle,
        pid_file,
        console_socket,
        id,
        ..
    } = args;
    container::create(&CreateOptions {
        root,
        id: &id,
        bundle: &bundle,
        pid_file: pid_file.as_deref(),
        console_socket: console_socket.as_deref(),
        detach: true,
        restore: None,
        stdio: None,
        pod: None,
    })?;
    Ok(0)
}

// The arguments of `start`.
#[derive(clap::Args)]
pub struct StartArgs {
    /// docker's `start --checkpoint`: a stopped container made from an
    /// image, restored from this checkpoint of its own.
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Where its checkpoints are (with `--checkpoint`).
    #[arg(long, requires = "checkpoint")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Container ID.
    pub id: String,
}

/// Runs `husk start`.
pub fn start(root: &Path, args: StartArgs) -> anyhow::Result<u8> {
    match args {
        StartArgs {
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
                stdio: None,
                pod: None,
            };
            husk_docker::restore(root, &id, &at, &options)?;
            Ok(0)
        }
        StartArgs { id, .. } => {
            container::start(root, &id)?;
            Ok(0)
        }
    }
}

// The arguments of `state`.
#[derive(clap::Args)]
pub struct StateArgs {
    /// Container ID.
    pub id: String,
}

/// Runs `husk state`.
pub fn state(root: &Path, args: StateArgs) -> anyhow::Result<u8> {
    let StateArgs { id } = args;
    let state = ContainerState::load(root, &id)?;
    println!("{}", serde_json::to_string_pretty(&state.oci_state())?);
    Ok(0)
}

// The arguments of `kill`.
#[derive(clap::Args)]
pub struct KillArgs {
    /// To every process of the container.
    #[arg(long, short)]
    pub all: bool,
    /// Container ID.
    pub id: String,
    /// Signal name or number.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

/// Runs `husk kill`.
pub fn kill(root: &Path, args: KillArgs) -> anyhow::Result<u8> {
    let KillArgs {
        all, id, signal, ..
    } = args;
    container::kill(root, &id, container::parse_signal(&signal)?, all)?;
    Ok(0)
}

// The arguments of `delete`.
#[derive(clap::Args)]
pub struct DeleteArgs {
    /// Kill a running container first.
    #[arg(long, short)]
    pub force: bool,
    /// Container ID.
    pub id: String,
}

/// Runs `husk delete`.
pub fn delete(root: &Path, args: DeleteArgs) -> anyhow::Result<u8> {
    let DeleteArgs { force, id } = args;
    container::delete(root, &id, force)?;
    Ok(0)
}

// The arguments of `run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The OCI bundle.
    #[arg(long, short, default_value = ".")]
    pub bundle: PathBuf,
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
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Container ID.
    pub id: String,
}

/// Runs `husk run`.
pub fn run(root: &Path, args: RunArgs) -> anyhow::Result<u8> {
    let RunArgs {
        bundle,
        detach,
        pid_file,
        console_socket,
        id,
        ..
    } = args;
    let status = husk_runtime::run::run(&CreateOptions {
        root,
        id: &id,
        bundle: &bundle,
        pid_file: pid_file.as_deref(),
        console_socket: console_socket.as_deref(),
        detach,
        restore: None,
        stdio: None,
        pod: None,
    })?;
    Ok(status_code(status))
}

// The arguments of `exec`.
#[derive(clap::Args)]
pub struct ExecArgs {
    /// The process, as an OCI process JSON file.
    #[arg(long, short)]
    pub process: Option<PathBuf>,
    /// Return once it runs.
    #[arg(long, short)]
    pub detach: bool,
    /// A terminal.
    #[arg(long, short)]
    pub tty: bool,
    /// Accepted for docker compatibility: stdin is attached, as runc
    /// attaches it.
    #[arg(long, short)]
    pub interactive: bool,
    /// Send the terminal's master here (SCM_RIGHTS).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Write the PID of the process that stands for it.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Environment, KEY=VALUE (repeatable).
    #[arg(long, short)]
    pub env: Vec<String>,
    /// Working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// UID[:GID].
    #[arg(long, short)]
    pub user: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Container ID.
    pub id: String,
    /// The command.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Runs `husk exec`.
pub fn exec(root: &Path, args: ExecArgs) -> anyhow::Result<u8> {
    let ExecArgs {
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
    } = args;
    // Loaded once: the process's defaults and the container's status.
    let state = husk_runtime::state::ContainerState::load(root, &id)?;
    let process = container::exec_process(
        process.as_deref(),
        &command,
        &env,
        cwd.as_deref(),
        user.as_deref(),
        tty,
        state.process.clone(),
    )?;
    let status = container::exec(
        &state,
        &ExecOptions {
            root,
            id: &id,
            process,
            detach,
            pid_file: pid_file.as_deref(),
            console_socket: console_socket.as_deref(),
            stdio: None,
        },
    )?;
    Ok(status_code(status))
}

// The arguments of `ps`.
#[derive(clap::Args)]
pub struct PsArgs {
    /// table or json.
    #[arg(long, short, value_enum, default_value = "table")]
    pub format: ListFormat,
    /// Container ID.
    pub id: String,
}

/// Runs `husk ps`.
pub fn ps(root: &Path, args: PsArgs) -> anyhow::Result<u8> {
    let PsArgs { format, id } = args;
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

// The arguments of `list`.
#[derive(clap::Args)]
pub struct ListArgs {
    /// table or json.
    #[arg(long, short, value_enum, default_value = "table")]
    pub format: ListFormat,
    /// IDs only.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Runs `husk list`.
pub fn list(root: &Path, args: ListArgs) -> anyhow::Result<u8> {
    let ListArgs { format, quiet } = args;
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

// The arguments of `pause`.
#[derive(clap::Args)]
pub struct PauseArgs {
    /// Container ID.
    pub id: String,
}

/// Runs `husk pause`.
pub fn pause(root: &Path, args: PauseArgs) -> anyhow::Result<u8> {
    let PauseArgs { id } = args;
    container::pause(root, &id, true)?;
    Ok(0)
}

// The arguments of `resume`.
#[derive(clap::Args)]
pub struct ResumeArgs {
    /// Container ID.
    pub id: String,
}

/// Runs `husk resume`.
pub fn resume(root: &Path, args: ResumeArgs) -> anyhow::Result<u8> {
    let ResumeArgs { id } = args;
    container::pause(root, &id, false)?;
    Ok(0)
}

// The arguments of `events`.
#[derive(clap::Args)]
pub struct EventsArgs {
    /// Resource usage.
    #[arg(long)]
    pub stats: bool,
    /// Seconds between stats.
    #[arg(long, default_value = "5s")]
    pub interval: String,
    /// Container ID.
    pub id: String,
}

/// Runs `husk events`.
pub fn events(root: &Path, args: EventsArgs) -> anyhow::Result<u8> {
    let EventsArgs {
        stats,
        interval: every,
        id,
    } = args;
    let every = interval(&every).context("--interval")?;
    let mut ooms = None;
    loop {
        let state = ContainerState::load(root, &id)?;
        if state.status() == state::Status::Stopped {
            // Its last figures (the OOM kills) come just after the exit.
            let state = state.drained_or_gone(root, container::DRAIN_LIMIT);
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

/// Runs `husk features`.
pub fn features() -> anyhow::Result<u8> {
    println!(
        "{}",
        serde_json::to_string_pretty(&husk_runtime::container::features())?
    );
    Ok(0)
}

// The arguments of `update`.
#[derive(clap::Args)]
pub struct UpdateArgs {
    /// A JSON file of linux resources (`-`: stdin), as runc takes.
    #[arg(long, short)]
    pub resources: Option<PathBuf>,
    /// Memory limit (bytes, or 512m, 1g).
    #[arg(long, short)]
    pub memory: Option<String>,
    /// Memory soft limit (bytes, or 512m, 1g).
    #[arg(long)]
    pub memory_reservation: Option<String>,
    /// CPU CFS quota, microseconds per period.
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    /// CPU CFS period, microseconds.
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// CPU shares (relative weight).
    #[arg(long)]
    pub cpu_share: Option<u64>,
    /// Most processes.
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Container ID.
    pub id: String,
}

/// Runs `husk update`.
pub fn update(root: &Path, args: UpdateArgs) -> anyhow::Result<u8> {
    let UpdateArgs {
        resources,
        memory,
        memory_reservation,
        cpu_quota,
        cpu_period,
        cpu_share,
        pids_limit,
        id,
    } = args;
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
    let bytes = |s: &str, what: &str| husk_docker::parse_bytes(s).with_context(|| what.to_owned());
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

// The arguments of `spec`.
#[derive(clap::Args)]
pub struct SpecArgs {
    /// The bundle directory.
    #[arg(long, short, default_value = ".")]
    pub bundle: PathBuf,
}

/// Runs `husk spec`.
pub fn spec(args: SpecArgs) -> anyhow::Result<u8> {
    let SpecArgs { bundle } = args;
    let path = bundle.join("config.json");
    if path.exists() {
        anyhow::bail!("{} exists", path.display());
    }
    let spec = husk_runtime::bundle::default_spec();
    std::fs::write(&path, spec + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(0)
}

/// Seconds in `5s`, `500ms`, `2`.
pub fn interval(s: &str) -> anyhow::Result<std::time::Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return Ok(std::time::Duration::from_millis(ms.parse()?));
    }
    let secs: f64 = s.strip_suffix('s').unwrap_or(s).parse()?;
    Ok(std::time::Duration::from_secs_f64(secs))
}
