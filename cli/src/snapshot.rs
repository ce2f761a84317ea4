//! Workspace snapshots: `workspaces/<name>/snapshots/<tag>/` holds the VMM's snapshot
//! (`vm/`), a copy of the root disk taken while the VM was paused (`rootfs.ext4`), the
//! initrd the guest was booted with and `snapshot.json` (tag, time, the workspace's
//! configuration). A snapshot is built in `.creating-<tag>-<pid>` and renamed: it exists
//! whole or not at all, and what a killed `snapshot create` left is swept by the next.

use crate::error::{CliError, Result};
use crate::home::Home;
use crate::kill_point;
use crate::runtime::{self, State};
use crate::workspace::{self, Config};
use microagent_agent_protocol::client::Connection;
use microagent_vmm::api::Request;
use microagent_vmm::snapshot::manifest::{Manifest, MANIFEST};
use serde::{Deserialize, Serialize};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MAX_TAG: usize = 64;
const VM_DIR: &str = "vm";
const DISK: &str = "rootfs.ext4";
const INITRD: &str = "initrd.cpio";
const INFO: &str = "snapshot.json";
/// Prefix of a snapshot being built (`.creating-<tag>-<pid>`).
const CREATING: &str = ".creating-";
/// In the runtime directory while a snapshot has the VM in another state than it was:
/// holds [`RUNNING`] or [`PAUSED`].
const INTERRUPTED: &str = "snapshot-interrupted";
const RUNNING: &str = "running";
const PAUSED: &str = "paused";
/// Writing guest memory of a large VM on a slow disk takes a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What `snapshot.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    pub tag: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// The workspace as it was when the snapshot was taken (forks start from it).
    pub workspace: Config,
}

/// A snapshot on disk and the space it takes.
#[derive(Debug, Clone)]
pub struct Entry {
    pub info: Info,
    /// Sum of the files' sizes.
    pub logical: u64,
    /// Space really allocated (sparse files and reflinks take less).
    pub allocated: u64,
}

/// A snapshot found by tag.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub info: Info,
}

impl Snapshot {
    /// The VMM's snapshot directory (`microagent-vmm --restore`).
    pub fn vm_dir(&self) -> PathBuf {
        self.dir.join(VM_DIR)
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK)
    }

    /// The initrd the snapshot's guest booted with, if it had one.
    pub fn initrd(&self) -> Option<PathBuf> {
        let path = self.dir.join(INITRD);
        path.is_file().then_some(path)
    }

    /// Refuses a kernel or initrd that differs from the one the snapshot was taken with
    /// (`snapshot.kernel_mismatch`, `snapshot.initrd_mismatch`), before anything starts.
    pub fn check_artifacts(&self, kernel: &Path, initrd: Option<&Path>) -> Result<()> {
        let path = self.vm_dir().join(MANIFEST);
        let vmm = |e: microagent_vmm::snapshot::Error| CliError::new(e.code(), e.to_string());
        let text = fs::read_to_string(&path).map_err(|e| {
            CliError::new(
                "snapshot.corrupt",
                format!("{}: {e}; delete this snapshot", path.display()),
            )
        })?;
        Manifest::parse(&path, &text)
            .and_then(|m| m.check_artifacts(kernel, initrd))
            .map_err(vmm)
    }
}

/// Tags: 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit.
pub fn validate_tag(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(CliError::new(
            "snapshot.invalid_tag",
            format!(
                "invalid snapshot tag {tag:?}: use 1-{MAX_TAG} of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
            ),
        ))
    }
}

/// The default tag: the UTC time, `20260611T085244Z`.
pub fn default_tag(now_rfc3339: &str) -> String {
    now_rfc3339.replace(['-', ':'], "")
}

pub fn root(home: &Home, name: &str) -> PathBuf {
    workspace::dir(home, name).join("snapshots")
}

/// The snapshot `tag` of workspace `name`, or `snapshot.not_found`.
pub fn open(home: &Home, name: &str, tag: &str) -> Result<Snapshot> {
    validate_tag(tag)?;
    let dir = root(home, name).join(tag);
    let path = dir.join(INFO);
    let text = fs::read_to_string(&path).map_err(|_| {
        CliError::new(
            "snapshot.not_found",
            format!("{name} has no snapshot {tag} (see `microagent snapshot list {name}`)"),
        )
    })?;
    let info = serde_json::from_str(&text)
        .map_err(|e| CliError::new("snapshot.corrupt", format!("{}: {e}", path.display())))?;
    Ok(Snapshot { dir, info })
}

