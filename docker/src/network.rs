//! husk's own networks (docs/networking.md, "husk networks"): `husk
//! network create|ls|inspect|rm`, and what `husk run --network NAME -p`
//! does with them.
//!
//! A network is a bridge on the host made and fed by Debian's CNI plugins
//! (bridge with host-local addresses and masquerade, portmap, firewall
//! with `ingressPolicy: same-bridge`), from a configuration list husk
//! writes. Each container gets a network namespace of its own, kept by a
//! bind mount at `<root>/netns/<name>`, which CNI ADD wires and whose path
//! its spec names: the runtime then mirrors that namespace's interface
//! into the VM as for any client (OCI mode). `rm` runs CNI DEL with the
//! result ADD gave (cached in the container's directory before anything is
//! added, so that a husk killed half way is undone by the next `rm`).
//!
//! ```text
//! <root>/networks/<name>.json        the network (name, subnet, bridge)
//! <root>/networks/<name>.conflist    the CNI list husk hands the plugins
//! <root>/networks/ipam/              host-local's leases
//! <root>/netns/<container>           the container's namespace
//! <root>/docker/<container>/network.json   its attachment (CNI result)
//! ```
//!
//! Names resolve through `/etc/hosts`: husk writes every container's from
//! the records of its network, and again into every other container of
//! the network when one joins or leaves (a new file put in place with a
//! rename, so a reader sees the old or the new one).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Digest;

use crate::cni::{self, CniError, Invocation};
use husk_sys::PathError;

/// The network a container made from an image joins unless told
/// otherwise (docker's name for it).
pub const DEFAULT_NETWORK: &str = "bridge";

/// What can go wrong with a network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// No network of that name.
    #[error("no such network: {0:?} (husk network ls lists them)")]
    NoSuchNetwork(String),
    /// `network create` of a name in use.
    #[error("a network named {0:?} already exists")]
    Exists(String),
    /// Not a name a network can have.
    #[error(
        "{0:?} is not a network name (letters, digits, '_', '.', '-', at most 64, not none or host)"
    )]
    BadName(String),
    /// `--subnet` or `--gateway` that is not one.
    #[error("--subnet {subnet:?}: {why}")]
    BadSubnet {
        /// As given.
        subnet: String,
        /// What is wrong.
        why: String,
    },
    /// Two networks of this root on one subnet.
    #[error("subnet {subnet} overlaps network {other:?}'s {theirs}")]
    Overlap {
        /// The one asked for.
        subnet: String,
        /// The network that has it.
        other: String,
        /// Its subnet.
        theirs: String,
    },
    /// No free /24 left for a network without `--subnet`.
    #[error("no free subnet left in 10.200.0.0/13 for a new network: give one with --subnet")]
    NoFreeSubnet,
    /// `network rm` of a network containers are on.
    #[error("network {name:?} is in use by {containers}: remove them first")]
    InUse {
        /// The network.
        name: String,
        /// Its containers, comma-separated.
        containers: String,
    },
    /// A `-p` that does not parse.
    #[error("-p {spec:?}: {why}")]
    BadPublish {
        /// As given.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// A published host port something else holds.
    #[error("host port {addr} ({protocol}) is already in use{by}")]
    PortInUse {
        /// Address and port.
        addr: String,
        /// tcp or udp.
        protocol: String,
        /// ": by container NAME", or the bind error.
        by: String,
    },
    /// `--network host`.
    #[error(
        "--network host: a container's VM cannot share the host's network stack; publish ports with -p instead"
    )]
    HostNetwork,
    /// `-p` or `-P` with `--network none`.
    #[error("-p needs a network: the container is on --network none")]
    PublishWithoutNetwork,
    /// `--add-host` that is not HOST:IP.
    #[error("--add-host {0:?}: expected HOST:IP")]
    BadAddHost(String),
    /// `--dns` that is not an address.
    #[error("--dns {0:?}: not an IP address")]
    BadDns(String),
    /// The container's namespace cannot be made.
    #[error("make the network namespace {}", .path.display())]
    Namespace {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A CNI plugin failed.
    #[error("connect the container to network {network:?}")]
    Cni {
        /// The network.
        network: String,
        /// What the plugin said.
        #[source]
        source: CniError,
    },
    /// A network's or an attachment's file is not what husk wrote.
    #[error("{} is corrupt", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] PathError),
}

type Result<T, E = NetworkError> = std::result::Result<T, E>;

/// A husk network.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Network {
    /// Its name.
    pub name: String,
    /// 64 hex digits.
    pub id: String,
    /// `a.b.c.d/len`.
    pub subnet: String,
    /// The bridge's address, the containers' gateway.
    pub gateway: String,
    /// The bridge on the host (`husk` and 11 hex digits: unique to this
    /// root and name).
    pub bridge: String,
    /// RFC 3339.
    pub created: String,
}

