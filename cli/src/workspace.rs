//! A workspace on disk: `workspaces/<name>/` holds `workspace.json`, its private root
//! disk and the guest console log.

use crate::error::{CliError, Result};
use crate::home::Home;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const MAX_NAME: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub name: String,
    pub image: Option<String>,
    pub image_digest: Option<String>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Whether the guest runs microagent-agent (exec, halt through the agent).
    pub agent: bool,
    /// RFC 3339, UTC.
    pub created: String,
    /// Secrets delivered to /run/secrets at every start: name and host file.
    #[serde(default)]
    pub secrets: Vec<(String, PathBuf)>,
    /// The image's Env, WorkingDir and User: defaults for every exec.
    #[serde(default)]
    pub defaults: microagent_image::source::ExecDefaults,
    /// The guest's network (workspaces made before networking have none).
    #[serde(default)]
    pub net: Network,
    /// Inbound forwards, `[IP:]HOSTPORT:GUESTPORT[/tcp]`, checked at create.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Upstream resolvers for the guest's 10.0.2.3 (empty: the host's resolv.conf).
    #[serde(default)]
    pub dns: Vec<String>,
    /// The guest's vsock CID: [`DEFAULT_CID`] for a workspace made by `create`, its own
    /// for each fork.
    #[serde(default = "default_cid")]
    pub cid: u32,
    /// The guest's MAC on its user network (none: the net daemon's default,
    /// 52:54:00:12:34:56); each fork gets its own.
    #[serde(default)]
    pub mac: Option<String>,
}

/// The vsock CID of a workspace made by `create` (each VM has its own vsock device, so
/// all of them can use the first CID a guest may have).
pub const DEFAULT_CID: u32 = 3;

fn default_cid() -> u32 {
    DEFAULT_CID
}

/// `create --net`: which network device a workspace gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// No network device.
    #[default]
    None,
    /// A private user-mode network (microagent-vhost-net): the guest is 10.0.2.15/24,
    /// the gateway 10.0.2.2 reaches the host's loopback, DNS is 10.0.2.3.
    User,
    /// A tap device in a network namespace of the workspace's own (root): the same
    /// guest addresses, the namespace's kernel as the gateway, NAT to the host.
    Tap,
}

/// The network namespace of a `Network::Tap` workspace (made at start, removed when it
/// stops; see `microagent_vhost_net::netns`).
pub fn netns_name(name: &str) -> String {
    format!("microagent-{name}")
}

/// What the guest agent reads to configure `Network::User` and `Network::Tap` (the
/// daemon's fixed plan, the same in both).
pub const USER_NET_CMDLINE: &str =
    "microagent.ip=10.0.2.15/24 microagent.gw=10.0.2.2 microagent.dns=10.0.2.3";

/// Checks `--dns` resolvers the way the net daemon will parse them.
pub fn check_dns(specs: &[String]) -> Result<()> {
    match specs
        .iter()
        .find(|s| microagent_vhost_net::config::parse_dns(s).is_none())
    {
        Some(bad) => Err(CliError::new(
            "input.bad_dns",
            format!("--dns {bad:?} is not an IPv4 address with an optional port (1.1.1.1 or 127.0.0.1:5353)"),
        )),
        None => Ok(()),
    }
}

/// Checks `--publish` specs the way the net daemon will parse them.
pub fn check_publish(specs: &[String]) -> Result<()> {
    for spec in specs {
        spec.parse::<microagent_vhost_net::config::Publish>()
            .map_err(|e| CliError::new("input.bad_publish", e.to_string()))?;
    }
    Ok(())
}

/// Names: 1-48 of a-z 0-9 -, starting with a letter or digit (no path tricks).
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(CliError::new(
            "workspace.invalid_name",
            format!("invalid workspace name {name:?}: use 1-{MAX_NAME} of a-z, 0-9 and -, starting with a letter or digit"),
        ))
    }
}

pub fn dir(home: &Home, name: &str) -> PathBuf {
    home.workspaces().join(name)
}

/// Prefix of a workspace being built (`.creating-<name>-<pid>`), renamed to its name
/// when whole.
pub const CREATING: &str = ".creating-";

/// Where this process builds workspace `name` before renaming it into place; the pid
/// at its end lets [`sweep_interrupted`] tell a dead builder's leftovers.
pub fn creating_dir(home: &Home, name: &str) -> PathBuf {
    home.workspaces()
        .join(format!("{CREATING}{name}-{}", std::process::id()))
}

/// A fork's directory holds this file, [`fork_marker`] of the forking process, from
/// when it is renamed into place until the fork runs with its own identity.
pub const FORK_PENDING: &str = "fork-pending";

/// This process as [`FORK_PENDING`] records it: its pid and start time, so that a
/// recycled pid is not taken for the fork's.
pub fn fork_marker() -> String {
    let pid = std::process::id();
    format!("{pid} {}", start_time(pid).unwrap_or(0))
}

/// When a process started, in clock ticks after boot (`/proc/PID/stat` field 22).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(19)?.parse().ok()
}

/// Whether `name` is a fork whose `create --from-snapshot` died before the fork ran:
/// the process its [`FORK_PENDING`] names is gone (or the file is not one).
pub fn fork_interrupted(home: &Home, name: &str) -> bool {
    let Ok(text) = fs::read_to_string(dir(home, name).join(FORK_PENDING)) else {
        return false;
    };
    let fields: Vec<u64> = text
        .split_whitespace()
        .map_while(|f| f.parse().ok())
        .collect();
    match fields[..] {
        [pid, started] => u32::try_from(pid).map_or(true, |pid| start_time(pid) != Some(started)),
        _ => true,
    }
}

