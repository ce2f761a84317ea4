//! `microagent-agent`: the one program microagent puts into a guest. As PID 1 of the
//! initramfs it mounts the API filesystems and the root disk, then serves the host over
//! vsock: each connection runs one request (an exec with streamed stdio, or shutdown).
//! Commands run chrooted into the root disk while the agent stays PID 1 and reaps
//! every orphan.
//!
//! - [`init`]: mounts, root disk, hostname, power-off; [`net`]: static networking.
//! - [`vsock`]: the AF_VSOCK listener.
//! - [`reaper`]: the one `waitpid(-1)` loop, handing statuses to their execs.
//! - [`session`]: one host connection: handshake and request dispatch.
//! - [`exec`]: running a command with its stdio streamed over the connection.
//! - [`secrets`], [`identity`], [`files`]: the other requests.

pub mod exec;
pub mod files;
pub mod identity;
pub mod init;
pub mod net;
pub mod reaper;
pub mod secrets;
pub mod session;
pub mod vsock;

/// Writes a line to the console (stderr of PID 1 is the console).
pub fn console(line: &str) {
    eprintln!("microagent-agent: {line}");
}
