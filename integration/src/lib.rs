//! Test rigs for microagent (see `../shared/TESTING.md` in the project docs):
//!
//! - [`qemu`]: boots the project's guest kernel and an initramfs under QEMU with
//!   software emulation, with vhost-user blk, vsock and net devices on unix sockets.
//! - [`storage_daemon`]: `qemu-storage-daemon` exporting a file as vhost-user-blk, a
//!   backend we did not write.
//! - [`initramfs`]: a newc cpio writer with busybox-static, for test guests.
//! - [`frontend`]: a host-side vhost-user frontend over memfd guest memory, for driving
//!   a daemon's virtqueues directly (no guest).
//! - [`vsock_guest`]: the harness as a guest's virtio-vsock driver.
//! - [`daemon`]: microagent's own daemons as real processes.
//! - [`debian_rootfs`]: a cached Debian bookworm root disk (debootstrap) for workload
//!   tests.
//! - [`agent`]: the static guest agent and a busybox root disk for it.
//! - [`cli`]: the `microagent` command driven with its own home, errors checked by code.
//! - [`process`]: guards that kill what a test started, also when the test fails.
//! - [`fuse`]: a FUSE mount whose server can be stopped, for a disk that stops answering.
//! - [`kernel`]: where the cached guest kernel is.
//! - [`ext4`]: debugfs on ext4 images.
//! - [`registry`]: a real OCI registry on loopback and test images to push to it.
//! - [`registry_push`]: pushes over the distribution API, streamed from files, and a
//!   generated image with one large layer.
//! - [`flaky_proxy`]: a proxy in front of the registry that stalls or drops a blob's
//!   download, and records the range requests it forwards.
//! - [`vmm`]: `microagent-vmm` as a process, and the freestanding test guest it boots.
//! - [`nested`]: real Linux under `microagent-vmm` inside an L1 machine with emulated
//!   AMD SVM, for hosts whose KVM cannot run Linux guests.
//! - [`net_guest`]: the harness as a guest's virtio-net driver, and frame builders.
//! - [`net_services`]: HTTP, a sha256 sink and DNS on loopback for network tests.
//! - [`report`]: tests that could not run here are recorded, never passed silently.

pub mod agent;
pub mod cli;
pub mod daemon;
pub mod debian_rootfs;
pub mod ext4;
pub mod flaky_proxy;
pub mod frontend;
pub mod fuse;
pub mod initramfs;
pub mod kernel;
pub mod nested;
pub mod net_guest;
pub mod net_services;
pub mod process;
pub mod qemu;
pub mod registry;
pub mod registry_push;
pub mod report;
pub mod storage_daemon;
pub mod tap_net;
pub mod vmm;
pub mod vsock_guest;
