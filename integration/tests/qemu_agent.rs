//! The guest agent as /init of a real Linux guest (QEMU TCG) whose root disk and vsock
//! are served by our own daemons; the host drives it with the protocol crate's client.

use microagent_agent_protocol::client::{Connection, Error as ClientError, Exit};
use microagent_agent_protocol::liveness::Liveness;
use microagent_agent_protocol::message::{HostMessage, TtySize};
use microagent_integration::agent::{argv_request, busybox_root_disk, AgentVm};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(120);

#[test]
fn agent_runs_commands_in_the_workspace_and_the_disk_keeps_their_writes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = busybox_root_disk(dir.path(), 64).unwrap();
    let mut ws = AgentVm::boot(dir.path(), Some(&disk), "first");

    let (exit, out, _) = ws.run(&["sh", "-c", "echo checkpoint-1 > /root/progress.txt"]);
    assert_eq!(exit, Exit::Code(0));
    assert!(out.is_empty());
    let (exit, out, _) = ws.run(&["cat", "/root/progress.txt"]);
    assert_eq!(
        (exit, out.as_slice()),
        (Exit::Code(0), &b"checkpoint-1\n"[..])
    );

    // Exit codes, signals, a missing command.
    assert_eq!(ws.run(&["true"]).0, Exit::Code(0));
    assert_eq!(ws.run(&["false"]).0, Exit::Code(1));
    assert_eq!(ws.run(&["sh", "-c", "exit 42"]).0, Exit::Code(42));
    assert_eq!(ws.run(&["sh", "-c", "kill -9 $$"]).0, Exit::Signal(9));
    let missing = ws
        .connect()
        .exec(
            argv_request(&["no-such-command"]),
            std::io::empty(),
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .unwrap_err();
    assert_eq!(missing.exit_code(), 127, "{missing}");

    // stdin piped through cat; stdout and stderr kept apart.
    let input: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i * 7) as u8).collect();
    let (exit, out, _) = ws.run_with(argv_request(&["cat"]), input.clone());
    assert_eq!(exit, Exit::Code(0));
    assert!(
        out == input,
        "cat returned {} bytes of {}",
        out.len(),
        input.len()
    );
    let (_, out, err) = ws.run(&["sh", "-c", "echo out; echo err >&2"]);
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );

    // 10 MiB of output, byte for byte.
    let (exit, out, _) = ws.run(&["dd", "if=/dev/zero", "bs=1048576", "count=10"]);
    assert_eq!(exit, Exit::Code(0));
    assert_eq!(Sha256::digest(&out), Sha256::digest(vec![0u8; 10 << 20]));

    // User, working directory, environment, hostname.
    let mut request = argv_request(&["sh", "-c", "id -u; pwd; echo $FOO"]);
    request.user = Some("app".into());
    request.cwd = Some("/tmp".into());
    request.env = vec![("FOO".into(), "bar".into())];
    let (_, out, err) = ws.run_with(request, Vec::new());
    assert_eq!(
        String::from_utf8_lossy(&out),
        "1000\n/tmp\nbar\n",
        "{}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(ws.run(&["hostname"]).1, b"ws-test\n");

    // Eight at once: they overlap instead of running one after another.
    let uds = ws.uds.clone();
    let start = Instant::now();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let request = argv_request(&["sh", "-c", &format!("sleep 2; echo done-{i}")]);
                let exit = Connection::open(&uds, BOOT)
                    .unwrap()
                    .exec(request, std::io::empty(), &mut out, &mut Vec::new())
                    .unwrap();
                (exit, out)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (exit, out) = h.join().unwrap();
        assert_eq!(
            (exit, out),
            (Exit::Code(0), format!("done-{i}\n").into_bytes())
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(12),
        "8 execs took {:?}",
        start.elapsed()
    );

    // Shut down through the agent; the next boot from the same disk sees the file.
    ws.connect().shutdown().unwrap();
    let status = ws.qemu.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status}");
    drop(ws);
    let mut again = AgentVm::boot(dir.path(), Some(&disk), "second");
    assert_eq!(
        again.run(&["cat", "/root/progress.txt"]).1,
        b"checkpoint-1\n"
    );
}

