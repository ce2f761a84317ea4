//! The state `microagent-vhost-blk` saves for a snapshot.
//!
//! Requests are completed synchronously while their ring is locked, so once the
//! frontend has stopped the rings (GET_VRING_BASE) nothing is in flight; ring indices
//! travel through GET/SET_VRING_BASE. What remains is what the saved guest's driver
//! was negotiated against, which a restored daemon must match.

use serde::{Deserialize, Serialize};

pub const KIND: &str = "vhost-blk";
pub const VERSION: microagent_device_state::Version =
    microagent_device_state::Version { major: 1, minor: 0 };

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

impl BlkState {
    pub fn encode(&self) -> Result<Vec<u8>, microagent_device_state::Error> {
        microagent_device_state::encode(KIND, VERSION, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, microagent_device_state::Error> {
        microagent_device_state::decode(KIND, VERSION.major, bytes)
    }
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
