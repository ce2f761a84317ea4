//! Real Linux under QEMU with software emulation (TCG), with vhost-user devices on unix
//! sockets: the rig that proves our daemons against real drivers and a frontend we did
//! not write. Flags as measured in `../shared/TESTING.md`.

use crate::initramfs;
use crate::kernel;
use crate::process::{self, ChildGuard};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const QEMU: &str = "qemu-system-x86_64";

/// How much of the console an error shows.
const CONSOLE_TAIL: usize = 3000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error(transparent)]
    Initramfs(#[from] initramfs::Error),
    #[error(transparent)]
    Kernel(#[from] kernel::Error),
    #[error("QEMU ended with {status}; console ends with:\n{tail}")]
    Failed { status: ExitStatus, tail: String },
    #[error("QEMU exited ({status}) before {marker:?} appeared; console ends with:\n{tail}")]
    Exited {
        status: ExitStatus,
        marker: String,
        tail: String,
    },
    #[error(
        "{marker:?} did not appear on the console within {timeout:?}; console ends with:\n{tail}"
    )]
    Timeout {
        marker: String,
        timeout: Duration,
        tail: String,
    },
}

/// What to boot and which devices to attach.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Appended to `console=ttyS0 panic=-1`.
    pub cmdline: String,
    pub memory_mib: u32,
    /// vhost-user-blk sockets, in order: `/dev/vda`, `/dev/vdb`, …
    pub blk: Vec<PathBuf>,
    /// vhost-user-vsock socket (the guest's CID comes from the daemon's config space).
    pub vsock: Option<PathBuf>,
    /// vhost-user net socket.
    pub net: Option<PathBuf>,
    /// QEMU's own user-mode network on a virtio-net device (guest 10.0.2.15, gateway
    /// 10.0.2.2 reaching the host's loopback, DNS 10.0.2.3).
    pub user_net: bool,
    /// A virtio-net device on `-netdev stream` connected to this unix socket, where
    /// passt listens (QEMU 7.2 has `-netdev stream`).
    pub stream_net: Option<PathBuf>,
    /// Where the console log goes.
    pub console: PathBuf,
    /// A human monitor socket (for `pmemsave`), if wanted.
    pub monitor: Option<PathBuf>,
    /// A virtio-rng device (the guest's `/dev/hwrng`), fed from the host's entropy.
    pub rng: bool,
}

impl QemuConfig {
    pub fn new(kernel: PathBuf, initrd: PathBuf, console: PathBuf) -> Self {
        Self {
            kernel,
            initrd,
            cmdline: String::new(),
            memory_mib: 256,
            blk: Vec::new(),
            vsock: None,
            net: None,
            user_net: false,
            stream_net: None,
            console,
            monitor: None,
            rng: false,
        }
    }

    fn command(&self) -> Command {
        let mib = self.memory_mib;
        let mut cmd = Command::new(QEMU);
        cmd.args(["-M", "microvm,acpi=off,memory-backend=mem"])
            .args(["-accel", "tcg", "-cpu", "max", "-m", &format!("{mib}M")])
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mib}M,share=on"))
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-display", "none", "-no-reboot", "-monitor"])
            .arg(match &self.monitor {
                Some(path) => format!("unix:{},server=on,wait=off", path.display()),
                None => "none".into(),
            })
            .arg("-serial")
            .arg(format!("file:{}", self.console.display()));
        let mut chardevs = 0;
        let mut chardev = |cmd: &mut Command, socket: &Path| {
            let id = format!("c{chardevs}");
            chardevs += 1;
            cmd.arg("-chardev")
                .arg(format!("socket,id={id},path={}", socket.display()));
            id
        };
        for socket in &self.blk {
            let id = chardev(&mut cmd, socket);
            cmd.arg("-device")
                .arg(format!("vhost-user-blk,chardev={id}"));
        }
        if let Some(socket) = &self.vsock {
            let id = chardev(&mut cmd, socket);
            cmd.arg("-device")
                .arg(format!("vhost-user-vsock-device,chardev={id}"));
        }
        if let Some(socket) = &self.net {
            let id = chardev(&mut cmd, socket);
            cmd.arg("-netdev")
                .arg(format!("vhost-user,id=n0,chardev={id}"))
                .args(["-device", "virtio-net-device,netdev=n0"]);
        }
        if self.user_net {
            cmd.args([
                "-netdev",
                "user,id=u0",
                "-device",
                "virtio-net-device,netdev=u0",
            ]);
        }
        if let Some(socket) = &self.stream_net {
            cmd.arg("-netdev")
                .arg(format!(
                    "stream,id=s0,server=off,addr.type=unix,addr.path={}",
                    socket.display()
                ))
                .args(["-device", "virtio-net-device,netdev=s0"]);
        }
        if self.rng {
            cmd.args(["-device", "virtio-rng-device"]);
        }
        cmd.arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 panic=-1 {}", self.cmdline));
        cmd.stdin(Stdio::null());
        cmd
    }
}

/// A running QEMU, killed when dropped.
#[derive(Debug)]
pub struct Qemu {
    process: ChildGuard,
    console: PathBuf,
    monitor: Option<PathBuf>,
}