/// Every complete snapshot of a workspace, oldest first (by when `snapshot.json` was
/// written: `created` has whole seconds only).
pub fn list(home: &Home, name: &str) -> Vec<Entry> {
    let mut out: Vec<(std::time::SystemTime, Entry)> = fs::read_dir(root(home, name))
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let tag = e.file_name().to_string_lossy().into_owned();
                    let snapshot = open(home, name, &tag).ok()?;
                    let written = fs::metadata(snapshot.dir.join(INFO))
                        .and_then(|m| m.modified())
                        .ok()?;
                    let (logical, allocated) = usage(&snapshot.dir);
                    let entry = Entry {
                        info: snapshot.info,
                        logical,
                        allocated,
                    };
                    Some((written, entry))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| (a.0, &a.1.info.tag).cmp(&(b.0, &b.1.info.tag)));
    out.into_iter().map(|(_, e)| e).collect()
}

pub fn count(home: &Home, name: &str) -> usize {
    list(home, name).len()
}

/// Logical and allocated bytes of every file under `dir`.
fn usage(dir: &Path) -> (u64, u64) {
    let mut total = (0, 0);
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            let (l, a) = usage(&entry.path());
            total = (total.0 + l, total.1 + a);
        } else {
            total = (total.0 + meta.len(), total.1 + meta.blocks() * 512);
        }
    }
    total
}

/// Sizes as `ls -h` would say them, in binary units: `512B`, `4KiB`, `1.5GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{}", UNITS[unit])
}

/// Bytes an unprivileged writer may still use on the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value for statvfs to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer; the result is checked.
    let ok = unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } == 0;
    ok.then(|| st.f_bavail.saturating_mul(st.f_frsize))
}

/// Snapshots a running or paused workspace as `tag`: the agent scrubs its secrets, the
/// VM is paused, the VMM writes its snapshot and the disk is copied while nothing
/// writes to it; then a running VM resumes and gets its secrets back. On failure nothing
/// is left under `snapshots/` and the workspace keeps its state.
pub fn create(home: &Home, config: &Config, tag: &str) -> Result<Info> {
    validate_tag(tag)?;
    let name = &config.name;
    recover_interrupted(home, config)?;
    let was_running = match runtime::state(home, name) {
        State::Running => true,
        State::Paused => false,
        other => {
            return Err(CliError::new(
                "workspace.not_running",
                format!(
                    "{name} is {}: only a running or paused workspace can be snapshotted (microagent start {name})",
                    other.name()
                ),
            ))
        }
    };
    let root = root(home, name);
    let dest = root.join(tag);
    if dest.exists() {
        return Err(CliError::new(
            "snapshot.tag_exists",
            format!("{name} already has a snapshot {tag}: choose another --tag or delete it"),
        ));
    }
    fs::create_dir_all(&root)
        .map_err(|e| CliError::new("home.unwritable", format!("{}: {e}", root.display())))?;
    let disk = workspace::rootfs(home, name);
    // The disk copy's room, checked before the VM pauses (the VMM checks memory's).
    let needed = fs::metadata(&disk).map_or(0, |m| m.blocks() * 512);
    if let Some(free) = free_bytes(&root).filter(|&free| free < needed) {
        return Err(CliError::new(
            "snapshot.no_space",
            format!(
                "the disk copy needs {} but {} has {} free; free space and retry",
                human(needed),
                root.display(),
                human(free)
            ),
        ));
    }
    // A snapshot create killed earlier left its directory (its pid is gone).
    microagent_image::stale::sweep(&root, &[CREATING]);
    let tmp = root.join(format!("{CREATING}{tag}-{}", std::process::id()));
    fs::create_dir(&tmp)
        .map_err(|e| CliError::new("home.unwritable", format!("{}: {e}", tmp.display())))?;
    // The agent answers only while the guest runs: a paused agent workspace runs for the
    // scrub and for getting its secrets back, and is paused again at the end.
    let runs_meanwhile = was_running || config.agent;
    let vmm = |request: Request| {
        runtime::vmm_call(home, name, &request, runtime::CONTROL_TIMEOUT).map(drop)
    };
    let made = (|| {
        if runs_meanwhile {
            // Until the VM is back as it was, a marker says how it was: a later command
            // puts it back if this one is killed in between (see `recover_interrupted`).
            let was = if was_running { RUNNING } else { PAUSED };
            fs::write(runtime::dir(home, name).join(INTERRUPTED), was).map_err(|e| {
                CliError::new("home.unwritable", format!("{}: {e}", root.display()))
            })?;
        }
        if config.agent {
            if !was_running {
                vmm(Request::Resume)?;
            }
            Connection::open(&runtime::agent_socket(home, name), AGENT_TIMEOUT)
                .and_then(Connection::prepare_snapshot)
                .map_err(|e| CliError::new("snapshot.prepare_failed", format!("{name}: {e}")))?;
        }
        if runs_meanwhile {
            vmm(Request::Pause)?;
        }
        kill_point::reached("snapshot.paused");
        let request = Request::Snapshot {
            dir: tmp.join(VM_DIR),
        };
        runtime::vmm_call(home, name, &request, SNAPSHOT_TIMEOUT)?;
        kill_point::reached("snapshot.vm_written");
        workspace::copy_disk(&disk, &tmp.join(DISK)).map_err(|e| match &*e.code {
            "home.no_space" => CliError::new("snapshot.no_space", e.message),
            _ => e,
        })?;
        kill_point::reached("snapshot.disk_copied");
        if let Some(initrd) = &config.initrd {
            fs::copy(initrd, tmp.join(INITRD)).map_err(|e| {
                CliError::new(
                    "snapshot.write_failed",
                    format!("{}: {e}", initrd.display()),
                )
            })?;
        }
        let info = Info {
            tag: tag.to_owned(),
            created: workspace::now_rfc3339(),
            workspace: config.clone(),
        };
        let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
        fs::write(tmp.join(INFO), json)
            .and_then(|()| fs::rename(&tmp, &dest))
            .map_err(|e| {
                CliError::new("snapshot.write_failed", format!("{}: {e}", dest.display()))
            })?;
        Ok(info)
    })();
    if made.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    // Back to how it was, whatever happened above (resume and pause are idempotent).
    let mut restored = if runs_meanwhile {
        vmm(Request::Resume)
    } else {
        Ok(())
    };
    if config.agent {
        if !config.secrets.is_empty() {
            restored = restored.and_then(|()| runtime::deliver_secrets(home, config));
        }
        if !was_running {
            restored = restored.and(vmm(Request::Pause));
        }
    }
    if restored.is_ok() {
        let _ = fs::remove_file(runtime::dir(home, name).join(INTERRUPTED));
    }
    let info = made?;
    restored?;
    Ok(info)
}

