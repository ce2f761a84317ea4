//! An ext4 root disk from a directory, with `mke2fs -d`: sparse, sized to the content
//! plus headroom unless a size is given.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Space added to the content: room for the workspace to write.
const HEADROOM: u64 = 256 << 20;
const MIN_SIZE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("measuring {path}: {source}")]
    Walk { path: PathBuf, source: io::Error },
    #[error("--disk-size of {size} bytes is smaller than the image content ({content} bytes)")]
    TooSmall { size: u64, content: u64 },
    #[error("creating {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("running mke2fs (apt-get install e2fsprogs): {0}")]
    Spawn(io::Error),
    #[error("mke2fs failed for {path}: {stderr}")]
    Mke2fs { path: PathBuf, stderr: String },
}

/// Bytes the tree occupies, counting each file and directory in whole 4 KiB blocks.
pub fn content_size(tree: &Path) -> Result<u64, Error> {
    let walk_err = |source| Error::Walk {
        path: tree.to_owned(),
        source,
    };
    let mut total = 0u64;
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(walk_err)? {
            let entry = entry.map_err(walk_err)?;
            let meta = entry.path().symlink_metadata().map_err(walk_err)?;
            total += meta.len().div_ceil(4096).max(1) * 4096;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// Makes `out` an ext4 filesystem holding `tree`; returns its size in bytes.
pub fn build_ext4(tree: &Path, out: &Path, size: Option<u64>) -> Result<u64, Error> {
    let content = content_size(tree)?;
    // Inode tables and journal take room too: a quarter on top of the content.
    let needed = content + content / 4;
    let size = match size {
        Some(size) if size < needed => return Err(Error::TooSmall { size, content }),
        Some(size) => size,
        None => (needed + HEADROOM).max(MIN_SIZE),
    }
    .next_multiple_of(1 << 20);
    let file = fs::File::create(out).map_err(|source| Error::Create {
        path: out.to_owned(),
        source,
    })?;
    // A sparse file: only what mke2fs writes takes space.
    file.set_len(size).map_err(|source| Error::Create {
        path: out.to_owned(),
        source,
    })?;
    drop(file);
    let output = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(tree)
        .arg(out)
        .output()
        .map_err(Error::Spawn)?;
    if !output.status.success() {
        let _ = fs::remove_file(out);
        return Err(Error::Mke2fs {
            path: out.to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(size)
}
