//! The host side of tap mode: a network namespace per VM holding the tap device the
//! daemon attaches to, joined to the host by a veth pair, with NAT at both ends.
//!
//! ```text
//!  guest 10.0.2.15 ── tap0 10.0.2.2 ┐ namespace NS (forwarding, MASQUERADE out of mav<N>g)
//!                                   mav<N>g 10.201.x.2/30
//!                                      │ veth
//!  host                             mav<N>h 10.201.x.1/30, MASQUERADE for 10.201.x.0/30
//! ```
//!
//! Every namespace has the same guest network (10.0.2.0/24, the user network's plan), so
//! forks with the same guest address run side by side; only the veth pair's /30 (from
//! 10.201.0.0/16) differs, chosen by the first free index `N` (`ip link add` of
//! `mav<N>h` is the allocation: it fails for a taken name). [`remove`] needs only the
//! namespace's name: the index is read back from the veth end inside it, the host's NAT
//! rule is found by its comment. Made with `ip` and `iptables` (iproute2, iptables).

use crate::frame::{DNS, GATEWAY, GATEWAY_MAC, PREFIX_LEN};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Command;

/// The device the daemon attaches to, inside every namespace.
pub const TAP: &str = "tap0";
/// veth indexes: 10.201.0.0/16 holds this many /30s.
const MAX_INDEX: u32 = 16_384;
/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "tap mode needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to make network namespace \
         {netns}: `{command}` said: {stderr}; run microagent as root or use --net user"
    )]
    NeedsRoot {
        netns: String,
        command: String,
        stderr: String,
    },
    #[error(
        "tap mode needs root: this process lacks {0} (network namespaces and tap devices \
         need CAP_NET_ADMIN and CAP_SYS_ADMIN); run microagent as root or use --net user"
    )]
    Unprivileged(String),
    #[error("network namespace {0} already exists: `microagent delete` of its workspace, or `ip netns del {0}`, removes it")]
    Exists(String),
    #[error("{0:?} is not a usable network namespace name (1-64 of a-z, 0-9 and -)")]
    BadName(String),
    #[error("no free veth index: {MAX_INDEX} tap networks exist")]
    NoIndex,
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("running `{command}`: {source} (is {program} installed? scripts/install-deps.sh)")]
    Spawn {
        command: String,
        program: String,
        source: std::io::Error,
    },
}

impl Error {
    /// A stable code for the CLI and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NeedsRoot { .. } | Self::Unprivileged(_) => "net.tap_needs_root",
            Self::Exists(_) => "net.netns_exists",
            Self::BadName(_) => "net.bad_netns",
            Self::NoIndex => "net.no_tap_index",
            Self::Command { .. } | Self::Spawn { .. } => "net.tap_setup_failed",
        }
    }
}

/// A made tap network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapNetwork {
    pub netns: String,
    pub index: u32,
}

impl TapNetwork {
    /// The host's end of the veth pair.
    pub fn host_veth(&self) -> String {
        format!("mav{}h", self.index)
    }

    /// The namespace's end of the veth pair.
    pub fn netns_veth(&self) -> String {
        format!("mav{}g", self.index)
    }

    /// The host's address on the veth pair: guest flows to it reach host services.
    pub fn host_addr(&self) -> Ipv4Addr {
        veth_addr(self.index, 1)
    }

    /// The namespace's address on the veth pair: guest flows leave the namespace from it.
    pub fn netns_addr(&self) -> Ipv4Addr {
        veth_addr(self.index, 2)
    }
}

fn veth_addr(index: u32, host: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 201, 0, 0)) + index * 4 + host)
}

/// The comment on the host's NAT rule of `netns` (how [`remove`] finds it).
fn comment(netns: &str) -> String {
    format!("microagent:{netns}")
}

fn check_name(netns: &str) -> Result<(), Error> {
    let ok = !netns.is_empty()
        && netns.len() <= 64
        && netns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(netns.to_owned()))
    }
}

/// Refuses early, before anything is made, when this process lacks CAP_NET_ADMIN or
/// CAP_SYS_ADMIN (what `ip netns add` and a tap need).
pub fn check_privileges() -> Result<(), Error> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let needed = [("CAP_NET_ADMIN", 12), ("CAP_SYS_ADMIN", 21)];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, bit)| effective & (1 << bit) == 0)
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Unprivileged(missing.join(" and ")))
}

/// Whether namespace `netns` exists (something of its network may be left to remove).
pub fn exists(netns: &str) -> bool {
    Path::new(NETNS_DIR).join(netns).exists()
}

