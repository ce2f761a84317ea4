//! seccomp allow-lists, compiled with `seccompiler`. A [`Profile`] names the syscalls
//! one thread kind of one binary may make; [`Compiled`] is its BPF program, which kills
//! the whole process (SECCOMP_RET_KILL_PROCESS, death by SIGSYS) on any other syscall.
//! The aim is to take away what a compromised thread could escalate with (execve,
//! ptrace, mount, bpf, keyctl, userfaultfd, setns/unshare, personality, module and
//! kexec loading, ...), not to find the smallest list: a rare but legitimate error path
//! that dies here would lose a user's data.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // seccompiler's errors implement Display.
    #[error("building the seccomp filter {name}: {reason}")]
    Build { name: String, reason: String },
    #[error("installing the seccomp filter {name}: {reason}")]
    Install { name: String, reason: String },
}

/// What every thread of ours needs whatever it does: memory, locks, time, signals (a
/// panic, a kick), its own exit, writing logs, closing descriptors.
pub const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getpid,
    libc::SYS_gettid,
    // identity and host facts libraries ask for on rare paths; they change nothing
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getppid,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getcpu,
    libc::SYS_clock_getres,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    // the kernel asks for it when a signal (a vCPU kick) interrupts a timed sleep
    libc::SYS_restart_syscall,
    libc::SYS_sigaltstack,
    // abort() after a panic raises SIGABRT at its own thread.
    libc::SYS_tgkill,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Syscalls that fail with EACCES rather than kill, unless a profile allows them: glibc's
/// malloc opens `/proc/sys/vm/overcommit_memory` the first time a thread's heap shrinks,
/// from any thread, and carries on when that fails. Found in vhost-net under real Linux
/// (`qemu_vhost_net.rs`): the daemon died of SIGSYS on `openat`.
pub const REFUSED: &[i64] = &[libc::SYS_open, libc::SYS_openat, libc::SYS_openat2];

/// A thread kind may use a syscall's arguments to narrow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ioctl {
    /// Every request of one ioctl type (the `_IOC_TYPE` byte), e.g. 0xAE for KVM.
    Type(u8),
    /// One request number.
    Request(u32),
}

/// `prctl` options a thread that enters a profile on top of another one needs (the
/// privilege drop), and thread naming.
pub const PRCTL_CONFINE: &[i32] = &[
    libc::PR_SET_NAME,
    libc::PR_GET_NAME,
    libc::PR_SET_NO_NEW_PRIVS,
    libc::PR_GET_NO_NEW_PRIVS,
    libc::PR_CAP_AMBIENT,
    libc::PR_CAPBSET_DROP,
];

/// The allow-list of one thread kind of one binary.
#[derive(Clone, Debug)]
pub struct Profile {
    /// `binary/thread kind`, e.g. `vmm/vcpu`: in logs, and the value of
    /// [`crate::SELFTEST_ENV`] that triggers the self-test.
    pub name: String,
    syscalls: Vec<i64>,
    ioctls: Vec<Ioctl>,
    prctls: Vec<i32>,
}

impl Profile {
    /// [`BASE`] and nothing else yet; [`REFUSED`] fails with EACCES.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            syscalls: BASE.to_vec(),
            ioctls: Vec::new(),
            prctls: Vec::new(),
        }
    }

    /// The [`REFUSED`] syscalls this profile does not allow.
    fn refused(&self) -> BTreeMap<i64, Vec<SeccompRule>> {
        REFUSED
            .iter()
            .filter(|nr| !self.syscalls.contains(nr))
            .map(|&nr| (nr, Vec::new()))
            .collect()
    }

    /// Allows these syscalls whatever their arguments (`ioctl` and `prctl` go through
    /// [`Self::ioctls`] and [`Self::prctls`] instead).
    pub fn allow(mut self, syscalls: &[i64]) -> Self {
        self.syscalls.extend_from_slice(syscalls);
        self
    }

    /// Allows `ioctl` with these requests only.
    pub fn ioctls(mut self, ioctls: &[Ioctl]) -> Self {
        self.ioctls.extend_from_slice(ioctls);
        self
    }

    /// Allows `prctl` with these options only.
    pub fn prctls(mut self, options: &[i32]) -> Self {
        self.prctls.extend_from_slice(options);
        self
    }

    fn rules(&self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
        // An empty rule list allows the syscall whatever its arguments.
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            self.syscalls.iter().map(|&nr| (nr, Vec::new())).collect();
        let on_arg = |index: u8, op: SeccompCmpOp, value: u64| {
            SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
                .and_then(|c| SeccompRule::new(vec![c]))
        };
        if !self.ioctls.is_empty() {
            let ioctl = self
                .ioctls
                .iter()
                .map(|rule| match *rule {
                    Ioctl::Type(t) => on_arg(1, SeccompCmpOp::MaskedEq(0xff00), u64::from(t) << 8),
                    Ioctl::Request(r) => on_arg(1, SeccompCmpOp::Eq, u64::from(r)),
                })
                .collect::<Result<_, _>>()?;
            rules.insert(libc::SYS_ioctl, ioctl);
        }
        if !self.prctls.is_empty() {
            let prctl = self
                .prctls
                .iter()
                .map(|&option| on_arg(0, SeccompCmpOp::Eq, option as u64))
                .collect::<Result<_, _>>()?;
            rules.insert(libc::SYS_prctl, prctl);
        }
        Ok(rules)
    }
}

