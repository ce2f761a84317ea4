//! Tests that could not run on this host are reported, never passed silently.
//!
//! [`not_run`] prints the reason and appends `NAME<TAB>REASON` to the file named by
//! `MICROAGENT_TEST_REPORT` (set by `make test`); `scripts/test-summary.sh` counts those
//! lines and names them in the summary that ends `make test`.

use std::env;
use std::fs::OpenOptions;
use std::io::Write;

pub const REPORT_ENV: &str = "MICROAGENT_TEST_REPORT";

/// Records that the test `name` did not run here, and why.
pub fn not_run(name: &str, why: &str) {
    let why = why.replace(['\n', '\t'], " ");
    eprintln!("NOT RUN {name}: {why}");
    let Some(path) = env::var_os(REPORT_ENV).filter(|p| !p.is_empty()) else {
        return;
    };
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{name}\t{why}"));
    if let Err(e) = written {
        // The summary would count this test as passed: fail loudly instead.
        panic!("cannot record {name} as not run in {path:?}: {e}");
    }
}
