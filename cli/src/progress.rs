//! How a pull's progress is shown on stderr: bars on a terminal (one per blob with
//! bytes/total, and an overall one with the speed; for a root disk build that takes
//! more than a second, one per layer unpacked and a spinner while mke2fs writes), one
//! JSON [`Event`] per line with `--json` (stdout keeps the single result document
//! scripts already parse), nothing otherwise.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use microagent_image::progress::{Event, Observer, Reporter};
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which display a command gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Quiet,
    Bars,
    JsonLines,
}

impl Mode {
    /// `--json` wins; bars only when stderr is a terminal.
    pub fn choose(json: bool, stderr_is_terminal: bool) -> Self {
        match (json, stderr_is_terminal) {
            (true, _) => Self::JsonLines,
            (false, true) => Self::Bars,
            (false, false) => Self::Quiet,
        }
    }

    pub fn reporter(self) -> Reporter {
        match self {
            Self::Quiet => Reporter::default(),
            Self::Bars => Reporter::new(Arc::new(Bars::new())),
            Self::JsonLines => Reporter::new(Arc::new(JsonLines)),
        }
    }
}

/// Each event as one line of JSON on stderr.
struct JsonLines;

impl Observer for JsonLines {
    fn event(&self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
        }
    }
}

/// Progress bars on stderr.
struct Bars {
    multi: MultiProgress,
    state: Arc<Mutex<BarState>>,
}

#[derive(Default)]
struct BarState {
    total: Option<ProgressBar>,
    blobs: HashMap<String, ProgressBar>,
    /// When the root disk build started (its first event).
    disk_started: Option<Instant>,
    layers: HashMap<String, ProgressBar>,
    formatting: Option<ProgressBar>,
    disk_built: bool,
}

/// A disk build shorter than this shows no bars.
const QUIET_BUILD: Duration = Duration::from_secs(1);

const TOTAL_TEMPLATE: &str =
    "{msg:12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} eta {eta}";
const BLOB_TEMPLATE: &str = "{prefix:12} [{bar:30}] {bytes:>10}/{total_bytes:<10}";
const UNPACK_TEMPLATE: &str = "{prefix:12} [{bar:30}] {bytes:>10}/{total_bytes:<10} unpacking";

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// The first 12 hex digits of a digest, as `docker pull` shows layers.
fn short(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, hex)| hex);
    hex.chars().take(12).collect()
}

impl Bars {
    fn new() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            state: Arc::new(Mutex::new(BarState::default())),
        }
    }

    /// Moves a blob's bar to `bytes`, and the overall bar by as much.
    fn advance(state: &BarState, digest: &str, bytes: u64) {
        if let Some(bar) = state.blobs.get(digest) {
            let before = bar.position();
            bar.set_position(bytes);
            if let Some(total) = &state.total {
                if bytes >= before {
                    total.inc(bytes - before);
                } else {
                    total.set_position(total.position().saturating_sub(before - bytes));
                }
            }
        }
    }
}

