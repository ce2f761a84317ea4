//! A snapshot directory: written whole or not at all, opened with every check first.

use super::manifest::{FileEntry, Manifest, MANIFEST, MEMORY, STATE};
use super::{memory, rings, Error, SnapshotState};
use serde::Serialize;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// What [`write`] put on disk.
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    pub dir: PathBuf,
    /// Guest memory size (the memory file's logical size).
    pub memory_bytes: u64,
    /// Bytes of guest memory actually written (populated, non-zero pages).
    pub memory_populated: u64,
    pub state_bytes: u64,
}

/// Room kept for the manifest, state and device files on top of memory.
const STATE_ALLOWANCE: u64 = 4 << 20;

/// Checks, before the VM is paused or a byte written, that `dir` can be created and
/// that its file system has room for the populated memory (an upper bound: SEEK_DATA
/// extents, zero pages included) plus the state files.
pub fn preflight(dir: &Path, memfd: &File, memory_size: u64) -> Result<(), Error> {
    if dir.exists() {
        return Err(Error::Exists(dir.to_owned()));
    }
    let parent = parent_of(dir)?;
    let needed = memory::data_extents(memfd, memory_size, "guest memory")
        .map_err(|e| Error::Write {
            dir: dir.to_owned(),
            step: "preflight",
            source: io::Error::other(e.to_string()),
        })?
        .iter()
        .map(|(_, len)| len)
        .sum::<u64>()
        + STATE_ALLOWANCE;
    let free = free_bytes(parent).map_err(|source| Error::Write {
        dir: dir.to_owned(),
        step: "preflight",
        source,
    })?;
    if free < needed {
        return Err(Error::NoSpace {
            dir: dir.to_owned(),
            step: "preflight",
            source: io::Error::other(format!(
                "{needed} bytes needed, {free} free in {}",
                parent.display()
            )),
        });
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the file system holding `path`.
fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: an all-zero statvfs is a valid value for statvfs to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer; the result is checked.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The existing directory `dir` will be created in.
fn parent_of(dir: &Path) -> Result<&Path, Error> {
    match (dir.parent(), dir.file_name()) {
        (Some(parent), Some(_)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            if parent.is_dir() {
                Ok(parent)
            } else {
                Err(Error::BadDir(dir.to_owned()))
            }
        }
        _ => Err(Error::BadDir(dir.to_owned())),
    }
}

/// Writes a snapshot into `dir`, which must not exist: first into a temporary sibling
/// directory, every file fsynced, then renamed into place and the parent fsynced. On
/// any failure the temporary directory is removed and `dir` does not exist.
pub fn write(
    dir: &Path,
    manifest: Manifest,
    state: &SnapshotState,
    device_states: &[Vec<u8>],
    memfd: &File,
    memory_size: u64,
) -> Result<Written, Error> {
    if dir.exists() {
        return Err(Error::Exists(dir.to_owned()));
    }
    let parent = parent_of(dir)?;
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let io = |step| {
        let dir = dir.to_owned();
        move |source: io::Error| write_error(dir, step, source)
    };
    fs::create_dir(&tmp).map_err(io("creating the temporary directory"))?;
    let result = write_files(
        &tmp,
        manifest,
        state,
        device_states,
        memfd,
        memory_size,
        &io,
    )
    .and_then(|w| {
        fsync_dir(&tmp).map_err(io("syncing the directory"))?;
        fs::rename(&tmp, dir).map_err(io("renaming into place"))?;
        fsync_dir(parent).map_err(io("syncing the parent directory"))?;
        Ok(w)
    });
    match result {
        Ok((memory_populated, state_bytes)) => Ok(Written {
            dir: dir.to_owned(),
            memory_bytes: memory_size,
            memory_populated,
            state_bytes,
        }),
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_files<F, G>(
    tmp: &Path,
    mut manifest: Manifest,
    state: &SnapshotState,
    device_states: &[Vec<u8>],
    memfd: &File,
    memory_size: u64,
    io: &F,
) -> Result<(u64, u64), Error>
where
    F: Fn(&'static str) -> G,
    G: FnOnce(io::Error) -> Error,
{
    let state_json = serde_json::to_vec(state).map_err(|e| Error::Encode {
        what: STATE,
        message: e.to_string(),
    })?;
    write_synced(&tmp.join(STATE), &state_json).map_err(io("writing state.json"))?;

    let mem_file = File::create_new(tmp.join(MEMORY)).map_err(io("creating memory.bin"))?;
    let saved = memory::save(memfd, memory_size, &mem_file).map_err(|e| {
        let source = match e.io().raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::other(e.to_string()),
        };
        io("writing memory.bin")(source)
    })?;
    mem_file.sync_all().map_err(io("syncing memory.bin"))?;

    let mut files = Vec::new();
    for (index, bytes) in device_states.iter().enumerate() {
        let name = device_state_file(index);
        write_synced(&tmp.join(&name), bytes).map_err(io("writing a device state file"))?;
        files.push(FileEntry {
            name,
            size: bytes.len() as u64,
            sha256: sha256_bytes(bytes),
        });
    }

    manifest.memory_populated = saved.populated;
    files.extend([
        FileEntry {
            name: STATE.into(),
            size: state_json.len() as u64,
            sha256: sha256_bytes(&state_json),
        },
        FileEntry {
            name: MEMORY.into(),
            size: memory_size,
            sha256: saved.sha256,
        },
    ]);
    manifest.files = files;
    let text = manifest.to_json().map_err(|e| Error::Encode {
        what: MANIFEST,
        message: e.to_string(),
    })?;
    write_synced(&tmp.join(MANIFEST), &text).map_err(io("writing manifest.json"))?;
    Ok((saved.populated, state_json.len() as u64))
}

/// The file holding the daemon state of the device at `index` (manifest order).
pub fn device_state_file(index: usize) -> String {
    format!("device-{index}.state")
}

/// A full disk or quota gets its own code: the caller can act on it.
fn write_error(dir: PathBuf, step: &'static str, source: io::Error) -> Error {
    if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
        Error::NoSpace { dir, step, source }
    } else {
        Error::Write { dir, step, source }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create_new(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}

/// Reads and checks a file named in the manifest: present, of the recorded size.
fn entry_path<'m>(
    dir: &Path,
    manifest: &'m Manifest,
    name: &str,
) -> Result<(PathBuf, &'m FileEntry), Error> {
    let path = dir.join(name);
    let entry = manifest.file(name).ok_or_else(|| Error::Corrupt {
        path: dir.join(MANIFEST),
        message: format!("no entry for {name}"),
    })?;
    let meta = fs::metadata(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::FileMissing(path.clone())
        } else {
            Error::Read {
                path: path.clone(),
                source: e,
            }
        }
    })?;
    if meta.len() != entry.size {
        return Err(Error::FileTruncated {
            path,
            expected: entry.size,
            actual: meta.len(),
        });
    }
    Ok((path, entry))
}

/// A snapshot opened for restore: the manifest and state are checked and parsed; the
/// memory file is present with the right size (its checksum is checked while it is
/// loaded, see [`load_memory`]).
pub struct Opened {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub state: SnapshotState,
    /// Each device's daemon state, in manifest order.
    pub device_states: Vec<Vec<u8>>,
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, Error> {
    let path = dir.join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::FileMissing(path.clone())
        } else {
            Error::Read {
                path: path.clone(),
                source: e,
            }
        }
    })?;
    Manifest::parse(&path, &text)
}

