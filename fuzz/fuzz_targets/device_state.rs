//! Device-state containers (`microagent_device_state::decode`), as each daemon reads them
//! on VHOST_USER_SET_DEVICE_STATE_FD(LOAD): vhost-blk, vhost-vsock and vhost-net state.
//!
//! Input: byte 0 picks the daemon (mod 3) and whether the rest is a whole container
//! (bit 7 clear: header checks, then the payload) or only a payload, sealed in a valid
//! header with its real length and sha256 first (bit 7 set), so that the fuzzer reaches
//! the JSON of every state type without having to forge a checksum. Whatever decodes
//! must encode and decode back to the same state.

#![no_main]

use libfuzzer_sys::fuzz_target;
use microagent_device_state::Saved;
use microagent_vhost_blk::state::BlkState;
use microagent_vhost_net::state::NetState;
use microagent_vhost_vsock::state::VsockState;
use std::fmt::Debug;

fn check<S: Saved + PartialEq + Debug>(sealed: bool, bytes: &[u8]) {
    let container = if sealed {
        // `encode` of raw JSON bytes: the same header a daemon writes.
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else {
            return check_raw::<S>(bytes);
        };
        match microagent_device_state::encode(S::KIND, S::VERSION, &value) {
            Ok(c) => c,
            Err(_) => return,
        }
    } else {
        bytes.to_vec()
    };
    check_raw::<S>(&container);
}

fn check_raw<S: Saved + PartialEq + Debug>(container: &[u8]) {
    if let Ok(state) = S::decode(container) {
        let again = state.encode().expect("encoding a decoded state");
        assert_eq!(S::decode(&again).expect("decoding an encoded state"), state);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let sealed = selector & 0x80 != 0;
    match selector % 3 {
        0 => check::<BlkState>(sealed, rest),
        1 => check::<VsockState>(sealed, rest),
        _ => check::<NetState>(sealed, rest),
    }
});
