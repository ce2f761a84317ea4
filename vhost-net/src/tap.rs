//! Tap mode's data path: guest frames are written to a tap device (in the VM's network
//! namespace, see [`crate::netns`]) and the kernel's frames read back for the guest. The
//! kernel of the namespace is the gateway (ARP, ICMP, routing, NAT); the daemon only
//! answers DHCP itself, with the user network's plan, so guests configure alike in
//! both modes.

use crate::dhcp;
use crate::frame::{self, Verdict, GATEWAY, MAX_FRAME};
use crate::link::TO_GUEST_FRAMES;
use crate::stack::Poller;
use smoltcp::wire::EthernetAddress;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddrV4;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// When the guest's queue is full the tap is read again after this (the tap is
/// edge-triggered, so no event says that it still holds frames).
const RETRY: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "tap mode needs root (CAP_NET_ADMIN, and CAP_SYS_ADMIN to enter a network \
         namespace): {what}: {source}; run the daemon as root or use --mode user"
    )]
    NeedsRoot { what: String, source: io::Error },
    #[error("network namespace {0} does not exist: `microagent create --net tap` makes one per workspace, or `ip netns add {0}`")]
    NoNetns(String),
    #[error("{what}: {source}")]
    Open { what: String, source: io::Error },
    #[error("registering the tap with the worker: {0}")]
    Register(io::Error),
}

impl Error {
    /// A stable code for the CLI and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NeedsRoot { .. } => "net.tap_needs_root",
            Self::NoNetns(_) => "net.no_netns",
            Self::Open { .. } | Self::Register(_) => "net.tap_open_failed",
        }
    }
}

fn classify_io(what: String, source: io::Error) -> Error {
    match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => Error::NeedsRoot { what, source },
        _ => Error::Open { what, source },
    }
}

/// Opens tap device `name`, inside network namespace `netns` when given (non-blocking).
/// Done before the daemon drops its capabilities.
pub fn open(name: &str, netns: Option<&str>) -> Result<File, Error> {
    let Some(netns) = netns else {
        return attach(name);
    };
    let path = Path::new("/run/netns").join(netns);
    let ns = File::open(&path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::NoNetns(netns.to_owned()),
        _ => classify_io(format!("opening {}", path.display()), e),
    })?;
    let name = name.to_owned();
    let netns = netns.to_owned();
    // setns changes only the calling thread's namespace: a thread of its own enters it,
    // and the tap stays bound to that namespace after the thread ends.
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns with a namespace fd we own; it affects this thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    let e = io::Error::last_os_error();
                    return Err(classify_io(
                        format!("entering network namespace {netns}"),
                        e,
                    ));
                }
                attach(&name)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::Open {
                    what: "the thread entering the namespace".into(),
                    source: io::Error::other("panicked"),
                })
            })
    })
}

/// TUNSETIFF on /dev/net/tun: attaches to tap `name` (or makes it) in this thread's
/// network namespace. No packet-information prefix and no virtio-net header: frames
/// are plain Ethernet both ways.
fn attach(name: &str) -> Result<File, Error> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| classify_io("opening /dev/net/tun".into(), e))?;
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(Error::Open {
            what: format!("tap name {name:?}"),
            source: io::Error::from(ErrorKind::InvalidInput),
        });
    }
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        let e = io::Error::last_os_error();
        return Err(classify_io(format!("attaching to tap {name}"), e));
    }
    Ok(tun)
}

/// The tap and the frames from it waiting for the guest.
pub struct Tap {
    tap: File,
    pub to_guest: VecDeque<Vec<u8>>,
}

impl Tap {
    /// Registers the tap (edge-triggered) with the worker's epoll instance.
    pub fn new(tap: File, poller: Poller) -> Result<Self, Error> {
        poller
            .add(tap.as_raw_fd(), (libc::EPOLLIN | libc::EPOLLET) as u32)
            .map_err(Error::Register)?;
        Ok(Self {
            tap,
            to_guest: VecDeque::new(),
        })
    }

    /// One frame from the guest: DHCP is answered here, everything else goes to the
    /// kernel. A full tap queue drops the frame, as a full link would.
    pub fn guest_frame(&mut self, frame: &[u8]) {
        if let (
            Some(mac),
            Verdict::Udp {
                guest,
                dest,
                payload,
            },
        ) = frame::classify(frame)
        {
            if dest.port() == dhcp::SERVER_PORT && guest.port() == dhcp::CLIENT_PORT {
                self.dhcp(mac, payload);
                return;
            }
        }
        if let Err(e) = (&self.tap).write(frame) {
            log::debug!("tap: dropped a guest frame: {e}");
        }
    }

