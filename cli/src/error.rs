//! User-facing errors: a stable code for scripts and a sentence a person can act on.
//! `--json` prints `{"error":{"code":...,"message":...}}`; the exit status is 125.

use serde::Serialize;

/// Exit status for microagent's own errors (Docker's convention).
pub const EXIT_ERROR: u8 = 125;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CliError {
    pub code: &'static str,
    pub message: String,
}

impl CliError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
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
