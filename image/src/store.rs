//! The content-addressed blob store under `$MICROAGENT_HOME/images`. A blob enters the
//! store only after its sha256 matched the digest it was asked for; an interrupted or
//! corrupt download leaves nothing behind.

use sha2::{Digest, Sha256};
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
