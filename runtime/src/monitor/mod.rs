//! The monitor: the host process that stands for a container's process
//! (or an exec'd one) on the host, as runc's init process does.
//!
//! `husk create` starts it detached (its own session) with the stdio it
//! was given, and hands it the container's state and checked bundle
//! ([`crate::handoff`]); it is the PID in `husk state`, in `--pid-file`,
//! and what containerd's shim waits for. For a container it restores the
//! VM (the VMM is its child and dies with it), makes the guest its own,
//! has the agent create the container, attaches the container's stdio,
//! answers "ready" to `create`, then waits for the container's process to
//! exit, records the status, powers the VM off and exits with that status.
//! For an exec it does the same around one process of a running
//! container. Stdio: [`stdio`].

mod stdio;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use husk_guest::binaries::Binaries;
use husk_guest::shape::Shape;
use husk_protocol::share::Share;
use husk_protocol::{Process, Request, Response};

use crate::bundle::Bundle;
use crate::handoff::{Channel, Restore};
use crate::sandbox::{Agent, Control, Sandbox, SandboxError};
use crate::state::{self, ContainerState, HostProcess, Status};
use crate::timings::Phases;
use stdio::Outputs;
pub use stdio::{Terminal, send_fd, stdin_is_null};

fn wait_status(control: &mut Control, id: &str, exec_id: &str) -> Result<i32, SandboxError> {
    let answer = control.ask(&Request::Wait {
        id: id.into(),
        exec_id: exec_id.into(),
    })?;
    exit_status(answer).map(|(status, _)| status)
}

/// [`wait_status`] of container `id`'s process, its output `streams`
/// copied meanwhile on this thread; with its OOM kills where the agent
/// sends them.
fn wait_status_pumping(
    control: &mut Control,
    id: &str,
    streams: &mut Vec<(std::os::unix::net::UnixStream, std::fs::File)>,
) -> Result<(i32, Option<u64>), SandboxError> {
    let wait = Request::Wait {
        id: id.into(),
        exec_id: String::new(),
    };
    exit_status(stdio::ask_pumping(control, &wait, streams)?)
}

fn exit_status(answer: Response) -> Result<(i32, Option<u64>), SandboxError> {
    match answer {
        Response::Exited { status, oom_kills } => Ok((status, oom_kills)),
        Response::Error { message } | Response::NotStarted { message, .. } => {
            Err(SandboxError::Refused(message))
        }
        other => Err(SandboxError::Refused(format!(
            "unexpected answer {other:?}"
        ))),
    }
}

/// How long a container's output may take to end after its exit report
/// for the stop and the drain to be recorded in one state write; output
/// still coming then is recorded stopped first, drained later.
const DRAIN_AT_ONCE: Duration = Duration::from_millis(20);

/// What the monitor of a container holds once it is set up.
struct Held {
    sandbox: Sandbox,
    control: Control,
    /// A terminal's copying threads.
    outputs: Outputs,
    /// The process's stdout and stderr streams, copied on the monitor's
    /// thread while it waits.
    streams: Vec<(std::os::unix::net::UnixStream, std::fs::File)>,
}

/// How a monitor's container begins.
#[derive(Clone, Copy)]
pub enum Begin<'a> {
    /// `create`: its process made, not started.
    Created,
    /// `run`: its process made and started, as `start` would.
    Started,
    /// `restore`: its VM restored from a checkpoint, its process running.
    Restored(&'a Restore),
}

