//! Secrets in /run/secrets of the workspace: a tmpfs whose files are mode 0400. Before
//! a snapshot every secret is overwritten, removed and the tmpfs unmounted, so that no
//! copy is in guest memory when it is saved; the host delivers them again afterwards.
//! Values arrive in their own frames and every buffer that held one is wiped.

use crate::init::Root;
use microagent_agent_protocol::frame::{read_frame, Kind};
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use microagent_agent_protocol::frame::wipe;

fn secrets_dir(root: &Root) -> PathBuf {
    root.path().join("run/secrets")
}

fn mounted(dir: &Path) -> bool {
    let target = dir.to_string_lossy();
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*target))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
}

pub fn put(root: &Root, names: &[String], reader: &mut impl Read) -> Result<(), String> {
    let dir = secrets_dir(root);
    if !mounted(&dir) {
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        mount_tmpfs(&dir)?;
    }
    for name in names {
        let mut frame = read_frame(reader).map_err(|e| e.to_string())?;
        let result = if frame.kind != Kind::Secret {
            Err(format!("expected the value of secret {name}"))
        } else if !valid_name(name) {
            Err(format!("invalid secret name {name:?}"))
        } else {
            write_secret(&dir.join(name), &frame.payload)
        };
        wipe(&mut frame.payload);
        result?;
    }
    Ok(())
}

fn mount_tmpfs(dir: &Path) -> Result<(), String> {
    let target = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: mount with NUL-terminated strings that outlive the call.
    let ret = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0700,size=16m".as_ptr().cast(),
        )
    };
    if ret < 0 {
        return Err(format!(
            "mount tmpfs on {}: {}",
            dir.display(),
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn write_secret(path: &Path, value: &[u8]) -> Result<(), String> {
    let _ = fs::remove_file(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(value)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o400)).map_err(|e| e.to_string())
}

/// Wipes and removes every secret, unmounts the tmpfs, syncs and drops caches.
pub fn prepare_snapshot(root: &Root) -> Result<(), String> {
    let dir = secrets_dir(root);
    if mounted(&dir) {
        for entry in fs::read_dir(&dir).map_err(|e| e.to_string())?.flatten() {
            let path = entry.path();
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0) as usize;
            // Overwrite in place first: the tmpfs pages then hold zeros when freed.
            if let Ok(mut f) = OpenOptions::new().write(true).open(&path) {
                let _ = f.write_all(&vec![0u8; len]);
            }
            let _ = fs::remove_file(&path);
        }
        let target = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: umount2 with a NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), 0) } < 0 {
            return Err(format!(
                "unmount {}: {}",
                dir.display(),
                io::Error::last_os_error()
            ));
        }
    }
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| format!("drop caches: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_the_directory_are_refused() {
        assert!(valid_name("api-token"));
        for bad in ["", ".", "..", "a/b", "../etc/passwd", "x\0y"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(!valid_name(&"n".repeat(256)));
    }

    #[test]
    fn wipe_zeroes_the_buffer() {
        let mut secret = b"hunter2".to_vec();
        wipe(&mut secret);
        assert_eq!(secret, [0; 7]);
    }
}