    fn dhcp(&mut self, guest_mac: EthernetAddress, request: &[u8]) {
        let Some(reply) = dhcp::reply(request) else {
            return;
        };
        let to = SocketAddrV4::new(std::net::Ipv4Addr::BROADCAST, dhcp::CLIENT_PORT);
        let from = SocketAddrV4::new(GATEWAY, dhcp::SERVER_PORT);
        if let Some(frame) = frame::udp_frame(from, to, guest_mac, &reply) {
            if self.to_guest.len() < TO_GUEST_FRAMES {
                self.to_guest.push_back(frame);
            }
        }
    }

    /// Reads the kernel's frames for the guest; returns when the daemon should look
    /// again without an event (the guest's queue filled before the tap emptied).
    pub fn poll(&mut self) -> Option<Duration> {
        let mut buf = vec![0u8; MAX_FRAME];
        while self.to_guest.len() < TO_GUEST_FRAMES {
            match (&self.tap).read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.to_guest.push_back(buf[..n].to_vec()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("tap: reading: {e}");
                    return None;
                }
            }
        }
        Some(RETRY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;

    const GUEST_MAC: EthernetAddress = dhcp::tests::MAC;

    /// A tap whose kernel side is the other end of a datagram socket pair (frames keep
    /// their boundaries, as on a tap), and that other end.
    fn tap() -> (Tap, UnixDatagram) {
        let (ours, kernel) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        kernel.set_nonblocking(true).unwrap();
        // SAFETY: epoll_create1 takes no pointers; the fd leaks for the test's lifetime.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0);
        let file = File::from(OwnedFd::from(ours));
        let tap = Tap::new(file, Poller { epoll, id: 9 }).unwrap();
        (tap, kernel)
    }

    /// A DHCP DISCOVER from the guest, as a frame.
    fn discover() -> Vec<u8> {
        let payload = dhcp::tests::client(smoltcp::wire::DhcpMessageType::Discover, None);
        let from = SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, dhcp::CLIENT_PORT);
        let to = SocketAddrV4::new(std::net::Ipv4Addr::BROADCAST, dhcp::SERVER_PORT);
        let mut frame = frame::udp_frame(from, to, EthernetAddress::BROADCAST, &payload).unwrap();
        // From the guest: its MAC is the source.
        frame[6..12].copy_from_slice(&GUEST_MAC.0);
        frame
    }

    #[test]
    fn dhcp_is_answered_by_the_daemon_and_other_frames_go_to_the_kernel() {
        let (mut tap, kernel) = tap();
        tap.guest_frame(&discover());
        let mut buf = [0u8; 2048];
        assert!(kernel.recv(&mut buf).is_err(), "DHCP reached the kernel");
        let offer = tap.to_guest.pop_front().expect("an offer for the guest");
        assert_eq!(&offer[..6], &GUEST_MAC.0, "addressed to the guest's MAC");
        match frame::classify(&offer).1 {
            Verdict::Udp { guest, dest, .. } => {
                assert_eq!(guest.port(), dhcp::SERVER_PORT);
                assert_eq!(dest.port(), dhcp::CLIENT_PORT);
            }
            other => panic!("not a UDP frame: {other:?}"),
        }
        // Anything else, even what the user network would drop, is the kernel's.
        let other = [0xabu8; 60];
        tap.guest_frame(&other);
        let n = kernel.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &other[..]);
        assert!(tap.to_guest.is_empty());
    }

    #[test]
    fn kernel_frames_wait_for_the_guest_up_to_the_link_bound_then_poll_comes_back() {
        let (mut tap, kernel) = tap();
        kernel.send(&[1u8; 100]).unwrap();
        assert_eq!(
            tap.poll(),
            None,
            "the tap is empty: the next event says more"
        );
        assert_eq!(tap.to_guest.pop_front().unwrap(), vec![1u8; 100]);
        // A socket pair holds few datagrams: fill the guest's queue in rounds.
        let mut sent = 0;
        while tap.to_guest.len() < TO_GUEST_FRAMES {
            while sent < TO_GUEST_FRAMES && kernel.send(&[2u8; 60]).is_ok() {
                sent += 1;
            }
            // A full queue means "look again": the tap may hold more.
            let again = tap.poll();
            assert_eq!(again.is_some(), tap.to_guest.len() == TO_GUEST_FRAMES);
        }
        kernel.send(&[3u8; 60]).unwrap();
        assert_eq!(tap.poll(), Some(RETRY), "a frame is left in the tap");
        assert_eq!(tap.to_guest.len(), TO_GUEST_FRAMES);
        tap.to_guest.clear();
        assert_eq!(tap.poll(), None);
        assert_eq!(tap.to_guest.pop_front().unwrap(), vec![3u8; 60]);
    }
}
