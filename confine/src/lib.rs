//! Confinement that every long-lived microagent process (the VMM and the vhost-user
//! daemons) applies to itself once set-up is over: files, sockets and `/dev/kvm` are
//! open, and from then on a thread only needs the syscalls of its steady state.
//!
//! - [`filter`]: a seccomp allow-list per process and thread kind ([`filter::Profile`]),
//!   compiled once with `seccompiler`; any other syscall kills the whole process
//!   (`SECCOMP_RET_KILL_PROCESS`, the process dies of SIGSYS).
//! - [`landlock`]: files only beneath given directories after set-up (Landlock LSM).
//! - [`privileges`]: `no_new_privs` and dropping every capability (effective, permitted,
//!   inheritable, ambient and, when allowed, the bounding set).
//! - [`Confinement`]: both together, entered by each thread kind.
//! - [`ConfineArgs`]: the `--seccomp=on|off` flag every binary flattens into its own;
//!   [`LandlockArgs`]: `--landlock-dir DIR`, every daemon's.
//!
//! Capabilities and seccomp filters belong to a thread, and a new thread inherits them
//! from the one that spawns it. So a thread kind is confined either by the thread that
//! spawns it (before the spawn) or by itself (first thing it does): see each binary.

pub mod filter;
pub mod landlock;
pub mod privileges;

pub use filter::{Ioctl, Profile};

/// Whether seccomp filters are installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Seccomp {
    On,
    Off,
}

/// The confinement flag shared by `microagent-vmm` and every daemon.
#[derive(Clone, Debug, clap::Args)]
pub struct ConfineArgs {
    /// seccomp filters (on by default): a syscall outside this process's allow-list
    /// kills it with SIGSYS. `off` is for debugging only; no_new_privs and dropping
    /// every capability apply either way.
    #[arg(long, value_enum, default_value_t = Seccomp::On)]
    pub seccomp: Seccomp,
}

/// The Landlock flag of the VMM and every daemon.
#[derive(Clone, Debug, clap::Args)]
pub struct LandlockArgs {
    /// After set-up, open, create, rename or remove files only beneath DIR (Landlock;
    /// repeatable), besides reading the system's libraries (and, for the VMM, its
    /// kernel and initrd). None given: no Landlock. `microagent` passes the workspace's
    /// runtime directory (and to the VMM its snapshots directory).
    #[arg(long = "landlock-dir", value_name = "DIR")]
    pub landlock_dirs: Vec<std::path::PathBuf>,
}

/// Environment variable a debug build reads: once a process has entered its Landlock
/// ruleset it tries to read the file this names and logs whether it could, so a test
/// can prove the ruleset denies a host file. Release builds do not have it.
pub const LANDLOCK_SELFTEST_ENV: &str = "MICROAGENT_LANDLOCK_SELFTEST";

/// Restricts the calling thread, and the threads it spawns afterwards, to files beneath
/// `dirs` and reading `readable` ([`landlock::restrict`]); nothing when `dirs` is
/// empty. `name` is the process kind for the log line (`vhost-blk`).
pub fn enter_landlock(
    name: &str,
    dirs: &[std::path::PathBuf],
    readable: &[std::path::PathBuf],
) -> Result<(), Error> {
    if dirs.is_empty() {
        return Ok(());
    }
    privileges::drop_all()?;
    let abi = landlock::restrict(dirs, readable)?;
    let shown: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    log::info!(
        "landlock {name}: files only beneath {} (and reading system libraries), ABI {abi}",
        shown.join(", ")
    );
    landlock_selftest();
    Ok(())
}

/// Debug builds: try to read a file on request (see [`LANDLOCK_SELFTEST_ENV`]).
#[cfg(debug_assertions)]
fn landlock_selftest() {
    if let Some(path) = std::env::var_os(LANDLOCK_SELFTEST_ENV) {
        let path = std::path::PathBuf::from(path);
        match std::fs::read(&path) {
            Ok(data) => log::warn!(
                "{LANDLOCK_SELFTEST_ENV}: read {} ({} bytes): not denied",
                path.display(),
                data.len()
            ),
            Err(e) => log::warn!("{LANDLOCK_SELFTEST_ENV}: reading {}: {e}", path.display()),
        }
    }
}

#[cfg(not(debug_assertions))]
fn landlock_selftest() {}

/// Environment variable a debug build reads: when it names the profile a thread just
/// entered (e.g. `vhost-blk/main`), that thread then calls a forbidden syscall, so a test
/// can prove the filter kills. Release builds do not have it.
pub const SELFTEST_ENV: &str = "MICROAGENT_SECCOMP_SELFTEST";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Filter(#[from] filter::Error),
    #[error(transparent)]
    Privileges(#[from] privileges::Error),
    #[error(transparent)]
    Landlock(#[from] landlock::Error),
}

/// A compiled profile and the mode it runs in; cheap to clone into the threads that
/// enter it.
#[derive(Clone, Debug)]
pub struct Confinement {
    name: String,
    filter: Option<filter::Compiled>,
}

impl Confinement {
    /// Compiles `profile` now (on the setting-up thread), unless `seccomp` is off.
    pub fn new(profile: &Profile, seccomp: Seccomp) -> Result<Self, Error> {
        let filter = match seccomp {
            Seccomp::On => Some(filter::Compiled::new(profile)?),
            Seccomp::Off => None,
        };
        Ok(Self {
            name: profile.name.clone(),
            filter,
        })
    }

    /// Confines the calling thread (and the threads it spawns later): no_new_privs, no
    /// capabilities, then the filter.
    pub fn enter(&self) -> Result<(), Error> {
        self.enter_with(filter::Scope::Thread)
    }

    /// As [`Self::enter`], but the filter also goes onto every other thread of the
    /// process at once (`SECCOMP_FILTER_FLAG_TSYNC`, which sets their no_new_privs
    /// too). Capabilities stay per thread: a thread spawned before this call drops its
    /// own.
    pub fn enter_all_threads(&self) -> Result<(), Error> {
        self.enter_with(filter::Scope::Process)
    }

    fn enter_with(&self, scope: filter::Scope) -> Result<(), Error> {
        privileges::drop_all()?;
        match &self.filter {
            Some(filter) => {
                filter.apply(scope)?;
                log::info!(
                    "confined {}: no_new_privs, no capabilities, seccomp filter of {} \
                     syscalls (any other kills the process with SIGSYS)",
                    self.name,
                    filter.allowed()
                );
            }
            None => log::warn!(
                "confined {}: no_new_privs, no capabilities; seccomp is OFF (--seccomp=off, \
                 for debugging only)",
                self.name
            ),
        }
        selftest(&self.name);
        Ok(())
    }
}

/// Debug builds: a forbidden syscall on request (see [`SELFTEST_ENV`]).
#[cfg(debug_assertions)]
fn selftest(name: &str) {
    if std::env::var(SELFTEST_ENV).is_ok_and(|v| v == name) {
        log::warn!("{SELFTEST_ENV}={name}: calling personality(2), which no profile allows");
        // SAFETY: personality(0xffffffff) only queries the persona; it changes nothing.
        let persona = unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) };
        log::warn!("{SELFTEST_ENV}: still alive (persona {persona:#x}): no filter is installed");
    }
}

#[cfg(not(debug_assertions))]
fn selftest(_name: &str) {}
