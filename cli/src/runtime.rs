//! A workspace's processes: the daemons and the VMM, started detached, recorded in
//! `<runtime>/<name>/state.json`, stopped and cleaned up; and the workspace's state as
//! seen from them (created, running, paused, halted, crashed).

use crate::confinement::{self, SECCOMP_ENV};
use crate::error::{CliError, Result};
use crate::home::Home;
use crate::kill_point;
use crate::workspace::{self, Config, Network};
use microagent_agent_protocol::client::Connection;
use microagent_agent_protocol::liveness::{Liveness, LIVENESS};
use microagent_vhost_net::netns;
use microagent_vmm::api::Request;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a starting process may take to create its socket (a restore under the
/// nested rig's TCG took over 10 s on a loaded machine); a process that dies is noticed at
/// once.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a guest asked to stop has to sync its disks and power off before it is
/// stopped by force (a guest under the nested rig's TCG can take seconds to sync).
const HALT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pids {
    pub vmm: u32,
    pub blk: u32,
    pub vsock: Option<u32>,
    #[serde(default)]
    pub net: Option<u32>,
    /// The kernel log's newest record before these processes started: a crash report
    /// reads only records after it (confinement::kmsg_newest_seq).
    #[serde(default)]
    pub kmsg_seq: Option<u64>,
}

/// A vhost-user daemon of a workspace: `<name>.sock` in the runtime directory,
/// `<name>.log` in the workspace, and `--<name>` is the VMM's flag for its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DaemonKind {
    Blk,
    Vsock,
    Net,
}

impl DaemonKind {
    fn name(self) -> &'static str {
        match self {
            Self::Blk => "blk",
            Self::Vsock => "vsock",
            Self::Net => "net",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Self::Blk => "microagent-vhost-blk",
            Self::Vsock => "microagent-vhost-vsock",
            Self::Net => "microagent-vhost-net",
        }
    }
}

/// One daemon to start: its kind and its flags besides `--socket-path`.
struct DaemonSpec {
    kind: DaemonKind,
    args: Vec<OsString>,
}

/// `MICROAGENT_IO_TIMEOUT=SECS`: how long the disk daemon waits on a disk that stopped
/// answering before it gives up and the workspace is crashed (the daemon's
/// `--io-timeout`: 120 s unless set, 0 waits forever).
pub const IO_TIMEOUT_ENV: &str = "MICROAGENT_IO_TIMEOUT";

/// `MICROAGENT_EXEC_PROBE_INTERVAL=SECS`: how often `exec` probes the agent of a silent
/// command (10 s unless set; 3 failures in a row end the command with `agent.timeout`).
pub const EXEC_PROBE_ENV: &str = "MICROAGENT_EXEC_PROBE_INTERVAL";

/// The liveness probes of a running command: [`LIVENESS`], or its interval from
/// [`EXEC_PROBE_ENV`].
pub fn exec_liveness() -> Result<Liveness> {
    let Some(value) = std::env::var_os(EXEC_PROBE_ENV) else {
        return Ok(LIVENESS);
    };
    match value.to_str().and_then(|v| v.parse::<u64>().ok()) {
        Some(secs) if secs > 0 => Ok(Liveness {
            interval: Duration::from_secs(secs),
            ..LIVENESS
        }),
        _ => Err(CliError::new(
            "input.bad_env",
            format!("{EXEC_PROBE_ENV}={value:?} is not a whole number of seconds above 0"),
        )),
    }
}

/// Whether the workspace's guest is held (its VMM says paused, or is alive but too
/// busy to answer, as while it writes a snapshot): a silent agent is then not hung.
pub fn guest_held(home: &Home, name: &str) -> bool {
    let Some(pids) = pids(home, name) else {
        return false;
    };
    if pids.all().any(|(bin, pid)| !alive(pid, bin)) {
        return false;
    }
    match vmm_call(home, name, &Request::Status, CONTROL_TIMEOUT) {
        Ok(reply) => reply["state"] == "paused",
        Err(_) => true,
    }
}

