//! The guest's network as the host describes it (`Request::Network`):
//! each virtio-net interface renamed and given its MAC, MTU, addresses and
//! routes; and `lo`, brought up at start so that the warm snapshot already
//! has it. Containers share the guest's network namespace (the runtime
//! drops the spec's), so this is their network.
//!
//! rtnetlink is spoken by hand over a `NETLINK_ROUTE` socket: each
//! message is a byte vector (`nlmsghdr`, then `ifinfomsg`, `ifaddrmsg` or
//! `rtmsg`, then 4-byte aligned attributes). Eight message kinds do not
//! warrant a crate, and this needs no `unsafe`. Every request asks for an
//! acknowledgement and its error is checked, so a failure names the
//! interface, the step and the errno.
//!
//! It never touches an interface the request does not name (but `lo`),
//! nor a route outside the main table.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

use husk_protocol::{NetInterface, NetRoute};
use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::sockopt::Timeout;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

// linux/netlink.h and linux/rtnetlink.h.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFA_FLAGS: u16 = 8;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const IFF_UP: u32 = 0x1;
const IFA_F_NODAD: u8 = 0x2;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const RT_TABLE_MAIN: u8 = 254;
/// What `ip route add` marks its routes with.
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
/// `nlmsghdr`: length, type, flags, sequence, port.
const HEADER: usize = 16;
/// The kernel's limit on an interface name, less its NUL.
const MAX_NAME: usize = 15;

/// The guest's interfaces by slot. A slot's interface is the one the
/// kernel named `eth<slot>` at boot: it is looked up by that name the
/// first time, and its index is remembered, since it is renamed then (and
/// a name may move from one interface to another). A restored agent
/// remembers what its snapshot's did. The lock also keeps two requests
/// from interleaving.
#[derive(Default)]
pub(crate) struct Links(Mutex<HashMap<u8, u32>>);

impl Links {
    /// Applies `interfaces`. Idempotent: whatever an earlier request left,
    /// each interface ends up as described: down, renamed, its MAC and
    /// MTU set, up (a resend flaps the link), its addresses replaced and
    /// those not listed removed (the kernel's IPv6 link-local ones are
    /// kept), its routes replaced (the link going down took the old ones).
    pub(crate) fn configure(&self, interfaces: &[NetInterface]) -> Result<(), String> {
        check(interfaces)?;
        let mut known = self.0.lock().unwrap();
        let mut nl = Netlink::open().map_err(|e| format!("open a netlink socket: {e}"))?;

        // Each slot's link, found before anything changes.
        let mut links = Vec::with_capacity(interfaces.len());
        for iface in interfaces {
            let slot = iface.slot;
            let link = match known.get(&slot) {
                Some(&index) => nl.link(get_link_by_index(index)).map_err(|e| {
                    format!("network slot {slot}: its interface (index {index}) is gone: {e}")
                })?,
                None => {
                    let name = format!("eth{slot}");
                    let link = nl.link(get_link_by_name(&name)).map_err(|e| {
                        format!("network slot {slot}: no interface {name} in the guest: {e}")
                    })?;
                    if let Some((other, _)) = known.iter().find(|(_, i)| **i == link.index) {
                        return Err(format!(
                            "network slot {slot}: no interface {name} in the guest \
                             (that name is slot {other}'s now)"
                        ));
                    }
                    known.insert(slot, link.index);
                    link
                }
            };
            links.push(link);
        }

        // Down and renamed. A name another of these interfaces still has
        // is taken in a second pass, from a temporary name, once that one
        // has moved on (two interfaces may swap names).
        let mut wait_for_name = Vec::new();
        for (iface, link) in interfaces.iter().zip(&links) {
            let fail = failed(iface);
            nl.ack(set_up(link.index, false))
                .map_err(|e| fail("set it down".into(), e))?;
            if link.name == iface.name {
                continue;
            }
            match nl.ack(set_name(link.index, &iface.name)) {
                Ok(()) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EEXIST)
                        && links.iter().any(|l| l.name == iface.name) =>
                {
                    let temporary = format!("husk-tmp{}", iface.slot);
                    nl.ack(set_name(link.index, &temporary))
                        .map_err(|e| fail(format!("rename {} to {temporary}", link.name), e))?;
                    wait_for_name.push(iface.slot);
                }
                Err(e) => return Err(fail(format!("rename {} to {}", link.name, iface.name), e)),
            }
        }

        // Named, with their MAC and MTU.
        for (iface, link) in interfaces.iter().zip(&links) {
            let fail = failed(iface);
            if wait_for_name.contains(&iface.slot) {
                nl.ack(set_name(link.index, &iface.name))
                    .map_err(|e| fail(format!("rename {} to {}", link.name, iface.name), e))?;
            }
            nl.ack(set_mac(link.index, iface.mac))
                .map_err(|e| fail(format!("set its MAC address to {}", mac(iface.mac)), e))?;
            nl.ack(set_mtu(link.index, iface.mtu))
                .map_err(|e| fail(format!("set its MTU to {}", iface.mtu), e))?;
        }

