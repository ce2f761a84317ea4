//! Looking inside ext4 images from the host, with e2fsprogs' debugfs.

use std::path::Path;
use std::process::Command;

/// Runs one debugfs request against `disk` (read-only) and returns what it printed.
/// debugfs reports a missing path on stderr, so a `stat` of one prints nothing here;
/// a disk it cannot open fails the caller.
pub fn debugfs(disk: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(disk)
        .output()
        .expect("debugfs (apt-get install e2fsprogs)");
    assert!(
        out.status.success(),
        "debugfs {request} {}: {}",
        disk.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