/// The daemons a workspace runs, in start order: its disk, the agent's vsock when it
/// has an agent, the network unless `--net none`.
fn daemons(home: &Home, config: &Config) -> Vec<DaemonSpec> {
    let name = &config.name;
    let mut blk = vec![
        "--disk".into(),
        workspace::rootfs(home, name).into(),
        "--serial".into(),
        name.into(),
    ];
    if let Some(secs) = std::env::var_os(IO_TIMEOUT_ENV) {
        blk.extend(["--io-timeout".into(), secs]);
    }
    let mut list = vec![DaemonSpec {
        kind: DaemonKind::Blk,
        args: blk,
    }];
    if config.agent {
        list.push(DaemonSpec {
            kind: DaemonKind::Vsock,
            args: vec![
                "--guest-cid".into(),
                config.cid.to_string().into(),
                "--uds-path".into(),
                agent_socket(home, name).into(),
            ],
        });
    }
    if config.net == Network::Tap {
        let netns = workspace::netns_name(name);
        let mac = config.mac.iter().flat_map(|m| ["--mac", m]);
        let tap = ["--mode", "tap", "--netns", &netns].into_iter();
        list.push(DaemonSpec {
            kind: DaemonKind::Net,
            args: tap.chain(mac).map(OsString::from).collect(),
        });
    }
    if config.net == Network::User {
        let publish = config.publish.iter().flat_map(|s| ["--publish", s]);
        let dns = config.dns.iter().flat_map(|s| ["--dns", s]);
        let mac = config.mac.iter().flat_map(|m| ["--mac", m]);
        list.push(DaemonSpec {
            kind: DaemonKind::Net,
            args: publish.chain(dns).chain(mac).map(OsString::from).collect(),
        });
    }
    list
}

impl Pids {
    fn record(&mut self, kind: DaemonKind, pid: u32) {
        match kind {
            DaemonKind::Blk => self.blk = pid,
            DaemonKind::Vsock => self.vsock = Some(pid),
            DaemonKind::Net => self.net = Some(pid),
        }
    }

    /// Every recorded process with the binary it must be.
    pub fn all(&self) -> impl Iterator<Item = (&'static str, u32)> {
        [
            ("microagent-vmm", Some(self.vmm)),
            ("microagent-vhost-blk", Some(self.blk)),
            ("microagent-vhost-vsock", self.vsock),
            ("microagent-vhost-net", self.net),
        ]
        .into_iter()
        .filter_map(|(bin, pid)| pid.map(|p| (bin, p)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    Created,
    Running,
    Paused,
    Halted,
    Crashed { reason: String },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Halted => "halted",
            Self::Crashed { .. } => "crashed",
        }
    }
}

pub fn dir(home: &Home, name: &str) -> PathBuf {
    home.runtime().join(name)
}

fn state_file(home: &Home, name: &str) -> PathBuf {
    dir(home, name).join("state.json")
}

fn halted_marker(home: &Home, name: &str) -> PathBuf {
    workspace::dir(home, name).join("halted")
}

/// The agent's host socket of a running workspace.
pub fn agent_socket(home: &Home, name: &str) -> PathBuf {
    dir(home, name).join("agent.vsock")
}

fn api_socket(home: &Home, name: &str) -> PathBuf {
    dir(home, name).join("api.sock")
}

pub fn pids(home: &Home, name: &str) -> Option<Pids> {
    let text = fs::read_to_string(state_file(home, name)).ok()?;
    serde_json::from_str(&text).ok()
}

/// A live process of ours (not a recycled pid).
fn alive(pid: u32, binary: &str) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let is_ours = cmdline
        .split(|&b| b == 0)
        .next()
        .is_some_and(|argv0| argv0.ends_with(binary.as_bytes()));
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit(')')
        .next()
        .is_some_and(|s| s.trim_start().starts_with('Z'));
    is_ours && !zombie
}

