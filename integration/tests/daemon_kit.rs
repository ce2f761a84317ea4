//! What `microagent-daemon-kit` guarantees every daemon, proven against the real blk and
//! vsock daemons through the host-side frontend harness: frontend messages that would
//! kill or wedge a daemon are refused, and a daemon always exits once its frontend is
//! gone (issue 19, items 7, 8 and 9).

use microagent_integration::daemon::Daemon;
use microagent_integration::frontend::{self, Buf, Frontend, GuestMemory, Setup};
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum Kind {
    Blk,
    Vsock,
}

impl Kind {
    fn queues(self) -> usize {
        match self {
            Kind::Blk => 1,
            Kind::Vsock => 3,
        }
    }
}

struct Started {
    _dir: TempDir,
    socket: PathBuf,
    log: PathBuf,
    daemon: Daemon,
}

impl Started {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon ends by itself with exit code 1 (not a signal) and logs `code`.
    fn assert_refused(&mut self, what: &str, code: &str) {
        let status = self.daemon.wait_exit(WAIT).unwrap();
        assert_eq!(status.code(), Some(1), "{what}: {status}");
        let log = self.log();
        assert!(log.contains(code), "{what}: no {code} in the log:\n{log}");
    }
}

fn start(kind: Kind, extra: &[&str]) -> Started {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("daemon.log");
    let daemon = match kind {
        Kind::Blk => {
            let disk = dir.path().join("disk.img");
            fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
            let mut args = vec!["--disk", disk.to_str().unwrap()];
            args.extend_from_slice(extra);
            Daemon::start_logged("microagent-vhost-blk", &socket, args, &log)
        }
        Kind::Vsock => {
            let uds = dir.path().join("vsock");
            let args = ["--guest-cid", "3", "--uds-path", uds.to_str().unwrap()];
            Daemon::start_logged("microagent-vhost-vsock", &socket, args, &log)
        }
    }
    .unwrap();
    Started {
        _dir: dir,
        socket,
        log,
        daemon,
    }
}

#[test]
fn memory_regions_past_the_end_of_their_file_are_refused_and_the_daemon_exits_1() {
    for kind in [Kind::Blk, Kind::Vsock] {
        // Either would map fine and kill the daemon with SIGBUS at the first ring access.
        for (what, grow, offset) in [
            ("region larger than its file", 1 << 20, 0),
            ("mmap offset past the end", 0, 2 << 20),
        ] {
            let mut d = start(kind, &[]);
            let mem = GuestMemory::new(1 << 20).unwrap();
            let mut regions = mem.regions().unwrap();
            regions[0].memory_size += grow;
            regions[0].mmap_offset += offset;
            let setup = Setup {
                queues: kind.queues(),
                ..Setup::default()
            };
            let negotiated = Frontend::negotiate(&d.socket, &setup).unwrap();
            let result = negotiated.vu.set_mem_table(&regions);
            assert!(
                result.is_err(),
                "{kind:?}, {what}: SET_MEM_TABLE was acknowledged"
            );
            d.assert_refused(&format!("{kind:?}, {what}"), "vhost_user.region_past_eof");
        }
    }
}

#[test]
fn queue_sizes_that_are_not_a_power_of_two_are_refused() {
    for kind in [Kind::Blk, Kind::Vsock] {
        let mut d = start(kind, &[]);
        let mut mem = GuestMemory::new(1 << 20).unwrap();
        let setup = Setup {
            queues: kind.queues(),
            queue_size: 100,
            ..Setup::default()
        };
        assert!(
            Frontend::connect(&d.socket, &mut mem, &setup).is_err(),
            "{kind:?}: SET_VRING_NUM 100 was acknowledged"
        );
        d.assert_refused(&format!("{kind:?}"), "vhost_user.bad_queue_size");
        assert!(
            d.log().contains("SET_VRING_NUM 100 for ring 0"),
            "{}",
            d.log()
        );
    }
}

#[test]
fn a_kick_pipe_holding_half_a_value_stops_only_its_queue_and_the_daemon_still_exits() {
    let mut d = start(Kind::Blk, &["--queues", "2"]);
    let mut mem = GuestMemory::new(1 << 20).unwrap();
    let setup = Setup {
        queues: 2,
        pipe_kick: Some(0),
        ..Setup::default()
    };
    let mut fe = Frontend::connect(&d.socket, &mut mem, &setup).unwrap();
    // Three of the eight bytes a kick carries: a blocking read would wait forever, as
    // the frontend keeps the pipe open (a closed one would end the read with EOF).
    fe.queues[0].kick_raw(&[1, 2, 3]).unwrap();
    let held_open = fe.queues[0].kick_pipe().unwrap();
    thread::sleep(Duration::from_millis(200));

    // The other queue is served by its own worker and still completes requests.
    let mut header = VIRTIO_BLK_T_FLUSH.to_le_bytes().to_vec();
    header.resize(16, 0);
    let header_at = mem.alloc(16, 8).unwrap();
    let status_at = mem.alloc(1, 1).unwrap();
    mem.write(header_at, &header);
    mem.write(status_at, &[0xff]);
    let queue = &mut fe.queues[1];
    queue
        .submit(
            &mem,
            &[Buf::readable(header_at, 16), Buf::writable(status_at, 1)],
        )
        .unwrap();
    queue.wait_used(&mem, 1, WAIT).unwrap();
    assert_eq!(mem.read(status_at, 1), [VIRTIO_BLK_S_OK as u8]);

    drop(fe);
    let status = d.daemon.wait_exit(WAIT).unwrap();
    assert!(status.success(), "{status}\n{}", d.log());
    drop(held_open);
}

#[test]
fn check_device_state_with_the_load_pipe_held_open_fails_in_bounded_time_and_the_daemon_exits() {
    let mut d = start(Kind::Blk, &[]);
    let mut mem = GuestMemory::new(1 << 20).unwrap();
    let mut fe = Frontend::connect(&d.socket, &mut mem, &Setup::default()).unwrap();
    fe.stop().unwrap();
    let (read_end, write_end) = frontend::pipe().unwrap();
    fe.vu()
        .set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(read_end),
        )
        .unwrap();
    // Some state, and the pipe stays open: the daemon never sees EOF.
    let mut writer = File::from(write_end);
    writer.write_all(b"MADEVST\0").unwrap();

    let started = Instant::now();
    let (done, outcome) = mpsc::channel();
    thread::spawn(move || {
        let result = fe.vu().check_device_state();
        let _ = done.send(result.is_err());
        // The frontend gives up and disconnects.
        drop(fe);
    });
    let refused = outcome
        .recv_timeout(Duration::from_secs(30))
        .expect("CHECK_DEVICE_STATE is still blocked after 30 s");
    assert!(
        refused,
        "CHECK_DEVICE_STATE succeeded on a transfer that never ended"
    );
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());

    // The refused check answered, the request handler noticed the disconnect.
    let status = d.daemon.wait_exit(WAIT).unwrap();
    assert!(status.success(), "{status}");
    let log = d.log();
    assert!(
        log.contains("state transfer not finished within 5s"),
        "{log}"
    );
    drop(writer);
}

#[test]
fn a_message_announcing_a_huge_payload_is_refused_without_reading_it() {
    let mut d = start(Kind::Vsock, &[]);
    let mut raw = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    // GET_FEATURES (1), version 1, a 1 GiB payload that never comes.
    let mut header = 1u32.to_le_bytes().to_vec();
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&(1u32 << 30).to_le_bytes());
    raw.write_all(&header).unwrap();
    d.assert_refused("1 GiB payload", "vhost_user.message_too_large");
}
