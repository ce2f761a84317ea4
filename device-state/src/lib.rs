//! The container every microagent daemon writes on VHOST_USER_SET_DEVICE_STATE_FD(SAVE)
//! and reads on LOAD:
//!
//! ```text
//! magic  "MADEVST\0"   8 bytes
//! kind   ASCII, NUL-padded to 16 bytes ("vhost-blk", "vhost-vsock", ...)
//! major  u16 LE        breaking changes; a reader refuses a major it does not know
//! minor  u16 LE        additive changes; unknown fields are ignored
//! length u32 LE        payload bytes
//! sha256 32 bytes      of the payload
//! payload              JSON of the daemon's own state struct
//! ```
//!
//! Truncated, corrupt, foreign or too-new state is refused with a typed error, so that a
//! daemon can fail CHECK_DEVICE_STATE instead of adopting garbage. [`transfer`] moves the
//! bytes through the descriptor the frontend hands over.

pub mod transfer;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"MADEVST\0";
const KIND_LEN: usize = 16;
const HEADER_LEN: usize = 8 + KIND_LEN + 2 + 2 + 4 + 32;
/// No daemon's state comes near this; a larger length field is corruption.
pub const MAX_PAYLOAD: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("device state is {0} bytes, shorter than its header")]
    ShortHeader(usize),
    #[error("device state does not start with the microagent magic")]
    BadMagic,
    #[error("device state is for {found:?}, not {expected:?}")]
    WrongKind { expected: String, found: String },
    #[error(
        "device state version {major}.{minor} is not readable (this daemon reads {supported}.x)"
    )]
    UnsupportedVersion {
        major: u16,
        minor: u16,
        supported: u16,
    },
    #[error("device state payload is {got} bytes, header says {expected}")]
    Truncated { expected: usize, got: usize },
    #[error("device state payload length {0} is over the limit")]
    TooLarge(usize),
    #[error("device state checksum does not match its payload")]
    Checksum,
    #[error("device state payload: {0}")]
    Payload(#[from] serde_json::Error),
}

/// The version a daemon writes and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

/// A daemon's saved state: the kind and version its container carries.
pub trait Saved: Serialize + DeserializeOwned {
    /// Names the daemon ("vhost-blk", ...); state of another kind is refused.
    const KIND: &'static str;
    const VERSION: Version;

    fn encode(&self) -> Result<Vec<u8>, Error> {
        encode(Self::KIND, Self::VERSION, self)
    }

    fn decode(bytes: &[u8]) -> Result<Self, Error> {
        decode(Self::KIND, Self::VERSION.major, bytes)
    }
}

/// Serializes `state` into the container.
pub fn encode<T: Serialize>(kind: &str, version: Version, state: &T) -> Result<Vec<u8>, Error> {
    let payload = serde_json::to_vec(state)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&kind_field(kind));
    out.extend_from_slice(&version.major.to_le_bytes());
    out.extend_from_slice(&version.minor.to_le_bytes());
    let len = u32::try_from(payload.len()).map_err(|_| Error::TooLarge(payload.len()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks and deserializes a container written by [`encode`] with the same kind and
/// major version.
pub fn decode<T: DeserializeOwned>(kind: &str, major: u16, bytes: &[u8]) -> Result<T, Error> {
    if bytes.len() < HEADER_LEN {
        return Err(Error::ShortHeader(bytes.len()));
    }
    let (header, payload) = bytes.split_at(HEADER_LEN);
    if &header[..8] != MAGIC {
        return Err(Error::BadMagic);
    }
    let found = &header[8..8 + KIND_LEN];
    if found != kind_field(kind) {
        let name = found.split(|&b| b == 0).next().unwrap_or_default();
        return Err(Error::WrongKind {
            expected: kind.to_owned(),
            found: String::from_utf8_lossy(name).into_owned(),
        });
    }
    let at = 8 + KIND_LEN;
    let u16_at = |i: usize| u16::from_le_bytes([header[i], header[i + 1]]);
    let (found_major, found_minor) = (u16_at(at), u16_at(at + 2));
    if found_major != major {
        return Err(Error::UnsupportedVersion {
            major: found_major,
            minor: found_minor,
            supported: major,
        });
    }
    let len = u32::from_le_bytes([
        header[at + 4],
        header[at + 5],
        header[at + 6],
        header[at + 7],
    ]) as usize;
    if len > MAX_PAYLOAD {
        return Err(Error::TooLarge(len));
    }
    if payload.len() != len {
        return Err(Error::Truncated {
            expected: len,
            got: payload.len(),
        });
    }
    if Sha256::digest(payload).as_slice() != &header[at + 8..HEADER_LEN] {
        return Err(Error::Checksum);
    }
    Ok(serde_json::from_slice(payload)?)
}

fn kind_field(kind: &str) -> [u8; KIND_LEN] {
    let mut field = [0u8; KIND_LEN];
    let n = kind.len().min(KIND_LEN);
    field[..n].copy_from_slice(&kind.as_bytes()[..n]);
    field
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        features: u64,
        name: String,
    }

    const V1: Version = Version { major: 1, minor: 0 };

    fn sample() -> Vec<u8> {
        let state = Sample {
            features: 0x1_0000_0004,
            name: "disk".into(),
        };
        encode("vhost-blk", V1, &state).unwrap()
    }

    #[test]
    fn round_trip_returns_the_same_state() {
        let back: Sample = decode("vhost-blk", 1, &sample()).unwrap();
        assert_eq!(back.features, 0x1_0000_0004);
        assert_eq!(back.name, "disk");
    }

    #[test]
    fn truncated_state_is_refused() {
        let bytes = sample();
        for cut in [0, 10, HEADER_LEN, bytes.len() - 1] {
            let err = decode::<Sample>("vhost-blk", 1, &bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, Error::ShortHeader(_) | Error::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn flipped_payload_byte_fails_the_checksum() {
        let mut bytes = sample();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x20;
        let err = decode::<Sample>("vhost-blk", 1, &bytes).unwrap_err();
        assert!(matches!(err, Error::Checksum), "{err}");
    }

    #[test]
    fn other_kind_and_newer_major_are_refused() {
        let err = decode::<Sample>("vhost-vsock", 1, &sample()).unwrap_err();
        assert!(matches!(err, Error::WrongKind { .. }), "{err}");
        let err = decode::<Sample>("vhost-blk", 2, &sample()).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedVersion { major: 1, .. }),
            "{err}"
        );
        let mut bytes = sample();
        bytes[0] = b'X';
        assert!(matches!(
            decode::<Sample>("vhost-blk", 1, &bytes).unwrap_err(),
            Error::BadMagic
        ));
    }
}
