//! Images, as a docker user has them: a real registry (Debian's
//! `docker-registry`, started by the test on 127.0.0.1 with its own
//! storage), images pushed with skopeo and `husk push`, pulled back by
//! husk and run in microVMs; `docker save`-style and OCI archives; the
//! docker-style commands; and hostile or broken inputs.
//!
//! Every test has a `--root` (so an image store) of its own; the warm-start
//! cache is the suite's (`HUSK_WARM_CACHE`), so no guest boots cold here.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{HUSK, Husk, Registry, text};
use sha2::Digest as _;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("img", name)
}

fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("skopeo (make test installs it)");
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A TCP proxy in front of the registry that cuts the first response to
/// a whole-blob GET larger than `cut` after `cut` bytes, and records every
/// request line and Range header it forwards.
struct CuttingProxy {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl CuttingProxy {
    fn start(upstream: u16, cut: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cut_done = Arc::new(Mutex::new(false));
        let log = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let (log, cut_done) = (log.clone(), cut_done.clone());
                std::thread::spawn(move || proxy_one(client, upstream, cut, &log, &cut_done));
            }
        });
        Self { port, seen }
    }
}

fn proxy_one(
    client: TcpStream,
    upstream: u16,
    cut: usize,
    log: &Mutex<Vec<String>>,
    cut_done: &Mutex<bool>,
) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if line == "\r\n" {
            break;
        }
        // One request per connection: the registry closes after it.
        if !line.to_ascii_lowercase().starts_with("connection:") {
            head.push(line);
        }
    }
    let request = head[0].trim().to_owned();
    let ranged = head
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("range:"));
    log.lock().unwrap().push(format!(
        "{request}{}",
        head.iter()
            .find(|h| h.to_ascii_lowercase().starts_with("range:"))
            .map(|h| format!(" [{}]", h.trim()))
            .unwrap_or_default()
    ));
    let mut up = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
    let mut out = head.concat();
    out.push_str("Connection: close\r\n\r\n");
    up.write_all(out.as_bytes()).unwrap();
    let mut client_w = client;
    let may_cut = request.starts_with("GET ") && request.contains("/blobs/sha256:") && !ranged;
    let mut sent = 0;
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = match up.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if may_cut && sent + n > cut {
            let mut done = cut_done.lock().unwrap();
            if !*done {
                *done = true;
                let _ = client_w.write_all(&buf[..cut - sent]);
                log.lock()
                    .unwrap()
                    .push(format!("CUT {request} after {cut} bytes"));
                let _ = client_w.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
        if client_w.write_all(&buf[..n]).is_err() {
            return;
        }
        sent += n;
    }
}

/// A layer's tar built from (path, kind) entries.
enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Hard(&'a str, &'a str),
    Symlink(&'a str, &'a str),
}

fn layer(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        let (name, data): (&str, &[u8]) = match e {
            Entry::File(n, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                (n, d)
            }
            Entry::Dir(n) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                (n, &[])
            }
            Entry::Hard(n, target) | Entry::Symlink(n, target) => {
                h.set_entry_type(if matches!(e, Entry::Hard(..)) {
                    tar::EntryType::Link
                } else {
                    tar::EntryType::Symlink
                });
                h.set_size(0);
                // Raw bytes: the tar crate refuses `..` in names it is given.
                let bytes = target.as_bytes();
                h.as_old_mut().linkname[..bytes.len()].copy_from_slice(bytes);
                (n, &[])
            }
        };
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// The busybox root filesystem as a layer.
fn busybox_layer() -> Vec<u8> {
    let dir = scratch("busybox-rootfs");
    let rootfs = dir.join("rootfs");
    husk_docker::busybox::make_rootfs(&rootfs).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    b.append_dir_all(".", &rootfs).unwrap();
    let tar = b.into_inner().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    tar
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    let mut child = Command::new("zstd")
        .args(["-q", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("zstd");
    let mut stdin = child.stdin.take().unwrap();
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out.stdout
}

/// An OCI image layout directory of `layers` ((tar, blob, media type),
/// bottom first) named `name`; returns the manifest's digest.
fn oci_layout(
    dir: &Path,
    name: &str,
    layers: &[(Vec<u8>, Vec<u8>, &str)],
    platform: (&str, &str),
) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = sha256(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        d
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": platform.1, "os": platform.0,
        "config": {"Env": ["PATH=/bin:/usr/bin", "FROM_IMAGE=yes"], "Cmd": ["sh"], "WorkingDir": "/data"},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(tar, _, _)| sha256(tar)).collect::<Vec<_>>()},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len()},
        "layers": layers.iter().map(|(_, blob, t)| serde_json::json!({"mediaType": t, "digest": put(blob), "size": blob.len()})).collect::<Vec<_>>(),
    }))
    .unwrap();
    let digest = put(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "latest"},
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    digest
}

