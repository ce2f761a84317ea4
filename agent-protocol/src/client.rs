//! The host side: reach the agent through microagent-vhost-vsock's hybrid socket
//! (`CONNECT <port>` / `OK <hostport>`), check versions, run one command.

use crate::frame::{self, read_frame, write_control, write_frame, Kind};
use crate::liveness::{self, HoldCheck, Liveness, Lost, Watched, LIVENESS};
use crate::message::{codes, AgentMessage, ExecRequest, HostMessage};
use crate::{AGENT_PORT, PROTOCOL_VERSION};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the agent did not answer on {path} within {timeout:?}: {last}")]
    Unreachable {
        path: String,
        timeout: Duration,
        last: String,
    },
    #[error("agent speaks protocol {agent}, this host speaks {PROTOCOL_VERSION}")]
    VersionMismatch { agent: u32 },
    #[error("agent: {code}: {message}")]
    Agent { code: String, message: String },
    #[error(
        "the agent took {request} but did not answer within {waited:?}: the guest may be hung \
         or overloaded (microagent logs shows its console; halt or restart it)"
    )]
    NoReply {
        request: &'static str,
        waited: Duration,
    },
    #[error(transparent)]
    Unresponsive(#[from] Lost),
    #[error("unexpected message from the agent: {0:?}")]
    Unexpected(AgentMessage),
    #[error("the file the agent sends is larger than the {limit} bytes asked for")]
    TooLarge { limit: usize },
    #[error(transparent)]
    Frame(#[from] frame::Error),
    #[error("stdio: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// The exit status a shell would report for a command that could not start
    /// (Docker's conventions): 127 not found, 126 cannot run, 125 our own errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Agent { code, .. } if code == codes::NOT_FOUND => 127,
            Self::Agent { code, .. } if code == codes::NOT_EXECUTABLE => 126,
            _ => 125,
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The status a shell reports: the code, or 128 + the signal. The signal comes from
    /// the guest: anything outside Linux's 1..=64 is reported as 255, never overflowed.
    pub fn code(self) -> i32 {
        match self {
            Self::Code(c) => c,
            Self::Signal(s @ 1..=64) => 128 + s,
            Self::Signal(_) => 255,
        }
    }
}

/// What the agent said of itself when the connection opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// The agent's crate version.
    pub agent: String,
    /// The guest's vsock CID, when the agent could read it.
    pub cid: Option<u32>,
}

/// How long the agent may take to answer a request (the start of a command, a
/// shutdown, a file, secrets): a hung guest must not hang the host's command with it.
/// A running command's output has no limit.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// A connection to the agent that has passed the version check.
pub struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    info: AgentInfo,
    reply_timeout: Duration,
    /// The vsock daemon's host socket, for liveness probes while a command runs (None
    /// for [`Connection::over`]: no probes).
    uds: Option<PathBuf>,
    liveness: Liveness,
    held: Option<HoldCheck>,
}