/// One published port (`-p`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// The host's address it is published on (all when None).
    pub host_ip: Option<IpAddr>,
    /// The host's port.
    pub host_port: u16,
    /// The container's port.
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// A container's place on a network (`network.json` in its directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attachment {
    /// The network's name.
    pub network: String,
    /// The container's ID (CNI's container ID).
    pub container_id: String,
    /// Its namespace.
    pub netns: PathBuf,
    /// The CNI list ADD ran with (DEL runs with it again).
    pub conflist: Value,
    /// The runtimeConfig ADD was given.
    pub runtime_config: Value,
    /// ADD's result; None until it returned.
    pub result: Option<Value>,
    /// Published ports.
    pub ports: Vec<Port>,
    /// The names the container answers to on the network.
    pub names: Vec<String>,
}

impl Attachment {
    /// Its IPv4 address.
    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.result.as_ref().and_then(cni::ipv4)
    }

    fn invocation<'a>(&'a self) -> Invocation<'a> {
        Invocation {
            container_id: &self.container_id,
            netns: &self.netns,
            ifname: "eth0",
            runtime_config: &self.runtime_config,
        }
    }
}

fn networks_dir(root: &Path) -> PathBuf {
    root.join("networks")
}

fn record_path(root: &Path, name: &str) -> PathBuf {
    networks_dir(root).join(format!("{name}.json"))
}

fn attachment_path(root: &Path, container: &str) -> PathBuf {
    root.join("docker").join(container).join("network.json")
}

/// Where container `container`'s namespace is kept.
pub fn netns_path(root: &Path, container: &str) -> PathBuf {
    root.join("netns").join(container)
}

fn check_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && name != "none"
        && name != "host";
    ok.then_some(())
        .ok_or_else(|| NetworkError::BadName(name.to_owned()))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(value).expect("JSON");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(PathError::at("write", path))?;
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| NetworkError::Corrupt {
                    path: path.to_owned(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PathError::at("read", path)(e).into()),
    }
}

/// An IPv4 subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Subnet {
    base: u32,
    len: u8,
}

impl Subnet {
    fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| NetworkError::BadSubnet {
            subnet: s.to_owned(),
            why: why.to_owned(),
        };
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| bad("expected an IPv4 subnet like 10.10.0.0/24"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad("not an IPv4 address"))?;
        let len: u8 = len.parse().map_err(|_| bad("not a prefix length"))?;
        if !(8..=29).contains(&len) {
            return Err(bad("the prefix length must be 8 to 29"));
        }
        let base = u32::from(ip);
        if base & !Self::mask(len) != 0 {
            return Err(bad("host bits are set (the network address is lower)"));
        }
        if ip.is_loopback() || ip.is_multicast() || ip.is_unspecified() || ip.is_broadcast() {
            return Err(bad("not a unicast subnet a host can route"));
        }
        Ok(Self { base, len })
    }

    fn mask(len: u8) -> u32 {
        if len == 0 { 0 } else { u32::MAX << (32 - len) }
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == self.base
    }

    fn overlaps(&self, other: &Subnet) -> bool {
        let len = self.len.min(other.len);
        self.base & Self::mask(len) == other.base & Self::mask(len)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.len)
    }
}

/// The host's IPv4 routes (`/proc/net/route`), as subnets.
fn host_routes() -> Vec<Subnet> {
    let text = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            // Little-endian words in the host's byte order.
            let (dest, mask) = (u32::from_be(dest.to_le()), u32::from_be(mask.to_le()));
            (mask != 0).then_some(Subnet {
                base: dest,
                len: mask.leading_ones() as u8,
            })
        })
        .collect()
}

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0]);
    }
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every network of this root, by name.
pub fn list(root: &Path) -> Vec<Network> {
    let mut all: Vec<Network> = std::fs::read_dir(networks_dir(root))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let name = name.strip_suffix(".json")?;
            read_json(&record_path(root, name)).ok().flatten()
        })
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// Network `name`.
pub fn get(root: &Path, name: &str) -> Result<Network> {
    if check_name(name).is_err() {
        return Err(NetworkError::NoSuchNetwork(name.to_owned()));
    }
    read_json(&record_path(root, name))?.ok_or_else(|| NetworkError::NoSuchNetwork(name.to_owned()))
}

