//! `microagent-vmm` as a real process: the freestanding test guest, a serial log file,
//! and the control socket.

use crate::daemon::{self, binary};
use crate::process::{self, ChildGuard};
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The freestanding test guest built by this crate's build script.
pub fn test_guest() -> &'static Path {
    Path::new(env!("MICROAGENT_TEST_GUEST"))
}

/// An ELF kernel whose first instruction resets through the i8042: booting it costs the
/// guest nothing, so a run measures the VMM's own start-up and exit.
pub fn reset_guest() -> &'static Path {
    Path::new(env!("MICROAGENT_RESET_GUEST"))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Daemon(#[from] daemon::Error),
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error("control socket: {0}")]
    Api(std::io::Error),
    #[error("control socket reply: {0}")]
    Reply(serde_json::Error),
    #[error("{marker:?} not on the serial console within {timeout:?}; console:\n{console}")]
    Timeout {
        marker: String,
        timeout: Duration,
        console: String,
    },
    #[error("running microagent-vmm: {0}")]
    Run(std::io::Error),
}

/// Arguments for one VMM run; `serial` and `api_socket` live in `dir`.
#[derive(Debug, Clone)]
pub struct VmmArgs {
    pub kernel: PathBuf,
    pub cmdline: String,
    pub memory_mib: u32,
    pub blk: Vec<PathBuf>,
    pub extra: Vec<OsString>,
    /// Environment variables added to the VMM's.
    pub env: Vec<(OsString, OsString)>,
}

impl VmmArgs {
    pub fn test_guest(cmdline: &str) -> Self {
        Self {
            kernel: test_guest().to_owned(),
            cmdline: cmdline.to_owned(),
            memory_mib: 64,
            blk: Vec::new(),
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    fn command(&self, dir: &Path) -> Result<Command, Error> {
        let mut cmd = Command::new(binary("microagent-vmm")?);
        cmd.arg("--kernel")
            .arg(&self.kernel)
            .arg("--cmdline")
            .arg(&self.cmdline)
            .arg("--memory")
            .arg(self.memory_mib.to_string())
            .arg("--serial")
            .arg(dir.join("serial.log"))
            .arg("--api-socket")
            .arg(dir.join("api.sock"));
        for blk in &self.blk {
            cmd.arg("--blk").arg(blk);
        }
        cmd.args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// Runs the VMM to completion (with a timeout) and returns its output.
    pub fn run(&self, dir: &Path, timeout: Duration) -> Result<(Output, String), Error> {
        let mut cmd = self.command(dir)?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd)?;
        child.wait_timeout(timeout)?;
        let output = child.into_output().map_err(Error::Run)?;
        let console = fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
        Ok((output, console))
    }
}

/// `microagent-vmm --restore SNAPSHOT` with its serial log and control socket in `dir`.
fn restore_command(snapshot: &Path, dir: &Path, extra: &[&str]) -> Result<Command, Error> {
    let mut cmd = Command::new(binary("microagent-vmm")?);
    cmd.arg("--restore")
        .arg(snapshot)
        .arg("--serial")
        .arg(dir.join("serial.log"))
        .arg("--api-socket")
        .arg(dir.join("api.sock"))
        .args(extra)
        .stdin(Stdio::null());
    Ok(cmd)
}

/// Runs a restore that is expected to be refused; returns its output once it exits.
pub fn restore_refused(snapshot: &Path, dir: &Path, extra: &[&str]) -> Result<Output, Error> {
    let mut cmd = restore_command(snapshot, dir, extra)?;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd)?;
    child.wait_timeout(Duration::from_secs(30))?;
    child.into_output().map_err(Error::Run)
}

/// Waits for the VMM's control socket. The socket appears once the vCPUs run and are
/// confined, so a guest that is quick to finish (an i8042 reset) can end the VMM, with
/// status 0, before it appears, most likely on a loaded machine: that VMM is returned
/// too, its console holds what the guest did, and any API call then fails.
fn wait_for_api(process: &mut ChildGuard, dir: &Path, timeout: Duration) -> Result<(), Error> {
    match process.wait_for_path(&dir.join("api.sock"), timeout) {
        Err(process::Error::ExitedEarly { status, .. }) if status.success() => Ok(()),
        other => Ok(other?),
    }
}

/// A running VMM, killed when dropped.
pub struct Vmm {
    process: ChildGuard,
    dir: PathBuf,
}

impl Vmm {
    pub fn start(args: &VmmArgs, dir: &Path) -> Result<Self, Error> {
        let mut process = ChildGuard::spawn(&mut args.command(dir)?)?;
        wait_for_api(&mut process, dir, Duration::from_secs(10))?;
        Ok(Self {
            process,
            dir: dir.to_owned(),
        })
    }

    /// Restores a snapshot into a new VMM process whose files live in `dir`.
    pub fn restore(snapshot: &Path, dir: &Path, extra: &[&str]) -> Result<Self, Error> {
        let mut process = ChildGuard::spawn(&mut restore_command(snapshot, dir, extra)?)?;
        wait_for_api(&mut process, dir, Duration::from_secs(30))?;
        Ok(Self {
            process,
            dir: dir.to_owned(),
        })
    }

    pub fn console(&self) -> String {
        fs::read_to_string(self.dir.join("serial.log")).unwrap_or_default()
    }

    pub fn wait_for(&self, marker: &str, timeout: Duration) -> Result<String, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            if console.contains(marker) {
                return Ok(console);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    marker: marker.to_owned(),
                    timeout,
                    console,
                });
            }
            sleep(Duration::from_millis(10));
        }
    }

    /// The control socket's path.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// CPU time the VMM's main thread (the event loop) has used so far.
    pub fn main_thread_cpu(&self) -> Result<Duration, Error> {
        let pid = self.process.id().unwrap_or(0);
        let stat =
            fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).map_err(Error::Api)?;
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
        Ok(Duration::from_millis(
            (ticks(11) + ticks(12)) * 1000 / hz.max(1),
        ))
    }

    /// Sends one request on a fresh connection and returns the reply.
    pub fn api(&self, request: &str) -> Result<serde_json::Value, Error> {
        self.api_within(request, Duration::from_secs(10))
    }

    /// [`Self::api`] for requests that may take long (a snapshot of a large guest).
    pub fn api_within(&self, request: &str, timeout: Duration) -> Result<serde_json::Value, Error> {
        let mut stream = UnixStream::connect(self.dir.join("api.sock")).map_err(Error::Api)?;
        stream.set_read_timeout(Some(timeout)).map_err(Error::Api)?;
        writeln!(stream, "{request}").map_err(Error::Api)?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .map_err(Error::Api)?;
        serde_json::from_str(&line).map_err(Error::Reply)
    }

    pub fn try_status(&mut self) -> Result<Option<ExitStatus>, Error> {
        Ok(self.process.try_status()?)
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        Ok(self.process.wait_timeout(timeout)?)
    }
}
