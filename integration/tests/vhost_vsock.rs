//! `microagent-vhost-vsock` driven by the host-side frontend harness playing the guest
//! driver: hybrid CONNECT handshakes both ways, credit flow control with slow readers,
//! malformed packets, many connections, and save → load with a transport reset.

use microagent_integration::daemon::Daemon;
use microagent_integration::frontend::{Buf, Setup};
use microagent_integration::vsock_guest::{pkt, Guest, CID, EVENT, TX};
use microagent_vhost_vsock::packet::*;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use vm_memory::{ByteValued, GuestAddress};

const WAIT: Duration = Duration::from_secs(10);

struct Rig {
    dir: TempDir,
    uds: PathBuf,
    daemon: Daemon,
    guest: Guest,
}

fn rig() -> Rig {
    rig_with(&[])
}

/// A rig whose daemon gets `extra` flags too.
fn rig_with(extra: &[&str]) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock");
    let socket = dir.path().join("vhost.sock");
    let daemon = Daemon::start(
        "microagent-vhost-vsock",
        &socket,
        ["--guest-cid", "3", "--uds-path", uds.to_str().unwrap()]
            .into_iter()
            .chain(extra.iter().copied()),
    )
    .unwrap();
    let guest = Guest::new(&socket);
    Rig {
        dir,
        uds,
        daemon,
        guest,
    }
}

/// A host client's CONNECT answered by the guest; returns the client and host port.
fn host_connect(
    rig: &mut Rig,
    guest_port: u32,
    guest_buf_alloc: u32,
) -> (BufReader<UnixStream>, u32) {
    let mut client = UnixStream::connect(&rig.uds).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    writeln!(client, "CONNECT {guest_port}").unwrap();
    let (req, _) = rig.guest.recv_op();
    assert_eq!(req.op, OP_REQUEST, "{req:?}");
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, CID, guest_port)
    );
    rig.guest.send(
        pkt(guest_port, req.src_port, OP_RESPONSE, 0, guest_buf_alloc, 0),
        &[],
    );
    let mut reader = BufReader::new(client);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port));
    (reader, req.src_port)
}

/// A guest REQUEST from `guest_port` to the host service on `host_port`, answered with
/// RESPONSE; returns that RESPONSE (the daemon's credit) and the accepted host stream.
fn guest_connect(rig: &mut Rig, guest_port: u32, host_port: u32) -> (Packet, UnixStream) {
    let listener = UnixListener::bind(format!("{}_{host_port}", rig.uds.display())).unwrap();
    rig.guest
        .send(pkt(guest_port, host_port, OP_REQUEST, 0, 1 << 20, 0), &[]);
    let (resp, _) = rig.guest.recv_op();
    assert_eq!(resp.op, OP_RESPONSE, "{resp:?}");
    let (host, _) = listener.accept().unwrap();
    (resp, host)
}

#[test]
fn host_connect_is_accepted_by_the_guest_and_data_flows_both_ways() {
    let mut rig = rig();
    let (mut client, host_port) = host_connect(&mut rig, 1234, 1 << 20);
    client.get_mut().write_all(b"ping").unwrap();
    let (p, data) = rig.guest.recv_op();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RW, host_port, 1234));
    assert_eq!(data, b"ping");
    rig.guest
        .send(pkt(1234, host_port, OP_RW, 4, 1 << 20, 4), b"pong");
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");

    // Host closes: the guest is told the host sends no more; the guest closes too, and
    // the daemon finishes the connection with RST.
    drop(client);
    expect_host_shutdown(&mut rig);
    guest_closes(&mut rig, host_port, 4);
}

/// The guest is told that the host sends no more (its client hung up).
fn expect_host_shutdown(rig: &mut Rig) {
    let (p, _) = rig.guest.recv_op();
    assert_eq!(
        (p.op, p.flags & SHUTDOWN_SEND),
        (OP_SHUTDOWN, SHUTDOWN_SEND),
        "{p:?}"
    );
}

