//! `qemu-storage-daemon` exporting a file as vhost-user-blk: a third-party backend.

use crate::process::{self, ChildGuard};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const QEMU_STORAGE_DAEMON: &str = "qemu-storage-daemon";

/// A running export, killed when dropped.
#[derive(Debug)]
pub struct StorageDaemon {
    _process: ChildGuard,
    socket: PathBuf,
}

impl StorageDaemon {
    /// Exports `disk` on `socket` and waits until the socket exists.
    pub fn start(disk: &Path, socket: &Path, writable: bool) -> Result<Self, process::Error> {
        let mut cmd = Command::new(QEMU_STORAGE_DAEMON);
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                disk.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,addr.type=unix,addr.path={},node-name=f0,writable={}",
                socket.display(),
                if writable { "on" } else { "off" }
            ))
            .stdin(Stdio::null());
        let mut process = ChildGuard::spawn(&mut cmd)?;
        process.wait_for_path(socket, Duration::from_secs(10))?;
        Ok(Self {
            _process: process,
            socket: socket.to_owned(),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}
