//! Applying OCI image layers onto a directory, in order.
//!
//! Whiteouts (OCI image spec, "Representing Changes"): `.wh.NAME` deletes NAME from the
//! layers below; `.wh..wh..opq` in a directory hides everything the layers below put
//! there. Entries of the layer being applied are never removed by its own whiteouts.
//!
//! Nothing may land outside the root: entries with `..` or absolute paths, hard links
//! to such paths, and entries whose parent directory is a symlink (a write through it
//! could go anywhere) are refused with an error naming the entry.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use tar::{Archive, EntryType};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the layer: {0}")]
    Read(io::Error),
    #[error("layer entry {entry:?} escapes the root ({why})")]
    Escape { entry: String, why: &'static str },
    #[error("layer entry {entry:?} would be written through the symlink {link}")]
    ThroughSymlink { entry: String, link: String },
    #[error("layer entry {entry:?}: {source}")]
    Write { entry: String, source: io::Error },
}

/// An entry path as a relative path without `.`/`..`, or why it is refused.
fn clean(entry: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in entry.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("it contains .."),
            Component::RootDir | Component::Prefix(_) => return Err("it is absolute"),
        }
    }
    Ok(out)
}

/// Refuses a path whose existing ancestors (inside the root) include a symlink.
fn check_parents(root: &Path, rel: &Path, entry: &str) -> Result<(), Error> {
    let mut at = root.to_path_buf();
    let mut parts = rel.components().peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            break; // the entry itself may replace a symlink
        }
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(Error::ThroughSymlink {
                    entry: entry.into(),
                    link: at.strip_prefix(root).unwrap_or(&at).display().to_string(),
                })
            }
            Ok(_) => {}
            Err(_) => break, // does not exist yet: created as a directory below
        }
    }
    Ok(())
}

/// Removes whatever is at `path` (file, symlink or directory tree), if anything.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn lchown(path: &Path, uid: u64, gid: u64) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: lchown with a NUL-terminated path.
    if unsafe { libc::lchown(c.as_ptr(), uid as libc::uid_t, gid as libc::gid_t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Applies one uncompressed layer tar onto `root`.
pub fn apply_layer(root: &Path, layer: impl Read) -> Result<(), Error> {
    let mut archive = Archive::new(layer);
    let mut created: HashSet<PathBuf> = HashSet::new();
    let entries = archive.entries().map_err(Error::Read)?;
    for entry in entries {
        let mut entry = entry.map_err(Error::Read)?;
        let raw = entry.path().map_err(Error::Read)?.into_owned();
        let name = raw.display().to_string();
        let rel = clean(&raw).map_err(|why| Error::Escape {
            entry: name.clone(),
            why,
        })?;
        if rel.as_os_str().is_empty() {
            continue; // the root itself ("./")
        }
        check_parents(root, &rel, &name)?;
        let write_err = |source| Error::Write {
            entry: name.clone(),
            source,
        };
        let file_name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = rel.parent().unwrap_or(Path::new(""));

        if file_name == OPAQUE_WHITEOUT {
            let dir = root.join(parent);
            if let Ok(children) = fs::read_dir(&dir) {
                for child in children.flatten() {
                    let child_rel = parent.join(child.file_name());
                    if !created.contains(&child_rel) {
                        remove_any(&child.path()).map_err(write_err)?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            let target = parent.join(hidden);
            if !created.contains(&target) {
                remove_any(&root.join(&target)).map_err(write_err)?;
            }
            continue;
        }

        let dest = root.join(&rel);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(write_err)?;
        }
        let header = entry.header().clone();
        let mode = header.mode().map_err(Error::Read)? & 0o7777;
        // Some writers leave the owner fields blank: root, as tar itself assumes.
        let (uid, gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        match header.entry_type() {
            EntryType::Directory => {
                match fs::symlink_metadata(&dest) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        remove_any(&dest).map_err(write_err)?;
                        fs::create_dir(&dest).map_err(write_err)?;
                    }
                    Err(_) => fs::create_dir(&dest).map_err(write_err)?,
                }
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).map_err(write_err)?;
            }
            EntryType::Regular | EntryType::Continuous => {
                remove_any(&dest).map_err(write_err)?;
                let mut file = fs::File::create(&dest).map_err(write_err)?;
                io::copy(&mut entry, &mut file).map_err(write_err)?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).map_err(write_err)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(Error::Read)?
                    .ok_or_else(|| write_err(io::Error::other("symlink without a target")))?;
                remove_any(&dest).map_err(write_err)?;
                // The target is resolved inside the guest; it is never followed here.
                symlink(target, &dest).map_err(write_err)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(Error::Read)?
                    .ok_or_else(|| write_err(io::Error::other("hard link without a target")))?;
                let target_rel = clean(&target).map_err(|why| Error::Escape {
                    entry: name.clone(),
                    why,
                })?;
                check_parents(root, &target_rel, &name)?;
                remove_any(&dest).map_err(write_err)?;
                fs::hard_link(root.join(&target_rel), &dest).map_err(write_err)?;
            }
            // Device nodes and FIFOs come from the guest's devtmpfs, not from images.
            _ => continue,
        }
        if header.entry_type() != EntryType::Link {
            lchown(&dest, uid, gid).map_err(write_err)?;
        }
        created.insert(rel);
    }
    Ok(())
}

/// Applies a layer that may be gzip- or zstd-compressed (detected by its magic bytes).
pub fn apply_layer_auto(root: &Path, mut layer: impl Read) -> Result<(), Error> {
    let mut magic = Vec::with_capacity(4);
    (&mut layer)
        .take(4)
        .read_to_end(&mut magic)
        .map_err(Error::Read)?;
    let gzip = magic.starts_with(&[0x1f, 0x8b]);
    let zstd = magic == [0x28, 0xb5, 0x2f, 0xfd];
    let head = io::Cursor::new(magic).chain(layer);
    if gzip {
        apply_layer(root, flate2::read::GzDecoder::new(head))
    } else if zstd {
        apply_layer(
            root,
            zstd::stream::read::Decoder::new(head).map_err(Error::Read)?,
        )
    } else {
        apply_layer(root, head)
    }
}