/// The guest (port 1234) closes its side too, having taken `fwd_cnt` bytes: the daemon
/// ends the connection with RST.
fn guest_closes(rig: &mut Rig, host_port: u32, fwd_cnt: u32) {
    let mut shutdown = pkt(1234, host_port, OP_SHUTDOWN, 0, 1 << 20, fwd_cnt);
    shutdown.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    rig.guest.send(shutdown, &[]);
    let (p, _) = rig.guest.recv_op();
    assert_eq!(p.op, OP_RST, "{p:?}");
}

#[test]
fn guest_connect_reaches_the_host_listener_on_uds_path_port() {
    let mut rig = rig();
    let listener = UnixListener::bind(format!("{}_5000", rig.uds.display())).unwrap();
    rig.guest
        .send(pkt(777, 5000, OP_REQUEST, 0, 1 << 20, 0), &[]);
    let (p, _) = rig.guest.recv_op();
    assert_eq!(
        (p.op, p.src_port, p.dst_port),
        (OP_RESPONSE, 5000, 777),
        "{p:?}"
    );
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(WAIT)).unwrap();
    rig.guest
        .send(pkt(777, 5000, OP_RW, 5, 1 << 20, 0), b"hello");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    host.write_all(b"world").unwrap();
    let (p, data) = rig.guest.recv_op();
    assert_eq!((p.op, data.as_slice()), (OP_RW, &b"world"[..]));
}

#[test]
fn unknown_ports_refusing_guests_and_malformed_packets_reset_one_connection() {
    let mut rig = rig();
    // Guest connects to a host port nobody listens on.
    rig.guest
        .send(pkt(900, 4444, OP_REQUEST, 0, 1 << 20, 0), &[]);
    assert_eq!(rig.guest.recv_op().0.op, OP_RST);

    // Host connects to a guest port the guest refuses: the client sees EOF, no "OK".
    let mut client = UnixStream::connect(&rig.uds).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    writeln!(client, "CONNECT 81").unwrap();
    let (req, _) = rig.guest.recv_op();
    rig.guest.send(pkt(81, req.src_port, OP_RST, 0, 0, 0), &[]);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "refused client got {rest:?}");

    // A client that gives up before the guest answers: the guest's request is reset.
    let mut quitter = UnixStream::connect(&rig.uds).unwrap();
    writeln!(quitter, "CONNECT 82").unwrap();
    let (req, _) = rig.guest.recv_op();
    assert_eq!(req.op, OP_REQUEST);
    drop(quitter);
    let (p, _) = rig.guest.recv_op();
    assert_eq!(
        (p.op, p.src_port, p.dst_port),
        (OP_RST, req.src_port, 82),
        "{p:?}"
    );

    // A client that sends garbage instead of CONNECT is dropped.
    let mut junk = UnixStream::connect(&rig.uds).unwrap();
    junk.set_read_timeout(Some(WAIT)).unwrap();
    junk.write_all(b"HELLO THERE\n").unwrap();
    assert_eq!(junk.read(&mut [0u8; 8]).unwrap(), 0);

    // Malformed packets on a live connection: each ends that connection with RST.
    let malformed: [(&str, Packet, Vec<u8>); 4] = [
        (
            "wrong source CID",
            Packet {
                src_cid: 9,
                ..pkt(1, 0, OP_RW, 0, 1 << 20, 0)
            },
            vec![],
        ),
        ("unknown op", pkt(1, 0, 42, 0, 1 << 20, 0), vec![]),
        (
            "length beyond payload",
            pkt(1, 0, OP_RW, 100, 1 << 20, 0),
            vec![1, 2, 3],
        ),
        (
            "datagram type",
            Packet {
                type_: 2,
                ..pkt(1, 0, OP_RW, 0, 1 << 20, 0)
            },
            vec![],
        ),
    ];
    for (i, (name, mut bad, payload)) in malformed.into_iter().enumerate() {
        let guest_port = 2000 + i as u32;
        let (mut client, host_port) = host_connect(&mut rig, guest_port, 1 << 20);
        bad.src_port = guest_port;
        bad.dst_port = host_port;
        rig.guest.send(bad, &payload);
        let (p, _) = rig.guest.recv_op();
        assert_eq!(p.op, OP_RST, "{name}: {p:?}");
        assert_eq!(
            (p.src_port, p.dst_port),
            (host_port, guest_port),
            "{name}: RST for another connection"
        );
        assert!(
            closed_within(client.get_mut(), WAIT),
            "{name}: host side left open"
        );
    }
    // The daemon survived all of it and still connects.
    assert!(rig.daemon.try_status().unwrap().is_none());
    let (mut client, host_port) = host_connect(&mut rig, 3000, 1 << 20);
    client.get_mut().write_all(b"x").unwrap();
    assert_eq!(rig.guest.recv_op().0.src_port, host_port);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

