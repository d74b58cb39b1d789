//! The VMM's side of its control socket, whose messages are
//! [`husk_protocol::api`]'s: one JSON object per line each way. The
//! transport is here; requests reach the VM's owner as [`ApiRequest`]
//! values with a channel for the answer, as Firecracker's `VmmAction`s do.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Sender, channel};

pub use husk_protocol::api::{ApiRequest, ApiResponse};
use thiserror::Error;

/// Errors setting up the socket.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The socket path is taken or cannot be bound.
    #[error("cannot listen on API socket {}", .0.display())]
    Bind(PathBuf, #[source] std::io::Error),
    /// The listener thread could not start.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// A request with the way back to its connection.
pub type ApiCall = (ApiRequest, Sender<ApiResponse>);

/// Listens on `path` on a thread `husk-api`, handing each request to `send`.
/// The socket file is the caller's to remove ([`remove_socket`]).
pub fn serve(path: &Path, send: impl Fn(ApiCall) + Send + 'static) -> Result<(), ApiError> {
    let listener = UnixListener::bind(path).map_err(|e| ApiError::Bind(path.to_owned(), e))?;
    std::thread::Builder::new()
        .name("husk-api".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::Thread::Api);
            for stream in listener.incoming().flatten() {
                handle(stream, &send);
            }
        })
        .map_err(ApiError::Thread)?;
    Ok(())
}

fn handle(stream: UnixStream, send: &impl Fn(ApiCall)) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let response = match serde_json::from_str::<ApiRequest>(&line) {
            Err(e) => ApiResponse::error(format!("bad request: {e}")),
            Ok(ApiRequest::Stop) => {
                // Answer first: the process ends as soon as the owner
                // sees the request.
                let _ = out.write_all(b"{\"ok\":true}\n");
                let (tx, _rx) = channel();
                send((ApiRequest::Stop, tx));
                return;
            }
            Ok(request) => {
                let (tx, rx) = channel();
                send((request, tx));
                rx.recv()
                    .unwrap_or_else(|_| ApiResponse::error("the VM is gone"))
            }
        };
        let mut text = serde_json::to_string(&response).expect("response serializes");
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

/// Removes the socket file (at exit).
pub fn remove_socket(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_reach_the_owner_and_answers_come_back() {
        let path = std::env::temp_dir().join(format!("husk-api-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        serve(&path, |(req, reply): ApiCall| {
            let _ = reply.send(match req {
                ApiRequest::Pause => ApiResponse::ok(),
                _ => ApiResponse::error("not now"),
            });
        })
        .unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        let mut lines = BufReader::new(stream.try_clone().unwrap()).lines();
        let mut w = stream;
        for (req, want) in [
            ("{\"action\":\"pause\"}", "{\"ok\":true}"),
            (
                "{\"action\":\"resume\"}",
                "{\"ok\":false,\"error\":\"not now\"}",
            ),
        ] {
            writeln!(w, "{req}").unwrap();
            assert_eq!(lines.next().unwrap().unwrap(), want);
        }
        writeln!(w, "{{\"action\":\"fly\"}}").unwrap();
        let answer = lines.next().unwrap().unwrap();
        assert!(
            answer.starts_with("{\"ok\":false,\"error\":\"bad request: "),
            "{answer}"
        );
        // A second VMM cannot take the same socket path.
        let err = serve(&path, |_| {}).unwrap_err().to_string();
        assert!(err.starts_with("cannot listen on API socket"), "{err}");
        remove_socket(&path);
        assert!(!path.exists());
    }
}
