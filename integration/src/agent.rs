//! The static guest agent (`make agent`), a root disk for it to mount, and a VM that
//! boots it under QEMU with our daemons.

use crate::daemon::{self, Daemon};
use crate::initramfs::{Initramfs, BUSYBOX};
use crate::kernel::guest_kernel;
use crate::qemu::{Qemu, QemuConfig};
use microagent_agent_protocol::client::{Connection, Exit};
use microagent_agent_protocol::message::ExecRequest;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long a boot may take to bring the agent up (QEMU TCG).
const BOOT: Duration = Duration::from_secs(120);

/// Where `make agent` puts the static agent, found from the running test binary.
pub fn static_agent() -> Result<PathBuf, daemon::Error> {
    let dynamic = daemon::binary("microagent-agent").ok();
    let target = std::env::current_exe()
        .map_err(daemon::Error::CurrentExe)?
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = target.join("x86_64-unknown-linux-gnu/release/microagent-agent");
    if path.is_file() {
        Ok(path)
    } else {
        Err(daemon::Error::NotBuilt {
            name: format!("static microagent-agent (run `make agent`; dynamic one: {dynamic:?})"),
            dir: path,
        })
    }
}

/// Applets the test root filesystem offers.
pub const APPLETS: &[&str] = &[
    "sh",
    "cat",
    "echo",
    "dd",
    "head",
    "sleep",
    "kill",
    "true",
    "false",
    "sha256sum",
    "ls",
    "mkdir",
    "sync",
    "id",
    "hostname",
    "env",
    "pwd",
    "tty",
    "stty",
    "wc",
    "tr",
    "rm",
    "stat",
    "ip",
    "wget",
];

/// An ext4 image with busybox, a root and an `app` (uid 1000) user, made with
/// `mke2fs -d` (the way workspace root disks are made).
pub fn busybox_root_disk(dir: &Path, size_mib: u32) -> io::Result<PathBuf> {
    let tree = dir.join("rootfs");
    for d in [
        "bin", "etc", "root", "home/app", "tmp", "proc", "sys", "dev", "run",
    ] {
        fs::create_dir_all(tree.join(d))?;
    }
    fs::copy(BUSYBOX, tree.join("bin/busybox"))?;
    for applet in APPLETS {
        symlink("busybox", tree.join("bin").join(applet))?;
    }
    fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )?;
    let disk = dir.join("root.img");
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(&tree)
        .arg(&disk)
        .arg(format!("{size_mib}M"))
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(disk)
}

/// One boot of a guest whose /init is the agent: our blk and vsock daemons, QEMU TCG,
/// and the agent's host socket. Killed with everything it started when dropped.
pub struct AgentVm {
    pub qemu: Qemu,
    /// The vsock daemon's host socket, where the agent is reached.
    pub uds: PathBuf,
    _blk: Option<Daemon>,
    _vsock: Daemon,
}

impl AgentVm {
    pub fn boot(dir: &Path, disk: Option<&Path>, tag: &str) -> Self {
        Self::boot_with(dir, disk, tag, |_| {})
    }

    pub fn boot_with(
        dir: &Path,
        disk: Option<&Path>,
        tag: &str,
        extra: impl FnOnce(&mut QemuConfig),
    ) -> Self {
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
        // init_on_free: freed pages are zeroed, so wiped secrets leave no copies behind.
        config.cmdline = "microagent.hostname=ws-test init_on_free=1".into();
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
        extra(&mut config);
        let qemu = Qemu::start(&config).unwrap();
        Self {
            qemu,
            uds,
            _blk: blk,
            _vsock: vsock,
        }
    }

    pub fn connect(&mut self) -> Connection {
        Connection::open(&self.uds, BOOT).unwrap_or_else(|e| panic!("{e}\n{}", self.qemu.console()))
    }

    /// Runs a command with `stdin`; returns exit, stdout, stderr.
    pub fn run_with(&mut self, request: ExecRequest, stdin: Vec<u8>) -> (Exit, Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let exit = self
            .connect()
            .exec(request, std::io::Cursor::new(stdin), &mut out, &mut err)
            .unwrap();
        (exit, out, err)
    }

    pub fn run(&mut self, argv: &[&str]) -> (Exit, Vec<u8>, Vec<u8>) {
        self.run_with(argv_request(argv), Vec::new())
    }
}

pub fn argv_request(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}
