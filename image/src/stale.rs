//! Temporary files and trees left behind by processes that died (killed, out of
//! memory, power loss). Every temporary name in the store ends in `-<pid>` of its
//! writer; on the next run those of dead writers are removed.

use std::fs;
use std::io;
use std::path::Path;

/// The pid a temporary name ends with (`.tree-<hex>-<pid>`), if it has one.
fn writer_pid(name: &str) -> Option<i32> {
    let (_, pid) = name.rsplit_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0)
}

/// Whether a process with this pid exists (a reused pid counts as alive: the entry
/// then waits for a later run).
fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks whether the pid exists; no signal is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes the entries of `dir` whose name starts with one of `prefixes` (each begins
/// with `.`) and ends in the pid of a dead process. Returns how many went. Symlinks are
/// removed as links, never followed.
pub fn sweep(dir: &Path, prefixes: &[&str]) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !prefixes
            .iter()
            .any(|p| p.starts_with('.') && name.starts_with(p))
        {
            continue;
        }
        let Some(pid) = writer_pid(name) else {
            continue;
        };
        if alive(pid) {
            continue;
        }
        let path = entry.path();
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        if gone.is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_entries_of_dead_writers_with_a_known_prefix_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let live = std::process::id();
        let hex = "ab".repeat(32);
        for name in [
            format!(".tree-{hex}-{dead}"),
            format!(".tree-{hex}-{live}"),
            format!("{hex}-{dead}"),
            ".tree-no-pid".to_owned(),
        ] {
            fs::create_dir(dir.path().join(&name)).unwrap();
            fs::write(dir.path().join(&name).join("f"), b"x").unwrap();
        }
        fs::write(dir.path().join(format!(".tmp-1-{dead}")), b"x").unwrap();
        assert_eq!(sweep(dir.path(), &[".tree-", ".tmp-"]), 2);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![
            format!(".tree-{hex}-{live}"),
            format!("{hex}-{dead}"),
            ".tree-no-pid".to_owned(),
        ];
        want.sort();
        assert_eq!(left, want);
    }
}