const BIG: usize = 64 << 20;

fn pattern_chunk(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 7 + j * 13) as u8).collect()
}

#[test]
fn host_to_guest_64_mib_respects_the_guests_credit() {
    let mut rig = rig();
    let guest_buf = 128 << 10;
    let (client, host_port) = host_connect(&mut rig, 6000, guest_buf);
    let pid = rig.daemon.pid().unwrap();
    let writer = std::thread::spawn(move || {
        let mut stream = client.into_inner();
        let mut hash = Sha256::new();
        for i in 0..BIG / (1 << 20) {
            let chunk = pattern_chunk(i, 1 << 20);
            hash.update(&chunk);
            stream.write_all(&chunk).unwrap();
        }
        hash.finalize()
    });
    let (mut received, mut fwd_cnt, mut hash) = (0usize, 0u32, Sha256::new());
    let mut max_rss = 0;
    let start = Instant::now();
    while received < BIG {
        let (p, data) = rig.guest.recv();
        if p.op == OP_CREDIT_UPDATE {
            continue;
        }
        assert_eq!(p.op, OP_RW, "{p:?}");
        received += data.len();
        hash.update(&data);
        let in_flight = (received as u32).wrapping_sub(fwd_cnt);
        assert!(
            in_flight <= guest_buf,
            "device sent {in_flight} bytes beyond credit"
        );
        // A slow reader: consume (return credit) only every 256 KiB, pausing sometimes.
        if in_flight >= guest_buf / 2 {
            if received % (8 << 20) < (256 << 10) {
                std::thread::sleep(Duration::from_millis(50));
                max_rss = max_rss.max(rss_kib(pid));
            }
            fwd_cnt = received as u32;
            rig.guest.send(
                pkt(6000, host_port, OP_CREDIT_UPDATE, 0, guest_buf, fwd_cnt),
                &[],
            );
        }
        assert!(start.elapsed() < Duration::from_secs(120), "too slow");
    }
    assert_eq!(hash.finalize(), writer.join().unwrap(), "bytes differ");
    assert!(max_rss < 32 << 10, "daemon RSS grew to {max_rss} KiB");
}

#[test]
fn guest_to_host_64_mib_with_a_pausing_reader_stays_bounded() {
    let mut rig = rig();
    let (resp, mut host) = guest_connect(&mut rig, 700, 7000);
    let reader = std::thread::spawn(move || {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        while total < BIG {
            let n = host.read(&mut buf).unwrap();
            assert!(n > 0, "EOF after {total} bytes");
            hash.update(&buf[..n]);
            total += n;
            if total % (16 << 20) < n {
                std::thread::sleep(Duration::from_millis(300)); // the reader pauses
            }
        }
        hash.finalize()
    });
    let pid = rig.daemon.pid().unwrap();
    let (mut peer_buf, mut peer_fwd) = (resp.buf_alloc, resp.fwd_cnt);
    let (mut sent, mut hash, mut max_rss) = (0usize, Sha256::new(), 0);
    let chunk_len = 32 << 10;
    while sent < BIG {
        let credit = peer_buf.wrapping_sub((sent as u32).wrapping_sub(peer_fwd)) as usize;
        if credit < chunk_len {
            // Out of credit: ask, then wait for the daemon to forward and tell us.
            rig.guest
                .send(pkt(700, 7000, OP_CREDIT_REQUEST, 0, 1 << 20, 0), &[]);
            // Like a driver, take every packet waiting, and the newest credit with them.
            let mut next = Some(rig.guest.recv());
            while let Some((p, _)) = next {
                assert_eq!(p.op, OP_CREDIT_UPDATE, "{p:?}");
                peer_buf = p.buf_alloc;
                peer_fwd = p.fwd_cnt;
                next = rig.guest.try_recv(Duration::ZERO);
            }
            max_rss = max_rss.max(rss_kib(pid));
            if (sent as u32).wrapping_sub(peer_fwd) as usize + chunk_len > peer_buf as usize {
                std::thread::sleep(Duration::from_millis(5));
            }
            continue;
        }
        let chunk = pattern_chunk(sent / chunk_len, chunk_len);
        hash.update(&chunk);
        rig.guest
            .send(pkt(700, 7000, OP_RW, chunk_len as u32, 1 << 20, 0), &chunk);
        sent += chunk_len;
    }
    assert_eq!(hash.finalize(), reader.join().unwrap(), "bytes differ");
    assert!(max_rss < 32 << 10, "daemon RSS grew to {max_rss} KiB");
}

