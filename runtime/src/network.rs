//! A container's network in OCI mode (docs/networking.md): the spec names
//! a network namespace made by its client (podman, CRI, CNI, `ip netns`);
//! each Ethernet interface found there is joined to a TAP of the VM's in
//! the same namespace by traffic-control redirection both ways (an ingress
//! qdisc and a match-all u32 filter whose action is `mirred egress
//! redirect`, Kata's "tcfilter" model), and the guest's interface takes
//! the interface's name, MAC, MTU, addresses and routes.
//!
//! The namespace's interfaces are read and the filters set with iproute2's
//! `ip` and `tc` run inside the namespace (started from a thread that
//! entered it):
//! the JSON `ip -j` prints is a stable interface, and `tc`'s u32 and
//! mirred encodings are what the kernel's own tools write. The TAPs are
//! opened by a short-lived thread that enters the namespace, so the
//! runtime's other threads stay where they are.

use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use husk_protocol::{NetInterface, NetRoute};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use rustix::thread::LinkNameSpaceType;
use serde_json::Value;
use thiserror::Error;

/// The most interfaces a container's VM takes (the VM's network slots).
pub const MAX_INTERFACES: usize = 4;
/// Names of the TAPs husk makes in a container's namespace: `husk-tap<N>`
/// for slot N. An interface of that name is never mirrored itself.
pub const TAP_PREFIX: &str = "husk-tap";

/// Errors setting up a container's network.
#[derive(Debug, Error)]
pub enum NetworkError {
    /// The spec's network namespace cannot be used.
    #[error("the network namespace {}: {why}", .path.display())]
    Namespace {
        /// The spec's path.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A step of joining an interface to the VM failed.
    #[error("the network namespace {}: {step}: {why}", .path.display())]
    Step {
        /// The spec's path.
        path: PathBuf,
        /// What was being done (names the interface).
        step: String,
        /// What failed.
        why: String,
    },
}

/// How the spec asks for the container's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// No network namespace: the host's network, which a VM cannot share.
    /// The container gets the guest's loopback only (docs/networking.md).
    Host,
    /// A new, empty namespace: loopback only.
    New,
    /// The namespace at this path, made by the client: its interfaces are
    /// mirrored into the guest.
    Path(PathBuf),
}

/// The spec's network mode.
pub fn mode(spec: &Spec) -> Mode {
    let ns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|n| n.iter().find(|ns| ns.typ() == LinuxNamespaceType::Network));
    match ns {
        None => Mode::Host,
        Some(ns) => match ns.path() {
            Some(p) if !p.as_os_str().is_empty() => Mode::Path(p.clone()),
            _ => Mode::New,
        },
    }
}

/// The spec's JSON with its network namespace taken out: the container
/// runs in the guest's own namespace, which holds the mirrored
/// interfaces (the agent refuses a namespace path, which names a host
/// file).
pub fn without_network_namespace(spec_json: &str) -> Result<String, String> {
    let mut spec: Value = serde_json::from_str(spec_json).map_err(|e| format!("the spec: {e}"))?;
    if let Some(list) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        list.retain(|ns| ns.get("type").and_then(Value::as_str) != Some("network"));
    }
    serde_json::to_string(&spec).map_err(|e| format!("the spec: {e}"))
}

/// A namespace's interfaces joined to TAPs for the VM.
pub struct Mirror {
    /// The namespace's path (the spec's).
    pub path: PathBuf,
    /// One TAP per interface, in slot order, for `husk-vmm --net SLOT=FD`.
    pub taps: Vec<OwnedFd>,
    /// What the guest's interfaces take, for the agent's `network`.
    pub interfaces: Vec<NetInterface>,
}

/// Opens the namespace at `path`, refusing what is not a network
/// namespace and the host's own.
pub fn open(path: &Path) -> Result<OwnedFd, NetworkError> {
    let bad = |why: String| NetworkError::Namespace {
        path: path.to_owned(),
        why,
    };
    let ns = husk_sys::net::open_netns(path).map_err(|e| bad(e.to_string()))?;
    if husk_sys::net::is_hosts_netns(&ns).map_err(|e| bad(e.to_string()))? {
        return Err(bad(
            "is the host's own: a microVM cannot share the host's network stack (host networking is not supported)"
                .into(),
        ));
    }
    Ok(ns)
}

