//! Snapshots of a VM: what they hold, how they are written and how they are checked.
//!
//! A snapshot is a directory of files: `manifest.json` ([`manifest::Manifest`]:
//! format version, kernel/initrd sha256, command line, CPU identity, vCPUs, memory,
//! devices, and the size and sha256 of every other file), `state.json`
//! ([`SnapshotState`]: KVM VM and vCPU state, transports, serial and i8042) and `memory.bin` (guest memory, sparse:
//! only populated pages, see [`memory`]), and one `device-N.state` per virtio device
//! (the daemon's own state from VHOST_USER_SET_DEVICE_STATE_FD SAVE). It is written into a temporary directory,
//! fsynced and renamed into place ([`dir::write`]), so it exists whole or not at all.
//! Every refusal and failure carries a stable `snapshot.*` code ([`Error::code`]).

pub mod dir;
pub mod manifest;
pub mod memory;
pub mod rings;
pub mod state;

use serde::{Deserialize, Serialize};
use std::io;
use std::path::PathBuf;

/// Everything restored besides memory, kept in `state.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub vm: state::VmState,
    pub vcpus: Vec<state::VcpuState>,
    /// Each virtio-mmio transport, in manifest order.
    pub devices: Vec<crate::devices::virtio_mmio::TransportState>,
    /// The serial port and the i8042 (added in format 1.1: older snapshots restore
    /// them fresh).
    #[serde(default)]
    pub legacy: crate::devices::legacy::LegacyState,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} already exists; choose a new snapshot directory")]
    Exists(PathBuf),
    #[error("the parent of {0} is not a directory; create it first")]
    BadDir(PathBuf),
    #[error("saving device {index}: {message}; the VM keeps running")]
    DeviceState { index: usize, message: String },
    #[error("not enough space in {dir} ({step}); free space and retry: {source}")]
    NoSpace {
        dir: PathBuf,
        step: &'static str,
        source: io::Error,
    },
    #[error("writing the snapshot ({step}) in {dir}: {source}")]
    Write {
        dir: PathBuf,
        step: &'static str,
        source: io::Error,
    },
    #[error("encoding {what}: {message}")]
    Encode { what: &'static str, message: String },
    #[error("saving vCPU and VM state: {0}")]
    Capture(state::Error),
    #[error("saving vCPU state: {0}")]
    VcpuThreads(String),
    #[error("the VM is stopping; nothing to snapshot")]
    Stopping,
    #[error("{0} is missing; the snapshot is incomplete")]
    FileMissing(PathBuf),
    #[error("{path} is {actual} bytes, the manifest says {expected}; the snapshot is truncated or damaged")]
    FileTruncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path} does not match its checksum in the manifest; the snapshot is damaged")]
    ChecksumMismatch { path: PathBuf },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} cannot be parsed: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "snapshot format {major}.{minor} is newer than this VMM reads ({supported}.x); \
         restore it with a newer microagent-vmm"
    )]
    FormatUnsupported {
        major: u32,
        minor: u32,
        supported: u32,
    },
    #[error(
        "{what} {path} has sha256 {actual}, the snapshot was taken with {expected}; \
         restore with the same {what}"
    )]
    ArtifactMismatch {
        what: &'static str,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "this host's CPU ({actual}) differs from the snapshot's ({expected}); restore on a \
         host with the same CPU"
    )]
    CpuMismatch { expected: String, actual: String },
    #[error(
        "the snapshot has devices [{expected}] but [{actual}] were given; pass the same \
         kinds of device sockets, in the same order"
    )]
    DeviceMismatch { expected: String, actual: String },
    #[error("restoring {what}: {message}")]
    Restore { what: &'static str, message: String },
    #[error("{0}")]
    Rings(#[from] rings::Error),
}

impl Error {
    /// The stable code scripts match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Exists(_) => "snapshot.exists",
            Self::BadDir(_) => "snapshot.bad_dir",
            Self::DeviceState { .. } => "snapshot.device_state",
            Self::NoSpace { .. } => "snapshot.no_space",
            Self::Write { .. } | Self::Encode { .. } => "snapshot.write_failed",
            Self::Capture(_) | Self::VcpuThreads(_) => "snapshot.capture_failed",
            Self::Stopping => "snapshot.vm_stopping",
            Self::FileMissing(_) => "snapshot.file_missing",
            Self::FileTruncated { .. } => "snapshot.file_truncated",
            Self::ChecksumMismatch { .. } => "snapshot.checksum_mismatch",
            Self::Read { .. } => "snapshot.read_failed",
            Self::Corrupt { .. } => "snapshot.corrupt",
            Self::FormatUnsupported { .. } => "snapshot.format_unsupported",
            Self::ArtifactMismatch { what: "kernel", .. } => "snapshot.kernel_mismatch",
            Self::ArtifactMismatch { .. } => "snapshot.initrd_mismatch",
            Self::CpuMismatch { .. } => "snapshot.cpu_mismatch",
            Self::DeviceMismatch { .. } => "snapshot.device_mismatch",
            Self::Restore { .. } => "snapshot.restore_failed",
            Self::Rings(_) => "snapshot.rings_inconsistent",
        }
    }
}
