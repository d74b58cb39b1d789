//! husk-agent: PID 1 of a Husk guest.
//!
//! It mounts /proc, /sys, /dev and /dev/pts, listens on vsock for the
//! runtime ([`husk_protocol::CONTROL_PORT`] for requests, [`STDIO_PORT`] for
//! stdio streams), and runs containers: `create` mounts the container's root
//! filesystem from the virtio-fs share [`husk_protocol::ROOTFS_TAG`] and
//! turns the OCI spec into a start plan (`container.rs`); `start` forks the
//! container's process, which builds its namespaces and mount tree, pivots
//! into its root and takes its identity before exec (`setup.rs`); `exec`
//! runs further processes inside the same namespaces. The agent reaps every
//! process (orphans included: it is PID 1), reports exit statuses as a shell
//! does (128 + N for a signal), and powers the guest off when told to.
//!
//! The agent never comes from a container image: the runtime packs it into
//! the initramfs.
//!
//! This file is init (leaving the initramfs root, the mounts, the reaper's
//! signal) and the accept loops. Requests are answered in `server.rs`,
//! processes are spawned, reaped and waited for in `processes.rs`, their
//! stdio is made and served in `stdio.rs`, a restored guest is reseeded
//! in `reseed.rs`, and the guest's network is configured in `net.rs`.

mod cgroup;
mod container;
mod forward;
mod net;
mod processes;
mod reseed;
mod seccomp;
mod server;
mod setup;
mod stdio;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use husk_protocol::{
    CONTROL_PORT, FORWARD_PORT, READY_PORT, Request, Response, STDIO_PORT, handshake, read_frame,
    vsock, write_frame,
};

use server::Agent;

fn log(line: &str) {
    eprintln!("husk-agent: {line}");
}

fn mount(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let flags = rustix::mount::MountFlags::empty();
    if let Err(e) = rustix::mount::mount(source, target, fstype, flags, None) {
        log(&format!(
            "cannot mount {fstype} on {target}: {}",
            std::io::Error::from(e)
        ));
    }
}

fn serve_control(mut conn: File, agent: Arc<Agent>) {
    if let Err(e) = handshake(&mut conn, concat!("husk-agent ", env!("CARGO_PKG_VERSION"))) {
        log(&format!("control connection refused: {e}"));
        return;
    }
    while let Ok(request) = read_frame::<_, Request>(&mut conn) {
        // An exec with no terminal and no input may have its output and
        // exit status sent on this connection (husk_protocol's `Output`).
        let inline = match &request {
            Request::Exec {
                id,
                exec_id,
                process,
                inline_output: true,
            } if !process.terminal && process.stdin_null => Some((id.clone(), exec_id.clone())),
            _ => None,
        };
        let mut response = agent.handle(request);
        let inline = inline.filter(|_| response == Response::Ok);
        if inline.is_some() {
            response = Response::OutputFollows;
        }
        if write_frame(&mut conn, &response).is_err() {
            return;
        }
        if let Some((id, exec_id)) = inline
            && !stdio::send_inline(&conn, &agent.processes, &id, &exec_id)
        {
            return;
        }
    }
}

/// Tells the VMM the agent is ready: a connection to the host's ready
/// port, which the VMM answers with a reset (and may snapshot the guest
/// right there: a restored agent continues from this call).
fn signal_ready() {
    // Refused by design; only the attempt matters.
    let _ = vsock::connect(vsock::HOST_CID, READY_PORT);
}

fn listen_forever(listener: OwnedFd, port: u32, agent: Arc<Agent>, serve: fn(File, Arc<Agent>)) {
    loop {
        match vsock::accept(&listener) {
            Ok(conn) => {
                let agent = agent.clone();
                std::thread::spawn(move || serve(conn, agent));
            }
            Err(e) => log(&format!("accept on port {port}: {e}")),
        }
    }
}

/// Moves the agent's root from the initramfs (the kernel's rootfs, which
/// pivot_root cannot leave) to a bind mount of it, so that a container's
/// process can pivot_root into its own root and detach the guest's.
fn leave_rootfs() -> std::io::Result<()> {
    let _ = std::fs::create_dir("/.root");
    // Every step is taken, in order, before the first failure is reported.
    for (r, what) in [
        (rustix::mount::mount_bind(c"/", c"/.root"), "bind"),
        (rustix::process::chdir(c"/.root"), "chdir"),
        (rustix::mount::mount_move(c".", c"/"), "move"),
        (rustix::process::chroot(c"."), "chroot"),
        (rustix::process::chdir(c"/"), "chdir"),
    ] {
        if let Err(e) = r {
            let e = std::io::Error::from(e);
            return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
        }
    }
    Ok(())
}

fn main() {
    if std::process::id() == 1 {
        if let Err(e) = leave_rootfs() {
            log(&format!("cannot leave the initramfs root: {e}"));
        }
        mount("proc", "/proc", "proc");
        mount("sysfs", "/sys", "sysfs");
        if let Err(e) = cgroup::init() {
            log(&format!("no cgroups for containers: {e}"));
        }
        mount("devtmpfs", "/dev", "devtmpfs");
        mount("devpts", "/dev/pts", "devpts");
        mount("tmpfs", "/run", "tmpfs");
        // Before the ready signal: the warm snapshot has it up.
        if let Err(e) = net::loopback_up() {
            log(&format!("no loopback: {e}"));
        }
    }
    let agent = Arc::new(Agent::default());
    match processes::sigchld_fd() {
        Ok(signals) => {
            let agent = agent.clone();
            std::thread::spawn(move || agent.processes.reap_forever(signals));
        }
        Err(e) => log(&format!("cannot watch for exited processes: {e}")),
    }
    let listening = (
        vsock::listen(CONTROL_PORT),
        vsock::listen(STDIO_PORT),
        vsock::listen(FORWARD_PORT),
    );
    let (control, stdio, forwards) = match listening {
        (Ok(c), Ok(s), Ok(f)) => (c, s, f),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            log(&format!("cannot listen on vsock: {e}"));
            return;
        }
    };
    {
        let agent = agent.clone();
        std::thread::spawn(move || {
            listen_forever(forwards, FORWARD_PORT, agent, |conn, _| {
                forward::serve(conn)
            })
        });
    }
    let stdio = {
        let agent = agent.clone();
        std::thread::spawn(move || {
            listen_forever(stdio, STDIO_PORT, agent, |conn, agent| {
                stdio::serve_stdio(conn, &agent.processes)
            })
        })
    };
    log(&format!(
        "listening on vsock ports {CONTROL_PORT}, {STDIO_PORT} and {FORWARD_PORT}"
    ));
    signal_ready();
    listen_forever(control, CONTROL_PORT, agent, serve_control);
    let _ = stdio.join();
}
