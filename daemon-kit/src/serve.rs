//! Serving one frontend: listen on the socket, accept one frontend, put the gate between
//! it and vhost-user-backend's handler, and return when the session ends. Also the body
//! of every daemon's `main`.

use crate::checks::{Limits, Refusal};
use crate::confine::{self, Policy};
use crate::gate::{self, Gate};
use crate::Mem;
use microagent_confine::Confinement;
use std::fmt::Display;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Longest unix socket path (sun_path is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // vhost_user_backend::Error implements Display but not std::error::Error.
    #[error("starting the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("wiring the device to its worker threads: {0}")]
    Wire(String),
    #[error("listening on {path}: {reason}")]
    Listen { path: PathBuf, reason: String },
    #[error("connecting the gate to the vhost-user handler: {0}")]
    Internal(io::Error),
    #[error(transparent)]
    Gate(#[from] gate::Error),
    #[error("serving {path}: {reason}")]
    Serve { path: String, reason: String },
    #[error("confining the daemon: {0}")]
    Confine(#[from] microagent_confine::Error),
    #[error("refused a frontend request [{code}]: {refusal}", code = .0.code(), refusal = .0)]
    Refused(Refusal),
}

/// Serves one frontend on `socket` and returns when it disconnects (`Ok`), when the
/// session fails, or when the gate refused a request. `wire` runs once before the
/// frontend connects, with the epoll fd of each worker thread (a daemon with host
/// sockets registers them there). Once the socket listens, the daemon confines itself
/// as `policy` says ([`crate::confine`]).
pub fn serve<B, E>(
    name: &str,
    socket: &Path,
    backend: Arc<B>,
    policy: &Policy,
    landlock: &[PathBuf],
    wire: impl FnOnce(&[RawFd]) -> Result<(), E>,
) -> Result<(), Error>
where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock<Mem>> + 'static,
    E: Display,
{
    let main_confinement = Confinement::new(&confine::main_profile(policy), policy.seccomp)?;
    let worker_confinement = Confinement::new(&confine::worker_profile(policy), policy.seccomp)?;
    // Before any thread starts, so that every thread is without capabilities: a daemon
    // opens what needs privileges (disk images, published ports) before `serve`.
    microagent_confine::privileges::drop_all().map_err(microagent_confine::Error::from)?;
    // Files only beneath `landlock` from here on (when given), for every thread to come.
    microagent_confine::enter_landlock(policy.daemon, landlock, &[])?;
    let limits = Limits {
        max_queue_size: u16::try_from(backend.max_queue_size()).unwrap_or(u16::MAX),
    };
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(name.into(), backend, mem)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    let epolls: Vec<RawFd> = daemon
        .get_epoll_handlers()
        .iter()
        .map(|h| h.as_raw_fd())
        .collect();
    wire(&epolls).map_err(|e| Error::Wire(e.to_string()))?;

    let listen_error = |reason: String| Error::Listen {
        path: socket.to_owned(),
        reason,
    };
    // The handler is connected before the frontend is accepted, so that the frontend's
    // first message does not wait for it.
    let (relay_end, handler_listener) =
        private_pair(socket.parent().unwrap_or(Path::new("."))).map_err(Error::Internal)?;
    daemon
        .start(&mut Listener::from(handler_listener))
        .map_err(|e| Error::Daemon(e.to_string()))?;
    // Removes a stale socket first, and the socket file again when dropped.
    let listener = Listener::new(socket, true).map_err(|e| listen_error(e.to_string()))?;
    main_confinement.enter_all_threads()?;
    confine::arm_workers(worker_confinement);
    let mut gate = Gate::prepare(relay_end, limits)?;
    let frontend = loop {
        match listener.accept() {
            Ok(Some(stream)) => break stream,
            Ok(None) => continue,
            Err(e) => {
                gate.stop();
                return Err(listen_error(e.to_string()));
            }
        }
    };
    if let Err(e) = gate.connect(frontend) {
        gate.stop();
        return Err(e.into());
    }
    let result = daemon.wait();
    let refusal = gate.stop();
    // Dropping the daemon signals every worker's exit event and joins the workers.
    drop(daemon);
    drop(listener);
    if let Some(refusal) = refusal {
        return Err(Error::Refused(refusal));
    }
    match result {
        Ok(())
        | Err(DaemonError::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(Error::Serve {
            path: socket.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// A connected pair between the gate and the handler. vhost-user-backend only takes its
/// connection from a listener, so the pair meets on a socket in a fresh 0700 directory
/// that is removed at once (the queued connection outlives the name). The directory is
/// made beside the daemon's own socket, where Landlock lets the daemon create files.
fn private_pair(beside: &Path) -> io::Result<(UnixStream, UnixListener)> {
    let dir = tempfile::Builder::new()
        .prefix(".gate-")
        .tempdir_in(beside)?;
    let path = dir.path().join("s");
    let listener = UnixListener::bind(&path)?;
    let stream = UnixStream::connect(&path)?;
    Ok((stream, listener))
}

/// The body of a daemon's `main`: logging at `info` unless RUST_LOG says otherwise, then
/// `run`; an error is logged and printed as `NAME: error` and exits 1.
pub fn main<E: Display>(name: &str, run: impl FnOnce() -> Result<(), E>) -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
