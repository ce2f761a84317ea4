//! Starting from a snapshot: a halted workspace rolled back in place
//! (`start NAME --from-snapshot T`), or a new workspace forked from one
//! (`create NEW --from-snapshot NAME:T`). Both refuse a kernel or initrd other than the
//! snapshot's before anything changes, start new daemons and a new VMM on a disk copy,
//! and give an agent its secrets again; a fork also gets its own identity.

use crate::error::{CliError, Result};
use crate::home::Home;
use crate::kill_point;
use crate::runtime::{self, State};
use crate::snapshot::{self, Snapshot};
use crate::workspace::{self, Config, Network};
use microagent_agent_protocol::client::Connection;
use std::fs;
use std::io::Read;
use std::time::Duration;

const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Entropy handed to a fork's kernel RNG.
const ENTROPY_BYTES: usize = 64;

/// Rolls a halted (or created, or crashed) workspace back to snapshot `tag`: disk,
/// memory and devices; everything since is discarded. Running when this returns.
pub fn rollback(home: &Home, config: &Config, tag: &str) -> Result<Duration> {
    let name = &config.name;
    match runtime::state(home, name) {
        State::Running | State::Paused => {
            return Err(CliError::new(
                "workspace.running",
                format!(
                    "{name} is running: halt it before rolling it back (microagent halt {name})"
                ),
            ))
        }
        State::Crashed { .. } => runtime::kill_all(home, name),
        State::Created | State::Halted => {}
    }
    let snap = snapshot::open(home, name, tag)?;
    snap.check_artifacts(&config.kernel, config.initrd.as_deref())?;
    let disk = workspace::rootfs(home, name);
    let tmp = restoring_disk(home, name);
    let _ = fs::remove_file(&tmp);
    workspace::copy_disk(&snap.disk(), &tmp)?;
    kill_point::reached("rollback.disk_copied");
    fs::rename(&tmp, &disk).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        CliError::new("home.unwritable", format!("{}: {e}", disk.display()))
    })?;
    kill_point::reached("rollback.disk_replaced");
    let took = runtime::restore(home, config, &snap.vm_dir())?;
    if config.agent && !config.secrets.is_empty() {
        if let Err(e) = runtime::deliver_secrets(home, config) {
            let e = why(home, name, e);
            runtime::halt(home, config);
            return Err(e);
        }
    }
    Ok(took)
}

/// `e`, and why the workspace stopped meanwhile if it did (the agent of a VM that went
/// away does not answer).
fn why(home: &Home, name: &str, mut e: CliError) -> CliError {
    if let Some(why) = runtime::stopped_meanwhile(home, name) {
        e.message.push_str(&why);
    }
    e
}

/// Where a rollback copies the snapshot's disk before renaming it over the workspace's:
/// a rollback killed before the rename leaves it, and the next start removes it.
pub fn restoring_disk(home: &Home, name: &str) -> std::path::PathBuf {
    workspace::dir(home, name).join(".rootfs.restoring")
}

/// `NAME:TAG` as `create --from-snapshot` takes it.
pub fn parse_source(text: &str) -> Result<(&str, &str)> {
    let (name, tag) = text.split_once(':').ok_or_else(|| {
        CliError::new(
            "input.bad_snapshot_ref",
            format!("--from-snapshot {text:?} is not WORKSPACE:TAG"),
        )
    })?;
    workspace::validate_name(name)?;
    snapshot::validate_tag(tag)?;
    Ok((name, tag))
}

