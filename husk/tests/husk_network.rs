//! husk's own networks (`husk network`, `husk run --network -p`), on
//! Debian's CNI plugins: a web server published on the host's
//! 127.0.0.1, containers reaching each other by name and a server on the
//! host, isolation between networks, and every piece gone after `rm -f`
//! of a container whose monitor was killed and `network rm`. Each test
//! has a root of its own; its networks take free subnets (claimed
//! host-wide, so tests in parallel never share one).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Husk, text};

/// Whether any iptables rule (any table) mentions `what`.
fn iptables_mention(what: &str) -> Vec<String> {
    let out = std::process::Command::new("iptables-save")
        .output()
        .unwrap();
    text(&out.stdout)
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_owned)
        .collect()
}

fn link_exists(name: &str) -> bool {
    std::process::Command::new("ip")
        .args(["link", "show", name])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// `husk network inspect NAME`'s first object.
fn inspect_network(husk: &Husk, name: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&husk.ok(&["network", "inspect", name])).unwrap();
    v[0].clone()
}

/// A container's address, from `husk inspect`.
fn address(husk: &Husk, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&husk.ok(&["inspect", name])).unwrap();
    v[0]["NetworkSettings"]["IPAddress"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A one-connection HTTP server on `ip`: its port, and the thread that
/// gives the client's address.
fn serve_once(ip: &str, body: &'static str) -> (u16, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (conn, from) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        let reply = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        (&conn).write_all(reply.as_bytes()).unwrap();
        from.ip().to_string()
    });
    (port, server)
}

/// The addresses host-local holds leased on network `net`.
fn leases(husk: &Husk, net: &str) -> Vec<String> {
    std::fs::read_dir(husk.root.join("networks/ipam").join(net))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.parse::<std::net::IpAddr>().is_ok())
        .collect()
}

const WEB: &str =
    "mkdir -p /www && echo hello from $(hostname) > /www/index.html && exec httpd -f -p 80 -h /www";

#[test]
fn a_published_web_server_answers_and_containers_find_each_other_by_name() {
    let husk = Husk::new("net-web");
    husk.ok(&["network", "create", "front"]);
    let net = inspect_network(&husk, "front");
    let gateway = net["IPAM"]["Config"][0]["Gateway"]
        .as_str()
        .unwrap()
        .to_owned();
    let bridge = net["Options"]["bridge"].as_str().unwrap().to_owned();
    let port = husk_test_support::free_port();
    let publish = format!("127.0.0.1:{port}:80");
    husk.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--hostname",
        "webhost",
        "--network",
        "front",
        "-p",
        &publish,
        "husk/busybox",
        "sh",
        "-c",
        WEB,
    ]);
    // Through the published port on the host's loopback, and at its
    // address on the bridge.
    let page = husk_test_support::http_get(&format!("127.0.0.1:{port}"), Duration::from_secs(60));
    assert!(page.contains("hello from webhost"), "{page}");
    let ip = address(&husk, "web");
    assert!(
        net["IPAM"]["Config"][0]["Subnet"]
            .as_str()
            .unwrap()
            .starts_with(&ip[..ip.rfind('.').unwrap()])
    );
    assert!(
        husk_test_support::http_get(&format!("{ip}:80"), Duration::from_secs(30))
            .contains("webhost")
    );
    assert_eq!(
        inspect_network(&husk, "front")["Containers"]["web"]["IPv4Address"],
        ip.as_str()
    );

    // A second container finds it by name, and a server on the host
    // through the gateway; it comes from its own address. (busybox's
    // `wget -T` crashes in Debian's static build: the test's own limit
    // on the run bounds it.)
    let (host_port, server) = serve_once(&gateway, "from the host");
    let script = format!(
        "wget -q -O- http://web/ && wget -q -O- http://{gateway}:{host_port}/ && cat /etc/resolv.conf"
    );
    let out = husk.ok(&[
        "run",
        "--rm",
        "--name",
        "client",
        "--network",
        "front",
        "--add-host",
        "extra.test:10.1.2.3",
        "--dns",
        "10.9.9.9",
        "husk/busybox",
        "sh",
        "-c",
        &format!("{script} && grep extra.test /etc/hosts"),
    ]);
    assert!(out.contains("hello from webhost"), "{out}");
    assert!(out.contains("from the host"), "{out}");
    assert!(out.contains("nameserver 10.9.9.9"), "{out}");
    assert!(out.contains("10.1.2.3\textra.test"), "{out}");
    let from = server.join().unwrap();
    assert!(
        from.starts_with(&ip[..ip.rfind('.').unwrap()]) && from != ip,
        "{from}"
    );
    assert!(
        !husk.root.join("docker/client").exists(),
        "--rm left the client"
    );

    // A container joining later is written into the first one's hosts
    // file (seen in its guest once the file system's cache lets go).
    husk.ok(&[
        "run",
        "-d",
        "--name",
        "db",
        "--network",
        "front",
        "husk/busybox",
        "sleep",
        "600",
    ]);
    let db = address(&husk, "db");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hosts = husk.ok(&["exec", "web", "cat", "/etc/hosts"]);
        if hosts.contains(&format!("{db}\tdb")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web's hosts never named db: {hosts}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let err = husk.fails(&["network", "rm", "front"]);
    assert!(err.contains("in use by") && err.contains("web"), "{err}");

    // A monitor killed with SIGKILL: rm -f still takes everything away.
    let state: serde_json::Value = serde_json::from_str(&husk.ok(&["state", "web"])).unwrap();
    let monitor = state["pid"].as_u64().unwrap() as u32;
    husk_test_support::kill(monitor, rustix::process::Signal::KILL);
    // The plugins' rules for it: its address (masquerade, firewall,
    // DNAT's target) and its published port. Seen before, gone after.
    let rules = || {
        let mut r = iptables_mention(&format!("{ip}/32"));
        r.extend(iptables_mention(&format!("{ip}:")));
        r.extend(iptables_mention(&format!("--dport {port} ")));
        r
    };
    assert!(!iptables_mention(&format!("{ip}/32")).is_empty());
    assert!(!iptables_mention(&format!("--dport {port} ")).is_empty());
    husk.ok(&["rm", "-f", "web", "db"]);
    assert!(rules().is_empty(), "{:?}", rules());
    let netns = husk.root.join("netns");
    assert_eq!(
        std::fs::read_dir(&netns).unwrap().count(),
        0,
        "a namespace was left"
    );
    assert!(
        inspect_network(&husk, "front")["Containers"]
            .as_object()
            .unwrap()
            .is_empty()
    );
    // Its address is free again: host-local holds no lease.
    assert!(
        leases(&husk, "front").is_empty(),
        "{:?}",
        leases(&husk, "front")
    );
    assert!(link_exists(&bridge));
    husk.ok(&["network", "rm", "front"]);
    assert!(!link_exists(&bridge), "the bridge stayed");
    assert!(
        iptables_mention(&bridge).is_empty(),
        "{:?}",
        iptables_mention(&bridge)
    );
}

