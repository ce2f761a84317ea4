use clap::{Parser, Subcommand};
use microagent_agent_protocol::client::{Connection, Error as AgentError};
use microagent_agent_protocol::message::{ExecRequest, HostMessage, TtySize};
use microagent_cli::confinement::{self, SECCOMP_ENV};
use microagent_cli::error::{CliError, Result, EXIT_ERROR};
use microagent_cli::home::Home;
use microagent_cli::initramfs::Initramfs;
use microagent_cli::kernel_info;
use microagent_cli::kill_point;
use microagent_cli::lock::{self, Wait, WorkspaceLock};
use microagent_cli::memory;
use microagent_cli::progress;
use microagent_cli::restore;
use microagent_cli::runtime::{self, State};
use microagent_cli::snapshot;
use microagent_cli::workspace::{self, Config};
use microagent_image::platform::Platform;
use microagent_image::progress::Reporter;
use microagent_image::pull::{root_disk_observed, PullOptions};
use microagent_image::source::{exec_defaults, fetch, Source};
use microagent_image::store::Store;
use microagent_image::tls::CaCert;
use microagent_vmm::api::Request;
use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Where Docker keeps registry CA certificates (`<registry>/ca.crt`).
const DOCKER_CERTS_D: &str = "/etc/docker/certs.d";