#[test]
fn thirty_two_connections_at_once_all_complete() {
    let mut rig = rig();
    let mut clients = Vec::new();
    for i in 0..32u32 {
        let mut client = UnixStream::connect(&rig.uds).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        writeln!(client, "CONNECT {}", 100 + i).unwrap();
        clients.push(client);
    }
    let mut host_ports = HashMap::new();
    while host_ports.len() < 32 {
        let (req, _) = rig.guest.recv_op();
        assert_eq!(req.op, OP_REQUEST);
        host_ports.insert(req.dst_port, req.src_port);
        rig.guest.send(
            pkt(req.dst_port, req.src_port, OP_RESPONSE, 0, 1 << 20, 0),
            &[],
        );
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let mut line = String::new();
        BufReader::new(&mut *client).read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {}\n", host_ports[&(100 + i as u32)]));
        client.write_all(format!("msg-{i}").as_bytes()).unwrap();
    }
    let mut seen = HashMap::new();
    while seen.len() < 32 {
        let (p, data) = rig.guest.recv_op();
        assert_eq!(p.op, OP_RW);
        seen.insert(p.dst_port, String::from_utf8(data).unwrap());
    }
    for i in 0..32u32 {
        assert_eq!(seen[&(100 + i)], format!("msg-{i}"));
    }
}

#[test]
fn after_save_and_load_the_guest_gets_a_transport_reset_and_new_connections_work() {
    let mut rig = rig();
    let (_old_client, _) = host_connect(&mut rig, 1234, 1 << 20);
    rig.guest.fe.stop().unwrap();
    let state = rig.guest.fe.save_state().unwrap();
    let Rig {
        dir,
        uds,
        mut daemon,
        guest,
    } = rig;
    drop(guest);
    assert!(daemon.wait_exit(WAIT).unwrap().success());

    let socket = dir.path().join("restored.sock");
    let restored = Daemon::start(
        "microagent-vhost-vsock",
        &socket,
        ["--guest-cid", "3", "--uds-path", uds.to_str().unwrap()],
    )
    .unwrap();
    let mut guest = Guest::connect(
        &socket,
        Setup {
            queues: 3,
            load_state: Some(state),
            ..Setup::default()
        },
    );
    expect_transport_reset(&mut guest);

    let mut rig = Rig {
        dir,
        uds,
        daemon: restored,
        guest,
    };
    let (mut client, host_port) = host_connect(&mut rig, 1234, 1 << 20);
    client.get_mut().write_all(b"after").unwrap();
    let (p, data) = rig.guest.recv_op();
    assert_eq!((p.src_port, data.as_slice()), (host_port, &b"after"[..]));
}

/// A fork's daemon has its own `--guest-cid`: it loads the source's state, shows the
/// new CID in the configuration space, tells the guest to read it again (transport
/// reset) and addresses host connections to it.
#[test]
fn state_for_another_guest_cid_is_loaded_under_the_new_cid() {
    let mut rig = rig();
    rig.guest.fe.stop().unwrap();
    let state = rig.guest.fe.save_state().unwrap();
    let socket = rig.dir.path().join("fork.sock");
    let uds = rig.dir.path().join("fork.vsock");
    let _fork = Daemon::start(
        "microagent-vhost-vsock",
        &socket,
        ["--guest-cid", "42", "--uds-path", uds.to_str().unwrap()],
    )
    .unwrap();
    let mut guest = Guest::connect(
        &socket,
        Setup {
            queues: 3,
            load_state: Some(state),
            ..Setup::default()
        },
    );
    assert_eq!(guest.fe.config(8).unwrap(), 42u64.to_le_bytes());
    expect_transport_reset(&mut guest);
    let mut client = UnixStream::connect(&uds).unwrap();
    writeln!(client, "CONNECT 1234").unwrap();
    let (req, _) = guest.recv_op();
    assert_eq!((req.op, req.dst_cid), (OP_REQUEST, 42), "{req:?}");
}