/// A whole file named in the manifest, its size and checksum checked.
fn read_checked(dir: &Path, manifest: &Manifest, name: &str) -> Result<Vec<u8>, Error> {
    let (path, entry) = entry_path(dir, manifest, name)?;
    let bytes = fs::read(&path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    if sha256_bytes(&bytes) != entry.sha256 {
        return Err(Error::ChecksumMismatch { path });
    }
    Ok(bytes)
}

pub fn open(dir: &Path) -> Result<Opened, Error> {
    let manifest = read_manifest(dir)?;
    let bytes = read_checked(dir, &manifest, STATE)?;
    let state_path = dir.join(STATE);
    let state = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
        path: state_path,
        message: e.to_string(),
    })?;
    entry_path(dir, &manifest, MEMORY)?;
    let device_states = (0..manifest.devices.len())
        .map(|index| read_checked(dir, &manifest, &device_state_file(index)))
        .collect::<Result<_, _>>()?;
    Ok(Opened {
        dir: dir.to_owned(),
        manifest,
        state,
        device_states,
    })
}

/// Loads the memory file into fresh guest memory, refusing it if its checksum differs or
/// its rings are ahead of the saved device state ([`rings::check`]).
pub fn load_memory(opened: &Opened, memfd: &File) -> Result<u64, Error> {
    let (path, entry) = entry_path(&opened.dir, &opened.manifest, MEMORY)?;
    let file = File::open(&path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let loaded = memory::load(&file, entry.size, memfd).map_err(|e| Error::Read {
        path: path.clone(),
        source: io::Error::new(e.io().kind(), e.to_string()),
    })?;
    if loaded.sha256 != entry.sha256 {
        return Err(Error::ChecksumMismatch { path });
    }
    rings::check(&opened.state.devices, memfd, entry.size)?;
    Ok(loaded.populated)
}

/// Checks every file of a snapshot against the manifest, and its rings against its
/// memory ([`rings::check`]); the first problem is the error.
pub fn verify(dir: &Path) -> Result<Manifest, Error> {
    let opened = open(dir)?;
    let (path, entry) = entry_path(dir, &opened.manifest, MEMORY)?;
    let file = File::open(&path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let sum = memory::checksum(&file, entry.size).map_err(|e| Error::Read {
        path: path.clone(),
        source: io::Error::new(e.io().kind(), e.to_string()),
    })?;
    if sum.sha256 != entry.sha256 {
        return Err(Error::ChecksumMismatch { path });
    }
    rings::check(&opened.state.devices, &file, entry.size)?;
    Ok(opened.manifest)
}