/// Mirrors the Ethernet interfaces of the namespace at `path` (at most
/// [`MAX_INTERFACES`]): for each, a TAP `husk-tap<slot>` in the namespace,
/// up, with the interface's MTU, and redirection both ways. A namespace
/// with no such interface gives an empty mirror (loopback only).
pub fn mirror(path: &Path) -> Result<Mirror, NetworkError> {
    let ns = open(path)?;
    mirror_in(ns, path, MAX_INTERFACES)
}

/// Moves this thread (the monitor's main thread, before it starts
/// anything) into a new, empty network namespace: the namespace a spec
/// without a path asks for, where clients put the container's interfaces
/// after `create` (docker's prestart hook, `ctr run --cni`) through
/// `/proc/<state pid>/ns/net`. The VMM, started from this thread, is in it
/// too.
pub fn unshare() -> std::io::Result<()> {
    // SAFETY: CLONE_NEWNET only: no descriptor table or filesystem state
    // is unshared under the feet of the process's other threads.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .map_err(Into::into)
}

/// The network namespace file of process `pid`.
pub fn netns_of(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// [`mirror`] of the namespace husk made for a container (process
/// `pid`'s, after [`unshare`]: not the host's), into a VM with `slots`
/// network slots.
pub fn mirror_made(pid: u32, slots: usize) -> Result<Mirror, NetworkError> {
    let path = netns_of(pid);
    // Most containers get no interface: the kernel's list of the
    // namespace's interfaces says so without running `ip` (three
    // processes).
    let listed = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap_or_default();
    if only_loopback(&listed) {
        return Ok(Mirror {
            path,
            taps: Vec::new(),
            interfaces: Vec::new(),
        });
    }
    let ns = husk_sys::net::open_netns(&path).map_err(|e| NetworkError::Namespace {
        path: path.clone(),
        why: e.to_string(),
    })?;
    mirror_in(ns, &path, slots)
}

/// Mirrors what is in the namespace husk made for the container whose
/// monitor is `pid` into its running VM (state directory `dir`): each TAP
/// bound to a slot through the VMM's API, then the agent's `network`
/// over `control`. None when the namespace has only loopback; on a
/// failure, nothing is left joined.
pub fn into_vm(
    dir: &Path,
    control: &mut crate::sandbox::Control,
    pid: u32,
    slots: u8,
) -> Result<Option<crate::state::NetworkState>, String> {
    let mirror = mirror_made(pid, slots as usize).map_err(|e| e.to_string())?;
    if mirror.interfaces.is_empty() {
        return Ok(None);
    }
    let links: Vec<String> = mirror.interfaces.iter().map(|i| i.name.clone()).collect();
    let attached = mirror.taps.iter().enumerate().try_for_each(|(slot, tap)| {
        crate::sandbox::vmm_api_with(
            dir,
            &husk_protocol::api::ApiRequest::AttachNet { slot: slot as u8 },
            Some(tap.as_fd()),
        )
    });
    let configured = attached.and_then(|()| {
        control.expect_ok(&husk_protocol::Request::Network {
            interfaces: mirror.interfaces.clone(),
        })
    });
    if let Err(e) = configured {
        unmirror(&mirror.path, &links);
        return Err(format!(
            "the container's network: {}",
            crate::error_chain(&e)
        ));
    }
    Ok(Some(crate::state::NetworkState {
        netns: mirror.path,
        links,
    }))
}

fn mirror_in(ns: OwnedFd, path: &Path, slots: usize) -> Result<Mirror, NetworkError> {
    let step = |step: &str, why: String| NetworkError::Step {
        path: path.to_owned(),
        step: step.to_owned(),
        why,
    };
    let links = in_netns_json(&ns, "ip", &["-j", "-d", "address", "show"])
        .map_err(|e| step("list its interfaces", e))?;
    let mut routes = in_netns_json(&ns, "ip", &["-j", "-4", "route", "show", "table", "main"])
        .map_err(|e| step("list its IPv4 routes", e))?;
    routes.extend(
        in_netns_json(&ns, "ip", &["-j", "-6", "route", "show", "table", "main"])
            .map_err(|e| step("list its IPv6 routes", e))?,
    );
    let found = interfaces(&links, &routes).map_err(|e| step("read its interfaces", e))?;
    if found.len() > slots {
        let why = if slots == MAX_INTERFACES {
            format!("a container's VM takes at most {MAX_INTERFACES}")
        } else {
            format!(
                "a container whose namespace husk made takes {slots} (its VM was started before they were known)"
            )
        };
        return Err(step(
            "count its interfaces",
            format!("{} Ethernet interfaces; {why}", found.len()),
        ));
    }
    let mut taps = Vec::new();
    let mut joined = Vec::new();
    let undo = |joined: &[String]| {
        for link in joined {
            let _ = unjoin(&ns, link);
        }
    };
    for iface in &found {
        let tap_name = format!("{TAP_PREFIX}{}", iface.slot);
        let tap = open_tap_in(&ns, &tap_name)
            .map_err(|e| step(&format!("open TAP {tap_name}"), e.to_string()));
        let tap = match tap.and_then(|tap| {
            join(&ns, iface, &tap_name)
                .map_err(|e| step(&format!("join {} to {tap_name}", iface.name), e))?;
            Ok(tap)
        }) {
            Ok(tap) => tap,
            Err(e) => {
                undo(&joined);
                let _ = unjoin(&ns, &iface.name);
                return Err(e);
            }
        };
        joined.push(iface.name.clone());
        taps.push(tap);
    }
    Ok(Mirror {
        path: path.to_owned(),
        taps,
        interfaces: found,
    })
}

/// Takes the redirection off the interfaces `links` of the namespace at
/// `path` (the TAPs go with the VMM's descriptors). A namespace that no
/// longer exists has nothing left to undo.
pub fn unmirror(path: &Path, links: &[String]) {
    if links.is_empty() {
        return;
    }
    let Ok(ns) = husk_sys::net::open_netns(path) else {
        return;
    };
    for link in links {
        let _ = unjoin(&ns, link);
    }
}

/// Whether `/proc/net/dev` text lists no interface but `lo` (text that is
/// not that list is not taken for it).
fn only_loopback(dev: &str) -> bool {
    let mut names = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim()));
    dev.lines().count() > 2 && names.all(|n| n == "lo")
}