        // Addresses an earlier request gave that this one does not. Before
        // the new ones: removing an IPv4 subnet's first (primary) address
        // removes the others in it.
        let wanted: HashSet<(u32, IpAddr, u8)> = interfaces
            .iter()
            .zip(&links)
            .flat_map(|(iface, link)| iface.addresses.iter().map(|&(a, p)| (link.index, a, p)))
            .collect();
        let addresses = nl
            .ask(dump_addresses())
            .map_err(|e| format!("list the guest's addresses: {e}"))?;
        for (index, ip, prefix) in addresses.iter().filter_map(|m| parse_address(m)) {
            let Some((iface, _)) = interfaces
                .iter()
                .zip(&links)
                .find(|(_, link)| link.index == index)
            else {
                continue;
            };
            if wanted.contains(&(index, ip, prefix)) || is_ipv6_link_local(ip) {
                continue;
            }
            match nl.ack(del_address(index, ip, prefix)) {
                // Gone with its subnet's primary address.
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
                r => r.map_err(|e| {
                    failed(iface)(format!("remove the old address {ip}/{prefix}"), e)
                })?,
            }
        }

        // IPv6 only where the interface has an IPv6 address: bringing a
        // link up otherwise starts IPv6's own work (a link-local address
        // and its duplicate detection, router solicitations, multicast
        // reports), timers and packets a container with no IPv6 address
        // does not use and the guest pays for (docs/networking.md).
        for iface in interfaces {
            let v6 = iface.addresses.iter().any(|(ip, _)| ip.is_ipv6());
            let path = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", iface.name);
            if std::path::Path::new(&path).exists() {
                std::fs::write(&path, if v6 { "0" } else { "1" })
                    .map_err(|e| failed(iface)(format!("write {path}"), e))?;
            }
        }

        // Up and addressed.
        for (iface, link) in interfaces.iter().zip(&links) {
            let fail = failed(iface);
            nl.ack(set_up(link.index, true))
                .map_err(|e| fail("set it up".into(), e))?;
            for &(ip, prefix) in &iface.addresses {
                nl.ack(add_address(link.index, ip, prefix))
                    .map_err(|e| fail(format!("add address {ip}/{prefix}"), e))?;
            }
        }

        // Routes on a link first: a gateway is reachable through them.
        for via_gateway in [false, true] {
            for (iface, link) in interfaces.iter().zip(&links) {
                for route in &iface.routes {
                    if route.gateway.is_some() != via_gateway || made_by_kernel(iface, route) {
                        continue;
                    }
                    // IPv6 is off on an interface with no IPv6 address
                    // (above): its IPv6 routes (the namespace's fe80::/64)
                    // have nothing to carry.
                    let v6 = iface.addresses.iter().any(|(ip, _)| ip.is_ipv6());
                    if route.dst.is_ipv6() && !v6 {
                        continue;
                    }
                    nl.ack(add_route(link.index, route))
                        .map_err(|e| failed(iface)(format!("add route {}", describe(route)), e))?;
                }
            }
        }
        Ok(())
    }
}

/// Brings the loopback interface up (the kernel gives it 127.0.0.1/8 and
/// ::1 then).
pub(crate) fn loopback_up() -> Result<(), String> {
    let mut nl = Netlink::open().map_err(|e| format!("open a netlink socket: {e}"))?;
    let lo = nl
        .link(get_link_by_name("lo"))
        .map_err(|e| format!("find lo: {e}"))?;
    nl.ack(set_up(lo.index, true))
        .map_err(|e| format!("set lo up: {e}"))
}

/// Refuses what the kernel would refuse less clearly, before anything
/// changes.
fn check(interfaces: &[NetInterface]) -> Result<(), String> {
    let mut slots = HashSet::new();
    let mut names = HashSet::new();
    for iface in interfaces {
        if !slots.insert(iface.slot) {
            return Err(format!("network slot {} is given twice", iface.slot));
        }
        let name = &iface.name;
        if name.is_empty()
            || name.len() > MAX_NAME
            || name == "."
            || name == ".."
            || name
                .chars()
                .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
        {
            return Err(format!(
                "network slot {}: {name:?} is not an interface name: 1 to {MAX_NAME} bytes, \
                 no '/', ':' or white space",
                iface.slot
            ));
        }
        if !names.insert(name) {
            return Err(format!("interface name {name} is given twice"));
        }
        let fail = |what: String| format!("interface {name} (slot {}): {what}", iface.slot);
        for &(ip, prefix) in &iface.addresses {
            if prefix > max_prefix(ip) {
                return Err(fail(format!(
                    "address {ip}/{prefix}: the prefix is longer than {}",
                    max_prefix(ip)
                )));
            }
        }
        for route in &iface.routes {
            if route.prefix > max_prefix(route.dst) {
                return Err(fail(format!(
                    "route {}: the prefix is longer than {}",
                    describe(route),
                    max_prefix(route.dst)
                )));
            }
            if route
                .gateway
                .is_some_and(|g| g.is_ipv4() != route.dst.is_ipv4())
            {
                return Err(fail(format!(
                    "route {}: it mixes IPv4 and IPv6",
                    describe(route)
                )));
            }
        }
    }
    Ok(())
}

