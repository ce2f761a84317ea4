//! Confinement as the CLI sees it (issue 16): whether this kernel can filter syscalls,
//! how confined the processes of running workspaces are (read from
//! `/proc/<pid>/task/*/status`), and whether a dead process was killed by its seccomp
//! filter (the kernel logs every SECCOMP_RET_KILL_PROCESS as an audit record, type
//! 1326, in its ring buffer).

use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

/// `MICROAGENT_SECCOMP=off` starts every process of a workspace with `--seccomp=off`
/// (for debugging a process its filter killed); anything else leaves the filters on.
pub const SECCOMP_ENV: &str = "MICROAGENT_SECCOMP";

/// The flag the CLI adds to every process it starts.
pub fn seccomp_flag() -> Option<&'static str> {
    std::env::var(SECCOMP_ENV)
        .is_ok_and(|v| v == "off")
        .then_some("--seccomp=off")
}

/// How the threads of one process stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub threads: usize,
    /// Threads under a seccomp filter (`Seccomp: 2`).
    pub filtered: usize,
    pub no_new_privs: usize,
    /// Threads whose effective capability set is empty.
    pub without_capabilities: usize,
}

impl Process {
    pub fn fully_confined(&self) -> bool {
        self.threads > 0
            && self.filtered == self.threads
            && self.no_new_privs == self.threads
            && self.without_capabilities == self.threads
    }

    /// `seccomp 3/3 threads, no_new_privs 3/3, no capabilities 3/3`.
    pub fn describe(&self) -> String {
        let n = self.threads;
        format!(
            "seccomp {}/{n} threads, no_new_privs {}/{n}, no capabilities {}/{n}",
            self.filtered, self.no_new_privs, self.without_capabilities
        )
    }
}

/// PF_USER_WORKER and PF_KTHREAD: tasks the kernel runs inside a process (KVM's
/// `kvm-nx-lpage-recovery` worker) that never execute its code, hence never make its
/// syscalls; their seccomp state is whatever their creator had.
const KERNEL_WORKER: u64 = 0x4000 | 0x0020_0000;

/// The task flags field of a `/proc/.../stat` line (the 9th; the command name in
/// parentheses may hold spaces).
fn task_flags(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(6)?.parse().ok()
}

/// Reads every thread of `pid` that runs its code; `None` when the process is gone.
pub fn process(pid: u32) -> Option<Process> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut p = Process {
        threads: 0,
        filtered: 0,
        no_new_privs: 0,
        without_capabilities: 0,
    };
    for task in tasks.flatten() {
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let stat = fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if task_flags(&stat).is_some_and(|f| f & KERNEL_WORKER != 0) {
            continue;
        }
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
                .to_owned()
        };
        p.threads += 1;
        p.filtered += usize::from(field("Seccomp:") == "2");
        p.no_new_privs += usize::from(field("NoNewPrivs:") == "1");
        p.without_capabilities +=
            usize::from(u64::from_str_radix(&field("CapEff:"), 16).is_ok_and(|c| c == 0));
    }
    Some(p)
}

/// Whether this kernel can run the filters (seccomp mode 2 and the kill-process
/// action), and a sentence saying so.
pub fn kernel_support() -> (bool, String) {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !status.lines().any(|l| l.starts_with("Seccomp:")) {
        return (false, "this kernel has no seccomp (CONFIG_SECCOMP)".into());
    }
    let actions = fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
    if !actions.split_whitespace().any(|a| a == "kill_process") {
        return (
            false,
            format!(
                "seccomp cannot kill a whole process here (actions: {})",
                actions.trim()
            ),
        );
    }
    (
        true,
        "seccomp filters on by default for microagent-vmm (main, vcpu threads) and every \
         daemon (main, worker threads); no_new_privs and no capabilities after set-up"
            .into(),
    )
}

/// The sequence number of the kernel log's newest record, taken before a workspace's
/// processes start, so that a later crash report reads only records written after it
/// (a new process can reuse the pid of one killed earlier).
pub fn kmsg_newest_seq() -> Option<u64> {
    let mut newest = None;
    read_kmsg(|record| {
        if let Some(seq) = record_seq(record) {
            newest = Some(seq);
        }
    })?;
    newest
}

/// `MICROAGENT_LANDLOCK=off` starts the daemons of a workspace without Landlock (for
/// debugging); otherwise they get it wherever the kernel has it.
pub const LANDLOCK_ENV: &str = "MICROAGENT_LANDLOCK";

/// The flags that restrict a daemon to files beneath `dir` (the workspace's runtime
/// directory), when this kernel has Landlock and it is not switched off.
pub fn landlock_flags(dir: &std::path::Path) -> Vec<std::ffi::OsString> {
    let off = std::env::var(LANDLOCK_ENV).is_ok_and(|v| v == "off");
    if off || microagent_confine::landlock::abi().is_err() {
        return Vec::new();
    }
    vec!["--landlock-dir".into(), dir.into()]
}