/// Where a filter goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The calling thread (and the threads it spawns later).
    Thread,
    /// Every thread of the process (SECCOMP_FILTER_FLAG_TSYNC).
    Process,
}

/// A profile compiled to BPF: the allow-list (anything else kills) and, stacked on it,
/// the refusals (EACCES wins over ALLOW when filters disagree).
#[derive(Clone, Debug)]
pub struct Compiled {
    name: String,
    program: BpfProgram,
    refusals: Option<BpfProgram>,
    allowed: usize,
}

impl Compiled {
    pub fn new(profile: &Profile) -> Result<Self, Error> {
        let build = |reason: String| Error::Build {
            name: profile.name.clone(),
            reason,
        };
        let mut rules = profile.rules().map_err(|e| build(e.to_string()))?;
        let allowed = rules.len();
        // The kill of the allow-list would win over the refusal's EACCES (the most
        // restrictive action wins): the allow-list lets refused syscalls through.
        let refused = profile.refused();
        rules.extend(refused.keys().map(|&nr| (nr, Vec::new())));
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(|e| build(e.to_string()))?;
        let program: BpfProgram = filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| build(e.to_string()))?;
        let refusals = if refused.is_empty() {
            None
        } else {
            let filter = SeccompFilter::new(
                refused,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EACCES as u32),
                TargetArch::x86_64,
            )
            .map_err(|e| build(e.to_string()))?;
            Some(
                filter
                    .try_into()
                    .map_err(|e: seccompiler::BackendError| build(e.to_string()))?,
            )
        };
        Ok(Self {
            name: profile.name.clone(),
            program,
            refusals,
            allowed,
        })
    }

    /// How many distinct syscalls the filter lets through.
    pub fn allowed(&self) -> usize {
        self.allowed
    }

    pub fn apply(&self, scope: Scope) -> Result<(), Error> {
        let apply = |program: &BpfProgram| {
            match scope {
                Scope::Thread => seccompiler::apply_filter(program),
                Scope::Process => seccompiler::apply_filter_all_threads(program),
            }
            .map_err(|e| Error::Install {
                name: self.name.clone(),
                reason: e.to_string(),
            })
        };
        // Refusals first: installing a filter takes prctl and seccomp, which the
        // allow-list itself may not grant.
        if let Some(refusals) = &self.refusals {
            apply(refusals)?;
        }
        apply(&self.program)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allowed_syscall_still_works_under_the_filter() {
        let profile = Profile::new("test/thread").prctls(&[libc::PR_GET_NAME]);
        let compiled = Compiled::new(&profile).expect("compile");
        let pid = std::thread::spawn(move || {
            compiled.apply(Scope::Thread).expect("apply");
            // SAFETY: getpid has no arguments.
            unsafe { libc::getpid() }
        })
        .join()
        .expect("thread");
        assert_eq!(pid, std::process::id() as i32);
    }

    #[test]
    fn a_forbidden_syscall_kills_the_process_with_sigsys() {
        let compiled = Compiled::new(&Profile::new("test/kill")).expect("compile");
        // SAFETY: the child only makes raw syscalls (no allocation, no locks) and exits.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            let _ = compiled.apply(Scope::Thread);
            // SAFETY: personality(0xffffffff) only queries; the filter kills first.
            unsafe {
                libc::syscall(libc::SYS_personality, 0xffff_ffff_u64);
                libc::_exit(0)
            }
        }
        let mut status = 0;
        // SAFETY: waiting for the child forked above.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(
            libc::WIFSIGNALED(status),
            "child exited normally: {status:#x}"
        );
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn opening_a_file_fails_with_eacces_instead_of_killing() {
        let compiled = Compiled::new(&Profile::new("test/refuse")).expect("compile");
        let allowed = Compiled::new(&Profile::new("test/open").allow(REFUSED)).expect("compile");
        assert!(allowed.refusals.is_none());
        // SAFETY: the child only makes raw syscalls (no allocation, no locks) and exits.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            let _ = compiled.apply(Scope::Thread);
            // SAFETY: open with a NUL-terminated path; errno read right after.
            let (fd, errno) = unsafe {
                let fd = libc::open(c"/proc/sys/vm/overcommit_memory".as_ptr(), libc::O_RDONLY);
                (fd, *libc::__errno_location())
            };
            // SAFETY: exiting the forked child.
            unsafe {
                libc::_exit(if fd < 0 && errno == libc::EACCES {
                    0
                } else {
                    1
                })
            }
        }
        let mut status = 0;
        // SAFETY: waiting for the child forked above.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status), "child died: {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "open did not fail with EACCES"
        );
    }

    #[test]
    fn ioctl_and_prctl_rules_match_their_arguments_only() {
        let profile = Profile::new("test/rules")
            .ioctls(&[Ioctl::Type(0xAE), Ioctl::Request(0x5421)])
            .prctls(&[libc::PR_SET_NAME]);
        let rules = profile.rules().expect("rules");
        assert_eq!(rules[&libc::SYS_ioctl].len(), 2);
        assert_eq!(rules[&libc::SYS_prctl].len(), 1);
        assert!(rules[&libc::SYS_read].is_empty());
        assert!(!rules.contains_key(&libc::SYS_execve));
    }
}
