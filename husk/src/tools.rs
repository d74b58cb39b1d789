//! Husk's own commands: the busybox bundle and image, an initramfs, and
//! the hidden container monitor (docs/runtime.md).

use std::path::Path;
use std::path::PathBuf;

use anyhow::Context;
use husk_guest::initramfs::Initramfs;
use husk_runtime::container;
use husk_runtime::handoff::{self, Handoff};
use husk_runtime::monitor;

use crate::status_code;

// The arguments of `busybox-bundle`.
#[derive(clap::Args)]
pub struct BusyboxBundleArgs {
    /// The bundle directory to create.
    pub dir: PathBuf,
    /// The command.
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

/// Runs `husk busybox-bundle`.
pub fn busybox_bundle(args: BusyboxBundleArgs) -> anyhow::Result<u8> {
    let BusyboxBundleArgs { dir, cmd } = args;
    let args: Vec<&str> = if cmd.is_empty() {
        vec!["sh"]
    } else {
        cmd.iter().map(String::as_str).collect()
    };
    husk_docker::busybox::make_bundle(&dir, &args).map_err(anyhow::Error::msg)?;
    Ok(0)
}

// The arguments of `busybox-image`.
#[derive(clap::Args)]
pub struct BusyboxImageArgs {
    /// The archive to write.
    #[arg(long, short)]
    pub output: PathBuf,
    /// The image's name in the archive.
    #[arg(long, default_value = husk_docker::busybox::IMAGE_NAME)]
    pub name: String,
    /// The image's command, one argument per flag (default `sh`): e.g.
    /// `--cmd sleep --cmd inf` makes a pod sandbox (pause) image for a
    /// containerd with no registry.
    #[arg(long = "cmd")]
    pub cmd: Vec<String>,
}

/// Runs `husk busybox-image`.
pub fn busybox_image(args: BusyboxImageArgs) -> anyhow::Result<u8> {
    let BusyboxImageArgs { output, name, cmd } = args;
    let cmd: Vec<&str> = if cmd.is_empty() {
        vec!["sh"]
    } else {
        cmd.iter().map(String::as_str).collect()
    };
    let digest = husk_docker::busybox::write_oci_archive_as(&output, &name, &cmd)
        .map_err(anyhow::Error::msg)?;
    println!("{digest}");
    Ok(0)
}

// The arguments of `mkinitramfs`.
#[derive(clap::Args)]
pub struct MkinitramfsArgs {
    /// Static binary to run as the guest's PID 1.
    #[arg(long)]
    pub init: PathBuf,
    /// Where to write the newc cpio archive.
    #[arg(long, short)]
    pub output: PathBuf,
}

/// Runs `husk mkinitramfs`.
pub fn mkinitramfs(args: MkinitramfsArgs) -> anyhow::Result<u8> {
    let MkinitramfsArgs { init, output } = args;
    let mut fs = Initramfs::with_base();
    fs.host_file("init", 0o755, &init)?;
    let file = std::fs::File::create(&output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    fs.write_to(std::io::BufWriter::new(file))
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(0)
}

// The arguments of `monitor`. What it is to do comes from its starter
// on descriptor 3 (husk_runtime::handoff).
#[derive(clap::Args)]
pub struct MonitorArgs {
    pub id: String,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
}

/// Runs `husk _monitor`.
pub fn monitor(root: &Path, args: MonitorArgs) -> anyhow::Result<u8> {
    // Taken first: the starter's socket must not leak into the VMM (the
    // starter waits for its end).
    let mut channel = handoff::Channel::take();
    let handoff = channel.receive();
    Ok(serve(root, args, handoff, channel))
}

/// A monitor forked from this process (handoff::fork_monitors): `args`
/// as `husk _monitor` takes them, `handoff` in hand.
pub fn forked_monitor(
    root: &Path,
    args: &[String],
    handoff: Handoff,
    channel: handoff::Channel,
) -> u8 {
    #[derive(clap::Parser)]
    struct Monitor {
        #[command(flatten)]
        args: MonitorArgs,
    }
    let parsed = <Monitor as clap::Parser>::try_parse_from(
        std::iter::once("_monitor").chain(args.iter().map(String::as_str)),
    );
    match parsed {
        Ok(m) => serve(root, m.args, Ok(handoff), channel),
        Err(e) => {
            channel.report(&Err(format!("the monitor's arguments: {e}")));
            1
        }
    }
}

/// The monitor's work, on what it was handed.
fn serve(
    root: &Path,
    args: MonitorArgs,
    handoff: Result<Handoff, String>,
    channel: handoff::Channel,
) -> u8 {
    let MonitorArgs { id, console_socket } = args;
    // The monitor outlives terminals and stray signals; only an
    // explicit SIGKILL (delete --force) ends it early.
    husk_sys::signals::ignore(&[
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGTERM,
        libc::SIGPIPE,
    ]);
    let terminal = container::terminal(console_socket.as_deref());
    if console_socket.is_some() {
        // The terminal is the container's stdio: the caller's own
        // stdio (runc's caller reads it to its end) is let go.
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            let _ = rustix::stdio::dup2_stdin(&null);
            let _ = rustix::stdio::dup2_stdout(&null);
            let _ = rustix::stdio::dup2_stderr(&null);
        }
    }
    let handoff = match handoff {
        Ok(handoff) => handoff,
        Err(e) => {
            channel.report(&Err(e));
            return 1;
        }
    };
    let status = match handoff {
        Handoff::Exec {
            id: of,
            exec_id,
            process,
        } if of == id => monitor::exec(root, &id, &exec_id, *process, &terminal, channel),
        Handoff::Container {
            state,
            bundle,
            restore,
            start,
        } if state.id == id => {
            let bins = match husk_guest::binaries::locate(root) {
                Ok(bins) => bins,
                Err(e) => {
                    channel.report(&Err(husk_runtime::error_chain(&e)));
                    return 1;
                }
            };
            monitor::container(
                root,
                &bins,
                *state,
                &bundle,
                match (&restore, start) {
                    (Some(restore), _) => monitor::Begin::Restored(restore),
                    (None, true) => monitor::Begin::Started,
                    (None, false) => monitor::Begin::Created,
                },
                &terminal,
                channel,
            )
        }
        _ => {
            channel.report(&Err(format!(
                "the monitor of {id:?} was handed another container's work"
            )));
            1
        }
    };
    status_code(status)
}
