//! vhost-vsock: TX chains from a guest-controlled split queue, read by the backend's own
//! `read_packet` and fed to a real `Muxer` (with its host listener and an epoll set),
//! then the muxer's socket events and RX path, as the backend's worker drives them.
//! One host service listens on port 1024 (`<uds>_1024`), so REQUESTs to it establish
//! connections and RW/SHUTDOWN/CREDIT packets reach a live connection; its peer ends are
//! accepted and closed after TX, so the socket-event path sees hangups.
//!
//! Input: byte 0 sets the RX buffer capacity, byte 1 the socket events delivered to
//! each connection; the rest is guest memory from address 0 (descriptor table at 0x0,
//! available ring at 0x100, used ring at 0x200, 16 descriptors).

#![no_main]

use libfuzzer_sys::fuzz_target;
use microagent_fuzz::{guest_memory, queue};
use microagent_vhost_vsock::backend::read_packet;
use microagent_vhost_vsock::muxer::{Muxer, Payload, Poller, Rx, LISTENER_ID};
use microagent_vhost_vsock::packet::HEADER_LEN;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;
use virtio_queue::{QueueOwnedT, QueueT};

const GUEST_CID: u64 = 3;
const SERVICE_PORT: u32 = 1024;

struct Host {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    epoll: i32,
    service: UnixListener,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = tempfile::tempdir().expect("fuzz: a temporary directory");
        let uds = dir.path().join("vsock.sock");
        let service = UnixListener::bind(format!("{}_{SERVICE_PORT}", uds.display()))
            .expect("fuzz: the host service socket");
        service
            .set_nonblocking(true)
            .expect("fuzz: a non-blocking service socket");
        // SAFETY: epoll_create1 takes no pointers; the descriptor lives for the process.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0, "fuzz: epoll_create1");
        Host {
            _dir: dir,
            uds,
            epoll,
            service,
        }
    })
}

/// Accepts and closes every pending connection to the host service.
fn drain_service(host: &Host) {
    while host.service.accept().is_ok() {}
}

fuzz_target!(|data: &[u8]| {
    let [capacity, events, memory @ ..] = data else {
        return;
    };
    let host = host();
    let Some(mem) = guest_memory(memory) else {
        return;
    };
    let Some(mut q) = queue(&mem) else {
        return;
    };
    let Ok(mut muxer) = Muxer::new(GUEST_CID, &host.uds, Poller(host.epoll)) else {
        return;
    };
    let chains: Vec<_> = match q.iter(&mem) {
        Ok(iter) => iter.collect(),
        Err(_) => return,
    };
    for chain in chains {
        let head = chain.head_index();
        match read_packet(&mem, chain) {
            Ok((packet, mut payload)) => {
                assert!(Payload::len(&payload) == packet.len as usize);
                muxer.guest_packet(packet, &mut payload);
            }
            Err((Some(packet), _)) => muxer.malformed(&packet),
            Err((None, _)) => {}
        }
        let _ = q.add_used(&mem, head, 0);
    }
    drain_service(host);
    // Socket events on the connections (ids are handed out from 16) and the listener.
    let events = u32::from(*events)
        & (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32;
    for id in 16..16 + muxer.connections() as u16 + 1 {
        muxer.fd_event(id, events);
    }
    muxer.fd_event(LISTENER_ID, libc::EPOLLIN as u32);
    // RX: hand out buffers until the muxer has nothing more; every packet must fit.
    let capacity = usize::from(*capacity) * 64;
    for _ in 0..10_000 {
        match muxer.next_rx(capacity) {
            None => break,
            Some(Rx::TooSmall) => assert!(capacity < HEADER_LEN),
            Some(Rx::Packet(packet, payload)) => {
                assert_eq!(packet.len as usize, payload.len());
                assert!(
                    HEADER_LEN + payload.len() <= capacity,
                    "RX packet overflows its buffer"
                );
            }
        }
        if capacity < HEADER_LEN {
            break;
        }
    }
});