/// Pseudo-random bytes (incompressible, so a cut lands mid-blob).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// A four-layer image: busybox (gzip); files, a hard link, 2 MiB of noise
/// (gzip); whiteouts and an opaque directory over them (zstd); one more
/// file (plain tar).
fn layered_image(dir: &Path, name: &str) -> (String, String) {
    let base = busybox_layer();
    let big = noise(2 << 20);
    let one = layer(&[
        Entry::Dir("data/"),
        Entry::File("data/a.txt", b"one\n"),
        Entry::File("data/gone.txt", b"deleted above\n"),
        Entry::Hard("data/hard", "data/a.txt"),
        Entry::File("data/big.bin", &big),
        Entry::Dir("opq/"),
        Entry::File("opq/x", b"hidden by the opaque dir\n"),
        Entry::Symlink("data/link", "/data/a.txt"),
    ]);
    let two = layer(&[
        Entry::File("data/.wh.gone.txt", b""),
        Entry::Dir("opq/"),
        Entry::File("opq/.wh..wh..opq", b""),
        Entry::File("opq/y", b"y\n"),
        Entry::File("data/b.txt", b"two\n"),
    ]);
    let three = layer(&[Entry::File("data/c.txt", b"three\n")]);
    let digest = oci_layout(
        dir,
        name,
        &[
            (base.clone(), gzip(&base), GZ),
            (one.clone(), gzip(&one), GZ),
            (two.clone(), zstd(&two), ZST),
            (three.clone(), three.clone(), TAR),
        ],
        ("linux", "amd64"),
    );
    (digest, format!("{:x}", sha2::Sha256::digest(&big)))
}

#[test]
fn pushed_with_skopeo_pulled_by_husk_through_a_cut_connection_and_run() {
    let registry = Registry::start("layers");
    let husk = Husk::new("layers");
    let layout = scratch("layout");
    let (digest, big_sum) = layered_image(&layout, "test/layers:latest");
    let dest = format!("docker://{}/test/layers:latest", registry.host());
    skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:latest", layout.display()),
        &dest,
    ]);
    let pushed = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &dest,
    ]);
    assert_eq!(pushed.trim(), digest, "skopeo kept the manifest as made");

    // Through a proxy that cuts the first whole-blob download halfway:
    // the pull resumes it with a Range request and verifies it.
    let proxy = CuttingProxy::start(registry.port, 1 << 20);
    let image = format!("127.0.0.1:{}/test/layers:latest", proxy.port);
    let out = husk.run(&["pull", &image]);
    let said = text(&out.stderr);
    assert!(out.status.success(), "pull: {said}");
    assert_eq!(text(&out.stdout).trim(), digest);
    let seen = proxy.seen.lock().unwrap().clone();
    let cut = seen
        .iter()
        .find(|l| l.starts_with("CUT "))
        .expect("the proxy cut a download");
    let blob = cut
        .split("/blobs/")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    assert!(
        seen.iter()
            .any(|l| l.contains(&blob) && l.contains("[Range: bytes=")),
        "no resumed request for {blob}: {seen:#?}"
    );
    assert!(said.contains("resuming at"), "{said}");
    assert!(
        husk.ok(&["images"])
            .contains(&format!("127.0.0.1:{}/test/layers", proxy.port))
    );

    // Whiteouts, the opaque directory, the hard link and every layer's
    // files, as the container sees them; the image's WorkingDir and Env.
    let out = husk.ok(&[
        "run",
        "--rm",
        &image,
        "sh",
        "-c",
        "pwd; echo $FROM_IMAGE; cat a.txt b.txt c.txt link; ls /data; ls /opq; stat -c %h hard; sha256sum big.bin",
    ]);
    let want = format!(
        "/data\nyes\none\ntwo\nthree\none\na.txt\nb.txt\nbig.bin\nc.txt\nhard\nlink\ny\n2\n{big_sum}  big.bin\n"
    );
    assert_eq!(out, want);
    std::fs::remove_dir_all(&layout).unwrap();
}

#[test]
fn husk_pushes_what_it_made_and_pulls_it_back() {
    let registry = Registry::start("push");
    let husk = Husk::new("push");
    // The built-in busybox is made on first use, with no registry.
    let hello = husk.ok(&["run", "--rm", "husk/busybox", "echo", "hello"]);
    assert_eq!(hello, "hello\n");
    let target = format!("{}/mine/busybox:v1", registry.host());
    husk.ok(&["tag", "husk/busybox", &target]);
    let digest = husk.ok(&["push", &target]).trim().to_owned();
    let seen = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &format!("docker://{target}"),
    ]);
    assert_eq!(seen.trim(), digest);
    // Pulled into another store: the same digest, and it runs.
    let other = Husk::new("push-other");
    assert_eq!(other.ok(&["pull", &target]).trim(), digest);
    let id = other.ok(&["inspect", &target]);
    assert!(id.contains(&digest), "{id}");
}