/// Puts back a workspace that a killed `snapshot create` left paused (or, for a paused
/// agent workspace, running) with its secrets scrubbed, as the marker that command wrote
/// says it was. Called with the workspace's lock held; a no-op without the marker.
pub fn recover_interrupted(home: &Home, config: &Config) -> Result<()> {
    let marker = runtime::dir(home, &config.name).join(INTERRUPTED);
    let Ok(was) = fs::read_to_string(&marker) else {
        return Ok(());
    };
    let name = &config.name;
    if !matches!(runtime::state(home, name), State::Running | State::Paused) {
        let _ = fs::remove_file(&marker);
        return Ok(());
    }
    let vmm = |request: Request| {
        runtime::vmm_call(home, name, &request, runtime::CONTROL_TIMEOUT).map(drop)
    };
    vmm(Request::Resume)?;
    if config.agent && !config.secrets.is_empty() {
        runtime::deliver_secrets(home, config)?;
    }
    if was == PAUSED {
        vmm(Request::Pause)?;
    }
    let _ = fs::remove_file(&marker);
    Ok(())
}

/// Forgets the marker of an interrupted snapshot: the user paused or resumed the
/// workspace since, and that is how it stays.
pub fn forget_interrupted(home: &Home, name: &str) {
    let _ = fs::remove_file(runtime::dir(home, name).join(INTERRUPTED));
}

/// Removes one snapshot.
pub fn delete(home: &Home, name: &str, tag: &str) -> Result<()> {
    let snapshot = open(home, name, tag)?;
    fs::remove_dir_all(&snapshot.dir).map_err(|e| {
        CliError::new(
            "home.unwritable",
            format!("{}: {e}", snapshot.dir.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_with_path_tricks_or_odd_characters_are_refused() {
        for good in ["baseline", "v1.2_rc-3", "20260611T085244Z"] {
            assert!(validate_tag(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "../x",
            "a/b",
            "a:b",
            "sp ace",
            &"a".repeat(65),
        ] {
            let err = validate_tag(bad).unwrap_err();
            assert_eq!(err.code, "snapshot.invalid_tag", "{bad}");
        }
    }

    #[test]
    fn the_default_tag_is_a_valid_utc_timestamp() {
        let tag = default_tag("2026-06-11T08:52:44Z");
        assert_eq!(tag, "20260611T085244Z");
        assert!(validate_tag(&default_tag(&workspace::now_rfc3339())).is_ok());
    }

    #[test]
    fn sizes_are_human_binary_units() {
        assert_eq!(human(512), "512B");
        assert_eq!(human(4096), "4KiB");
        assert_eq!(human(3 << 29), "1.5GiB");
        assert_eq!(human((12 << 20) + (300 << 10)), "12.3MiB");
    }

    #[test]
    fn usage_counts_sparse_files_by_what_they_allocate() {
        let dir = tempfile::tempdir().unwrap();
        let file = fs::File::create(dir.path().join("sparse")).unwrap();
        file.set_len(64 << 20).unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/data"), vec![1u8; 8192]).unwrap();
        let (logical, allocated) = usage(dir.path());
        assert_eq!(logical, (64 << 20) + 8192);
        assert!((8192..1 << 20).contains(&allocated), "{allocated}");
    }
}