/// The event queue gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (4 bytes) as soon as it has
/// a buffer.
fn expect_transport_reset(guest: &mut Guest) {
    let event_buf = guest.mem.alloc(8, 8).unwrap();
    guest.mem.write(event_buf, &[0xff; 8]);
    let q = &mut guest.fe.queues[EVENT];
    q.submit(&guest.mem, &[Buf::writable(event_buf, 8)])
        .unwrap();
    let used = q.wait_used(&guest.mem, 1, WAIT).unwrap();
    assert_eq!(used[0].1, 4);
    assert_eq!(
        guest.mem.read(event_buf, 4),
        EVENT_TRANSPORT_RESET.to_le_bytes()
    );
}

/// Reads until EOF or `limit`; true on EOF (the daemon closed the client).
fn closed_within(client: &mut UnixStream, limit: Duration) -> bool {
    client.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match client.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn connect_lines_with_a_sign_port_zero_or_port_any_are_refused() {
    let mut rig = rig();
    for line in [
        "CONNECT +5",
        "CONNECT 0",
        "CONNECT 4294967295",
        "CONNECT 05",
        "CONNECT 5 ",
    ] {
        let mut client = UnixStream::connect(&rig.uds).unwrap();
        writeln!(client, "{line}").unwrap();
        assert!(
            closed_within(&mut client, WAIT),
            "{line:?}: client left open"
        );
        let sent = rig.guest.try_recv(Duration::from_millis(100));
        assert!(sent.is_none(), "{line:?} reached the guest: {sent:?}");
    }
    let mut client = UnixStream::connect(&rig.uds).unwrap();
    writeln!(client, "CONNECT 4294967294").unwrap();
    let (req, _) = rig.guest.recv_op();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, u32::MAX - 1));
}

#[test]
fn host_clients_that_never_send_connect_or_get_no_answer_time_out() {
    let mut rig = rig();
    let started = Instant::now();
    let mut silent = UnixStream::connect(&rig.uds).unwrap();
    silent.write_all(b"CONN").unwrap();
    let mut unanswered = UnixStream::connect(&rig.uds).unwrap();
    writeln!(unanswered, "CONNECT 5000").unwrap();
    let (req, _) = rig.guest.recv_op();
    assert_eq!(req.op, OP_REQUEST);

    let limit = Duration::from_secs(5) + WAIT;
    assert!(
        closed_within(&mut silent, limit),
        "silent client still open"
    );
    assert!(
        closed_within(&mut unanswered, limit),
        "unanswered client still open"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "closed before the timeout: {:?}",
        started.elapsed()
    );
    // The guest's half-open side of the unanswered one is reset.
    let (rst, _) = rig.guest.recv_op();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (OP_RST, req.src_port, 5000)
    );
}

#[test]
fn host_clients_beyond_the_pending_cap_are_closed_at_once() {
    let rig = rig();
    let waiting: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&rig.uds).unwrap())
        .collect();
    // Let the daemon accept all of them first.
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = UnixStream::connect(&rig.uds).unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_secs(2)),
        "the 65th waiting client was kept"
    );
    let mut first = waiting[0].try_clone().unwrap();
    assert!(
        !closed_within(&mut first, Duration::from_millis(200)),
        "a client within the cap was closed"
    );
}

/// CPU time (user + system) the process used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(") ").unwrap().1;
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// CPU ticks (of 100 per second) the process uses in the second after `settle`.
fn ticks_in_a_second_after(pid: u32, settle: Duration) -> u64 {
    std::thread::sleep(settle);
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    cpu_ticks(pid) - before
}

