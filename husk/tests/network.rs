//! OCI-mode networking (docs/networking.md): the spec's network namespace
//! path is the container's network. Its interfaces are joined to TAPs of
//! the VM by tc redirection and mirrored into the guest; the host's own
//! namespace, files that are not network namespaces, and more interfaces
//! than a VM takes are refused by name, with nothing left behind. Root,
//! and namespaces of the test's own (`ip netns`), as a CNI plugin makes
//! them.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use husk_runtime::network;
use husk_test_support::Netns;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use common::{Bundle, husk, id, text};

/// `ns`'s `eth0` joined to `peer`'s `peer0` by a veth pair, `eth0` with
/// 10.0.5.2/24 and a default route through the peer's 10.0.5.1.
fn wire(ns: &Netns, peer: &Netns) {
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", "netns", &peer.0,
    ]);
    ns.ip(&["link", "set", "eth0", "mtu", "1400", "up"]);
    ns.ip(&["addr", "add", "10.0.5.2/24", "dev", "eth0"]);
    ns.ip(&["route", "add", "default", "via", "10.0.5.1"]);
    peer.ip(&["link", "set", "peer0", "mtu", "1400", "up"]);
    peer.ip(&["addr", "add", "10.0.5.1/24", "dev", "peer0"]);
}

/// A TCP listener at `ip` in `peer` that takes one connection, reads a
/// line and answers `reply`: its port, and the thread that gives the
/// connection's source address and the line read.
fn serve_once(
    peer: &Netns,
    ip: &'static str,
    reply: &'static [u8],
) -> (u16, std::thread::JoinHandle<(String, String)>) {
    let listener = peer.run(move || TcpListener::bind((ip, 0)).unwrap());
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (conn, from) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        (&conn).write_all(reply).unwrap();
        (from.ip().to_string(), line)
    });
    (port, server)
}

/// The spec's network namespace set to `path`.
fn in_netns(spec: &mut Spec, path: &Path) {
    let mut linux = spec.linux().clone().unwrap();
    let mut namespaces = linux.namespaces().clone().unwrap();
    for ns in &mut namespaces {
        if ns.typ() == LinuxNamespaceType::Network {
            ns.set_path(Some(path.to_owned()));
        }
    }
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
}

