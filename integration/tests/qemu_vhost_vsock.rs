//! `microagent-vhost-vsock` under a real Linux guest, QEMU as the frontend: a host
//! CONNECT echoed 16 MiB by a guest program (sha256 checked), 32 connections at once,
//! and a guest connection to a host listener on `<uds-path>_<port>`.

use microagent_integration::daemon::Daemon;
use microagent_integration::qemu::start_busybox_guest;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(180);
const IO: Duration = Duration::from_secs(120);

/// Connects through the hybrid socket and returns the stream after "OK <port>".
fn connect(uds: &Path, port: u32) -> UnixStream {
    let mut stream = UnixStream::connect(uds).unwrap();
    stream.set_read_timeout(Some(IO)).unwrap();
    writeln!(stream, "CONNECT {port}").unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8];
    while byte[0] != b'\n' {
        stream.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).unwrap();
    assert!(line.starts_with("OK "), "handshake answered {line:?}");
    stream
}

/// Sends `data` and reads the echo concurrently; returns the echo's sha256.
fn echo_through(mut stream: UnixStream, data: Vec<u8>) -> [u8; 32] {
    let mut writer = stream.try_clone().unwrap();
    let len = data.len();
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::with_capacity(len);
    stream.read_to_end(&mut echoed).unwrap();
    sender.join().unwrap();
    assert_eq!(echoed.len(), len, "echo came back short");
    Sha256::digest(&echoed).into()
}

#[test]
fn linux_guest_echoes_16_mib_serves_32_connections_and_reaches_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock");
    let socket = dir.path().join("vhost-vsock.sock");
    let mut daemon = Daemon::start(
        "microagent-vhost-vsock",
        &socket,
        ["--guest-cid", "3", "--uds-path", uds.to_str().unwrap()],
    )
    .unwrap();
    let host_listener = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();

    let echo = std::fs::read(env!("MICROAGENT_VSOCK_ECHO")).unwrap();
    let script = "vsock_echo listen 5000 33 &
vsock_echo connect 6000 hello-from-guest
wait
echo VSOCK-DONE
reboot -f
";
    let mut qemu =
        start_busybox_guest(dir.path(), script, &[("bin/vsock_echo", &echo)], |config| {
            config.vsock = Some(socket.clone())
        })
        .unwrap();

    // Guest → host: the guest program connects to CID 2 port 6000; served in a thread
    // so that a guest that never connects fails the test at VSOCK-DONE, not here.
    let host_side = std::thread::spawn(move || {
        let (mut from_guest, _) = host_listener.accept().unwrap();
        from_guest.set_read_timeout(Some(IO)).unwrap();
        let mut msg = Vec::new();
        from_guest.read_to_end(&mut msg).unwrap();
        from_guest.write_all(b"hello-from-host").unwrap();
        msg
    });

    qemu.wait_for("LISTENING 5000", BOOT).unwrap();
    // 16 MiB echoed by the guest.
    let data: Vec<u8> = (0..16 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let expected: [u8; 32] = Sha256::digest(&data).into();
    assert_eq!(echo_through(connect(&uds, 5000), data), expected);

    // 32 connections at once.
    let clients: Vec<_> = (0..32u32)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let payload: Vec<u8> = (0..64 << 10).map(|j: u32| (i * 31 + j) as u8).collect();
                let want: [u8; 32] = Sha256::digest(&payload).into();
                assert_eq!(echo_through(connect(&uds, 5000), payload), want);
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a connection failed");
    }

    let console = qemu.wait_for("VSOCK-DONE", IO).unwrap();
    assert!(console.contains("REPLY:hello-from-host"), "{console}");
    assert_eq!(host_side.join().unwrap(), b"hello-from-guest");
    assert!(console.contains("ECHO-DONE"), "{console}");
    qemu.finish().unwrap();
    assert!(daemon.wait_exit(Duration::from_secs(10)).unwrap().success());
}
