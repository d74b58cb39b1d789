//! `husk`: the command-line face of the runtime library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use husk_runtime::initramfs::Initramfs;

#[derive(Parser)]
#[command(
    name = "husk",
    version,
    about = "Husk: OCI containers, each in its own KVM microVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a guest initramfs whose /init is the given static binary.
    Mkinitramfs {
        /// Static binary to run as the guest's PID 1.
        #[arg(long)]
        init: PathBuf,
        /// Where to write the newc cpio archive.
        #[arg(long, short)]
        output: PathBuf,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("husk: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Mkinitramfs { init, output } => {
            let mut fs = Initramfs::with_base();
            fs.host_file("init", 0o755, &init)?;
            let file = std::fs::File::create(&output)
                .with_context(|| format!("cannot create {}", output.display()))?;
            fs.write_to(std::io::BufWriter::new(file))
                .with_context(|| format!("writing {}", output.display()))?;
            Ok(())
        }
    }
}
