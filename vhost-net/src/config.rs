//! Flags of `microagent-vhost-net`, checked into a [`NetConfig`].

use clap::{Parser, ValueEnum};
use microagent_daemon_kit::serve::MAX_SOCKET_PATH;
use smoltcp::wire::EthernetAddress;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--socket-path {0} is too long for a unix socket address (at most {MAX_SOCKET_PATH} bytes)"
    )]
    PathTooLong(PathBuf),
    #[error("--mac {0:?} is not a unicast MAC address like 52:54:00:12:34:56")]
    BadMac(String),
    #[error(
        "--publish {0:?} is not [IP:]HOSTPORT:GUESTPORT[/tcp|udp] with ports from 1 to 65535 \
         (for example 127.0.0.1:8080:80/tcp)"
    )]
    BadPublish(String),
    #[error("--dns {0:?} is not an IP address with an optional port (1.1.1.1 or 127.0.0.1:5353)")]
    BadDns(String),
    #[error("reading {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no IPv4 nameserver in {0}: pass --dns IP[:PORT]")]
    NoResolver(PathBuf),
    #[error(
        "--{0} is for --mode user (in tap mode the namespace's kernel routes the guest's traffic)"
    )]
    UserOnly(&'static str),
}

impl Error {
    /// A stable code for the CLI and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::PathTooLong(_) => "net.socket_path_too_long",
            Self::BadMac(_) => "net.bad_mac",
            Self::BadPublish(_) => "net.bad_publish",
            Self::BadDns(_) => "net.bad_dns",
            Self::ResolvConf { .. } | Self::NoResolver(_) => "net.no_resolver",
            Self::UserOnly(_) => "net.user_mode_only",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// A private network per daemon: DHCP, DNS, and guest flows as host sockets (NAT).
    User,
    /// A tap device (root): in the network namespace of --netns, made by `microagent`
    /// with a veth pair and NAT to the host (see the `netns` module), or in the
    /// daemon's own namespace.
    Tap,
}

/// vhost-user net device with a user-mode network: the guest gets 10.0.2.15/24 by DHCP,
/// the gateway 10.0.2.2 (reaching the host's 127.0.0.1) and DNS 10.0.2.3 (forwarded to
/// the host's resolvers); guest TCP and UDP flows become host sockets. Serves one
/// frontend and exits 0 when it disconnects.
#[derive(Debug, Parser)]
#[command(name = "microagent-vhost-net", version)]
pub struct Args {
    /// Unix socket to listen on for the vhost-user frontend.
    #[arg(long)]
    pub socket_path: PathBuf,
    /// The guest's MAC address (config space).
    #[arg(long, default_value = "52:54:00:12:34:56")]
    pub mac: String,
    #[arg(long, value_enum, default_value = "user")]
    pub mode: Mode,
    /// Tap mode: the tap device to attach to (made if missing, in --netns if given).
    #[arg(long, default_value = crate::netns::TAP)]
    pub tap: String,
    /// Tap mode: the network namespace (a name under /run/netns) holding the tap.
    #[arg(long)]
    pub netns: Option<String>,
    /// Forward a host port to a guest port: [IP:]HOSTPORT:GUESTPORT[/tcp|udp]. IP
    /// defaults to 127.0.0.1, the protocol to TCP. Repeatable.
    #[arg(long)]
    pub publish: Vec<String>,
    /// Upstream DNS server for 10.0.2.3, IP[:PORT]; default: the nameservers of
    /// --resolv-conf. Repeatable.
    #[arg(long)]
    pub dns: Vec<String>,
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    #[command(flatten)]
    pub confine: microagent_confine::ConfineArgs,
    #[command(flatten)]
    pub landlock: microagent_confine::LandlockArgs,
}

/// The transport a published port forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One inbound forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    pub host: SocketAddr,
    pub guest_port: u16,
    pub protocol: Protocol,
}