impl Connection {
    /// Connects through `uds` (the vsock daemon's host socket), retrying until the agent
    /// answers or `timeout` passes.
    pub fn open(uds: &Path, timeout: Duration) -> Result<Self, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match Self::try_open(uds) {
                Ok(mut conn) => {
                    conn.uds = Some(uds.to_owned());
                    return Ok(conn);
                }
                Err(Error::VersionMismatch { agent }) => {
                    return Err(Error::VersionMismatch { agent })
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(Error::Unreachable {
                    path: uds.display().to_string(),
                    timeout,
                    last,
                });
            }
            sleep(Duration::from_millis(50));
        }
    }

    fn try_open(uds: &Path) -> Result<Self, Error> {
        let (reader, writer) = dial(uds)?;
        Self::handshake(reader, writer)
    }

    /// Opens a connection over a stream that already reaches the agent (what follows
    /// the vsock daemon's `OK` line): the version check, then commands.
    pub fn over(stream: UnixStream) -> Result<Self, Error> {
        let writer = stream.try_clone()?;
        Self::handshake(BufReader::new(stream), writer)
    }

    fn handshake(mut reader: BufReader<UnixStream>, mut writer: UnixStream) -> Result<Self, Error> {
        write_control(
            &mut writer,
            &HostMessage::Hello {
                version: PROTOCOL_VERSION,
            },
        )?;
        let info = match read_frame(&mut reader)?.parse()? {
            AgentMessage::Hello {
                version,
                agent,
                cid,
            } if version == PROTOCOL_VERSION => AgentInfo { agent, cid },
            AgentMessage::Hello { version, .. } => {
                return Err(Error::VersionMismatch { agent: version })
            }
            other => return Err(Error::Unexpected(other)),
        };
        // Commands may run for long: no read timeout from here on.
        reader.get_ref().set_read_timeout(None)?;
        Ok(Self {
            reader,
            writer,
            info,
            reply_timeout: REPLY_TIMEOUT,
            uds: None,
            liveness: LIVENESS,
            held: None,
        })
    }

    /// Other probe timings than [`LIVENESS`] for a running command (`liveness`).
    pub fn with_liveness(mut self, liveness: Liveness) -> Self {
        self.liveness = liveness;
        self
    }

    /// While `held` says the guest is held on purpose (paused), a silent command's
    /// agent is not probed and the silence never counts against it.
    pub fn with_hold_check(mut self, held: impl Fn() -> bool + Send + 'static) -> Self {
        self.held = Some(Box::new(held));
        self
    }

    /// Another limit than [`REPLY_TIMEOUT`] for the agent's answers.
    pub fn with_reply_timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout;
        self
    }

    /// The next frame, which must come within the reply timeout: `Error::NoReply`
    /// names `request` when it does not.
    fn reply(&mut self, request: &'static str) -> Result<frame::Frame, Error> {
        let waited = self.reply_timeout;
        self.reader.get_ref().set_read_timeout(Some(waited))?;
        let frame = read_frame(&mut self.reader).map_err(|e| match e {
            frame::Error::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Error::NoReply { request, waited }
            }
            other => other.into(),
        })?;
        self.reader.get_ref().set_read_timeout(None)?;
        Ok(frame)
    }

    /// What the agent said of itself.
    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// Runs a command: `stdin` is streamed to it (then closed), its stdout and stderr
    /// are written to `stdout` and `stderr` as they arrive.
    pub fn exec(
        self,
        request: ExecRequest,
        stdin: impl Read + Send + 'static,
        stdout: &mut impl Write,
        stderr: &mut impl Write,
    ) -> Result<Exit, Error> {
        let (_keep, controls) = std::sync::mpsc::channel();
        self.exec_with_controls(request, stdin, stdout, stderr, controls)
    }

    /// [`Connection::exec`], also forwarding `controls` (signals, terminal resizes) to
    /// the command while it runs.
    pub fn exec_with_controls(
        mut self,
        request: ExecRequest,
        stdin: impl Read + Send + 'static,
        stdout: &mut impl Write,
        stderr: &mut impl Write,
        controls: Receiver<HostMessage>,
    ) -> Result<Exit, Error> {
        write_control(&mut self.writer, &HostMessage::Exec(request))?;
        match self.reply("exec")?.parse()? {
            AgentMessage::Started { .. } => {}
            AgentMessage::Error { code, message } => return Err(Error::Agent { code, message }),
            other => return Err(Error::Unexpected(other)),
        }
        // Two threads write frames: one lock keeps each frame whole.
        let writer = Arc::new(Mutex::new(self.writer.try_clone()?));
        let pump = {
            let writer = writer.clone();
            std::thread::spawn(move || pump_stdin(stdin, &writer))
        };
        {
            let writer = writer.clone();
            std::thread::spawn(move || {
                for message in controls {
                    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                    if write_control(&mut *w, &message).is_err() {
                        return;
                    }
                }
            });
        }
        // What the reply left buffered, then the socket, read with liveness probes.
        let mut output = BufReader::new(io::Cursor::new(self.reader.buffer().to_vec()).chain(
            Watched {
                stream: self.reader.get_ref().try_clone()?,
                uds: self.uds.take(),
                liveness: self.liveness,
                held: self.held.take(),
            },
        ));
        let exit = relay(&mut output, stdout, stderr);
        // Done or lost: stop feeding the command, whatever the pump was waiting on (the
        // agent ends a command whose host went away).
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
        let exit = exit?;
        stdout.flush()?;
        stderr.flush()?;
        let _ = pump.join();
        Ok(exit)
    }

    /// Asks the agent to sync, unmount and power the VM off.
    pub fn shutdown(mut self) -> Result<(), Error> {
        write_control(&mut self.writer, &HostMessage::Shutdown)?;
        match self.reply("shutdown")?.parse()? {
            AgentMessage::ShuttingDown => Ok(()),
            AgentMessage::Error { code, message } => Err(Error::Agent { code, message }),
            other => Err(Error::Unexpected(other)),
        }
    }
}

