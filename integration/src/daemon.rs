//! microagent's own daemons, started as real processes from the build's target directory.

use crate::process::{self, ChildGuard};
use std::env;
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
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

/// Fails when a source file `binary` was built from is newer than it: `cargo test`
/// builds test binaries, not the programs they start. Cargo lists those sources in the
/// dep-info file next to the binary (`NAME.d`); without one there is nothing to check.
fn check_fresh(binary: &Path) -> Result<(), Error> {
    let dep_info = binary.with_extension("d");
    let (Ok(deps), Ok(built)) = (
        std::fs::read_to_string(&dep_info),
        std::fs::metadata(binary).and_then(|m| m.modified()),
    ) else {
        return Ok(());
    };
    match newest_source(&deps) {
        Some((changed, source)) if changed > built => Err(Error::Stale {
            path: binary.to_owned(),
            newer: source,
        }),
        _ => Ok(()),
    }
}

/// The most recently modified file among the prerequisites of a dep-info file's first
/// rule (`target: source source ...`, spaces in names escaped with a backslash).
fn newest_source(dep_info: &str) -> Option<(SystemTime, PathBuf)> {
    let (_, sources) = dep_info.lines().next()?.split_once(": ")?;
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for source in sources
        .replace("\\ ", "\0")
        .split_whitespace()
        .map(|s| PathBuf::from(s.replace('\0', " ")))
    {
        let Ok(modified) = std::fs::metadata(&source).and_then(|m| m.modified()) else {
            continue;
        };
        if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
            newest = Some((modified, source));
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
    /// Starts `name --socket-path SOCKET ARGS… [--landlock-dir DIR-OF-SOCKET]` and waits
    /// for the socket to appear.
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
        cmd.arg("--socket-path").arg(socket).args(args);
        // As under `microagent`: files only beneath the socket's directory after set-up.
        if let (Some(dir), Ok(_)) = (socket.parent(), microagent_confine::landlock::abi()) {
            cmd.arg("--landlock-dir").arg(dir);
        }
        cmd.stdin(Stdio::null()).stderr(stderr);
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
    fn a_binary_older_than_one_of_its_own_sources_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        touch(&d.join("src/main.rs"), 100);
        touch(&d.join("src/my file.rs"), 100);
        touch(&d.join("other/lib.rs"), 0);
        touch(&d.join("bin"), 50);
        let main = d.join("src/main.rs").display().to_string();
        let spaced = d.join("src/my\\ file.rs").display().to_string();
        let rule = format!("{}: {main} {spaced}\n", d.join("bin").display());
        fs::write(d.join("bin.d"), rule).unwrap();
        // Only its own sources count: a newer file elsewhere does not make it stale.
        check_fresh(&d.join("bin")).unwrap();
        touch(&d.join("src/my file.rs"), 10);
        let err = check_fresh(&d.join("bin")).unwrap_err();
        assert!(
            matches!(err, Error::Stale { ref newer, .. } if newer.ends_with("my file.rs")),
            "{err}"
        );
        // No dep-info: nothing to check.
        fs::remove_file(d.join("bin.d")).unwrap();
        check_fresh(&d.join("bin")).unwrap();
    }
}
