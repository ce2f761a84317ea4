//! Child processes that die with the test that started them.

use std::io;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::thread::sleep;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("{program} exited ({status}) before {what} appeared")]
    ExitedEarly {
        program: String,
        status: ExitStatus,
        what: String,
    },
    #[error("{what} did not appear within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("waiting for {program}: {source}")]
    Wait { program: String, source: io::Error },
}

/// A running child process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    program: String,
    child: Option<Child>,
}

impl ChildGuard {
    pub fn spawn(command: &mut Command) -> Result<Self, Error> {
        let program = command.get_program().to_string_lossy().into_owned();
        let child = command.spawn().map_err(|source| Error::Spawn {
            program: program.clone(),
            source,
        })?;
        Ok(Self {
            program,
            child: Some(child),
        })
    }

    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has ended, without waiting.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>, Error> {
        match self.child.as_mut() {
            Some(child) => child.try_wait().map_err(|source| Error::Wait {
                program: self.program.clone(),
                source,
            }),
            None => Ok(None),
        }
    }

    /// The finished process's status and captured output (after [`Self::wait_timeout`]).
    pub fn into_output(mut self) -> std::io::Result<std::process::Output> {
        match self.child.take() {
            Some(child) => child.wait_with_output(),
            None => Err(io::Error::other("process already reaped")),
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("exit of {}", self.program),
                    timeout,
                });
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `path` exists (a socket the process creates), failing early if the
    /// process exits first.
    pub fn wait_for_path(&mut self, path: &Path, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let what = path.display().to_string();
        while !path.exists() {
            if let Some(status) = self.try_status()? {
                return Err(Error::ExitedEarly {
                    program: self.program.clone(),
                    status,
                    what,
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout { what, timeout });
            }
            sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

/// Sends `signal` to process `pid` (one this harness started and has not reaped).
pub fn signal(pid: u32, signal: i32) -> io::Result<()> {
    // SAFETY: kill has no memory preconditions; the caller names its own child.
    if unsafe { libc::kill(pid as libc::pid_t, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs `command` to its end and returns its exit status and peak resident memory in
/// KiB (`ru_maxrss` from `wait4`: the largest of the process and the children it waited
/// for). Killed and reported as a timeout if it runs longer than `timeout`.
pub fn run_with_peak_rss(
    command: &mut Command,
    timeout: Duration,
) -> Result<(ExitStatus, u64), Error> {
    use std::os::unix::process::ExitStatusExt;
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command.spawn().map_err(|source| Error::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child with valid pointers to a status and a rusage.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if rc == pid {
            return Ok((ExitStatus::from_raw(status), usage.ru_maxrss as u64));
        }
        if rc < 0 {
            return Err(Error::Wait {
                program,
                source: io::Error::last_os_error(),
            });
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Timeout {
                what: format!("exit of {program}"),
                timeout,
            });
        }
        sleep(Duration::from_millis(20));
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The process may already have exited; both calls are then harmless.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn dropping_the_guard_kills_the_process() {
        let guard = ChildGuard::spawn(Command::new("sleep").arg("60")).unwrap();
        let pid = guard.id().unwrap();
        assert!(alive(pid));
        drop(guard);
        assert!(!alive(pid), "sleep {pid} survived its guard");
    }

    #[test]
    fn waiting_for_a_path_reports_an_early_exit() {
        let dir = tempfile::tempdir().unwrap();
        let mut guard = ChildGuard::spawn(&mut Command::new("false")).unwrap();
        let err = guard
            .wait_for_path(&dir.path().join("never"), Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(err, Error::ExitedEarly { .. }), "{err}");
    }
}