/// `husk network create`: a network on `subnet` (a free /24 of
/// 10.200.0.0/13 when None), the bridge's address `gateway` (the
/// subnet's first when None). Nothing is made on the host until a
/// container joins it.
pub fn create(
    root: &Path,
    name: &str,
    subnet: Option<&str>,
    gateway: Option<&str>,
) -> Result<Network> {
    check_name(name)?;
    let dir = networks_dir(root);
    std::fs::create_dir_all(&dir).map_err(PathError::at("create", &dir))?;
    let others = list(root);
    if others.iter().any(|n| n.name == name) {
        return Err(NetworkError::Exists(name.to_owned()));
    }
    let mut taken: Vec<(String, Subnet)> = others
        .iter()
        .filter_map(|n| Some((n.name.clone(), Subnet::parse(&n.subnet).ok()?)))
        .collect();
    taken.extend(claims(root));
    let root_id = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    let h = digest(&[root_id.as_os_str().as_encoded_bytes(), name.as_bytes()]);
    let subnet = match subnet {
        Some(s) => {
            let s = Subnet::parse(s)?;
            if let Some((other, theirs)) = taken.iter().find(|(_, t)| t.overlaps(&s)) {
                return Err(NetworkError::Overlap {
                    subnet: s.to_string(),
                    other: other.clone(),
                    theirs: theirs.to_string(),
                });
            }
            s
        }
        None => {
            // A /24 of 10.200.0.0/13 picked by the root's and name's hash
            // (so that two roots rarely pick the same), then the next free
            // one: not a route the host has, not another network's.
            let routes = host_routes();
            let start = u16::from_be_bytes([h[0], h[1]]) % 2048;
            (0..2048u32)
                .map(|i| Subnet {
                    base: (10 << 24) | (200 << 16) | (((u32::from(start) + i) % 2048) << 8),
                    len: 24,
                })
                .find(|s| {
                    !routes.iter().any(|r| r.len > 0 && r.overlaps(s))
                        && !taken.iter().any(|(_, t)| t.overlaps(s))
                })
                .ok_or(NetworkError::NoFreeSubnet)?
        }
    };
    let gateway = match gateway {
        Some(g) => {
            let ip: Ipv4Addr = g.parse().map_err(|_| NetworkError::BadSubnet {
                subnet: subnet.to_string(),
                why: format!("the gateway {g:?} is not an IPv4 address"),
            })?;
            if !subnet.contains(ip) || u32::from(ip) == subnet.base {
                return Err(NetworkError::BadSubnet {
                    subnet: subnet.to_string(),
                    why: format!("the gateway {ip} is not a host address in it"),
                });
            }
            ip
        }
        None => Ipv4Addr::from(subnet.base + 1),
    };
    let network = Network {
        name: name.to_owned(),
        id: hex(&digest(&[&h, b"id"])),
        subnet: subnet.to_string(),
        gateway: gateway.to_string(),
        bridge: format!("husk{}", &hex(&h)[..11]),
        created: husk_runtime::state::now_rfc3339(),
    };
    claim(root, name, &subnet)?;
    let path = record_path(root, name);
    // create_new: two creates of one name at once make one network.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| {
            unclaim(&subnet);
            match e.kind() {
                std::io::ErrorKind::AlreadyExists => NetworkError::Exists(name.to_owned()),
                _ => PathError::at("create", &path)(e).into(),
            }
        })?;
    write_json(&path, &network)?;
    write_json(
        &dir.join(format!("{name}.conflist")),
        &conflist(root, &network),
    )?;
    Ok(network)
}

/// Where every root's networks claim their subnets, so that two roots
/// (two users of husk, or two tests) never put two bridges on one subnet.
const CLAIMS: &str = "/run/husk/subnets";

fn claim_path(subnet: &Subnet) -> PathBuf {
    Path::new(CLAIMS).join(subnet.to_string().replace('/', "_"))
}

/// The subnets other roots' live networks claim: (`root`'s network
/// name, subnet). A claim whose network is gone is not counted.
fn claims(root: &Path) -> Vec<(String, Subnet)> {
    let me = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    std::fs::read_dir(CLAIMS)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let subnet = Subnet::parse(&e.file_name().to_str()?.replacen('_', "/", 1)).ok()?;
            let owner = live_owner(&e.path())?;
            (owner.0 != me).then(|| (format!("{} of root {}", owner.1, owner.0.display()), subnet))
        })
        .collect()
}

/// The root and network name of a claim, if that network still exists.
fn live_owner(claim: &Path) -> Option<(PathBuf, String)> {
    let text = std::fs::read_to_string(claim).ok()?;
    let (root, name) = text.trim_end().rsplit_once('\n')?;
    let root = PathBuf::from(root);
    record_path(&root, name)
        .exists()
        .then(|| (root, name.to_owned()))
}