impl FromStr for Publish {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self, Error> {
        let bad = || Error::BadPublish(spec.to_owned());
        let (ports, protocol) = match spec.rsplit_once('/') {
            Some((ports, "tcp")) => (ports, Protocol::Tcp),
            Some((ports, "udp")) => (ports, Protocol::Udp),
            Some(_) => return Err(bad()),
            None => (spec, Protocol::Tcp),
        };
        let (rest, guest) = ports.rsplit_once(':').ok_or_else(bad)?;
        let (ip, host) = match rest.rsplit_once(':') {
            Some((ip, host)) => {
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                (IpAddr::from_str(ip).map_err(|_| bad())?, host)
            }
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), rest),
        };
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
        Ok(Self {
            host: SocketAddr::new(ip, port(host)?),
            guest_port: port(guest)?,
            protocol,
        })
    }
}

#[derive(Debug, Clone)]
pub struct NetConfig {
    pub socket_path: PathBuf,
    pub mac: EthernetAddress,
    pub mode: Mode,
    /// Tap mode: the device and its namespace.
    pub tap: String,
    pub netns: Option<String>,
    pub publish: Vec<Publish>,
    /// Where 10.0.2.3:53 is forwarded.
    pub dns: Vec<SocketAddr>,
    pub seccomp: microagent_confine::Seccomp,
    /// `--landlock-dir`: after set-up, files only beneath these (none: no Landlock).
    pub landlock: Vec<PathBuf>,
}

impl TryFrom<Args> for NetConfig {
    type Error = Error;

    fn try_from(args: Args) -> Result<Self, Error> {
        if args.socket_path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::PathTooLong(args.socket_path));
        }
        let mac = EthernetAddress::from_str(&args.mac)
            .ok()
            .filter(EthernetAddress::is_unicast)
            .ok_or_else(|| Error::BadMac(args.mac.clone()))?;
        let publish: Vec<Publish> = args
            .publish
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, _>>()?;
        if args.mode == Mode::Tap {
            if !publish.is_empty() {
                return Err(Error::UserOnly("publish"));
            }
            if !args.dns.is_empty() {
                return Err(Error::UserOnly("dns"));
            }
        }
        let dns = if args.mode == Mode::Tap {
            Vec::new()
        } else if args.dns.is_empty() {
            let text =
                std::fs::read_to_string(&args.resolv_conf).map_err(|source| Error::ResolvConf {
                    path: args.resolv_conf.clone(),
                    source,
                })?;
            let found = nameservers(&text);
            if found.is_empty() {
                return Err(Error::NoResolver(args.resolv_conf));
            }
            found
        } else {
            args.dns
                .iter()
                .map(|d| parse_dns(d).ok_or_else(|| Error::BadDns(d.clone())))
                .collect::<Result<_, _>>()?
        };
        Ok(Self {
            socket_path: args.socket_path,
            mac,
            mode: args.mode,
            tap: args.tap,
            netns: args.netns,
            publish,
            dns,
            seccomp: args.confine.seccomp,
            landlock: args.landlock.landlock_dirs,
        })
    }
}

/// An upstream resolver, `IP[:PORT]` (IPv4, port 53 by default).
pub fn parse_dns(spec: &str) -> Option<SocketAddr> {
    spec.parse::<SocketAddr>()
        .ok()
        .or_else(|| Some(SocketAddr::new(spec.parse().ok()?, 53)))
        .filter(|a| a.is_ipv4() && a.port() != 0)
}

