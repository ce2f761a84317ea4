//! The `microagent` command as a test drives it: its own home and runtime directory,
//! output captured, `--json` errors checked by code.

use crate::daemon::binary;
use crate::registry::{push, push_workspace_image, write_layout, Registry};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one CLI command may run in a test: far past the slowest seen (a workspace
/// start in the nested rig, under 30 s; a snapshot of the tests' 64-256 MiB guests, a
/// few seconds, though the CLI itself allows one 600 s), and short of the nested rig's
/// 600 s per job, so that a hung command fails its test with the logs instead of timing
/// the job out.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(300);

pub struct Cli {
    pub home: PathBuf,
    pub runtime: PathBuf,
}

impl Cli {
    /// A home and runtime directory under `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            home: dir.join("home"),
            runtime: dir.join("run"),
        }
    }

    /// Makes the project's cached guest kernels visible in this home (the CLI looks for
    /// `kernels/<config hash>/vmlinux` there).
    pub fn link_kernels(&self) {
        let kernel = crate::kernel::guest_kernel().unwrap();
        let kernels = kernel.parent().and_then(Path::parent).unwrap();
        std::fs::create_dir_all(&self.home).unwrap();
        let link = self.home.join("kernels");
        if !link.exists() {
            std::os::unix::fs::symlink(kernels, link).unwrap();
        }
    }

    /// A CLI under `dir` whose home sees the project kernels, with a registry on loopback
    /// serving the workspace test image; returns the CLI, the registry (stopped when
    /// dropped) and the image reference.
    pub fn with_workspace_image(dir: &Path) -> (Self, Registry, String) {
        let registry = Registry::start(dir);
        let image = push_workspace_image(dir, &registry, "test/workspace:v1");
        let cli = Self::new(dir);
        cli.link_kernels();
        (cli, registry, image)
    }

    /// A CLI under `dir` with a registry on loopback serving the small test image
    /// (`registry::write_layout`) as `test/img:v1`; returns the CLI, the registry
    /// (stopped when dropped) and the image reference.
    pub fn with_test_image(dir: &Path) -> (Self, Registry, String) {
        let registry = Registry::start(dir);
        let layout = dir.join("layout");
        write_layout(&layout);
        push(&layout, &registry, "test/img:v1");
        let image = format!("{}/test/img:v1", registry.addr);
        (Self::new(dir), registry, image)
    }

    /// The command, not started yet.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(binary("microagent").unwrap());
        cmd.arg("--home")
            .arg(&self.home)
            .args(args)
            .env("MICROAGENT_RUNTIME_DIR", &self.runtime);
        cmd
    }

    /// Runs to the end, output captured. A command still running after
    /// [`COMMAND_LIMIT`] is killed and the test fails with what it printed and every
    /// log, rather than hanging until the test's (or the nested rig's) own limit.
    pub fn run<S: AsRef<OsStr> + std::fmt::Debug>(&self, args: &[S]) -> Output {
        self.run_limited(args, None)
    }

    /// Runs with `stdin` fed to the command (within [`COMMAND_LIMIT`], as [`Self::run`]).
    pub fn run_with_stdin<S: AsRef<OsStr> + std::fmt::Debug>(
        &self,
        args: &[S],
        stdin: &[u8],
    ) -> Output {
        self.run_limited(args, Some(stdin))
    }

    fn run_limited<S: AsRef<OsStr> + std::fmt::Debug>(
        &self,
        args: &[S],
        stdin: Option<&[u8]>,
    ) -> Output {
        let mut child = self
            .command(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let writer = child.stdin.take().zip(stdin).map(|(mut input, data)| {
            let data = data.to_vec();
            std::thread::spawn(move || input.write_all(&data))
        });
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        };
        let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
        let deadline = Instant::now() + COMMAND_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "microagent {args:?} was still running after {COMMAND_LIMIT:?} (killed); \
                     it printed:\n{}\n{}\n{}",
                    String::from_utf8_lossy(&stdout.join().unwrap()),
                    String::from_utf8_lossy(&stderr.join().unwrap()),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if let Some(writer) = writer {
            writer.join().unwrap().unwrap();
        }
        Output {
            status,
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        }
    }

    /// Runs and expects success; returns stdout.
    pub fn ok<S: AsRef<OsStr> + std::fmt::Debug>(&self, args: &[S]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "microagent {args:?}: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The end of every workspace's logs (VMM, daemons, guest console) and the runtime
    /// directory's listing: what a failed assertion prints, as the home is a temporary
    /// directory that is gone once the test has failed.
    pub fn logs(&self) -> String {
        let mut report = String::new();
        let workspaces = std::fs::read_dir(self.home.join("workspaces"))
            .into_iter()
            .flatten();
        for ws in workspaces.flatten().filter(|e| e.path().is_dir()) {
            let logs = std::fs::read_dir(ws.path()).into_iter().flatten().flatten();
            for log in logs.filter(|e| e.path().extension() == Some(OsStr::new("log"))) {
                let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(25)..].join("\n");
                report.push_str(&format!("--- {} (end) ---\n{tail}\n", log.path().display()));
            }
        }
        let runtime = std::fs::read_dir(&self.runtime)
            .into_iter()
            .flatten()
            .flatten();
        for ws in runtime {
            let files: Vec<String> = std::fs::read_dir(ws.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            report.push_str(&format!("--- {}: {files:?}\n", ws.path().display()));
        }
        report
    }

    /// Runs with --json and expects exit 125 with `code`; returns the message.
    pub fn fails(&self, args: &[&str], code: &str) -> String {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert_eq!(
            out.status.code(),
            Some(125),
            "microagent {args:?}: {out:?}\n{}",
            self.logs()
        );
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(reply["error"]["code"], code, "{reply}");
        let message = reply["error"]["message"].as_str().unwrap().to_owned();
        assert!(!message.is_empty());
        message
    }

    /// The workspace's entry in `list --json` (Null when it is not listed).
    pub fn entry(&self, name: &str) -> serde_json::Value {
        let list: serde_json::Value = serde_json::from_str(&self.ok(&["--json", "list"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    /// The workspace's state word (`running`, `paused`, ...), or "absent".
    pub fn state(&self, name: &str) -> String {
        let entry = self.entry(name);
        if entry.is_null() {
            return "absent".into();
        }
        entry["state"]["state"]
            .as_str()
            .unwrap_or_else(|| panic!("no state in {entry}"))
            .to_owned()
    }

    /// The pids the runtime directory records for a running workspace.
    pub fn pids(&self, name: &str) -> Vec<u32> {
        let text = std::fs::read_to_string(self.runtime.join(name).join("state.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        ["vmm", "blk", "vsock", "net"]
            .iter()
            .filter_map(|k| v[k].as_u64().map(|p| p as u32))
            .collect()
    }
}

/// `create NAME --image IMAGE` of the CLI tests' usual workspace: `kernel` (the
/// freestanding test guest, or a stand-in) booted with `cmdline`, no agent, 1 vCPU,
/// 64 MiB. Callers push further flags after these.
pub fn test_guest_create<'a>(
    name: &'a str,
    image: &'a str,
    kernel: &'a str,
    cmdline: &'a str,
) -> Vec<&'a str> {
    vec![
        "create",
        name,
        "--image",
        image,
        "--no-agent",
        "--memory",
        "64M",
        "--cpus",
        "1",
        "--kernel",
        kernel,
        "--cmdline",
        cmdline,
    ]
}

/// A live process (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Processes still there after up to 10 s (a SIGKILLed VMM may take a moment to tear its
/// VM down on a loaded machine).
pub fn survivors(pids: &[u32]) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills, when dropped, every process the CLI recorded under `runtime` or that serves a
/// socket there (workspaces that a failing test left running: the CLI starts them
/// detached, so no child guard holds them). Only processes whose command is one of
/// microagent's binaries are signalled.
pub struct Reaper {
    runtime: PathBuf,
}

impl Cli {
    pub fn reaper(&self) -> Reaper {
        Reaper {
            runtime: self.runtime.clone(),
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // Unrecorded ones too (a start killed before it wrote a pid down).
        for (pid, command) in processes_under(&self.runtime) {
            let ours = command
                .split(' ')
                .next()
                .unwrap_or_default()
                .contains("/microagent-");
            if let (true, Ok(pid)) = (ours, i32::try_from(pid)) {
                // SAFETY: SIGKILL to a process running one of microagent's binaries with
                // a path in this test's own runtime directory.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let Ok(dirs) = std::fs::read_dir(&self.runtime) else {
            return;
        };
        for dir in dirs.flatten() {
            let Ok(text) = std::fs::read_to_string(dir.path().join("state.json")) else {
                continue;
            };
            let Ok(state) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            for key in ["vmm", "blk", "vsock", "net"] {
                let Some(pid) = state[key].as_u64().and_then(|p| i32::try_from(p).ok()) else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
                if pid > 0 && String::from_utf8_lossy(argv0).contains("/microagent-") {
                    // SAFETY: SIGKILL to a process the CLI under test recorded as its own,
                    // checked to still run one of microagent's binaries.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// A tmpfs of `size` mounted on `dir`, unmounted when dropped (needs root): a file
/// system that fills up when a test wants it to.
pub struct SmallFs(pub PathBuf);

impl SmallFs {
    pub fn mount(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a small tmpfs (needs root)");
        Self(dir)
    }

    /// Bytes still free.
    pub fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.0)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().nth(1).unwrap().trim().parse::<u64>().unwrap()
    }

    /// Fills the file system but for `leave` bytes with one file; returns it (remove it
    /// to free the space again).
    pub fn fill_leaving(&self, leave: u64) -> PathBuf {
        let filler = self.0.join("filler");
        let size = self.free().saturating_sub(leave).max(4096);
        let status = Command::new("fallocate")
            .args(["-l", &size.to_string()])
            .arg(&filler)
            .status()
            .unwrap();
        assert!(status.success(), "fallocate {size} on {}", self.0.display());
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Processes a failing test's reaper just killed may still hold files in it for a
        // moment; in the end it is detached lazily rather than left mounted.
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Live processes whose command line names a path under `dir` (a test's runtime
/// directory): whatever the CLI started there and did not stop.
pub fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let names_dir = cmdline
            .split(|&b| b == 0)
            .any(|arg| arg.starts_with(needle));
        if names_dir && alive(pid) {
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}
