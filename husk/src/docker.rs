//! docker's container commands: run (of an image), ps, stop, rm, logs,
//! inspect, and the hidden autoremove (docs/images.md).

use std::path::Path;

use crate::status_code;

// The arguments of `docker-run`.
#[derive(clap::Args)]
pub struct DockerRunArgs {
    /// Return once it runs; output goes to `husk logs`.
    #[arg(long, short)]
    pub detach: bool,
    /// Keep stdin attached (else /dev/null).
    #[arg(long, short)]
    pub interactive: bool,
    /// A terminal.
    #[arg(long, short)]
    pub tty: bool,
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Its name (default: the first 12 digits of its ID).
    #[arg(long)]
    pub name: Option<String>,
    /// Environment, KEY=VALUE (repeatable).
    #[arg(long, short)]
    pub env: Vec<String>,
    /// HOST:CONTAINER[:ro] (HOST a path, or a volume name).
    #[arg(long, short)]
    pub volume: Vec<String>,
    /// Working directory.
    #[arg(long, short)]
    pub workdir: Option<String>,
    /// USER[:GROUP] (names or numbers).
    #[arg(long, short)]
    pub user: Option<String>,
    /// Override the image's entrypoint.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Memory limit (512m, 1g).
    #[arg(long, short)]
    pub memory: Option<String>,
    /// CPUs (1.5).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// The network to join: a husk network's name, or none (loopback
    /// only). Default: bridge (made on first use).
    #[arg(long, alias = "net")]
    pub network: Option<String>,
    /// Publish a port: [IP:][HOST_PORT:]CONTAINER_PORT[/tcp|udp]
    /// (repeatable).
    #[arg(long, short = 'p')]
    pub publish: Vec<String>,
    /// Publish every port the image exposes, each on a free host port.
    #[arg(long, short = 'P')]
    pub publish_all: bool,
    /// The container's host name (default: the first 12 digits of its
    /// ID).
    #[arg(long)]
    pub hostname: Option<String>,
    /// An /etc/hosts entry, HOST:IP (repeatable).
    #[arg(long)]
    pub add_host: Vec<String>,
    /// A nameserver for /etc/resolv.conf (repeatable; default: the
    /// host's, less loopback ones).
    #[arg(long)]
    pub dns: Vec<String>,
    /// The image.
    pub image: String,
    /// The command (default: the image's).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Runs `husk run IMAGE`.
pub fn docker_run(root: &Path, args: DockerRunArgs) -> anyhow::Result<u8> {
    let DockerRunArgs {
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
        network,
        publish,
        publish_all,
        hostname,
        add_host,
        dns,
        image,
        command,
    } = args;
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
            network,
            publish,
            publish_all,
            hostname,
            add_hosts: add_host,
            dns,
        },
    )?;
    Ok(status_code(status))
}

// The arguments of `docker-ps`.
#[derive(clap::Args)]
pub struct DockerPsArgs {
    /// Stopped ones too.
    #[arg(long, short)]
    pub all: bool,
    /// IDs only.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Runs `husk ps (docker's)`.
pub fn docker_ps(root: &Path, args: DockerPsArgs) -> anyhow::Result<u8> {
    let DockerPsArgs { all, quiet } = args;
    print_containers(root, all, quiet);
    Ok(0)
}

// The arguments of `stop`.
#[derive(clap::Args)]
pub struct StopArgs {
    /// Seconds before SIGKILL.
    #[arg(long, short, default_value_t = 10)]
    pub time: u64,
    /// Containers.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// Runs `husk stop`.
pub fn stop(root: &Path, args: StopArgs) -> anyhow::Result<u8> {
    let StopArgs { time, names } = args;
    for name in names {
        husk_docker::stop(root, &name, std::time::Duration::from_secs(time))?;
        println!("{name}");
    }
    Ok(0)
}

// The arguments of `rm`.
#[derive(clap::Args)]
pub struct RmArgs {
    /// Running ones too (killed).
    #[arg(long, short)]
    pub force: bool,
    /// Containers.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// Runs `husk rm`.
pub fn rm(root: &Path, args: RmArgs) -> anyhow::Result<u8> {
    let RmArgs { force, names } = args;
    for name in names {
        husk_docker::remove(root, &name, force)?;
        println!("{name}");
    }
    Ok(0)
}

// The arguments of `logs`.
#[derive(clap::Args)]
pub struct LogsArgs {
    /// Keep printing until it stops.
    #[arg(long, short)]
    pub follow: bool,
    /// The container.
    pub name: String,
}

/// Runs `husk logs`.
pub fn logs(root: &Path, args: LogsArgs) -> anyhow::Result<u8> {
    let LogsArgs { follow, name } = args;
    husk_docker::logs(root, &name, follow, &mut std::io::stdout().lock())?;
    Ok(0)
}

// The arguments of `inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// Containers or images.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// Runs `husk inspect`.
pub fn inspect(root: &Path, args: InspectArgs) -> anyhow::Result<u8> {
    let InspectArgs { names } = args;
    let all = names
        .iter()
        .map(|n| husk_docker::inspect(root, n))
        .collect::<Result<Vec<_>, _>>()?;
    println!("{}", serde_json::to_string_pretty(&all)?);
    Ok(0)
}

/// `husk ps` (docker's): containers made from images.
fn print_containers(root: &Path, all: bool, quiet: bool) {
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

// The arguments of `_autoremove`.
#[derive(clap::Args)]
pub struct AutoremoveArgs {
    /// The container.
    pub name: String,
}

/// Runs `husk _autoremove`.
pub fn autoremove(root: &Path, args: AutoremoveArgs) -> anyhow::Result<u8> {
    husk_docker::autoremove(root, &args.name)?;
    Ok(0)
}