/// Runs the monitor of the container `state` describes, from its checked
/// `bundle`, begun as `begin` says. Answers its starter on `channel`;
/// returns the container's exit status.
pub fn container(
    root: &Path,
    bins: &Binaries,
    state: ContainerState,
    bundle: &Bundle,
    begin: Begin<'_>,
    terminal: &Terminal,
    channel: Channel,
) -> i32 {
    let (restore, start) = match begin {
        Begin::Restored(restore) => (Some(restore), false),
        Begin::Started => (None, true),
        Begin::Created => (None, false),
    };
    let id = state.id.clone();
    let dir = state::dir(root, &id);
    if let Some(crate::pod::Pod::Member {
        root: pod_root,
        sandbox,
    }) = state.pod.clone()
    {
        return member(root, state, bundle, &pod_root, &sandbox, terminal, channel);
    }
    // A pod's sandbox: its VM is the pod's, and so is the pod share.
    let pod_dir = (state.pod == Some(crate::pod::Pod::Sandbox)).then(|| crate::pod::dir(&dir));
    let mut phases = Phases::new();
    // Its host cgroup, chosen and recorded by `create` ([`host_cgroup`]).
    let cgroup = state.cgroup.clone();
    let set = set_up(
        root,
        bins,
        state,
        bundle,
        (restore, start),
        terminal,
        &mut phases,
    );
    if set.is_err()
        && let Some(rel) = &cgroup
    {
        crate::cgroup::leave(rel);
    }
    let held = match set {
        Ok((held, None)) => {
            channel.report(&Ok(()));
            held
        }
        Ok((held, Some((message, status)))) => {
            // Its end is recorded below, as any process's.
            channel.report_not_started(&message, status);
            held
        }
        Err(e) => {
            if let Some(pod) = &pod_dir {
                crate::pod::remove(pod);
            }
            channel.report(&Err(e));
            return 1;
        }
    };
    let Held {
        mut sandbox,
        mut control,
        outputs,
        mut streams,
    } = held;
    let waited = wait_status_pumping(&mut control, &id, &mut streams);
    phases.mark("exited");
    let mut error = None;
    let mut oom_kills = None;
    let status = match waited {
        Ok((status, sent_oom_kills)) => {
            // Stopped now, at the exit report, as runc says once it reaped
            // the process. The output still in flight from the guest and
            // the last figures are the monitor's to finish (`drained`,
            // which `delete` and `events` wait for); the VM's own shutdown
            // (seconds of guest work where kernel mode is emulated) is not
            // the container's, and `delete` ends what is left of it.
            // Output that ends at once with the process (the usual case,
            // with the OOM kills sent along) is recorded with the stop in
            // one state write.
            let at_once = outputs.is_empty()
                && sent_oom_kills.is_some()
                && stdio::pump_within(&mut streams, Some(DRAIN_AT_ONCE));
            if !at_once {
                record_stopped(root, &id, (status, None, None), false, false);
            }
            phases.mark("stopped_recorded");
            stdio::pump(streams);
            for output in outputs {
                let _ = output.join();
            }
            // What the guest's OOM killer did, for `events` after the end
            // (asked for where an older agent did not send it).
            oom_kills = sent_oom_kills;
            if oom_kills.is_none()
                && let Ok(Response::Stats(stats)) = control.ask(&Request::Stats { id: id.clone() })
            {
                oom_kills = Some(stats.oom_kills);
            }
            let _ = std::io::stdout().flush();
            record_stopped(root, &id, (status, None, oom_kills), false, true);
            phases.mark("drained");
            let _ = control.send(&Request::Shutdown);
            let _ = sandbox.finish(Duration::from_secs(10));
            status
        }
        Err(_) if dir.join(crate::checkpoint::CHECKPOINTED).exists() => {
            // Ended by `checkpoint`: the container goes on from there.
            // The VMM is let finish (it removes its sockets as it exits)
            // before the container counts as stopped, so that a restore
            // under the same ID right after never has its new sockets
            // removed by the old VMM.
            let _ = sandbox.finish(Duration::from_secs(10));
            128 + libc::SIGKILL
        }
        Err(e) => {
            error = Some(crate::error_chain(&sandbox.explain(e)));
            // The container's process died with its VM: killed.
            128 + libc::SIGKILL
        }
    };
    phases.mark("vm_ended");
    phases.write();
    if let Some(pod) = &pod_dir {
        crate::pod::remove(pod);
    }
    // The VM's TAPs went with it: the namespace's interfaces are the
    // namespace's again.
    if let Some(net) = record_stopped(root, &id, (status, error, oom_kills), true, true) {
        drop(Unmirror(Some(net)));
    }
    status
}

/// `start` for `run`, in the monitor, on its own connection:
/// `Ok(Some(..))` where the process could not start (what the guest said,
/// and its status).
fn start_process(
    control: &mut Control,
    id: &str,
) -> Result<Option<crate::handoff::NotStarted>, String> {
    match control.ask(&Request::Start { id: id.into() }) {
        Ok(Response::Ok) => Ok(None),
        Ok(Response::NotStarted { message, status }) => Ok(Some((message, status))),
        Ok(Response::Error { message }) => Err(message),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(crate::error_chain(&e)),
    }
}