impl Qemu {
    pub fn start(config: &QemuConfig) -> Result<Self, Error> {
        let process = ChildGuard::spawn(&mut config.command())?;
        Ok(Self {
            process,
            console: config.console.clone(),
            monitor: config.monitor.clone(),
        })
    }

    /// Stops QEMU (SIGSTOP): the guest stands still, as a hung guest would, while the
    /// vhost-user daemons go on.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a stopped QEMU go on.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        let pid = self.process.id().expect("QEMU was not reaped");
        process::signal(pid, signal).unwrap_or_else(|e| panic!("kill({pid}, {signal}): {e}"));
    }

    /// Everything the guest has printed so far.
    pub fn console(&self) -> String {
        fs::read(&self.console)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Waits until `marker` appears on the console and returns the console so far.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<String, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            if console.contains(marker) {
                return Ok(console);
            }
            if let Some(status) = self.process.try_status()? {
                // The last lines may have landed between the read and the exit.
                let console = self.console();
                if console.contains(marker) {
                    return Ok(console);
                }
                return Err(Error::Exited {
                    status,
                    marker: marker.to_owned(),
                    tail: tail(&console),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    marker: marker.to_owned(),
                    timeout,
                    tail: tail(&console),
                });
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Dumps `size` bytes of guest physical memory from address 0 into `out` through the
    /// monitor (`pmemsave`), waiting until the command completes.
    pub fn pmemsave(&self, size: u64, out: &Path) -> io::Result<()> {
        let path = self
            .monitor
            .as_ref()
            .ok_or_else(|| io::Error::other("QEMU was started without a monitor"))?;
        let mut stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        // Everything the monitor printed up to its next prompt.
        let wait_prompt = |stream: &mut UnixStream| -> io::Result<String> {
            let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    return Err(io::Error::other("monitor closed"));
                }
                seen.extend_from_slice(&buf[..n]);
                if seen.ends_with(b"(qemu) ") {
                    return Ok(String::from_utf8_lossy(&seen).into_owned());
                }
            }
        };
        wait_prompt(&mut stream)?;
        // Quoted: unquoted, a path starting with '/' would divide the size expression.
        writeln!(stream, "pmemsave 0 {size} \"{}\"", out.display())?;
        let reply = wait_prompt(&mut stream)?;
        // Success prints nothing between the echoed command and the next prompt.
        let after_echo = reply.rsplit("\r\n").nth(1).unwrap_or_default();
        if reply.matches("\r\n").count() > 1 || !out.is_file() {
            return Err(io::Error::other(format!("pmemsave failed: {after_echo}")));
        }
        Ok(())
    }

    /// Waits for QEMU to end by itself (a guest `reboot -f` under `-no-reboot`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        Ok(self.process.wait_timeout(timeout)?)
    }
}

/// The shell prelude every busybox test guest runs first.
pub const GUEST_PRELUDE: &str = "mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
";

/// Boots the project kernel with a busybox initramfs that runs [`GUEST_PRELUDE`] and
/// then `script`, with extra `files` (path, contents; made executable) and the devices
/// `devices` adds to the configuration. Returns the running QEMU.
pub fn start_busybox_guest(
    dir: &Path,
    script: &str,
    files: &[(&str, &[u8])],
    devices: impl FnOnce(&mut QemuConfig),
) -> Result<Qemu, Error> {
    let initrd = dir.join("initrd.cpio");
    let mut image = initramfs::busybox_init(&format!("{GUEST_PRELUDE}{script}"))?;
    image.dir("proc").dir("sys").dir("dev").dir("mnt");
    for (path, contents) in files {
        image.file(path, contents, 0o755);
    }
    image.write(&initrd)?;
    let mut config = QemuConfig::new(kernel::guest_kernel()?, initrd, dir.join("console.log"));
    devices(&mut config);
    Qemu::start(&config)
}

/// [`start_busybox_guest`] without extra files, then waits for `marker` and for QEMU to
/// end (the script should end with `reboot -f`), and returns the console.
pub fn run_busybox_guest(
    dir: &Path,
    script: &str,
    devices: impl FnOnce(&mut QemuConfig),
    marker: &str,
    timeout: Duration,
) -> Result<String, Error> {
    let mut qemu = start_busybox_guest(dir, script, &[], devices)?;
    qemu.wait_for(marker, timeout)?;
    qemu.finish()
}

impl Qemu {
    /// Waits for QEMU to end by itself and returns the console; an unsuccessful exit is
    /// an error.
    pub fn finish(&mut self) -> Result<String, Error> {
        let status = self.wait_exit(Duration::from_secs(30))?;
        let console = self.console();
        if !status.success() {
            return Err(Error::Failed {
                status,
                tail: tail(&console),
            });
        }
        Ok(console)
    }
}

fn tail(console: &str) -> String {
    let mut start = console.len().saturating_sub(CONSOLE_TAIL);
    while !console.is_char_boundary(start) {
        start += 1;
    }
    console[start..].to_owned()
}
