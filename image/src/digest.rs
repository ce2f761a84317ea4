//! Content digests, parsed strictly before they name anything on disk.
//!
//! Every digest that arrives from a manifest, an index, a layout's `index.json`, a
//! `docker save` manifest or `refs.json` is parsed here first: `sha256:` followed by
//! exactly 64 lowercase hex digits. Nothing else can become part of a path, so
//! `sha256:/dev/zero` or `sha256:../../etc/shadow` never reach the filesystem.

use std::fmt;

/// The only algorithm the store keys blobs by.
const ALGORITHM: &str = "sha256";
const HEX_LEN: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "digest {0:?} uses an algorithm this store does not support (only sha256 is: re-push the image with sha256 digests)"
    )]
    UnsupportedAlgorithm(String),
    #[error("digest {0:?} is malformed (expected sha256: and 64 lowercase hex digits)")]
    Malformed(String),
}

impl Error {
    /// The stable code users see.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnsupportedAlgorithm(_) => "image.unsupported_digest",
            Self::Malformed(_) => "image.bad_digest",
        }
    }
}

/// A validated `sha256:<64 lowercase hex>` digest. Serialized as its text; there is
/// deliberately no `Deserialize`: text becomes a `Digest` through [`Digest::parse`] only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Digest(String);

impl Digest {
    pub fn parse(text: &str) -> Result<Self, Error> {
        let Some((algorithm, hex)) = text.split_once(':') else {
            return Err(Error::Malformed(text.into()));
        };
        // OCI algorithm names: lowercase letters and digits with separators.
        let algorithm_ok = !algorithm.is_empty()
            && algorithm
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        if algorithm != ALGORITHM {
            return Err(if algorithm_ok {
                Error::UnsupportedAlgorithm(text.into())
            } else {
                Error::Malformed(text.into())
            });
        }
        let hex_ok = hex.len() == HEX_LEN
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(Error::Malformed(text.into()));
        }
        Ok(Self(text.into()))
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Self::from_hasher(sha2::Sha256::new_with_prefix(data))
    }

    /// The digest a hasher has computed so far.
    pub fn from_hasher(hasher: sha2::Sha256) -> Self {
        use sha2::Digest as _;
        Self(format!("{ALGORITHM}:{:x}", hasher.finalize()))
    }

    /// The 64 hex digits: safe as a file name (no `/`, `.` or anything else).
    pub fn hex(&self) -> &str {
        &self.0[ALGORITHM.len() + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sha256_with_64_lowercase_hex_digits_is_a_digest() {
        let good = format!("sha256:{}", "0123456789abcdef".repeat(4));
        assert_eq!(Digest::parse(&good).unwrap().hex(), &good[7..]);
        assert_eq!(Digest::of(b"").hex().len(), 64);
        for bad in [
            "sha256:/dev/zero".to_owned(),
            "sha256:../../../etc/shadow".to_owned(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}", "a".repeat(65)),
            format!("sha256:{}/", "a".repeat(63)),
            format!("sha256:{}\n", "a".repeat(64)),
            "sha256:".to_owned(),
            "sha256".to_owned(),
            String::new(),
            format!("../x:{}", "a".repeat(64)),
        ] {
            assert_eq!(
                Digest::parse(&bad).unwrap_err().code(),
                "image.bad_digest",
                "{bad:?}"
            );
        }
        for other in [
            format!("sha512:{}", "a".repeat(128)),
            format!("md5:{}", "a".repeat(32)),
        ] {
            let err = Digest::parse(&other).unwrap_err();
            assert_eq!(err.code(), "image.unsupported_digest", "{other}");
            assert!(err.to_string().contains("only sha256"), "{err}");
        }
    }
}