#[test]
fn basic_auth_is_asked_for_and_given() {
    let registry = Registry::start_with("auth", Some(("alice", "s3cret")));
    let husk = Husk::new("auth");
    husk.ok(&["run", "--rm", "husk/busybox", "true"]);
    let target = format!("{}/private/busybox:latest", registry.host());
    husk.ok(&["tag", "husk/busybox", &target]);
    let e = husk.fails(&["push", &target]);
    assert!(e.contains("asks for a user name and password"), "{e}");
    let with = |husk: &Husk, auth: &str, args: &[&str]| {
        let child = husk
            .cmd(args)
            .env("HUSK_REGISTRY_AUTH", auth)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        common::output_within(child, Duration::from_secs(60), "husk with credentials")
    };
    let pushed = with(&husk, "alice:s3cret", &["push", &target]);
    assert!(pushed.status.success(), "{}", text(&pushed.stderr));
    let other = Husk::new("auth-other");
    let wrong = with(&other, "alice:wrong", &["pull", &target]);
    assert!(!wrong.status.success());
    assert!(
        text(&wrong.stderr).contains("refused after authenticating"),
        "{}",
        text(&wrong.stderr)
    );
    let pulled = with(&other, "alice:s3cret", &["pull", &target]);
    assert!(pulled.status.success(), "{}", text(&pulled.stderr));
    assert_eq!(text(&pulled.stdout), text(&pushed.stdout));
}

#[test]
fn broken_registries_and_names_are_named() {
    let registry = Registry::start("errors");
    let husk = Husk::new("errors");
    let e = husk.fails(&["pull", &format!("{}/nothing/here:latest", registry.host())]);
    assert!(e.contains("nothing/here") && e.contains("404"), "{e}");
    let down = format!("127.0.0.1:{}", husk_test_support::free_port());
    let e = husk.fails(&["pull", &format!("{down}/x:latest")]);
    assert!(e.contains(&format!("cannot reach registry {down}")), "{e}");
    let e = husk.fails(&["pull", "Bad_Name"]);
    assert!(e.contains("invalid image reference \"Bad_Name\""), "{e}");

    // An index with only an arm64 image, pushed to the registry.
    let layout = scratch("arm");
    let tar = layer(&[Entry::File("f", b"x")]);
    oci_layout(
        &layout,
        "test/arm:latest",
        &[(tar.clone(), tar, TAR)],
        ("linux", "arm64"),
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut inner = index.clone();
    inner["manifests"][0]["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64"});
    inner["mediaType"] = "application/vnd.oci.image.index.v1+json".into();
    let inner = inner.to_string().into_bytes();
    let inner_digest = sha256(&inner);
    std::fs::write(layout.join("blobs/sha256").join(&inner_digest[7..]), &inner).unwrap();
    let outer = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": inner_digest, "size": inner.len(),
        "annotations": {"io.containerd.image.name": "test/arm:latest", "org.opencontainers.image.ref.name": "latest"},
    }]});
    std::fs::write(layout.join("index.json"), outer.to_string()).unwrap();
    let e = husk.fails(&["load", "-i", layout.to_str().unwrap()]);
    assert!(
        e.contains("no image for linux/amd64 (the index has linux/arm64)"),
        "{e}"
    );
    skopeo(&[
        "copy",
        "--preserve-digests",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:latest", layout.display()),
        &format!("docker://{}/test/arm:latest", registry.host()),
    ]);
    let e = husk.fails(&["pull", &format!("{}/test/arm:latest", registry.host())]);
    assert!(
        e.contains("no image for linux/amd64 (the index has linux/arm64)"),
        "{e}"
    );
    std::fs::remove_dir_all(&layout).unwrap();
}