#[test]
fn running_out_of_descriptors_does_not_spin_and_accepting_resumes() {
    use microagent_integration::{daemon, process::ChildGuard};
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock");
    let socket = dir.path().join("vhost.sock");
    let binary = daemon::binary("microagent-vhost-vsock").unwrap();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(r#"ulimit -n 64 && exec "$0" "$@""#)
        .arg(binary)
        .args(["--socket-path", socket.to_str().unwrap()])
        .args(["--guest-cid", "3", "--uds-path", uds.to_str().unwrap()]);
    let mut process = ChildGuard::spawn(&mut cmd).unwrap();
    process.wait_for_path(&socket, WAIT).unwrap();
    let pid = process.id().unwrap();
    let mut guest = Guest::new(&socket);
    let used = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(used < 54, "{used} descriptors in use before any client");

    // More clients than descriptors left: the rest wait in the listen backlog.
    let clients: Vec<UnixStream> = (0..(64 - used + 10))
        .map(|_| UnixStream::connect(&uds).unwrap())
        .collect();
    let spent = ticks_in_a_second_after(pid, Duration::from_millis(300));
    assert!(
        spent < 20,
        "daemon used {spent}/100 ticks of CPU in one second"
    );

    drop(clients);
    let mut client = UnixStream::connect(&uds).unwrap();
    writeln!(client, "CONNECT 77").unwrap();
    let (req, _) = guest.recv_op();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 77));
    assert!(process.try_status().unwrap().is_none());
}

/// A host client that hangs up while the guest keeps its side open (a command still
/// running under `exec` when the user presses Ctrl-C) leaves its socket reporting a
/// hang-up to epoll whatever the interest: the daemon must not spin on it (it did, at
/// 100% of a CPU until the guest closed), and the connection still ends when the guest
/// closes later.
#[test]
fn a_host_client_that_hangs_up_before_the_guest_closes_costs_no_cpu() {
    let mut rig = rig_with(&["--busy-poll-us", "0"]);
    let (client, host_port) = host_connect(&mut rig, 1234, 1 << 20);
    drop(client);
    expect_host_shutdown(&mut rig);

    let spent = ticks_in_a_second_after(rig.daemon.pid().unwrap(), Duration::from_millis(100));
    assert!(
        spent < 5,
        "the daemon used {spent}/100 ticks of CPU in one second"
    );

    guest_closes(&mut rig, host_port, 0);
}

/// The daemon returns credit before the guest runs out, unasked (a Linux guest does not
/// send CREDIT_REQUEST while it waits), and not after every packet: a guest sending 8 MiB
/// in 64 KiB packets, only within the credit it was told and never asking, finishes, and
/// receives at most one update per 128 KiB forwarded (before, one per 64 KiB: 128 for
/// 8 MiB, each an RX buffer and a notification).
#[test]
fn guest_to_host_credit_updates_come_unasked_and_at_most_one_per_128_kib() {
    const TOTAL: usize = 8 << 20;
    const CHUNK: usize = 64 << 10;
    let mut rig = rig();
    let (resp, mut host) = guest_connect(&mut rig, 710, 7100);
    let reader = std::thread::spawn(move || {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        while total < TOTAL {
            let n = host.read(&mut buf).unwrap();
            assert!(n > 0, "EOF after {total} bytes");
            hash.update(&buf[..n]);
            total += n;
        }
        (hash.finalize(), host) // kept open: its EOF would add a SHUTDOWN
    });
    let (mut peer_buf, mut peer_fwd) = (resp.buf_alloc, resp.fwd_cnt);
    let (mut sent, mut hash, mut updates) = (0usize, Sha256::new(), 0usize);
    let mut take = |p: Packet, buf: &mut u32, fwd: &mut u32| {
        assert_eq!(p.op, OP_CREDIT_UPDATE, "{p:?}");
        *buf = p.buf_alloc;
        *fwd = p.fwd_cnt;
        updates += 1;
    };
    while sent < TOTAL {
        let credit = peer_buf.wrapping_sub((sent as u32).wrapping_sub(peer_fwd)) as usize;
        if credit < CHUNK {
            // Out of credit: wait (10 s at most) for the update the daemon owes us.
            let (p, _) = rig.guest.recv();
            take(p, &mut peer_buf, &mut peer_fwd);
            continue;
        }
        let chunk = pattern_chunk(sent / CHUNK, CHUNK);
        hash.update(&chunk);
        rig.guest
            .send(pkt(710, 7100, OP_RW, CHUNK as u32, 1 << 20, 0), &chunk);
        sent += CHUNK;
    }
    let (read, _host) = reader.join().unwrap();
    assert_eq!(hash.finalize(), read, "bytes differ");
    while let Some((p, _)) = rig.guest.try_recv(Duration::from_millis(200)) {
        take(p, &mut peer_buf, &mut peer_fwd);
    }
    let left = peer_buf as usize - (TOTAL - peer_fwd as usize);
    assert!(
        left >= CHUNK,
        "the guest is left with {left} bytes of credit"
    );
    assert!(updates <= TOTAL / (128 << 10), "{updates} credit updates");
    assert_eq!(rig.guest.unwritten_rx, 0);
}