/// Claims `subnet` for network `name` of `root`; one a live network of
/// another root holds is refused.
fn claim(root: &Path, name: &str, subnet: &Subnet) -> Result<()> {
    std::fs::create_dir_all(CLAIMS).map_err(PathError::at("create", Path::new(CLAIMS)))?;
    let me = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    let path = claim_path(subnet);
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                let text = format!("{}\n{name}\n", me.display());
                std::io::Write::write_all(&mut f, text.as_bytes())
                    .map_err(PathError::at("write", &path))?;
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if let Some((root, other)) = live_owner(&path) {
                    return Err(NetworkError::Overlap {
                        subnet: subnet.to_string(),
                        other: format!("{other} of root {}", root.display()),
                        theirs: subnet.to_string(),
                    });
                }
                // A claim left by a root that is gone.
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => return Err(PathError::at("create", &path)(e).into()),
        }
    }
    Err(NetworkError::NoFreeSubnet)
}

fn unclaim(subnet: &Subnet) {
    let _ = std::fs::remove_file(claim_path(subnet));
}

/// The network, made first if it is the default one and not there yet.
pub fn get_or_default(root: &Path, name: &str) -> Result<Network> {
    match get(root, name) {
        Err(NetworkError::NoSuchNetwork(_)) if name == DEFAULT_NETWORK => {
            match create(root, name, None, None) {
                Err(NetworkError::Exists(_)) => get(root, name),
                made => made,
            }
        }
        got => got,
    }
}

/// The CNI list of `network`.
fn conflist(root: &Path, n: &Network) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": n.name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": n.bridge,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": n.subnet, "gateway": n.gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": networks_dir(root).join("ipam"),
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "firewall", "backend": "iptables", "ingressPolicy": "same-bridge"}
        ]
    })
}

/// Every attachment of this root, with its container's name.
fn attachments(root: &Path) -> Vec<(String, Attachment)> {
    std::fs::read_dir(root.join("docker"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let a = read_json(&attachment_path(root, &name)).ok()??;
            Some((name, a))
        })
        .collect()
}

/// `husk network inspect`.
pub fn inspect(root: &Path, name: &str) -> Result<Value> {
    let n = get(root, name)?;
    let mut containers = serde_json::Map::new();
    for (c, a) in attachments(root)
        .into_iter()
        .filter(|(_, a)| a.network == n.name)
    {
        containers.insert(
            c.clone(),
            json!({"Name": c, "IPv4Address": a.ip().map(|ip| ip.to_string()), "Ports": a.ports}),
        );
    }
    Ok(json!({
        "Name": n.name,
        "Id": n.id,
        "Created": n.created,
        "Driver": "bridge",
        "IPAM": {"Driver": "host-local", "Config": [{"Subnet": n.subnet, "Gateway": n.gateway}]},
        "Options": {"bridge": n.bridge},
        "Containers": containers,
    }))
}

/// `husk network rm`: refused while a container is on it. The bridge goes
/// too (the bridge plugin never removes one), and host-local's leases.
pub fn remove(root: &Path, name: &str) -> Result<()> {
    let n = get(root, name)?;
    let users: Vec<String> = attachments(root)
        .into_iter()
        .filter(|(_, a)| a.network == n.name)
        .map(|(c, _)| c)
        .collect();
    if !users.is_empty() {
        return Err(NetworkError::InUse {
            name: n.name,
            containers: users.join(", "),
        });
    }
    let _ = std::process::Command::new("ip")
        .args(["link", "delete", &n.bridge, "type", "bridge"])
        .stderr(std::process::Stdio::null())
        .status();
    remove_isolation_rules(&n.bridge);
    let dir = networks_dir(root);
    let _ = std::fs::remove_dir_all(dir.join("ipam").join(&n.name));
    let _ = std::fs::remove_file(dir.join(format!("{name}.conflist")));
    let path = record_path(root, name);
    std::fs::remove_file(&path).map_err(PathError::at("remove", &path))?;
    if let Ok(subnet) = Subnet::parse(&n.subnet) {
        unclaim(&subnet);
    }
    Ok(())
}

