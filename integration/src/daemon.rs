//! microagent's own daemons, started as real processes from the build's target directory.

use crate::process::{self, ChildGuard};
use std::env;
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{name} is not built next to the test binary ({dir}): run `cargo build --workspace`")]
    NotBuilt { name: String, dir: PathBuf },
    #[error("cannot tell where the test binary is: {0}")]
    CurrentExe(std::io::Error),
    #[error(
        "{path} is older than {newer}: a test would run a stale binary; run \
         `cargo build --workspace` (make test does) and test again"
    )]
    Stale { path: PathBuf, newer: PathBuf },
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
    if !path.is_file() {
        return Err(Error::NotBuilt {
            name: name.to_owned(),
            dir,
        });
    }
    check_fresh(&path)?;
    Ok(path)
}

/// Fails when a Rust source or manifest of the workspace (outside this test crate) is
/// newer than `binary`: `cargo test` builds test binaries, not the programs they start.
fn check_fresh(binary: &Path) -> Result<(), Error> {
    static NEWEST: OnceLock<Option<(SystemTime, PathBuf)>> = OnceLock::new();
    let newest = NEWEST.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
        newest_source(workspace)
    });
    let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok();
    match (newest, built) {
        (Some((changed, source)), Some(built)) if *changed > built => Err(Error::Stale {
            path: binary.to_owned(),
            newer: source.clone(),
        }),
        _ => Ok(()),
    }
}

/// The most recently modified `.rs` file or `Cargo.toml` under `dir`, skipping build
/// output, git data and the integration crate itself.
fn newest_source(dir: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let candidate = if kind.is_dir() {
            if matches!(name.to_str(), Some("target" | ".git" | "integration")) {
                continue;
            }
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs") || name == "Cargo.toml" {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, path))
        } else {
            None
        };
        if let Some(c) = candidate {
            if newest.as_ref().is_none_or(|n| c.0 > n.0) {
                newest = Some(c);
            }
        }
    }
    newest
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn touch(path: &Path, age_secs: u64) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, "").unwrap();
        let when = SystemTime::now() - Duration::from_secs(age_secs);
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    #[test]
    fn the_newest_source_skips_build_output_and_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        touch(&d.join("vmm/src/vm.rs"), 100);
        touch(&d.join("vmm/Cargo.toml"), 50);
        touch(&d.join("target/debug/build/x.rs"), 0);
        touch(&d.join("integration/src/lib.rs"), 0);
        touch(&d.join("docs/testing.md"), 0);
        let (_, path) = newest_source(d).unwrap();
        assert_eq!(path, d.join("vmm/Cargo.toml"));
        touch(&d.join("cli/src/main.rs"), 10);
        assert_eq!(newest_source(d).unwrap().1, d.join("cli/src/main.rs"));
    }
}