/// Runs a command; its stderr on failure. EPERM-like failures become [`Error::NeedsRoot`].
fn run(netns: &str, program: &str, args: &[&str]) -> Result<String, Error> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            program: program.to_owned(),
            source,
        })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let denied = [
        "Operation not permitted",
        "Permission denied",
        "must be root",
    ];
    if denied.iter().any(|d| stderr.contains(d)) {
        return Err(Error::NeedsRoot {
            netns: netns.to_owned(),
            command,
            stderr,
        });
    }
    Err(Error::Command { command, stderr })
}

/// Makes the namespace, its tap (with the gateway's address and MAC), the veth pair and
/// both NAT rules; with `dns`, the guest's DNS address 10.0.2.3 on the tap, its port 53
/// forwarded (DNAT) to that resolver. On failure, whatever was made is removed again.
pub fn create(netns: &str, dns: Option<SocketAddrV4>) -> Result<TapNetwork, Error> {
    check_name(netns)?;
    if exists(netns) {
        return Err(Error::Exists(netns.to_owned()));
    }
    run(netns, "ip", &["netns", "add", netns])?;
    let made = (|| {
        let index = add_veth(netns)?;
        let net = TapNetwork {
            netns: netns.to_owned(),
            index,
        };
        configure(&net)?;
        if let Some(dns) = dns {
            forward_dns(&net, dns)?;
        }
        Ok(net)
    })();
    if made.is_err() {
        if let Err(e) = remove(netns) {
            log::warn!("removing the half-made network {netns}: {e}");
        }
    }
    made
}

/// The first free index: its veth pair is made with one end in the namespace.
fn add_veth(netns: &str) -> Result<u32, Error> {
    for index in 0..MAX_INDEX {
        let (host, peer) = (format!("mav{index}h"), format!("mav{index}g"));
        let args = [
            "link", "add", &host, "type", "veth", "peer", "name", &peer, "netns", netns,
        ];
        match run(netns, "ip", &args) {
            Ok(_) => return Ok(index),
            Err(Error::Command { stderr, .. }) if stderr.contains("File exists") => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::NoIndex)
}

fn configure(net: &TapNetwork) -> Result<(), Error> {
    let ns = net.netns.as_str();
    let (host_veth, ns_veth) = (net.host_veth(), net.netns_veth());
    let host_cidr = format!("{}/30", net.host_addr());
    let ns_cidr = format!("{}/30", net.netns_addr());
    let host_addr = net.host_addr().to_string();
    let subnet = format!("{}/30", veth_addr(net.index, 0));
    let guest_net = format!("{}/{PREFIX_LEN}", veth_gateway_net());
    let gateway = format!("{GATEWAY}/{PREFIX_LEN}");
    let mac = GATEWAY_MAC.0.map(|b| format!("{b:02x}")).join(":");
    let comment = comment(ns);
    let steps: &[(&str, &[&str])] = &[
        ("ip", &["addr", "add", &host_cidr, "dev", &host_veth]),
        ("ip", &["link", "set", &host_veth, "up"]),
        // The guest network is IPv4: no router solicitations or MLD reports on the tap.
        (
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.default.disable_ipv6=1",
                "net.ipv6.conf.all.disable_ipv6=1",
            ],
        ),
        ("ip", &["-n", ns, "link", "set", "lo", "up"]),
        ("ip", &["-n", ns, "addr", "add", &ns_cidr, "dev", &ns_veth]),
        ("ip", &["-n", ns, "link", "set", &ns_veth, "up"]),
        (
            "ip",
            &["-n", ns, "route", "add", "default", "via", &host_addr],
        ),
        (
            "ip",
            &["-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap"],
        ),
        ("ip", &["-n", ns, "link", "set", TAP, "address", &mac]),
        ("ip", &["-n", ns, "addr", "add", &gateway, "dev", TAP]),
        ("ip", &["-n", ns, "link", "set", TAP, "up"]),
        (
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &guest_net,
                "-o",
                &ns_veth,
                "-j",
                "MASQUERADE",
            ],
        ),
        (
            "iptables",
            &[
                "-w",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &subnet,
                "!",
                "-o",
                &host_veth,
                "-m",
                "comment",
                "--comment",
                &comment,
                "-j",
                "MASQUERADE",
            ],
        ),
    ];
    for (program, args) in steps {
        run(ns, program, args)?;
    }
    enable_host_forwarding();
    Ok(())
}

/// 10.0.2.3 on the tap, and its port 53 (UDP and TCP) forwarded to `dns`: a resolver
/// the namespace can reach (not the host's loopback).
fn forward_dns(net: &TapNetwork, dns: SocketAddrV4) -> Result<(), Error> {
    let ns = net.netns.as_str();
    let address = format!("{DNS}/32");
    run(ns, "ip", &["-n", ns, "addr", "add", &address, "dev", TAP])?;
    let to = dns.to_string();
    let dest = DNS.to_string();
    for protocol in ["udp", "tcp"] {
        let args = [
            "netns",
            "exec",
            ns,
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-i",
            TAP,
            "-d",
            &dest,
            "-p",
            protocol,
            "--dport",
            "53",
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ];
        run(ns, "ip", &args)?;
    }
    Ok(())
}

