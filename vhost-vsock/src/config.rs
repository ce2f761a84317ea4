//! Flags of `microagent-vhost-vsock`, checked into a [`VsockConfig`].

use clap::Parser;
use microagent_daemon_kit::serve::MAX_SOCKET_PATH;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--guest-cid {0} is reserved (use 3 to 4294967294)")]
    ReservedCid(u64),
    #[error("{which} {path} is too long for a unix socket address (at most {max} bytes)")]
    PathTooLong {
        which: &'static str,
        path: PathBuf,
        max: usize,
    },
}

/// `--busy-poll-us` when not given.
pub const DEFAULT_BUSY_POLL_US: u64 = 50;

/// Room left for "_<port>" on guest-initiated connections.
const PORT_SUFFIX: usize = 11;

/// vhost-user vsock device. Host processes reach guest port P by connecting to
/// --uds-path and writing "CONNECT P\n" (answered "OK <hostport>\n"); a guest connect to
/// (CID 2, port P) reaches the unix socket <uds-path>_P. Serves one frontend and exits 0
/// when it disconnects.
#[derive(Debug, Parser)]
#[command(name = "microagent-vhost-vsock", version)]
pub struct Args {
    /// Unix socket to listen on for the vhost-user frontend.
    #[arg(long)]
    pub socket_path: PathBuf,
    /// The guest's context ID.
    #[arg(long)]
    pub guest_cid: u64,
    /// Host side: the unix socket host processes connect to.
    #[arg(long)]
    pub uds_path: PathBuf,
    /// Longest time, in microseconds, the worker keeps watching for its next event
    /// (a kick, a host socket) after it served one, before it sleeps (adaptive: only
    /// while events come that soon; 0 turns polling off). Saves a thread wake-up per
    /// request/answer exchange with the guest.
    #[arg(long, default_value_t = DEFAULT_BUSY_POLL_US, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub busy_poll_us: u64,
    #[command(flatten)]
    pub confine: microagent_confine::ConfineArgs,
    #[command(flatten)]
    pub landlock: microagent_confine::LandlockArgs,
}

#[derive(Debug, Clone)]
pub struct VsockConfig {
    pub socket_path: PathBuf,
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    pub seccomp: microagent_confine::Seccomp,
    /// `--landlock-dir`: after set-up, files only beneath these (none: no Landlock).
    pub landlock: Vec<PathBuf>,
    /// `--busy-poll-us`: the longest busy-polling window.
    pub busy_poll: Duration,
}

impl TryFrom<Args> for VsockConfig {
    type Error = Error;

    fn try_from(args: Args) -> Result<Self, Error> {
        if args.guest_cid < 3 || args.guest_cid >= u64::from(u32::MAX) {
            return Err(Error::ReservedCid(args.guest_cid));
        }
        let long = |which, path: &PathBuf, max| {
            (path.as_os_str().len() > max).then(|| Error::PathTooLong {
                which,
                path: path.clone(),
                max,
            })
        };
        if let Some(e) = long("--socket-path", &args.socket_path, MAX_SOCKET_PATH)
            .or_else(|| long("--uds-path", &args.uds_path, MAX_SOCKET_PATH - PORT_SUFFIX))
        {
            return Err(e);
        }
        Ok(Self {
            socket_path: args.socket_path,
            guest_cid: args.guest_cid,
            uds_path: args.uds_path,
            seccomp: args.confine.seccomp,
            landlock: args.landlock.landlock_dirs,
            busy_poll: Duration::from_micros(args.busy_poll_us),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(cid: &str, uds: &str) -> Result<VsockConfig, Error> {
        VsockConfig::try_from(Args::parse_from([
            "x",
            "--socket-path",
            "/tmp/v.sock",
            "--guest-cid",
            cid,
            "--uds-path",
            uds,
        ]))
    }

    #[test]
    fn reserved_cids_and_long_paths_are_refused() {
        assert!(parse("3", "/tmp/vsock").is_ok());
        for cid in ["0", "1", "2", "4294967295"] {
            assert!(
                matches!(parse(cid, "/tmp/v"), Err(Error::ReservedCid(_))),
                "{cid}"
            );
        }
        let long = format!("/tmp/{}", "u".repeat(95));
        assert!(matches!(parse("3", &long), Err(Error::PathTooLong { .. })));
    }
}
