//! Static network configuration from the kernel command line, when the VM has a network
//! device: `microagent.ip=ADDR/PREFIX`, `microagent.gw=GATEWAY`, `microagent.dns=A[,B]`.
//! The first non-loopback interface gets the address and a default route; loopback is
//! brought up; DNS servers go to the workspace's /etc/resolv.conf.

use crate::init::Root;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

/// The configuration on a command line, if it asks for one.
pub fn from_cmdline(cmdline: &str) -> Option<Result<NetConfig, String>> {
    let param = |key: &str| {
        cmdline
            .split_whitespace()
            .find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
    };
    let ip = param("microagent.ip")?;
    Some((|| {
        let (addr, prefix) = ip.split_once('/').unwrap_or((ip, "24"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("bad microagent.ip {ip:?}"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("bad prefix in microagent.ip {ip:?}"))?;
        let gateway = param("microagent.gw")
            .map(|g| g.parse().map_err(|_| format!("bad microagent.gw {g:?}")))
            .transpose()?;
        let dns = param("microagent.dns")
            .map(|d| {
                d.split(',')
                    .map(|a| a.parse().map_err(|_| format!("bad microagent.dns {d:?}")))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        Ok(NetConfig {
            addr,
            prefix,
            gateway,
            dns,
        })
    })())
}

/// `struct ifreq` with an address (x86_64 layout: 16-byte name, 24-byte union).
#[repr(C)]
struct IfReqAddr {
    name: [u8; 16],
    addr: libc::sockaddr_in,
    pad: [u8; 8],
}

/// `struct ifreq` with a hardware address (`struct sockaddr`: family, 14 data bytes).
#[repr(C)]
struct IfReqHwAddr {
    name: [u8; 16],
    family: libc::sa_family_t,
    data: [u8; 14],
    pad: [u8; 8],
}

/// `struct ifreq` with flags.
#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    pad: [u8; 22],
}

/// `struct rtentry` (linux/route.h, x86_64).
#[repr(C)]
struct RtEntry {
    pad1: libc::c_ulong,
    dst: libc::sockaddr_in,
    gateway: libc::sockaddr_in,
    genmask: libc::sockaddr_in,
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: libc::c_ulong,
    pad4: *mut libc::c_void,
    metric: libc::c_short,
    dev: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: libc::c_ushort,
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn name(iface: &str) -> [u8; 16] {
    let mut n = [0u8; 16];
    let len = iface.len().min(15);
    n[..len].copy_from_slice(&iface.as_bytes()[..len]);
    n
}

fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
    // SAFETY: `arg` is a correctly laid out request structure for `request`, alive for
    // the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) } < 0 {
        return Err(format!("{what}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn up(sock: &OwnedFd, iface: &str) -> Result<(), String> {
    let mut req = IfReqFlags {
        name: name(iface),
        flags: 0,
        pad: [0; 22],
    };
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        &mut req,
        "reading interface flags",
    )?;
    req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        &mut req,
        "bringing the interface up",
    )
}

/// The first network interface other than loopback, by name.
fn first_interface() -> Result<String, String> {
    let mut ifaces: Vec<String> = fs::read_dir("/sys/class/net")
        .map_err(|e| format!("/sys/class/net: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    ifaces.sort();
    ifaces
        .first()
        .cloned()
        .ok_or_else(|| "no network device".into())
}

/// A socket for interface ioctls.
fn control_socket() -> Result<OwnedFd, String> {
    // SAFETY: socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A unicast MAC address written `52:54:00:12:34:56`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2)?;
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// Gives the first network interface a new MAC (a fork's own). Linux's virtio-net
/// changes it while the link is up; the host's user network learns it from the next
/// frame. A workspace without a network device has nothing to change.
pub fn set_mac(mac: [u8; 6]) -> Result<(), String> {
    let Ok(iface) = first_interface() else {
        return Ok(());
    };
    let mut data = [0u8; 14];
    data[..6].copy_from_slice(&mac);
    let mut req = IfReqHwAddr {
        name: name(&iface),
        family: libc::ARPHRD_ETHER,
        data,
        pad: [0; 8],
    };
    ioctl(
        &control_socket()?,
        libc::SIOCSIFHWADDR,
        &mut req,
        "setting the MAC address",
    )
}

/// Applies `config` to the first non-loopback interface; returns its name.
pub fn configure(root: &Root, config: &NetConfig) -> Result<String, String> {
    let iface = first_interface()?;
    let sock = control_socket()?;
    up(&sock, "lo")?;
    let mut req = IfReqAddr {
        name: name(&iface),
        addr: sockaddr(config.addr),
        pad: [0; 8],
    };
    ioctl(&sock, libc::SIOCSIFADDR, &mut req, "setting the address")?;
    let mask = u32::MAX
        .checked_shl(32 - u32::from(config.prefix))
        .unwrap_or(0);
    req.addr = sockaddr(Ipv4Addr::from(mask));
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req, "setting the netmask")?;
    up(&sock, &iface)?;
    if let Some(gateway) = config.gateway {
        let any = sockaddr(Ipv4Addr::UNSPECIFIED);
        let mut route = RtEntry {
            pad1: 0,
            dst: any,
            gateway: sockaddr(gateway),
            genmask: any,
            flags: libc::RTF_UP | libc::RTF_GATEWAY,
            pad2: 0,
            pad3: 0,
            pad4: std::ptr::null_mut(),
            metric: 0,
            dev: std::ptr::null_mut(),
            mtu: 0,
            window: 0,
            irtt: 0,
        };
        ioctl(
            &sock,
            libc::SIOCADDRT,
            &mut route,
            "adding the default route",
        )?;
    }
    if !config.dns.is_empty() {
        let resolv: String = config
            .dns
            .iter()
            .map(|d| format!("nameserver {d}\n"))
            .collect();
        let etc = root.path().join("etc");
        let _ = fs::create_dir_all(&etc);
        // A symlink (systemd-resolved images) would point outside: replace it.
        let _ = fs::remove_file(etc.join("resolv.conf"));
        fs::write(etc.join("resolv.conf"), resolv).map_err(|e| format!("resolv.conf: {e}"))?;
    }
    Ok(iface)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_must_be_unicast_and_well_formed() {
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "53:54:00:ab:cd:ef",
            "00:00:00:00:00:00",
            "5:254:00:ab:cd:ef",
            "52-54-00-ab-cd-ef",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn network_parameters_parse_and_bad_ones_are_reported() {
        let c = from_cmdline("console=ttyS0 microagent.ip=10.0.2.15/24 microagent.gw=10.0.2.2 microagent.dns=10.0.2.3,1.1.1.1")
            .unwrap()
            .unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(
            (c.prefix, c.gateway),
            (24, Some(Ipv4Addr::new(10, 0, 2, 2)))
        );
        assert_eq!(c.dns.len(), 2);
        assert!(from_cmdline("console=ttyS0").is_none());
        assert!(from_cmdline("microagent.ip=10.0.2.300/24")
            .unwrap()
            .is_err());
        assert!(from_cmdline("microagent.ip=10.0.2.15/33").unwrap().is_err());
        assert!(from_cmdline("microagent.ip=10.0.2.15 microagent.gw=x")
            .unwrap()
            .is_err());
        assert_eq!(std::mem::size_of::<IfReqAddr>(), 40);
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }
}