/// Creates workspace `new` from a snapshot and starts it: a private copy of the disk
/// and initrd, its own daemons and VMM, then (with an agent) a fresh identity and the
/// secrets. Nothing of `new` is left when this fails. The caller holds `new`'s lock.
pub fn fork(home: &Home, new: &str, snap: &Snapshot) -> Result<(Config, Duration)> {
    workspace::validate_name(new)?;
    let dir = workspace::dir(home, new);
    if workspace::fork_interrupted(home, new) {
        // The caller holds the lock: whoever forked it is gone. This fork replaces it.
        runtime::kill_all(home, new);
        fs::remove_dir_all(&dir).map_err(|e| CliError::new("home.unwritable", e.to_string()))?;
    }
    if dir.exists() {
        return Err(CliError::new(
            "workspace.exists",
            format!("a workspace named {new} already exists"),
        ));
    }
    let source = &snap.info.workspace;
    snap.check_artifacts(&source.kernel, snap.initrd().as_deref())?;
    workspace::sweep_interrupted(home);
    let tmp = workspace::creating_dir(home, new);
    let made = (|| {
        fs::create_dir_all(&tmp).map_err(|e| CliError::new("home.unwritable", e.to_string()))?;
        workspace::copy_disk(&snap.disk(), &tmp.join("rootfs.ext4"))?;
        kill_point::reached("fork.disk_copied");
        let initrd = match snap.initrd() {
            Some(from) => {
                fs::copy(&from, tmp.join("initrd.cpio"))
                    .map_err(|e| CliError::new("home.unwritable", e.to_string()))?;
                Some(dir.join("initrd.cpio"))
            }
            None => None,
        };
        let (cid, mac) = fresh_addresses(source)?;
        let config = Config {
            name: new.to_owned(),
            cid,
            mac: (source.net != Network::None).then_some(mac),
            initrd,
            cmdline: source.cmdline.replace(
                &format!("microagent.hostname={}", source.name),
                &format!("microagent.hostname={new}"),
            ),
            created: workspace::now_rfc3339(),
            // Host ports belong to the source: a fork listening on them too would fail.
            publish: Vec::new(),
            ..source.clone()
        };
        fs::write(
            tmp.join("workspace.json"),
            serde_json::to_vec_pretty(&config).unwrap_or_default(),
        )
        .map_err(|e| CliError::new("home.unwritable", e.to_string()))?;
        fs::write(tmp.join(workspace::FORK_PENDING), workspace::fork_marker())
            .map_err(|e| CliError::new("home.unwritable", e.to_string()))?;
        fs::rename(&tmp, &dir).map_err(|e| CliError::new("home.unwritable", e.to_string()))?;
        Ok(config)
    })();
    let config = made.inspect_err(|_| {
        let _ = fs::remove_dir_all(&tmp);
    })?;
    kill_point::reached("fork.in_place");
    let started = runtime::restore(home, &config, &snap.vm_dir()).and_then(|took| {
        kill_point::reached("fork.running");
        if config.agent {
            let result = give_identity(home, &config).and_then(|()| {
                if config.secrets.is_empty() {
                    Ok(())
                } else {
                    runtime::deliver_secrets(home, &config)
                }
            });
            if let Err(e) = result {
                // Said before the fork and its logs go (a failed start says it itself).
                let e = why(home, new, e);
                runtime::halt(home, &config);
                return Err(e);
            }
        }
        Ok(took)
    });
    let started = started.and_then(|took| {
        fs::remove_file(dir.join(workspace::FORK_PENDING))
            .map(|()| took)
            .map_err(|e| CliError::new("home.unwritable", e.to_string()))
    });
    match started {
        Ok(took) => Ok((config, took)),
        Err(e) => {
            runtime::kill_all(home, new);
            let _ = fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| CliError::new("host.no_entropy", format!("/dev/urandom: {e}")))?;
    Ok(bytes)
}

/// A fork's own vsock CID (never its source's) and MAC (locally administered, unicast).
fn fresh_addresses(source: &Config) -> Result<(u32, String)> {
    let bytes = random::<10>()?;
    let [a, b, c, d, m @ ..] = bytes;
    // From 3 up to 2^31 + 2: far below VMADDR_CID_ANY, and never a reserved CID.
    let mut cid = 3 + (u32::from_le_bytes([a, b, c, d]) >> 1);
    if cid == source.cid {
        cid += 1;
    }
    let mac = [(m[0] & 0xfc) | 0x02, m[1], m[2], m[3], m[4], m[5]];
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    Ok((cid, mac))
}

/// Hostname, a new machine-id, fresh entropy for the guest's RNG and the fork's MAC,
/// through the agent.
fn give_identity(home: &Home, config: &Config) -> Result<()> {
    let random = random::<{ 16 + ENTROPY_BYTES }>()?;
    let (id, entropy) = random.split_at(16);
    let machine_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    Connection::open(&runtime::agent_socket(home, &config.name), AGENT_TIMEOUT)
        .and_then(|c| c.set_identity(&config.name, &machine_id, entropy, config.mac.as_deref()))
        .map_err(|e| CliError::new("fork.identity_failed", format!("{}: {e}", config.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_references_are_workspace_colon_tag() {
        assert_eq!(
            parse_source("builder:baseline").unwrap(),
            ("builder", "baseline")
        );
        for bad in ["builder", "builder:", ":tag", "../x:tag", "b:../t"] {
            let err = parse_source(bad).unwrap_err();
            assert!(
                matches!(
                    &*err.code,
                    "input.bad_snapshot_ref" | "workspace.invalid_name" | "snapshot.invalid_tag"
                ),
                "{bad}: {err}"
            );
        }
        assert_eq!(
            parse_source("builder").unwrap_err().code,
            "input.bad_snapshot_ref"
        );
    }
}
