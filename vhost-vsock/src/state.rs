//! The state `microagent-vhost-vsock` saves for a snapshot. Connections are not saved:
//! after a restore every connection is reset (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), as the
//! host ends of old connections do not survive the process anyway.

use microagent_daemon_kit::state::{Saved, Version};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub acked_features: u64,
}

impl Saved for VsockState {
    const KIND: &'static str = "vhost-vsock";
    const VERSION: Version = Version { major: 1, minor: 0 };
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
