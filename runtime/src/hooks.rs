//! The OCI spec's hooks, run on the host at the points the spec names
//! (docs/runtime.md, "Hooks"):
//!
//! - `createRuntime` and (deprecated) `prestart`: by the monitor once the
//!   container's VM is up and its process made, before `create` returns; a
//!   failure fails `create` and the container is removed.
//! - `poststart`: by `start`, after the process started; a failure is a
//!   warning (the spec: the lifecycle continues).
//! - `poststop`: by `delete`; a failure is a warning.
//!
//! `createContainer` and `startContainer` run in the container's mount
//! namespace, which is inside the guest, where host binaries do not exist:
//! a spec with them is refused at `create`, naming them.
//!
//! Each hook gets the container's state (the OCI state JSON) on stdin, its
//! own `args` (the first is its argv[0]) and `env` only, and is killed
//! after its `timeout`.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Hooks, Spec};

/// Hooks a spec has that husk cannot run, named.
pub fn refuse_guest_hooks(spec: &Spec) -> Result<(), String> {
    let Some(hooks) = spec.hooks() else {
        return Ok(());
    };
    for (name, list) in [
        ("createContainer", hooks.create_container()),
        ("startContainer", hooks.start_container()),
    ] {
        if list.as_ref().is_some_and(|l| !l.is_empty()) {
            return Err(format!(
                "hooks.{name}: these hooks run in the container's namespaces, which are in its VM, where host programs do not exist: not supported"
            ));
        }
    }
    Ok(())
}

/// Which hooks to run.
#[derive(Clone, Copy, Debug)]
pub enum Point {
    /// `createRuntime`, then `prestart`.
    Create,
    /// `poststart`.
    Poststart,
    /// `poststop`.
    Poststop,
}

fn hooks_at(hooks: &Hooks, point: Point) -> Vec<(&'static str, &Hook)> {
    let mut out: Vec<(&'static str, &Hook)> = Vec::new();
    match point {
        Point::Create => {
            #[allow(deprecated)]
            let prestart = hooks.prestart();
            for h in hooks.create_runtime().iter().flatten() {
                out.push(("createRuntime", h));
            }
            for h in prestart.iter().flatten() {
                out.push(("prestart", h));
            }
        }
        Point::Poststart => {
            for h in hooks.poststart().iter().flatten() {
                out.push(("poststart", h));
            }
        }
        Point::Poststop => {
            for h in hooks.poststop().iter().flatten() {
                out.push(("poststop", h));
            }
        }
    }
    out
}

/// Runs the spec's hooks of `point`, in order, each given `state` (the
/// OCI state JSON) on stdin; the first that fails stops them, and its
/// failure is returned, naming it.
pub fn run(spec: &Spec, point: Point, state: &str) -> Result<(), String> {
    run_these(spec.hooks().as_ref(), point, state)
}

/// Whether the spec has any hook at `point`.
pub fn any(spec: &Spec, point: Point) -> bool {
    spec.hooks()
        .as_ref()
        .is_some_and(|hooks| !hooks_at(hooks, point).is_empty())
}

/// [`run`] with the spec's hooks as recorded at `create` (the state's:
/// runc runs those, whatever the bundle holds by then).
pub fn run_these(
    hooks: Option<&oci_spec::runtime::Hooks>,
    point: Point,
    state: &str,
) -> Result<(), String> {
    let Some(hooks) = hooks else {
        return Ok(());
    };
    for (name, hook) in hooks_at(hooks, point) {
        run_one(name, hook, state)?;
    }
    Ok(())
}

fn run_one(name: &str, hook: &Hook, state: &str) -> Result<(), String> {
    let path = hook.path();
    let what = format!("{name} hook {}", path.display());
    let mut cmd = Command::new(path);
    if let Some(args) = hook.args() {
        if let Some((arg0, rest)) = args.split_first() {
            cmd.arg0(arg0).args(rest);
        }
    }
    cmd.env_clear()
        .envs(
            hook.env()
                .iter()
                .flatten()
                .filter_map(|kv| kv.split_once('=')),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    husk_sys::child::clean(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is not an error.
        let _ = stdin.write_all(state.as_bytes());
    }
    let limit = hook
        .timeout()
        .filter(|&t| t > 0)
        .map(|t| Duration::from_secs(t as u64));
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut said = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut said);
                }
                let said = said.trim();
                return Err(if said.is_empty() {
                    format!("{what} failed: {status}")
                } else {
                    format!("{what} failed: {status}: {said}")
                });
            }
            Ok(None) => {}
            Err(e) => return Err(format!("{what}: {e}")),
        }
        if limit.is_some_and(|l| start.elapsed() > l) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{what} did not finish within its timeout of {} s: killed",
                limit.unwrap_or_default().as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
