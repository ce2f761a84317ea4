//! `microagent-vmm`: a minimal KVM virtual machine monitor. It owns vCPUs and guest
//! memory and nothing else a guest can touch: every device with guest-visible behaviour
//! is a vhost-user daemon behind a virtio-mmio transport.
//!
//! - [`config`]: flags checked into a [`config::VmmConfig`].
//! - [`memory`], [`layout`]: guest memory (a sealed memfd) and the address map.
//! - [`boot`], [`cpu`], [`mptable`]: kernel loading, boot information, vCPU
//!   architectural state, and the MP table through which Linux finds several CPUs.
//! - [`vcpu`]: vCPU threads, exits, pause/resume.
//! - [`devices`]: serial, i8042, virtio-mmio transports with vhost-user frontends.
//! - [`vm`]: building the VM and its event loop; [`api`]: the control socket's
//!   messages; [`control`]: its connections, served without blocking the loop.
//! - [`snapshot`]: snapshot state types, the manifest, sparse memory files, and the
//!   snapshot directory written whole or not at all.
//! - [`host`]: what this host's KVM can do (PVM detection).
//! - [`confinement`]: the seccomp allow-lists of the main and vCPU threads, entered
//!   once the VM is built (with no_new_privs and no capabilities).

pub mod api;
pub mod boot;
pub mod config;
pub mod confinement;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod host;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