/// The guest interfaces for the namespace's Ethernet interfaces (`ip -j
/// address` output) and routes (`ip -j route`), in the order listed.
fn interfaces(links: &[Value], routes: &[Value]) -> Result<Vec<NetInterface>, String> {
    let mut out = Vec::new();
    for link in links {
        let name = link["ifname"].as_str().unwrap_or_default();
        let tun = link.pointer("/linkinfo/info_kind").and_then(Value::as_str) == Some("tun");
        if link["link_type"].as_str() != Some("ether") || tun || name.starts_with(TAP_PREFIX) {
            continue;
        }
        let mac = link["address"]
            .as_str()
            .and_then(husk_protocol::parse_mac)
            .ok_or_else(|| format!("{name} has no MAC address"))?;
        let mtu = link["mtu"].as_u64().unwrap_or(1500) as u32;
        let addresses = link["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["scope"].as_str() == Some("global"))
            .filter_map(|a| {
                let ip: IpAddr = a["local"].as_str()?.parse().ok()?;
                Some((ip, a["prefixlen"].as_u64()? as u8))
            })
            .collect();
        let routes = routes
            .iter()
            .filter(|r| r["dev"].as_str() == Some(name))
            .filter(|r| r["protocol"].as_str() != Some("kernel"))
            .filter_map(route)
            .collect();
        out.push(NetInterface {
            slot: out.len() as u8,
            name: name.to_owned(),
            mac,
            mtu,
            addresses,
            routes,
        });
    }
    Ok(out)
}

/// One `ip -j route` entry as the agent takes it.
fn route(r: &Value) -> Option<NetRoute> {
    let gateway: Option<IpAddr> = match r["gateway"].as_str() {
        Some(g) => Some(g.parse().ok()?),
        None => None,
    };
    let six =
        gateway.is_some_and(|g| g.is_ipv6()) || r["dst"].as_str().is_some_and(|d| d.contains(':'));
    let (dst, prefix) = match r["dst"].as_str()? {
        "default" if six => ("::".parse().ok()?, 0),
        "default" => ("0.0.0.0".parse().ok()?, 0),
        d => match d.split_once('/') {
            Some((ip, len)) => (ip.parse().ok()?, len.parse().ok()?),
            None => {
                let ip: IpAddr = d.parse().ok()?;
                (ip, if ip.is_ipv6() { 128 } else { 32 })
            }
        },
    };
    Some(NetRoute {
        dst,
        prefix,
        gateway,
        metric: r["metric"].as_u64().unwrap_or(0) as u32,
    })
}

/// Redirects everything `iface` receives to `tap`, and what `tap`
/// receives (the guest's frames) to `iface` only when it is the guest's
/// own: its MAC, and for IPv4 and ARP one of its addresses, for IPv6 one
/// of its addresses, a link-local one or the unspecified one (duplicate
/// address detection). A frame that matches no filter is not redirected:
/// it goes up the TAP's side of the namespace's stack, where the TAP has
/// no address, IPv6 is off, ARP answers nothing and nothing received on
/// it is forwarded, and dies there (this kernel has no `gact` action to
/// drop it outright). Brings the TAP up
/// with the interface's MTU. Two processes: `ip`, and `tc` in batch mode.
fn join(ns: &OwnedFd, iface: &NetInterface, tap: &str) -> Result<(), String> {
    let mtu = iface.mtu.to_string();
    in_netns(
        ns,
        "ip",
        &["link", "set", "dev", tap, "mtu", &mtu, "up"],
        None,
    )?;
    // What no filter passes goes up the TAP's side of the stack: it must
    // die there. A new namespace inherits the host's IPv4 settings, and a
    // host that forwards would forward it (seen in the spoofing test).
    for (key, value) in [
        (format!("ipv6/conf/{tap}/disable_ipv6"), "1"),
        (format!("ipv4/conf/{tap}/forwarding"), "0"),
        (format!("ipv4/conf/{tap}/rp_filter"), "1"),
        (format!("ipv4/conf/{tap}/arp_ignore"), "8"),
    ] {
        sysctl_in(ns, &key, value).map_err(|e| format!("net.{key}: {e}"))?;
    }
    in_netns(ns, "tc", &["-batch", "-"], Some(&filters(iface, tap)))?;
    Ok(())
}

/// The `tc -batch` lines of [`join`].
fn filters(iface: &NetInterface, tap: &str) -> String {
    let link = iface.name.as_str();
    let redirect = |to: &str| format!("action mirred egress redirect dev {to}");
    let m = iface.mac;
    // The Ethernet source, before the network header: bytes -8 to -3
    // (u32 keys are whole aligned words: -8..-4, then half of -4..0).
    let from_mac = format!(
        "match u32 0x{:02x}{:02x}{:02x}{:02x} 0xffffffff at -8 match u16 0x{:02x}{:02x} 0xffff at -4",
        m[0], m[1], m[2], m[3], m[4], m[5]
    );
    let mut lines = vec![
        format!("qdisc add dev {link} ingress"),
        format!(
            "filter add dev {link} parent ffff: protocol all prio 1 u32 match u8 0 0 {}",
            redirect(tap)
        ),
        format!("qdisc add dev {tap} ingress"),
        // Loopback destinations first: a match with no action ends the
        // classification unredirected (the TAP's dead end), so no frame
        // of the guest reaches a 127.0.0.0/8 or ::1 service through the
        // namespace, whatever a later filter would pass.
        format!(
            "filter add dev {tap} parent ffff: protocol ip prio 1 u32 match ip dst 127.0.0.0/8"
        ),
        format!("filter add dev {tap} parent ffff: protocol ipv6 prio 2 u32 match ip6 dst ::1/128"),
    ];
    let guest = |protocol: &str, prio: u8, matches: String| {
        format!(
            "filter add dev {tap} parent ffff: protocol {protocol} prio {prio} u32 {from_mac} {matches} {}",
            redirect(link)
        )
    };
    let mut v6 = vec!["fe80::/10".to_owned(), "::/128".to_owned()];
    for (ip, _) in &iface.addresses {
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                // ARP's sender protocol address is bytes 14 to 17 (two
                // halves: keys do not cross an aligned word).
                lines.push(guest(
                    "arp",
                    3,
                    format!(
                        "match u16 0x{a:02x}{b:02x} 0xffff at 14 match u16 0x{c:02x}{d:02x} 0xffff at 16"
                    ),
                ));
                lines.push(guest("ip", 4, format!("match ip src {v4}/32")));
            }
            IpAddr::V6(v6addr) => v6.push(format!("{v6addr}/128")),
        }
    }
    for src in v6 {
        lines.push(guest("ipv6", 5, format!("match ip6 src {src}")));
    }
    lines.join("\n") + "\n"
}