/// A packet whose header and payload are split over several descriptors reaches the host
/// whole and in order, both when the host socket takes it at once (written from guest
/// memory) and when it is full (queued in the daemon until the reader drains it: the
/// reader starts only once the guest has run out of credit, 256 KiB, more than a unix
/// socket buffers by default).
#[test]
fn packets_split_over_many_descriptors_reach_the_host_whole_even_when_its_socket_is_full() {
    const CHUNK: usize = 60_000;
    const PACKETS: usize = 16;
    let mut rig = rig();
    let (resp, host) = guest_connect(&mut rig, 720, 7200);
    let read_all = |mut host: UnixStream| {
        std::thread::spawn(move || {
            let mut got = vec![0u8; PACKETS * CHUNK];
            host.read_exact(&mut got).unwrap();
            got
        })
    };
    let (mut host, mut reader) = (Some(host), None);
    let hdr = rig.guest.mem.alloc(HEADER_LEN as u64, 8).unwrap();
    let data = rig.guest.mem.alloc(CHUNK as u64, 8).unwrap();
    let at = |base: GuestAddress, off: u64| GuestAddress(base.0 + off);
    let (mut expected, mut fwd) = (Vec::new(), 0usize);
    for i in 0..PACKETS {
        while resp.buf_alloc as usize - (expected.len() - fwd) < CHUNK {
            if let Some((p, _)) = rig.guest.try_recv(Duration::ZERO) {
                if p.op == OP_CREDIT_UPDATE {
                    fwd = p.fwd_cnt as usize;
                }
            } else if let Some(host) = host.take() {
                reader = Some(read_all(host)); // out of credit: now let the host read
            } else {
                let (p, _) = rig.guest.recv();
                if p.op == OP_CREDIT_UPDATE {
                    fwd = p.fwd_cnt as usize;
                }
            }
        }
        let chunk = pattern_chunk(i, CHUNK);
        let header = Header::from(pkt(720, 7200, OP_RW, CHUNK as u32, 1 << 20, 0));
        rig.guest.mem.write(hdr, header.as_slice());
        rig.guest.mem.write(data, &chunk);
        let bufs = [
            Buf::readable(hdr, 20),
            Buf::readable(at(hdr, 20), HEADER_LEN as u32 - 20),
            Buf::readable(data, 1),
            Buf::readable(at(data, 1), 4095),
            Buf::readable(at(data, 4096), (CHUNK - 4096) as u32),
        ];
        let q = &mut rig.guest.fe.queues[TX];
        q.submit(&rig.guest.mem, &bufs).unwrap();
        q.wait_used(&rig.guest.mem, 1, WAIT).unwrap();
        expected.extend_from_slice(&chunk);
    }
    let reader = reader.or_else(|| host.take().map(read_all)).unwrap();
    let got = reader.join().unwrap();
    assert!(
        got == expected,
        "the host read other bytes than the guest sent"
    );
    assert_eq!(rig.guest.unwritten_rx, 0);
}