#[test]
fn hostile_and_corrupt_archives_are_refused() {
    let husk = Husk::new("hostile");
    let outside = scratch("outside");
    for (name, entries, names) in [
        (
            "dotdot",
            vec![Entry::File("../../escape", b"x")],
            "../../escape",
        ),
        (
            "absolute",
            vec![Entry::File("/etc/evil", b"x")],
            "/etc/evil",
        ),
        (
            "symlink",
            vec![
                Entry::Symlink("link", outside.to_str().unwrap()),
                Entry::File("link/planted", b"x"),
            ],
            "link/planted",
        ),
        (
            "hardlink",
            vec![Entry::Hard("h", "../../../etc/passwd")],
            "\"h\"",
        ),
    ] {
        let layout = scratch(&format!("hostile-{name}"));
        let tar = layer(&entries);
        oci_layout(
            &layout,
            &format!("test/{name}:latest"),
            &[(tar.clone(), tar, TAR)],
            ("linux", "amd64"),
        );
        let e = husk.fails(&["load", "-i", layout.to_str().unwrap()]);
        assert!(e.contains(names), "{name}: {e}");
        assert!(!husk.ok(&["images"]).contains(name), "{name} was named");
        std::fs::remove_dir_all(&layout).unwrap();
    }
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "a layer wrote outside"
    );
    let layers = husk.root.join("images/layers");
    assert_eq!(
        std::fs::read_dir(&layers).unwrap().count(),
        0,
        "a refused layer was kept"
    );

    // A blob whose content is not its digest.
    let layout = scratch("corrupt");
    let tar = layer(&[Entry::File("f", b"x")]);
    oci_layout(
        &layout,
        "test/corrupt:latest",
        &[(tar.clone(), tar.clone(), TAR)],
        ("linux", "amd64"),
    );
    let d = sha256(&tar);
    let mut bad = tar.clone();
    bad[600] ^= 1;
    std::fs::write(layout.join("blobs/sha256").join(&d[7..]), &bad).unwrap();
    let e = husk.fails(&["load", "-i", layout.to_str().unwrap()]);
    assert!(
        e.contains(&format!("blobs/sha256/{}", &d[7..])) && e.contains("refused"),
        "{e}"
    );
    // Not an archive at all.
    let junk = layout.join("junk.tar");
    std::fs::write(&junk, b"not a tar").unwrap();
    let e = husk.fails(&["load", "-i", junk.to_str().unwrap()]);
    assert!(e.contains("junk.tar"), "{e}");
    std::fs::remove_dir_all(&layout).unwrap();
    std::fs::remove_dir_all(&outside).unwrap();
}

/// What `open(path)` (or, for a socket, `connect`) gives the host user
/// nobody (uid and gid 65534, no groups): 0, or the errno.
fn as_nobody(path: &Path, socket: bool) -> i32 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a sockaddr_un filled before the fork; the child makes only
    // raw system calls and _exits.
    unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(c.as_bytes()) {
            *d = *s as libc::c_char;
        }
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(65534, 65534, 65534) != 0
                || libc::setresuid(65534, 65534, 65534) != 0
            {
                libc::_exit(100);
            }
            let rc = if socket {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                libc::connect(
                    fd,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                )
            } else {
                libc::open(c.as_ptr(), libc::O_RDONLY)
            };
            let errno = *libc::__errno_location();
            libc::_exit(if rc >= 0 { 0 } else { errno.min(99) });
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFEXITED(status));
        let code = libc::WEXITSTATUS(status);
        assert_ne!(code, 100, "cannot become nobody");
        code
    }
}

