//! Unix sockets at paths of any length. A `sockaddr_un` holds 107 bytes
//! of path, and the state directories clients give a runtime are often
//! longer than that leaves (docker's is
//! `/var/run/docker/runtime-runc/moby/containers/<64 hex digits>`): a
//! socket whose path is too long is bound and reached through its
//! directory's descriptor, as `/proc/self/fd/<n>/<name>`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

/// The most bytes of path a `sockaddr_un` holds (with its NUL).
const SUN_PATH: usize = 108;

/// A path to use for a socket at `path`, and the directory descriptor it
/// goes through (kept open while the path is used).
fn short(path: &Path) -> io::Result<(PathBuf, Option<OwnedFd>)> {
    if path.as_os_str().len() < SUN_PATH {
        return Ok((path.to_owned(), None));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a socket path",
        ));
    };
    let fd = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut short = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    short.push(name);
    if short.as_os_str().len() >= SUN_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the socket's name in {} is too long", path.display()),
        ));
    }
    Ok((short, Some(fd)))
}

/// [`UnixListener::bind`] at `path`, however long.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let (at, _dir) = short(path)?;
    UnixListener::bind(at)
}

/// [`UnixStream::connect`] to `path`, however long.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let (at, _dir) = short(path)?;
    UnixStream::connect(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_deeper_than_sun_path_is_bound_and_reached() {
        let base = std::env::temp_dir().join(format!("husk-unix-{}", std::process::id()));
        let deep = base.join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("api.sock");
        assert!(path.as_os_str().len() > SUN_PATH);
        let listener = bind(&path).unwrap();
        assert!(path.exists(), "the socket is where it was asked for");
        let mut client = connect(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut client, b"x").unwrap();
        let mut got = [0u8; 1];
        std::io::Read::read_exact(&mut server, &mut got).unwrap();
        assert_eq!(&got, b"x");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
