//! `husk`: the command-line face of the runtime library.
//!
//! Exit status: a container's own exit status for `run`; 125 when husk
//! itself fails (a bad bundle, a VM that cannot start), as docker does;
//! 2 for a usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use husk_runtime::initramfs::Initramfs;

/// Exit status when husk itself fails.
const EXIT_HUSK_FAILED: u8 = 125;

#[derive(Parser)]
#[command(
    name = "husk",
    version,
    about = "Husk: OCI containers, each in its own KVM microVM"
)]
struct Cli {
    /// Where husk keeps its state: containers, warm-start snapshots, the
    /// guest's initramfs.
    #[arg(long, global = true, default_value = "/var/lib/husk")]
    root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a container in the foreground, in its own microVM, and exit
    /// with its exit status.
    Run {
        /// The OCI bundle: a directory with config.json and the root
        /// filesystem it names.
        #[arg(long, short, default_value = ".")]
        bundle: PathBuf,
        /// The container's ID.
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

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("husk: {e:#}");
            ExitCode::from(EXIT_HUSK_FAILED)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Run { bundle, id } => {
            let bins = husk_runtime::binaries::locate(&cli.root)?;
            let status = husk_runtime::run::run(&cli.root, &bins, &bundle, &id)?;
            Ok(u8::try_from(status).unwrap_or(255))
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
            husk_runtime::busybox::make_bundle(&dir, &args).map_err(anyhow::Error::msg)?;
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
    }
}
