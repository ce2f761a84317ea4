//! Copying files into and out of the workspace.

use crate::init::Root;
use microagent_agent_protocol::frame::{self, read_frame, write_frame, Kind};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// `path` inside the workspace root; absolute, without `..`.
fn resolve(root: &Root, path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{path:?} must be absolute and must not contain .."));
    }
    Ok(root.path().join(p.strip_prefix("/").unwrap_or(p)))
}

pub fn write(root: &Root, path: &str, mode: u32, reader: &mut impl Read) -> Result<(), String> {
    let target = resolve(root, path)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode & 0o7777)
        .open(&target)
        .map_err(|e| format!("{path}: {e}"))?;
    loop {
        let mut frame = read_frame(reader).map_err(|e| e.to_string())?;
        if frame.kind != Kind::File {
            return Err("expected file contents".into());
        }
        if frame.payload.is_empty() {
            break;
        }
        let written = file.write_all(&frame.payload);
        frame::wipe(&mut frame.payload);
        written.map_err(|e| format!("{path}: {e}"))?;
    }
    fs::set_permissions(&target, fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| format!("{path}: {e}"))
}

pub fn read(root: &Root, path: &str, writer: &mut impl Write) -> Result<(), String> {
    let mut file = fs::File::open(resolve(root, path)?).map_err(|e| format!("{path}: {e}"))?;
    let mut buf = vec![0u8; frame::MAX_PAYLOAD];
    loop {
        let n = file.read(&mut buf).map_err(|e| format!("{path}: {e}"))?;
        let sent = write_frame(writer, Kind::File, &buf[..n]);
        frame::wipe(&mut buf[..n]);
        sent.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
    }
}