/// Writes a running command's output where it belongs until it exits.
fn relay(
    output: &mut impl Read,
    stdout: &mut impl Write,
    stderr: &mut impl Write,
) -> Result<Exit, Error> {
    loop {
        let frame = read_frame(output).map_err(|e| match e {
            frame::Error::Io(io) => match liveness::lost(&io) {
                Some(lost) => Error::Unresponsive(lost.clone()),
                None => frame::Error::Io(io).into(),
            },
            other => other.into(),
        })?;
        match frame.kind {
            Kind::Stdout => stdout.write_all(&frame.payload)?,
            Kind::Stderr => stderr.write_all(&frame.payload)?,
            Kind::Stdin | Kind::Secret | Kind::File => {}
            Kind::Control => match frame.parse()? {
                AgentMessage::Exited {
                    signal: Some(s), ..
                } => return Ok(Exit::Signal(s)),
                AgentMessage::Exited { code, .. } => return Ok(Exit::Code(code.unwrap_or(0))),
                AgentMessage::Error { code, message } => {
                    return Err(Error::Agent { code, message })
                }
                other => return Err(Error::Unexpected(other)),
            },
        }
    }
}

/// Dials the agent's port through the vsock daemon's host socket: the `CONNECT` line,
/// then the daemon's `OK` once the guest's kernel accepted (5 s at most). Returns the
/// stream's buffered read side and its write side.
pub(crate) fn dial(uds: &Path) -> io::Result<(BufReader<UnixStream>, UnixStream)> {
    let stream = UnixStream::connect(uds)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    // One write: the daemon reads the line as it comes, but one packet is less work.
    writer.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "agent not listening",
        ));
    }
    Ok((reader, writer))
}

fn pump_stdin(mut stdin: impl Read, writer: &Mutex<UnixStream>) -> Result<(), Error> {
    let mut buf = vec![0u8; 64 << 10];
    let lock = || writer.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let n = stdin.read(&mut buf)?;
        if n == 0 {
            break;
        }
        write_frame(&mut *lock(), Kind::Stdin, &buf[..n])?;
    }
    write_control(&mut *lock(), &HostMessage::CloseStdin)?;
    Ok(())
}

impl Connection {
    fn expect_done(&mut self) -> Result<(), Error> {
        match self.reply("the request")?.parse()? {
            AgentMessage::Done => Ok(()),
            AgentMessage::Error { code, message } => Err(Error::Agent { code, message }),
            other => Err(Error::Unexpected(other)),
        }
    }

    /// Delivers secrets into /run/secrets (also after a restore).
    pub fn put_secrets(mut self, secrets: &[(String, Vec<u8>)]) -> Result<(), Error> {
        let names = secrets.iter().map(|(n, _)| n.clone()).collect();
        write_control(&mut self.writer, &HostMessage::PutSecrets { names })?;
        for (_, value) in secrets {
            write_frame(&mut self.writer, Kind::Secret, value)?;
        }
        self.expect_done()
    }

    /// Sync, wipe secrets, drop caches: the guest is ready to be snapshotted.
    pub fn prepare_snapshot(mut self) -> Result<(), Error> {
        write_control(&mut self.writer, &HostMessage::PrepareSnapshot)?;
        self.expect_done()
    }