#[test]
fn networks_are_isolated_none_is_loopback_only_and_bridge_is_the_default() {
    let husk = Husk::new("net-isolated");
    husk.ok(&["network", "create", "a"]);
    husk.ok(&["network", "create", "b"]);
    husk.ok(&[
        "run",
        "-d",
        "--name",
        "srv",
        "--network",
        "a",
        "husk/busybox",
        "sh",
        "-c",
        WEB,
    ]);
    let ip = address(&husk, "srv");
    husk_test_support::http_get(&format!("{ip}:80"), Duration::from_secs(60));
    // Reached from its own network, not from another one (the same
    // request both ways; nc gives up after 5 s where wget would wait out
    // TCP's retries, and busybox's `timeout` does not cut a connect short).
    let fetch = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 80");
    let out = husk.ok(&[
        "run",
        "--rm",
        "--network",
        "a",
        "husk/busybox",
        "sh",
        "-c",
        &fetch,
    ]);
    assert!(out.contains("hello from"), "{out}");
    let out = husk.run(&[
        "run",
        "--rm",
        "--network",
        "b",
        "husk/busybox",
        "sh",
        "-c",
        &fetch,
    ]);
    assert!(
        !out.status.success() && !text(&out.stdout).contains("hello from"),
        "network b reached network a: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        text(&out.stderr)
    );
    // The default network is made on first use.
    let out = husk.ok(&[
        "run",
        "--rm",
        "husk/busybox",
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
        "eth0",
    ]);
    let subnet = inspect_network(&husk, "bridge")["IPAM"]["Config"][0]["Subnet"]
        .as_str()
        .unwrap()
        .to_owned();
    let prefix = &subnet[..subnet.rfind('.').unwrap()];
    assert!(
        out.contains(&format!("inet {prefix}.")),
        "{out} not in {subnet}"
    );
    // --network none: loopback only.
    let out = husk.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "husk/busybox",
        "cat",
        "/proc/net/dev",
    ]);
    let ifaces: Vec<&str> = out
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "{out}");
    husk.ok(&["rm", "-f", "srv"]);
    for n in ["a", "b", "bridge"] {
        husk.ok(&["network", "rm", n]);
    }
    assert!(husk.ok(&["network", "ls", "-q"]).trim().is_empty());
}

