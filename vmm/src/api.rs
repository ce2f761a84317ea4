//! The control socket: one JSON object per line in each direction.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"pause"}`, `{"cmd":"resume"}`,
//! `{"cmd":"snapshot","dir":D}` (see [`crate::snapshot`]; refusals carry `snapshot.*`
//! codes), `{"cmd":"shutdown","timeout_ms":N}` (wait up to N ms for the guest to power off by
//! itself, then stop it; default 0; any u64). Replies: `{"ok":true,...}` or
//! `{"ok":false,"error":{"code":...,"message":...}}`, one per request line, in order;
//! several requests may be sent without waiting for replies. A line longer than
//! [`crate::control::MAX_LINE`] is answered with `api.line_too_long` and the
//! connection closed.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    Shutdown {
        #[serde(default)]
        timeout_ms: u64,
    },
    /// Pause (if running), save the VM into a new directory `dir`, resume (if it was
    /// running).
    Snapshot {
        dir: PathBuf,
    },
}

#[derive(Debug, Serialize)]
pub struct DeviceStatus {
    pub kind: &'static str,
    pub socket: String,
    pub failed: bool,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub state: &'static str,
    pub vcpus: usize,
    pub memory_mib: u64,
    pub devices: Vec<DeviceStatus>,
}

/// The reply to a snapshot: the VM's status afterwards and what was written.
#[derive(Debug, Serialize)]
pub struct SnapshotReply {
    #[serde(flatten)]
    pub status: Status,
    pub snapshot: crate::snapshot::dir::Written,
}

#[derive(Debug, Serialize)]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
}

/// The reply to a line longer than [`crate::control::MAX_LINE`]; the client is then
/// dropped.
pub fn line_too_long() -> ApiError {
    ApiError {
        code: "api.line_too_long",
        message: format!(
            "request line longer than {} bytes; the connection is closed",
            crate::control::MAX_LINE
        ),
    }
}

/// Parses one request line; the error is ready to send back.
pub fn parse(line: &str) -> Result<Request, ApiError> {
    serde_json::from_str(line).map_err(|e| ApiError {
        code: "api.bad_request",
        message: format!("cannot parse request: {e}"),
    })
}

pub fn reply_ok(body: &impl Serialize) -> String {
    let mut value = serde_json::to_value(body).unwrap_or(serde_json::Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.insert("ok".into(), true.into());
    }
    format!("{value}\n")
}

pub fn reply_err(error: &ApiError) -> String {
    format!(
        "{}\n",
        serde_json::json!({"ok": false, "error": {"code": error.code, "message": error.message}})
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_are_reported() {
        assert_eq!(parse(r#"{"cmd":"pause"}"#).unwrap(), Request::Pause);
        assert_eq!(
            parse(r#"{"cmd":"shutdown","timeout_ms":500}"#).unwrap(),
            Request::Shutdown { timeout_ms: 500 }
        );
        assert_eq!(
            parse(r#"{"cmd":"shutdown"}"#).unwrap(),
            Request::Shutdown { timeout_ms: 0 }
        );
        let err = parse(r#"{"cmd":"explode"}"#).unwrap_err();
        assert_eq!(err.code, "api.bad_request");
        let reply: serde_json::Value = serde_json::from_str(&reply_err(&err)).unwrap();
        assert_eq!(reply["ok"], false);
        assert_eq!(reply["error"]["code"], "api.bad_request");
    }
}
