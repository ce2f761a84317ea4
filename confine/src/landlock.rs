//! Landlock (Linux 5.13+): after set-up a process may touch files only beneath the
//! directories it was given (its runtime directory: its socket, the vsock daemon's host
//! sockets) and read and map the system's libraries; every other open, create, rename
//! or unlink fails with EACCES, whatever the uid (root included) and file permissions.
//! Like seccomp, a Landlock domain belongs to the thread that enters it and to the
//! threads it spawns afterwards: a process enters it before its first thread starts.
//!
//! Raw syscalls (`landlock_create_ruleset`, `landlock_add_rule`,
//! `landlock_restrict_self`), written against the kernel's uapi
//! (`include/uapi/linux/landlock.h`); every right the running kernel's ABI knows is
//! handled, so a right it adds later cannot be used to get around the rules.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this kernel has no Landlock (Linux 5.13+ with landlock in CONFIG_LSM or lsm=): {0}")]
    Unsupported(io::Error),
    #[error("landlock: creating the ruleset: {0}")]
    Ruleset(io::Error),
    #[error("landlock: opening {path} for a rule: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("landlock: adding the rule for {path}: {source}")]
    Rule { path: PathBuf, source: io::Error },
    #[error("landlock: entering the ruleset: {0}")]
    Restrict(io::Error),
}

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: u32 = 1;

// Filesystem rights, by the ABI version that added them.
const EXECUTE: u64 = 1 << 0;
const READ_FILE: u64 = 1 << 2;
const READ_DIR: u64 = 1 << 3;
/// ABI 1: bits 0 (EXECUTE) to 12 (MAKE_SYM).
const ABI1: u64 = (1 << 13) - 1;
/// ABI 2 adds REFER, 3 TRUNCATE, 5 IOCTL_DEV (4 and 6 add network and scoping only).
const REFER: u64 = 1 << 13;
const TRUNCATE: u64 = 1 << 14;
const IOCTL_DEV: u64 = 1 << 15;

/// Directories whose files a process may read and map (its libraries, loaded lazily by
/// the C library for some paths).
const SYSTEM_READ_ONLY: &[&str] = &["/usr/lib", "/lib", "/lib64", "/usr/lib64"];

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The filesystem rights ABI `abi` knows.
fn handled(abi: i64) -> u64 {
    let mut rights = ABI1;
    if abi >= 2 {
        rights |= REFER;
    }
    if abi >= 3 {
        rights |= TRUNCATE;
    }
    if abi >= 5 {
        rights |= IOCTL_DEV;
    }
    rights
}

/// The Landlock ABI version of the running kernel.
pub fn abi() -> Result<i64, Error> {
    // SAFETY: with a null attribute, size 0 and the VERSION flag the kernel only returns
    // its ABI version; no memory is read or written.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if abi < 1 {
        return Err(Error::Unsupported(io::Error::last_os_error()));
    }
    Ok(abi)
}

/// Restricts the calling thread (and the threads it spawns later) to files beneath
/// `writable` (every right but executing), reading the files and directories in
/// `readable` (those that exist), and reading and mapping the system's libraries. Needs
/// no_new_privs set first (see [`crate::privileges`]). Returns the ABI version it ran
/// under.
pub fn restrict(writable: &[PathBuf], readable: &[PathBuf]) -> Result<i64, Error> {
    let abi = abi()?;
    let all = handled(abi);
    let attr = RulesetAttr {
        handled_access_fs: all,
    };
    // SAFETY: `attr` is a valid landlock_ruleset_attr of the size passed (its first
    // field; the kernel accepts a shorter struct from older callers).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        )
    };
    if fd < 0 {
        return Err(Error::Ruleset(io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut rules: Vec<(PathBuf, u64)> = writable
        .iter()
        .map(|dir| (dir.clone(), all & !EXECUTE))
        .collect();
    // A rule on a file may carry file rights only.
    rules.extend(readable.iter().filter(|p| p.exists()).map(|p| {
        let access = if p.is_dir() {
            READ_FILE | READ_DIR
        } else {
            READ_FILE
        };
        (p.clone(), access)
    }));
    rules.extend(
        SYSTEM_READ_ONLY
            .iter()
            .map(Path::new)
            .filter(|p| p.is_dir())
            .map(|p| (p.to_path_buf(), READ_FILE | READ_DIR | EXECUTE)),
    );
    for (path, access) in rules {
        add_rule(&ruleset, &path, access)?;
    }
    // SAFETY: restricting the calling thread with a ruleset descriptor we own; the
    // kernel checks no_new_privs.
    if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) } != 0 {
        return Err(Error::Restrict(io::Error::last_os_error()));
    }
    Ok(abi)
}

fn add_rule(ruleset: &OwnedFd, path: &Path, access: u64) -> Result<(), Error> {
    let dir = File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
    let attr = PathBeneathAttr {
        allowed_access: access,
        parent_fd: dir.as_raw_fd(),
    };
    // SAFETY: a valid packed landlock_path_beneath_attr and descriptors we own for the
    // duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        )
    };
    if rc != 0 {
        return Err(Error::Rule {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}
