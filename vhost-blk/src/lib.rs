//! `microagent-vhost-blk`: a vhost-user block device serving one raw disk image.
//!
//! - [`config`]: command-line flags turned into a checked [`config::BlkConfig`].
//! - [`confinement`]: this daemon's syscalls beyond daemon-kit's seccomp profiles.
//! - [`disk`]: positional I/O between the image file and guest memory.
//! - [`request`]: virtio-blk request parsing and execution (pure, tested on real rings).
//! - [`backend`]: the vhost-user backend: features, config space, queues, device state.
//! - [`state`]: the serialized device state for snapshots.
//! - [`watchdog`]: `--io-timeout`, for a disk that stops answering.
//!
//! Serving, the checks on the frontend's messages, memory and state transfer come from
//! `microagent-daemon-kit`.

pub mod backend;
pub mod config;
pub mod confinement;
pub mod disk;
pub mod request;
pub mod state;
pub mod watchdog;

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Backend(#[from] backend::Error),
    #[error(transparent)]
    Serve(#[from] microagent_daemon_kit::serve::Error),
}

/// Listens on the configured socket, serves one frontend, and returns when it disconnects.
pub fn serve(config: config::BlkConfig) -> Result<(), Error> {
    let socket = config.socket_path.clone();
    let policy = confinement::policy(config.seccomp);
    let landlock = config.landlock.clone();
    let io_timeout = config.io_timeout;
    let disk = config.disk.clone();
    let backend = Arc::new(backend::BlkBackend::new(config)?);
    let in_flight = backend.in_flight();
    microagent_daemon_kit::serve::serve(
        "microagent-vhost-blk",
        &socket,
        backend,
        &policy,
        &landlock,
        // After the privilege drop and Landlock, before the seccomp filter (which then
        // covers this thread too).
        |_| match io_timeout {
            Some(timeout) => watchdog::start(in_flight, timeout, disk),
            None => Ok(()),
        },
    )?;
    Ok(())
}
