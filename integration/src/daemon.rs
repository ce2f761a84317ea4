//! microagent's own daemons, started as real processes from the build's target directory.

use crate::process::{self, ChildGuard};
use std::env;
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{name} is not built next to the test binary ({dir}): run `cargo build --workspace`")]
    NotBuilt { name: String, dir: PathBuf },
    #[error("cannot tell where the test binary is: {0}")]
    CurrentExe(std::io::Error),
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error("creating the daemon log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A workspace binary from the same profile as the running test
/// (`target/<profile>/deps/test-…` → `target/<profile>/NAME`).
pub fn binary(name: &str) -> Result<PathBuf, Error> {
    let exe = env::current_exe().map_err(Error::CurrentExe)?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::NotBuilt {
            name: name.to_owned(),
            dir,
        })
    }
}

/// A running daemon serving a vhost-user socket, killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    process: ChildGuard,
}

impl Daemon {
    /// Starts `name --socket-path SOCKET ARGS…` and waits for the socket to appear.
    pub fn start<I, S>(name: &str, socket: &Path, args: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::start_with(name, socket, args, Stdio::inherit())
    }

    /// As [`Daemon::start`], with the daemon's stderr (its log) written to `log`.
    pub fn start_logged<I, S>(name: &str, socket: &Path, args: I, log: &Path) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let file = File::create(log).map_err(|source| Error::Log {
            path: log.to_owned(),
            source,
        })?;
        Self::start_with(name, socket, args, Stdio::from(file))
    }

    fn start_with<I, S>(name: &str, socket: &Path, args: I, stderr: Stdio) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(binary(name)?);
        cmd.arg("--socket-path")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stderr(stderr);
        let mut process = ChildGuard::spawn(&mut cmd)?;
        process.wait_for_path(socket, Duration::from_secs(10))?;
        Ok(Self { process })
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// Exit status if the daemon has ended.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>, Error> {
        Ok(self.process.try_status()?)
    }

    /// Waits for the daemon to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        Ok(self.process.wait_timeout(timeout)?)
    }
}