/// Takes out the two rules the firewall plugin's `ingressPolicy:
/// same-bridge` put in for `bridge` (in `CNI-ISOLATION-STAGE-1` and `-2`):
/// the plugin's DEL leaves them, as they serve every container of the
/// bridge, so they go with the bridge.
fn remove_isolation_rules(bridge: &str) {
    let Ok(out) = std::process::Command::new("iptables-save")
        .args(["-t", "filter"])
        .output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let Some(rule) = line.strip_prefix("-A CNI-ISOLATION-STAGE-") else {
            continue;
        };
        let args = split_quoted(&format!("CNI-ISOLATION-STAGE-{rule}"));
        let ours = args
            .windows(2)
            .any(|w| (w[0] == "-i" || w[0] == "-o") && w[1] == bridge);
        if ours {
            let _ = std::process::Command::new("iptables")
                .args(["-t", "filter", "-D"])
                .args(&args)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Splits an iptables-save rule into arguments (double quotes group).
fn split_quoted(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    args.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        args.push(cur);
    }
    args
}

/// Parses `-p [IP:][HOST_PORT:]CONTAINER_PORT[/tcp|/udp]` (an IPv6
/// address in brackets). No host port: one the kernel picks.
pub fn parse_publish(spec: &str) -> Result<Port> {
    let bad = |why: &str| NetworkError::BadPublish {
        spec: spec.to_owned(),
        why: why.to_owned(),
    };
    let (rest, protocol) = match spec.rsplit_once('/') {
        Some((r, p)) if p == "tcp" || p == "udp" => (r, p),
        Some((_, p)) => return Err(bad(&format!("unknown protocol {p:?} (tcp or udp)"))),
        None => (spec, "tcp"),
    };
    let (host_ip, rest) = if let Some(after) = rest.strip_prefix('[') {
        let (ip, rest) = after
            .split_once("]:")
            .ok_or_else(|| bad("an IPv6 address in brackets must be followed by ':'"))?;
        let ip: IpAddr = ip.parse().map_err(|_| bad("not an IP address"))?;
        (Some(ip), rest)
    } else {
        let parts: Vec<&str> = rest.split(':').collect();
        match parts.as_slice() {
            [_] | [_, _] => (None, rest),
            [ip, _, _] => {
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| bad(&format!("{ip:?} is not an IP address")))?;
                (Some(ip), &rest[rest.find(':').expect("three parts") + 1..])
            }
            _ => return Err(bad("expected [IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]")),
        }
    };
    let port = |s: &str, what: &str| -> Result<u16> {
        if s.contains('-') {
            return Err(bad("port ranges are not supported"));
        }
        match s.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad(&format!("{what} {s:?} is not a port (1-65535)"))),
            Ok(p) => Ok(p),
        }
    };
    let (host_port, container_port) = match rest.split_once(':') {
        Some(("", c)) => (0, port(c, "the container port")?),
        Some((h, c)) => (port(h, "the host port")?, port(c, "the container port")?),
        None => (0, port(rest, "the container port")?),
    };
    Ok(Port {
        host_ip,
        host_port,
        container_port,
        protocol: protocol.to_owned(),
    })
}

/// Gives ports without a host port one (the kernel's pick), and checks
/// that each is free: no other container of this root publishes it and
/// the host has no socket on it.
fn claim_ports(root: &Path, ports: &mut [Port]) -> Result<()> {
    let in_use: Vec<(String, Port)> = attachments(root)
        .into_iter()
        .flat_map(|(c, a)| a.ports.into_iter().map(move |p| (c.clone(), p)))
        .collect();
    for i in 0..ports.len() {
        let p = &ports[i];
        let ip = p.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let addr = std::net::SocketAddr::new(ip, p.host_port);
        let overlaps = |q: &Port| {
            q.host_port == p.host_port
                && q.protocol == p.protocol
                && (q.host_ip.is_none() || p.host_ip.is_none() || q.host_ip == p.host_ip)
        };
        let taken_by_ours = in_use
            .iter()
            .find(|(_, q)| overlaps(q))
            .map(|(c, _)| c.clone())
            .or_else(|| {
                ports[..i]
                    .iter()
                    .any(overlaps)
                    .then(|| "this one".to_owned())
            });
        if let Some(c) = taken_by_ours.filter(|_| p.host_port != 0) {
            return Err(NetworkError::PortInUse {
                addr: addr.to_string(),
                protocol: p.protocol.clone(),
                by: format!(": published by container {c}"),
            });
        }
        let bound = if p.protocol == "udp" {
            std::net::UdpSocket::bind(addr).and_then(|s| s.local_addr())
        } else {
            std::net::TcpListener::bind(addr).and_then(|s| s.local_addr())
        };
        match bound {
            Ok(local) => ports[i].host_port = local.port(),
            Err(e) => {
                return Err(NetworkError::PortInUse {
                    addr: addr.to_string(),
                    protocol: p.protocol.clone(),
                    by: format!(" ({e})"),
                });
            }
        }
    }
    Ok(())
}