/// How long a control request other than a snapshot may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// One [`Request`] to the VMM, waiting up to `timeout` for the reply; a refusal keeps
/// the VMM's own code (`snapshot.no_space`, ...).
pub fn vmm_call(
    home: &Home,
    name: &str,
    request: &Request,
    timeout: Duration,
) -> Result<serde_json::Value> {
    exchange(home, name, &request.to_line(), timeout)
}

/// Sends one request line (newline included) and reads the reply line.
fn exchange(home: &Home, name: &str, line: &str, timeout: Duration) -> Result<serde_json::Value> {
    let fail = |e: String| {
        CliError::new(
            "vmm.control_failed",
            format!("{name}: VMM control socket: {e}"),
        )
    };
    let mut stream =
        UnixStream::connect(api_socket(home, name)).map_err(|e| fail(e.to_string()))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| fail(e.to_string()))?;
    stream
        .write_all(line.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| fail(e.to_string()))?;
    let reply: serde_json::Value = serde_json::from_str(&line).map_err(|e| fail(e.to_string()))?;
    if reply["ok"] != true {
        let message = reply["error"]["message"].as_str().unwrap_or("refused");
        return Err(match reply["error"]["code"].as_str() {
            Some(code) if code.starts_with("snapshot.") => {
                CliError::relayed(code.to_owned(), format!("{name}: {message}"))
            }
            _ => fail(message.into()),
        });
    }
    Ok(reply)
}

pub fn state(home: &Home, name: &str) -> State {
    if workspace::fork_interrupted(home, name) {
        return State::Crashed {
            reason: format!(
                "the fork that made it was interrupted before it ran (run the same `microagent \
                 create {name} --from-snapshot ...` again, or microagent delete {name})"
            ),
        };
    }
    let Some(pids) = pids(home, name) else {
        // A start killed before it recorded a process leaves that process unrecorded.
        let strays = strays(home, name);
        if !strays.is_empty() {
            let names: Vec<String> = strays
                .iter()
                .map(|(bin, pid)| format!("{bin} (pid {pid})"))
                .collect();
            return State::Crashed {
                reason: format!(
                    "an interrupted start left {} running (microagent delete {name}, or start it again)",
                    names.join(", ")
                ),
            };
        }
        return if halted_marker(home, name).exists() {
            State::Halted
        } else {
            State::Created
        };
    };
    if let Some(reason) = dead_processes(home, name, &pids) {
        return State::Crashed { reason };
    }
    match vmm_call(home, name, &Request::Status, CONTROL_TIMEOUT) {
        Ok(reply) if reply["state"] == "paused" => State::Paused,
        Ok(_) => State::Running,
        Err(e) => State::Crashed { reason: e.message },
    }
}

/// Which of a workspace's recorded processes are gone and why, and what the VMM
/// reported; `None` while all of them run.
fn dead_processes(home: &Home, name: &str, pids: &Pids) -> Option<String> {
    let dead: Vec<String> = pids
        .all()
        .filter(|(bin, pid)| !alive(*pid, bin))
        .map(
            |(bin, pid)| match confinement::seccomp_kill(pid, bin, pids.kmsg_seq) {
                _ if pid == 0 => format!("{bin} never started (the start was interrupted)"),
                Some(nr) => format!(
                    "{bin} (pid {pid}) was killed by SIGSYS (seccomp): syscall {nr} is not in its \
                 allow-list; {SECCOMP_ENV}=off starts workspaces without filters, for \
                 debugging (docs/security.md)"
                ),
                None => match last_daemon_error(home, name, bin) {
                    Some(error) => {
                        format!("{bin} (pid {pid}) is gone; its last logged error: {error}")
                    }
                    None => format!("{bin} (pid {pid}) is gone"),
                },
            },
        )
        .collect();
    if dead.is_empty() {
        return None;
    }
    let mut reason = dead.join(", ");
    if let Some(error) = last_vmm_error(home, name) {
        reason.push_str(&format!("; VMM reported: {error}"));
    }
    Some(reason)
}