/// Whether this kernel has Landlock, and a sentence saying what it is used for.
pub fn landlock_support() -> (bool, String) {
    match microagent_confine::landlock::abi() {
        Err(e) => (false, e.to_string()),
        Ok(_) if std::env::var(LANDLOCK_ENV).is_ok_and(|v| v == "off") => (
            false,
            format!("{LANDLOCK_ENV}=off: daemons start WITHOUT Landlock"),
        ),
        Ok(abi) => (
            true,
            format!(
                "Landlock ABI {abi}: after set-up every daemon may touch files only beneath \
                 its workspace's runtime directory, the VMM also its snapshots directory"
            ),
        ),
    }
}

/// Whether the daemon whose log is `log` says it entered its Landlock ruleset (each
/// start writes a fresh log, so the line is about the running process).
pub fn landlocked(log: &std::path::Path) -> bool {
    fs::read_to_string(log).is_ok_and(|text| {
        text.lines()
            .any(|l| l.contains("landlock ") && l.contains(": files only beneath "))
    })
}

/// The syscall whose seccomp filter killed `pid` (running `binary`), from the kernel's
/// audit record newer than sequence number `after`; `None` when there is none or the
/// log cannot be read.
pub fn seccomp_kill(pid: u32, binary: &str, after: Option<u64>) -> Option<u64> {
    let mut found = None;
    read_kmsg(|record| {
        if is_newer(record, after) {
            if let Some(nr) = kill_record(record, pid, binary) {
                found = Some(nr);
            }
        }
    })?;
    found
}

/// Calls `each` with every record in the kernel log, oldest first.
fn read_kmsg(mut each: impl FnMut(&str)) -> Option<()> {
    let mut kmsg = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    // /dev/kmsg returns one record per read and EAGAIN at the end.
    let mut record = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => each(&String::from_utf8_lossy(&record[..n])),
            // EPIPE: a record was overwritten while reading; go on with the next one.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    Some(())
}

/// Whether `record` was written after the record numbered `after` (any record when
/// nothing was taken).
fn is_newer(record: &str, after: Option<u64>) -> bool {
    match (after, record_seq(record)) {
        (Some(after), Some(seq)) => seq > after,
        (Some(_), None) => false,
        (None, _) => true,
    }
}

/// A record's sequence number: `PRIORITY,SEQ,MICROSECONDS,FLAGS;MESSAGE`.
fn record_seq(record: &str) -> Option<u64> {
    record.split(',').nth(1)?.parse().ok()
}

/// The syscall number of a seccomp kill record of `pid` running `binary`.
fn kill_record(line: &str, pid: u32, binary: &str) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let value = |key: &str| {
        fields
            .iter()
            .find_map(|f| f.strip_prefix(key).map(|v| v.trim_matches('"')))
    };
    let is_kill = line.contains("type=1326")
        && value("sig=") == Some("31")
        && value("pid=") == Some(pid.to_string().as_str())
        && value("exe=").is_some_and(|exe| exe.ends_with(&format!("/{binary}")));
    if !is_kill {
        return None;
    }
    value("syscall=")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORD: &str = "4,1234,11560443226,-;audit: type=1326 audit(1795938181.894:12): \
        auid=4294967295 uid=0 gid=0 ses=4294967295 pid=3609 comm=\"microagent-vhos\" \
        exe=\"/opt/bin/microagent-vhost-net\" sig=31 arch=c000003e syscall=135 compat=0 \
        ip=0x7f0e451a9829 code=0x80000000";

    #[test]
    fn a_kill_record_names_the_syscall_of_that_pid_and_binary_only() {
        assert_eq!(kill_record(RECORD, 3609, "microagent-vhost-net"), Some(135));
        assert_eq!(kill_record(RECORD, 3610, "microagent-vhost-net"), None);
        assert_eq!(kill_record(RECORD, 3609, "microagent-vmm"), None);
        let logged = RECORD.replace("sig=31", "sig=0");
        assert_eq!(kill_record(&logged, 3609, "microagent-vhost-net"), None);
    }

    #[test]
    fn a_record_is_ordered_by_its_sequence_number() {
        assert_eq!(record_seq(RECORD), Some(1234));
        assert_eq!(record_seq("no fields here"), None);
    }

    /// A pid reused by a later process must not inherit the crash reason of the process
    /// that had it before: only records newer than the start of the workspace count.
    #[test]
    fn a_kill_record_older_than_the_start_is_not_reported() {
        let later = RECORD.replace(",1234,", ",1300,");
        assert!(is_newer(RECORD, None));
        assert!(!is_newer(RECORD, Some(1234)));
        assert!(is_newer(&later, Some(1234)));
        assert!(!is_newer("no sequence number", Some(1)));
    }

    #[test]
    fn task_flags_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "812 (kvm-nx-lpage-re) S 1 812 812 0 -1 4210752 0 0 0 0";
        assert_eq!(task_flags(stat), Some(4_210_752));
        let odd = "9 (a) b (c) R 1 9 9 0 -1 4194560 0 0";
        assert_eq!(task_flags(odd), Some(4_194_560));
        assert_eq!(task_flags("garbage"), None);
    }

    #[test]
    fn this_process_reads_as_unconfined_threads() {
        let me = process(std::process::id()).expect("own status");
        assert!(me.threads >= 1);
        assert_eq!(me.filtered, 0, "{me:?}");
        assert!(!me.fully_confined());
    }
}