/// Puts container `container` (ID `id`, answering to `names`) on network
/// `network`, publishing `ports`: its namespace made, CNI ADD run, the
/// attachment saved. What fails part way is undone.
pub fn attach(
    root: &Path,
    container: &str,
    id: &str,
    network: &Network,
    mut ports: Vec<Port>,
    names: Vec<String>,
) -> Result<Attachment> {
    claim_ports(root, &mut ports)?;
    // Claims live under /run: after a reboot the network claims its
    // subnet again before it puts a bridge on it.
    let subnet = Subnet::parse(&network.subnet)?;
    if !claim_path(&subnet).exists() {
        claim(root, &network.name, &subnet)?;
    }
    let netns = netns_path(root, container);
    let nsdir = root.join("netns");
    std::fs::create_dir_all(&nsdir).map_err(PathError::at("create", &nsdir))?;
    let mut a = Attachment {
        network: network.name.clone(),
        container_id: id.to_owned(),
        netns: netns.clone(),
        conflist: conflist(root, network),
        runtime_config: cni::port_mappings(&ports),
        result: None,
        ports,
        names,
    };
    // Saved before anything is made: a husk killed from here on leaves a
    // record that `rm` undoes.
    let path = attachment_path(root, container);
    write_json(&path, &a)?;
    let added = husk_sys::net::make_netns(&netns)
        .map_err(|source| NetworkError::Namespace {
            path: netns.clone(),
            source,
        })
        .and_then(|()| {
            cni::add(&a.conflist, &a.invocation()).map_err(|source| NetworkError::Cni {
                network: network.name.clone(),
                source,
            })
        });
    match added {
        Ok(result) => {
            a.result = Some(result);
            write_json(&path, &a)?;
            Ok(a)
        }
        Err(e) => {
            let _ = husk_sys::net::remove_netns(&netns);
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Container `container`'s attachment, if it has one.
pub fn attachment(root: &Path, container: &str) -> Result<Option<Attachment>> {
    read_json(&attachment_path(root, container))
}

/// Takes container `container` off its network (CNI DEL with ADD's
/// result, its namespace let go); nothing when it has none. The other
/// containers' hosts files are written again without it.
pub fn detach(root: &Path, container: &str) -> Result<()> {
    let Some(a) = attachment(root, container)? else {
        return Ok(());
    };
    let deleted = cni::del(&a.conflist, &a.invocation(), a.result.as_ref());
    husk_sys::net::remove_netns(&a.netns).map_err(|source| NetworkError::Namespace {
        path: a.netns.clone(),
        source,
    })?;
    let path = attachment_path(root, container);
    let _ = std::fs::remove_file(&path);
    refresh_hosts(root, &a.network);
    deleted.map_err(|source| NetworkError::Cni {
        network: a.network.clone(),
        source,
    })
}

/// What a container's `/etc/hosts`, `/etc/hostname` and
/// `/etc/resolv.conf` say (docker's `--hostname`, `--add-host`, `--dns`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Names {
    /// Its host name.
    pub hostname: String,
    /// `--add-host` entries: (host, address).
    pub extra_hosts: Vec<(String, IpAddr)>,
    /// `--dns` servers (the host's own, minus loopback ones, when empty).
    pub dns: Vec<IpAddr>,
}

/// Parses `--add-host HOST:IP` (IPv6 addresses hold colons too).
pub fn parse_add_host(s: &str) -> Result<(String, IpAddr)> {
    let bad = || NetworkError::BadAddHost(s.to_owned());
    let (host, ip) = s.split_once(':').ok_or_else(bad)?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    ok.then(|| (host.to_owned(), ip)).ok_or_else(bad)
}

/// Parses `--dns IP`.
pub fn parse_dns(s: &str) -> Result<IpAddr> {
    s.parse().map_err(|_| NetworkError::BadDns(s.to_owned()))
}

/// The `/etc/hosts` of a container of `names` at `ip` among `peers`
/// (address, names) of its network.
fn hosts_text(
    names: &Names,
    me: Option<(Ipv4Addr, &[String])>,
    peers: &[(Ipv4Addr, Vec<String>)],
) -> String {
    let mut text =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    match me {
        Some((ip, aliases)) => {
            let mut all = vec![names.hostname.clone()];
            all.extend(aliases.iter().filter(|a| **a != names.hostname).cloned());
            text += &format!("{ip}\t{}\n", all.join(" "));
        }
        None => text += &format!("127.0.1.1\t{}\n", names.hostname),
    }
    for (ip, aliases) in peers {
        text += &format!("{ip}\t{}\n", aliases.join(" "));
    }
    for (host, ip) in &names.extra_hosts {
        text += &format!("{ip}\t{host}\n");
    }
    text
}

/// The container's nameservers: `--dns`, else the host's own that are
/// not loopback ones (which mean nothing inside a VM).
fn resolv_text(names: &Names) -> String {
    let servers: Vec<IpAddr> = if names.dns.is_empty() {
        std::fs::read_to_string("/etc/resolv.conf")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("nameserver"))
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .filter(|ip| !ip.is_loopback())
            .collect()
    } else {
        names.dns.clone()
    };
    servers
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect()
}

/// Writes `/etc/hostname`, `/etc/hosts` and (on a network)
/// `/etc/resolv.conf` into container `container`'s root at `rootfs`.
pub fn write_names(root: &Path, container: &str, rootfs: &Path, names: &Names) -> Result<()> {
    let a = attachment(root, container)?;
    write_in_root(rootfs, "hostname", &format!("{}\n", names.hostname))?;
    let (me, peers) = match &a {
        Some(a) => (
            a.ip().map(|ip| (ip, a.names.clone())),
            peers(root, container, &a.network),
        ),
        None => (None, Vec::new()),
    };
    let me = me.as_ref().map(|(ip, n)| (*ip, n.as_slice()));
    write_in_root(rootfs, "hosts", &hosts_text(names, me, &peers))?;
    if a.is_some() {
        write_in_root(rootfs, "resolv.conf", &resolv_text(names))?;
    }
    let path = root.join("docker").join(container).join("names.json");
    write_json(&path, names)?;
    // The others of its network learn its name.
    if let Some(a) = &a {
        refresh_hosts(root, &a.network);
    }
    Ok(())
}

/// The other containers of `network`: address and names.
fn peers(root: &Path, container: &str, network: &str) -> Vec<(Ipv4Addr, Vec<String>)> {
    attachments(root)
        .into_iter()
        .filter(|(c, a)| c != container && a.network == network)
        .filter_map(|(_, a)| Some((a.ip()?, a.names)))
        .collect()
}

/// Writes the hosts file of every container on `network` again.
pub fn refresh_hosts(root: &Path, network: &str) {
    for (c, a) in attachments(root)
        .into_iter()
        .filter(|(_, a)| a.network == network)
    {
        let dir = root.join("docker").join(&c);
        let Ok(Some(names)) = read_json::<Names>(&dir.join("names.json")) else {
            continue;
        };
        let me = a.ip().map(|ip| (ip, a.names.as_slice()));
        let text = hosts_text(&names, me, &peers(root, &c, network));
        let _ = write_in_root(&dir.join("rootfs"), "hosts", &text);
    }
}

/// Puts `text` at `/etc/<file>` of the container's root without leaving
/// it (the image's symlinks resolve inside the root), as a new file
/// renamed into place.
fn write_in_root(rootfs: &Path, file: &str, text: &str) -> Result<()> {
    let at = rootfs.join("etc").join(file);
    let err = |e: rustix::io::Errno| NetworkError::from(PathError::at("write", &at)(e.into()));
    let root = rustix::fs::open(
        rootfs,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(err)?;
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let etc = match rustix::fs::openat2(&root, "etc", flags, Mode::empty(), how) {
        Err(rustix::io::Errno::NOENT) => {
            rustix::fs::mkdirat(&root, "etc", Mode::from_raw_mode(0o755)).map_err(err)?;
            rustix::fs::openat2(&root, "etc", flags, Mode::empty(), how).map_err(err)?
        }
        other => other.map_err(err)?,
    };
    let tmp = format!(".{file}.husk-new");
    let _ = rustix::fs::unlinkat(&etc, &tmp, rustix::fs::AtFlags::empty());
    let fd = rustix::fs::openat(
        &etc,
        &tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .map_err(err)?;
    let mut f = std::fs::File::from(fd);
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(PathError::at("write", &at))?;
    drop(f);
    rustix::fs::renameat(&etc, &tmp, &etc, file).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_specs_parse_as_docker_writes_them() {
        let p = |s| parse_publish(s).unwrap();
        let tcp = |ip: Option<&str>, h, c| Port {
            host_ip: ip.map(|i| i.parse().unwrap()),
            host_port: h,
            container_port: c,
            protocol: "tcp".into(),
        };
        assert_eq!(p("80"), tcp(None, 0, 80));
        assert_eq!(p("8080:80"), tcp(None, 8080, 80));
        assert_eq!(p("127.0.0.1:8080:80"), tcp(Some("127.0.0.1"), 8080, 80));
        assert_eq!(p("127.0.0.1::80"), tcp(Some("127.0.0.1"), 0, 80));
        assert_eq!(p("[::1]:8080:80"), tcp(Some("::1"), 8080, 80));
        assert_eq!(p("53:53/udp").protocol, "udp");
    }

    #[test]
    fn malformed_publish_specs_are_named() {
        for (bad, why) in [
            ("", "not a port"),
            ("80/sctp", "unknown protocol"),
            ("x:80", "host port"),
            ("8080:0", "container port"),
            ("70000:80", "host port"),
            ("1.2.3:8080:80", "not an IP address"),
            ("8000-8010:80", "ranges"),
            ("a:b:c:d", "expected"),
            ("[::1:80", "brackets"),
        ] {
            let e = parse_publish(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn iptables_save_rules_split_as_the_shell_would() {
        let rule = r#"CNI-ISOLATION-STAGE-2 -o husk1 -m comment --comment "CNI firewall plugin rules (ingressPolicy: same-bridge)" -j DROP"#;
        assert_eq!(
            split_quoted(rule),
            [
                "CNI-ISOLATION-STAGE-2",
                "-o",
                "husk1",
                "-m",
                "comment",
                "--comment",
                "CNI firewall plugin rules (ingressPolicy: same-bridge)",
                "-j",
                "DROP"
            ]
        );
    }

    #[test]
    fn subnets_are_checked() {
        assert_eq!(
            Subnet::parse("10.1.2.0/24").unwrap().to_string(),
            "10.1.2.0/24"
        );
        for (bad, why) in [
            ("10.1.2.3/24", "host bits"),
            ("10.1.2.0", "expected"),
            ("10.1.2.0/31", "8 to 29"),
            ("127.0.0.0/8", "unicast"),
            ("x/24", "IPv4"),
        ] {
            let e = Subnet::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let a = Subnet::parse("10.1.0.0/16").unwrap();
        assert!(a.overlaps(&Subnet::parse("10.1.5.0/24").unwrap()));
        assert!(!a.overlaps(&Subnet::parse("10.2.0.0/24").unwrap()));
    }

    #[test]
    fn network_names_are_checked() {
        for bad in ["", "none", "host", "-x", "a/b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        check_name("my-net_1.a").unwrap();
    }

    #[test]
    fn networks_are_made_listed_and_refused_twice() {
        let root = std::env::temp_dir().join(format!("husk-net-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let n = create(&root, "a", Some("10.77.0.0/24"), None).unwrap();
        assert_eq!(n.gateway, "10.77.0.1");
        assert!(n.bridge.starts_with("husk") && n.bridge.len() == 15);
        assert!(matches!(
            create(&root, "a", None, None),
            Err(NetworkError::Exists(_))
        ));
        let e = create(&root, "b", Some("10.77.0.128/25"), None).unwrap_err();
        assert!(e.to_string().contains("overlaps network \"a\""), "{e}");
        let auto = create(&root, "c", None, None).unwrap();
        assert!(auto.subnet.starts_with("10.2"), "{}", auto.subnet);
        let e = create(&root, "d", Some("10.78.0.0/24"), Some("10.79.0.1")).unwrap_err();
        assert!(e.to_string().contains("not a host address"), "{e}");
        let names: Vec<String> = list(&root).into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["a", "c"]);
        remove(&root, "a").unwrap();
        assert!(!claim_path(&Subnet::parse("10.77.0.0/24").unwrap()).exists());
        remove(&root, "c").unwrap();
        assert!(matches!(
            get(&root, "a"),
            Err(NetworkError::NoSuchNetwork(_))
        ));
        assert!(matches!(
            remove(&root, "zz"),
            Err(NetworkError::NoSuchNetwork(_))
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_hosts_file_names_the_container_and_its_peers() {
        let names = Names {
            hostname: "web".into(),
            extra_hosts: vec![("db".into(), "10.9.9.9".parse().unwrap())],
            dns: vec![],
        };
        let me = (
            "10.0.0.2".parse().unwrap(),
            &["web".to_owned(), "c1".to_owned()][..],
        );
        let peers = vec![("10.0.0.3".parse().unwrap(), vec!["other".to_owned()])];
        let text = hosts_text(&names, Some(me), &peers);
        assert!(text.contains("10.0.0.2\tweb c1\n"), "{text}");
        assert!(text.contains("10.0.0.3\tother\n"), "{text}");
        assert!(text.contains("10.9.9.9\tdb\n"), "{text}");
        assert!(hosts_text(&names, None, &[]).contains("127.0.1.1\tweb\n"));
    }

    #[test]
    fn add_host_and_dns_are_checked() {
        assert_eq!(parse_add_host("db:10.0.0.5").unwrap().0, "db");
        assert_eq!(
            parse_add_host("v6:[::1]").unwrap().1,
            "::1".parse::<IpAddr>().unwrap()
        );
        for bad in ["db", "db:nope", ":1.2.3.4", "a b:1.2.3.4"] {
            assert!(parse_add_host(bad).is_err(), "{bad}");
        }
        assert!(parse_dns("1.1.1.1").is_ok());
        assert!(parse_dns("one").is_err());
    }

    #[test]
    fn files_are_written_inside_the_root_only() {
        let dir = std::env::temp_dir().join(format!("husk-names-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        // The image's /etc is a symlink out of the root: it resolves
        // inside it.
        std::os::unix::fs::symlink("/../../outside", rootfs.join("etc")).unwrap();
        std::fs::create_dir_all(rootfs.join("outside")).unwrap();
        write_in_root(&rootfs, "hosts", "x\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(rootfs.join("outside/hosts")).unwrap(),
            "x\n"
        );
        assert!(!dir.join("outside").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
