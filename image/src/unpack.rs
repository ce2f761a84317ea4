//! Applying OCI image layers onto a directory, in order.
//!
//! Whiteouts (OCI image spec, "Representing Changes"): `.wh.NAME` deletes NAME from the
//! layers below; `.wh..wh..opq` in a directory hides everything the layers below put
//! there. Entries of the layer being applied are never removed by its own whiteouts.
//!
//! Nothing may land outside the root, and nothing outside it may be removed: every
//! path written or removed is a [`RelPath`] (non-empty, only normal components, no
//! `.`/`..`/absolute parts), whose parent directories inside the root are checked not
//! to be symlinks. Entries with `..` or absolute paths, hard links to such paths,
//! whiteouts naming `.`, `..` or nothing, and entries whose parent directory is a
//! symlink are refused with an error naming the entry.
//!
//! Owners, modes (with setuid/setgid/sticky) and file capabilities
//! (`SCHILY.xattr.security.capability`) are applied in that order: a chown clears the
//! others.
//!
//! A layer may expand to at most a given number of bytes (see [`expansion_limit`]):
//! the decompressed stream and the file contents written are both counted.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use tar::{Archive, EntryType};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// File capabilities (how Debian's ping gets CAP_NET_RAW), carried as a PAX record.
const PAX_CAPABILITY: &str = "SCHILY.xattr.security.capability";
const XATTR_CAPABILITY: &str = "security.capability";

/// How far a compressed layer may expand: generous for real images (text and binaries
/// compress 2-10x; files of zeros far more), small enough that a gzip bomb (about
/// 1000x) stops early.
pub const MAX_RATIO: u64 = 100;
/// Small layers may always expand this far (their tar headers alone can exceed the ratio).
pub const MIN_LIMIT: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the layer: {0}")]
    Read(io::Error),
    #[error("layer entry {entry:?} escapes the root ({why})")]
    Escape { entry: String, why: &'static str },
    #[error("layer entry {entry:?} is a whiteout for {target:?}, which names no file in the layer's directory")]
    BadWhiteout { entry: String, target: String },
    #[error("layer entry {entry:?} would be written through the symlink {link}")]
    ThroughSymlink { entry: String, link: String },
    #[error("layer entry {entry:?}: {source}")]
    Write { entry: String, source: io::Error },
    #[error("the layer expands past {limit} bytes (at most {MAX_RATIO} times its compressed size, and within half the free space there was when the build started); refusing it")]
    TooLarge { limit: u64 },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Read(_) => "image.bad_layer",
            Self::Escape { .. } | Self::BadWhiteout { .. } | Self::ThroughSymlink { .. } => {
                "image.unsafe_entry"
            }
            Self::Write { .. } => "image.unpack_failed",
            Self::TooLarge { .. } => "image.layer_too_large",
        }
    }
}

/// The most a layer of `compressed` bytes may expand to when `room` bytes may still be
/// used: [`MAX_RATIO`] times its size (at least [`MIN_LIMIT`]), never more than `room`.
pub fn expansion_limit(compressed: u64, room: u64) -> u64 {
    compressed
        .saturating_mul(MAX_RATIO)
        .max(MIN_LIMIT)
        .min(room)
}

/// The room a tree may still take: what is free now, less half of what was free when
/// the build started (kept for the disk made from the tree, and for the host). Summed
/// over all layers, a tree never takes more than half the starting free space.
pub fn room(free_at_start: u64, free_now: u64) -> u64 {
    free_now.saturating_sub(free_at_start - free_at_start / 2)
}

/// A path inside the root: non-empty, made of normal components only. Built only by
/// [`RelPath::new`], so joining it to the root can never leave the root or be the root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RelPath(PathBuf);

impl RelPath {
    /// `Ok(None)` for the root itself (`./`), `Err` for anything escaping it.
    fn new(entry: &Path) -> Result<Option<Self>, &'static str> {
        let mut out = PathBuf::new();
        for c in entry.components() {
            match c {
                Component::Normal(part) => out.push(part),
                Component::CurDir => {}
                Component::ParentDir => return Err("it contains .."),
                Component::RootDir | Component::Prefix(_) => return Err("it is absolute"),
            }
        }
        Ok((!out.as_os_str().is_empty()).then_some(Self(out)))
    }

    /// A child of `dir` (`None` for the root) named by one normal component.
    fn child(dir: Option<&Self>, name: &std::ffi::OsStr) -> Option<Self> {
        let mut one = Path::new(name).components();
        match (one.next(), one.next()) {
            (Some(Component::Normal(part)), None) => Some(Self(match dir {
                Some(d) => d.0.join(part),
                None => PathBuf::from(part),
            })),
            _ => None,
        }
    }

    fn parent(&self) -> Option<Self> {
        self.0
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| Self(p.to_owned()))
    }

    fn file_name(&self) -> &std::ffi::OsStr {
        // Non-empty and made of normal components: the last one is a name.
        self.0.file_name().unwrap_or_default()
    }
}

/// The directory a layer is applied to. Every write and removal goes through it.
struct Tree<'a> {
    root: &'a Path,
}

