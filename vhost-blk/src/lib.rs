//! `microagent-vhost-blk`: a vhost-user block device serving one raw disk image.
//!
//! - [`config`]: command-line flags turned into a checked [`config::BlkConfig`].
//! - [`disk`]: positional I/O between the image file and guest memory.
//! - [`request`]: virtio-blk request parsing and execution (pure, tested on real rings).
//! - [`backend`]: the vhost-user backend: features, config space, queues, device state.
//! - [`state`]: the serialized device state for snapshots.

pub mod backend;
pub mod config;
pub mod disk;
pub mod request;
pub mod state;

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

/// Listens on the configured socket, serves one frontend, and returns when it disconnects.
pub fn serve(config: config::BlkConfig) -> Result<(), Error> {
    let socket = config.socket_path.clone();
    let backend = Arc::new(backend::BlkBackend::new(config)?);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("microagent-vhost-blk".into(), backend, mem)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    daemon.serve(&socket).map_err(|e| Error::Serve {
        path: socket.display().to_string(),
        reason: e.to_string(),
    })
}