#[test]
fn a_missing_root_disk_is_reported_on_the_console_and_the_vm_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut ws = AgentVm::boot(dir.path(), None, "nodisk");
    let console = ws.qemu.wait_for("did not appear", BOOT).unwrap();
    assert!(
        console.contains("cannot start the workspace: root disk /dev/vda"),
        "{console}"
    );
    assert!(ws
        .qemu
        .wait_exit(Duration::from_secs(30))
        .unwrap()
        .success());
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn secrets_leave_no_copy_in_guest_memory_after_prepare_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let disk = busybox_root_disk(dir.path(), 64).unwrap();
    let monitor = dir.path().join("monitor.sock");
    let mut ws = AgentVm::boot_with(dir.path(), Some(&disk), "secrets", |c| {
        c.monitor = Some(monitor.clone())
    });
    let mut random = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut random)
        .unwrap();
    let secret = format!(
        "MASECRET-{}",
        random
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let secrets = vec![("api-token".to_string(), secret.clone().into_bytes())];
    ws.connect().put_secrets(&secrets).unwrap();

    let sha = format!("{:x}", Sha256::digest(secret.as_bytes()));
    let (_, out, _) = ws.run(&["sha256sum", "/run/secrets/api-token"]);
    assert!(
        String::from_utf8_lossy(&out).starts_with(&sha),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(
        ws.run(&["stat", "-c", "%a", "/run/secrets/api-token"]).1,
        b"400\n"
    );
    let mut as_app = argv_request(&["cat", "/run/secrets/api-token"]);
    as_app.user = Some("app".into());
    // Refused by the file's mode (EACCES), not failing for some other reason.
    let (exit, out, err) = ws.run_with(as_app, Vec::new());
    let err = String::from_utf8_lossy(&err);
    assert_eq!((exit, out), (Exit::Code(1), Vec::new()), "{err}");
    assert!(err.contains("Permission denied"), "{err}");

    // While delivered, the secret is in guest memory: the dump does find it.
    let dump = dir.path().join("mem-before.bin");
    ws.qemu.pmemsave(256 << 20, &dump).unwrap();
    assert!(
        contains(&std::fs::read(&dump).unwrap(), secret.as_bytes()),
        "search finds nothing"
    );

    ws.connect().prepare_snapshot().unwrap();
    assert_eq!(ws.run(&["ls", "/run/secrets"]).1, b"");
    let dump = dir.path().join("mem-after.bin");
    ws.qemu.pmemsave(256 << 20, &dump).unwrap();
    let memory = std::fs::read(&dump).unwrap();
    assert_eq!(memory.len(), 256 << 20);
    assert!(
        !contains(&memory, secret.as_bytes()),
        "a copy of the secret survived in guest memory"
    );

    // After a restore the host delivers them again.
    ws.connect().put_secrets(&secrets).unwrap();
    let (_, out, _) = ws.run(&["sha256sum", "/run/secrets/api-token"]);
    assert!(String::from_utf8_lossy(&out).starts_with(&sha));
}

#[test]
fn identity_and_file_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let disk = busybox_root_disk(dir.path(), 64).unwrap();
    let mut ws = AgentVm::boot(dir.path(), Some(&disk), "identity");
    let machine_id = "0123456789abcdef0123456789abcdef";
    ws.connect()
        .set_identity("ws-fork-1", machine_id, &[7u8; 64], None)
        .unwrap();
    assert_eq!(ws.run(&["hostname"]).1, b"ws-fork-1\n");
    assert_eq!(
        ws.run(&["cat", "/etc/machine-id"]).1,
        format!("{machine_id}\n").into_bytes()
    );
    // Refused for its hostname, with the identity code; the old name stays.
    match ws.connect().set_identity("bad host", machine_id, &[], None) {
        Err(ClientError::Agent { code, message }) => {
            assert_eq!(code, "agent.identity_failed", "{message}");
            assert!(
                message.contains("invalid hostname \"bad host\""),
                "{message}"
            );
        }
        other => panic!("a bad hostname was not refused by the agent: {other:?}"),
    }
    // A multicast MAC is refused before anything changes.
    match ws
        .connect()
        .set_identity("ws-fork-2", machine_id, &[], Some("01:00:5e:00:00:01"))
    {
        Err(ClientError::Agent { code, message }) => {
            assert_eq!(code, "agent.identity_failed", "{message}");
            assert!(message.contains("invalid MAC address"), "{message}");
        }
        other => panic!("a multicast MAC was not refused by the agent: {other:?}"),
    }
    assert_eq!(ws.run(&["hostname"]).1, b"ws-fork-1\n");

    let data: Vec<u8> = (0..(200 << 10)).map(|i: u32| (i * 13 + 1) as u8).collect();
    ws.connect()
        .write_file("/root/in.bin", 0o640, &data)
        .unwrap();
    assert_eq!(
        ws.run(&["stat", "-c", "%a %s", "/root/in.bin"]).1,
        b"640 204800\n"
    );
    assert_eq!(
        ws.connect().read_file("/root/in.bin", data.len()).unwrap(),
        data
    );
    // The host never takes more than it asked for, whatever the guest sends.
    let err = ws
        .connect()
        .read_file("/root/in.bin", data.len() - 1)
        .unwrap_err();
    assert!(
        matches!(
            err,
            microagent_agent_protocol::client::Error::TooLarge { .. }
        ),
        "{err}"
    );
    let escape = ws
        .connect()
        .write_file("/root/../../x", 0o600, b"x")
        .unwrap_err();
    assert!(escape.to_string().contains("must not contain"), "{escape}");
    assert!(ws.connect().read_file("/no/such/file", 1 << 20).is_err());
}

