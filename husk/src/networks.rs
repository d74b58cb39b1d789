//! `husk network create|ls|inspect|rm`: husk's own networks
//! (docs/networking.md).

use std::path::Path;

use husk_docker::network;

// The arguments of `network`.
#[derive(clap::Args)]
pub struct NetworkArgs {
    #[command(subcommand)]
    pub command: NetworkCommand,
}

#[derive(clap::Subcommand)]
pub enum NetworkCommand {
    /// Make a network (a bridge the CNI plugins make when a container
    /// first joins it).
    Create(CreateArgs),
    /// List networks.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Print networks' details and containers (JSON).
    Inspect(NamesArgs),
    /// Remove networks no container is on.
    #[command(alias = "remove")]
    Rm(NamesArgs),
}

// The arguments of `network create`.
#[derive(clap::Args)]
pub struct CreateArgs {
    /// Its subnet, IPv4 CIDR (default: a free /24 of 10.200.0.0/13).
    #[arg(long)]
    pub subnet: Option<String>,
    /// The bridge's address, the containers' gateway (default: the
    /// subnet's first).
    #[arg(long)]
    pub gateway: Option<String>,
    /// Accepted for docker compatibility: bridge is the only driver.
    #[arg(long, short, default_value = "bridge")]
    pub driver: String,
    /// Its name.
    pub name: String,
}

// The arguments of `network ls`.
#[derive(clap::Args)]
pub struct LsArgs {
    /// Names only.
    #[arg(long, short)]
    pub quiet: bool,
}

// The arguments of `network inspect` and `network rm`.
#[derive(clap::Args)]
pub struct NamesArgs {
    /// Networks.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// Runs `husk network`.
pub fn network(root: &Path, args: NetworkArgs) -> anyhow::Result<u8> {
    match args.command {
        NetworkCommand::Create(a) => {
            if a.driver != "bridge" {
                anyhow::bail!("--driver {:?}: bridge is the only driver", a.driver);
            }
            let n = network::create(root, &a.name, a.subnet.as_deref(), a.gateway.as_deref())?;
            println!("{}", n.id);
        }
        NetworkCommand::Ls(a) => {
            if !a.quiet {
                println!(
                    "{:<14} {:<20} {:<8} {:<18} BRIDGE",
                    "NETWORK ID", "NAME", "DRIVER", "SUBNET"
                );
            }
            for n in network::list(root) {
                if a.quiet {
                    println!("{}", n.name);
                } else {
                    println!(
                        "{:<14} {:<20} {:<8} {:<18} {}",
                        &n.id[..12],
                        n.name,
                        "bridge",
                        n.subnet,
                        n.bridge
                    );
                }
            }
        }
        NetworkCommand::Inspect(a) => {
            let all = a
                .names
                .iter()
                .map(|n| network::inspect(root, n))
                .collect::<Result<Vec<_>, _>>()?;
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        NetworkCommand::Rm(a) => {
            for name in a.names {
                network::remove(root, &name)?;
                println!("{name}");
            }
        }
    }
    Ok(0)
}
