//! Port forwarding into a pod's VM: what CRI's `PortForward` (`kubectl
//! port-forward`, `crictl port-forward`) reaches.
//!
//! containerd dials `localhost:PORT` from inside the pod's network
//! namespace on the host. That namespace's loopback is the host side's;
//! the pod's listeners are on the guest's. So the sandbox's monitor
//! listens on one port of the namespace's loopback and has the
//! namespace's nat table redirect every other TCP connection it makes to
//! 127.0.0.1 there (iptables `REDIRECT` in `OUTPUT`, which sees only what
//! the namespace itself sends). For each connection it reads the port
//! that was dialled (`SO_ORIGINAL_DST`) and opens a forward to the agent
//! (`husk_protocol::FORWARD_PORT`), which connects to that port on the
//! guest's loopback; bytes are then copied both ways. A port nobody
//! listens on in the guest ends the connection at once, as a refused
//! connect would. The rule lives in the pod's namespace and goes with
//! it.

use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::Path;

use crate::sandbox::Agent;

/// Starts forwarding the connections made to 127.0.0.1 in the network
/// namespace at `netns` to the guest of `agent`; returns the port the
/// forwarder listens on there. The forwarder's threads live as long as
/// the process.
pub fn start(netns: &Path, agent: Agent) -> Result<u16, String> {
    let ns = husk_sys::net::open_netns(netns)
        .map_err(|e| format!("port forwarding: {}: {e}", netns.display()))?;
    // Made from a thread in the namespace: the socket stays there.
    let listener =
        crate::network::on_thread_in(&ns, || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .map_err(|e| format!("port forwarding: a listener in {}: {e}", netns.display()))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("port forwarding: {e}"))?
        .port();
    let port_text = port.to_string();
    crate::network::in_netns(
        &ns,
        "iptables",
        &[
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-o",
            "lo",
            "-d",
            "127.0.0.1/32",
            "-p",
            "tcp",
            "!",
            "--dport",
            &port_text,
            "-j",
            "REDIRECT",
            "--to-ports",
            &port_text,
        ],
        None,
    )
    .map_err(|e| format!("port forwarding: {e}"))?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let agent = agent.clone();
            std::thread::spawn(move || serve(conn, port, &agent));
        }
    });
    Ok(port)
}

/// One redirected connection: to the port it was made to, in the guest.
fn serve(conn: TcpStream, own: u16, agent: &Agent) {
    let Ok(dialled) = rustix::net::sockopt::ip_original_dst(&conn) else {
        return;
    };
    // Made to the forwarder itself, unredirected: nothing to forward.
    if dialled.port() == own {
        return;
    }
    let Ok(guest) = agent.forward(dialled.port()) else {
        return;
    };
    let (Ok(conn_in), Ok(guest_out)) = (conn.try_clone(), guest.try_clone()) else {
        return;
    };
    let inbound = std::thread::spawn(move || {
        let _ = std::io::copy(&mut &conn_in, &mut &guest_out);
        let _ = guest_out.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut &guest, &mut &conn);
    let _ = conn.shutdown(Shutdown::Write);
    let _ = inbound.join();
}
