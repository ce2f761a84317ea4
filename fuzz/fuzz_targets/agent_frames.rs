//! The agent protocol, both directions.
//!
//! - Frame decoding (`frame::read_frame`) of a stream of frames, each control frame
//!   parsed as a `HostMessage` (what the guest agent's session reads) and as an
//!   `AgentMessage` (what the host reads); a decoded frame must re-encode to the same
//!   bytes and a parsed message must survive a JSON round trip.
//! - The host side's real client (`client::Connection`) over a socket pair whose peer
//!   sent the fuzzer's bytes: the version handshake, then `exec`, `read_file` (with its
//!   size limit) or `shutdown`.
//!
//! Input: byte 0 picks the mode (0-3: frames; 4: exec; 5: read_file; 6: shutdown); the
//! rest is what the other side sent.
//!
//! The guest agent's own session (guest-agent/src/session.rs) runs commands and touches
//! the guest's files, so it is not driven here; what it does with the bytes it reads is
//! `read_frame` + `parse::<HostMessage>`, which is.

#![no_main]

use libfuzzer_sys::fuzz_target;
use microagent_agent_protocol::client::{Connection, Error, Exit};
use microagent_agent_protocol::frame::{read_frame, write_frame, Error as FrameError};
use microagent_agent_protocol::message::{AgentMessage, ExecRequest, HostMessage};
use std::io::{Cursor, Write};
use std::os::unix::net::UnixStream;

const READ_LIMIT: usize = 4096;

fn frames(stream: &[u8]) {
    let mut cursor = Cursor::new(stream);
    for _ in 0..10_000 {
        let Ok(frame) = read_frame(&mut cursor) else {
            return;
        };
        let mut encoded = Vec::new();
        write_frame(&mut encoded, frame.kind, &frame.payload).expect("re-encoding a frame");
        let again = read_frame(&mut Cursor::new(&encoded)).expect("decoding a re-encoded frame");
        assert_eq!(again, frame);
        if let Ok(message) = frame.parse::<HostMessage>() {
            let json = serde_json::to_vec(&message).expect("serializing a HostMessage");
            let back: HostMessage = serde_json::from_slice(&json).expect("HostMessage round trip");
            assert_eq!(back, message);
        }
        if let Ok(message) = frame.parse::<AgentMessage>() {
            let json = serde_json::to_vec(&message).expect("serializing an AgentMessage");
            let back: AgentMessage =
                serde_json::from_slice(&json).expect("AgentMessage round trip");
            assert_eq!(back, message);
        }
    }
}

fn client(mode: u8, from_agent: &[u8]) {
    // All of it is written before anything reads: it must fit the socket buffer.
    if from_agent.len() > 64 * 1024 {
        return;
    }
    let Ok((ours, mut theirs)) = UnixStream::pair() else {
        return;
    };
    // Everything the agent says is in the socket before the client reads; then EOF.
    if theirs.write_all(from_agent).is_err() {
        return;
    }
    let _ = theirs.shutdown(std::net::Shutdown::Write);
    let Ok(conn) = Connection::over(ours) else {
        return;
    };
    match mode {
        4 => {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            if let Ok(exit) =
                conn.exec(ExecRequest::default(), std::io::empty(), &mut out, &mut err)
            {
                if let Exit::Signal(_) = exit {
                    assert!((129..=255).contains(&exit.code()), "{exit:?}");
                }
            }
        }
        5 => match conn.read_file("/fuzz", READ_LIMIT) {
            Ok(data) => assert!(data.len() <= READ_LIMIT),
            Err(Error::TooLarge { limit }) => assert_eq!(limit, READ_LIMIT),
            Err(Error::Frame(FrameError::TooLarge(_))) | Err(_) => {}
        },
        _ => {
            let _ = conn.shutdown();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 7 {
        0..=3 => frames(rest),
        m => client(m, rest),
    }
});
