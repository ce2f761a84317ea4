//! What `image inspect` shows of an image in the store: its name's entry in
//! `refs.json`, the manifest kept with it (layer sizes and media types) and its config.

use crate::digest::Digest;
use crate::store::{self, Store, MAX_JSON};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no image {0} in the store (pull it first; see `microagent image list`)")]
    NotFound(String),
    #[error("{reference}: {source}")]
    Store {
        reference: String,
        source: store::Error,
    },
    #[error("{reference}: {what} is not valid ({why}); pull the image again")]
    Damaged {
        reference: String,
        what: String,
        why: String,
    },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "image.not_found",
            Self::Store { source, .. } => source.code(),
            Self::Damaged { .. } => "image.store_damaged",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Layer {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub reference: String,
    pub digest: String,
    pub platform: Option<String>,
    /// Bytes its blobs take in the store.
    pub size: u64,
    pub config_digest: String,
    /// Bottom first.
    pub layers: Vec<Layer>,
    /// The image config as stored (Env, Cmd, Entrypoint, history, ...).
    pub config: Value,
}

/// The stored image named `reference` (as `image list` shows it).
pub fn inspect(store: &Store, reference: &str) -> Result<Info, Error> {
    let entry = store
        .refs()
        .remove(reference)
        .ok_or_else(|| Error::NotFound(reference.to_owned()))?;
    let damaged = |what: &str, why: String| Error::Damaged {
        reference: reference.to_owned(),
        what: what.to_owned(),
        why,
    };
    let store_err = |source| Error::Store {
        reference: reference.to_owned(),
        source,
    };
    let manifest_digest = Digest::parse(&entry.manifest_digest)
        .map_err(|e| damaged("its manifest digest", e.to_string()))?;
    let config_digest = Digest::parse(&entry.config_digest)
        .map_err(|e| damaged("its config digest", e.to_string()))?;
    let config_bytes = store
        .read_small(&config_digest, MAX_JSON)
        .map_err(store_err)?;
    let config: Value =
        serde_json::from_slice(&config_bytes).map_err(|e| damaged("its config", e.to_string()))?;
    // Sizes and media types from the kept manifest; the blob files when it is gone.
    let manifest: Value = store
        .manifest(&manifest_digest)
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(Value::Null);
    let described = manifest["layers"].as_array().cloned().unwrap_or_default();
    let mut layers = Vec::new();
    for (i, digest) in entry.layers.iter().enumerate() {
        let parsed = Digest::parse(digest).map_err(|e| damaged("a layer digest", e.to_string()))?;
        let descriptor = described.get(i).filter(|d| d["digest"] == digest.as_str());
        let size = descriptor
            .and_then(|d| d["size"].as_u64())
            .or_else(|| {
                std::fs::metadata(store.blob_path(&parsed))
                    .ok()
                    .map(|m| m.len())
            })
            .unwrap_or(0);
        let media_type = descriptor
            .and_then(|d| d["mediaType"].as_str())
            .unwrap_or_default()
            .to_owned();
        layers.push(Layer {
            digest: digest.clone(),
            size,
            media_type,
        });
    }
    Ok(Info {
        reference: reference.to_owned(),
        digest: entry.manifest_digest.clone(),
        platform: entry.platform.clone(),
        size: store.size(&entry),
        config_digest: entry.config_digest.clone(),
        layers,
        config,
    })
}