/// 10.0.2.0, the guest network.
fn veth_gateway_net() -> Ipv4Addr {
    let [a, b, c, _] = GATEWAY.octets();
    Ipv4Addr::new(a, b, c, 0)
}

/// Guest flows to the world are forwarded by the host (flows to host addresses are
/// not). Turned on as container runtimes do, and left on: other users may rely on it.
fn enable_host_forwarding() {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "0") {
        match std::fs::write(path, "1") {
            Ok(()) => log::info!("turned on IPv4 forwarding for tap networks"),
            Err(e) => log::warn!("turning on IPv4 forwarding: {e}"),
        }
    }
}

/// Removes the host's NAT rule of `netns`, its veth pair and the namespace (with the
/// tap). Idempotent: what is already gone is skipped.
pub fn remove(netns: &str) -> Result<(), Error> {
    check_name(netns)?;
    let comment = format!("\"{}\"", comment(netns));
    let rules = run(netns, "iptables", &["-w", "-t", "nat", "-S", "POSTROUTING"])?;
    for rule in rules
        .lines()
        .filter(|r| r.starts_with("-A ") && r.contains(&comment))
    {
        let delete: Vec<&str> = std::iter::once("-w")
            .chain(["-t", "nat", "-D"])
            .chain(rule.split_whitespace().skip(1).map(|w| w.trim_matches('"')))
            .collect();
        run(netns, "iptables", &delete)?;
    }
    let Some(net) = lookup(netns)? else {
        return Ok(());
    };
    // The host end goes with its peer; deleting it now, rather than waiting for the
    // namespace's asynchronous teardown, leaves nothing behind when this returns.
    if net.index < MAX_INDEX {
        match run(netns, "ip", &["link", "del", &net.host_veth()]) {
            Ok(_) => {}
            Err(Error::Command { stderr, .. }) if stderr.contains("Cannot find device") => {}
            Err(e) => return Err(e),
        }
    }
    run(netns, "ip", &["netns", "del", netns])?;
    Ok(())
}

/// The tap network in namespace `netns`, if the namespace exists; its index is read
/// from the veth end inside it ([`MAX_INDEX`] when it has none: a half-made one).
pub fn lookup(netns: &str) -> Result<Option<TapNetwork>, Error> {
    check_name(netns)?;
    if !exists(netns) {
        return Ok(None);
    }
    let links = run(netns, "ip", &["-n", netns, "-o", "link", "show"])?;
    let index = links.lines().find_map(veth_index).unwrap_or(MAX_INDEX);
    Ok(Some(TapNetwork {
        netns: netns.to_owned(),
        index,
    }))
}

/// The index of a `mav<N>g` line of `ip -o link show` (`7: mav3g@if8: <...`).
fn veth_index(line: &str) -> Option<u32> {
    let name = line.split(": ").nth(1)?;
    let name = name.split('@').next()?;
    name.strip_prefix("mav")?.strip_suffix('g')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_addresses_are_one_slash_30_per_index() {
        let net = TapNetwork {
            netns: "x".into(),
            index: 0,
        };
        assert_eq!(net.host_addr(), Ipv4Addr::new(10, 201, 0, 1));
        assert_eq!(net.netns_addr(), Ipv4Addr::new(10, 201, 0, 2));
        let last = TapNetwork {
            netns: "x".into(),
            index: MAX_INDEX - 1,
        };
        assert_eq!(last.host_addr(), Ipv4Addr::new(10, 201, 255, 253));
        assert_eq!(last.host_veth(), "mav16383h");
        assert!(last.host_veth().len() <= 15, "IFNAMSIZ");
    }

    #[test]
    fn veth_index_is_read_from_ip_link_lines() {
        assert_eq!(
            veth_index("7: mav12g@if8: <BROADCAST,MULTICAST,UP> mtu 1500"),
            Some(12)
        );
        assert_eq!(veth_index("1: lo: <LOOPBACK,UP> mtu 65536"), None);
        assert_eq!(veth_index("3: tap0: <NO-CARRIER> mtu 1500"), None);
        assert_eq!(veth_index("4: mavxg@if2: <UP>"), None);
    }

    #[test]
    fn names_that_are_not_plain_are_refused() {
        for bad in ["", "a/b", "../x", "A", "x y", &"a".repeat(65)] {
            assert_eq!(check_name(bad).unwrap_err().code(), "net.bad_netns");
        }
        check_name("microagent-ws-1").unwrap();
    }
}
