//! `microagent-vhost-vsock`: a vhost-user vsock device whose host side is the hybrid
//! unix-socket convention of Firecracker and vhost-device-vsock.
//!
//! - [`config`]: flags checked into a [`config::VsockConfig`].
//! - [`packet`]: the virtio-vsock header.
//! - [`muxer`]: connections, credit flow control, host sockets (no virtqueues).
//! - [`backend`]: the vhost-user backend: queues, events, device state.
//! - [`state`]: the serialized device state.

pub mod backend;
pub mod config;
pub mod muxer;
pub mod packet;
pub mod state;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Backend(#[from] backend::Error),
    // vhost_user_backend::Error implements Display but not std::error::Error.
    #[error("starting the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("serving {path}: {reason}")]
    Serve { path: String, reason: String },
}

/// Listens on the configured sockets, serves one frontend, returns when it disconnects.
pub fn serve(config: config::VsockConfig) -> Result<(), Error> {
    let socket = config.socket_path.clone();
    let backend = Arc::new(backend::VsockBackend::new(config));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("microagent-vhost-vsock".into(), backend.clone(), mem)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    let handlers = daemon.get_epoll_handlers();
    let worker = handlers
        .first()
        .ok_or_else(|| Error::Daemon("no worker thread".into()))?;
    backend.start(worker.as_raw_fd())?;
    daemon.serve(&socket).map_err(|e| Error::Serve {
        path: socket.display().to_string(),
        reason: e.to_string(),
    })
}
