//! The VMM's control socket: bytes as a client sends them, fed in chunks to
//! `control::split_lines` (what `Server::read` does with each read), every complete line
//! parsed by `api::parse` as the event loop does, and every reply (`reply_ok`,
//! `reply_err`, `line_too_long`) checked to be one JSON line.
//!
//! Input: byte 0 is the chunk size (1-256); the rest is the client's byte stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use microagent_vmm::api;
use microagent_vmm::control::{split_lines, MAX_LINE};

fn one_json_line(reply: &str) {
    let body = reply
        .strip_suffix('\n')
        .expect("a reply ends with a newline");
    assert!(!body.contains('\n'), "a reply is one line: {reply:?}");
    serde_json::from_str::<serde_json::Value>(body).expect("a reply is JSON");
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;
    let mut input = Vec::new();
    for piece in stream.chunks(chunk) {
        input.extend_from_slice(piece);
        let read = split_lines(&mut input);
        assert!(
            input.len() <= MAX_LINE,
            "unfinished input kept past the line limit"
        );
        assert!(
            !input.contains(&b'\n'),
            "a complete line was left in the input"
        );
        for line in read.lines {
            match api::parse(line.trim()) {
                Ok(request) => {
                    let again =
                        api::parse(request.to_line().trim()).expect("a request's own line parses");
                    assert_eq!(again, request);
                    one_json_line(&api::reply_ok(&serde_json::json!({ "state": "running" })));
                }
                Err(error) => {
                    assert_eq!(error.code, "api.bad_request");
                    one_json_line(&api::reply_err(&error));
                }
            }
        }
        if read.overflow {
            one_json_line(&api::reply_err(&api::line_too_long()));
        }
    }
});