/// microagent: microVM workspaces made from OCI images.
#[derive(Debug, Parser)]
#[command(name = "microagent", version)]
struct Cli {
    /// State directory (default: MICROAGENT_HOME, /var/lib/microagent as root).
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    /// Print JSON for scripts (errors as {"error":{"code","message"}}).
    #[arg(long, global = true)]
    json: bool,
    /// Wait as long as it takes for a workspace another command is using.
    #[arg(long, global = true)]
    wait: bool,
    /// Seconds to wait for a workspace another command is using (then workspace.busy).
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = lock::DEFAULT_TIMEOUT_SECS)]
    lock_timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a workspace from an image, or fork a running one from a snapshot.
    Create {
        name: String,
        #[arg(long, required_unless_present = "from_snapshot")]
        image: Option<String>,
        /// Fork: a new running workspace from WORKSPACE:TAG (its own disk copy, daemons
        /// and identity).
        #[arg(long, value_name = "WORKSPACE:TAG", conflicts_with_all = [
            "image", "cpus", "memory", "disk_size", "kernel", "initrd", "cmdline", "no_agent",
            "insecure", "secrets", "net", "publish", "dns",
        ])]
        from_snapshot: Option<String>,
        #[arg(long, default_value_t = 2)]
        cpus: u8,
        /// Guest memory: 512M, 1G, or a number of MiB.
        #[arg(long, default_value = "512M")]
        memory: String,
        /// Root disk size (default: the image's content plus headroom).
        #[arg(long)]
        disk_size: Option<String>,
        /// Guest kernel (default: the project's cached kernel).
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Extra kernel command line (appended).
        #[arg(long)]
        cmdline: Option<String>,
        /// The guest does not run microagent-agent (bring your own guest).
        #[arg(long)]
        no_agent: bool,
        /// Registry over plain HTTP.
        #[arg(long)]
        insecure: bool,
        /// A secret for /run/secrets/NAME, read from FILE at every start (repeatable).
        #[arg(long = "secret", value_name = "NAME=@FILE")]
        secrets: Vec<String>,
        /// The guest's network: `user` (a private network, guest 10.0.2.15, the host's
        /// loopback at 10.0.2.2, DNS 10.0.2.3), `tap` (root: a tap in a network
        /// namespace of the workspace's own, NAT to the host) or `none`.
        #[arg(long, value_enum, default_value = "user")]
        net: workspace::Network,
        /// Forward a host port to a guest port while the workspace runs:
        /// [IP:]HOSTPORT:GUESTPORT[/tcp|udp], IP defaults to 127.0.0.1, the protocol to
        /// TCP (repeatable).
        #[arg(long, value_name = "SPEC")]
        publish: Vec<String>,
        /// Upstream resolver for the guest's DNS server 10.0.2.3, IP[:PORT]
        /// (repeatable; default: the host's /etc/resolv.conf at each start).
        #[arg(long, value_name = "IP[:PORT]")]
        dns: Vec<String>,
    },
    /// Start a workspace and wait until it answers.
    Start {
        name: String,
        /// Roll back: disk, memory and devices return to this snapshot (a halted
        /// workspace only).
        #[arg(long, value_name = "TAG")]
        from_snapshot: Option<String>,
    },
    /// Snapshots of a workspace: VM state plus a copy of its disk.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCmd,
    },
    /// Run a command in a running workspace; exits with its status.
    Exec {
        name: String,
        /// Keep stdin open and stream it to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Allocate a terminal.
        #[arg(short, long)]
        tty: bool,
        #[arg(short, long = "env")]
        env: Vec<String>,
        #[arg(short, long = "workdir")]
        workdir: Option<String>,
        #[arg(short, long)]
        user: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// An interactive shell in a running workspace (exec of /bin/sh with a TTY).
    Shell {
        name: String,
    },
    /// Shell completions.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Power a workspace off (through its agent, forced after a timeout).
    Halt {
        name: String,
    },
    /// Delete a workspace and everything it owns.
    Delete {
        name: String,
        #[arg(long)]
        yes: bool,
        /// Halt it first if it runs.
        #[arg(long)]
        force: bool,
    },
    /// List workspaces.
    List,
    /// A workspace's configuration and state.
    Inspect {
        name: String,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// The guest console.
    Logs {
        name: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// What this host can do, and how to fix what it cannot.
    Doctor,
    /// Images.
    Image {
        #[command(subcommand)]
        command: ImageCmd,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCmd {
    /// Snapshot a running (briefly paused) or paused workspace.
    Create {
        name: String,
        /// The snapshot's name (default: the UTC time, 20260611T085244Z).
        #[arg(long)]
        tag: Option<String>,
    },
    /// A workspace's snapshots: TAG SIZE CREATED IMAGE.
    List { name: String },
    /// Delete one snapshot.
    Delete { name: String, tag: String },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Pull (or import from oci:, oci-archive:, docker-archive:) into the local store.
    Pull {
        reference: String,
        #[arg(long)]
        insecure: bool,
        /// The platform an index resolves to: OS/ARCH[/VARIANT] (default linux/amd64;
        /// workspaces run linux/amd64 images only).
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
        /// A CA certificate (PEM) to trust for this registry, besides the system's and
        /// those in certs.d/<registry>/*.crt (HOME/certs.d, /etc/docker/certs.d).
        #[arg(long = "ca-cert", value_name = "FILE")]
        ca_certs: Vec<PathBuf>,
    },
    /// An image in the local store: digest, platform, size, layers and config.
    Inspect { reference: String },
    /// Check credentials against a registry and store them like `docker login`
    /// ($DOCKER_CONFIG/config.json or ~/.docker/config.json, mode 0600).
    Login {
        /// The registry, as in image references (docker.io, ghcr.io, localhost:5000).
        registry: String,
        #[arg(short, long)]
        username: String,
        /// Read the password from stdin (it never appears in the process list).
        #[arg(long)]
        password_stdin: bool,
        /// Plain HTTP (always used for localhost and 127.0.0.1 without a CA).
        #[arg(long)]
        insecure: bool,
        /// A CA certificate (PEM) to trust for this registry (see `image pull`).
        #[arg(long = "ca-cert", value_name = "FILE")]
        ca_certs: Vec<PathBuf>,
    },
    /// Forget the stored credentials for a registry.
    Logout { registry: String },
    /// Images in the local store.
    List,
    /// Forget an image and delete what no other image uses.
    Rm { reference: String },
}

fn parse_size(text: &str, flag: &str) -> Result<u64> {
    let bad = || {
        CliError::new(
            "input.bad_size",
            format!("{flag} {text:?} is not a size (examples: 512M, 2G, 1024)"),
        )
    };
    let t = text.trim().to_ascii_uppercase();
    let t = t
        .strip_suffix("IB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(&t);
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, "M"),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit {
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    n.checked_shl(shift)
        .filter(|&v| v > 0 && v >> shift == n)
        .ok_or_else(bad)
}

struct Output {
    json: bool,
    /// How long to wait for a workspace another command holds.
    wait: Wait,
}

impl Output {
    fn lock(&self, home: &Home, name: &str, command: &str) -> Result<WorkspaceLock> {
        lock::acquire(home, name, &format!("{command} {name}"), self.wait)
    }
}

impl Output {
    fn say(&self, human: &str, json: serde_json::Value) {
        if self.json {
            println!("{json}");
        } else {
            println!("{human}");
        }
    }
}

fn create(home: &Home, out: &Output, args: Cmd) -> Result<()> {
    let Cmd::Create {
        name,
        image,
        from_snapshot,
        cpus,
        memory,
        disk_size,
        kernel,
        initrd,
        cmdline,
        no_agent,
        insecure,
        secrets,
        net,
        publish,
        dns,
    } = args
    else {
        unreachable!("create called for another command")
    };
    if let Some(source) = from_snapshot {
        return fork(home, out, &name, &source);
    }
    let Some(image) = image else {
        return Err(CliError::new(
            "input.missing_image",
            "create needs --image (or --from-snapshot WORKSPACE:TAG)",
        ));
    };
    workspace::validate_name(&name)?;
    let memory_mib = parse_size(&memory, "--memory")? >> 20;
    if memory_mib < 16 {
        return Err(CliError::new(
            "input.bad_size",
            "--memory must be at least 16M",
        ));
    }
    memory::check(
        memory_mib,
        memory::host_total_mib(),
        "input.memory_exceeds_host",
        &format!("--memory {memory}"),
    )?;
    let disk_size = disk_size
        .map(|s| parse_size(&s, "--disk-size"))
        .transpose()?;
    let secrets = secrets
        .iter()
        .map(|spec| {
            let bad = || {
                CliError::new(
                    "input.bad_secret",
                    format!("--secret {spec:?} is not NAME=@FILE"),
                )
            };
            let (name, file) = spec.split_once("=@").ok_or_else(bad)?;
            if name.is_empty() || name.contains('/') || file.is_empty() {
                return Err(bad());
            }
            let file = fs::canonicalize(file).map_err(|e| {
                CliError::new("input.bad_secret", format!("--secret {name}: {file}: {e}"))
            })?;
            Ok((name.to_owned(), file))
        })
        .collect::<Result<Vec<_>>>()?;
    if no_agent && !secrets.is_empty() {
        return Err(CliError::new(
            "input.bad_secret",
            "--secret needs the agent (drop --no-agent)",
        ));
    }
    if net == workspace::Network::None && !publish.is_empty() {
        return Err(CliError::new(
            "input.bad_publish",
            "--publish needs a network (drop --net none)",
        ));
    }
    if net == workspace::Network::None && !dns.is_empty() {
        return Err(CliError::new(
            "input.bad_dns",
            "--dns needs a network (drop --net none)",
        ));
    }
    if net == workspace::Network::Tap {
        if !publish.is_empty() {
            return Err(CliError::new(
                "input.user_net_only",
                "--publish is for --net user (with --net tap the namespace's kernel routes the guest's traffic)",
            ));
        }
        microagent_vhost_net::netns::check_privileges()
            .map_err(|e| CliError::new(e.code(), e.to_string()))?;
    }
    workspace::check_publish(&publish)?;
    workspace::check_dns(&dns)?;
    if cpus == 0 || cpus > 32 {
        return Err(CliError::new(
            "input.bad_cpus",
            format!("--cpus {cpus} is out of range (1 to 32)"),
        ));
    }
    let _lock = out.lock(home, &name, "create")?;
    let dir = workspace::dir(home, &name);
    if dir.exists() {
        return Err(CliError::new(
            "workspace.exists",
            format!("a workspace named {name} already exists"),
        ));
    }
    let kernel = kernel.unwrap_or_else(|| home.default_kernel());
    if !kernel.is_file() {
        return Err(CliError::new(
            "kernel.missing",
            format!(
                "guest kernel {} is missing (run `make kernel`, or pass --kernel)",
                kernel.display()
            ),
        ));
    }
    let store = Store::new(home.images());
    let progress = progress_for(out);
    let pulled = fetch_image(home, &progress, &image, insecure, Platform::default(), &[])?;
    // Checked before the root disk is built: a config that is not JSON leaves no disk.
    let defaults =
        exec_defaults(&store, &pulled).map_err(|e| CliError::new(e.code(), e.to_string()))?;
    let disk = root_disk_observed(&store, &pulled, disk_size, &progress)
        .map_err(|e| CliError::new(e.code(), e.to_string()))?;

    kill_point::reached("create.disk_built");
    // Built in a temporary directory and renamed: a workspace exists whole or not at all.
    // The directory ends in this process's pid: what a killed create left is swept.
    workspace::sweep_interrupted(home);
    let tmp = workspace::creating_dir(home, &name);
    let made = (|| {
        fs::create_dir_all(&tmp).map_err(|e| CliError::new("home.unwritable", e.to_string()))?;
        workspace::copy_disk(&disk, &tmp.join("rootfs.ext4"))?;
        kill_point::reached("create.disk_copied");
        let (initrd, base) = if no_agent {
            (initrd, String::new())
        } else {
            let agent = fs::read(runtime::static_agent()?)
                .map_err(|e| CliError::new("host.install_broken", e.to_string()))?;
            let mut image = Initramfs::new();
            image.file("init", &agent, 0o755);
            image
                .write(&tmp.join("initrd.cpio"))
                .map_err(|e| CliError::new("home.unwritable", e.to_string()))?;
            let mut base =
                format!("console=ttyS0 reboot=k panic=1 init_on_free=1 microagent.hostname={name}");
            if net != workspace::Network::None {
                base.push(' ');
                base.push_str(workspace::USER_NET_CMDLINE);
            }
            (Some(dir.join("initrd.cpio")), base)
        };
        let extra = cmdline.unwrap_or_else(|| {
            if no_agent {
                "console=ttyS0 reboot=k panic=1".into()
            } else {
                String::new()
            }
        });
        let config = Config {
            name: name.clone(),
            image: Some(pulled.reference.clone()),
            image_digest: Some(pulled.manifest_digest.to_string()),
            cpus,
            memory_mib,
            kernel: fs::canonicalize(&kernel).unwrap_or(kernel),
            initrd,
            cmdline: format!("{base} {extra}").trim().to_owned(),
            agent: !no_agent,
            created: workspace::now_rfc3339(),
            secrets,
            defaults,
            net,
            publish,
            dns,
            cid: workspace::DEFAULT_CID,
            mac: None,
        };
        fs::write(
            tmp.join("workspace.json"),
            serde_json::to_vec_pretty(&config).unwrap_or_default(),
        )
        .map_err(|e| CliError::new("home.unwritable", e.to_string()))?;
        fs::rename(&tmp, &dir).map_err(|e| CliError::new("home.unwritable", e.to_string()))?;
        Ok(config)
    })();
    if made.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    let config = made?;
    out.say(
        &format!(
            "created {name} from {} ({})",
            pulled.reference, pulled.manifest_digest
        ),
        serde_json::json!({"created": name, "image": config.image, "digest": config.image_digest}),
    );
    Ok(())
}

/// An image's name in the store: as typed (alpine:3.20) or as stored (docker.io/...).
fn stored_name(store: &Store, reference: &str) -> String {
    match Source::parse(reference) {
        Ok(Source::Registry(r)) if !store.refs().contains_key(reference) => r.to_string(),
        _ => reference.to_owned(),
    }
}

/// The CA certificates to trust for `registry`: certs.d/<registry>/*.crt under the
/// home and /etc/docker, then `extra`.
fn ca_certs(home: &Home, registry: &str, extra: &[PathBuf]) -> Result<Vec<CaCert>> {
    let dirs = [home.root().join("certs.d"), PathBuf::from(DOCKER_CERTS_D)];
    microagent_image::tls::ca_certs(registry, &dirs, extra)
        .map_err(|e| CliError::new(e.code(), e.to_string()))
}

/// A registry as typed for login/logout (`https://ghcr.io/` is `ghcr.io`).
fn registry_name(text: &str) -> String {
    let text = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .unwrap_or(text);
    text.trim_end_matches('/').to_owned()
}

/// Where a command's progress goes: bars on a terminal, JSON lines with `--json`
/// (both on stderr), nothing otherwise.
fn progress_for(out: &Output) -> Reporter {
    progress::Mode::choose(out.json, std::io::stderr().is_terminal()).reporter()
}

/// Pulls or imports an `--image` value into the store, with progress.
fn fetch_image(
    home: &Home,
    progress: &Reporter,
    text: &str,
    insecure: bool,
    platform: Platform,
    extra_ca: &[PathBuf],
) -> Result<microagent_image::pull::Image> {
    let store = &Store::new(home.images());
    let source =
        Source::parse(text).map_err(|e| CliError::new("image.bad_reference", e.to_string()))?;
    let ca_certs = match &source {
        Source::Registry(r) => ca_certs(home, &r.registry, extra_ca)?,
        _ => Vec::new(),
    };
    let options = PullOptions {
        insecure,
        progress: progress.clone(),
        platform,
        ca_certs,
    };
    fetch(store, &source, &options).map_err(|e| CliError::new(e.code(), e.to_string()))
}

fn fork(home: &Home, out: &Output, new: &str, source: &str) -> Result<()> {
    workspace::validate_name(new)?;
    let (from, tag) = restore::parse_source(source)?;
    let snap = snapshot::open(home, from, tag)?;
    host_can_run(new, &snap.info.workspace)?;
    let _lock = out.lock(home, new, "create")?;
    let (config, took) = restore::fork(home, new, &snap)?;
    out.say(
        &format!(
            "created {new} from snapshot {from}:{tag}, running in {:.2}s",
            took.as_secs_f64()
        ),
        serde_json::json!({"created": new, "from_snapshot": source, "image": config.image, "seconds": took.as_secs_f64()}),
    );
    Ok(())
}

/// Refuses what this host cannot run: more memory than it has, a Linux guest without
/// hardware virtualization.
fn host_can_run(name: &str, config: &Config) -> Result<()> {
    memory::check(
        config.memory_mib,
        memory::host_total_mib(),
        "workspace.memory_exceeds_host",
        &format!("workspace {name} (recreate it with a smaller --memory)"),
    )?;
    if config.agent {
        if let Some(why) = microagent_vmm::host::linux_guest_limitation() {
            return Err(CliError::new(
                "host.no_hardware_virtualization",
                format!("{name} cannot start here: {why}"),
            ));
        }
    }
    Ok(())
}

fn start(home: &Home, out: &Output, name: &str, from_snapshot: Option<&str>) -> Result<()> {
    let config = workspace::load(home, name)?;
    let _lock = out.lock(home, name, "start")?;
    if let Some(tag) = from_snapshot {
        host_can_run(name, &config)?;
        let took = restore::rollback(home, &config, tag)?;
        out.say(
            &format!(
                "started {name} from snapshot {tag} in {:.2}s",
                took.as_secs_f64()
            ),
            serde_json::json!({"started": name, "from_snapshot": tag, "seconds": took.as_secs_f64()}),
        );
        return Ok(());
    }
    let _ = fs::remove_file(restore::restoring_disk(home, name));
    match runtime::state(home, name) {
        State::Running | State::Paused => {
            return Err(CliError::new(
                "workspace.running",
                format!("{name} is already running"),
            ))
        }
        // Booting its disk afresh would be a workspace nobody asked for.
        State::Crashed { reason } if workspace::fork_interrupted(home, name) => {
            return Err(CliError::new(
                "workspace.fork_interrupted",
                format!("{name}: {reason}"),
            ))
        }
        State::Crashed { .. } => runtime::kill_all(home, name),
        State::Created | State::Halted => {}
    }
    host_can_run(name, &config)?;
    let took = runtime::start(home, &config)?;
    if !config.secrets.is_empty() {
        let delivered = runtime::deliver_secrets(home, &config);
        if let Err(e) = delivered {
            runtime::halt(home, &config);
            return Err(e);
        }
    }
    out.say(
        &format!("started {name} in {:.2}s", took.as_secs_f64()),
        serde_json::json!({"started": name, "seconds": took.as_secs_f64()}),
    );
    Ok(())
}

/// The host terminal in raw mode for a TTY exec; restored when dropped.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn enable(wanted: bool) -> Self {
        if !wanted || !std::io::stdin().is_terminal() {
            return Self(None);
        }
        // SAFETY: an all-zero termios is valid for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr on stdin with a valid termios.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return Self(None);
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw and tcsetattr on a termios we own and on stdin.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
        }
        Self(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restoring the settings read from stdin earlier.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
        }
    }
}

fn terminal_size() -> TtySize {
    // SAFETY: TIOCGWINSZ on stdout with a valid winsize to fill.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0;
    if ok {
        TtySize {
            rows: ws.ws_row,
            cols: ws.ws_col,
        }
    } else {
        TtySize { rows: 24, cols: 80 }
    }
}

/// Prints the guest console; with `follow`, goes on printing what the guest writes until
/// the workspace stops (halted, crashed, deleted).
fn logs(home: &Home, name: &str, follow: bool) {
    let path = workspace::console_log(home, name);
    let mut offset = 0;
    loop {
        // Asked before reading, so whatever the guest wrote before it stopped is printed.
        let again = follow && matches!(runtime::state(home, name), State::Running | State::Paused);
        if let Ok(mut file) = fs::File::open(&path) {
            let len = file.metadata().map_or(0, |m| m.len());
            if len < offset {
                // A new console log (the workspace was made again): from its start.
                offset = 0;
            }
            let mut rest = Vec::new();
            if std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset)).is_ok()
                && file.read_to_end(&mut rest).is_ok()
            {
                offset += rest.len() as u64;
                let _ = std::io::stdout().write_all(&rest);
                let _ = std::io::stdout().flush();
            }
        }
        if !again {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Ok for a running workspace; otherwise `workspace.crashed` naming the process that
/// died, or `workspace.not_running`.
fn running(home: &Home, name: &str) -> Result<()> {
    match runtime::state(home, name) {
        State::Running => Ok(()),
        State::Crashed { reason } => Err(CliError::new(
            "workspace.crashed",
            format!("{name} crashed: {reason} (microagent delete {name} --force)"),
        )),
        _ => Err(CliError::new(
            "workspace.not_running",
            format!("{name} is not running (microagent start {name})"),
        )),
    }
}

fn exec(home: &Home, args: Cmd) -> Result<i32> {
    let Cmd::Exec {
        name,
        interactive,
        tty,
        env,
        workdir,
        user,
        command,
    } = args
    else {
        unreachable!("exec called for another command")
    };
    let config = workspace::load(home, &name)?;
    let liveness = runtime::exec_liveness()?;
    running(home, &name)?;
    let env = env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| {
                    CliError::new("input.bad_env", format!("-e {kv:?} is not KEY=VALUE"))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    // The image's Env, WorkingDir and User, overridden by the flags.
    let mut all_env = config.defaults.env.clone();
    all_env.extend(env);
    let request = ExecRequest {
        argv: command,
        env: all_env,
        cwd: workdir.or(config.defaults.working_dir.clone()),
        user: user.or(config.defaults.user.clone()),
        tty: tty.then(terminal_size),
    };
    let conn = Connection::open(&runtime::agent_socket(home, &name), Duration::from_secs(10))
        .map_err(|e| {
            // A process of the workspace died meanwhile: say which, not only that the
            // agent is silent.
            running(home, &name)
                .err()
                .unwrap_or_else(|| CliError::new("agent.unreachable", e.to_string()))
        })?;
    // A workspace its user pauses mid-command, or whose VMM is busy writing a snapshot,
    // is held, not hung.
    let conn = {
        let (home, name) = (home.clone(), name.clone());
        conn.with_liveness(liveness)
            .with_hold_check(move || runtime::guest_held(&home, &name))
    };
    let stdin: Box<dyn Read + Send> = if interactive {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::io::empty())
    };
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    let raw = RawTerminal::enable(tty && interactive);
    let (controls, received) = std::sync::mpsc::channel();
    if tty {
        // Follow the host terminal's size; the thread ends with the channel.
        let mut size = terminal_size();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let now = terminal_size();
            if now != size {
                size = now;
                if controls.send(HostMessage::Resize(now)).is_err() {
                    return;
                }
            }
        });
    }
    let result = conn.exec_with_controls(request, stdin, &mut stdout, &mut stderr, received);
    drop(raw);
    match result {
        Ok(exit) => Ok(exit.code()),
        Err(e @ (AgentError::NoReply { .. } | AgentError::Unresponsive(_))) => {
            Err(CliError::new("agent.timeout", format!("{name}: {e}")))
        }
        Err(e) => {
            let code = e.exit_code();
            eprintln!("microagent: {e}");
            Ok(code)
        }
    }
}

fn delete(home: &Home, out: &Output, name: &str, yes: bool, force: bool) -> Result<()> {
    let config = workspace::load(home, name)?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::new(
                "input.confirmation_needed",
                format!("deleting {name} needs --yes when not on a terminal"),
            ));
        }
        eprint!("delete workspace {name} and everything it owns? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().read_line(&mut answer);
        if !answer.trim().eq_ignore_ascii_case("y") {
            return Err(CliError::new("input.cancelled", "not deleted"));
        }
    }
    let _lock = out.lock(home, name, "delete")?;
    match runtime::state(home, name) {
        State::Running | State::Paused if !force => {
            return Err(CliError::new(
                "workspace.running",
                format!("{name} is running: halt it first, or pass --force"),
            ))
        }
        State::Running | State::Paused => runtime::halt(home, &config),
        State::Crashed { .. } => runtime::kill_all(home, name),
        State::Created | State::Halted => {}
    }
    fs::remove_dir_all(workspace::dir(home, name))
        .map_err(|e| CliError::new("home.unwritable", e.to_string()))?;
    let _ = fs::remove_file(home.workspaces().join(format!(".{name}.lock")));
    out.say(
        &format!("deleted {name}"),
        serde_json::json!({"deleted": name}),
    );
    Ok(())
}

