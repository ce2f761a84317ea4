//! The `microagent` command-line tool: workspaces made from OCI images, booted by
//! microagent-vmm with their devices served by the vhost-user daemons.
//!
//! - [`home`]: where state lives (`MICROAGENT_HOME`) and the cached guest kernel.
//! - [`kernel_info`]: a guest kernel's Linux version and build configuration hash.
//! - [`workspace`]: a workspace's configuration and files.
//! - [`runtime`]: starting and stopping a workspace's processes, and its state.
//! - [`initramfs`]: the cpio image that carries the agent as /init.
//! - [`snapshot`]: workspace snapshots (VM state plus a disk copy) by tag.
//! - [`restore`]: rollback in place and forks from a snapshot.
//! - [`lock`]: one command at a time per workspace, with a bounded wait.
//! - [`memory`]: guest memory checked against the host's.
//! - [`progress`]: pull progress as bars on a terminal or JSON lines for scripts.
//! - [`error`]: user-facing errors with stable codes.
//! - [`kill_point`]: debug-build points where tests make a command die mid-way.
//! - [`confinement`]: seccomp support, how confined running processes are, and
//!   seccomp kills, for `doctor` and crash reasons.

pub mod confinement;
pub mod error;
pub mod home;
pub mod initramfs;
pub mod kernel_info;
pub mod kill_point;
pub mod lock;
pub mod memory;
pub mod progress;
pub mod restore;
pub mod runtime;
pub mod snapshot;
pub mod workspace;
