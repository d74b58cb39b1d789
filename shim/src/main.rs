//! `containerd-shim-husk-v2`: containerd's task API (shim v2, runtime type
//! `io.containerd.husk.v2`) over husk's microVMs, on containerd's own
//! Rust shim crate (`containerd-shim`, its protos and ttrpc).
//!
//! containerd runs `containerd-shim-husk-v2 ... start` in a task's bundle;
//! that spawns (or, for a container of a pod whose shim runs, finds) the
//! serving shim and prints its socket's address. The serving shim answers
//! the task API ([`service`]); each task is a husk container whose
//! monitor (`husk _monitor`) is the shim's child. `... delete` cleans up
//! after a shim that died. docs/kubernetes.md.

mod service;
mod stdio;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::api::DeleteResponse;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, ExitSignal, Flags, StartOpts};

/// The runtime type containerd knows the shim by.
const RUNTIME: &str = "io.containerd.husk.v2";

struct Shim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
}

/// Where a task's husk state lives: in its bundle, so that nothing of it
/// outlives the bundle containerd removes.
pub fn husk_root(bundle: &Path) -> PathBuf {
    bundle.join("husk")
}

/// The `husk` binary: `$HUSK_BINARY`, else next to the shim (an install
/// puts both in one directory, as cargo's target directory has them).
fn husk_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("HUSK_BINARY") {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("husk")))
        .unwrap_or_else(|| PathBuf::from("husk"))
}

impl containerd_shim::Shim for Shim {
    type T = service::Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Shim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = service::grouping(Path::new("."), &opts.id)
            .map_err(containerd_shim::Error::InvalidArgument)?;
        let address = if grouping.joins {
            // A container of a pod: its shim must be running.
            let address =
                containerd_shim::socket_address(&opts.address, &opts.namespace, &grouping.group);
            let path = address.trim_start_matches("unix://");
            if husk_sys::unix::connect(Path::new(path)).is_err() {
                return Err(containerd_shim::Error::NotFoundError(format!(
                    "pod {} has no running sandbox (no shim listens for it)",
                    grouping.group
                )));
            }
            address
        } else {
            containerd_shim::spawn(opts, &grouping.group, Vec::new())?.1
        };
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // containerd runs this in the bundle of a task whose shim died.
        let bundle = std::env::current_dir()
            .map_err(|e| containerd_shim::Error::Other(format!("no bundle: {e}")))?;
        service::clean_up(&bundle, &self.id);
        let mut response = DeleteResponse::new();
        response.exit_status = 128 + libc::SIGKILL as u32;
        response.exited_at = Some(containerd_shim::util::timestamp()?).into();
        Ok(response)
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(self.namespace.clone(), publisher, self.exit.clone())
    }
}

fn main() {
    husk_runtime::handoff::use_husk_at(husk_binary());
    // husk's warm-start snapshot is shared with `husk run` (its default
    // root), not made once per task's root.
    if std::env::var_os("HUSK_WARM_CACHE").is_none() {
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var("HUSK_WARM_CACHE", "/var/lib/husk") };
    }
    containerd_shim::run::<Shim>(
        RUNTIME,
        Some(Config {
            // The shim waits for its own children (the monitors); a
            // reaper of every child would take their statuses.
            no_reaper: true,
            // Nothing of the shim's double-forks.
            no_sub_reaper: true,
            ..Default::default()
        }),
    );
}