/// Removes what creates and forks that were killed left half built (their pid is
/// gone); returns how many went.
pub fn sweep_interrupted(home: &Home) -> usize {
    microagent_image::stale::sweep(&home.workspaces(), &[CREATING])
}

pub fn rootfs(home: &Home, name: &str) -> PathBuf {
    dir(home, name).join("rootfs.ext4")
}

pub fn console_log(home: &Home, name: &str) -> PathBuf {
    dir(home, name).join("console.log")
}

pub fn load(home: &Home, name: &str) -> Result<Config> {
    validate_name(name)?;
    let path = dir(home, name).join("workspace.json");
    let text = fs::read_to_string(&path).map_err(|_| {
        CliError::new(
            "workspace.not_found",
            format!("no workspace named {name} (see `microagent list`)"),
        )
    })?;
    serde_json::from_str(&text)
        .map_err(|e| CliError::new("workspace.corrupt", format!("{}: {e}", path.display())))
}

pub fn save(home: &Home, config: &Config) -> Result<()> {
    let dir = dir(home, &config.name);
    let tmp = dir.join(".workspace.json.tmp");
    let json = serde_json::to_vec_pretty(config).unwrap_or_default();
    fs::write(&tmp, json)
        .and_then(|()| fs::rename(&tmp, dir.join("workspace.json")))
        .map_err(|e| CliError::new("workspace.write_failed", format!("{}: {e}", dir.display())))
}

pub fn list(home: &Home) -> Vec<Config> {
    let mut out: Vec<Config> = fs::read_dir(home.workspaces())
        .map(|d| {
            d.flatten()
                .filter_map(|e| load(home, &e.file_name().to_string_lossy()).ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Copies a root disk: a reflink where the filesystem can, else a sparse copy
/// (`cp --sparse=always`). A full file system is `home.no_space`.
pub fn copy_disk(from: &Path, to: &Path) -> Result<()> {
    let out = std::process::Command::new("cp")
        .args(["--reflink=auto", "--sparse=always"])
        .arg(from)
        .arg(to)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| CliError::new("workspace.disk_copy_failed", format!("running cp: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let _ = fs::remove_file(to);
    let code = if why.contains("No space left") {
        "home.no_space"
    } else {
        "workspace.disk_copy_failed"
    };
    Err(CliError::new(
        code,
        format!(
            "copying {} to {} failed: {why}",
            from.display(),
            to.display()
        ),
    ))
}

/// Now as RFC 3339 UTC (`2026-06-11T08:52:44Z`).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fork is interrupted once the process its marker names is gone; a pid that now
    /// belongs to another process (another start time) is gone too.
    #[test]
    fn a_fork_is_interrupted_when_its_marker_names_no_live_process() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path());
        fs::create_dir_all(dir(&home, "f")).unwrap();
        assert!(!fork_interrupted(&home, "f"), "no marker: not a fork");
        let marker = dir(&home, "f").join(FORK_PENDING);
        fs::write(&marker, fork_marker()).unwrap();
        assert!(!fork_interrupted(&home, "f"), "this process forks it");
        let pid = std::process::id();
        let started = start_time(pid).unwrap();
        for other in [
            format!("{pid} {}", started + 1),
            format!("{} {started}", u32::MAX),
            format!("{pid}"),
            "not a pid".to_owned(),
        ] {
            fs::write(&marker, &other).unwrap();
            assert!(fork_interrupted(&home, "f"), "{other:?}");
        }
    }

    #[test]
    fn names_with_path_tricks_or_odd_characters_are_refused() {
        for good in ["builder", "ws-1", "0day"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            "../etc",
            "a/b",
            "UPPER",
            "white space",
            &"a".repeat(49),
        ] {
            let err = validate_name(bad).unwrap_err();
            assert_eq!(err.code, "workspace.invalid_name", "{bad}");
        }
    }

    #[test]
    fn workspaces_made_before_networking_load_without_a_network() {
        let old = r#"{"name":"old","image":null,"image_digest":null,"cpus":1,
            "memory_mib":64,"kernel":"/k","initrd":null,"cmdline":"","agent":false,
            "created":"2026-11-28T00:00:00Z"}"#;
        let config: Config = serde_json::from_str(old).unwrap();
        // Their snapshots have no net device: a restore must not add one.
        assert_eq!(config.net, Network::None);
        assert!(config.publish.is_empty());
    }

    #[test]
    fn publish_specs_with_udp_pass_and_bad_ones_fail_with_input_bad_publish() {
        let good = [
            "8080:80",
            "127.0.0.1:8080:80/tcp",
            "5353:53/udp",
            "[::1]:60:6/udp",
        ];
        check_publish(&good.map(String::from)).unwrap();
        for bad in [
            "53/udp",
            "5353:53/sctp",
            "5353:53/UDP",
            "0:53/udp",
            "5353:53/udp/tcp",
        ] {
            let err = check_publish(&[bad.to_owned(), "8080:80".to_owned()]).unwrap_err();
            assert_eq!(err.code, "input.bad_publish", "{bad}");
            assert!(
                err.message.contains(bad) && err.message.contains("[/tcp|udp]"),
                "{bad}: {}",
                err.message
            );
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let now = now_rfc3339();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z') && now.as_bytes()[10] == b'T');
    }
}