/// Issue 14: an image with a set-uid-root file and a device node, a
/// container of it running: the host user nobody reaches neither file in
/// the image store or the container's root, nor the container's VM through
/// its control socket. The container's root is mounted nosuid and nodev.
#[test]
fn host_users_reach_no_layer_container_root_or_vm_socket() {
    let husk = Husk::new("private");
    let layout = scratch("private-image");
    let mut b = tar::Builder::new(Vec::new());
    let base = busybox_layer();
    let mut archive = tar::Archive::new(&base[..]);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let header = entry.header().clone();
        b.append(&header, &mut entry).unwrap();
    }
    // The layout's config works in /data.
    let mut data = tar::Header::new_gnu();
    data.set_path("data/").unwrap();
    data.set_entry_type(tar::EntryType::Directory);
    data.set_mode(0o755);
    data.set_size(0);
    data.set_cksum();
    b.append(&data, &[][..]).unwrap();
    let mut suid = tar::Header::new_gnu();
    suid.set_path("bin/suid").unwrap();
    suid.set_mode(0o4755);
    suid.set_size(4);
    suid.set_cksum();
    b.append(&suid, &b"#!x\n"[..]).unwrap();
    let mut dev = tar::Header::new_gnu();
    dev.set_path("bin/mem").unwrap();
    dev.set_entry_type(tar::EntryType::Char);
    dev.set_mode(0o666);
    dev.set_device_major(1).unwrap();
    dev.set_device_minor(1).unwrap();
    dev.set_size(0);
    dev.set_cksum();
    b.append(&dev, &[][..]).unwrap();
    let tar = b.into_inner().unwrap();
    oci_layout(
        &layout,
        "test/suid:latest",
        &[(tar.clone(), tar, TAR)],
        ("linux", "amd64"),
    );
    husk.ok(&["load", "-i", layout.to_str().unwrap()]);
    let id = husk
        .ok(&[
            "run",
            "-d",
            "--name",
            "held",
            "test/suid",
            "sh",
            "-c",
            "echo ready; sleep 600",
        ])
        .trim()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !husk.ok(&["logs", "held"]).contains("ready") {
        assert!(
            Instant::now() < deadline,
            "the container did not start: {}",
            text(&husk.run(&["ps", "-a"]).stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&husk.root).unwrap().mode() & 0o777, 0o700);
    let layer = std::fs::read_dir(husk.root.join("images/layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("bin/suid").exists())
        .expect("the layer is unpacked");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount = mounts
        .lines()
        .find(|l| l.contains(husk.root.to_str().unwrap()) && l.contains(" overlay "))
        .unwrap_or_else(|| panic!("no overlay mount under the root:\n{mounts}"))
        .to_owned();
    let rootfs = PathBuf::from(mount.split(' ').nth(4).unwrap());
    let options = mount.split(' ').nth(5).unwrap();
    assert!(
        options.split(',').any(|o| o == "nosuid") && options.split(',').any(|o| o == "nodev"),
        "{mount}"
    );
    // Root sees the files; nobody reaches none of them.
    for path in [
        layer.join("bin/suid"),
        layer.join("bin/mem"),
        rootfs.join("bin/suid"),
        rootfs.join("bin/mem"),
    ] {
        std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(as_nobody(&path, false), libc::EACCES, "{}", path.display());
    }
    let socket = std::fs::read_dir(husk.root.join("containers"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("vm/api.sock"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no VM socket for container {id}"));
    // The socket is the VMM's user's alone in itself, not only through
    // the root's mode.
    assert_eq!(
        std::fs::metadata(&socket).unwrap().mode() & 0o077,
        0,
        "{}",
        socket.display()
    );
    assert_eq!(
        as_nobody(&socket, true),
        libc::EACCES,
        "{}",
        socket.display()
    );
    husk.ok(&["rm", "-f", "held"]);
    std::fs::remove_dir_all(&layout).unwrap();
}

/// A tar stream of `entries`, then `trailing` zero bytes after its end.
fn raw_layer(entries: &[(tar::Header, Vec<u8>)], trailing: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (h, data) in entries {
        b.append(h, &data[..]).unwrap();
    }
    let mut tar = b.into_inner().unwrap();
    tar.resize(tar.len() + trailing, 0);
    tar
}

fn file_header(name: &str, size: usize) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).unwrap();
    h.set_mode(0o644);
    h.set_size(size as u64);
    h.set_cksum();
    h
}

/// Issue 14: image bombs, with the limits in force. A layer that expands
/// beyond --max-layer-size (in its files, or in zeros after its end), one
/// whose PAX header is larger than --max-header-size, and one of more
/// entries than --max-layer-entries are refused by name, in little memory,
/// leaving nothing in the store.
#[test]
fn image_bombs_are_refused_by_name_within_the_limits() {
    let husk = Husk::new("bombs");
    let zeros = vec![0u8; 48 << 20];
    let many: Vec<(tar::Header, Vec<u8>)> = (0..50)
        .map(|i| (file_header(&format!("f{i}"), 1), b"x".to_vec()))
        .collect();
    let mut pax = tar::Header::new_ustar();
    pax.set_path("PaxHeaders/f").unwrap();
    pax.set_entry_type(tar::EntryType::XHeader);
    let big_record = {
        let value = "v".repeat(4 << 20);
        let body = format!(" SCHILY.xattr.user.big={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    };
    pax.set_size(big_record.len() as u64);
    pax.set_cksum();
    for (name, tar, flags, says) in [
        (
            "files",
            raw_layer(&[(file_header("zeros", zeros.len()), zeros.clone())], 0),
            vec!["--max-layer-size", "16m"],
            "layer refused: it unpacks to more than 16777216 bytes (--max-layer-size)",
        ),
        (
            "trailing",
            raw_layer(&[(file_header("small", 1), b"x".to_vec())], 48 << 20),
            vec!["--max-layer-size", "16m"],
            "layer refused: it unpacks to more than 16777216 bytes (--max-layer-size)",
        ),
        (
            "pax",
            raw_layer(
                &[(pax, big_record), (file_header("f", 1), b"x".to_vec())],
                0,
            ),
            vec![],
            "layer refused: an entry's headers (PAX records, long names) take more than 1048576 bytes (--max-header-size)",
        ),
        (
            "entries",
            raw_layer(&many, 0),
            vec!["--max-layer-entries", "10"],
            "layer refused: it has more than 10 entries (--max-layer-entries)",
        ),
    ] {
        let layout = scratch(&format!("bomb-{name}"));
        let blob = gzip(&tar);
        assert!(
            blob.len() < tar.len() / 8 || name == "entries",
            "{name} is not a bomb"
        );
        oci_layout(
            &layout,
            &format!("test/bomb-{name}:latest"),
            &[(tar, blob, GZ)],
            ("linux", "amd64"),
        );
        let mut args = flags.clone();
        args.extend(["load", "-i", layout.to_str().unwrap()]);
        let e = husk.fails(&args);
        assert!(e.contains(says), "{name}: {e}");
        assert!(!husk.ok(&["images"]).contains(name), "{name} was kept");
        std::fs::remove_dir_all(&layout).unwrap();
    }
    // Nothing unpacked was kept, and no refused load left scratch.
    for sub in ["images/layers", "images/ingest"] {
        let left: Vec<_> = std::fs::read_dir(husk.root.join(sub))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{sub}: {left:?}");
    }
    // Memory: the largest husk process of this test stayed small (the
    // PAX header alone would have been read whole).
    // SAFETY: getrusage fills a live struct.
    let maxrss_kib = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage.ru_maxrss
    };
    assert!(
        maxrss_kib < 256 << 10,
        "a husk process used {maxrss_kib} KiB"
    );
}

/// Issue 14: a truncated layer blob was taken in because a layer of the
/// same diff ID was unpacked already (so `husk save` wrote an archive
/// that cannot be loaded). Every blob is read in full. And the scratch a
/// killed load leaves is removed by the next command.
#[test]
fn a_truncated_blob_is_refused_even_when_its_layer_exists_and_scratch_is_swept() {
    let husk = Husk::new("truncated");
    let tar = layer(&[Entry::File("a", &noise(256 << 10))]);
    let blob = gzip(&tar);
    let good = scratch("trunc-good");
    oci_layout(
        &good,
        "test/good:latest",
        &[(tar.clone(), blob.clone(), GZ)],
        ("linux", "amd64"),
    );
    husk.ok(&["load", "-i", good.to_str().unwrap()]);
    let bad = scratch("trunc-bad");
    let cut = blob[..blob.len() / 2].to_vec();
    oci_layout(
        &bad,
        "test/bad:latest",
        &[(tar, cut, GZ)],
        ("linux", "amd64"),
    );
    let e = husk.fails(&["load", "-i", bad.to_str().unwrap()]);
    assert!(e.contains("gzip") || e.contains("diff ID"), "{e}");
    let images = husk.ok(&["images"]);
    assert!(
        images.contains("test/good") && !images.contains("test/bad"),
        "{images}"
    );
    // A load killed mid-way (its process gone) left scratch: the next
    // command removes it; a running process's scratch stays.
    let mut dead = Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait().unwrap();
    let ingest = husk.root.join("images/ingest");
    let layers = husk.root.join("images/layers");
    std::fs::create_dir_all(ingest.join(format!("load-{pid}-0/blobs"))).unwrap();
    std::fs::write(ingest.join(format!("busybox-{pid}.tar")), b"x").unwrap();
    std::fs::create_dir_all(layers.join(format!(".abc.tmp-{pid}-3/etc"))).unwrap();
    let alive = ingest.join(format!("load-{}-0", std::process::id()));
    std::fs::create_dir_all(&alive).unwrap();
    husk.ok(&["images"]);
    assert!(!ingest.join(format!("load-{pid}-0")).exists());
    assert!(!ingest.join(format!("busybox-{pid}.tar")).exists());
    assert!(!layers.join(format!(".abc.tmp-{pid}-3")).exists());
    assert!(alive.exists(), "a live process's scratch was removed");
    std::fs::remove_dir_all(&alive).unwrap();
    std::fs::remove_dir_all(&good).unwrap();
    std::fs::remove_dir_all(&bad).unwrap();
}

#[test]
fn two_pulls_at_once_store_the_image_once() {
    let registry = Registry::start("race");
    let husk = Husk::new("race");
    let layout = scratch("race-layout");
    let (digest, _) = layered_image(&layout, "test/race:latest");
    skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:latest", layout.display()),
        &format!("docker://{}/test/race:latest", registry.host()),
    ]);
    let image = format!("{}/test/race:latest", registry.host());
    let pulls: Vec<Child> = (0..2)
        .map(|_| {
            husk.cmd(&["pull", &image])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for p in pulls {
        let out = common::output_within(p, Duration::from_secs(120), "pull");
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), digest);
    }
    let layers = std::fs::read_dir(husk.root.join("images/layers"))
        .unwrap()
        .count();
    assert_eq!(layers, 4, "each layer unpacked once");
    let ingest: Vec<_> = std::fs::read_dir(husk.root.join("images/ingest"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| !n.to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(ingest.is_empty(), "downloads left: {ingest:?}");
    std::fs::remove_dir_all(&layout).unwrap();
}

#[test]
fn containers_of_one_image_keep_their_writes_apart() {
    let husk = Husk::new("apart");
    let volume = scratch("apart-volume");
    let v = format!("{}:/data", volume.display());
    let id = husk.ok(&[
        "run",
        "-d",
        "--name",
        "writer",
        "-v",
        &v,
        "husk/busybox",
        "sh",
        "-c",
        "echo mine > /etc/written; echo kept > /data/kept; echo ready; sleep 600",
    ]);
    assert_eq!(id.trim().len(), 64, "run -d prints the ID: {id}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !husk.ok(&["logs", "writer"]).contains("ready") {
        assert!(Instant::now() < deadline, "the writer did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        husk.ok(&["exec", "writer", "cat", "/etc/written"]),
        "mine\n"
    );
    let ps = husk.ok(&["ps"]);
    assert!(ps.contains("writer") && ps.contains("Up"), "{ps}");
    // Another container of the image does not see it, nor does the image.
    let out = husk.run(&["run", "--rm", "husk/busybox", "cat", "/etc/written"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let layers = husk.root.join("images/layers");
    for layer in std::fs::read_dir(&layers).unwrap().flatten() {
        assert!(
            !layer.path().join("etc/written").exists(),
            "the image was written"
        );
    }
    // A running container is not removed without -f; stopped, it is.
    let e = husk.fails(&["rm", "writer"]);
    assert!(e.contains("container writer is running"), "{e}");
    let e = husk.fails(&["rmi", "husk/busybox"]);
    assert!(e.contains("used by container writer"), "{e}");
    husk.ok(&["stop", "-t", "1", "writer"]);
    let ps = husk.ok(&["ps", "-a"]);
    assert!(ps.contains("writer") && ps.contains("Exited (137)"), "{ps}");
    assert!(!husk.ok(&["ps"]).contains("writer"));
    // logs -f of a stopped container prints what it wrote and returns.
    assert_eq!(husk.ok(&["logs", "-f", "writer"]), "ready\n");
    husk.ok(&["rm", "writer"]);
    assert!(
        !husk.root.join("docker/writer").exists(),
        "its layer is left"
    );
    assert!(
        husk.fails(&["logs", "writer"])
            .contains("no such container: writer")
    );
    // The volume kept what was written to it.
    assert_eq!(
        std::fs::read_to_string(volume.join("kept")).unwrap(),
        "kept\n"
    );
    let out = husk.ok(&["run", "--rm", "-v", &v, "husk/busybox", "cat", "/data/kept"]);
    assert_eq!(out, "kept\n");
    // run -d --rm: removed once it stops, with no daemon.
    husk.ok(&[
        "run",
        "-d",
        "--rm",
        "--name",
        "brief",
        "husk/busybox",
        "true",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while husk.root.join("docker/brief").exists() {
        assert!(Instant::now() < deadline, "run -d --rm left its container");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!husk.ok(&["ps", "-a"]).contains("brief"));
    // -it: a terminal (under script, which gives husk one).
    let out = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{HUSK} --root {} run --rm -it husk/busybox sh -c 'tty; echo $TERM'",
            husk.root.display()
        ))
        .arg("/dev/null")
        .env(husk_guest::warm::CACHE_ENV, common::root())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = text(&out.stdout);
    assert!(said.contains("/dev/pts/0\r\nxterm"), "{said:?}");
    // Nothing uses the image now: rmi removes it and its blobs.
    husk.ok(&["rmi", "husk/busybox"]);
    assert_eq!(husk.ok(&["images", "-q"]), "");
    assert_eq!(std::fs::read_dir(&layers).unwrap().count(), 0);
    std::fs::remove_dir_all(&volume).unwrap();
}

#[test]
fn saved_images_load_back_and_imports_run() {
    let husk = Husk::new("save");
    husk.ok(&["run", "--rm", "husk/busybox", "true"]);
    let dir = scratch("save");
    let archive = dir.join("busybox.tar");
    husk.ok(&["save", "-o", archive.to_str().unwrap(), "husk/busybox"]);
    let before = husk.ok(&["inspect", "husk/busybox"]);
    husk.ok(&["rmi", "husk/busybox"]);
    let loaded = husk.ok(&["load", "-i", archive.to_str().unwrap()]);
    assert_eq!(loaded, "Loaded image: docker.io/husk/busybox:latest\n");
    assert_eq!(
        husk.ok(&["inspect", "husk/busybox"]),
        before,
        "the same image came back"
    );
    // docker's manifest.json in the same archive loads too (skopeo
    // reads it as a docker-archive).
    let seen = skopeo(&["inspect", &format!("docker-archive:{}", archive.display())]);
    assert!(seen.contains("\"Architecture\": \"amd64\""), "{seen}");

    // An archive as `docker save` writes it (manifest.json, no
    // index.json), made by skopeo: loaded and run.
    let docker_archive = dir.join("docker.tar");
    skopeo(&[
        "copy",
        &format!("docker-archive:{}", archive.display()),
        &format!("docker-archive:{}:saved/box:v2", docker_archive.display()),
    ]);
    let listing = Command::new("tar")
        .arg("tf")
        .arg(&docker_archive)
        .output()
        .unwrap();
    assert!(
        !text(&listing.stdout).contains("index.json"),
        "not docker's format"
    );
    let loaded = husk.ok(&["load", "-i", docker_archive.to_str().unwrap()]);
    assert_eq!(loaded, "Loaded image: docker.io/saved/box:v2\n");
    assert_eq!(
        husk.ok(&["run", "--rm", "saved/box:v2", "echo", "from docker save"]),
        "from docker save\n"
    );

    // A root filesystem tarball made into an image, with the entrypoint
    // and user given on the command line.
    let rootfs = busybox_layer();
    let tarball = dir.join("rootfs.tar.gz");
    std::fs::write(&tarball, gzip(&rootfs)).unwrap();
    husk.ok(&["import", tarball.to_str().unwrap(), "imported/box:1"]);
    let out = husk.ok(&[
        "run",
        "--rm",
        "--user",
        "nobody",
        "-e",
        "GREETING=hi",
        "-w",
        "/tmp",
        "--entrypoint",
        "sh",
        "imported/box:1",
        "-c",
        "echo $GREETING $(id -u) $(pwd)",
    ]);
    assert_eq!(out, "hi 65534 /tmp\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memory_and_cpus_size_the_vm_and_limit_the_container() {
    let husk = Husk::new("sized");
    // 600 MiB and the guest's 64 MiB, rounded up to 256 MiB: a 768 MiB VM;
    // 1.5 CPUs: two vCPUs, and a CFS quota of 150 ms per 100 ms in the
    // guest. Each shape has its warm-start snapshot.
    let out = husk.ok(&[
        "run",
        "--rm",
        "--memory",
        "600m",
        "--cpus",
        "1.5",
        "husk/busybox",
        "sh",
        "-c",
        "nproc; grep MemTotal /proc/meminfo; cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "2", "{out}");
    let kib: u64 = lines[1].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((700 << 10..=768 << 10).contains(&kib), "{out}");
    assert_eq!(lines[2], (600u64 << 20).to_string());
    assert_eq!(lines[3], "150000 100000");
    // 600 MiB on one CPU: the same memory, one vCPU.
    let out = husk.ok(&[
        "run",
        "--rm",
        "--memory",
        "600m",
        "husk/busybox",
        "sh",
        "-c",
        "nproc; grep MemTotal /proc/meminfo",
    ]);
    assert!(out.starts_with("1\nMemTotal:"), "{out}");
    // What no VM husk makes can hold is refused before anything starts.
    let e = husk.fails(&["run", "--rm", "--memory", "64g", "husk/busybox", "true"]);
    assert!(e.contains("more than husk gives a VM (16 GiB)"), "{e}");
    assert_eq!(husk.ok(&["ps", "-a", "-q"]), "");
}

#[test]
fn bad_run_flags_are_named_and_leave_nothing() {
    let husk = Husk::new("badflags");
    for (args, says) in [
        (
            vec!["-v", "/tmp:data"],
            "the container path \"data\" is not absolute",
        ),
        (vec!["-v", "a:b:c:d"], "expected HOST:CONTAINER[:ro]"),
        (
            vec!["-v", "bad name!:/data"],
            "neither an absolute path nor a volume name",
        ),
        (vec!["--cpus", "0"], "--cpus 0: must be more than 0"),
        // Issue 14: refused by name, not clamped to 8 vCPUs.
        (
            vec!["--cpus", "1000"],
            "asks for 1000 CPUs; a VM gets at most",
        ),
        // husk's own limits on images must be sizes above 0.
        (
            vec!["--max-layer-size", "0"],
            "--max-layer-size 0: must be more than 0",
        ),
        (vec!["--max-header-size", "lots"], "--max-header-size"),
        (vec!["--memory", "lots"], "\"lots\" is not a size"),
        (
            vec!["-w", "relative"],
            "the working directory \"relative\" is not an absolute path",
        ),
        (vec!["--user", "nosuch"], "unable to find user nosuch"),
        (
            vec!["--entrypoint", ""],
            "no command given, and the image has none",
        ),
        (
            vec!["--name", "bad/name"],
            "container ID \"bad/name\" is not valid",
        ),
    ] {
        let mut all = vec!["run", "--rm"];
        all.extend(args.iter().copied());
        all.push("husk/busybox");
        let out = husk.run(&all);
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        let e = text(&out.stderr);
        assert!(e.contains(says), "{args:?}: {e}");
    }
    // Nothing was left: no container, no mount.
    assert_eq!(husk.ok(&["ps", "-a", "-q"]), "");
    let docker = husk.root.join("docker");
    assert_eq!(
        std::fs::read_dir(&docker).map(|d| d.count()).unwrap_or(0),
        0
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(husk.root.to_str().unwrap()),
        "a mount was left"
    );
    // A name in use is refused, and the container that has it is kept.
    husk.ok(&["run", "--name", "taken", "husk/busybox", "true"]);
    let e = husk.fails(&["run", "--name", "taken", "husk/busybox", "true"]);
    assert!(
        e.contains("the container name \"taken\" is already in use"),
        "{e}"
    );
    assert!(husk.ok(&["ps", "-a"]).contains("Exited (0)"));
}
