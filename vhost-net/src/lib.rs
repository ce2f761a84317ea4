//! `microagent-vhost-net`: a vhost-user net device with a user-mode network, a private
//! network per daemon in the manner of QEMU's slirp: guest 10.0.2.15/24 by DHCP,
//! gateway 10.0.2.2 (the host's loopback), DNS 10.0.2.3 (the host's resolvers), guest
//! TCP and UDP flows as host sockets, published host ports forwarded in. Or, with
//! `--mode tap` (root), a tap device in a network namespace whose kernel is the gateway
//! for the same addresses (the daemon still answers DHCP).
//!
//! - [`config`]: flags checked into a [`config::NetConfig`].
//! - [`confinement`]: this daemon's syscalls beyond daemon-kit's seccomp profiles.
//! - [`frame`]: guest frames sorted and UDP frames built (pure functions).
//! - [`dhcp`]: the DHCP server (pure function).
//! - [`link`]: the frame queues smoltcp sees as its Ethernet device.
//! - [`nat`]: where guest flows go on the host, and flow limits.
//! - [`stack`]: the TCP/IP stack (smoltcp) and the flows.
//! - [`tap`]: tap mode's data path: a tap device in a network namespace.
//! - [`netns`]: tap mode's host side: the namespace, veth pair and NAT, made and removed
//!   by `microagent`.
//! - [`network`]: the user network or the tap, as the backend sees them.
//! - [`virtio`]: the virtio-net header and config space.
//! - [`backend`]: the vhost-user backend: queues, events, device state.
//! - [`state`]: the serialized device state.
//!
//! Serving, the checks on the frontend's messages, memory and state transfer come from
//! `microagent-daemon-kit`.

pub use smoltcp;

pub mod backend;
pub mod config;
pub mod confinement;
pub mod dhcp;
pub mod frame;
pub mod link;
pub mod nat;
pub mod netns;
pub mod network;
pub mod stack;
pub mod state;
pub mod tap;
pub mod virtio;

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Serve(#[from] microagent_daemon_kit::serve::Error),
    #[error(transparent)]
    Publish(#[from] stack::Error),
    #[error(transparent)]
    Tap(#[from] tap::Error),
}

impl Error {
    /// The stable code of an error a user can act on.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::Tap(e) => Some(e.code()),
            Self::Serve(_) | Self::Publish(_) => None,
        }
    }
}

/// Serves one frontend on the configured socket, returns when it disconnects.
pub fn serve(config: config::NetConfig) -> Result<(), Error> {
    let socket = config.socket_path.clone();
    let policy = confinement::policy(config.seccomp);
    let landlock = config.landlock.clone();
    // Opened first: the daemon drops every capability before it starts its threads.
    let attachment = match config.mode {
        config::Mode::User => network::Attachment::User(stack::publish(&config.publish)?),
        config::Mode::Tap => {
            network::Attachment::Tap(tap::open(&config.tap, config.netns.as_deref())?)
        }
    };
    let backend = Arc::new(backend::NetBackend::new(config, attachment));
    let wired = backend.clone();
    microagent_daemon_kit::serve::serve(
        "microagent-vhost-net",
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
