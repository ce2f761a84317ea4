//! The state `microagent-vhost-net` saves for a snapshot. Flows are not saved: their
//! host sockets do not survive the process, so after a LOAD the stack answers the
//! guest's old connections with resets and new ones work.

use microagent_daemon_kit::state::{Saved, Version};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC the guest read from config space.
    pub mac: [u8; 6],
    pub acked_features: u64,
}

impl Saved for NetState {
    const KIND: &'static str = "vhost-net";
    const VERSION: Version = Version { major: 1, minor: 0 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_serialize_restore_round_trip() {
        let state = NetState {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            acked_features: 1 << 32 | 1 << 15,
        };
        assert_eq!(NetState::decode(&state.encode().unwrap()).unwrap(), state);
    }
}