/// Why a workspace that was started stopped meanwhile, to add to the error that a
/// command then met (an agent that does not answer because its VM is gone, say): how
/// its processes ended and its console's last lines. `None` while all its processes
/// run (their sockets are not asked: that could wait), or when none was recorded.
pub fn stopped_meanwhile(home: &Home, name: &str) -> Option<String> {
    let reason = dead_processes(home, name, &pids(home, name)?)?;
    let console = fs::read_to_string(workspace::console_log(home, name)).unwrap_or_default();
    let mut tail: Vec<&str> = console
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .rev()
        .take(CONSOLE_TAIL_LINES)
        .collect();
    tail.reverse();
    let mut why = format!("; meanwhile the workspace stopped: {reason}");
    if !tail.is_empty() {
        why.push_str(&format!("; its console ended with: {}", tail.join(" | ")));
    }
    Some(why)
}

/// How many console lines [`stopped_meanwhile`] quotes.
const CONSOLE_TAIL_LINES: usize = 3;

/// Why the VMM stopped, from its log: its JSON error, or else how the VM ended (a guest
/// that reset or triple-faulted exits 0 without an error).
fn last_vmm_error(home: &Home, name: &str) -> Option<String> {
    let log = fs::read_to_string(workspace::dir(home, name).join("vmm.log")).ok()?;
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["error"]["message"].as_str().map(str::to_owned))
        .or_else(|| {
            log.lines()
                .rev()
                .find_map(|l| l.split_once("VM ended: ").map(|(_, how)| how.to_owned()))
        })
}

/// The last error a daemon logged (`[TIME ERROR TARGET] message`), such as the block
/// daemon's I/O watchdog giving up on a disk that stopped answering.
fn last_daemon_error(home: &Home, name: &str, bin: &str) -> Option<String> {
    let kind = bin.strip_prefix("microagent-vhost-")?;
    let log = fs::read_to_string(workspace::dir(home, name).join(format!("{kind}.log"))).ok()?;
    log.lines().rev().find_map(|line| {
        let (_, rest) = line.split_once(" ERROR ")?;
        Some(
            rest.split_once("] ")
                .map_or(rest, |(_, message)| message)
                .to_owned(),
        )
    })
}

/// The directory of this binary (`target/<profile>/` in a checkout, also for tests).
fn exe_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::new("host.install_broken", format!("where am I: {e}")))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    Ok(dir.to_path_buf())
}

/// A binary installed next to this one.
pub fn sibling(binary: &str) -> Result<PathBuf> {
    let dir = exe_dir()?;
    let path = dir.join(binary);
    if path.is_file() {
        Ok(path)
    } else {
        Err(CliError::new(
            "host.install_broken",
            format!(
                "{binary} is not installed next to microagent ({})",
                dir.display()
            ),
        ))
    }
}

/// The statically linked agent: `MICROAGENT_AGENT`, or `make agent`'s output in a
/// checkout, or next to this binary.
pub fn static_agent() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MICROAGENT_AGENT").filter(|p| !p.is_empty()) {
        return Ok(path.into());
    }
    let dir = exe_dir()?;
    let checkout = dir
        .parent()
        .map(|target| target.join("x86_64-unknown-linux-gnu/release/microagent-agent"));
    checkout
        .into_iter()
        .chain(std::iter::once(dir.join("microagent-agent")))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CliError::new(
                "host.install_broken",
                "the static microagent-agent is missing (run `make agent`)",
            )
        })
}

fn spawn_detached(mut cmd: Command, log: &Path) -> Result<u32> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let fail = |e: std::io::Error| {
        CliError::new("workspace.start_failed", format!("starting {program}: {e}"))
    };
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(fail)?;
    let err = log.try_clone().map_err(fail)?;
    cmd.args(confinement::seccomp_flag());
    cmd.stdin(Stdio::null()).stdout(log).stderr(err);
    // SAFETY: setsid in the child before exec has no preconditions.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok(cmd.spawn().map_err(fail)?.id())
}

