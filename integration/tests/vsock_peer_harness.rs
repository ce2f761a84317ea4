//! The vsock harness (`vsock_guest.rs`, which also drives the vsock benchmark) against
//! rust-vmm's vhost-device-vsock 0.3.0, installed by `scripts/install-deps.sh`: the
//! benchmark's connection set-up loop must complete against the peer as it does against
//! our daemon.

use microagent_integration::process::ChildGuard;
use microagent_integration::vsock_guest::{connect_line, pkt, Guest};
use microagent_vhost_vsock::packet::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const PEER: &str = "/var/lib/microagent/tools/bin/vhost-device-vsock";

/// 200 host CONNECT → guest RESPONSE → `OK` → guest RST rounds, as the benchmark runs them.
/// Before the CONNECT line went out in one write, the peer closed the client on about
/// the third round (EPIPE on the write), depending on timing.
#[test]
fn vhost_device_vsock_completes_200_host_connects_from_the_harness() {
    assert!(
        Path::new(PEER).is_file(),
        "{PEER} is missing: scripts/install-deps.sh installs vhost-device-vsock 0.3.0"
    );
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("peer.sock");
    let uds = dir.path().join("peer.vsock");
    let mut cmd = Command::new(PEER);
    cmd.args(["--guest-cid", "3", "--socket"])
        .arg(&socket)
        .arg("--uds-path")
        .arg(&uds)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null());
    let mut peer = ChildGuard::spawn(&mut cmd).unwrap();
    peer.wait_for_path(&socket, Duration::from_secs(10))
        .unwrap();
    let mut guest = Guest::new(&socket);
    for i in 0..200u32 {
        let port = 7000 + i;
        let client = connect_line(&uds, port)
            .unwrap_or_else(|e| panic!("round {i}: the peer dropped the client: {e}"));
        let req = loop {
            let (p, _) = guest.recv();
            if p.op == OP_REQUEST && p.dst_port == port {
                break p;
            }
        };
        guest.send(pkt(port, req.src_port, OP_RESPONSE, 0, 1 << 18, 0), &[]);
        let mut line = String::new();
        BufReader::new(&client).read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {port}\n"), "round {i}");
        guest.send(pkt(port, req.src_port, OP_RST, 0, 0, 0), &[]);
    }
}
