//! An ext4 root disk from a directory, with `mke2fs -d`: sparse, sized to the content
//! plus headroom unless a size is given, with enough inodes for every entry of the tree
//! (mke2fs's default of one inode per 16 KiB runs out on trees of many small files).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Space added to the content: room for the workspace to write.
const HEADROOM: u64 = 256 << 20;
const MIN_SIZE: u64 = 64 << 20;
/// mke2fs's default bytes-per-inode ratio (`inode_ratio` in mke2fs.conf).
const BYTES_PER_INODE: u64 = 16 << 10;
/// Bytes an inode takes in the inode table (`inode_size` in mke2fs.conf).
const INODE_SIZE: u64 = 256;
/// Inodes added to the tree's count: room for files the workspace creates.
const SPARE_INODES: u64 = 16 << 10;

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
    #[error("growing {path} with {tool} failed: {stderr}")]
    Grow {
        path: PathBuf,
        tool: &'static str,
        stderr: String,
    },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooSmall { .. } => "input.disk_too_small",
            Self::Spawn(_) => "host.missing_tool",
            Self::Walk { .. } | Self::Create { .. } | Self::Mke2fs { .. } | Self::Grow { .. } => {
                "image.rootfs_failed"
            }
        }
    }
}

/// Bytes available to this user on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: an all-zero statvfs is a valid value for statvfs(3) to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs with a NUL-terminated path and a valid output struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// What a tree holds: bytes in whole 4 KiB blocks, and entries (each needs an inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Content {
    pub bytes: u64,
    pub entries: u64,
}

/// Bytes the tree occupies (each file and directory in whole 4 KiB blocks) and how
/// many entries it has.
pub fn content(tree: &Path) -> Result<Content, Error> {
    let walk_err = |source| Error::Walk {
        path: tree.to_owned(),
        source,
    };
    let mut total = 0u64;
    let mut entries = 0u64;
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(walk_err)? {
            let entry = entry.map_err(walk_err)?;
            let meta = entry.path().symlink_metadata().map_err(walk_err)?;
            total += meta.len().div_ceil(4096).max(1) * 4096;
            entries += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(Content {
        bytes: total,
        entries,
    })
}

/// The inode count for a disk of `size` bytes holding `entries`: mke2fs's default for
/// that size, or the entries plus a quarter and [`SPARE_INODES`] if that is more.
pub fn inode_count(size: u64, entries: u64) -> u64 {
    (size / BYTES_PER_INODE).max(entries + entries / 4 + SPARE_INODES)
}

/// `size` rounded up to whole MiB, as disks are made.
pub fn disk_size(size: u64) -> u64 {
    size.next_multiple_of(1 << 20)
}

/// Makes `out` a copy of the ext4 disk `from` (reflinked where the filesystem can,
/// else sparse) grown to `size` bytes with resize2fs: no unpacking, no mke2fs.
pub fn grow_ext4(from: &Path, out: &Path, size: u64) -> Result<(), Error> {
    let run = |tool: &'static str, command: &mut Command| -> Result<(), Error> {
        let output = command.output().map_err(Error::Spawn)?;
        if output.status.success() {
            return Ok(());
        }
        let _ = fs::remove_file(out);
        Err(Error::Grow {
            path: out.to_owned(),
            tool,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    };
    run(
        "cp",
        Command::new("cp")
            .args(["--reflink=auto", "--sparse=always"])
            .arg(from)
            .arg(out),
    )?;
    let file = fs::OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(|source| Error::Create {
            path: out.to_owned(),
            source,
        })?;
    file.set_len(size).map_err(|source| Error::Create {
        path: out.to_owned(),
        source,
    })?;
    drop(file);
    // Without a size resize2fs fills the file; a fresh filesystem needs no e2fsck.
    run("resize2fs", Command::new("resize2fs").arg(out))
}

/// Makes `out` an ext4 filesystem holding `tree`; returns its size in bytes.
pub fn build_ext4(tree: &Path, out: &Path, size: Option<u64>) -> Result<u64, Error> {
    let Content {
        bytes: content,
        entries,
    } = content(tree)?;
    // Journal and metadata take room too: a quarter on top of the content, and the
    // inode table for the inodes the tree needs.
    let inode_table = inode_count(0, entries) * INODE_SIZE;
    let needed = content + content / 4 + inode_table;
    let size = match size {
        Some(size) if size < needed => return Err(Error::TooSmall { size, content }),
        Some(size) => size,
        None => (needed + HEADROOM).max(MIN_SIZE),
    };
    let size = disk_size(size);
    let inodes = inode_count(size, entries);
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
        .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-N"])
        .arg(inodes.to_string())
        .arg("-d")
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
