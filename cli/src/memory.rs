//! Guest memory against the host's: a workspace may not ask for more memory than the
//! host has in total (`MemTotal` in /proc/meminfo). Checked at create and again at
//! start, since a workspace may have been created on another host or edited since.

use crate::error::{CliError, Result};
use std::fs;

/// The host's total memory in MiB, from /proc/meminfo (`None` when unreadable).
pub fn host_total_mib() -> Option<u64> {
    parse_mem_total(&fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib >> 10)
}

/// Refuses `memory_mib` above `host_mib`; `code` and `subject` say where it came from.
pub fn check(
    memory_mib: u64,
    host_mib: Option<u64>,
    code: &'static str,
    subject: &str,
) -> Result<()> {
    match host_mib {
        Some(host) if memory_mib > host => Err(CliError::new(
            code,
            format!(
                "{subject} asks for {memory_mib} MiB of memory, more than this host has in total ({host} MiB); use at most {host}M, and less to leave the host room"
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_above_the_host_total_is_refused() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(24000));
        assert_eq!(parse_mem_total("nothing"), None);
        assert!(check(24000, Some(24000), "c", "x").is_ok());
        let err = check(
            1 << 20,
            Some(24000),
            "input.memory_exceeds_host",
            "--memory 1T",
        )
        .unwrap_err();
        assert_eq!(err.code, "input.memory_exceeds_host");
        assert!(err.message.contains("24000 MiB"), "{err}");
        assert!(host_total_mib().is_some_and(|m| m > 0));
    }
}
