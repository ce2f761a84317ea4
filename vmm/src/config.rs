//! Flags of `microagent-vmm`, checked into a [`VmmConfig`].

use clap::Parser;
use std::path::PathBuf;

pub const MAX_CPUS: u8 = 32;
pub const MAX_BLK: usize = 8;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--cpus {0} is out of range (1 to {MAX_CPUS})")]
    Cpus(u8),
    #[error("--memory {0} MiB is out of range (16 MiB to 1 TiB)")]
    Memory(u64),
    #[error("at most {MAX_BLK} --blk devices")]
    TooManyBlk,
    #[error("--kernel {0} does not exist")]
    NoKernel(PathBuf),
    #[error("--initrd {0} does not exist")]
    NoInitrd(PathBuf),
    #[error("--kernel is required unless --restore is given")]
    KernelRequired,
    #[error("--restore {0} is not a directory")]
    NoSnapshot(PathBuf),
}

/// A minimal KVM virtual machine monitor whose devices are vhost-user daemons.
///
/// The VMM appends one `virtio_mmio.device=` entry per device to the kernel command
/// line, and `pci=off` for a bzImage (the VM has no PCI bus). It exits 0 when the guest
/// resets or powers off (i8042 reset, triple fault) or when told to shut down, and 1
/// with a JSON error on stderr when a vCPU fails.
///
/// `--restore DIR` starts from a snapshot instead of booting: memory, vCPUs and the VM
/// come from DIR, `--cpus`/`--memory`/`--cmdline` from its manifest; the kernel (and
/// initrd) must be the ones the snapshot was taken with (`--kernel` names it when it
/// moved), and the device sockets must be of the same kinds.
#[derive(Debug, Parser)]
#[command(name = "microagent-vmm", version)]
pub struct Args {
    /// Guest kernel: ELF vmlinux (PVH entry when it has the note) or bzImage.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Restore the snapshot in this directory instead of booting.
    #[arg(long, conflicts_with_all = ["cpus", "memory", "cmdline"])]
    pub restore: Option<PathBuf>,
    /// With --restore: keep the vCPUs paused until a `resume` request.
    #[arg(long, requires = "restore")]
    pub paused: bool,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (device entries are appended).
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
    /// Where the guest's serial console goes: a file path, or `stdio`.
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    /// vhost-user-blk socket (repeatable: /dev/vda, /dev/vdb, ...).
    #[arg(long)]
    pub blk: Vec<PathBuf>,
    /// vhost-user-vsock socket.
    #[arg(long)]
    pub vsock: Option<PathBuf>,
    /// vhost-user-net socket.
    #[arg(long)]
    pub net: Option<PathBuf>,
    /// Control socket: JSON lines `{"cmd":"status"|"pause"|"resume"|"shutdown"}`.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    #[command(flatten)]
    pub confine: microagent_confine::ConfineArgs,
    #[command(flatten)]
    pub landlock: microagent_confine::LandlockArgs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    Stdio,
    File(PathBuf),
}

/// How the guest starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    Boot {
        kernel: PathBuf,
    },
    Restore {
        dir: PathBuf,
        paused: bool,
        /// The snapshot's kernel when it is no longer at the recorded path.
        kernel: Option<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub struct VmmConfig {
    pub start: Start,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory_mib: u64,
    pub serial: Serial,
    pub blk: Vec<PathBuf>,
    pub vsock: Option<PathBuf>,
    pub net: Option<PathBuf>,
    pub api_socket: Option<PathBuf>,
    pub seccomp: microagent_confine::Seccomp,
    /// `--landlock-dir`: after set-up, files only beneath these, besides reading the
    /// kernel and initrd a snapshot hashes (none: no Landlock).
    pub landlock: Vec<PathBuf>,
}

impl TryFrom<Args> for VmmConfig {
    type Error = Error;

    fn try_from(args: Args) -> Result<Self, Error> {
        if args.cpus == 0 || args.cpus > MAX_CPUS {
            return Err(Error::Cpus(args.cpus));
        }
        if !(16..=1 << 20).contains(&args.memory) {
            return Err(Error::Memory(args.memory));
        }
        if args.blk.len() > MAX_BLK {
            return Err(Error::TooManyBlk);
        }
        if let Some(kernel) = &args.kernel {
            if !kernel.is_file() {
                return Err(Error::NoKernel(kernel.clone()));
            }
        }
        let start = match (args.restore, args.kernel) {
            (Some(dir), kernel) => {
                if !dir.is_dir() {
                    return Err(Error::NoSnapshot(dir));
                }
                Start::Restore {
                    dir,
                    paused: args.paused,
                    kernel,
                }
            }
            (None, Some(kernel)) => Start::Boot { kernel },
            (None, None) => return Err(Error::KernelRequired),
        };
        if let Some(initrd) = &args.initrd {
            if !initrd.is_file() {
                return Err(Error::NoInitrd(initrd.clone()));
            }
        }
        Ok(Self {
            start,
            initrd: args.initrd,
            cmdline: args.cmdline,
            cpus: args.cpus,
            memory_mib: args.memory,
            serial: match args.serial.as_str() {
                "stdio" => Serial::Stdio,
                path => Serial::File(path.into()),
            },
            blk: args.blk,
            vsock: args.vsock,
            net: args.net,
            api_socket: args.api_socket,
            seccomp: args.confine.seccomp,
            landlock: args.landlock.landlock_dirs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &std::path::Path) -> &str {
        p.to_str().unwrap()
    }

    #[test]
    fn bad_flags_are_refused() {
        let kernel = std::env::current_exe().unwrap();
        let k = kernel.to_str().unwrap();
        let parse = |extra: &[&str]| {
            let mut argv = vec!["microagent-vmm", "--kernel", k];
            argv.extend_from_slice(extra);
            VmmConfig::try_from(Args::parse_from(argv))
        };
        assert!(parse(&[]).is_ok());
        assert!(matches!(parse(&["--cpus", "0"]), Err(Error::Cpus(0))));
        assert!(matches!(parse(&["--memory", "8"]), Err(Error::Memory(8))));
        assert!(matches!(
            parse(&["--initrd", "/nonexistent"]),
            Err(Error::NoInitrd(_))
        ));
        let config = parse(&["--serial", "/tmp/console.log"]).unwrap();
        assert_eq!(config.serial, Serial::File("/tmp/console.log".into()));
        let args = Args::parse_from(["microagent-vmm", "--kernel", "/nonexistent"]);
        assert!(matches!(VmmConfig::try_from(args), Err(Error::NoKernel(_))));
        let args = Args::parse_from(["microagent-vmm"]);
        assert!(matches!(
            VmmConfig::try_from(args),
            Err(Error::KernelRequired)
        ));
        let dir = tempfile::tempdir().unwrap();
        let args = Args::parse_from(["microagent-vmm", "--restore", path(dir.path()), "--paused"]);
        assert_eq!(
            VmmConfig::try_from(args).unwrap().start,
            Start::Restore {
                dir: dir.path().to_owned(),
                paused: true,
                kernel: None
            }
        );
        let args = Args::parse_from(["microagent-vmm", "--restore", "/nonexistent"]);
        assert!(matches!(
            VmmConfig::try_from(args),
            Err(Error::NoSnapshot(_))
        ));
        assert!(Args::try_parse_from(["microagent-vmm", "--kernel", k, "--paused"]).is_err());
        let restore_with_memory = ["microagent-vmm", "--restore", "/tmp", "--memory", "64"];
        assert!(Args::try_parse_from(restore_with_memory).is_err());
    }
}