#[test]
fn tty_mode_gives_a_sized_terminal_and_host_signals_reach_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let disk = busybox_root_disk(dir.path(), 64).unwrap();
    let mut ws = AgentVm::boot(dir.path(), Some(&disk), "tty");

    let mut request = argv_request(&["sh", "-c", "tty; [ -t 0 ] && echo interactive; stty size"]);
    request.tty = Some(TtySize {
        rows: 33,
        cols: 101,
    });
    let (exit, out, _) = ws.run_with(request, Vec::new());
    let out = String::from_utf8_lossy(&out).replace('\r', "");
    assert_eq!(exit, Exit::Code(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{out}");
    assert_eq!(&lines[1..], ["interactive", "33 101"], "{out}");

    // A resize while the command runs, then a signal that ends it.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut request = argv_request(&[
        "sh",
        "-c",
        "trap 'stty size; exit 7' USR1; echo ready; while true; do sleep 0.1; done",
    ]);
    request.tty = Some(TtySize { rows: 24, cols: 80 });
    let conn = ws.connect();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        tx.send(HostMessage::Resize(TtySize {
            rows: 50,
            cols: 132,
        }))
        .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        tx.send(HostMessage::Signal { signal: 10 }).unwrap(); // SIGUSR1
        tx
    });
    let mut out = Vec::new();
    let exit = conn
        .exec_with_controls(request, std::io::empty(), &mut out, &mut Vec::new(), rx)
        .unwrap();
    drop(sender.join());
    let out = String::from_utf8_lossy(&out).replace('\r', "");
    assert_eq!(exit, Exit::Code(7), "{out}");
    assert!(
        out.contains("50 132"),
        "resize did not reach the terminal: {out}"
    );

    // SIGKILL from the host ends a command that ignores everything else.
    let (tx, rx) = std::sync::mpsc::channel();
    tx.send(HostMessage::Signal { signal: 9 }).unwrap();
    let exit = ws
        .connect()
        .exec_with_controls(
            argv_request(&["sleep", "30"]),
            std::io::empty(),
            &mut Vec::new(),
            &mut Vec::new(),
            rx,
        )
        .unwrap();
    assert_eq!(exit, Exit::Signal(9));
}

