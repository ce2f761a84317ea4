//! The state `microagent-vhost-vsock` saves for a snapshot. Connections are not saved:
//! after a restore every connection is reset (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), as the
//! host ends of old connections do not survive the process anyway.

use serde::{Deserialize, Serialize};

pub const KIND: &str = "vhost-vsock";
pub const VERSION: microagent_device_state::Version =
    microagent_device_state::Version { major: 1, minor: 0 };

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub acked_features: u64,
}

impl VsockState {
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
        let state = VsockState {
            guest_cid: 3,
            acked_features: 1 << 32,
        };
        assert_eq!(VsockState::decode(&state.encode().unwrap()).unwrap(), state);
    }
}