/// Waits for a process's socket; when the process exits first, the error ends with the
/// last line of its log (why it gave up: a port in use, a missing file, ...).
fn wait_for(path: &Path, pid: u32, binary: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    while !path.exists() {
        if !alive(pid, binary) {
            let why = tail(log, 1);
            let why = if why.is_empty() {
                String::new()
            } else {
                format!(": {why}")
            };
            return Err(CliError::new(
                "workspace.start_failed",
                format!("{binary} exited during start-up{why}"),
            ));
        }
        if Instant::now() >= deadline {
            return Err(CliError::new(
                "workspace.start_failed",
                format!(
                    "{binary} did not create {} in {SOCKET_TIMEOUT:?}",
                    path.display()
                ),
            ));
        }
        // A daemon binds its socket 3 to 10 ms after it starts: a coarser poll would add
        // up to its whole period to every process of a start or a fork.
        sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How the VMM begins: booting the kernel, or from a snapshot's VM directory.
#[derive(Debug, Clone, Copy)]
pub enum Launch<'a> {
    Boot,
    Restore(&'a Path),
}

/// Starts the daemons and the VMM and waits until the workspace answers. On failure
/// everything started is stopped again and the error names the step.
pub fn start(home: &Home, config: &Config) -> Result<Duration> {
    launch(home, config, Launch::Boot)
}

/// Like [`start`], but new daemons and a new VMM continue from a snapshot (`--restore`):
/// the disk must already be the snapshot's copy.
pub fn restore(home: &Home, config: &Config, vm_dir: &Path) -> Result<Duration> {
    launch(home, config, Launch::Restore(vm_dir))
}

fn launch(home: &Home, config: &Config, how: Launch<'_>) -> Result<Duration> {
    let started = Instant::now();
    let name = &config.name;
    let rt = dir(home, name);
    // Whatever an interrupted start left (recorded or not) must not serve the same disk
    // next to the new daemons.
    kill_all(home, name);
    fs::create_dir_all(&rt)
        .map_err(|e| CliError::new("workspace.start_failed", format!("{}: {e}", rt.display())))?;
    let ws = workspace::dir(home, name);
    let _ = fs::remove_file(halted_marker(home, name));
    // Fresh logs: a start failure quotes the last line of the process that gave up.
    for log in ["vmm.log", "blk.log", "vsock.log", "net.log"] {
        let _ = fs::remove_file(ws.join(log));
    }

    let result = (|| -> Result<()> {
        // Recorded as each process starts, so that a failure stops exactly those.
        let mut pids = Pids {
            vmm: 0,
            blk: 0,
            vsock: None,
            net: None,
            kmsg_seq: confinement::kmsg_newest_seq(),
        };
        if config.net == Network::Tap {
            make_tap_network(config)?;
        }
        let mut devices = Vec::new();
        for daemon in daemons(home, config) {
            let kind = daemon.kind;
            let socket = rt.join(format!("{}.sock", kind.name()));
            let log = ws.join(format!("{}.log", kind.name()));
            let mut cmd = Command::new(sibling(kind.binary())?);
            cmd.arg("--socket-path")
                .arg(&socket)
                .args(daemon.args)
                .args(confinement::landlock_flags(&rt));
            let pid = spawn_detached(cmd, &log)?;
            kill_point::reached("start.daemon_spawned");
            pids.record(kind, pid);
            write_pids(home, name, &pids)?;
            wait_for(&socket, pid, kind.binary(), &log)?;
            devices.push((format!("--{}", kind.name()), socket));
        }
        kill_point::reached("start.daemons_up");
        let mut vmm = Command::new(sibling("microagent-vmm")?);
        vmm.arg("--kernel").arg(&config.kernel);
        // Under Landlock the VMM may write only its runtime directory and the snapshots
        // directory (made now: a rule needs the directory to exist).
        let snapshots = ws.join("snapshots");
        fs::create_dir_all(&snapshots).map_err(|e| {
            CliError::new(
                "workspace.start_failed",
                format!("{}: {e}", snapshots.display()),
            )
        })?;
        let landlock = confinement::landlock_flags(&rt);
        if !landlock.is_empty() {
            vmm.args(landlock).arg("--landlock-dir").arg(&snapshots);
        }
        match how {
            Launch::Boot => {
                vmm.arg("--cmdline")
                    .arg(&config.cmdline)
                    .arg("--cpus")
                    .arg(config.cpus.to_string())
                    .arg("--memory")
                    .arg(config.memory_mib.to_string());
            }
            Launch::Restore(dir) => {
                vmm.arg("--restore").arg(dir);
            }
        }
        vmm.arg("--serial")
            .arg(workspace::console_log(home, name))
            .arg("--api-socket")
            .arg(api_socket(home, name));
        if let Some(initrd) = &config.initrd {
            vmm.arg("--initrd").arg(initrd);
        }
        for (flag, socket) in devices {
            vmm.arg(flag).arg(socket);
        }
        let vmm_pid = spawn_detached(vmm, &ws.join("vmm.log"))?;
        pids.vmm = vmm_pid;
        write_pids(home, name, &pids)?;
        kill_point::reached("start.vmm_spawned");
        wait_for(
            &api_socket(home, name),
            vmm_pid,
            "microagent-vmm",
            &ws.join("vmm.log"),
        )?;
        if config.agent {
            wait_for_agent(home, name, vmm_pid)?;
        }
        Ok(())
    })();
    if let Err(mut e) = result {
        let console = tail(&workspace::console_log(home, name), 15);
        if let Some(vmm_error) = last_vmm_error(home, name) {
            e.message.push_str(&format!("; VMM: {vmm_error}"));
        }
        if !console.is_empty() {
            e.message
                .push_str(&format!("\nguest console ends with:\n{console}"));
        }
        kill_all(home, name);
        return Err(e);
    }
    Ok(started.elapsed())
}

/// The workspace's network namespace, veth pair and NAT, 10.0.2.3 forwarded to a
/// resolver; a stale one of the same name (a start that was interrupted) is removed
/// first: the name is this workspace's.
fn make_tap_network(config: &Config) -> Result<()> {
    let name = &config.name;
    let netns = workspace::netns_name(name);
    let resolv_conf = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let dns = tap_resolver(&config.dns, &resolv_conf);
    if dns.is_none() {
        eprintln!(
            "microagent: warning: {name}: no resolver outside the host's loopback in --dns or \
             /etc/resolv.conf: DNS at 10.0.2.3 will not answer"
        );
    }
    let fail = |e: netns::Error| CliError::new(e.code(), format!("{name}: {e}"));
    if netns::exists(&netns) {
        netns::remove(&netns).map_err(fail)?;
    }
    netns::create(&netns, dns).map(drop).map_err(fail)
}

/// Where a tap network's 10.0.2.3 forwards: the first `--dns` resolver, else the first
/// of resolv.conf, that the namespace can reach (one on the host's loopback it cannot).
fn tap_resolver(dns: &[String], resolv_conf: &str) -> Option<SocketAddrV4> {
    let candidates = if dns.is_empty() {
        microagent_vhost_net::config::nameservers(resolv_conf)
    } else {
        dns.iter()
            .filter_map(|d| microagent_vhost_net::config::parse_dns(d))
            .collect()
    };
    candidates.into_iter().find_map(|a| match a {
        SocketAddr::V4(v4) if !v4.ip().is_loopback() => Some(v4),
        _ => None,
    })
}

/// Removes a tap workspace's network, if any is left (nothing for other workspaces).
fn remove_tap_network(name: &str) {
    let netns = workspace::netns_name(name);
    if netns::exists(&netns) {
        if let Err(e) = netns::remove(&netns) {
            eprintln!("microagent: warning: removing network namespace {netns}: {e}");
        }
    }
}

fn wait_for_agent(home: &Home, name: &str, vmm_pid: u32) -> Result<()> {
    let deadline = Instant::now() + AGENT_TIMEOUT;
    loop {
        if Connection::open(&agent_socket(home, name), Duration::from_secs(2)).is_ok() {
            return Ok(());
        }
        if !alive(vmm_pid, "microagent-vmm") {
            return Err(CliError::new(
                "workspace.start_failed",
                "the VM stopped before its agent answered",
            ));
        }
        if Instant::now() >= deadline {
            return Err(CliError::new(
                "workspace.agent_timeout",
                format!("the agent did not answer within {AGENT_TIMEOUT:?}"),
            ));
        }
    }
}

fn write_pids(home: &Home, name: &str, pids: &Pids) -> Result<()> {
    let json = serde_json::to_vec(pids).unwrap_or_default();
    fs::write(state_file(home, name), json)
        .map_err(|e| CliError::new("workspace.start_failed", format!("recording pids: {e}")))
}

/// Stops a workspace: through the agent when it has one, then the VMM's shutdown, then
/// SIGKILL for whatever is left; removes the runtime directory.
pub fn halt(home: &Home, config: &Config) {
    let name = &config.name;
    if let Some(pids) = pids(home, name) {
        let graceful = config.agent
            && Connection::open(&agent_socket(home, name), Duration::from_secs(5))
                .and_then(Connection::shutdown)
                .is_ok();
        if !graceful {
            let shutdown = Request::Shutdown { timeout_ms: 0 };
            let _ = vmm_call(home, name, &shutdown, CONTROL_TIMEOUT);
        }
        let deadline = Instant::now() + HALT_TIMEOUT;
        while alive(pids.vmm, "microagent-vmm") && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
        if alive(pids.vmm, "microagent-vmm") {
            eprintln!(
                "microagent: warning: {name} did not power off within {HALT_TIMEOUT:?}; \
                 stopping it by force (writes the guest had not synced are lost)"
            );
        }
    }
    kill_all(home, name);
    let _ = fs::write(halted_marker(home, name), workspace::now_rfc3339());
}

/// SIGKILL for every recorded process still alive and every unrecorded one serving
/// this workspace's runtime directory (a start killed between spawning a process and
/// recording it), then the tap network (if any) and the runtime directory go.
pub fn kill_all(home: &Home, name: &str) {
    let recorded = pids(home, name).map(|p| p.all().collect::<Vec<_>>());
    let all = recorded.into_iter().flatten().chain(strays(home, name));
    for (bin, pid) in all {
        if pid != 0 && alive(pid, bin) {
            // SAFETY: signalling a process we started, checked to still be ours.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(pid, bin) && Instant::now() < deadline {
                sleep(Duration::from_millis(10));
            }
        }
    }
    remove_tap_network(name);
    let _ = fs::remove_dir_all(dir(home, name));
}

/// Live processes running one of microagent's binaries with a socket in this
/// workspace's runtime directory, whether recorded or not.
fn strays(home: &Home, name: &str) -> Vec<(&'static str, u32)> {
    const BINARIES: [&str; 4] = [
        "microagent-vmm",
        "microagent-vhost-blk",
        "microagent-vhost-vsock",
        "microagent-vhost-net",
    ];
    let rt = dir(home, name);
    let rt = rt.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|&b| b == 0);
        let argv0 = args.next().unwrap_or_default();
        let Some(bin) = BINARIES.iter().find(|b| argv0.ends_with(b.as_bytes())) else {
            continue;
        };
        let serves_here = args.any(|arg| {
            arg.strip_prefix(rt)
                .is_some_and(|rest| rest.first() == Some(&b'/'))
        });
        if serves_here && alive(pid, bin) {
            found.push((*bin, pid));
        }
    }
    found
}

