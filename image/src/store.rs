//! The content-addressed blob store under `$MICROAGENT_HOME/images`. A blob enters the
//! store only after its sha256 matched the digest it was asked for; an interrupted or
//! corrupt download leaves nothing behind.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unsupported digest {0:?} (only sha256:<64 hex digits>)")]
    BadDigest(String),
    #[error("blob {expected}: content hashes to sha256:{actual}; refusing it")]
    Mismatch { expected: String, actual: String },
    #[error("image store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// What a name in the store points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<String>,
    /// When it was last pulled or imported, in seconds since the Unix epoch.
    pub pulled_unix: u64,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// The hex part of a sha256 digest.
fn hex_of(digest: &str) -> Result<&str, Error> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Error::BadDigest(digest.into()))
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io(&self, path: &Path) -> impl Fn(io::Error) -> Error + '_ {
        let path = path.to_owned();
        move |source| Error::Io {
            path: path.clone(),
            source,
        }
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, Error> {
        Ok(self.root.join("blobs/sha256").join(hex_of(digest)?))
    }

    pub fn has(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.is_file())
    }

    /// Stores `data` as `digest` if it hashes to it.
    pub fn put(&self, digest: &str, data: &[u8]) -> Result<PathBuf, Error> {
        let path = self.blob_path(digest)?;
        let actual = format!("{:x}", Sha256::digest(data));
        if actual != hex_of(digest)? {
            return Err(Error::Mismatch {
                expected: digest.into(),
                actual,
            });
        }
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        fs::create_dir_all(&dir).map_err(self.io(&dir))?;
        let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), &actual[..16]));
        let write = || -> io::Result<()> {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(data)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(self.io(&path)(e));
        }
        Ok(path)
    }

    /// Keeps a manifest (as parsed) under its registry digest, for listing and reuse.
    pub fn put_manifest(&self, digest: &str, json: &[u8]) -> Result<PathBuf, Error> {
        let dir = self.root.join("manifests");
        fs::create_dir_all(&dir).map_err(self.io(&dir))?;
        let path = dir.join(format!("{}.json", hex_of(digest)?));
        let tmp = dir.join(format!(".tmp-{}", std::process::id()));
        fs::write(&tmp, json)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(self.io(&path))?;
        Ok(path)
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
        fs::create_dir_all(&self.root).map_err(self.io(&self.root))?;
        let path = self.refs_path();
        let tmp = self.root.join(format!(".refs-{}.tmp", std::process::id()));
        let json = serde_json::to_vec_pretty(refs).unwrap_or_default();
        fs::write(&tmp, json)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(self.io(&path))
    }

    /// Records that `name` now points at `entry`.
    pub fn tag(&self, name: &str, entry: Entry) -> Result<(), Error> {
        let mut refs = self.refs();
        refs.insert(name.to_owned(), entry);
        self.write_refs(&refs)
    }

    /// Bytes the blobs of `entry` take in the store.
    pub fn size(&self, entry: &Entry) -> u64 {
        std::iter::once(&entry.config_digest)
            .chain(&entry.layers)
            .filter_map(|d| self.blob_path(d).ok())
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Forgets `name` and deletes every blob, manifest and root disk no other name uses.
    /// Returns how many files went.
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
            if !kept.contains(digest) && fs::remove_file(self.blob_path(digest)?).is_ok() {
                removed += 1;
            }
        }
        if !kept.contains(&gone.manifest_digest) {
            let hex = hex_of(&gone.manifest_digest)?;
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

    pub fn read(&self, digest: &str) -> Result<Vec<u8>, Error> {
        let path = self.blob_path(digest)?;
        fs::read(&path).map_err(self.io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_matching_content_enters_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let digest = format!("sha256:{:x}", Sha256::digest(b"layer"));
        assert!(!store.has(&digest));
        store.put(&digest, b"layer").unwrap();
        assert!(store.has(&digest));
        assert_eq!(store.read(&digest).unwrap(), b"layer");

        let other = format!("sha256:{:x}", Sha256::digest(b"other"));
        assert!(matches!(
            store.put(&other, b"tampered"),
            Err(Error::Mismatch { .. })
        ));
        assert!(!store.has(&other));
        let leftovers = fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(leftovers, 1, "a refused blob left files behind");
        assert!(matches!(
            store.put("md5:abc", b""),
            Err(Error::BadDigest(_))
        ));
    }
}
