//! The content-addressed blob store under `$MICROAGENT_HOME/images`. A blob enters the
//! store only after its sha256 matched the digest it was asked for and its length the
//! size it was declared with; an interrupted or corrupt download leaves nothing behind.
//!
//! Paths in the store are built from [`Digest`]s only, which are validated when parsed:
//! no text from a manifest, an index or `refs.json` becomes a path unchecked. Blobs are
//! streamed in and out; none is held in memory whole.
//!
//! A registry download goes to `blobs/sha256/.partial-<hex>` ([`Store::resumable`]): an
//! interrupted pull (killed, connection dropped) leaves it there, under a name that is
//! never mistaken for a blob, and the next pull of that digest continues from its end
//! (the bytes kept are hashed again first, so the digest still covers every byte). An
//! exclusive `flock` on it keeps two pulls from appending to the same file.

use crate::digest::{self, Digest};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Manifests, indexes and image configs are small JSON documents: the OCI distribution
/// spec lets registries refuse manifests over 4 MiB. Configs get the same bound.
pub const MAX_JSON: u64 = 4 << 20;

/// How long a busy partial file is tried again before another download is assumed to
/// hold it: a child process also holds the lock for a moment, between its fork and the
/// exec that closes the inherited descriptor (a unit test saw exactly that).
const LOCK_PATIENCE: Duration = Duration::from_millis(200);

/// Prefixes of the store's temporary names (each ends in `-<pid>`).
const TMP_BLOB: &str = ".tmp-";
const TMP_REFS: &str = ".refs.tmp-";
/// Prefix of resumable downloads (`.partial-<hex of the digest>`).
pub const PARTIAL: &str = ".partial-";
/// A partial download untouched for this long is removed by the next fetch.
pub const PARTIAL_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Digest(#[from] digest::Error),
    #[error("blob {expected}: content hashes to {actual}, not to its digest; refusing it (a corrupt download or a tampered registry)")]
    Mismatch { expected: String, actual: String },
    #[error("blob {digest}: more than its declared {limit} bytes; refusing it")]
    TooLarge { digest: String, limit: u64 },
    #[error("blob {digest}: {actual} bytes where {declared} were declared; refusing it")]
    SizeMismatch {
        digest: String,
        declared: u64,
        actual: u64,
    },
    #[error("image store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Digest(e) => e.code(),
            Self::Mismatch { .. } => "image.digest_mismatch",
            Self::TooLarge { .. } | Self::SizeMismatch { .. } => "image.blob_size_mismatch",
            Self::Io { .. } => "image.store_failed",
        }
    }
}

/// What a name in the store points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<String>,
    /// When it was last pulled or imported, in seconds since the Unix epoch.
    pub pulled_unix: u64,
    /// The platform its config names (absent in entries written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// A blob being written into the store: hashed and counted as it arrives, refused past
/// its limit, renamed into place by [`BlobWriter::commit`]. Removed if dropped before,
/// unless it is a resumable download ([`Store::resumable`]) that may still be good:
/// those are kept for the next pull, and removed once refused.
pub struct BlobWriter {
    dir: PathBuf,
    tmp: PathBuf,
    file: Option<fs::File>,
    hasher: sha2::Sha256,
    written: u64,
    limit: u64,
    overflowed: bool,
    expected: Option<Digest>,
    /// Keep the temporary file when dropped (a resumable download not refused yet).
    keep: bool,
    /// Bytes an earlier, interrupted download had already written.
    resumed_from: u64,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            self.overflowed = true;
            self.keep = false;
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("more than the declared {} bytes", self.limit),
            ));
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("blob already committed"))?;
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

impl BlobWriter {
    /// Whether more than the limit was offered (the write failed).
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Bytes written so far (with those kept from an interrupted download).
    pub fn len(&self) -> u64 {
        self.written
    }

    /// Whether nothing has been written yet.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// Bytes an interrupted download had left that this writer continued from.
    pub fn resumed_from(&self) -> u64 {
        self.resumed_from
    }

