//! The protocol between the host (`microagent exec`) and `microagent-agent` in the guest,
//! over one vsock stream per exec.
//!
//! - [`frame`]: length-prefixed frames: JSON control messages and raw stdio data.
//! - [`message`]: the control messages, shared by both sides.
//! - [`client`]: the host side: connect through the hybrid vsock socket, run a command.
//! - [`liveness`]: the host side's probes of a silent command's guest.

pub mod client;
pub mod frame;
pub mod liveness;
pub mod message;

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Bumped on any incompatible change; both sides refuse a different version.
pub const PROTOCOL_VERSION: u32 = 1;
