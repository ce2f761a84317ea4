//! Flags of `microagent-vhost-blk`, checked into a [`BlkConfig`].

use clap::Parser;
use microagent_daemon_kit::serve::MAX_SOCKET_PATH;
use std::path::PathBuf;
use std::time::Duration;

/// Longest serial virtio-blk can report (VIRTIO_BLK_ID_BYTES).
pub const MAX_SERIAL: usize = 20;
/// Most queues a frontend may use.
pub const MAX_QUEUES: u16 = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--serial {0:?} is longer than {MAX_SERIAL} bytes")]
    SerialTooLong(String),
    #[error("--queues {0} is out of range (1 to {MAX_QUEUES})")]
    Queues(u16),
    #[error(
        "socket path {0} is longer than a unix socket address allows ({MAX_SOCKET_PATH} bytes)"
    )]
    SocketPathTooLong(PathBuf),
}

/// vhost-user block device backed by a raw disk image. Serves one frontend and exits 0
/// when it disconnects.
#[derive(Debug, Parser)]
#[command(name = "microagent-vhost-blk", version)]
pub struct Args {
    /// Unix socket to listen on for the vhost-user frontend (the VMM or QEMU).
    #[arg(long)]
    pub socket_path: PathBuf,
    /// Raw disk image to serve; its size must be a whole number of 512-byte sectors.
    #[arg(long)]
    pub disk: PathBuf,
    /// Offer the disk read-only: writes fail with VIRTIO_BLK_S_IOERR, the file is opened
    /// read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    #[arg(long, default_value = "microagent")]
    pub serial: String,
    /// Number of request queues, each served by its own thread.
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Open the image with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    pub direct_io: bool,
    /// Seconds a request may wait for the disk before the daemon gives up and exits
    /// (status 3), so that the VM sees the device fail instead of waiting forever (an
    /// image on a hung network filesystem). 0: wait forever.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub io_timeout: u64,
    #[command(flatten)]
    pub confine: microagent_confine::ConfineArgs,
    #[command(flatten)]
    pub landlock: microagent_confine::LandlockArgs,
}

#[derive(Debug, Clone)]
pub struct BlkConfig {
    pub socket_path: PathBuf,
    pub disk: PathBuf,
    pub read_only: bool,
    pub serial: String,
    pub queues: u16,
    pub direct_io: bool,
    /// `--io-timeout` (none: wait forever).
    pub io_timeout: Option<Duration>,
    pub seccomp: microagent_confine::Seccomp,
    /// `--landlock-dir`: after set-up, files only beneath these (none: no Landlock).
    pub landlock: Vec<PathBuf>,
}

impl TryFrom<Args> for BlkConfig {
    type Error = Error;

    fn try_from(args: Args) -> Result<Self, Error> {
        if args.serial.len() > MAX_SERIAL {
            return Err(Error::SerialTooLong(args.serial));
        }
        if args.queues == 0 || args.queues > MAX_QUEUES {
            return Err(Error::Queues(args.queues));
        }
        if args.socket_path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::SocketPathTooLong(args.socket_path));
        }
        Ok(Self {
            socket_path: args.socket_path,
            disk: args.disk,
            read_only: args.read_only,
            serial: args.serial,
            queues: args.queues,
            direct_io: args.direct_io,
            io_timeout: (args.io_timeout > 0).then(|| Duration::from_secs(args.io_timeout)),
            seccomp: args.confine.seccomp,
            landlock: args.landlock.landlock_dirs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<BlkConfig, Error> {
        let mut argv = vec![
            "microagent-vhost-blk",
            "--socket-path",
            "/tmp/b.sock",
            "--disk",
            "d.img",
        ];
        argv.extend_from_slice(extra);
        BlkConfig::try_from(Args::parse_from(argv))
    }

    #[test]
    fn defaults_are_one_writable_queue() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.queues, 1);
        assert!(!config.read_only && !config.direct_io);
        assert_eq!(config.serial, "microagent");
        assert_eq!(config.io_timeout, Some(Duration::from_secs(120)));
        assert_eq!(parse(&["--io-timeout", "0"]).unwrap().io_timeout, None);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(matches!(parse(&["--queues", "0"]), Err(Error::Queues(0))));
        assert!(matches!(parse(&["--queues", "17"]), Err(Error::Queues(17))));
        assert!(matches!(
            parse(&["--serial", "012345678901234567890"]),
            Err(Error::SerialTooLong(_))
        ));
        let long = format!("/tmp/{}", "s".repeat(120));
        let args = Args::parse_from(["x", "--socket-path", &long, "--disk", "d"]);
        assert!(matches!(
            BlkConfig::try_from(args),
            Err(Error::SocketPathTooLong(_))
        ));
    }
}