    /// Drops everything written so far and starts again from the first byte (a registry
    /// that answered a range request with the whole blob, or kept bytes that turned out
    /// not to match).
    pub fn restart(&mut self) -> Result<(), Error> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io_err(&self.tmp)(io::Error::other("blob already committed")))?;
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
            .map_err(io_err(&self.tmp))?;
        self.hasher = sha2::Sha256::new();
        self.written = 0;
        self.resumed_from = 0;
        Ok(())
    }

    /// Whether the content so far is the expected blob (digest, and `declared` size when
    /// given); the digest it has if so.
    pub fn check(&self, declared: Option<u64>) -> Result<Digest, Error> {
        let actual = Digest::from_hasher(self.hasher.clone());
        let name = self
            .expected
            .as_ref()
            .map_or_else(|| actual.to_string(), Digest::to_string);
        if let Some(expected) = &self.expected {
            if *expected != actual {
                return Err(Error::Mismatch {
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        if let Some(declared) = declared.filter(|&d| d != self.written) {
            return Err(Error::SizeMismatch {
                digest: name,
                declared,
                actual: self.written,
            });
        }
        Ok(actual)
    }

    /// Verifies the content ([`Self::check`]) and moves it into place under its digest.
    /// Refused content is removed, a resumable download's included.
    pub fn commit(mut self, declared: Option<u64>) -> Result<Digest, Error> {
        let actual = match self.check(declared) {
            Ok(actual) => actual,
            Err(e) => {
                self.keep = false;
                return Err(e);
            }
        };
        let file = self.file.take();
        if let Some(file) = &file {
            file.sync_all().map_err(io_err(&self.tmp))?;
        }
        // Renamed while still open (and locked, for a resumable download): a pull that
        // opens the temporary name later finds it gone or no longer this file.
        let path = self.dir.join(actual.hex());
        fs::rename(&self.tmp, &path).map_err(io_err(&path))?;
        drop(file);
        Ok(actual)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // After a commit the name is gone and this does nothing.
        if !self.keep {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Takes an exclusive lock on `file` without waiting; `false` when another process
/// holds it.
fn try_lock(file: &fs::File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor this function borrows; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs().join(digest.hex())
    }

    pub fn has(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Bytes an interrupted download of `digest` kept (0 when there is none).
    pub fn partial_len(&self, digest: &Digest) -> u64 {
        let path = self.blobs().join(format!("{PARTIAL}{}", digest.hex()));
        fs::metadata(path).map_or(0, |m| m.len())
    }

    /// Removes temporary files of writers that died (see [`crate::stale`]).
    /// Also removes partial downloads nobody continued for [`PARTIAL_MAX_AGE`].
    pub fn sweep_stale(&self) -> usize {
        crate::stale::sweep(&self.blobs(), &[TMP_BLOB])
            + crate::stale::sweep(&self.root.join("manifests"), &[TMP_BLOB])
            + crate::stale::sweep(&self.root, &[TMP_REFS, crate::source::TMP_IMPORT])
            + crate::stale::sweep(
                &self.root.join("rootfs"),
                &[crate::pull::TMP_TREE, crate::pull::TMP_DISK],
            )
            + self.sweep_partials(PARTIAL_MAX_AGE)
    }

    /// Removes the partial downloads last written more than `age` ago that no pull
    /// holds; returns how many went.
    fn sweep_partials(&self, age: std::time::Duration) -> usize {
        let Ok(entries) = fs::read_dir(self.blobs()) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_prefix(PARTIAL)) else {
                continue;
            };
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|elapsed| elapsed > age);
            let Ok(digest) = Digest::parse(&format!("sha256:{hex}")) else {
                continue;
            };
            if old && !self.has(&digest) {
                self.discard_partial(&digest);
                removed += usize::from(!entry.path().exists());
            } else if old {
                let _ = fs::remove_file(entry.path()); // the blob arrived another way
                removed += 1;
            }
        }
        removed
    }

    /// Starts writing a blob of at most `limit` bytes; `expected` is checked on commit
    /// (without it the blob is stored under whatever it hashes to).
    pub fn writer(&self, expected: Option<&Digest>, limit: u64) -> Result<BlobWriter, Error> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = self.blobs();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let tmp = dir.join(format!(
            "{TMP_BLOB}{}-{}",
            NEXT.fetch_add(1, Ordering::Relaxed),
            std::process::id()
        ));
        let file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(BlobWriter {
            dir,
            tmp,
            file: Some(file),
            hasher: sha2::Sha256::new(),
            written: 0,
            limit,
            overflowed: false,
            expected: expected.cloned(),
            keep: false,
            resumed_from: 0,
        })
    }

    /// Opens and locks the partial download at `path`; `None` when another process
    /// holds it. The lock must be on the file the name still points at: a download that
    /// was committed (renamed to its digest) meanwhile is never reopened as partial.
    fn lock_partial(&self, path: &Path) -> Result<Option<fs::File>, Error> {
        for _ in 0..3 {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(io_err(path))?;
            let deadline = Instant::now() + LOCK_PATIENCE;
            while !try_lock(&file).map_err(io_err(path))? {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let opened = file.metadata().map_err(io_err(path))?;
            let same = fs::symlink_metadata(path)
                .is_ok_and(|now| now.ino() == opened.ino() && now.dev() == opened.dev());
            if same {
                return Ok(Some(file));
            }
        }
        Ok(None)
    }

    /// A resumable download of `digest` (at most `limit` bytes) into
    /// `.partial-<hex>`: it continues after whatever an interrupted download of the
    /// same digest left there (those bytes are hashed again) and stays for the next
    /// pull if this one is interrupted too. When another process is downloading that
    /// digest, a private temporary file is used instead.
    pub fn resumable(&self, digest: &Digest, limit: u64) -> Result<BlobWriter, Error> {
        let dir = self.blobs();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let tmp = dir.join(format!("{PARTIAL}{}", digest.hex()));
        let Some(mut file) = self.lock_partial(&tmp)? else {
            return self.writer(Some(digest), limit);
        };
        let kept = file.metadata().map_err(io_err(&tmp))?.len();
        let mut hasher = sha2::Sha256::new();
        let kept = if kept > limit {
            file.set_len(0).map_err(io_err(&tmp))?;
            0
        } else {
            // The kept bytes are hashed again: the digest covers every byte of the blob.
            let mut buf = vec![0u8; 1 << 20];
            let mut read = 0u64;
            loop {
                let n = file.read(&mut buf).map_err(io_err(&tmp))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                read += n as u64;
            }
            read
        };
        file.seek(SeekFrom::Start(kept)).map_err(io_err(&tmp))?;
        Ok(BlobWriter {
            dir,
            tmp,
            file: Some(file),
            hasher,
            written: kept,
            limit,
            overflowed: false,
            expected: Some(digest.clone()),
            keep: true,
            resumed_from: kept,
        })
    }

    /// Removes what an interrupted download of `digest` kept, unless a pull is
    /// downloading it right now.
    pub fn discard_partial(&self, digest: &Digest) {
        let path = self.blobs().join(format!("{PARTIAL}{}", digest.hex()));
        if !path.exists() {
            return;
        }
        if let Ok(Some(_locked)) = self.lock_partial(&path) {
            let _ = fs::remove_file(&path);
        }
    }

    /// Streams `reader` into the store. With `declared`, no more than that many bytes
    /// are read and the length must match exactly.
    pub fn import(
        &self,
        reader: impl Read,
        expected: Option<&Digest>,
        declared: Option<u64>,
    ) -> Result<Digest, Error> {
        let limit = declared.unwrap_or(u64::MAX);
        let mut writer = self.writer(expected, limit)?;
        // One byte past the limit is read, so an oversized source is told apart from
        // one of exactly the declared length.
        let copied = io::copy(&mut reader.take(limit.saturating_add(1)), &mut writer);
        let name = expected.map_or_else(|| "blob".to_owned(), Digest::to_string);
        match copied {
            Err(e) if e.kind() == io::ErrorKind::FileTooLarge => Err(Error::TooLarge {
                digest: name,
                limit,
            }),
            Err(e) => Err(Error::Io {
                path: PathBuf::from(name),
                source: e,
            }),
            Ok(_) => writer.commit(declared),
        }
    }

    /// Keeps a manifest (as parsed) under its registry digest, for listing and reuse.
    pub fn put_manifest(&self, digest: &Digest, json: &[u8]) -> Result<PathBuf, Error> {
        let dir = self.root.join("manifests");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(format!("{}.json", digest.hex()));
        let tmp = dir.join(format!("{TMP_BLOB}{}", std::process::id()));
        fs::write(&tmp, json)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(io_err(&path))?;
        Ok(path)
    }

    /// A kept manifest (see [`Store::put_manifest`]), at most [`MAX_JSON`] bytes.
    pub fn manifest(&self, digest: &Digest) -> Option<Vec<u8>> {
        let path = self
            .root
            .join("manifests")
            .join(format!("{}.json", digest.hex()));
        let mut bytes = Vec::new();
        fs::File::open(path)
            .ok()?
            .take(MAX_JSON)
            .read_to_end(&mut bytes)
            .ok()?;
        Some(bytes)
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    /// Every name with what it points at, sorted by name.
    pub fn refs(&self) -> BTreeMap<String, Entry> {
        fs::read(self.refs_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write_refs(&self, refs: &BTreeMap<String, Entry>) -> Result<(), Error> {
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let path = self.refs_path();
        let tmp = self.root.join(format!("{TMP_REFS}{}", std::process::id()));
        let json = serde_json::to_vec_pretty(refs).unwrap_or_default();
        fs::write(&tmp, json)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(io_err(&path))
    }

    /// Records that `name` now points at `entry`.
    pub fn tag(&self, name: &str, entry: Entry) -> Result<(), Error> {
        let mut refs = self.refs();
        refs.insert(name.to_owned(), entry);
        self.write_refs(&refs)
    }

    /// Bytes the blobs of `entry` take in the store (digests that do not parse count 0).
    pub fn size(&self, entry: &Entry) -> u64 {
        std::iter::once(&entry.config_digest)
            .chain(&entry.layers)
            .filter_map(|d| Digest::parse(d).ok())
            .filter_map(|d| fs::metadata(self.blob_path(&d)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Forgets `name` and deletes every blob, manifest and root disk no other name uses.
    /// Returns how many files went. A digest in `refs.json` that does not parse names
    /// no file, so nothing is deleted for it.
    pub fn remove(&self, name: &str) -> Result<Option<usize>, Error> {
        let mut refs = self.refs();
        let Some(gone) = refs.remove(name) else {
            return Ok(None);
        };
        self.write_refs(&refs)?;
        let kept: HashSet<&String> = refs
            .values()
            .flat_map(|e| {
                std::iter::once(&e.config_digest)
                    .chain(&e.layers)
                    .chain(std::iter::once(&e.manifest_digest))
            })
            .collect();
        let mut removed = 0;
        for digest in std::iter::once(&gone.config_digest).chain(&gone.layers) {
            let Ok(parsed) = Digest::parse(digest) else {
                continue;
            };
            if !kept.contains(digest) && fs::remove_file(self.blob_path(&parsed)).is_ok() {
                removed += 1;
            }
        }
        if let (false, Ok(manifest)) = (
            kept.contains(&gone.manifest_digest),
            Digest::parse(&gone.manifest_digest),
        ) {
            let hex = manifest.hex();
            for path in [
                self.root.join("manifests").join(format!("{hex}.json")),
                self.root.join("rootfs").join(format!("{hex}.ext4")),
            ] {
                if fs::remove_file(path).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(Some(removed))
    }

    /// Deletes the kept manifest and those of `blobs` that no name in `refs.json` uses
    /// (what an import that was refused after it arrived left in the store).
    pub fn discard_unreferenced<'a>(
        &self,
        manifest: &Digest,
        blobs: impl IntoIterator<Item = &'a Digest>,
    ) {
        let refs = self.refs();
        let used: HashSet<&str> = refs
            .values()
            .flat_map(|e| {
                std::iter::once(&e.config_digest)
                    .chain(&e.layers)
                    .chain(std::iter::once(&e.manifest_digest))
            })
            .map(String::as_str)
            .collect();
        if !used.contains(manifest.as_str()) {
            let _ = fs::remove_file(
                self.root
                    .join("manifests")
                    .join(format!("{}.json", manifest.hex())),
            );
            let _ = fs::remove_file(self.blob_path(manifest));
        }
        for digest in blobs {
            if !used.contains(digest.as_str()) {
                let _ = fs::remove_file(self.blob_path(digest));
            }
        }
    }

    /// Opens a stored blob for streaming.
    pub fn open(&self, digest: &Digest) -> Result<fs::File, Error> {
        let path = self.blob_path(digest);
        fs::File::open(&path).map_err(io_err(&path))
    }

    /// Reads a small stored blob (a config) whole, refusing one over `max` bytes.
    pub fn read_small(&self, digest: &Digest, max: u64) -> Result<Vec<u8>, Error> {
        let path = self.blob_path(digest);
        let mut data = Vec::new();
        self.open(digest)?
            .take(max + 1)
            .read_to_end(&mut data)
            .map_err(io_err(&path))?;
        if data.len() as u64 > max {
            return Err(Error::TooLarge {
                digest: digest.to_string(),
                limit: max,
            });
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> usize {
        fs::read_dir(dir.join("blobs/sha256")).unwrap().count()
    }

    #[test]
    fn only_matching_content_enters_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let digest = Digest::of(b"layer");
        assert!(!store.has(&digest));
        store.import(&b"layer"[..], Some(&digest), Some(5)).unwrap();
        assert!(store.has(&digest));
        assert_eq!(store.read_small(&digest, 100).unwrap(), b"layer");

        let other = Digest::of(b"other");
        assert!(matches!(
            store.import(&b"tampered"[..], Some(&other), Some(8)),
            Err(Error::Mismatch { .. })
        ));
        assert!(!store.has(&other));
        assert_eq!(leftovers(dir.path()), 1, "a refused blob left files behind");
    }

    #[test]
    fn no_more_than_the_declared_size_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let digest = Digest::of(b"abcd");
        // An endless source (as /dev/zero would be) stops one byte past the declared size.
        let err = store
            .import(io::repeat(0), Some(&digest), Some(4))
            .unwrap_err();
        assert_eq!(err.code(), "image.blob_size_mismatch", "{err}");
        assert!(err.to_string().contains("declared 4 bytes"), "{err}");
        let err = store.import(&b"abc"[..], None, Some(4)).unwrap_err();
        assert!(
            matches!(err, Error::SizeMismatch { actual: 3, .. }),
            "{err}"
        );
        assert_eq!(leftovers(dir.path()), 0, "a refused blob left files behind");
        assert_eq!(
            store.import(&b"abcd"[..], Some(&digest), Some(4)).unwrap(),
            digest
        );
        assert!(matches!(
            store.read_small(&digest, 3),
            Err(Error::TooLarge { limit: 3, .. })
        ));
    }

    #[test]
    fn a_resumable_download_continues_where_it_stopped_and_only_one_writer_appends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let data = b"0123456789";
        let digest = Digest::of(data);
        let partial = dir
            .path()
            .join(format!("blobs/sha256/{PARTIAL}{}", digest.hex()));

        let mut first = store.resumable(&digest, 10).unwrap();
        assert_eq!(first.resumed_from(), 0);
        first.write_all(&data[..4]).unwrap();
        // While it is being written, a second pull gets a private temporary file.
        let second = store.resumable(&digest, 10).unwrap();
        assert_eq!((second.resumed_from(), second.tmp == partial), (0, false));
        drop(second);
        drop(first); // interrupted: the bytes stay for the next pull
        assert_eq!(fs::read(&partial).unwrap(), &data[..4]);

        let mut resumed = store.resumable(&digest, 10).unwrap();
        assert_eq!((resumed.resumed_from(), resumed.len()), (4, 4));
        resumed.write_all(&data[4..]).unwrap();
        assert_eq!(resumed.commit(Some(10)).unwrap(), digest);
        assert_eq!(fs::read(store.blob_path(&digest)).unwrap(), data);
        assert!(!partial.exists());

        // Kept bytes that do not match are refused on commit and removed.
        let other = Digest::of(b"abcdef");
        let mut bad = store.resumable(&other, 6).unwrap();
        bad.write_all(b"abc").unwrap();
        drop(bad);
        let mut bad = store.resumable(&other, 6).unwrap();
        bad.write_all(b"XYZ").unwrap();
        assert!(matches!(bad.commit(Some(6)), Err(Error::Mismatch { .. })));
        assert_eq!(leftovers(dir.path()), 1, "only the committed blob");
    }

    #[test]
    fn old_partial_downloads_are_swept_and_held_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let mut held = store.resumable(&a, 10).unwrap();
        held.write_all(b"x").unwrap();
        let mut left = store.resumable(&b, 10).unwrap();
        left.write_all(b"y").unwrap();
        drop(left);
        let zero = std::time::Duration::ZERO;
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert_eq!(
            store.sweep_partials(std::time::Duration::from_secs(3600)),
            0
        );
        assert_eq!(store.sweep_partials(zero), 1, "only the one no pull holds");
        assert!(dir
            .path()
            .join(format!("blobs/sha256/{PARTIAL}{}", a.hex()))
            .exists());
        drop(held);
    }

    #[test]
    fn digests_from_refs_that_do_not_parse_delete_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        fs::write(dir.path().join("precious"), b"keep").unwrap();
        store
            .tag(
                "evil",
                Entry {
                    manifest_digest: "sha256:../precious".into(),
                    config_digest: "sha256:../../precious".into(),
                    layers: vec!["sha256:../../precious".into()],
                    pulled_unix: 0,
                    platform: None,
                },
            )
            .unwrap();
        assert_eq!(store.remove("evil").unwrap(), Some(0));
        assert_eq!(fs::read(dir.path().join("precious")).unwrap(), b"keep");
    }
}
