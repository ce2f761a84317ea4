//! One blob from a registry into the store: streamed to its `.partial-<hex>` file while
//! hashed, verified, renamed into place ([`crate::store::Store::resumable`]). Memory
//! stays at one network chunk whatever the blob's size.
//!
//! A download that an earlier pull left unfinished continues with an HTTP range request
//! (`Range: bytes=<kept>-`); a registry that answers with the whole blob (200 instead of
//! 206) is read from the start. If bytes kept from before do not verify once the blob is
//! complete, it is fetched once more from the first byte.

use crate::digest::Digest;
use crate::progress::{BlobMeter, Event, Reporter};
use crate::store::{self, BlobWriter, Store};
use futures_util::StreamExt;
use oci_client::client::BlobResponse;
use oci_client::manifest::OciDescriptor;
use oci_client::Client;
use std::io::Write;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Registry(#[from] oci_client::errors::OciDistributionError),
    #[error("blob {digest}: the connection failed after {bytes} of {size} bytes ({source}); pull again to continue from there")]
    Interrupted {
        digest: String,
        bytes: u64,
        size: u64,
        source: std::io::Error,
    },
    #[error("blob {digest}: the store's file system filled up after {bytes} of {size} bytes; nothing of the image is kept: free space and pull again")]
    NoSpace {
        digest: String,
        bytes: u64,
        size: u64,
    },
    #[error("blob {digest}: writing it into the store: {source}")]
    Write {
        digest: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl Error {
    /// Whether the registry sent something the store refused (as opposed to a
    /// download that stopped and may be continued).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Store(_))
    }

    /// Whether the store's file system filled up: what was downloaded is dropped, as
    /// keeping it for a resume would keep the space the user has to free.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::NoSpace { .. })
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Registry(_) => "image.pull_failed",
            Self::Interrupted { .. } => "image.pull_interrupted",
            Self::NoSpace { .. } => "image.no_space",
            Self::Write { .. } => "image.store_failed",
            Self::Store(e) => e.code(),
        }
    }
}

/// A blob the manifest names, checked: a parsed digest and a non-negative size.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub digest: Digest,
    pub size: u64,
    pub descriptor: OciDescriptor,
}

/// Where the blob comes from.
pub struct Origin<'a> {
    pub client: &'a Client,
    pub reference: &'a oci_client::Reference,
}

/// Fetches `blob` into `store`; returns the bytes that went over the network.
pub async fn fetch(
    origin: Origin<'_>,
    store: &Store,
    blob: &Wanted,
    reporter: &Reporter,
) -> Result<u64, Error> {
    let mut writer = store.resumable(&blob.digest, blob.size)?;
    let mut received = 0;
    // A second round only when bytes kept from an earlier pull did not verify.
    for _ in 0..2 {
        if writer.len() == blob.size && writer.check(Some(blob.size)).is_ok() {
            break; // an earlier pull got every byte but was stopped before the rename
        }
        if writer.len() >= blob.size {
            writer.restart()?;
        }
        let kept = writer.len();
        received += stream_into(&origin, blob, &mut writer, reporter).await?;
        if kept == 0 || writer.check(Some(blob.size)).is_ok() {
            break;
        }
        writer.restart()?;
    }
    writer.commit(Some(blob.size))?;
    reporter.emit(Event::BlobDone {
        digest: blob.digest.to_string(),
        size: blob.size,
    });
    Ok(received)
}

/// Streams the rest of the blob (from `writer.len()`) into `writer`.
async fn stream_into(
    origin: &Origin<'_>,
    blob: &Wanted,
    writer: &mut BlobWriter,
    reporter: &Reporter,
) -> Result<u64, Error> {
    let offset = writer.len();
    // `bytes=0-` on a fresh download too: the whole blob either way, and this client's
    // own end-of-stream digest check (on 200 answers) is then left to the store, which
    // reports a mismatch with its stable code.
    let mut stream = match origin
        .client
        .pull_blob_stream_partial(origin.reference, &blob.descriptor, offset, None)
        .await?
    {
        BlobResponse::Partial(stream) => stream,
        BlobResponse::Full(stream) => {
            if offset > 0 {
                writer.restart()?;
            }
            stream
        }
    };
    let digest = blob.digest.to_string();
    let mut meter = BlobMeter::start(reporter, &digest, blob.size, writer.len());
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            // Every byte arrived: the store's own check decides (see above).
            Err(_) if writer.len() == blob.size => break,
            Err(source) => {
                return Err(Error::Interrupted {
                    digest,
                    bytes: writer.len(),
                    size: blob.size,
                    source,
                })
            }
        };
        if let Err(source) = writer.write_all(&chunk) {
            if writer.overflowed() {
                return Err(store::Error::TooLarge {
                    digest,
                    limit: blob.size,
                }
                .into());
            }
            if source.raw_os_error() == Some(libc::ENOSPC) {
                return Err(Error::NoSpace {
                    bytes: writer.len(),
                    size: blob.size,
                    digest,
                });
            }
            return Err(Error::Write { digest, source });
        }
        received += chunk.len() as u64;
        meter.update(writer.len());
    }
    Ok(received)
}