/// A CONNECT line that arrives in pieces (the daemon reads what is there as soon as it
/// accepts the client) is put together and answered.
#[test]
fn a_connect_line_sent_in_pieces_is_accepted() {
    let mut rig = rig();
    let mut client = UnixStream::connect(&rig.uds).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    for piece in ["CON", "NECT 5", "2", "\n"] {
        client.write_all(piece.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let (req, _) = rig.guest.recv_op();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52), "{req:?}");
    rig.guest
        .send(pkt(52, req.src_port, OP_RESPONSE, 0, 1 << 16, 0), &[]);
    let mut line = String::new();
    BufReader::new(client).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port));
}

/// How long the guest takes to answer in `sleeps_during_ping_pong`: well within a
/// 5 ms polling window.
const GUEST_THINKS: Duration = Duration::from_micros(200);

/// Times the daemon's threads went to sleep of their own accord, all threads together.
fn voluntary_switches(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .unwrap()
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

/// `exchanges` round trips of a host client and the guest on one connection (host
/// writes, the guest answers after `GUEST_THINKS`, the host reads the answer); returns
/// how often the daemon's threads slept meanwhile. The guest's pause leaves the daemon
/// nothing to do for a while in every exchange, even on a loaded machine where its
/// worker runs late: without polling it sleeps then.
fn sleeps_during_ping_pong(rig: &mut Rig, exchanges: u32) -> u64 {
    let (mut client, host_port) = host_connect(rig, 1234, 1 << 20);
    let pid = rig.daemon.pid().unwrap();
    let before = voluntary_switches(pid);
    for i in 0..exchanges {
        client.get_mut().write_all(b"ping").unwrap();
        let (p, data) = rig.guest.recv_op();
        assert_eq!((p.op, data.as_slice()), (OP_RW, &b"ping"[..]));
        let fwd = 4 * (i + 1);
        std::thread::sleep(GUEST_THINKS);
        rig.guest
            .send(pkt(1234, host_port, OP_RW, 4, 1 << 20, fwd), b"pong");
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }
    let slept = voluntary_switches(pid) - before;
    rig.guest.send(pkt(1234, host_port, OP_RST, 0, 0, 0), &[]);
    slept
}

/// Busy polling: while the guest answers within the window the daemon's worker does not
/// sleep between a packet and the next (each sleep is a thread wake-up on the path of
/// every request/answer exchange); without it, it sleeps about once per exchange; and
/// once the guest goes quiet the daemon stops polling and uses no CPU.
#[test]
fn busy_polling_saves_the_workers_sleeps_in_an_exchange_and_stops_when_the_guest_is_quiet() {
    const EXCHANGES: u32 = 200;
    let mut off = rig_with(&["--busy-poll-us", "0"]);
    let without = sleeps_during_ping_pong(&mut off, EXCHANGES);
    assert!(
        without >= u64::from(EXCHANGES / 2),
        "without polling: {without} sleeps in {EXCHANGES} exchanges"
    );

    // On a loaded machine (this test's neighbours move 64 MiB at a time) a late answer
    // turns polling off until the window has grown again: the best of three runs, and
    // under half the sleeps without polling.
    let mut on = rig_with(&["--busy-poll-us", "5000"]);
    let with = (0..3)
        .map(|_| sleeps_during_ping_pong(&mut on, EXCHANGES))
        .min()
        .unwrap();
    eprintln!("daemon sleeps in {EXCHANGES} exchanges: {without} without polling, {with} with");
    assert!(
        with * 2 < without,
        "with a 5 ms window: {with} sleeps in {EXCHANGES} exchanges, without: {without}"
    );

    let spent = ticks_in_a_second_after(on.daemon.pid().unwrap(), Duration::from_millis(100));
    assert!(
        spent < 5,
        "the quiet daemon used {spent}/100 ticks of CPU in one second"
    );
}

#[test]
fn a_busy_poll_window_beyond_10_ms_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(
        microagent_integration::daemon::binary("microagent-vhost-vsock").unwrap(),
    )
    .args(["--socket-path", dir.path().join("s").to_str().unwrap()])
    .args([
        "--guest-cid",
        "3",
        "--uds-path",
        dir.path().join("u").to_str().unwrap(),
    ])
    .args(["--busy-poll-us", "10001"])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--busy-poll-us"), "{stderr}");
}
