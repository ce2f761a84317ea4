//! What a pull reports while it runs, for progress bars and for scripts (`--json`
//! prints each [`Event`] as one line). The library only emits events; how they are shown
//! is the caller's business ([`Observer`]).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a blob's byte count is reported while it downloads.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// One step of a pull. Serialized with its kind under `"event"`:
/// `{"event":"blob_progress","digest":"sha256:…","bytes":1048576,"size":4194304}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The manifest is resolved: `blobs` in all (config and layers), `missing` of them
    /// not in the store yet, `missing_bytes` to download.
    Resolved {
        reference: String,
        digest: String,
        blobs: usize,
        missing: usize,
        missing_bytes: u64,
    },
    /// A blob's download starts at `offset`: the bytes an interrupted pull had kept
    /// (0 for a fresh download, or when a resumed one had to start over).
    BlobStarted {
        digest: String,
        size: u64,
        offset: u64,
    },
    /// A blob's bytes so far (at most every [`PROGRESS_INTERVAL`]).
    BlobProgress {
        digest: String,
        bytes: u64,
        size: u64,
    },
    /// A blob is verified and in the store.
    BlobDone { digest: String, size: u64 },
    /// Every blob is in the store: `downloaded_bytes` went over the network in `seconds`.
    Pulled {
        reference: String,
        digest: String,
        downloaded_bytes: u64,
        seconds: f64,
    },
    /// Building a root disk: a layer is being applied to the tree, `bytes` of its blob
    /// read so far (at the start, at most every [`PROGRESS_INTERVAL`], and at the end).
    LayerUnpacking {
        digest: String,
        bytes: u64,
        size: u64,
    },
    /// Building a root disk: the tree is being written into ext4 (`mke2fs -d`).
    DiskFormatting,
    /// A root disk of another size: the image's cached disk copied and grown to
    /// `size` bytes (resize2fs), without unpacking again.
    DiskResizing { size: u64 },
    /// The root disk is ready, `seconds` after its build started.
    DiskBuilt { seconds: f64 },
}

/// Receives a pull's events (from the pull's own thread).
pub trait Observer: Send + Sync {
    fn event(&self, event: &Event);
}

/// Where a pull sends its events: nowhere by default.
#[derive(Clone, Default)]
pub struct Reporter(Option<Arc<dyn Observer>>);

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Reporter(observed)"
        } else {
            "Reporter(none)"
        })
    }
}

impl Reporter {
    pub fn new(observer: Arc<dyn Observer>) -> Self {
        Self(Some(observer))
    }

    pub fn emit(&self, event: Event) {
        if let Some(observer) = &self.0 {
            observer.event(&event);
        }
    }
}

/// Reports one blob's bytes, no more often than [`PROGRESS_INTERVAL`].
pub(crate) struct BlobMeter {
    reporter: Reporter,
    digest: String,
    size: u64,
    last: Instant,
}

impl BlobMeter {
    pub(crate) fn start(reporter: &Reporter, digest: &str, size: u64, offset: u64) -> Self {
        reporter.emit(Event::BlobStarted {
            digest: digest.to_owned(),
            size,
            offset,
        });
        Self {
            reporter: reporter.clone(),
            digest: digest.to_owned(),
            size,
            last: Instant::now(),
        }
    }

    pub(crate) fn update(&mut self, bytes: u64) {
        if self.last.elapsed() >= PROGRESS_INTERVAL {
            self.last = Instant::now();
            self.reporter.emit(Event::BlobProgress {
                digest: self.digest.clone(),
                bytes,
                size: self.size,
            });
        }
    }
}

/// A layer blob being read for unpacking, its bytes reported as [`Event::LayerUnpacking`]
/// (the last report is the caller's, once the layer is applied).
pub(crate) struct UnpackMeter<R> {
    inner: R,
    reporter: Reporter,
    digest: String,
    size: u64,
    read: u64,
    last: Instant,
}

impl<R> UnpackMeter<R> {
    pub(crate) fn new(inner: R, reporter: &Reporter, digest: &str, size: u64) -> Self {
        reporter.emit(Event::LayerUnpacking {
            digest: digest.to_owned(),
            bytes: 0,
            size,
        });
        Self {
            inner,
            reporter: reporter.clone(),
            digest: digest.to_owned(),
            size,
            read: 0,
            last: Instant::now(),
        }
    }
}

impl<R: std::io::Read> std::io::Read for UnpackMeter<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.last.elapsed() >= PROGRESS_INTERVAL {
            self.last = Instant::now();
            self.reporter.emit(Event::LayerUnpacking {
                digest: self.digest.clone(),
                bytes: self.read,
                size: self.size,
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_lines_that_parse_back() {
        let event = Event::BlobStarted {
            digest: "sha256:ab".into(),
            size: 10,
            offset: 4,
        };
        let line = serde_json::to_string(&event).unwrap();
        assert_eq!(
            line,
            r#"{"event":"blob_started","digest":"sha256:ab","size":10,"offset":4}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), event);
    }
}