impl Observer for Bars {
    fn event(&self, event: &Event) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        match event {
            Event::Resolved { missing_bytes, .. } => {
                let total = self.multi.add(ProgressBar::new(*missing_bytes));
                total.set_style(style(TOTAL_TEMPLATE));
                total.set_message("total");
                state.total = Some(total);
            }
            Event::BlobStarted {
                digest,
                size,
                offset,
            } => {
                if !state.blobs.contains_key(digest) {
                    let bar = self.multi.add(ProgressBar::new(*size));
                    bar.set_style(style(BLOB_TEMPLATE));
                    bar.set_prefix(short(digest));
                    state.blobs.insert(digest.clone(), bar);
                }
                Self::advance(&state, digest, *offset);
            }
            Event::BlobProgress { digest, bytes, .. } => Self::advance(&state, digest, *bytes),
            Event::BlobDone { digest, size } => {
                Self::advance(&state, digest, *size);
                if let Some(bar) = state.blobs.get(digest) {
                    bar.finish();
                }
            }
            Event::Pulled { .. } => {
                if let Some(total) = &state.total {
                    total.finish();
                }
            }
            Event::LayerUnpacking {
                digest,
                bytes,
                size,
            } => {
                let started = *state.disk_started.get_or_insert_with(Instant::now);
                if !state.layers.contains_key(digest) && started.elapsed() >= QUIET_BUILD {
                    let bar = self.multi.add(ProgressBar::new(*size));
                    bar.set_style(style(UNPACK_TEMPLATE));
                    bar.set_prefix(short(digest));
                    state.layers.insert(digest.clone(), bar);
                }
                if let Some(bar) = state.layers.get(digest) {
                    bar.set_position(*bytes);
                }
            }
            Event::DiskFormatting => {
                // mke2fs is one long step: its spinner appears once the build has
                // taken QUIET_BUILD, if it is still running then.
                let started = *state.disk_started.get_or_insert_with(Instant::now);
                let wait = QUIET_BUILD.saturating_sub(started.elapsed());
                let (multi, shared) = (self.multi.clone(), self.state.clone());
                std::thread::spawn(move || {
                    std::thread::sleep(wait);
                    let Ok(mut state) = shared.lock() else {
                        return;
                    };
                    if !state.disk_built {
                        let spinner = multi.add(ProgressBar::new_spinner());
                        spinner.set_message("writing the ext4 root disk (mke2fs -d)");
                        spinner.enable_steady_tick(Duration::from_millis(100));
                        state.formatting = Some(spinner);
                    }
                });
            }
            Event::DiskResizing { size } => {
                let spinner = self.multi.add(ProgressBar::new_spinner());
                spinner.set_message(format!("growing the root disk to {} MiB", size >> 20));
                spinner.enable_steady_tick(Duration::from_millis(100));
                state.formatting = Some(spinner);
            }
            Event::DiskBuilt { seconds } => {
                state.disk_built = true;
                for bar in state.layers.values() {
                    bar.finish();
                }
                if let Some(spinner) = &state.formatting {
                    spinner.finish_with_message(format!("root disk built in {seconds:.1} s"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_wins_and_bars_need_a_terminal() {
        assert_eq!(Mode::choose(true, true), Mode::JsonLines);
        assert_eq!(Mode::choose(true, false), Mode::JsonLines);
        assert_eq!(Mode::choose(false, true), Mode::Bars);
        assert_eq!(Mode::choose(false, false), Mode::Quiet);
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab");
    }

    #[test]
    fn the_overall_bar_follows_every_blob_and_restarts() {
        let bars = Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            state: Arc::new(Mutex::new(BarState::default())),
        };
        let (a, b) = ("sha256:aa".to_owned(), "sha256:bb".to_owned());
        bars.event(&Event::Resolved {
            reference: "r".into(),
            digest: "d".into(),
            blobs: 2,
            missing: 2,
            missing_bytes: 300,
        });
        for (digest, size, offset) in [(&a, 100, 40), (&b, 200, 0)] {
            bars.event(&Event::BlobStarted {
                digest: digest.clone(),
                size,
                offset,
            });
        }
        bars.event(&Event::BlobProgress {
            digest: b.clone(),
            bytes: 50,
            size: 200,
        });
        let total = |bars: &Bars| {
            bars.state
                .lock()
                .unwrap()
                .total
                .as_ref()
                .unwrap()
                .position()
        };
        assert_eq!(total(&bars), 90);
        // A resumed download that starts over gives its kept bytes back.
        bars.event(&Event::BlobStarted {
            digest: a.clone(),
            size: 100,
            offset: 0,
        });
        assert_eq!(total(&bars), 50);
        bars.event(&Event::BlobDone {
            digest: a,
            size: 100,
        });
        bars.event(&Event::BlobDone {
            digest: b,
            size: 200,
        });
        assert_eq!(total(&bars), 300);
    }
}
