//! Where microagent keeps its state: `$MICROAGENT_HOME`, else `/var/lib/microagent`
//! for root, else `$XDG_DATA_HOME/microagent` (`~/.local/share/microagent`).
//!
//! `scripts/build-kernel.sh` follows the same rule; a test keeps the two in step.

use sha2::{Digest, Sha256};
use std::env;
use std::path::{Path, PathBuf};

/// The project's guest kernel configuration, applied on top of `make tinyconfig`. Its
/// sha256 names the cache entry the kernel is built into.
pub const KERNEL_CONFIG: &str = include_str!("../../guest/kernel/microagent.config");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot tell where to keep microagent's state: set MICROAGENT_HOME or HOME")]
    NoHome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The home this process should use, from its environment and user.
    pub fn from_env() -> Result<Self, Error> {
        if let Some(dir) = env::var_os("MICROAGENT_HOME").filter(|d| !d.is_empty()) {
            return Ok(Self::new(dir));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return Ok(Self::new("/var/lib/microagent"));
        }
        if let Some(dir) = env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return Ok(Self::new(PathBuf::from(dir).join("microagent")));
        }
        let home = env::var_os("HOME")
            .filter(|d| !d.is_empty())
            .ok_or(Error::NoHome)?;
        Ok(Self::new(
            PathBuf::from(home).join(".local/share/microagent"),
        ))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn kernels(&self) -> PathBuf {
        self.root.join("kernels")
    }

    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    pub fn workspaces(&self) -> PathBuf {
        self.root.join("workspaces")
    }

    /// Sockets and pid files of running workspaces: short, because a unix socket path
    /// must fit in 108 bytes.
    pub fn runtime(&self) -> PathBuf {
        if let Some(dir) = env::var_os("MICROAGENT_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // Per home, so that two homes (tests, users) never share sockets.
            let tag = Sha256::digest(self.root.as_os_str().as_encoded_bytes());
            return PathBuf::from(format!(
                "/run/microagent/{:02x}{:02x}{:02x}{:02x}",
                tag[0], tag[1], tag[2], tag[3]
            ));
        }
        env::var_os("XDG_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join("microagent"))
            .unwrap_or_else(|| self.root.join("run"))
    }

    /// Where `scripts/build-kernel.sh` puts the kernel built from [`KERNEL_CONFIG`].
    pub fn default_kernel(&self) -> PathBuf {
        self.kernels().join(kernel_config_hash()).join("vmlinux")
    }
}

/// The lowercase hex sha256 of [`KERNEL_CONFIG`].
pub fn kernel_config_hash() -> String {
    Sha256::digest(KERNEL_CONFIG.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn default_kernel_path_matches_the_build_script() {
        let dir = tempfile::tempdir().unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/build-kernel.sh");
        let out = Command::new("bash")
            .arg(script)
            .arg("--path")
            .env("MICROAGENT_HOME", dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            Path::new(printed.trim_end()),
            Home::new(dir.path()).default_kernel()
        );
    }

    #[test]
    fn config_hash_names_the_cache_entry() {
        let hash = kernel_config_hash();
        assert_eq!(hash.len(), 64);
        assert!(Home::new("/h")
            .default_kernel()
            .starts_with(format!("/h/kernels/{hash}")));
    }
}