/// Records container `id` as stopped: its exit status, what ended it and
/// its OOM kills, and whether its output is all out (`drained`). With
/// `take_network` (the VM is gone) its network is taken out of the record
/// and returned, for the caller to undo; before, it stays for a `delete`
/// that ends the VM first. The state is reread: `start`, `pause` and
/// `resume` changed it meanwhile.
fn record_stopped(
    root: &Path,
    id: &str,
    (status, error, oom_kills): (i32, Option<String>, Option<u64>),
    take_network: bool,
    drained: bool,
) -> Option<crate::state::NetworkState> {
    let mut state = ContainerState::load(root, id).ok()?;
    let oom_kills = oom_kills.or(state.oom_kills);
    let network = if take_network {
        state.network.take()
    } else {
        None
    };
    // What is recorded already is not written again (the end of a VM
    // whose container drained and had no network, or a network with no
    // interface joined to the VM: nothing for `delete` to undo in it, so
    // its record may stay).
    let same = state.status == Status::Stopped
        && state.exit_status == Some(status)
        && state.error == error
        && state.oom_kills == oom_kills
        && state.drained == drained
        && network.as_ref().is_none_or(|n| n.links.is_empty());
    if !same {
        state.status = Status::Stopped;
        state.exit_status = Some(status);
        state.error = error;
        state.oom_kills = oom_kills;
        state.drained = drained;
        let _ = state.save(root);
    }
    network
}

/// The container's VM started (or restored), its process made, hooks
/// run, stdio attached, the VM placed in the container's cgroup, and the
/// state saved as `created` (or `running`, restored).
fn set_up(
    root: &Path,
    bins: &Binaries,
    mut state: ContainerState,
    bundle: &Bundle,
    (restore, start): (Option<&Restore>, bool),
    terminal: &Terminal,
    phases: &mut Phases,
) -> Result<(Held, Option<crate::handoff::NotStarted>), String> {
    let id = state.id.clone();
    // Its host cgroup, chosen and recorded by `create`, before it is
    // made: a monitor killed while it starts the VM leaves `delete` what
    // to remove.
    let cgroup = state.cgroup.clone();
    let cgroup = cgroup.as_deref();
    let dir = state::dir(root, &id);
    let new_netns = crate::network::mode(&bundle.spec) == crate::network::Mode::New;
    if new_netns {
        crate::network::unshare()
            .map_err(|e| format!("a network namespace for the container: {e}"))?;
    }
    let pod = state.pod == Some(crate::pod::Pod::Sandbox);
    let (mut sandbox, spec_json, shape, network) =
        boot(root, bins, &dir, bundle, restore, pod, cgroup)?;
    state.shape = Some(shape);
    let interfaces = match network {
        Some((netns, interfaces)) => {
            state.network = Some(crate::state::NetworkState {
                netns,
                links: interfaces.iter().map(|i| i.name.clone()).collect(),
            });
            interfaces
        }
        None => Vec::new(),
    };
    // Until the container is set up, a failure takes the redirection off.
    let mut unmirror = Unmirror(state.network.clone());
    phases.mark("vmm_started");
    let explain = |sandbox: &mut Sandbox, e: SandboxError| crate::error_chain(&sandbox.explain(e));
    let mut control = match sandbox.control() {
        Ok(c) => c,
        Err(e) => return Err(explain(&mut sandbox, e)),
    };
    phases.mark("agent_connected");
    let mut process = bundle.process();
    process.stdin_null = !process.terminal && stdin_is_null();
    // A restored checkpoint's process exists already: the guest only
    // needs fresh entropy and the host's clock.
    let made = control
        .expect_ok(&Request::Clone(crate::sandbox::clone_seed()))
        .and_then(|()| match interfaces.is_empty() {
            true => Ok(()),
            false => control.expect_ok(&Request::Network { interfaces }),
        })
        .and_then(|()| match restore {
            Some(_) => Ok(()),
            None => control.expect_ok(&Request::Create {
                id: id.clone(),
                spec: spec_json,
                process: process.clone(),
                root: None,
                join: None,
            }),
        });
    if let Err(e) = made {
        return Err(explain(&mut sandbox, e));
    }
    phases.mark("created");
    // A pod's port forwarding: CRI dials the port in the pod's namespace
    // on the host, and the forwarder there takes it to the guest.
    if pod && let Some(net) = &state.network {
        crate::portforward::start(&net.netns, Agent::at(&dir))?;
    }
    // createRuntime and prestart hooks: the VM is up and the process
    // made; a failure fails `create`. A restored container ran them when
    // it was made.
    if restore.is_none() {
        let mut oci = state.oci_state();
        oci["status"] = "creating".into();
        oci["pid"] = std::process::id().into();
        crate::hooks::run(&bundle.spec, crate::hooks::Point::Create, &oci.to_string())?;
        // What the hooks put in the container's new namespace (docker's
        // veth) goes to the guest now. Without hooks nothing can be there
        // yet (its PID is nobody's but this process's), and `start` looks
        // anyway.
        if new_netns {
            let pid = std::process::id();
            let late = match crate::hooks::any(&bundle.spec, crate::hooks::Point::Create) {
                true => crate::network::into_vm(&dir, &mut control, pid, NEW_NAMESPACE_SLOTS)?,
                false => None,
            };
            unmirror.0.clone_from(&late);
            // Nothing there yet: `start` looks again (`ctr run --cni`).
            state.network = Some(late.unwrap_or_else(|| crate::state::NetworkState {
                netns: crate::network::netns_of(pid),
                links: Vec::new(),
            }));
        }
    }
    let terminal = if process.terminal {
        terminal.clone()
    } else {
        Terminal::None
    };
    let mut streams = Vec::new();
    let outputs = stdio::attach_stdio(
        &Agent::at(&dir),
        &id,
        "",
        process.stdin_null,
        &terminal,
        stdio::resizer(dir.clone(), id.clone(), String::new()),
        Some(&mut streams),
    )
    .map_err(|e| e.to_string())?;
    // `run`: the process starts now, on this connection, and the state
    // is written once, `running`.
    let not_started = match start {
        true => start_process(&mut control, &id)?,
        false => None,
    };
    let running = restore.is_some() || (start && not_started.is_none());
    state.status = match running {
        true => Status::Running,
        false => Status::Created,
    };
    state.monitor = HostProcess::of(std::process::id());
    state.vmm = sandbox.vmm_pid().and_then(HostProcess::of);
    state.save(root).map_err(|e| e.to_string())?;
    unmirror.0 = None;
    // The spec: a failed poststart hook is a warning; the container runs
    // on.
    if start && running && state.hooks.is_some() {
        let oci = state.oci_state().to_string();
        if let Err(e) =
            crate::hooks::run_these(state.hooks.as_ref(), crate::hooks::Point::Poststart, &oci)
        {
            eprintln!("husk: warning: {e}");
        }
    }
    Ok((
        Held {
            sandbox,
            control,
            outputs,
            streams,
        },
        not_started,
    ))
}