#[test]
fn a_namespaces_interface_is_joined_to_a_tap_and_let_go() {
    let (ns, peer) = (Netns::new("mirror"), Netns::new("mirror-peer"));
    wire(&ns, &peer);
    ns.ip(&["route", "add", "192.168.7.0/24", "via", "10.0.5.9"]);
    let mirror = network::mirror(&ns.path()).unwrap();
    assert_eq!(mirror.taps.len(), 1);
    let eth0 = &mirror.interfaces[..];
    assert_eq!(eth0.len(), 1, "{eth0:?}");
    let eth0 = &eth0[0];
    assert_eq!((eth0.slot, eth0.name.as_str(), eth0.mtu), (0, "eth0", 1400));
    assert_eq!(eth0.addresses, [("10.0.5.2".parse().unwrap(), 24)]);
    let dsts: Vec<String> = eth0
        .routes
        .iter()
        .map(|r| format!("{}/{} via {:?}", r.dst, r.prefix, r.gateway))
        .collect();
    assert_eq!(
        dsts,
        [
            "0.0.0.0/0 via Some(10.0.5.1)",
            "192.168.7.0/24 via Some(10.0.5.9)"
        ]
    );
    let mac = ns.output("cat", &["/sys/class/net/eth0/address"]);
    let want: Vec<String> = eth0.mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(mac.trim(), want.join(":"));
    // The TAP is up with the interface's MTU; each side's ingress goes to
    // the other.
    let tap = ns.output("ip", &["-o", "link", "show", "husk-tap0"]);
    assert!(tap.contains("mtu 1400") && tap.contains(",UP"), "{tap}");
    // What no filter passes dies on the TAP's side of the stack.
    for (key, want) in [
        ("ipv6/conf/husk-tap0/disable_ipv6", "1"),
        ("ipv4/conf/husk-tap0/forwarding", "0"),
        ("ipv4/conf/husk-tap0/rp_filter", "1"),
        ("ipv4/conf/husk-tap0/arp_ignore", "8"),
    ] {
        let got = ns.output("cat", &[&format!("/proc/sys/net/{key}")]);
        assert_eq!(got.trim(), want, "{key}");
    }
    for (from, to) in [("eth0", "husk-tap0"), ("husk-tap0", "eth0")] {
        let filters = ns.output("tc", &["filter", "show", "dev", from, "ingress"]);
        assert!(
            filters.contains(&format!("Egress Redirect to device {to}")),
            "{from}: {filters}"
        );
    }
    // Let go: the redirection is off, and the TAP goes with its last
    // descriptor.
    network::unmirror(&ns.path(), &["eth0".into()]);
    let qdiscs = ns.output("tc", &["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    drop(mirror);
    let links = ns.output("ip", &["-o", "link", "show"]);
    assert!(!links.contains("husk-tap0"), "{links}");
}

#[test]
fn bad_network_namespaces_are_refused_by_name_and_leave_nothing() {
    let err = |path: &Path| match network::mirror(path) {
        Ok(_) => panic!("{} was mirrored", path.display()),
        Err(e) => e.to_string(),
    };
    let host = err(Path::new("/proc/self/ns/net"));
    assert!(
        host.contains("is the host's own: a microVM cannot share the host's network stack"),
        "{host}"
    );
    assert_eq!(
        err(Path::new("/etc/hostname")),
        "the network namespace /etc/hostname: is not a namespace"
    );
    let uts = err(Path::new("/proc/self/ns/uts"));
    assert!(
        uts.ends_with("is a namespace, but not a network namespace"),
        "{uts}"
    );
    let missing = err(Path::new("/no/such/netns"));
    assert!(missing.contains("No such file"), "{missing}");

    // More interfaces than a VM takes: refused before any is touched.
    let ns = Netns::new("mirror-many");
    for i in 0..5 {
        let (a, b) = (format!("e{i}"), format!("p{i}"));
        ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    }
    let many = err(&ns.path());
    assert!(
        many.contains("10 Ethernet interfaces; a container's VM takes at most 4"),
        "{many}"
    );
    let links = ns.output("ip", &["-o", "link", "show"]);
    assert!(!links.contains("husk-tap"), "{links}");
    let qdiscs = ns.output("tc", &["qdisc", "show"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");

    // A namespace husk made (named by a process in it) takes as many
    // interfaces as the VM started before them has slots; with only
    // loopback there, nothing is done.
    let in_ns = |ns: &Netns| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0, "sleep", "60"])
            .spawn()
            .unwrap()
    };
    let mut sleeper = in_ns(&ns);
    std::thread::sleep(Duration::from_millis(300));
    let two = match network::mirror_made(sleeper.id(), 1) {
        Ok(_) => panic!("ten interfaces went into one slot"),
        Err(e) => e.to_string(),
    };
    assert!(
        two.contains("10 Ethernet interfaces; a container whose namespace husk made takes 1"),
        "{two}"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let empty = Netns::new("mirror-empty");
    let mut sleeper = in_ns(&empty);
    std::thread::sleep(Duration::from_millis(300));
    let none = network::mirror_made(sleeper.id(), 1).unwrap();
    assert!(none.taps.is_empty() && none.interfaces.is_empty());
    let _ = sleeper.kill();
    let _ = sleeper.wait();

    // Through husk: `run` with the host's namespace fails with the reason
    // and leaves no container.
    let bundle = Bundle::new("net-host", &["true"], |spec| {
        in_netns(spec, Path::new("/proc/self/ns/net"))
    });
    let name = id("net-host");
    let out = husk(&["run", "--bundle", bundle.0.to_str().unwrap(), &name]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("a microVM cannot share the host's network stack"),
        "{}",
        text(&out.stderr)
    );
    let list = husk(&["list", "-q"]);
    assert!(
        !text(&list.stdout).contains(&name),
        "{}",
        text(&list.stdout)
    );
}

/// A container whose spec names a namespace (as CNI leaves it) talks TCP
/// to a peer through the namespace's veth: the guest's eth0 has the
/// namespace's address and MAC, its default route, and frames cross the
/// TAP's redirection both ways. After the container, the namespace's
/// interface is its own again.
#[test]
fn a_container_in_a_namespace_path_talks_to_its_peer() {
    let (ns, peer) = (Netns::new("ctr-net"), Netns::new("ctr-net-peer"));
    wire(&ns, &peer);
    let (port, server) = serve_once(&peer, "10.0.5.1", b"hello from the peer\n");
    let script = format!(
        "cat /sys/class/net/eth0/address; ip -o -4 addr show dev eth0 | grep -o 'inet [0-9./]*'; \
         echo hello from the container | nc 10.0.5.1 {port}"
    );
    let bundle = Bundle::new("net-ctr", &["sh", "-c", &script], |spec| {
        in_netns(spec, &ns.path())
    });
    let name = id("net-ctr");
    let out = husk(&["run", "--bundle", bundle.0.to_str().unwrap(), &name]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{said}");
    let mac = ns.output("cat", &["/sys/class/net/eth0/address"]);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(
        lines,
        [mac.trim(), "inet 10.0.5.2/24", "hello from the peer"],
        "{said}"
    );
    let (from, got) = server.join().unwrap();
    assert_eq!(
        (from.as_str(), got.as_str()),
        ("10.0.5.2", "hello from the container\n")
    );
    let qdiscs = ns.output("tc", &["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
}

/// A spec without a namespace path (runc's and docker's default): husk
/// makes a namespace for the container, the state's `pid` is in it, and
/// what a `prestart` hook puts there (as docker's `libnetwork-setkey`
/// does: a veth, addressed and routed) reaches the guest before the
/// process starts. The host's own namespace gains nothing.
#[test]
fn what_a_prestart_hook_puts_in_the_new_namespace_reaches_the_container() {
    let peer = Netns::new("hook-peer");
    let (port, server) = serve_once(&peer, "10.0.6.1", b"hello from the bridge\n");
    // The hook reads the state on stdin: its pid names the namespace.
    let hook_script = format!(
        "pid=$(tr -d ' \\n' | sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p'); \
         ip -n {peer} link add peer0 type veth peer name eth0 netns $pid && \
         ip -n {peer} addr add 10.0.6.1/24 dev peer0 && ip -n {peer} link set peer0 up && \
         nsenter --net=/proc/$pid/ns/net sh -c \
           'ip link set eth0 up && ip addr add 10.0.6.2/24 dev eth0 && ip route add default via 10.0.6.1'",
        peer = peer.0
    );
    let hooks = serde_json::json!({
        "prestart": [{"path": "/bin/sh", "args": ["sh", "-c", hook_script]}],
    });
    let script = format!(
        "ip -o -4 addr show dev eth0 | grep -o 'inet [0-9./]*'; \
         echo hello from the container | nc 10.0.6.1 {port}"
    );
    let bundle = Bundle::new("net-hook", &["sh", "-c", &script], |spec| {
        spec.set_hooks(Some(serde_json::from_value(hooks.clone()).unwrap()));
    });
    let name = id("net-hook");
    let out = husk(&["run", "--bundle", bundle.0.to_str().unwrap(), &name]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        ["inet 10.0.6.2/24", "hello from the bridge"],
        "{said}"
    );
    let (from, got) = server.join().unwrap();
    assert_eq!(
        (from.as_str(), got.as_str()),
        ("10.0.6.2", "hello from the container\n")
    );
    let now = text(
        &std::process::Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap()
            .stdout,
    );
    // No end of the hook's veth is in the host's namespace (other tests
    // add links there meanwhile: only this one's peer is looked for).
    assert!(!now.contains(&format!("link-netns {}", peer.0)), "{now}");
    // The namespace went with the container, and the veth with it (the
    // kernel tears a namespace down in the background).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = peer.output("ip", &["-o", "link", "show"]);
        if !left.contains("peer0") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{left}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ctr run --cni`'s order: `create`, then the client wires the
/// namespace named by the state's `pid`, then `start`. The interface that
/// arrived between the two reaches the guest before the process starts.
#[test]
fn an_interface_added_between_create_and_start_reaches_the_container() {
    let peer = Netns::new("start-peer");
    let (port, server) = serve_once(&peer, "10.0.7.1", b"hello from cni\n");
    let script = format!(
        "ip -o -4 addr show dev eth0 | grep -q 'inet 10.0.7.2/24' && \
         echo hello from the container | nc 10.0.7.1 {port} | grep -q 'hello from cni'"
    );
    let bundle = Bundle::new("net-start", &["sh", "-c", &script], |_| {});
    let name = id("net-start");
    common::ok(&["create", "--bundle", bundle.0.to_str().unwrap(), &name]);
    let state: serde_json::Value = serde_json::from_str(&common::ok(&["state", &name])).unwrap();
    let pid = state["pid"].as_u64().unwrap().to_string();
    peer.ip(&[
        "link", "add", "peer0", "type", "veth", "peer", "name", "eth0", "netns", &pid,
    ]);
    peer.ip(&["addr", "add", "10.0.7.1/24", "dev", "peer0"]);
    peer.ip(&["link", "set", "peer0", "up"]);
    let netns = format!("--net=/proc/{pid}/ns/net");
    let wired = std::process::Command::new("nsenter")
        .args([
            &netns,
            "sh",
            "-c",
            "ip link set eth0 up && ip addr add 10.0.7.2/24 dev eth0",
        ])
        .status()
        .unwrap();
    assert!(wired.success());
    common::ok(&["start", &name]);
    let (from, got) = server.join().unwrap();
    assert_eq!(
        (from.as_str(), got.as_str()),
        ("10.0.7.2", "hello from the container\n")
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while common::status(&name) != "stopped" {
        assert!(std::time::Instant::now() < deadline, "{name} never stopped");
        std::thread::sleep(Duration::from_millis(100));
    }
    let state = husk_runtime::state::ContainerState::load(&common::root(), &name).unwrap();
    assert_eq!(state.exit_status, Some(0), "{:?}", state.error);
    common::ok(&["delete", &name]);
}

/// The guest's frames reach the namespace's interface only from its own
/// MAC and addresses: a container (with CAP_NET_ADMIN and CAP_NET_RAW)
/// that takes another address, or another MAC, gets no datagram to a peer
/// (not even its ARP request through); back on its own address, its
/// datagram arrives (so what stopped the others was the filter).
#[test]
fn a_guest_that_takes_another_address_or_mac_reaches_nobody() {
    let (ns, peer) = (Netns::new("spoof"), Netns::new("spoof-peer"));
    wire(&ns, &peer);
    // busybox's nc has no UDP; its nslookup sends the name asked for in a
    // UDP datagram to the server given (port 53), which is all this needs.
    let udp = peer.run(|| std::net::UdpSocket::bind("10.0.5.1:53").unwrap());
    let send = |what: &str| format!("timeout 3 nslookup {what} 10.0.5.1 >/dev/null 2>&1");
    let mac = ns.output("cat", &["/sys/class/net/eth0/address"]);
    let script = format!(
        "ip addr del 10.0.5.2/24 dev eth0; ip addr add 10.0.5.77/24 dev eth0; \
         ip route add default via 10.0.5.1; {}; \
         ip addr del 10.0.5.77/24 dev eth0; ip addr add 10.0.5.2/24 dev eth0; \
         ip link set eth0 down; ip link set eth0 address 02:00:00:00:00:99 || echo no-mac-change; \
         ip link set eth0 up; ip route add default via 10.0.5.1; {}; \
         ip link set eth0 down; ip link set eth0 address {} || echo no-mac-change; \
         ip link set eth0 up; ip route add default via 10.0.5.1; {}; echo done",
        send("from-another-address"),
        send("from-another-mac"),
        mac.trim(),
        send("from-the-guest-itself"),
    );
    let bundle = Bundle::new("net-spoof", &["sh", "-c", &script], |spec| {
        in_netns(spec, &ns.path());
        let mut process = spec.process().clone().unwrap();
        let mut caps = process.capabilities().clone().unwrap_or_default();
        let add = |set: Option<oci_spec::runtime::Capabilities>| {
            let mut set = set.unwrap_or_default();
            set.insert(oci_spec::runtime::Capability::NetAdmin);
            // busybox's `ip link set address` opens a packet socket.
            set.insert(oci_spec::runtime::Capability::NetRaw);
            Some(set)
        };
        caps.set_bounding(add(caps.bounding().clone()));
        caps.set_effective(add(caps.effective().clone()));
        caps.set_permitted(add(caps.permitted().clone()));
        process.set_capabilities(Some(caps));
        spec.set_process(Some(process));
    });
    let name = id("net-spoof");
    let out = husk(&["run", "--bundle", bundle.0.to_str().unwrap(), &name]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout), "done\n", "{said}");
    // Only the guest's own datagram arrived.
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    while let Ok((n, from)) = udp.recv_from(&mut buf) {
        let asked = [
            "from-another-address",
            "from-another-mac",
            "from-the-guest-itself",
        ]
        .into_iter()
        .find(|name| buf[..n].windows(name.len()).any(|w| w == name.as_bytes()));
        got.push((from.ip().to_string(), asked.unwrap_or("?")));
        udp.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
    }
    assert!(
        !got.is_empty(),
        "the guest's own query never arrived: {said}"
    );
    assert!(
        got.iter()
            .all(|g| *g == ("10.0.5.2".to_owned(), "from-the-guest-itself")),
        "{got:?}: {said}"
    );
}

/// A checkpoint of a container whose spec names a namespace is restored
/// into that namespace: new TAPs, the same interface, and the process
/// goes on talking to its peer.
#[test]
fn a_restored_checkpoint_is_joined_to_its_namespace_again() {
    let (ns, peer) = (Netns::new("ckpt-net"), Netns::new("ckpt-net-peer"));
    wire(&ns, &peer);
    let listener = peer.run(|| TcpListener::bind("10.0.5.1:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut line = String::new();
            let _ = BufReader::new(&conn).read_line(&mut line);
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let script =
        format!("i=0; while true; do i=$((i+1)); echo n$i | nc 10.0.5.1 {port}; sleep 1; done");
    let bundle = Bundle::new("net-ckpt", &["sh", "-c", &script], |spec| {
        in_netns(spec, &ns.path())
    });
    let b = bundle.0.to_str().unwrap();
    let name = id("net-ckpt");
    common::ok(&["run", "-d", "--bundle", b, &name]);
    let first = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a first line");
    assert!(first.starts_with('n'), "{first:?}");
    let image = std::env::temp_dir().join(format!("husk-net-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&image);
    common::ok(&["checkpoint", "--image-path", image.to_str().unwrap(), &name]);
    common::ok(&["delete", &name]);
    // Stopped: its redirection is gone with its TAP.
    let qdiscs = ns.output("tc", &["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    while rx.try_recv().is_ok() {}
    common::ok(&[
        "restore",
        "-d",
        "--image-path",
        image.to_str().unwrap(),
        "--bundle",
        b,
        &name,
    ]);
    let again = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a line after the restore");
    let n = |line: &str| line.trim().trim_start_matches('n').parse::<u64>().unwrap();
    assert!(n(&again) > n(&first), "{first:?} then {again:?}");
    common::ok(&["delete", "--force", &name]);
    let _ = std::fs::remove_dir_all(&image);
    let qdiscs = ns.output("tc", &["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
}

/// A spec without a network namespace asks for the host's network, which a
/// VM cannot share: the container gets loopback only (as `husk features`
/// says), working, and nothing of the host's.
#[test]
fn a_spec_without_a_network_namespace_gets_loopback_only() {
    let bundle = Bundle::new(
        "net-none",
        &[
            "sh",
            "-c",
            "ls /sys/class/net; httpd -p 127.0.0.1:8080 -h /etc && \
             wget -q -O - http://127.0.0.1:8080/group | grep -q root && echo lo-ok",
        ],
        |spec| {
            let mut linux = spec.linux().clone().unwrap();
            let mut namespaces = linux.namespaces().clone().unwrap();
            namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
            linux.set_namespaces(Some(namespaces));
            spec.set_linux(Some(linux));
        },
    );
    let name = id("net-none");
    let out = husk(&["run", "--bundle", bundle.0.to_str().unwrap(), &name]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert_eq!(text(&out.stdout), "lo\nlo-ok\n", "{said}");
    let features: serde_json::Value = serde_json::from_str(&common::ok(&["features"])).unwrap();
    let says = features["annotations"]["io.husk.network"].as_str().unwrap();
    assert!(says.contains("loopback only"), "{says}");
}
