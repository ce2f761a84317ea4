//! The statically linked guest agent (`make agent`) and a root disk for it to mount.

use crate::daemon;
use crate::initramfs::BUSYBOX;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `make agent` puts the static agent, found from the running test binary.
pub fn static_agent() -> Result<PathBuf, daemon::Error> {
    let dynamic = daemon::binary("microagent-agent").ok();
    let target = std::env::current_exe()
        .map_err(daemon::Error::CurrentExe)?
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = target.join("x86_64-unknown-linux-gnu/release/microagent-agent");
    if path.is_file() {
        Ok(path)
    } else {
        Err(daemon::Error::NotBuilt {
            name: format!("static microagent-agent (run `make agent`; dynamic one: {dynamic:?})"),
            dir: path,
        })
    }
}

/// Applets the test root filesystem offers.
const APPLETS: &[&str] = &[
    "sh",
    "cat",
    "echo",
    "dd",
    "head",
    "sleep",
    "kill",
    "true",
    "false",
    "sha256sum",
    "ls",
    "mkdir",
    "sync",
    "id",
    "hostname",
    "env",
    "pwd",
    "tty",
    "stty",
    "wc",
    "tr",
    "rm",
    "stat",
];

/// An ext4 image with busybox, a root and an `app` (uid 1000) user, made with
/// `mke2fs -d` (the way workspace root disks are made).
pub fn busybox_root_disk(dir: &Path, size_mib: u32) -> io::Result<PathBuf> {
    let tree = dir.join("rootfs");
    for d in [
        "bin", "etc", "root", "home/app", "tmp", "proc", "sys", "dev", "run",
    ] {
        fs::create_dir_all(tree.join(d))?;
    }
    fs::copy(BUSYBOX, tree.join("bin/busybox"))?;
    for applet in APPLETS {
        symlink("busybox", tree.join("bin").join(applet))?;
    }
    fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )?;
    let disk = dir.join("root.img");
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(&tree)
        .arg(&disk)
        .arg(format!("{size_mib}M"))
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(disk)
}
