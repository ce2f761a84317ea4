//! `microagent-vhost-vsock`: a vhost-user vsock device whose host side is the hybrid
//! unix-socket convention of Firecracker and vhost-device-vsock.
//!
//! - [`config`]: flags checked into a [`config::VsockConfig`].
//! - [`confinement`]: this daemon's syscalls beyond daemon-kit's seccomp profiles.
//! - [`packet`]: the virtio-vsock header.
//! - [`muxer`]: connections, credit flow control, host sockets (no virtqueues).
//! - [`backend`]: the vhost-user backend: queues, events, device state.
//! - [`state`]: the serialized device state.
//!
//! Serving, the checks on the frontend's messages, memory and state transfer come from
//! `microagent-daemon-kit`.

pub mod backend;
pub mod config;
pub mod confinement;
pub mod muxer;
pub mod packet;
pub mod state;

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Serve(#[from] microagent_daemon_kit::serve::Error),
}

/// Listens on the configured sockets, serves one frontend, returns when it disconnects.
pub fn serve(config: config::VsockConfig) -> Result<(), Error> {
    let socket = config.socket_path.clone();
    let policy = confinement::policy(config.seccomp);
    let landlock = config.landlock.clone();
    let backend = Arc::new(backend::VsockBackend::new(config));
    let wired = backend.clone();
    microagent_daemon_kit::serve::serve(
        "microagent-vhost-vsock",
        &socket,
        backend,
        &policy,
        &landlock,
        |epolls| {
            let worker = epolls.first().ok_or(backend::Error::NotStarted)?;
            wired.start(*worker)
        },
    )?;
    Ok(())
}