impl Tree<'_> {
    fn path(&self, rel: &RelPath) -> PathBuf {
        self.root.join(&rel.0)
    }

    /// Refuses a path whose existing ancestors (inside the root) include a symlink.
    fn check_parents(&self, rel: &RelPath, entry: &str) -> Result<(), Error> {
        let mut at = self.root.to_path_buf();
        let mut parts = rel.0.components().peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                break; // the entry itself may replace a symlink
            }
            at.push(part);
            match fs::symlink_metadata(&at) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(Error::ThroughSymlink {
                        entry: entry.into(),
                        link: at
                            .strip_prefix(self.root)
                            .unwrap_or(&at)
                            .display()
                            .to_string(),
                    })
                }
                Ok(_) => {}
                Err(_) => break, // does not exist yet: created as a directory below
            }
        }
        Ok(())
    }

    /// Removes whatever is at `rel` (file, symlink or directory tree), if anything. A
    /// symlink is removed as a link; `remove_dir_all` does not follow symlinks.
    fn remove(&self, rel: &RelPath) -> io::Result<()> {
        let path = self.path(rel);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes every child of `dir` (the root for `None`) not in `keep`.
    fn clear(&self, dir: Option<&RelPath>, keep: &HashSet<RelPath>) -> io::Result<()> {
        let path = dir.map_or_else(|| self.root.to_path_buf(), |d| self.path(d));
        let Ok(children) = fs::read_dir(path) else {
            return Ok(());
        };
        for child in children {
            let child = child?;
            if let Some(rel) = RelPath::child(dir, &child.file_name()) {
                if !keep.contains(&rel) {
                    self.remove(&rel)?;
                }
            }
        }
        Ok(())
    }
}

/// Sets the `security.capability` attribute of a file (not following symlinks).
fn set_capability(path: &Path, value: &[u8]) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let name = CString::new(XATTR_CAPABILITY).map_err(io::Error::other)?;
    // SAFETY: lsetxattr with NUL-terminated path and name, and a value pointer valid
    // for `value.len()` bytes.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The file capability a PAX record gives this entry, if any.
fn capability_of<R: Read>(entry: &mut tar::Entry<R>) -> io::Result<Option<Vec<u8>>> {
    let Some(extensions) = entry.pax_extensions()? else {
        return Ok(None);
    };
    for extension in extensions {
        let extension = extension?;
        if extension.key() == Ok(PAX_CAPABILITY) {
            return Ok(Some(extension.value_bytes().to_vec()));
        }
    }
    Ok(None)
}

fn lchown(path: &Path, uid: u64, gid: u64) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: lchown with a NUL-terminated path.
    if unsafe { libc::lchown(c.as_ptr(), uid as libc::uid_t, gid as libc::gid_t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Counts bytes read and fails once more than the limit went through.
struct Counted<R> {
    inner: R,
    read: u64,
    limit: u64,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            self.exceeded.set(true);
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "layer expansion limit",
            ));
        }
        Ok(n)
    }
}

/// Applies one uncompressed layer tar onto `root`; the tar stream and the file contents
/// it writes may each be at most `limit` bytes.
pub fn apply_layer(root: &Path, layer: impl Read, limit: u64) -> Result<(), Error> {
    let exceeded = Rc::new(Cell::new(false));
    let counted = Counted {
        inner: layer,
        read: 0,
        limit,
        exceeded: exceeded.clone(),
    };
    let result = apply_counted(&Tree { root }, counted, limit);
    if exceeded.get() {
        return Err(Error::TooLarge { limit });
    }
    result
}

