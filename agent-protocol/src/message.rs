//! Control messages. The host opens a connection, both sides exchange `Hello` with
//! their protocol version, then the host sends one request.

use serde::{Deserialize, Serialize};

/// How to run a command in the workspace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added to (and overriding) the agent's default environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the workspace root; `/` by default.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User name or numeric uid; root by default.
    #[serde(default)]
    pub user: Option<String>,
    /// Run on a pseudo-terminal of this size (stdout and stderr then arrive together as
    /// stdout); pipes when absent.
    #[serde(default)]
    pub tty: Option<TtySize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage {
    Hello {
        version: u32,
    },
    Exec(ExecRequest),
    /// No more stdin: the command's stdin is closed.
    CloseStdin,
    /// Deliver a signal to the command.
    Signal {
        signal: i32,
    },
    /// The terminal of a TTY exec changed size.
    Resize(TtySize),
    /// Sync filesystems, unmount the root disk and power the VM off.
    Shutdown,
    /// Secrets for /run/secrets (a tmpfs, files mode 0400); one `Secret` frame with the
    /// value follows for each name, in order.
    PutSecrets {
        names: Vec<String>,
    },
    /// Before a snapshot: sync filesystems, wipe and unmount /run/secrets, drop caches.
    PrepareSnapshot,
    /// After a restore or fork: a new hostname and machine-id, and fresh entropy for the
    /// kernel's random pool (added, then the CRNG reseeded).
    SetIdentity {
        hostname: String,
        machine_id: String,
        entropy: Vec<u8>,
        /// A new MAC for the network device, `52:54:00:12:34:56` style (none: keep it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
    },
    /// Write a file (created or truncated); `File` frames follow, then an empty one.
    WriteFile {
        path: String,
        mode: u32,
    },
    /// Read a file: the agent answers with `File` frames, then an empty one, then `Done`.
    ReadFile {
        path: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    Hello {
        version: u32,
        agent: String,
        /// The guest's vsock CID as its kernel sees it (IOCTL_VM_SOCKETS_GET_LOCAL_CID);
        /// a fork's differs from its source's once the transport reset was read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cid: Option<u32>,
    },
    Started {
        pid: u32,
    },
    /// The command ended: its exit code, or the signal that killed it.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    Error {
        code: String,
        message: String,
    },
    /// A shutdown request was accepted; the VM powers off next.
    ShuttingDown,
    /// A request other than exec finished.
    Done,
}

/// Error codes the agent reports.
pub mod codes {
    pub const VERSION_MISMATCH: &str = "agent.version_mismatch";
    pub const NOT_FOUND: &str = "exec.not_found";
    pub const NOT_EXECUTABLE: &str = "exec.cannot_run";
    pub const BAD_REQUEST: &str = "agent.bad_request";
    pub const EXEC_FAILED: &str = "exec.failed";
    pub const SECRETS: &str = "agent.secrets_failed";
    pub const IDENTITY: &str = "agent.identity_failed";
    pub const FILE: &str = "agent.file_failed";
}
