//! The guest agent as /init of a real Linux guest (QEMU TCG) whose root disk and vsock
//! are served by our own daemons; the host drives it with the protocol crate's client.

use microagent_agent_protocol::client::{Connection, Exit};
use microagent_agent_protocol::message::ExecRequest;
use microagent_integration::agent::{busybox_root_disk, static_agent};
use microagent_integration::daemon::Daemon;
use microagent_integration::initramfs::Initramfs;
use microagent_integration::kernel::guest_kernel;
use microagent_integration::qemu::{Qemu, QemuConfig};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(120);

/// One boot of a workspace: daemons, QEMU, and the agent's host socket.
struct Workspace {
    qemu: Qemu,
    uds: PathBuf,
    _blk: Option<Daemon>,
    _vsock: Daemon,
}

impl Workspace {
    fn boot(dir: &Path, disk: Option<&Path>, tag: &str) -> Self {
        let initrd = dir.join("agent-initrd.cpio");
        let mut image = Initramfs::new();
        image.file(
            "init",
            &std::fs::read(static_agent().unwrap()).unwrap(),
            0o755,
        );
        image.write(&initrd).unwrap();
        let uds = dir.join(format!("vsock-{tag}"));
        let vsock_socket = dir.join(format!("vhost-vsock-{tag}.sock"));
        let vsock = Daemon::start(
            "microagent-vhost-vsock",
            &vsock_socket,
            ["--guest-cid", "3", "--uds-path", uds.to_str().unwrap()],
        )
        .unwrap();
        let mut config = QemuConfig::new(
            guest_kernel().unwrap(),
            initrd,
            dir.join(format!("console-{tag}.log")),
        );
        config.cmdline = "microagent.hostname=ws-test".into();
        config.vsock = Some(vsock_socket);
        let blk = disk.map(|disk| {
            let socket = dir.join(format!("blk-{tag}.sock"));
            let daemon = Daemon::start(
                "microagent-vhost-blk",
                &socket,
                ["--disk", disk.to_str().unwrap()],
            )
            .unwrap();
            config.blk.push(socket);
            daemon
        });
        let qemu = Qemu::start(&config).unwrap();
        Self {
            qemu,
            uds,
            _blk: blk,
            _vsock: vsock,
        }
    }

    fn connect(&mut self) -> Connection {
        Connection::open(&self.uds, BOOT).unwrap_or_else(|e| panic!("{e}\n{}", self.qemu.console()))
    }

    /// Runs a command with `stdin`; returns exit, stdout, stderr.
    fn run_with(&mut self, request: ExecRequest, stdin: Vec<u8>) -> (Exit, Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let exit = self
            .connect()
            .exec(request, std::io::Cursor::new(stdin), &mut out, &mut err)
            .unwrap();
        (exit, out, err)
    }

    fn run(&mut self, argv: &[&str]) -> (Exit, Vec<u8>, Vec<u8>) {
        self.run_with(argv_request(argv), Vec::new())
    }
}

fn argv_request(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn agent_runs_commands_in_the_workspace_and_the_disk_keeps_their_writes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = busybox_root_disk(dir.path(), 64).unwrap();
    let mut ws = Workspace::boot(dir.path(), Some(&disk), "first");

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
    let mut again = Workspace::boot(dir.path(), Some(&disk), "second");
    assert_eq!(
        again.run(&["cat", "/root/progress.txt"]).1,
        b"checkpoint-1\n"
    );
}

#[test]
fn a_missing_root_disk_is_reported_on_the_console_and_the_vm_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut ws = Workspace::boot(dir.path(), None, "nodisk");
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
