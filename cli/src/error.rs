//! User-facing errors: a stable code for scripts and a sentence a person can act on.
//! `--json` prints `{"error":{"code":...,"message":...}}`; the exit status is 125.

use serde::Serialize;
use std::borrow::Cow;

/// Exit status for microagent's own errors (Docker's convention).
pub const EXIT_ERROR: u8 = 125;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CliError {
    /// Ours are literals; codes relayed from the VMM's control socket are owned.
    pub code: Cow<'static, str>,
    pub message: String,
}

impl CliError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Cow::Borrowed(code),
            message: message.into(),
        }
    }

    /// An error whose code comes from another component (the VMM's `snapshot.*`).
    pub fn relayed(code: String, message: impl Into<String>) -> Self {
        Self {
            code: Cow::Owned(code),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for CliError {}

pub type Result<T> = std::result::Result<T, CliError>;