    /// Gives a forked guest its own identity.
    pub fn set_identity(
        mut self,
        hostname: &str,
        machine_id: &str,
        entropy: &[u8],
        mac: Option<&str>,
    ) -> Result<(), Error> {
        let message = HostMessage::SetIdentity {
            hostname: hostname.into(),
            machine_id: machine_id.into(),
            entropy: entropy.to_vec(),
            mac: mac.map(str::to_owned),
        };
        write_control(&mut self.writer, &message)?;
        self.expect_done()
    }

    /// Writes `data` to `path` in the workspace.
    pub fn write_file(mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), Error> {
        let message = HostMessage::WriteFile {
            path: path.into(),
            mode,
        };
        write_control(&mut self.writer, &message)?;
        for chunk in data.chunks(frame::MAX_PAYLOAD) {
            write_frame(&mut self.writer, Kind::File, chunk)?;
        }
        write_frame(&mut self.writer, Kind::File, &[])?;
        self.expect_done()
    }

    /// Reads `path` from the workspace, refusing (`Error::TooLarge`) a file longer than
    /// `limit` bytes: the guest decides how much it sends.
    pub fn read_file(mut self, path: &str, limit: usize) -> Result<Vec<u8>, Error> {
        write_control(
            &mut self.writer,
            &HostMessage::ReadFile { path: path.into() },
        )?;
        let mut data = Vec::new();
        loop {
            let frame = self.reply("read_file")?;
            match frame.kind {
                Kind::File if frame.payload.is_empty() => break,
                Kind::File if data.len() + frame.payload.len() > limit => {
                    return Err(Error::TooLarge { limit })
                }
                Kind::File => data.extend_from_slice(&frame.payload),
                Kind::Control => match frame.parse()? {
                    AgentMessage::Error { code, message } => {
                        return Err(Error::Agent { code, message })
                    }
                    other => return Err(Error::Unexpected(other)),
                },
                _ => {}
            }
        }
        self.expect_done()?;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::{Connection, Error, Exit};
    use crate::frame::write_control;
    use crate::message::AgentMessage;
    use crate::PROTOCOL_VERSION;
    use std::os::unix::net::UnixStream;

    #[test]
    fn an_agent_that_takes_a_request_and_never_answers_times_out_naming_it() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let hello = AgentMessage::Hello {
            version: PROTOCOL_VERSION,
            agent: "test".into(),
            cid: Some(3),
        };
        write_control(&mut theirs, &hello).unwrap();
        let conn = Connection::over(ours)
            .unwrap()
            .with_reply_timeout(std::time::Duration::from_millis(200));
        let started = std::time::Instant::now();
        let request = crate::message::ExecRequest {
            argv: vec!["true".into()],
            env: Vec::new(),
            cwd: None,
            user: None,
            tty: None,
        };
        let err = conn
            .exec(request, std::io::empty(), &mut Vec::new(), &mut Vec::new())
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::NoReply {
                    request: "exec",
                    ..
                }
            ),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(err.exit_code(), 125);
        drop(theirs);
    }

    #[test]
    fn a_connection_over_a_stream_checks_the_agent_version_first() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let hello = |version| AgentMessage::Hello {
            version,
            agent: "test".into(),
            cid: Some(3),
        };
        write_control(&mut theirs, &hello(PROTOCOL_VERSION + 1)).unwrap();
        assert!(matches!(
            Connection::over(ours),
            Err(Error::VersionMismatch { agent }) if agent == PROTOCOL_VERSION + 1
        ));
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        write_control(&mut theirs, &hello(PROTOCOL_VERSION)).unwrap();
        let conn = Connection::over(ours).unwrap();
        assert_eq!(conn.info().cid, Some(3));
    }

    #[test]
    fn exit_codes_follow_the_shell_and_a_hostile_signal_cannot_overflow() {
        assert_eq!(Exit::Code(42).code(), 42);
        assert_eq!(Exit::Signal(9).code(), 137);
        assert_eq!(Exit::Signal(64).code(), 192);
        for hostile in [0, 65, -1, i32::MAX, i32::MIN] {
            assert_eq!(Exit::Signal(hostile).code(), 255, "signal {hostile}");
        }
    }
}