/// Nothing of a refused run is left: no container, no namespace, no rule.
fn nothing_left(husk: &Husk, root: &Path) {
    let entries = |d: &str| {
        std::fs::read_dir(root.join(d))
            .into_iter()
            .flatten()
            .count()
    };
    assert_eq!(entries("docker"), 0, "a container was left");
    assert_eq!(entries("netns"), 0, "a namespace was left");
    assert!(husk.ok(&["ps", "-a", "-q"]).trim().is_empty());
}

#[test]
fn bad_network_input_is_named_and_leaves_nothing() {
    let husk = Husk::new("net-bad");
    let root = husk.root.clone();
    for (args, says) in [
        (
            vec!["-p", "x:80"],
            "-p \"x:80\": the host port \"x\" is not a port",
        ),
        (vec!["-p", "80/sctp"], "unknown protocol \"sctp\""),
        (vec!["-p", "1000-1010:80"], "port ranges are not supported"),
        (vec!["--network", "nowhere"], "no such network: \"nowhere\""),
        (
            vec!["--network", "host"],
            "cannot share the host's network stack",
        ),
        (
            vec!["--network", "none", "-p", "8080:80"],
            "-p needs a network",
        ),
        (
            vec!["--add-host", "nohost"],
            "--add-host \"nohost\": expected HOST:IP",
        ),
        (
            vec!["--dns", "one.one"],
            "--dns \"one.one\": not an IP address",
        ),
        (vec!["--hostname", "a b"], "--hostname \"a b\""),
    ] {
        let mut all = vec!["run", "--rm"];
        all.extend(args);
        all.extend(["husk/busybox", "true"]);
        let err = husk.fails(&all);
        assert!(err.contains(says), "{all:?}: {err}");
        nothing_left(&husk, &root);
    }
    // A published port something on the host holds.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let err = husk.fails(&[
        "run",
        "--rm",
        "-p",
        &format!("127.0.0.1:{port}:80"),
        "husk/busybox",
        "true",
    ]);
    assert!(
        err.contains(&format!(
            "host port 127.0.0.1:{port} (tcp) is already in use"
        )),
        "{err}"
    );
    nothing_left(&husk, &root);
    assert!(iptables_mention(&format!("--dport {port} ")).is_empty());
    // Networks: a bad name, subnet or gateway, one twice, one unknown.
    for (args, says) in [
        (vec!["create", "none"], "is not a network name"),
        (
            vec!["create", "--subnet", "10.1.2.3/24", "x"],
            "host bits are set",
        ),
        (
            vec!["create", "--subnet", "300.1.2.0/24", "x"],
            "not an IPv4 address",
        ),
        (
            vec![
                "create",
                "--subnet",
                "10.99.77.0/24",
                "--gateway",
                "10.98.0.1",
                "x",
            ],
            "not a host address in it",
        ),
        (vec!["rm", "nowhere"], "no such network"),
        (vec!["inspect", "nowhere"], "no such network"),
    ] {
        let mut all = vec!["network"];
        all.extend(args);
        let err = husk.fails(&all);
        assert!(err.contains(says), "{all:?}: {err}");
    }
    husk.ok(&["network", "create", "twice"]);
    assert!(
        husk.fails(&["network", "create", "twice"])
            .contains("already exists")
    );
    // Another root's network holds its subnet.
    let subnet = inspect_network(&husk, "twice")["IPAM"]["Config"][0]["Subnet"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = Husk::new("net-bad-other");
    let err = other.fails(&["network", "create", "--subnet", &subnet, "mine"]);
    assert!(err.contains("overlaps network \"twice of root"), "{err}");
    husk.ok(&["network", "rm", "twice"]);
    other.ok(&["network", "create", "--subnet", &subnet, "mine"]);
}

#[test]
fn no_tun_device_is_named_and_leaves_nothing() {
    let husk = Husk::new("net-notun");
    husk.ok(&["network", "create", "n"]);
    // /dev/net hidden under an empty tmpfs, in a mount namespace of this
    // run's own.
    let line = format!(
        "mount -t tmpfs none /dev/net && exec {} --root {} run --rm --network n husk/busybox true",
        common::HUSK,
        husk.root.display()
    );
    let child = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &line])
        .env(husk_guest::warm::CACHE_ENV, common::root())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::output_within(
        child,
        Duration::from_secs(120),
        "husk run without /dev/net/tun",
    );
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("open TAP husk-tap0: /dev/net/tun: No such file"),
        "{err}"
    );
    nothing_left(&husk, &husk.root);
    assert!(
        inspect_network(&husk, "n")["Containers"]
            .as_object()
            .unwrap()
            .is_empty()
    );
    assert!(leases(&husk, "n").is_empty(), "{:?}", leases(&husk, "n"));
}
