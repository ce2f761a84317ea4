//! Tests that could not run on this host are reported, never passed silently.
//!
//! [`not_run`] prints the reason and appends `NAME<TAB>REASON` to the file named by
//! `MICROAGENT_TEST_REPORT` (set by `make test`); `scripts/test-summary.sh` counts those
//! lines and names them in the summary that ends `make test`. [`retried`] does the same
//! for a run the test rig itself lost (`<report>.retried`): named, not counted as a
//! failure.

use std::env;
use std::fs::OpenOptions;
use std::io::Write;

pub const REPORT_ENV: &str = "MICROAGENT_TEST_REPORT";

/// Records that the test `name` did not run here, and why.
pub fn not_run(name: &str, why: &str) {
    record(name, why, "NOT RUN", "");
}

/// Records that a run of `name` was lost to the rig (not to the test) and run again.
pub fn retried(name: &str, why: &str) {
    record(name, why, "RETRIED", ".retried");
}

/// Keeps the output of a lost run of `name` beside the report (`<report>.lost/NAME.log`),
/// since libtest shows nothing of a test that then passes; returns where, if it did.
pub fn keep_lost_output(name: &str, output: &str) -> Option<std::path::PathBuf> {
    let mut dir = env::var_os(REPORT_ENV).filter(|p| !p.is_empty())?;
    dir.push(".lost");
    let dir = std::path::PathBuf::from(dir);
    let path = dir.join(format!("{name}.log"));
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, output))
        .ok()?;
    Some(path)
}

fn record(name: &str, why: &str, label: &str, suffix: &str) {
    let why = why.replace(['\n', '\t'], " ");
    eprintln!("{label} {name}: {why}");
    let Some(report) = env::var_os(REPORT_ENV).filter(|p| !p.is_empty()) else {
        return;
    };
    let mut path = report;
    path.push(suffix);
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{name}\t{why}"));
    if let Err(e) = written {
        // The summary would not say it: fail loudly instead.
        panic!("cannot record {name} ({label}) in {path:?}: {e}");
    }
}