/// A guest that stops while a command runs (QEMU stopped with SIGSTOP once the command
/// printed, as a hung guest kernel would stand still) ends the host's `exec` once the
/// liveness probes fail, instead of leaving it waiting for ever; a command that is only
/// silent is left to finish; and the guest, let go on, answers again.
#[test]
fn exec_gives_up_on_a_guest_that_hangs_mid_command_but_not_on_a_silent_one() {
    let dir = tempfile::tempdir().unwrap();
    let disk = busybox_root_disk(dir.path(), 64).unwrap();
    let mut ws = AgentVm::boot(dir.path(), Some(&disk), "hang");
    let quick = Liveness {
        interval: Duration::from_secs(1),
        probes: 3,
    };
    let silent = ws
        .connect()
        .with_liveness(quick)
        .exec(
            argv_request(&["sleep", "6"]),
            std::io::empty(),
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!(silent, Exit::Code(0), "a silent, live command was given up");

    /// Stops QEMU when the command's first output arrives.
    struct StopOnOutput<'a>(&'a microagent_integration::qemu::Qemu, bool);
    impl std::io::Write for StopOnOutput<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if !self.1 {
                self.0.stop();
                self.1 = true;
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let conn = ws.connect().with_liveness(quick);
    let started = Instant::now();
    let err = conn
        .exec(
            argv_request(&["sh", "-c", "echo up; exec sleep 600"]),
            std::io::empty(),
            &mut StopOnOutput(&ws.qemu, false),
            &mut Vec::new(),
        )
        .unwrap_err();
    let took = started.elapsed();
    ws.qemu.resume();
    assert!(
        matches!(&err, ClientError::Unresponsive(lost) if lost.probes == 3),
        "{err}"
    );
    assert!(took < Duration::from_secs(60), "gave up after {took:?}");
    assert_eq!(ws.run(&["echo", "back"]).1, b"back\n");
}

#[test]
fn the_agent_configures_static_networking_from_the_kernel_command_line() {
    use std::io::Write as _;
    // A host service on loopback, which QEMU's user network shows the guest as 10.0.2.2.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = server.accept() {
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request);
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 14\r\n\r\nhello-over-net");
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let disk = busybox_root_disk(dir.path(), 64).unwrap();
    let mut ws = AgentVm::boot_with(dir.path(), Some(&disk), "net", |c| {
        c.user_net = true;
        c.cmdline
            .push_str(" microagent.ip=10.0.2.15/24 microagent.gw=10.0.2.2 microagent.dns=10.0.2.3");
    });
    let (_, addr, _) = ws.run(&["ip", "-4", "addr", "show", "eth0"]);
    assert!(
        String::from_utf8_lossy(&addr).contains("inet 10.0.2.15/24"),
        "{}",
        String::from_utf8_lossy(&addr)
    );
    let (_, route, _) = ws.run(&["ip", "route"]);
    assert!(
        String::from_utf8_lossy(&route).contains("default via 10.0.2.2"),
        "{}",
        String::from_utf8_lossy(&route)
    );
    assert_eq!(
        ws.run(&["cat", "/etc/resolv.conf"]).1,
        b"nameserver 10.0.2.3\n"
    );
    let url = format!("http://10.0.2.2:{port}/");
    let (exit, body, err) = ws.run(&["wget", "-q", "-O", "-", &url]);
    assert_eq!(exit, Exit::Code(0), "{}", String::from_utf8_lossy(&err));
    assert_eq!(body, b"hello-over-net");
}
