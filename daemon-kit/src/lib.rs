//! What every microagent vhost-user daemon shares, so that a daemon is mostly its device
//! logic (vhost-device is the model of what not to do: every daemon there copies
//! `start_backend`).
//!
//! - [`serve`]: the socket, one frontend, exit when it goes away; `main` for the binary.
//! - [`gate`]: relays vhost-user messages between the frontend and vhost-user-backend's
//!   handler, and refuses the ones [`checks`] rejects before the handler acts on them.
//! - [`checks`]: what a message must satisfy (memory regions inside their files, split
//!   ring sizes, non-blocking descriptors).
//! - [`memory`]: the guest memory the frontend shared, as the workers read it.
//! - [`config_space`]: VHOST_USER_GET_CONFIG slicing.
//! - [`worker`]: exit events for the worker threads.
//! - [`busy_poll`]: adaptive busy polling before a worker sleeps.
//! - [`confine`]: seccomp profiles of the main and worker thread kinds, no_new_privs,
//!   no capabilities, entered once set-up is over.
//!
//! Device state (the container and SET_DEVICE_STATE_FD/CHECK_DEVICE_STATE) lives in
//! `microagent-device-state`, re-exported here as [`state`].

pub mod busy_poll;
pub mod checks;
pub mod config_space;
pub mod confine;
pub mod gate;
pub mod memory;
pub mod serve;
pub mod worker;

pub use microagent_device_state as state;

/// Guest memory as vhost-user-backend hands it to a backend.
pub type Mem = vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap>;