/// Makes an error naming the interface and the step.
fn failed(iface: &NetInterface) -> impl Fn(String, io::Error) -> String + '_ {
    move |step, e| {
        format!(
            "interface {} (slot {}): {step}: {e}",
            iface.name, iface.slot
        )
    }
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// `ip`'s network: its first `prefix` bits.
fn network(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

/// A route the kernel made when an address of the interface was added:
/// its subnet, on the link (a /32 or /128 has none).
fn made_by_kernel(iface: &NetInterface, route: &NetRoute) -> bool {
    route.gateway.is_none()
        && route.prefix < max_prefix(route.dst)
        && iface.addresses.iter().any(|&(ip, prefix)| {
            prefix == route.prefix
                && ip.is_ipv4() == route.dst.is_ipv4()
                && network(ip, prefix) == network(route.dst, route.prefix)
        })
}

fn is_ipv6_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// A route as `ip route` shows it: `default via 10.0.3.1`.
fn describe(route: &NetRoute) -> String {
    let mut text = if route.prefix == 0 {
        "default".to_string()
    } else {
        format!("{}/{}", route.dst, route.prefix)
    };
    if let Some(gateway) = route.gateway {
        text += &format!(" via {gateway}");
    }
    if route.metric != 0 {
        text += &format!(" metric {}", route.metric);
    }
    text
}

fn mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// An address's family and bytes, as netlink carries them.
fn ip_bytes(ip: IpAddr) -> (u8, Vec<u8>) {
    match ip {
        IpAddr::V4(v4) => (AF_INET, v4.octets().to_vec()),
        IpAddr::V6(v6) => (AF_INET6, v6.octets().to_vec()),
    }
}

/// One rtnetlink request being built: the header, the family's fixed
/// header, then attributes, each 4-byte aligned.
#[derive(Debug)]
struct Message(Vec<u8>);

impl Message {
    /// A request of `kind` asking for an acknowledgement, so that every
    /// request ends with one answer to wait for.
    fn new(kind: u16, flags: u16, fixed: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length: `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence: `finish`
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
        buf.extend_from_slice(fixed);
        align(&mut buf);
        Self(buf)
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Self {
        let len = u16::try_from(4 + data.len()).expect("a small attribute");
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        align(&mut self.0);
        self
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = u32::try_from(self.0.len()).expect("a small message");
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.0
    }
}

fn align(buf: &mut Vec<u8>) {
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// `struct ifinfomsg`: family, padding, device type, index, flags, and
/// which flags to change.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[0] = AF_UNSPEC;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

/// `struct ifaddrmsg`: family, prefix length, flags, scope (universe),
/// index.
fn ifaddrmsg(family: u8, prefix: u8, flags: u8, index: u32) -> [u8; 8] {
    let mut m = [0u8; 8];
    m[0] = family;
    m[1] = prefix;
    m[2] = flags;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m
}

/// `struct rtmsg`: family, destination and source prefix lengths, TOS,
/// table, protocol, scope, type, flags.
fn rtmsg(family: u8, dst_len: u8, scope: u8) -> [u8; 12] {
    [
        family,
        dst_len,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        scope,
        RTN_UNICAST,
        0,
        0,
        0,
        0,
    ]
}

fn name_attr(name: &str) -> Vec<u8> {
    let mut data = name.as_bytes().to_vec();
    data.push(0);
    data
}

fn get_link_by_name(name: &str) -> Message {
    Message::new(RTM_GETLINK, 0, &ifinfomsg(0, 0, 0)).attr(IFLA_IFNAME, &name_attr(name))
}

fn get_link_by_index(index: u32) -> Message {
    Message::new(RTM_GETLINK, 0, &ifinfomsg(index, 0, 0))
}

fn set_up(index: u32, up: bool) -> Message {
    let flags = if up { IFF_UP } else { 0 };
    Message::new(RTM_NEWLINK, 0, &ifinfomsg(index, flags, IFF_UP))
}

fn set_name(index: u32, name: &str) -> Message {
    Message::new(RTM_NEWLINK, 0, &ifinfomsg(index, 0, 0)).attr(IFLA_IFNAME, &name_attr(name))
}

fn set_mac(index: u32, mac: [u8; 6]) -> Message {
    Message::new(RTM_NEWLINK, 0, &ifinfomsg(index, 0, 0)).attr(IFLA_ADDRESS, &mac)
}

fn set_mtu(index: u32, mtu: u32) -> Message {
    Message::new(RTM_NEWLINK, 0, &ifinfomsg(index, 0, 0)).attr(IFLA_MTU, &mtu.to_ne_bytes())
}

/// Adds or updates an address. An IPv6 one skips duplicate address
/// detection: the host made it unique, and it is usable at once. An IPv4
/// one gets its subnet's broadcast address, as the host's veth has.
fn add_address(index: u32, ip: IpAddr, prefix: u8) -> Message {
    let (family, bytes) = ip_bytes(ip);
    let flags = if ip.is_ipv6() { IFA_F_NODAD } else { 0 };
    let mut msg = Message::new(
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_REPLACE,
        &ifaddrmsg(family, prefix, flags, index),
    )
    .attr(IFA_LOCAL, &bytes)
    .attr(IFA_ADDRESS, &bytes);
    if let IpAddr::V4(v4) = ip
        && prefix < 31
    {
        let broadcast = u32::from(v4) | (u32::MAX >> prefix);
        msg = msg.attr(IFA_BROADCAST, &broadcast.to_be_bytes());
    }
    msg.attr(IFA_FLAGS, &u32::from(flags).to_ne_bytes())
}

fn del_address(index: u32, ip: IpAddr, prefix: u8) -> Message {
    let (family, bytes) = ip_bytes(ip);
    Message::new(RTM_DELADDR, 0, &ifaddrmsg(family, prefix, 0, index)).attr(IFA_LOCAL, &bytes)
}

fn dump_addresses() -> Message {
    Message::new(RTM_GETADDR, NLM_F_DUMP, &ifaddrmsg(AF_UNSPEC, 0, 0, 0))
}

/// Adds or replaces a route in the main table: through a gateway, or on
/// the link (scope link) without one.
fn add_route(index: u32, route: &NetRoute) -> Message {
    let (family, dst) = ip_bytes(route.dst);
    let scope = if route.gateway.is_some() {
        RT_SCOPE_UNIVERSE
    } else {
        RT_SCOPE_LINK
    };
    let mut msg = Message::new(
        RTM_NEWROUTE,
        NLM_F_CREATE | NLM_F_REPLACE,
        &rtmsg(family, route.prefix, scope),
    );
    if route.prefix > 0 {
        msg = msg.attr(RTA_DST, &dst);
    }
    if let Some(gateway) = route.gateway {
        msg = msg.attr(RTA_GATEWAY, &ip_bytes(gateway).1);
    }
    msg = msg.attr(RTA_OIF, &index.to_ne_bytes());
    if route.metric != 0 {
        msg = msg.attr(RTA_PRIORITY, &route.metric.to_ne_bytes());
    }
    msg
}

/// One message from the kernel: its type, sequence number and payload
/// (what follows the header).
#[derive(Debug, PartialEq)]
struct Reply<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed netlink {what}"),
    )
}

/// Splits a datagram into its messages.
fn split(datagram: &[u8]) -> io::Result<Vec<Reply<'_>>> {
    let mut replies = Vec::new();
    let mut rest = datagram;
    while rest.len() >= HEADER {
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
        if len < HEADER || len > rest.len() {
            return Err(malformed("message"));
        }
        replies.push(Reply {
            kind: u16::from_ne_bytes(rest[4..6].try_into().unwrap()),
            seq: u32::from_ne_bytes(rest[8..12].try_into().unwrap()),
            payload: &rest[HEADER..len],
        });
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Ok(replies)
}

/// Takes one datagram's messages for request `seq`: its replies are kept;
/// `Some` once the request is answered (its ack, or the end of a dump),
/// an error if the ack carries one.
fn take(datagram: &[u8], seq: u32, replies: &mut Vec<Vec<u8>>) -> io::Result<Option<()>> {
    for reply in split(datagram)? {
        // A late answer to an earlier request (one given up on).
        if reply.seq != seq {
            continue;
        }
        match reply.kind {
            NLMSG_ERROR | NLMSG_DONE => {
                // `struct nlmsgerr` starts with the negative errno (0: an
                // ack); a dump's end may carry one too.
                let code = match reply.payload.get(0..4) {
                    Some(b) => i32::from_ne_bytes(b.try_into().unwrap()),
                    None if reply.kind == NLMSG_DONE => 0,
                    None => return Err(malformed("error")),
                };
                return match code {
                    0 => Ok(Some(())),
                    _ => Err(io::Error::from_raw_os_error(-code)),
                };
            }
            _ => replies.push(reply.payload.to_vec()),
        }
    }
    Ok(None)
}

/// A link as `RTM_GETLINK` describes it.
#[derive(Debug, PartialEq)]
struct Link {
    index: u32,
    name: String,
}

/// Attributes: (type, data), until the first malformed one.
fn attrs(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut found = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        if len < 4 || len > data.len() {
            break;
        }
        // Without the nested and byte-order flags.
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        found.push((kind, &data[4..len]));
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    found
}

/// An `RTM_NEWLINK` reply: `ifinfomsg` (16 bytes), then attributes.
fn parse_link(payload: &[u8]) -> io::Result<Link> {
    let index = payload
        .get(4..8)
        .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
        .ok_or_else(|| malformed("link"))?;
    let name = attrs(payload.get(16..).unwrap_or_default())
        .into_iter()
        .find(|(kind, _)| *kind == IFLA_IFNAME)
        .map(|(_, data)| {
            let name = data.split(|&b| b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(name).into_owned()
        })
        .ok_or_else(|| malformed("link"))?;
    Ok(Link { index, name })
}

/// An `RTM_NEWADDR` reply: `ifaddrmsg` (8 bytes), then attributes: the
/// interface's index, the address and its prefix length.
fn parse_address(payload: &[u8]) -> Option<(u32, IpAddr, u8)> {
    let fixed = payload.get(0..8)?;
    let (family, prefix) = (fixed[0], fixed[1]);
    let index = u32::from_ne_bytes(fixed[4..8].try_into().unwrap());
    let found = attrs(&payload[8..]);
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's
    // on a point-to-point link, and the only one IPv6 sends otherwise.
    let bytes = [IFA_LOCAL, IFA_ADDRESS]
        .iter()
        .find_map(|want| found.iter().find(|(kind, _)| kind == want))?
        .1;
    let ip = match family {
        AF_INET => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        AF_INET6 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some((index, ip, prefix))
}

/// A `NETLINK_ROUTE` socket.
struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            // NETLINK_ROUTE is protocol 0.
            None,
        )?;
        // The kernel answers at once; a request is never waited on forever.
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            Timeout::Recv,
            Some(Duration::from_secs(10)),
        )?;
        Ok(Self { fd, seq: 0 })
    }

    /// Sends `msg` and returns the kernel's replies, up to its ack or the
    /// end of a dump; an error the kernel answers is returned as its errno.
    fn ask(&mut self, msg: Message) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = msg.finish(self.seq);
        let kernel = SocketAddrNetlink::new(0, 0);
        rustix::net::sendto(&self.fd, &bytes, SendFlags::empty(), &kernel)?;
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (n, whole) = rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::TRUNC)?;
            if whole > n {
                return Err(malformed("reply (too large)"));
            }
            if take(&buf[..n], self.seq, &mut replies)?.is_some() {
                return Ok(replies);
            }
        }
    }

    /// Sends `msg` and checks its ack.
    fn ack(&mut self, msg: Message) -> io::Result<()> {
        self.ask(msg).map(drop)
    }

    /// The link an `RTM_GETLINK` request names.
    fn link(&mut self, msg: Message) -> io::Result<Link> {
        let replies = self.ask(msg)?;
        parse_link(replies.first().ok_or_else(|| malformed("link (none)"))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A native-endian u16/u32 as bytes, for writing layouts out.
    fn u16b(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }
    fn u32b(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    fn header(len: u32, kind: u16, flags: u16, seq: u32) -> Vec<u8> {
        [
            &u32b(len)[..],
            &u16b(kind),
            &u16b(flags),
            &u32b(seq),
            &u32b(0),
        ]
        .concat()
    }

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = [&u16b(4 + data.len() as u16)[..], &u16b(kind), data].concat();
        align(&mut a);
        a
    }

    const REQ_ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn link_requests_are_laid_out_as_the_kernel_reads_them() {
        // RTM_GETLINK by name: ifinfomsg all zero, IFLA_IFNAME "eth0\0"
        // (5 bytes, padded to 8).
        let got = get_link_by_name("eth0").finish(7);
        let want = [
            header(16 + 16 + 12, RTM_GETLINK, REQ_ACK, 7),
            vec![0; 16],
            attr(IFLA_IFNAME, b"eth0\0"),
        ]
        .concat();
        assert_eq!(got, want);
        assert_eq!(
            &got[32..],
            &[9, 0, 3, 0, b'e', b't', b'h', b'0', 0, 0, 0, 0]
        );

        // Up and down: IFF_UP in flags (or not), IFF_UP in change.
        let ifinfo = |index: u32, flags: u32, change: u32| {
            [
                &[0u8, 0, 0, 0][..],
                &u32b(index),
                &u32b(flags),
                &u32b(change),
            ]
            .concat()
        };
        for (up, flags) in [(true, IFF_UP), (false, 0)] {
            assert_eq!(
                set_up(3, up).finish(1),
                [
                    header(32, RTM_NEWLINK, REQ_ACK, 1),
                    ifinfo(3, flags, IFF_UP)
                ]
                .concat()
            );
        }
        assert_eq!(
            get_link_by_index(2).finish(1),
            [header(32, RTM_GETLINK, REQ_ACK, 1), ifinfo(2, 0, 0)].concat()
        );
        assert_eq!(
            set_name(3, "ext0").finish(2),
            [
                header(44, RTM_NEWLINK, REQ_ACK, 2),
                ifinfo(3, 0, 0),
                attr(IFLA_IFNAME, b"ext0\0")
            ]
            .concat()
        );
        // A 6-byte MAC pads to 8.
        let mac = [0x02, 0x42, 0x0a, 0, 3, 0x0f];
        assert_eq!(
            set_mac(3, mac).finish(3),
            [
                header(44, RTM_NEWLINK, REQ_ACK, 3),
                ifinfo(3, 0, 0),
                attr(IFLA_ADDRESS, &mac)
            ]
            .concat()
        );
        assert_eq!(attr(IFLA_ADDRESS, &mac).len(), 12);
        assert_eq!(
            set_mtu(3, 9000).finish(4),
            [
                header(40, RTM_NEWLINK, REQ_ACK, 4),
                ifinfo(3, 0, 0),
                attr(IFLA_MTU, &u32b(9000))
            ]
            .concat()
        );
    }

    #[test]
    fn address_requests_are_laid_out_as_the_kernel_reads_them() {
        let replace = REQ_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        // IPv4: local and address, the subnet's broadcast, no flags.
        let got = add_address(2, ip("10.0.3.15"), 24).finish(5);
        let want = [
            header(16 + 8 + 4 * 8, RTM_NEWADDR, replace, 5),
            vec![AF_INET, 24, 0, 0],
            u32b(2).to_vec(),
            attr(IFA_LOCAL, &[10, 0, 3, 15]),
            attr(IFA_ADDRESS, &[10, 0, 3, 15]),
            attr(IFA_BROADCAST, &[10, 0, 3, 255]),
            attr(IFA_FLAGS, &u32b(0)),
        ]
        .concat();
        assert_eq!(got, want);
        // A /31 has no broadcast address.
        assert_eq!(add_address(2, ip("10.0.3.14"), 31).finish(5).len(), 48);
        // IPv6: no duplicate address detection, in both places.
        let v6 = ip("fd00::f");
        let IpAddr::V6(octets) = v6 else {
            unreachable!()
        };
        let got = add_address(2, v6, 64).finish(6);
        let want = [
            header(16 + 8 + 20 + 20 + 8, RTM_NEWADDR, replace, 6),
            vec![AF_INET6, 64, IFA_F_NODAD, 0],
            u32b(2).to_vec(),
            attr(IFA_LOCAL, &octets.octets()),
            attr(IFA_ADDRESS, &octets.octets()),
            attr(IFA_FLAGS, &u32b(IFA_F_NODAD.into())),
        ]
        .concat();
        assert_eq!(got, want);

        assert_eq!(
            del_address(2, ip("10.0.3.99"), 24).finish(7),
            [
                header(32, RTM_DELADDR, REQ_ACK, 7),
                vec![AF_INET, 24, 0, 0],
                u32b(2).to_vec(),
                attr(IFA_LOCAL, &[10, 0, 3, 99]),
            ]
            .concat()
        );
        assert_eq!(
            dump_addresses().finish(8),
            [header(24, RTM_GETADDR, REQ_ACK | NLM_F_DUMP, 8), vec![0; 8]].concat()
        );
    }

    #[test]
    fn route_requests_are_laid_out_as_the_kernel_reads_them() {
        let replace = REQ_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        // The default route: no destination attribute, a gateway, the
        // interface, universe scope.
        let default = NetRoute {
            dst: ip("0.0.0.0"),
            prefix: 0,
            gateway: Some(ip("10.0.3.1")),
            metric: 0,
        };
        assert_eq!(
            add_route(2, &default).finish(9),
            [
                header(16 + 12 + 8 + 8, RTM_NEWROUTE, replace, 9),
                vec![
                    AF_INET,
                    0,
                    0,
                    0,
                    RT_TABLE_MAIN,
                    RTPROT_BOOT,
                    RT_SCOPE_UNIVERSE,
                    RTN_UNICAST
                ],
                u32b(0).to_vec(),
                attr(RTA_GATEWAY, &[10, 0, 3, 1]),
                attr(RTA_OIF, &u32b(2)),
            ]
            .concat()
        );
        // On the link, with a metric: link scope, no gateway.
        let on_link = NetRoute {
            dst: ip("fd01::"),
            prefix: 48,
            gateway: None,
            metric: 100,
        };
        let mut dst = [0u8; 16];
        dst[..2].copy_from_slice(&[0xfd, 0x01]);
        assert_eq!(
            add_route(4, &on_link).finish(10),
            [
                header(16 + 12 + 20 + 8 + 8, RTM_NEWROUTE, replace, 10),
                vec![
                    AF_INET6,
                    48,
                    0,
                    0,
                    RT_TABLE_MAIN,
                    RTPROT_BOOT,
                    RT_SCOPE_LINK,
                    RTN_UNICAST
                ],
                u32b(0).to_vec(),
                attr(RTA_DST, &dst),
                attr(RTA_OIF, &u32b(4)),
                attr(RTA_PRIORITY, &u32b(100)),
            ]
            .concat()
        );
    }

    /// `struct nlmsgerr`: the errno, then the request's header.
    fn error(seq: u32, errno: i32) -> Vec<u8> {
        [
            header(36, NLMSG_ERROR, 0, seq),
            (-errno).to_ne_bytes().to_vec(),
            header(32, RTM_NEWLINK, REQ_ACK, seq),
        ]
        .concat()
    }

    #[test]
    fn acks_errors_and_dumps_are_read() {
        let mut replies = Vec::new();
        // An ack.
        assert!(matches!(take(&error(4, 0), 4, &mut replies), Ok(Some(()))));
        assert!(replies.is_empty());
        // An error: its errno, as the OS names it.
        let err = take(&error(4, libc::ENODEV), 4, &mut replies).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
        assert_eq!(err.to_string(), "No such device (os error 19)");
        // A late answer to another request is passed over.
        assert!(matches!(
            take(&error(3, libc::EINVAL), 4, &mut replies),
            Ok(None)
        ));
        // A reply, then the ack, in one datagram.
        let link = [header(24, RTM_NEWLINK, 0, 4), vec![1, 2, 3, 4, 5, 6, 7, 8]].concat();
        let both = [link.clone(), error(4, 0)].concat();
        assert!(matches!(take(&both, 4, &mut replies), Ok(Some(()))));
        assert_eq!(replies, vec![vec![1, 2, 3, 4, 5, 6, 7, 8]]);
        // A dump over two datagrams, ended by NLMSG_DONE.
        replies.clear();
        assert!(matches!(take(&link, 4, &mut replies), Ok(None)));
        let done = [header(20, NLMSG_DONE, 0, 4), vec![0; 4]].concat();
        assert!(matches!(take(&done, 4, &mut replies), Ok(Some(()))));
        assert_eq!(replies.len(), 1);
        // A length that overruns the datagram, or is shorter than a header.
        let mut long = error(4, 0);
        long[0..4].copy_from_slice(&u32b(400));
        assert_eq!(
            take(&long, 4, &mut replies).unwrap_err().to_string(),
            "malformed netlink message"
        );
        long[0..4].copy_from_slice(&u32b(8));
        assert!(take(&long, 4, &mut replies).is_err());
    }

    #[test]
    fn links_and_addresses_are_parsed_from_replies() {
        let ifinfo = [&[0u8, 0, 1, 0][..], &u32b(2), &u32b(0x1043), &u32b(0)].concat();
        let payload = [
            ifinfo.clone(),
            attr(IFLA_MTU, &u32b(1500)),
            attr(IFLA_IFNAME, b"eth0\0"),
        ]
        .concat();
        assert_eq!(
            parse_link(&payload).unwrap(),
            Link {
                index: 2,
                name: "eth0".into()
            }
        );
        assert!(parse_link(&ifinfo).is_err());

        let v4 = [
            vec![AF_INET, 24, 0x80, 0],
            u32b(2).to_vec(),
            attr(IFA_ADDRESS, &[10, 0, 3, 15]),
            attr(IFA_LOCAL, &[10, 0, 3, 15]),
        ]
        .concat();
        assert_eq!(parse_address(&v4), Some((2, ip("10.0.3.15"), 24)));
        let v6 = [
            vec![AF_INET6, 64, 0x80, 0],
            u32b(3).to_vec(),
            attr(IFA_ADDRESS, &ip_bytes(ip("fe80::1")).1),
        ]
        .concat();
        assert_eq!(parse_address(&v6), Some((3, ip("fe80::1"), 64)));
        assert_eq!(parse_address(&v6[..8]), None);
    }

    fn eth0(addresses: &[(&str, u8)], routes: Vec<NetRoute>) -> NetInterface {
        NetInterface {
            slot: 0,
            name: "eth0".into(),
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            addresses: addresses.iter().map(|&(a, p)| (ip(a), p)).collect(),
            routes,
        }
    }

    fn route(dst: &str, prefix: u8, gateway: Option<&str>) -> NetRoute {
        NetRoute {
            dst: ip(dst),
            prefix,
            gateway: gateway.map(ip),
            metric: 0,
        }
    }

    #[test]
    fn bad_requests_are_refused_by_name_before_anything_changes() {
        let two = |a: NetInterface, b: NetInterface| check(&[a, b]).unwrap_err();
        let mut other = eth0(&[], Vec::new());
        other.name = "eth1".into();
        assert_eq!(
            two(eth0(&[], Vec::new()), other.clone()),
            "network slot 0 is given twice"
        );
        other.slot = 1;
        other.name = "eth0".into();
        assert_eq!(
            two(eth0(&[], Vec::new()), other),
            "interface name eth0 is given twice"
        );
        for name in ["", "sixteen-bytes-xx", "a/b", "a b", "eth0:1", ".", ".."] {
            let mut iface = eth0(&[], Vec::new());
            iface.name = name.into();
            assert_eq!(
                check(&[iface]).unwrap_err(),
                format!(
                    "network slot 0: {name:?} is not an interface name: 1 to 15 bytes, \
                     no '/', ':' or white space"
                )
            );
        }
        assert_eq!(
            check(&[eth0(&[("10.0.3.15", 33)], Vec::new())]).unwrap_err(),
            "interface eth0 (slot 0): address 10.0.3.15/33: the prefix is longer than 32"
        );
        assert_eq!(
            check(&[eth0(&[], vec![route("fd00::", 129, None)])]).unwrap_err(),
            "interface eth0 (slot 0): route fd00::/129: the prefix is longer than 128"
        );
        assert_eq!(
            check(&[eth0(&[], vec![route("0.0.0.0", 0, Some("fd00::1"))])]).unwrap_err(),
            "interface eth0 (slot 0): route default via fd00::1: it mixes IPv4 and IPv6"
        );
        let fine = eth0(
            &[("10.0.3.15", 24), ("fd00::f", 64)],
            vec![
                route("0.0.0.0", 0, Some("10.0.3.1")),
                route("::", 0, Some("fd00::1")),
            ],
        );
        assert_eq!(check(&[fine]), Ok(()));
    }

    #[test]
    fn the_kernels_own_prefix_routes_are_not_added_again() {
        let iface = eth0(
            &[("10.0.3.15", 24), ("fd00::f", 64), ("10.9.9.9", 32)],
            Vec::new(),
        );
        assert!(made_by_kernel(&iface, &route("10.0.3.0", 24, None)));
        assert!(made_by_kernel(&iface, &route("fd00::", 64, None)));
        // Through a gateway, another prefix length, another subnet, or a
        // host route: the host's to add.
        assert!(!made_by_kernel(
            &iface,
            &route("10.0.3.0", 24, Some("10.0.3.1"))
        ));
        assert!(!made_by_kernel(&iface, &route("10.0.0.0", 16, None)));
        assert!(!made_by_kernel(&iface, &route("10.0.4.0", 24, None)));
        assert!(!made_by_kernel(&iface, &route("10.9.9.9", 32, None)));
        assert_eq!(network(ip("10.0.3.15"), 0), ip("0.0.0.0"));
        assert_eq!(network(ip("10.0.3.15"), 32), ip("10.0.3.15"));
        assert_eq!(network(ip("fd00::1:f"), 112), ip("fd00::1:0"));
        assert!(is_ipv6_link_local(ip("fe80::1")));
        assert!(!is_ipv6_link_local(ip("fd00::1")));
        let mut r = route("10.1.0.0", 16, Some("10.0.3.1"));
        r.metric = 100;
        assert_eq!(describe(&r), "10.1.0.0/16 via 10.0.3.1 metric 100");
    }

    /// The real socket, on the host, without privileges: a lookup.
    #[test]
    fn the_kernel_answers_a_lookup_and_names_its_error() {
        let mut nl = Netlink::open().unwrap();
        let lo = nl.link(get_link_by_name("lo")).unwrap();
        assert_eq!(lo.name, "lo");
        assert_eq!(nl.link(get_link_by_index(lo.index)).unwrap(), lo);
        let err = nl.link(get_link_by_name("husk-none0")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV), "{err}");
        // A dump ends, and lists lo's 127.0.0.1 if it is up.
        let addresses = nl.ask(dump_addresses()).unwrap();
        assert!(addresses.iter().all(|m| parse_address(m).is_some()));
    }
}