fn list(home: &Home, out: &Output) {
    let rows: Vec<(Config, State)> = workspace::list(home)
        .into_iter()
        .map(|c| {
            let s = runtime::state(home, &c.name);
            (c, s)
        })
        .collect();
    if out.json {
        let items: Vec<_> = rows
            .iter()
            .map(|(c, s)| serde_json::json!({"name": c.name, "state": s, "image": c.image, "cpus": c.cpus, "memory_mib": c.memory_mib, "created": c.created, "snapshots": snapshot::count(home, &c.name), "net": c.net, "publish": c.publish}))
            .collect();
        println!("{}", serde_json::Value::Array(items));
        return;
    }
    println!("NAME                 STATE     IMAGE                                    CPUS  MEMORY CREATED              SNAPSHOTS PORTS");
    for (c, s) in rows {
        println!(
            "{:<20} {:<9} {:<40} {:>4} {:>6}M {:<20} {:<9} {}",
            c.name,
            s.name(),
            c.image.as_deref().unwrap_or("-"),
            c.cpus,
            c.memory_mib,
            c.created,
            snapshot::count(home, &c.name),
            if c.publish.is_empty() {
                "-".to_owned()
            } else {
                c.publish.join(",")
            }
        );
    }
}

fn snapshot_cmd(home: &Home, out: &Output, command: SnapshotCmd) -> Result<()> {
    match command {
        SnapshotCmd::Create { name, tag } => {
            let config = workspace::load(home, &name)?;
            let tag = tag.unwrap_or_else(|| snapshot::default_tag(&workspace::now_rfc3339()));
            snapshot::validate_tag(&tag)?;
            let _lock = out.lock(home, &name, "snapshot create")?;
            let info = snapshot::create(home, &config, &tag)?;
            out.say(
                &format!(
                    "snapshot {tag} created ({} MiB RAM, {} vCPU) at {}",
                    config.memory_mib, config.cpus, info.created
                ),
                serde_json::json!({"snapshot": tag, "workspace": name, "created": info.created, "memory_mib": config.memory_mib, "cpus": config.cpus}),
            );
        }
        SnapshotCmd::List { name } => {
            workspace::load(home, &name)?;
            let entries = snapshot::list(home, &name);
            if out.json {
                let items: Vec<_> = entries
                    .iter()
                    .map(|e| serde_json::json!({"tag": e.info.tag, "created": e.info.created, "image": e.info.workspace.image, "logical_bytes": e.logical, "allocated_bytes": e.allocated}))
                    .collect();
                println!("{}", serde_json::Value::Array(items));
                return Ok(());
            }
            println!("TAG SIZE CREATED IMAGE");
            for e in entries {
                println!(
                    "{} {} {} {}",
                    e.info.tag,
                    snapshot::human(e.allocated),
                    e.info.created,
                    e.info.workspace.image.as_deref().unwrap_or("-")
                );
            }
        }
        SnapshotCmd::Delete { name, tag } => {
            workspace::load(home, &name)?;
            let _lock = out.lock(home, &name, "snapshot delete")?;
            snapshot::delete(home, &name, &tag)?;
            out.say(
                &format!("deleted snapshot {tag} of {name}"),
                serde_json::json!({"deleted_snapshot": tag, "workspace": name}),
            );
        }
    }
    Ok(())
}