/// Takes a mirrored network's redirection off when dropped (unless its
/// state was taken back).
struct Unmirror(Option<crate::state::NetworkState>);

impl Drop for Unmirror {
    fn drop(&mut self) {
        if let Some(net) = self.0.take() {
            crate::network::unmirror(&net.netns, &net.links);
        }
    }
}

/// The container's VM: its shares (the root and the volumes), its shape,
/// started or restored. Returns it with the spec the agent gets (volumes
/// rewritten to their shares) and the shape.
/// A started VM: the sandbox, the spec JSON for the agent, the VM's size,
/// and the mirrored network (the namespace and its interfaces).
type Booted = (
    Sandbox,
    String,
    Shape,
    Option<(std::path::PathBuf, Vec<husk_protocol::NetInterface>)>,
);

fn boot(
    root: &Path,
    bins: &Binaries,
    dir: &Path,
    bundle: &Bundle,
    restore: Option<&Restore>,
    pod: bool,
    cgroup: Option<&Path>,
) -> Result<Booted, String> {
    // Unused volume slots are bound, read-only, to one empty directory
    // every container of this root shares (read-only to all, made once):
    // not one per container, made and removed each time (issue 18).
    let empty = root.join("empty");
    if !empty.is_dir() {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new().mode(0o555).create(&empty) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(format!("create {}: {e}", empty.display()));
            }
            _ => {}
        }
    }
    let (spec_json, mut volumes) = crate::volumes::plan(&bundle.spec_json, dir, &empty)?;
    if pod {
        // The last volume share carries the pod's containers.
        let share = volumes
            .iter_mut()
            .find(|s| s.tag == crate::pod::POD_TAG)
            .filter(|s| s.dir == empty)
            .ok_or_else(|| {
                format!(
                    "a pod's sandbox binds at most {} host directories: the last volume share is the pod's",
                    husk_protocol::VOLUME_TAGS.len() - 1
                )
            })?;
        share.dir = crate::pod::make(&crate::pod::dir(dir))?;
        share.read_only = false;
    }
    crate::volumes::make_mount_points(&bundle.spec, &bundle.rootfs);
    let mut shares = vec![Share {
        tag: husk_protocol::ROOTFS_TAG.into(),
        dir: bundle.rootfs.clone(),
        read_only: bundle.readonly,
    }];
    shares.extend(volumes);
    // A pod's VM holds all its containers: sized for the pod's limits.
    let pod_resources = match pod {
        true => crate::pod::sandbox_resources(
            bundle
                .spec
                .annotations()
                .as_ref()
                .unwrap_or(&Default::default()),
        )?,
        false => None,
    };
    let shape = match restore {
        Some(r) => r.shape,
        None => Shape::of(pod_resources.as_ref().or(resources(bundle)))?,
    };
    // The spec's network namespace, mirrored into the guest
    // (docs/networking.md); the container then runs in the guest's own.
    let mode = crate::network::mode(&bundle.spec);
    // `set_up` made this process's network namespace for the container.
    let container_netns = mode == crate::network::Mode::New;
    // A restored checkpoint's guest has its interfaces configured already
    // and as many slots as it was made with; its TAPs are made again (the
    // old ones went with the old VMM) and the agent is told again.
    let mirror = match &mode {
        crate::network::Mode::Path(path) => {
            Some(crate::network::mirror(path).map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    // A new namespace's interfaces come later (after the hooks, or before
    // `start`): its guest has every slot, unbound for now.
    let nets = match (&mode, &mirror) {
        (crate::network::Mode::New, _) if restore.is_none() => NEW_NAMESPACE_SLOTS,
        // One warm snapshot per count: one interface, the common case,
        // shares the new namespace's.
        (_, Some(m)) => m.taps.len() as u8,
        _ => 0,
    };
    let spec_json = match mode {
        crate::network::Mode::Host => spec_json,
        _ if restore.is_some() => spec_json,
        _ => crate::network::without_network_namespace(&spec_json)?,
    };
    let snapshot = restore.map(|r| r.snapshot.as_path());
    let taps = mirror.as_ref().map_or(&[][..], |m| &m.taps[..]);
    let nets = crate::sandbox::Nets {
        taps,
        slots: nets,
        container_netns,
    };
    // The monitor joins the VM's host cgroup, with the VM's bounds, so
    // that the VMM is born in it.
    let entered = match cgroup {
        Some(rel) => crate::cgroup::Bounds::of(shape)
            .with_spec(resources(bundle))
            .and_then(|bounds| crate::cgroup::enter(rel, &bounds)),
        None => Ok(()),
    };
    let started = entered.and_then(|()| {
        Sandbox::start(root, bins, dir, &shares, shape, snapshot, nets).map_err(|e| e.to_string())
    });
    let sandbox = match started {
        Ok(sandbox) => sandbox,
        Err(e) => {
            if let Some(m) = &mirror {
                let links: Vec<String> = m.interfaces.iter().map(|i| i.name.clone()).collect();
                crate::network::unmirror(&m.path, &links);
            }
            return Err(e);
        }
    };
    let network = mirror.map(|m| (m.path, m.interfaces));
    Ok((sandbox, spec_json, shape, network))
}

/// The spec a container of a pod is made with in its sandbox's guest,
/// and the namespaces it joins there: its network is the guest's (the
/// pod's), and the IPC, UTS and PID namespaces its spec names by path
/// must be its sandbox's (`/proc/<sandbox's PID>/ns/<type>`, as CRI names
/// them), which it joins in the guest.
fn member_spec(
    spec_json: &str,
    sandbox: &str,
    sandbox_pid: Option<u32>,
) -> Result<(String, Option<husk_protocol::Join>), String> {
    let mut spec: serde_json::Value =
        serde_json::from_str(spec_json).map_err(|e| format!("the spec: {e}"))?;
    let mut joined = Vec::new();
    if let Some(list) = spec["linux"]["namespaces"].as_array_mut() {
        let mut kept = Vec::new();
        for ns in list.drain(..) {
            let kind = ns["type"].as_str().unwrap_or_default().to_owned();
            let path = ns["path"].as_str().filter(|p| !p.is_empty());
            match (kind.as_str(), path) {
                ("network", _) => {}
                ("ipc" | "uts" | "pid", Some(path)) => {
                    let want = sandbox_pid.map(|pid| format!("/proc/{pid}/ns/{kind}"));
                    if want.as_deref() != Some(path) {
                        return Err(format!(
                            "joining the {kind} namespace at {path} is not possible: a container of pod {sandbox} can join only its sandbox's ({})",
                            want.unwrap_or_else(|| "not running".into())
                        ));
                    }
                    joined.push(kind);
                }
                (_, Some(path)) => {
                    return Err(format!(
                        "joining the {kind} namespace at {path} is not possible: a container of a pod joins only its sandbox's ipc, uts and pid namespaces"
                    ));
                }
                _ => kept.push(ns),
            }
        }
        *list = kept;
    }
    let json = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
    let join = (!joined.is_empty()).then(|| husk_protocol::Join {
        container: sandbox.to_owned(),
        namespaces: joined,
    });
    Ok((json, join))
}

/// Runs the monitor of a container made in the VM of its pod's sandbox
/// `sandbox` (whose state is under `pod_root`): as [`container`] does,
/// without a VM of its own; at its end the container is removed from the
/// guest and its binds from the pod share.
fn member(
    root: &Path,
    mut state: ContainerState,
    bundle: &Bundle,
    pod_root: &Path,
    sandbox: &str,
    terminal: &Terminal,
    channel: Channel,
) -> i32 {
    let id = state.id.clone();
    let sandbox_dir = state::dir(pod_root, sandbox);
    let pod_dir = crate::pod::dir(&sandbox_dir);
    let (mut control, outputs) =
        match member_set_up(root, &mut state, bundle, pod_root, sandbox, terminal) {
            Ok(held) => {
                channel.report(&Ok(()));
                held
            }
            Err(e) => {
                crate::pod::remove_member(&pod_dir, &id);
                channel.report(&Err(e));
                return 1;
            }
        };
    let (status, error) = match wait_status(&mut control, &id, "") {
        Ok(status) => {
            for output in outputs {
                let _ = output.join();
            }
            (status, None)
        }
        // The pod's VM ended under it: killed.
        Err(e) => (128 + libc::SIGKILL, Some(crate::error_chain(&e))),
    };
    let mut oom_kills = None;
    if let Ok(Response::Stats(stats)) = control.ask(&Request::Stats { id: id.clone() }) {
        oom_kills = Some(stats.oom_kills);
    }
    let _ = control.ask(&Request::Remove { id: id.clone() });
    crate::pod::remove_member(&pod_dir, &id);
    if let Ok(mut state) = ContainerState::load(root, &id) {
        state.status = Status::Stopped;
        state.exit_status = Some(status);
        state.error = error;
        state.oom_kills = oom_kills;
        state.drained = true;
        let _ = state.save(root);
    }
    status
}

fn member_set_up(
    root: &Path,
    state: &mut ContainerState,
    bundle: &Bundle,
    pod_root: &Path,
    sandbox: &str,
    terminal: &Terminal,
) -> Result<(Control, stdio::Outputs), String> {
    let id = state.id.clone();
    let dir = state::dir(root, &id);
    let pod_state = ContainerState::load(pod_root, sandbox)
        .map_err(|e| format!("pod sandbox {sandbox}: {e}"))?;
    if pod_state.pod != Some(crate::pod::Pod::Sandbox)
        || !matches!(pod_state.status(), Status::Created | Status::Running)
    {
        return Err(format!(
            "{sandbox} is not a running pod sandbox (it is {})",
            pod_state.status()
        ));
    }
    let sandbox_dir = state::dir(pod_root, sandbox);
    // Requests for this container (start, kill, exec) go to the pod's
    // agent.
    let sockets = crate::sandbox::vm_dir(&dir);
    husk_sys::private::dir(&sockets).map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink(
        crate::sandbox::vm_dir(&sandbox_dir).join(crate::sandbox::VSOCK_SOCKET),
        sockets.join(crate::sandbox::VSOCK_SOCKET),
    )
    .map_err(|e| format!("link the pod's agent socket: {e}"))?;
    // Its limits are enforced in its guest cgroup; the pod's VM must hold
    // them.
    let shape = pod_state.shape.unwrap_or_default();
    if let Some(limit) = resources(bundle)
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|&l| l > 0)
        && limit as u64 > shape.memory_limit_max()
    {
        return Err(format!(
            "container {id}'s memory limit of {limit} bytes does not fit pod {sandbox}'s VM: it has {} MiB, so at most {} bytes for a container (size the pod with its resources)",
            shape.memory_mib,
            shape.memory_limit_max()
        ));
    }
    let (spec_json, join) =
        member_spec(&bundle.spec_json, sandbox, pod_state.monitor.map(|m| m.pid))?;
    crate::volumes::make_mount_points(&bundle.spec, &bundle.rootfs);
    let (guest_root, spec_json) = crate::pod::add_member(
        &crate::pod::dir(&sandbox_dir),
        &id,
        &bundle.rootfs,
        bundle.readonly,
        &spec_json,
    )?;
    let agent = Agent::at(&sandbox_dir);
    let mut control = agent.control().map_err(|e| crate::error_chain(&e))?;
    let mut process = bundle.process();
    process.stdin_null = !process.terminal && stdin_is_null();
    control
        .expect_ok(&Request::Create {
            id: id.clone(),
            spec: spec_json,
            process: process.clone(),
            root: Some(guest_root),
            join,
        })
        .map_err(|e| crate::error_chain(&e))?;
    let made = (|| {
        let mut oci = state.oci_state();
        oci["status"] = "creating".into();
        oci["pid"] = std::process::id().into();
        crate::hooks::run(&bundle.spec, crate::hooks::Point::Create, &oci.to_string())?;
        let terminal = if process.terminal {
            terminal.clone()
        } else {
            Terminal::None
        };
        let outputs = stdio::attach_stdio(
            &agent,
            &id,
            "",
            process.stdin_null,
            &terminal,
            stdio::resizer(sandbox_dir.clone(), id.clone(), String::new()),
            None,
        )
        .map_err(|e| e.to_string())?;
        state.status = Status::Created;
        state.monitor = HostProcess::of(std::process::id());
        state.vmm = None;
        state.shape = pod_state.shape;
        state.save(root).map_err(|e| e.to_string())?;
        Ok(outputs)
    })();
    match made {
        Ok(outputs) => Ok((control, outputs)),
        Err(e) => {
            let _ = control.ask(&Request::Remove { id });
            Err(e)
        }
    }
}

/// Network slots of the guest of a container whose spec asks for a new
/// network namespace: one, as docker's bridge and `ctr run --cni` give
/// (each slot costs every such start a device, docs/networking.md).
pub(crate) const NEW_NAMESPACE_SLOTS: u8 = 1;

fn resources(bundle: &Bundle) -> Option<&oci_spec::runtime::LinuxResources> {
    bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
}

/// The VM's host cgroup (docs/runtime.md, "cgroups"): the spec's
/// `cgroupsPath`, or `husk/<id>`; none for a monitor that is not root
/// and was not given one.
pub(crate) fn host_cgroup(bundle: &Bundle, id: &str) -> Result<Option<std::path::PathBuf>, String> {
    let named = bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().into_owned());
    if named.is_none() && !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    crate::cgroup::of(named.as_deref(), id).map(Some)
}

