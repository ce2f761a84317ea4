//! OCI images for microagent workspaces (the pieces that do not need a registry):
//!
//! - [`reference`]: image references, normalised the way Docker does
//!   (`alpine:3.20` is `docker.io/library/alpine:3.20`).
//! - [`unpack`]: applying layers in order onto a directory, with OCI whiteouts, and
//!   refusing entries that would escape the root.
//! - [`rootfs`]: an ext4 root disk made from a directory with `mke2fs -d`, sparse.
//!
//! Pulling from registries and archives is still to come (issue 7).

pub mod reference;
pub mod rootfs;
pub mod unpack;