fn doctor(home: &Home, out: &Output) {
    let mut checks = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String, fix: &str| {
        checks.push(serde_json::json!({"check": name, "ok": ok, "detail": detail, "fix": if ok { "" } else { fix }}));
    };
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    check(
        "kvm",
        kvm.is_ok(),
        kvm.map_or_else(|e| e.to_string(), |_| "/dev/kvm is usable".into()),
        "load kvm_intel/kvm_amd and give this user access to /dev/kvm",
    );
    let hw = microagent_vmm::host::has_hardware_virtualization();
    let limitation = microagent_vmm::host::linux_guest_limitation();
    check(
        "hardware_virtualization",
        limitation.is_none(),
        limitation.clone().unwrap_or_else(|| if hw { "VMX/SVM available".into() } else { "no PVM limitation detected".into() }),
        "run on a host (or nested VM) with VMX/SVM; this host can still run the test guest and the QEMU rigs",
    );
    let kernel = home.default_kernel();
    let info = kernel_info::identify(&kernel);
    check(
        "guest_kernel",
        info.is_ok(),
        match &info {
            Ok(info) => format!("{} ({})", kernel.display(), info.describe()),
            Err(kernel_info::Error::Read { source, .. }) => {
                format!("{}: {source}", kernel.display())
            }
        },
        "make kernel",
    );
    let kernel_json = info.ok().map(|info| serde_json::json!(info));
    for tool in ["mke2fs", "cp"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        check(
            tool,
            found,
            format!("{tool} on PATH: {found}"),
            "apt-get install e2fsprogs coreutils",
        );
    }
    let _ = fs::create_dir_all(home.root());
    let free = std::ffi::CString::new(home.root().as_os_str().as_encoded_bytes())
        .ok()
        .and_then(|p| {
            // SAFETY: an all-zero statvfs is a valid value for statvfs(3) to overwrite.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: statvfs with a NUL-terminated path and a valid output struct.
            (unsafe { libc::statvfs(p.as_ptr(), &mut st) } == 0)
                .then(|| st.f_bavail as u64 * st.f_frsize as u64)
        });
    let free_gib = free.unwrap_or(0) >> 30;
    check(
        "free_space",
        free_gib >= 4,
        format!("{free_gib} GiB free under {}", home.root().display()),
        "free at least 4 GiB for images and workspaces",
    );
    let (huge, detail) = memory::huge_pages();
    check(
        "huge_pages",
        huge,
        detail,
        "echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled (as root; a \
         systemd-tmpfiles `w` line keeps it across reboots)",
    );
    let (supported, detail) = confinement::kernel_support();
    let off = confinement::seccomp_flag().is_some();
    check(
        "seccomp",
        supported && !off,
        if off {
            format!("{SECCOMP_ENV}=off: workspaces start WITHOUT seccomp filters")
        } else {
            detail
        },
        "use a kernel with CONFIG_SECCOMP_FILTER; unset MICROAGENT_SECCOMP",
    );
    let (landlock, detail) = confinement::landlock_support();
    check(
        "landlock",
        landlock,
        detail,
        "use Linux 5.13+ with landlock in CONFIG_LSM (or lsm= on its command line); unset MICROAGENT_LANDLOCK",
    );
    // The processes of running workspaces, as the kernel sees them.
    for ws in workspace::list(home) {
        let Some(pids) = runtime::pids(home, &ws.name) else {
            continue;
        };
        for (binary, pid) in pids.all() {
            if let Some(p) = confinement::process(pid) {
                check(
                    &format!("confinement {}/{binary}", ws.name),
                    p.fully_confined(),
                    format!("pid {pid}: {}", p.describe()),
                    "restart the workspace: it was started without confinement",
                );
            }
            // Each process logs to `<kind>.log` in its workspace.
            let kind = binary
                .strip_prefix("microagent-vhost-")
                .unwrap_or(binary.trim_start_matches("microagent-"));
            if landlock && confinement::process(pid).is_some() {
                let log = workspace::dir(home, &ws.name).join(format!("{kind}.log"));
                let restricted = confinement::landlocked(&log);
                check(
                    &format!("landlock {}/{binary}", ws.name),
                    restricted,
                    if restricted {
                        format!("pid {pid}: files only beneath its workspace's directories")
                    } else {
                        format!("pid {pid}: not restricted (its log has no Landlock line)")
                    },
                    "restart the workspace: it was started without Landlock",
                );
            }
        }
    }
    // --json carries the kernel's version and config hash as fields too.
    if let Some(kernel) = kernel_json {
        for c in checks.iter_mut().filter(|c| c["check"] == "guest_kernel") {
            c["kernel"] = kernel.clone();
        }
    }
    if out.json {
        println!("{}", serde_json::Value::Array(checks));
        return;
    }
    for c in checks {
        let mark = if c["ok"] == true { "ok  " } else { "FAIL" };
        println!(
            "{mark} {:<24} {}",
            c["check"].as_str().unwrap_or(""),
            c["detail"].as_str().unwrap_or("")
        );
        if c["ok"] != true {
            println!("     fix: {}", c["fix"].as_str().unwrap_or(""));
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    let home = match cli.home {
        Some(dir) => Home::new(dir),
        None => Home::from_env().map_err(|e| CliError::new("home.unknown", e.to_string()))?,
    };
    let out = Output {
        json: cli.json,
        wait: if cli.wait {
            Wait::Forever
        } else {
            Wait::Bounded(Duration::from_secs(cli.lock_timeout))
        },
    };
    match cli.command {
        args @ Cmd::Create { .. } => create(&home, &out, args)?,
        Cmd::Start {
            name,
            from_snapshot,
        } => start(&home, &out, &name, from_snapshot.as_deref())?,
        Cmd::Snapshot { command } => snapshot_cmd(&home, &out, command)?,
        args @ Cmd::Exec { .. } => return exec(&home, args),
        Cmd::Shell { name } => {
            let args = Cmd::Exec {
                name,
                interactive: true,
                tty: true,
                env: vec!["TERM=xterm-256color".into()],
                workdir: None,
                user: None,
                command: vec!["/bin/sh".into()],
            };
            return exec(&home, args);
        }
        Cmd::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "microagent",
                &mut std::io::stdout(),
            );
        }
        Cmd::Halt { name } => {
            let config = workspace::load(&home, &name)?;
            let _lock = out.lock(&home, &name, "halt")?;
            runtime::halt(&home, &config);
            out.say(
                &format!("halted {name}"),
                serde_json::json!({"halted": name}),
            );
        }
        Cmd::Delete { name, yes, force } => delete(&home, &out, &name, yes, force)?,
        Cmd::List => list(&home, &out),
        Cmd::Inspect { name } => {
            let config = workspace::load(&home, &name)?;
            let state = runtime::state(&home, &name);
            let snapshots = snapshot::count(&home, &name);
            // A running agent says its version and the CID its kernel uses.
            let agent = (config.agent && state == State::Running)
                .then(|| {
                    Connection::open(&runtime::agent_socket(&home, &name), Duration::from_secs(5))
                        .ok()
                })
                .flatten()
                .map(|conn| serde_json::json!({"version": conn.info().agent, "cid": conn.info().cid}));
            // The kernel's version and build configuration; an unreadable file is an
            // error for `start`, here it is shown as such.
            let kernel = match kernel_info::identify(&config.kernel) {
                Ok(info) => serde_json::json!(info),
                Err(e) => serde_json::json!({"error": e.to_string()}),
            };
            println!(
                "{}",
                serde_json::json!({"config": config, "state": state, "snapshots": snapshots, "agent": agent, "kernel": kernel})
            );
        }
        Cmd::Pause { name } | Cmd::Resume { name } if workspace::load(&home, &name).is_err() => {
            workspace::load(&home, &name)?;
        }
        Cmd::Pause { name } => {
            runtime::vmm_call(&home, &name, &Request::Pause, runtime::CONTROL_TIMEOUT)?;
            snapshot::forget_interrupted(&home, &name);
            out.say(
                &format!("paused {name}"),
                serde_json::json!({"paused": name}),
            );
        }
        Cmd::Resume { name } => {
            runtime::vmm_call(&home, &name, &Request::Resume, runtime::CONTROL_TIMEOUT)?;
            snapshot::forget_interrupted(&home, &name);
            out.say(
                &format!("resumed {name}"),
                serde_json::json!({"resumed": name}),
            );
        }
        Cmd::Logs { name, follow } => {
            workspace::load(&home, &name)?;
            logs(&home, &name, follow);
        }
        Cmd::Doctor => doctor(&home, &out),
        Cmd::Image {
            command:
                ImageCmd::Pull {
                    reference,
                    insecure,
                    platform,
                    ca_certs,
                },
        } => {
            let platform = match platform {
                Some(text) => text
                    .parse::<Platform>()
                    .map_err(|e| CliError::new(e.code(), e.to_string()))?,
                None => Platform::default(),
            };
            let image = fetch_image(
                &home,
                &progress_for(&out),
                &reference,
                insecure,
                platform,
                &ca_certs,
            )?;
            let shown = image.platform.as_deref().unwrap_or("unknown platform");
            out.say(
                &format!("pulled {} ({}, {shown}, {} blobs downloaded)", image.reference, image.manifest_digest, image.downloaded),
                serde_json::json!({"reference": image.reference, "digest": image.manifest_digest, "platform": image.platform, "downloaded": image.downloaded, "downloaded_bytes": image.downloaded_bytes}),
            );
        }
        Cmd::Image {
            command: ImageCmd::Inspect { reference },
        } => {
            let store = Store::new(home.images());
            let name = stored_name(&store, &reference);
            let info = microagent_image::inspect::inspect(&store, &name)
                .map_err(|e| CliError::new(e.code(), e.to_string()))?;
            if out.json {
                println!("{}", serde_json::to_string(&info).unwrap_or_default());
            } else {
                println!("reference  {}", info.reference);
                println!("digest     {}", info.digest);
                println!("platform   {}", info.platform.as_deref().unwrap_or("-"));
                println!("size       {} bytes", info.size);
                println!("config     {}", info.config_digest);
                for layer in &info.layers {
                    println!(
                        "layer      {} {:>12} {}",
                        layer.digest, layer.size, layer.media_type
                    );
                }
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info.config).unwrap_or_default()
                );
            }
        }
        Cmd::Image {
            command:
                ImageCmd::Login {
                    registry,
                    username,
                    password_stdin,
                    insecure,
                    ca_certs,
                },
        } => {
            let registry = registry_name(&registry);
            if !password_stdin {
                return Err(CliError::new(
                    "input.missing_password",
                    format!("pass the password on stdin: echo \"$TOKEN\" | microagent image login {registry} -u {username} --password-stdin"),
                ));
            }
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .map_err(|e| {
                    CliError::new(
                        "input.missing_password",
                        format!("reading the password from stdin: {e}"),
                    )
                })?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err(CliError::new(
                    "input.missing_password",
                    "the password on stdin is empty",
                ));
            }
            let cas = self::ca_certs(&home, &registry, &ca_certs)?;
            let plain = microagent_image::pull::plain_http(&registry, insecure, !cas.is_empty());
            let file = microagent_image::auth::login(&registry, &username, password, plain, &cas)
                .map_err(|e| CliError::new(e.code(), e.to_string()))?;
            out.say(
                &format!(
                    "logged in to {registry} as {username} (credentials in {})",
                    file.display()
                ),
                serde_json::json!({"logged_in": registry, "username": username, "file": file}),
            );
        }
        Cmd::Image {
            command: ImageCmd::Logout { registry },
        } => {
            let registry = registry_name(&registry);
            let removed = microagent_image::auth::logout(&registry)
                .map_err(|e| CliError::new(e.code(), e.to_string()))?;
            out.say(
                &if removed {
                    format!("removed the credentials for {registry}")
                } else {
                    format!("no credentials stored for {registry}")
                },
                serde_json::json!({"logged_out": registry, "removed": removed}),
            );
        }
        Cmd::Image {
            command: ImageCmd::List,
        } => {
            let store = Store::new(home.images());
            let refs = store.refs();
            if out.json {
                let items: Vec<_> = refs
                    .iter()
                    .map(|(name, e)| serde_json::json!({"reference": name, "digest": e.manifest_digest, "platform": e.platform, "size": store.size(e), "pulled_unix": e.pulled_unix}))
                    .collect();
                println!("{}", serde_json::Value::Array(items));
            } else {
                println!(
                    "{:<60} {:<20} {:<14} {:>10}",
                    "REFERENCE", "DIGEST", "PLATFORM", "SIZE"
                );
                for (name, e) in &refs {
                    let short = e.manifest_digest.get(7..19).unwrap_or("");
                    let platform = e.platform.as_deref().unwrap_or("-");
                    println!(
                        "{name:<60} {short:<20} {platform:<14} {:>9}K",
                        store.size(e) >> 10
                    );
                }
            }
        }
        Cmd::Image {
            command: ImageCmd::Rm { reference },
        } => {
            let store = Store::new(home.images());
            let name = stored_name(&store, &reference);
            let removed = store
                .remove(&name)
                .map_err(|e| CliError::new("image.remove_failed", e.to_string()))?
                .ok_or_else(|| {
                    CliError::new(
                        "image.not_found",
                        format!("no image {reference} in the store (see `microagent image list`)"),
                    )
                })?;
            out.say(
                &format!("removed {name} ({removed} files freed)"),
                serde_json::json!({"removed": name, "files": removed}),
            );
        }
    }
    Ok(0)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_ERROR } else { 0 });
        }
    };
    let json = cli.json;
    match run(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({"error": e}));
            } else {
                eprintln!("microagent: {e}");
            }
            ExitCode::from(EXIT_ERROR)
        }
    }
}
