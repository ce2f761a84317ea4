//! The state `microagent-vhost-blk` saves for a snapshot.
//!
//! Requests are completed synchronously while their ring is locked, so once the
//! frontend has stopped the rings (GET_VRING_BASE) nothing is in flight; ring indices
//! travel through GET/SET_VRING_BASE. What remains is what the saved guest's driver
//! was negotiated against, which a restored daemon must match.

use microagent_daemon_kit::state::{Saved, Version};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkState {
    /// Virtio features the driver acknowledged.
    pub acked_features: u64,
    /// Disk capacity in 512-byte sectors the driver saw.
    pub sectors: u64,
    pub read_only: bool,
    pub queues: u16,
    pub serial: String,
}

impl Saved for BlkState {
    const KIND: &'static str = "vhost-blk";
    const VERSION: Version = Version { major: 1, minor: 0 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_serialize_restore_round_trip() {
        let state = BlkState {
            acked_features: 1 << 32 | 1 << 9,
            sectors: 2048,
            read_only: false,
            queues: 2,
            serial: "disk-7".into(),
        };
        assert_eq!(BlkState::decode(&state.encode().unwrap()).unwrap(), state);
    }
}