/// Reads every secret from its host file and hands them to the agent for /run/secrets.
pub fn deliver_secrets(home: &Home, config: &Config) -> Result<()> {
    let values = config
        .secrets
        .iter()
        .map(|(name, file)| {
            fs::read(file).map(|v| (name.clone(), v)).map_err(|e| {
                CliError::new(
                    "secret.unreadable",
                    format!("secret {name}: {}: {e}", file.display()),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Connection::open(&agent_socket(home, &config.name), SOCKET_TIMEOUT)
        .and_then(|c| c.put_secrets(&values))
        .map_err(|e| CliError::new("secret.delivery_failed", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(agent: bool, net: Network) -> Config {
        Config {
            name: "ws".into(),
            image: None,
            image_digest: None,
            cpus: 1,
            memory_mib: 64,
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            agent,
            created: String::new(),
            secrets: Vec::new(),
            defaults: Default::default(),
            net,
            publish: vec!["8080:80".into()],
            dns: vec!["127.0.0.1:5353".into()],
            cid: 7,
            mac: Some("02:00:00:00:00:01".into()),
        }
    }

    /// A start that fails because the VM went away says so, with how it ended and the
    /// console's last lines (a failed fork removes its logs with it).
    #[test]
    fn a_workspace_that_stopped_during_its_start_says_how() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path());
        assert_eq!(stopped_meanwhile(&home, "ws"), None, "never started");
        // A pid that no microagent binary runs (the test binary's own) reads as gone.
        let pid = std::process::id();
        fs::create_dir_all(dir(&home, "ws")).unwrap();
        let pids = Pids {
            vmm: pid,
            blk: pid,
            vsock: Some(pid),
            net: None,
            kmsg_seq: None,
        };
        fs::write(state_file(&home, "ws"), serde_json::to_vec(&pids).unwrap()).unwrap();
        fs::create_dir_all(workspace::dir(&home, "ws")).unwrap();
        fs::write(
            workspace::dir(&home, "ws").join("vmm.log"),
            "starting\nVM ended: triple fault or shutdown\n",
        )
        .unwrap();
        fs::write(
            workspace::console_log(&home, "ws"),
            "booted\none\n\ntwo\nKernel panic - not syncing: x\n",
        )
        .unwrap();
        let why = stopped_meanwhile(&home, "ws").unwrap();
        assert!(why.contains("microagent-vmm (pid"), "{why}");
        assert!(
            why.contains("VMM reported: triple fault or shutdown"),
            "{why}"
        );
        assert!(
            why.ends_with("its console ended with: one | two | Kernel panic - not syncing: x"),
            "{why}"
        );
    }

    #[test]
    fn a_tap_network_forwards_dns_to_the_first_resolver_off_the_hosts_loopback() {
        let conf = "nameserver 127.0.0.53\nnameserver 10.255.255.53\n";
        assert_eq!(
            tap_resolver(&[], conf),
            Some("10.255.255.53:53".parse().unwrap())
        );
        assert_eq!(tap_resolver(&[], "nameserver 127.0.0.53\n"), None);
        let given = ["127.0.0.1:5353".into(), "192.0.2.7:5300".into()];
        assert_eq!(
            tap_resolver(&given, conf),
            Some("192.0.2.7:5300".parse().unwrap())
        );
    }

    #[test]
    fn a_workspace_runs_one_daemon_per_device_it_has() {
        let home = Home::new("/h");
        let all = daemons(&home, &config(true, Network::User));
        let kinds: Vec<_> = all.iter().map(|d| d.kind).collect();
        assert_eq!(kinds, [DaemonKind::Blk, DaemonKind::Vsock, DaemonKind::Net]);
        assert_eq!(
            all[2].args,
            [
                "--publish",
                "8080:80",
                "--dns",
                "127.0.0.1:5353",
                "--mac",
                "02:00:00:00:00:01"
            ]
            .map(OsString::from)
        );
        assert_eq!(all[1].args[1], OsString::from("7"));
        assert_eq!(all[1].args[3], OsString::from(agent_socket(&home, "ws")));
        let tap = daemons(&home, &config(false, Network::Tap));
        assert_eq!(tap[1].kind, DaemonKind::Net);
        assert_eq!(
            tap[1].args,
            [
                "--mode",
                "tap",
                "--netns",
                "microagent-ws",
                "--mac",
                "02:00:00:00:00:01"
            ]
            .map(OsString::from)
        );
        let bare = daemons(&home, &config(false, Network::None));
        assert_eq!(bare.len(), 1);
        assert_eq!(bare[0].kind, DaemonKind::Blk);
    }
}
