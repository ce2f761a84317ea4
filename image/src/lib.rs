//! OCI images for microagent workspaces:
//!
//! - [`digest`]: digests parsed strictly before they name any file.
//! - [`reference`]: image references, normalised the way Docker does
//!   (`alpine:3.20` is `docker.io/library/alpine:3.20`).
//! - [`unpack`]: applying layers in order onto a directory, with OCI whiteouts, and
//!   refusing entries that would escape the root.
//! - [`rootfs`]: an ext4 root disk made from a directory with `mke2fs -d`, sparse.
//! - [`store`]: the content-addressed, digest-verified blob store.
//! - [`pull`]: pulling from registries (oci-client) and building root disks, with
//!   credentials from Docker's config ([`auth`]); each blob streamed to a resumable
//!   partial file and verified ([`download`]), with events for progress ([`progress`]).
//! - [`inspect`]: what `image inspect` shows of a stored image.
//! - [`platform`]: `linux/amd64`-style platforms, which manifest of an index is pulled.
//! - [`tls`]: CA certificates for registries (Docker's certs.d, `--ca-cert`).
//! - [`stale`]: temporary files of dead processes, removed on the next run.
//! - [`source`]: `--image` values: registries, `oci:DIR[:TAG]`, `oci-archive:FILE`,
//!   `docker-archive:FILE`.

pub mod auth;
pub mod digest;
pub mod download;
pub mod inspect;
pub mod platform;
pub mod progress;
pub mod pull;
pub mod reference;
pub mod rootfs;
pub mod source;
pub mod stale;
pub mod store;
pub mod tls;
pub mod unpack;
