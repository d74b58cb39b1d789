//! TCP forwards into the guest (a pod's port forwarding): a host
//! connection to [`husk_protocol::FORWARD_PORT`] names a port with a
//! `Forward` frame; the agent connects to it on the guest's loopback, the
//! network namespace every container of the guest shares, answers `Ok`
//! or what failed, and copies bytes both ways until both have ended.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, TcpStream};

use husk_protocol::{Forward, Response, read_frame, write_frame};

/// Serves one forward connection.
pub(crate) fn serve(mut conn: File) {
    let Ok(Forward { port }) = read_frame::<_, Forward>(&mut conn) else {
        return;
    };
    let tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .or_else(|_| TcpStream::connect((Ipv6Addr::LOCALHOST, port)));
    let tcp = match tcp {
        Ok(tcp) => tcp,
        Err(e) => {
            let message = format!("port {port} on the guest's loopback: {e}");
            let _ = write_frame(&mut conn, &Response::Error { message });
            return;
        }
    };
    if write_frame(&mut conn, &Response::Ok).is_err() {
        return;
    }
    let (Ok(host_in), Ok(tcp_out)) = (conn.try_clone(), tcp.try_clone()) else {
        return;
    };
    // Host to guest on a thread of its own; each direction's end is
    // passed on as a half-close, so a client that shuts its side still
    // gets the answer.
    let inbound = std::thread::spawn(move || {
        let _ = std::io::copy(&mut &host_in, &mut &tcp_out);
        let _ = tcp_out.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut &tcp, &mut &conn);
    let _ = rustix::net::shutdown(&conn, rustix::net::Shutdown::Write);
    let _ = inbound.join();
}
