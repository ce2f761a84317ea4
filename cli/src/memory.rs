//! Guest memory against the host's: a workspace may not ask for more memory than the
//! host has in total (`MemTotal` in /proc/meminfo). Checked at create and again at
//! start, since a workspace may have been created on another host or edited since.

use crate::error::{CliError, Result};
use std::fs;

/// Where the host says whether shmem (a memfd, such as guest memory) gets transparent
/// huge pages.
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// Whether guest memory can get huge pages on this host, and a sentence saying so.
/// The VMM advises guest memory for them (MADV_HUGEPAGE); that takes effect when the
/// host's shmem setting is `advise`, `always`, `within_size` or `force`.
pub fn huge_pages() -> (bool, String) {
    match fs::read_to_string(SHMEM_THP) {
        Ok(text) => shmem_thp(&text),
        Err(e) => (
            false,
            format!("{SHMEM_THP}: {e} (no transparent huge pages)"),
        ),
    }
}

fn shmem_thp(text: &str) -> (bool, String) {
    let chosen = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or("unknown");
    let ok = matches!(chosen, "advise" | "always" | "within_size" | "force");
    let effect = if ok {
        "guest memory gets huge pages"
    } else {
        "guest memory uses 4 KiB pages, and Linux guests boot slower (2-3x in the nested rig)"
    };
    (
        ok,
        format!("shmem transparent huge pages: {chosen}; {effect}"),
    )
}

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
    fn guest_memory_gets_huge_pages_only_where_the_host_allows_them_for_shmem() {
        let (ok, detail) = shmem_thp("always within_size [advise] never deny force\n");
        assert!(ok, "{detail}");
        assert!(detail.contains(": advise;"), "{detail}");
        let (ok, detail) = shmem_thp("always within_size advise [never] deny force\n");
        assert!(!ok);
        assert!(
            detail.contains(": never;") && detail.contains("4 KiB"),
            "{detail}"
        );
        assert!(!shmem_thp("always within_size advise never [deny] force").0);
    }

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
