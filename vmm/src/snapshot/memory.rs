//! Guest memory to and from a sparse file: only populated pages are read and written.
//!
//! The memfd's populated ranges come from SEEK_DATA/SEEK_HOLE; within them, pages that
//! are all zeros are left as holes too. The file has the memfd's size and layout (file
//! offset = memfd offset), so restoring is reading the file's data extents back in.
//!
//! The checksum is layout-independent: SHA-256 over the logical size and then, for every
//! page that is not all zeros, its index and its bytes. A copy of the file made with or
//! without holes has the same checksum.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

pub const PAGE: u64 = 4096;
/// Bytes read per system call.
const CHUNK: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("finding populated ranges of {what}: {source}")]
    Seek {
        what: &'static str,
        source: io::Error,
    },
    #[error("reading {what} at offset {offset:#x}: {source}")]
    Read {
        what: &'static str,
        offset: u64,
        source: io::Error,
    },
    #[error("writing {what} at offset {offset:#x}: {source}")]
    Write {
        what: &'static str,
        offset: u64,
        source: io::Error,
    },
    #[error("sizing the memory file to {size} bytes: {source}")]
    Size { size: u64, source: io::Error },
}

impl Error {
    /// The I/O error underneath, to tell a full disk from other failures.
    pub fn io(&self) -> &io::Error {
        match self {
            Self::Seek { source, .. }
            | Self::Read { source, .. }
            | Self::Write { source, .. }
            | Self::Size { source, .. } => source,
        }
    }
}

/// What saving wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Bytes of page data written (the file's allocated size, roughly).
    pub populated: u64,
    pub sha256: String,
}

/// The data extents (offset, length) of `file` below `size`, from SEEK_DATA/SEEK_HOLE.
pub fn data_extents(file: &File, size: u64, what: &'static str) -> Result<Vec<(u64, u64)>, Error> {
    let seek = |offset: u64, whence| {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        if at < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `offset`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(Error::Seek { what, source: e })
            }
        } else {
            Ok(Some(at as u64))
        }
    };
    let mut extents = Vec::new();
    let mut offset = 0;
    while offset < size {
        let Some(start) = seek(offset, libc::SEEK_DATA)? else {
            break;
        };
        if start >= size {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        extents.push((start, end - start));
        offset = end;
    }
    Ok(extents)
}

/// Calls `page_run(offset, bytes)` for every run of pages in `file`'s data extents that
/// are not all zeros, and feeds them to the checksum.
fn scan(
    file: &File,
    size: u64,
    what: &'static str,
    mut page_run: impl FnMut(u64, &[u8]) -> Result<(), Error>,
) -> Result<Saved, Error> {
    let mut hash = Sha256::new();
    hash.update(size.to_le_bytes());
    let mut populated = 0;
    let mut buf = vec![0u8; CHUNK as usize];
    for (start, len) in data_extents(file, size, what)? {
        // Extents from SEEK_DATA are page-aligned on tmpfs and ext4; align anyway.
        let mut at = start - start % PAGE;
        let end = (start + len).div_ceil(PAGE) * PAGE;
        let end = end.min(size);
        while at < end {
            let n = (end - at).min(CHUNK) as usize;
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, at)
                .map_err(|source| Error::Read {
                    what,
                    offset: at,
                    source,
                })?;
            let mut run_start: Option<usize> = None;
            for (i, page) in chunk.chunks(PAGE as usize).enumerate() {
                let offset = i * PAGE as usize;
                if page.iter().all(|&b| b == 0) {
                    if let Some(s) = run_start.take() {
                        page_run(at + s as u64, &chunk[s..offset])?;
                    }
                    continue;
                }
                hash.update(((at + offset as u64) / PAGE).to_le_bytes());
                hash.update(page);
                populated += page.len() as u64;
                run_start.get_or_insert(offset);
            }
            if let Some(s) = run_start {
                page_run(at + s as u64, &chunk[s..])?;
            }
            at += n as u64;
        }
    }
    Ok(Saved {
        populated,
        sha256: format!("{:x}", hash.finalize()),
    })
}

/// Writes the populated pages of guest memory (`memfd`, `size` bytes) into `out`, a new
/// empty file, which ends up `size` bytes long and sparse.
pub fn save(memfd: &File, size: u64, out: &File) -> Result<Saved, Error> {
    out.set_len(size)
        .map_err(|source| Error::Size { size, source })?;
    scan(memfd, size, "guest memory", |offset, bytes| {
        out.write_all_at(bytes, offset)
            .map_err(|source| Error::Write {
                what: "the memory file",
                offset,
                source,
            })
    })
}

/// The checksum of a memory file, as [`save`] computed it.
pub fn checksum(file: &File, size: u64) -> Result<Saved, Error> {
    scan(file, size, "the memory file", |_, _| Ok(()))
}

/// Copies the populated pages of a memory file into fresh guest memory and returns
/// their checksum (to compare with the manifest's).
pub fn load(file: &File, size: u64, memfd: &File) -> Result<Saved, Error> {
    scan(file, size, "the memory file", |offset, bytes| {
        memfd
            .write_all_at(bytes, offset)
            .map_err(|source| Error::Write {
                what: "guest memory",
                offset,
                source,
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn memfd(size: u64) -> File {
        let file = tempfile::tempfile().unwrap();
        file.set_len(size).unwrap();
        file
    }

    #[test]
    fn only_populated_pages_are_written_and_read_back() {
        let size = 64 << 20;
        let mem = memfd(size);
        mem.write_all_at(b"first page", 0).unwrap();
        mem.write_all_at(&[7u8; 3 * 4096], 10 << 20).unwrap();
        // A page that was touched but holds zeros stays a hole.
        mem.write_all_at(&[0u8; 4096], 20 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = File::create_new(dir.path().join("memory.bin")).unwrap();
        let saved = save(&mem, size, &out).unwrap();
        assert_eq!(saved.populated, 4 * 4096);
        let meta = out.metadata().unwrap();
        assert_eq!(meta.len(), size);
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
        assert_eq!(checksum(&out, size).unwrap(), saved);

        let fresh = memfd(size);
        assert_eq!(load(&out, size, &fresh).unwrap(), saved);
        let mut buf = [0u8; 10];
        fresh.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"first page");
        let mut page = [0u8; 4096];
        fresh.read_exact_at(&mut page, (10 << 20) + 8192).unwrap();
        assert_eq!(page, [7u8; 4096]);

        // One flipped byte changes the checksum.
        out.write_all_at(&[8], (10 << 20) + 5).unwrap();
        assert_ne!(checksum(&out, size).unwrap().sha256, saved.sha256);
    }
}