/// The IPv4 `nameserver` lines of a resolv.conf.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|ip| ip.parse::<Ipv4Addr>().ok())
        .map(|ip| SocketAddr::new(IpAddr::V4(ip), 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<NetConfig, Error> {
        let mut argv = vec![
            "x",
            "--socket-path",
            "/tmp/n.sock",
            "--dns",
            "127.0.0.1:5353",
        ];
        argv.extend_from_slice(extra);
        NetConfig::try_from(Args::parse_from(argv))
    }

    #[test]
    fn publish_specs_parse_with_defaults_and_bad_ones_are_refused() {
        let p: Publish = "8080:80".parse().unwrap();
        assert_eq!(p.host, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((p.guest_port, p.protocol), (80, Protocol::Tcp));
        let p: Publish = "0.0.0.0:2222:22/tcp".parse().unwrap();
        assert_eq!(p.host, "0.0.0.0:2222".parse().unwrap());
        assert_eq!(p.protocol, Protocol::Tcp);
        let p: Publish = "[::1]:9000:90".parse().unwrap();
        assert_eq!(p.host, "[::1]:9000".parse().unwrap());
        let p: Publish = "5353:53/udp".parse().unwrap();
        assert_eq!(p.host, "127.0.0.1:5353".parse().unwrap());
        assert_eq!((p.guest_port, p.protocol), (53, Protocol::Udp));
        let p: Publish = "0.0.0.0:6000:60/udp".parse().unwrap();
        assert_eq!(p.host, "0.0.0.0:6000".parse().unwrap());
        for bad in [
            "80",
            "0:80",
            "80:0",
            "a:80",
            "1.2.3:80:80",
            "80:80/sctp",
            "80:80/UDP",
            "80:80/",
            "/udp",
            "53/udp",
            "0:53/udp",
            "53:0/udp",
            "53:53/udp/tcp",
            "70000:80",
            "70000:80/udp",
        ] {
            let err = bad.parse::<Publish>().unwrap_err();
            assert_eq!(err.code(), "net.bad_publish", "{bad}");
            assert!(err.to_string().contains("[/tcp|udp]"), "{err}");
        }
    }

    #[test]
    fn macs_must_be_unicast_and_dns_must_be_ipv4() {
        assert_eq!(
            parse(&["--mac", "52:54:00:aa:bb:cc"]).unwrap().mac,
            EthernetAddress([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc])
        );
        for bad in ["01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "52:54", "zz"] {
            assert_eq!(parse(&["--mac", bad]).unwrap_err().code(), "net.bad_mac");
        }
        let c = parse(&["--dns", "9.9.9.9"]).unwrap();
        assert_eq!(c.dns[1], "9.9.9.9:53".parse().unwrap());
        assert_eq!(parse(&["--dns", "::1"]).unwrap_err().code(), "net.bad_dns");
    }

    #[test]
    fn resolv_conf_nameservers_are_read_and_ipv6_ones_skipped() {
        let text = "# comment\nsearch lan\nnameserver 127.0.0.53\nnameserver ::1\n\
                    nameserver   10.1.1.1 \noptions edns0\n";
        assert_eq!(
            nameservers(text),
            [
                "127.0.0.53:53".parse().unwrap(),
                "10.1.1.1:53".parse().unwrap()
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver ::1\n").unwrap();
        let args = Args::parse_from([
            "x",
            "--socket-path",
            "/tmp/n.sock",
            "--resolv-conf",
            path.to_str().unwrap(),
        ]);
        let err = NetConfig::try_from(args).unwrap_err();
        assert_eq!(err.code(), "net.no_resolver");
    }

    #[test]
    fn tap_mode_needs_no_resolver_and_refuses_user_mode_flags() {
        let args = Args::parse_from([
            "x",
            "--socket-path",
            "/tmp/n.sock",
            "--mode",
            "tap",
            "--netns",
            "microagent-ws",
            "--resolv-conf",
            "/nonexistent",
        ]);
        let config = NetConfig::try_from(args).unwrap();
        assert_eq!(config.mode, Mode::Tap);
        assert_eq!(config.tap, "tap0");
        assert_eq!(config.netns.as_deref(), Some("microagent-ws"));
        let err = parse(&["--mode", "tap", "--publish", "8080:80"]).unwrap_err();
        assert_eq!(err.code(), "net.user_mode_only");
        assert!(
            err.to_string().contains("--publish is for --mode user"),
            "{err}"
        );
        assert_eq!(
            parse(&["--mode", "tap"]).unwrap_err().code(),
            "net.user_mode_only"
        );
    }
}
