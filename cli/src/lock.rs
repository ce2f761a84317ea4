//! One command at a time per workspace: an exclusive `flock` on
//! `workspaces/.<name>.lock`. A command that finds the lock taken says on stderr which
//! command holds it (the holder writes its pid and command into the file) and gives up
//! after a bounded time with `workspace.busy`, or waits as long as it takes (`--wait`).
//! `delete` removes the lock file while holding it, so a lock taken on a file that is no
//! longer at the path is let go and taken again on the new file.

use crate::error::{CliError, Result};
use crate::home::Home;
use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a waiting command tries again.
const POLL: Duration = Duration::from_millis(100);
/// What `--lock-timeout` defaults to, in seconds: longer than a normal start or halt.
pub const DEFAULT_TIMEOUT_SECS: u64 = 120;

/// How long to wait for a workspace another command holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Bounded(Duration),
    Forever,
}

/// A held workspace lock; released when dropped (the file closes).
#[derive(Debug)]
pub struct WorkspaceLock {
    _file: fs::File,
}

fn unwritable(e: io::Error) -> CliError {
    CliError::new("home.unwritable", e.to_string())
}

/// Takes the lock without blocking: `Ok(false)` when another holds it.
fn try_lock(file: &fs::File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor this function borrows; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Who holds the lock, as its holder wrote it ("pid 123: microagent start ws").
fn holder(file: &mut fs::File) -> String {
    let mut text = String::new();
    let _ = file.rewind();
    let _ = file.take(256).read_to_string(&mut text);
    let text = text.trim();
    if text.is_empty() {
        "another microagent command".into()
    } else {
        text.into()
    }
}

fn open(path: &Path) -> Result<fs::File> {
    // Not truncated on open: the holder's note must survive a waiter opening the file.
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(unwritable)
}

/// Whether `file` is still the file at `path` (not unlinked by a `delete`).
fn still_there(file: &fs::File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// Locks workspace `name` for `command` (as the holder is shown to waiters).
pub fn acquire(home: &Home, name: &str, command: &str, wait: Wait) -> Result<WorkspaceLock> {
    fs::create_dir_all(home.workspaces()).map_err(unwritable)?;
    let path = home.workspaces().join(format!(".{name}.lock"));
    let mut file = open(&path)?;
    let started = Instant::now();
    let mut told = false;
    loop {
        if try_lock(&file).map_err(unwritable)? {
            if still_there(&file, &path) {
                break;
            }
            file = open(&path)?; // the old one closes, and its lock with it
            continue;
        }
        let who = holder(&mut file);
        if let Wait::Bounded(limit) = wait {
            if started.elapsed() >= limit {
                return Err(CliError::new(
                    "workspace.busy",
                    format!(
                        "workspace {name} is busy: {who} has held it for over {}s; try again when it is done, or pass --wait to wait as long as it takes",
                        limit.as_secs()
                    ),
                ));
            }
        }
        if !told {
            let until = match wait {
                Wait::Bounded(limit) => format!("up to {}s", limit.as_secs()),
                Wait::Forever => "as long as it takes (--wait)".into(),
            };
            eprintln!("microagent: waiting for workspace {name}: {who} holds it ({until})");
            told = true;
        }
        std::thread::sleep(POLL);
    }
    let note = format!("pid {}: microagent {command}\n", std::process::id());
    let _ = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(note.as_bytes()));
    Ok(WorkspaceLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_workspace_names_its_holder_and_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        let held = acquire(&home, "ws", "start ws", Wait::Forever).unwrap();
        let started = Instant::now();
        let err = acquire(
            &home,
            "ws",
            "halt ws",
            Wait::Bounded(Duration::from_millis(300)),
        )
        .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(err.code, "workspace.busy");
        let pid = std::process::id();
        assert!(
            err.message
                .contains(&format!("pid {pid}: microagent start ws")),
            "{err}"
        );
        drop(held);
        // Free again: taken at once, and the note names the new holder.
        acquire(&home, "ws", "halt ws", Wait::Bounded(Duration::ZERO)).unwrap();
        let note = fs::read_to_string(dir.path().join("workspaces/.ws.lock")).unwrap();
        assert_eq!(note, format!("pid {pid}: microagent halt ws\n"));
    }

    #[test]
    fn a_lock_on_a_file_deleted_meanwhile_is_taken_again_on_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        let path = dir.path().join("workspaces/.ws.lock");
        let deleting = acquire(&home, "ws", "delete ws", Wait::Forever).unwrap();
        let waiter = std::thread::spawn({
            let home = home.clone();
            move || acquire(&home, "ws", "create ws", Wait::Forever).unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        // `delete` removes the file while holding the lock, then lets go.
        fs::remove_file(&path).unwrap();
        drop(deleting);
        let waited = waiter.join().unwrap();
        // The waiter holds the lock of the file now at the path: nobody else can take it.
        assert!(path.exists());
        let err = acquire(&home, "ws", "start ws", Wait::Bounded(Duration::ZERO)).unwrap_err();
        assert_eq!(err.code, "workspace.busy", "{err}");
        assert!(err.message.contains("microagent create ws"), "{err}");
        drop(waited);
    }
}