fn apply_counted(tree: &Tree, layer: impl Read, limit: u64) -> Result<(), Error> {
    let mut archive = Archive::new(layer);
    let mut created: HashSet<RelPath> = HashSet::new();
    let mut written = 0u64;
    let entries = archive.entries().map_err(Error::Read)?;
    for entry in entries {
        let mut entry = entry.map_err(Error::Read)?;
        let raw = entry.path().map_err(Error::Read)?.into_owned();
        let name = raw.display().to_string();
        let escape = |why| Error::Escape {
            entry: name.clone(),
            why,
        };
        let Some(rel) = RelPath::new(&raw).map_err(escape)? else {
            continue; // the root itself ("./")
        };
        tree.check_parents(&rel, &name)?;
        let write_err = |source| Error::Write {
            entry: name.clone(),
            source,
        };
        let file_name = rel.file_name().to_string_lossy().into_owned();
        let parent = rel.parent();

        if file_name == OPAQUE_WHITEOUT {
            tree.clear(parent.as_ref(), &created).map_err(write_err)?;
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            // `.wh.` alone, `.wh..` and `.wh...` name the directory itself or its
            // parent, never a file in it: refused, never removed.
            let target =
                RelPath::child(parent.as_ref(), std::ffi::OsStr::new(hidden)).ok_or_else(|| {
                    Error::BadWhiteout {
                        entry: name.clone(),
                        target: hidden.into(),
                    }
                })?;
            if !created.contains(&target) {
                tree.remove(&target).map_err(write_err)?;
            }
            continue;
        }

        let dest = tree.path(&rel);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(write_err)?;
        }
        let header = entry.header().clone();
        let capability = capability_of(&mut entry).map_err(Error::Read)?;
        let mode = header.mode().map_err(Error::Read)? & 0o7777;
        // Some writers leave the owner fields blank: root, as tar itself assumes.
        let (uid, gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        match header.entry_type() {
            EntryType::Directory => match fs::symlink_metadata(&dest) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    tree.remove(&rel).map_err(write_err)?;
                    fs::create_dir(&dest).map_err(write_err)?;
                }
                Err(_) => fs::create_dir(&dest).map_err(write_err)?,
            },
            EntryType::Regular | EntryType::Continuous => {
                // Sparse entries expand without stream bytes: count what is written.
                written = written.saturating_add(entry.size());
                if written > limit {
                    return Err(Error::TooLarge { limit });
                }
                tree.remove(&rel).map_err(write_err)?;
                let mut file = fs::File::create(&dest).map_err(write_err)?;
                io::copy(&mut entry, &mut file).map_err(write_err)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(Error::Read)?
                    .ok_or_else(|| write_err(io::Error::other("symlink without a target")))?;
                tree.remove(&rel).map_err(write_err)?;
                // The target is resolved inside the guest; it is never followed here.
                symlink(target, &dest).map_err(write_err)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(Error::Read)?
                    .ok_or_else(|| write_err(io::Error::other("hard link without a target")))?;
                let target_rel = RelPath::new(&target)
                    .map_err(escape)?
                    .ok_or_else(|| escape("it links to the root"))?;
                tree.check_parents(&target_rel, &name)?;
                tree.remove(&rel).map_err(write_err)?;
                fs::hard_link(tree.path(&target_rel), &dest).map_err(write_err)?;
            }
            // Device nodes and FIFOs come from the guest's devtmpfs, not from images.
            _ => continue,
        }
        match header.entry_type() {
            EntryType::Link => {} // shares its target's inode, owner and mode
            EntryType::Symlink => lchown(&dest, uid, gid).map_err(write_err)?,
            _ => {
                // Owner first: the kernel clears setuid/setgid and file capabilities on
                // chown, so the mode (with those bits) and capabilities come after it.
                lchown(&dest, uid, gid).map_err(write_err)?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).map_err(write_err)?;
                if let Some(value) = &capability {
                    set_capability(&dest, value).map_err(write_err)?;
                }
            }
        }
        created.insert(rel);
    }
    Ok(())
}

/// Applies a layer that may be gzip- or zstd-compressed (detected by its magic bytes);
/// `limit` bounds the decompressed size (see [`expansion_limit`]).
pub fn apply_layer_auto(root: &Path, mut layer: impl Read, limit: u64) -> Result<(), Error> {
    let mut magic = Vec::with_capacity(4);
    (&mut layer)
        .take(4)
        .read_to_end(&mut magic)
        .map_err(Error::Read)?;
    let gzip = magic.starts_with(&[0x1f, 0x8b]);
    let zstd = magic == [0x28, 0xb5, 0x2f, 0xfd];
    let head = io::Cursor::new(magic).chain(layer);
    if gzip {
        apply_layer(root, flate2::read::GzDecoder::new(head), limit)
    } else if zstd {
        apply_layer(
            root,
            zstd::stream::read::Decoder::new(head).map_err(Error::Read)?,
            limit,
        )
    } else {
        apply_layer(root, head, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_follows_the_compressed_size_and_half_the_starting_free_space() {
        assert_eq!(expansion_limit(1 << 30, u64::MAX), 100 << 30);
        assert_eq!(expansion_limit(1000, u64::MAX), MIN_LIMIT);
        assert_eq!(expansion_limit(1 << 30, 5 << 30), 5 << 30);
        assert_eq!(expansion_limit(u64::MAX, u64::MAX), u64::MAX);
        // 10 GiB free at the start: the first layer may take 5 GiB; after it took 4,
        // the next may take 1 more; once half is used, nothing.
        assert_eq!(room(10 << 30, 10 << 30), 5 << 30);
        assert_eq!(room(10 << 30, 6 << 30), 1 << 30);
        assert_eq!(room(10 << 30, 4 << 30), 0);
        assert_eq!(room(11, 11), 5);
    }

    #[test]
    fn relative_paths_never_name_the_root_or_leave_it() {
        assert_eq!(RelPath::new(Path::new("./")), Ok(None));
        assert_eq!(RelPath::new(Path::new("")), Ok(None));
        assert!(RelPath::new(Path::new("a/../b")).is_err());
        assert!(RelPath::new(Path::new("/a")).is_err());
        assert_eq!(
            RelPath::new(Path::new("./a/./b")).unwrap().unwrap().0,
            Path::new("a/b")
        );
        for bad in ["", ".", "..", "a/b", "/"] {
            assert!(
                RelPath::child(None, std::ffi::OsStr::new(bad)).is_none(),
                "{bad:?}"
            );
        }
    }
}
