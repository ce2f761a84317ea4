//! A Debian bookworm root disk for workload tests: `scripts/debian-rootfs.sh` builds it
//! with debootstrap into a cache outside the work tree (keyed by the package list), and
//! each test boots its own sparse copy, so what a guest writes never reaches the cache.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running {script}: {source}")]
    Spawn {
        script: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the Debian root filesystem could not be built ({status}):\n{stderr}")]
    Build {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("copying {from} to {to}: {reason}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        reason: String,
    },
}

/// `scripts/debian-rootfs.sh`, which builds and caches the image.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/debian-rootfs.sh")
}

/// The cached image for `packages` (built on first use; minutes, needs Debian's mirror),
/// copied sparsely to `dir/debian.img`.
pub fn debian_root_disk(packages: &[&str], dir: &Path) -> Result<PathBuf, Error> {
    let script = script();
    let out = Command::new(&script)
        .args(packages)
        .output()
        .map_err(|source| Error::Spawn {
            script: script.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Build {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    // The path is the script's last line of output.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let cached = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    let disk = dir.join("debian.img");
    let copy = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(&cached)
        .arg(&disk)
        .output()
        .map_err(|e| Error::Copy {
            from: cached.clone(),
            to: disk.clone(),
            reason: e.to_string(),
        })?;
    if !copy.status.success() {
        return Err(Error::Copy {
            from: cached,
            to: disk,
            reason: String::from_utf8_lossy(&copy.stderr).into_owned(),
        });
    }
    Ok(disk)
}