/// A process exec'd into running container `id`, run by this process (a
/// foreground `husk exec`): a failure to start is printed.
pub fn exec_in_process(
    root: &Path,
    id: &str,
    exec_id: &str,
    process: Process,
    terminal: &Terminal,
) -> i32 {
    run_exec(root, id, exec_id, process, terminal, None)
}

/// Runs the monitor of process `exec_id` in running container `id`,
/// answering its starter on `channel`; returns the process's exit status.
pub fn exec(
    root: &Path,
    id: &str,
    exec_id: &str,
    process: Process,
    terminal: &Terminal,
    channel: Channel,
) -> i32 {
    run_exec(root, id, exec_id, process, terminal, Some(channel))
}

fn run_exec(
    root: &Path,
    id: &str,
    exec_id: &str,
    mut process: Process,
    terminal: &Terminal,
    channel: Option<Channel>,
) -> i32 {
    process.stdin_null = !process.terminal && stdin_is_null();
    let dir = state::dir(root, id);
    let agent = Agent::at(&dir);
    let mut inline = Vec::new();
    let in_process = channel.is_none();
    // A foreground exec with no terminal and no input has its output and
    // exit status sent on the control connection: no stdio connection.
    let inline_output = in_process && !process.terminal && process.stdin_null;
    let set_up = (|| -> Result<(Control, Option<Outputs>), (String, i32)> {
        let fail = |e: SandboxError| (crate::error_chain(&e), 1);
        let mut control = agent.control_pipelined().map_err(fail)?;
        match control
            .ask(&Request::Exec {
                id: id.into(),
                exec_id: exec_id.into(),
                process: process.clone(),
                inline_output,
            })
            .map_err(fail)?
        {
            Response::OutputFollows if inline_output => return Ok((control, None)),
            Response::Ok => {}
            Response::NotStarted { message, status } => return Err((message, status)),
            Response::Error { message } => return Err((message, 1)),
            other => return Err((format!("unexpected answer {other:?}"), 1)),
        }
        let terminal = if process.terminal {
            terminal.clone()
        } else {
            Terminal::None
        };
        let outputs = stdio::attach_stdio(
            &agent,
            id,
            exec_id,
            process.stdin_null,
            &terminal,
            stdio::resizer(dir.clone(), id.to_owned(), exec_id.to_owned()),
            // In the foreground (`husk exec` is the monitor), output is
            // copied by this thread: no thread per stream for a short exec.
            in_process.then_some(&mut inline),
        )
        .map_err(fail)?;
        Ok((control, Some(outputs)))
    })();
    let (mut control, outputs) = match (set_up, channel) {
        (Ok(parts), channel) => {
            if let Some(channel) = channel {
                channel.report(&Ok(()));
            }
            parts
        }
        (Err((message, status)), Some(channel)) => {
            channel.report(&Err(message));
            return status;
        }
        (Err((message, status)), None) => {
            eprintln!("husk: {}", message.trim());
            return status;
        }
    };
    let Some(outputs) = outputs else {
        return stdio::receive_inline(&mut control).unwrap_or(128 + libc::SIGKILL);
    };
    stdio::pump(inline);
    let status = wait_status(&mut control, id, exec_id).unwrap_or(128 + libc::SIGKILL);
    for output in outputs {
        let _ = output.join();
    }
    let _ = std::io::stdout().flush();
    status
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::state::NetworkState;

    /// The VM's end rewrites the state only where it changes something:
    /// a network with interfaces joined to the VM is taken out of the
    /// record; one with none stays, unwritten (issue 18: one state write
    /// fewer per `husk run` in a new network namespace).
    #[test]
    fn the_vms_end_writes_the_state_only_for_what_it_changes() {
        let root = std::env::temp_dir().join(format!("husk-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let state = |id: &str, links: Vec<String>| ContainerState {
            id: id.into(),
            bundle: "/b".into(),
            status: Status::Stopped,
            created: crate::state::now_rfc3339(),
            monitor: None,
            vmm: None,
            exit_status: Some(3),
            annotations: HashMap::new(),
            error: None,
            process: None,
            cgroup: None,
            shape: None,
            oom_kills: Some(0),
            drained: true,
            hooks: None,
            network: Some(NetworkState {
                netns: "/proc/1/ns/net".into(),
                links,
            }),
            pod: None,
        };
        let inode = |id: &str| {
            std::fs::metadata(state::dir(&root, id).join("state.json"))
                .unwrap()
                .ino()
        };
        for (id, links) in [("bare", vec![]), ("joined", vec!["eth0".to_string()])] {
            std::fs::create_dir_all(state::dir(&root, id)).unwrap();
            state(id, links).save(&root).unwrap();
        }
        let before = inode("bare");
        let taken = record_stopped(&root, "bare", (3, None, None), true, true);
        assert_eq!(taken.map(|n| n.links), Some(vec![]));
        assert_eq!(inode("bare"), before, "rewritten for nothing");
        let kept = ContainerState::load(&root, "bare").unwrap();
        assert_eq!((kept.exit_status, kept.drained), (Some(3), true));

        let before = inode("joined");
        let taken = record_stopped(&root, "joined", (3, None, None), true, true);
        assert_eq!(taken.map(|n| n.links), Some(vec!["eth0".to_string()]));
        assert_ne!(inode("joined"), before);
        assert!(
            ContainerState::load(&root, "joined")
                .unwrap()
                .network
                .is_none()
        );
        // A changed status is written, network or not.
        let taken = record_stopped(&root, "bare", (4, None, None), true, true);
        assert!(taken.is_some());
        assert_eq!(
            ContainerState::load(&root, "bare").unwrap().exit_status,
            Some(4)
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