/// Runs `work` on a short-lived thread that entered the network
/// namespace `ns`, so no other thread leaves its own (what it opens or
/// starts there stays in `ns`).
pub(crate) fn on_thread_in<T: Send>(
    ns: &OwnedFd,
    work: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    let ns = ns.as_fd();
    std::thread::scope(|s| {
        s.spawn(|| {
            rustix::thread::move_into_link_name_space(ns, Some(LinkNameSpaceType::Network))?;
            work()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the thread panicked")))
    })
}

/// Writes `value` to `/proc/sys/net/<key>` of the namespace `ns` (from a
/// thread that entered it: /proc/sys/net is the opener's namespace's).
fn sysctl_in(ns: &OwnedFd, key: &str, value: &str) -> std::io::Result<()> {
    on_thread_in(ns, || std::fs::write(format!("/proc/sys/net/{key}"), value))
}

/// Takes the ingress qdisc (and with it the redirection) off `link`.
fn unjoin(ns: &OwnedFd, link: &str) -> Result<(), String> {
    in_netns(ns, "tc", &["qdisc", "del", "dev", link, "ingress"], None).map(|_| ())
}

/// Opens TAP `name` in the namespace `ns`, from a thread that enters it.
fn open_tap_in(ns: &OwnedFd, name: &str) -> std::io::Result<OwnedFd> {
    on_thread_in(ns, || husk_sys::net::open_tap(name))
}

/// Runs `program args` in the namespace `ns` (started from a thread that
/// entered it: a child is born in its parent thread's namespace); its
/// stdout, or what it said when it failed.
pub(crate) fn in_netns(
    ns: &OwnedFd,
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, String> {
    let out = on_thread_in(ns, || {
        let mut child = Command::new(program)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            std::io::Write::write_all(&mut stdin, text.as_bytes())?;
        }
        child.wait_with_output()
    })
    .map_err(|e| format!("{program} {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`in_netns`] for `ip -j`: its JSON array.
fn in_netns_json(ns: &OwnedFd, program: &str, args: &[&str]) -> Result<Vec<Value>, String> {
    let out = in_netns(ns, program, args, None)?;
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&out).map_err(|e| format!("{program} {}: {e}", args.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specs_namespace_decides_the_mode() {
        let spec = |ns: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":[{{"type":"pid"}}{ns}]}}}}"#
            ))
            .unwrap()
        };
        assert_eq!(mode(&spec("")), Mode::Host);
        assert_eq!(mode(&spec(r#",{"type":"network"}"#)), Mode::New);
        assert_eq!(
            mode(&spec(r#",{"type":"network","path":"/var/run/netns/x"}"#)),
            Mode::Path("/var/run/netns/x".into())
        );
        let no_linux: Spec = serde_json::from_str(r#"{"ociVersion":"1.0.2"}"#).unwrap();
        assert_eq!(mode(&no_linux), Mode::Host);
        let out = without_network_namespace(
            r#"{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/x"}]}}"#,
        )
        .unwrap();
        assert_eq!(out, r#"{"linux":{"namespaces":[{"type":"pid"}]}}"#);
    }

    #[test]
    fn a_namespace_with_loopback_only_is_seen_from_proc_net_dev() {
        let head = "Inter-|   Receive |  Transmit\n face |bytes    packets\n";
        assert!(only_loopback(&format!("{head}    lo:       0       0\n")));
        assert!(!only_loopback(&format!(
            "{head}    lo:       0       0\n  eth0: 1 2\n"
        )));
        assert!(!only_loopback(""));
        assert!(!only_loopback("garbage"));
    }

    #[test]
    fn the_guests_frames_pass_only_from_its_mac_and_addresses() {
        let iface = NetInterface {
            slot: 0,
            name: "eth0".into(),
            mac: [0x02, 0x42, 0x0a, 0x00, 0x05, 0x02],
            mtu: 1500,
            addresses: vec![
                ("10.0.5.2".parse().unwrap(), 24),
                ("fd05::2".parse().unwrap(), 64),
            ],
            routes: Vec::new(),
        };
        let text = filters(&iface, "husk-tap0");
        let mac = "match u32 0x02420a00 0xffffffff at -8 match u16 0x0502 0xffff at -4";
        let to_eth0 = "action mirred egress redirect dev eth0";
        let want = [
            "qdisc add dev eth0 ingress".to_owned(),
            "filter add dev eth0 parent ffff: protocol all prio 1 u32 match u8 0 0 action mirred egress redirect dev husk-tap0".to_owned(),
            "qdisc add dev husk-tap0 ingress".to_owned(),
            "filter add dev husk-tap0 parent ffff: protocol ip prio 1 u32 match ip dst 127.0.0.0/8".to_owned(),
            "filter add dev husk-tap0 parent ffff: protocol ipv6 prio 2 u32 match ip6 dst ::1/128".to_owned(),
            format!("filter add dev husk-tap0 parent ffff: protocol arp prio 3 u32 {mac} match u16 0x0a00 0xffff at 14 match u16 0x0502 0xffff at 16 {to_eth0}"),
            format!("filter add dev husk-tap0 parent ffff: protocol ip prio 4 u32 {mac} match ip src 10.0.5.2/32 {to_eth0}"),
            format!("filter add dev husk-tap0 parent ffff: protocol ipv6 prio 5 u32 {mac} match ip6 src fe80::/10 {to_eth0}"),
            format!("filter add dev husk-tap0 parent ffff: protocol ipv6 prio 5 u32 {mac} match ip6 src ::/128 {to_eth0}"),
            format!("filter add dev husk-tap0 parent ffff: protocol ipv6 prio 5 u32 {mac} match ip6 src fd05::2/128 {to_eth0}"),
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), want);
    }

    #[test]
    fn ethernet_interfaces_and_their_routes_are_read_from_ip_json() {
        let links: Vec<Value> = serde_json::from_str(
            r#"[{"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536,
                  "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
                 {"ifname":"eth0","link_type":"ether","address":"02:42:0a:00:05:02","mtu":1450,
                  "linkinfo":{"info_kind":"veth"},
                  "addr_info":[{"family":"inet","local":"10.0.5.2","prefixlen":24,"scope":"global"},
                               {"family":"inet6","local":"fd05::2","prefixlen":64,"scope":"global"},
                               {"family":"inet6","local":"fe80::42:aff:fe00:502","prefixlen":64,"scope":"link"}]},
                 {"ifname":"husk-tap0","link_type":"ether","address":"02:00:00:00:00:01","mtu":1500,
                  "linkinfo":{"info_kind":"tun"},"addr_info":[]}]"#,
        )
        .unwrap();
        let routes: Vec<Value> = serde_json::from_str(
            r#"[{"dst":"default","gateway":"10.0.5.1","dev":"eth0","flags":[]},
                 {"dst":"10.0.5.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.0.5.2"},
                 {"dst":"192.168.7.0/24","gateway":"10.0.5.9","dev":"eth0","metric":100},
                 {"dst":"default","gateway":"fd05::1","dev":"eth0","metric":1024},
                 {"dst":"10.9.9.9","dev":"eth0","scope":"link"}]"#,
        )
        .unwrap();
        let found = interfaces(&links, &routes).unwrap();
        assert_eq!(found.len(), 1);
        let eth0 = &found[0];
        assert_eq!((eth0.slot, eth0.name.as_str(), eth0.mtu), (0, "eth0", 1450));
        assert_eq!(eth0.mac, [0x02, 0x42, 0x0a, 0x00, 0x05, 0x02]);
        assert_eq!(
            eth0.addresses,
            [
                ("10.0.5.2".parse().unwrap(), 24),
                ("fd05::2".parse().unwrap(), 64)
            ]
        );
        let r = |dst: &str, prefix, gw: Option<&str>, metric| NetRoute {
            dst: dst.parse().unwrap(),
            prefix,
            gateway: gw.map(|g| g.parse().unwrap()),
            metric,
        };
        assert_eq!(
            eth0.routes,
            [
                r("0.0.0.0", 0, Some("10.0.5.1"), 0),
                r("192.168.7.0", 24, Some("10.0.5.9"), 100),
                r("::", 0, Some("fd05::1"), 1024),
                r("10.9.9.9", 32, None, 0),
            ]
        );
        let bad: Vec<Value> =
            serde_json::from_str(r#"[{"ifname":"eth1","link_type":"ether","address":"zz"}]"#)
                .unwrap();
        assert_eq!(
            interfaces(&bad, &[]).unwrap_err(),
            "eth1 has no MAC address"
        );
    }
}
