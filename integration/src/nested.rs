//! The nested rig: real Linux under `microagent-vmm` on a hardware-virtualization KVM,
//! on a host whose own KVM cannot run Linux guests (PVM).
//!
//! QEMU's software emulation (`-accel tcg -cpu max`) offers AMD SVM with nested paging.
//! An L1 machine boots Debian's stock kernel (prepared by `scripts/nested-kernel.sh`),
//! loads kvm-amd, and so has a real `/dev/kvm`. This machine's `/` is shared into it
//! read-only over virtio-9p, plus one writable scratch folder at the same path as here;
//! L1's init chroots into the share with fresh proc/sys/dev and tmpfs on `/tmp`, `/run`,
//! `/root` and `/var/tmp`, runs one command, stores its output and exit status in the
//! scratch folder, and powers off. Everything the command starts (VMMs, daemons, L2
//! guests) ends with L1; QEMU itself is killed if the test is dropped early.
//!
//! [`on_linux_kvm`] is how tests use it: the test body runs right here where this host's
//! KVM runs Linux guests, and otherwise the same test function is run inside L1.

use crate::initramfs;
use crate::process::{self, ChildGuard};
use crate::report;
use microagent_cli::home::{self, Home};
use std::env;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Set inside L1, so a test never delegates twice.
pub const INSIDE_ENV: &str = "MICROAGENT_NESTED_L1";
/// Overrides where the L1 kernel cache is (default `$MICROAGENT_HOME/nested/current`).
pub const KERNEL_DIR_ENV: &str = "MICROAGENT_NESTED_KERNEL";
/// L1 memory; L2 guests, their disks and the workspace homes live in it (tmpfs).
const L1_MEMORY_MIB: u32 = 4096;
/// L1's soft-lockup watchdog reports a CPU that has not scheduled for twice this many
/// seconds (Linux's default is 10, so 20 s): short enough for L1's console, shown with
/// every failure, to say whether L1 itself stalled before a test's 10 s timeouts ended
/// the job. No run of this rig has shown a false report at this setting. With
/// `loglevel=5` and `softlockup_all_cpu_backtrace=1` a report comes with every CPU's
/// backtrace (at `quiet`'s level 4 the backtraces were left out).
const WATCHDOG_THRESH: u32 = 2;
/// Largest 9p message Linux 6.1's virtio transport takes: fewer round trips per read.
const MSIZE: u32 = 512 * 1024;
/// How much of a log a failure shows.
const TAIL: usize = 20000;
/// How many times a job whose L1 froze is run again: the fresh-clone CI of 5b76152 lost
/// two of its dozen nested jobs to freezes, so two in a row in one job are not far off.
const FREEZE_RETRIES: u32 = 2;
/// How many times a run lost to one of [`L2_BOOT_FAILURES`] is run again: at about one
/// lost boot in 20-50 and a dozen nested jobs in `make test`, two losses in a row are
/// rare but each cost a whole CI run.
const L2_RETRIES: u32 = 2;
/// How a Linux guest's boot fails now and then in this rig only, cause not known
/// (docs/testing.md, "L2 boot failures"): KVM reports a shutdown (a triple fault; the
/// VMM's log line, shown by a failed CLI assertion), or the guest prints nothing at all
/// and its agent never answers. A run that failed with either is run again, at most
/// [`L2_RETRIES`] times (see [`on_linux_kvm`]); every lost run is named in the summary.
const L2_BOOT_FAILURES: [&str; 2] = [
    "GuestReset { how: \"triple fault or shutdown\" }",
    "the agent did not answer within",
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Home(#[from] home::Error),
    #[error(
        "the nested rig's L1 kernel is not prepared at {dir}: run `make nested-kernel` \
         (scripts/nested-kernel.sh)"
    )]
    NoKernel { dir: PathBuf },
    #[error(transparent)]
    Initramfs(#[from] initramfs::Error),
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error("nested rig: {what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(
        "the L1 machine ended ({status}) without reporting the command's exit status; \
         L1 console ends with:\n{console}"
    )]
    NoStatus { status: ExitStatus, console: String },
    #[error(
        "L1 froze: no heartbeat from its userspace for {:?} (QEMU's TCG stopped running \
         it); its whole console is kept in {}; it ends with:\n{console}",
        FROZEN,
        kept.display()
    )]
    Frozen { console: String, kept: PathBuf },
}

/// L1's init writes a heartbeat to its second serial port every 2 s; this long without
/// one, L1 is taken as frozen. Seen here: QEMU 7.2's TCG, emulating SVM for L1's
/// kvm-amd, now and then keeps one L1 vCPU spinning (one QEMU thread at 100%) while the
/// other waits for it, and L1 never runs again; nothing inside L1, L2 included, can
/// cause or end that.
const FROZEN: Duration = Duration::from_secs(90);

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The L1 kernel and the modules it loads, in load order.
#[derive(Debug, Clone)]
pub struct L1Kernel {
    pub vmlinuz: PathBuf,
    pub modules: Vec<PathBuf>,
}

impl L1Kernel {
    pub fn locate() -> Result<Self, Error> {
        let dir = match env::var_os(KERNEL_DIR_ENV).filter(|d| !d.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => Home::from_env()?.root().join("nested/current"),
        };
        let vmlinuz = dir.join("vmlinuz");
        let order = fs::read_to_string(dir.join("modules/order"));
        match order {
            Ok(order) if vmlinuz.is_file() => Ok(Self {
                vmlinuz,
                modules: order
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(|m| dir.join("modules").join(format!("{m}.ko")))
                    .collect(),
            }),
            _ => Err(Error::NoKernel { dir }),
        }
    }
}

/// One command to run inside L1, chrooted into this machine's filesystem.
#[derive(Debug, Clone)]
pub struct Job {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Added to a minimal environment (PATH, HOME=/root, TMPDIR=/tmp, [`INSIDE_ENV`]).
    pub env: Vec<(String, String)>,
    /// Working directory inside L1 (the same path as here).
    pub cwd: PathBuf,
    /// The whole L1 run, boot included.
    pub timeout: Duration,
    /// Copy the command's output to this process's stdout while it runs.
    pub stream: bool,
}

impl Job {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            timeout: Duration::from_secs(600),
            stream: false,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }
}

/// What a job did inside L1.
#[derive(Debug)]
pub struct Outcome {
    /// The command's exit status (128 + signal when killed, as a shell reports it).
    pub code: i32,
    /// Its stdout and stderr, interleaved.
    pub output: String,
    /// L1's serial console (its kernel log and init's messages).
    pub console: String,
    pub elapsed: Duration,
}

impl Outcome {
    /// The ends of the output and the console, for failure messages. Every line is
    /// marked `L1| `, so that libtest's lines from inside L1 are not read as this run's
    /// (scripts/test-summary.sh counts `test result:` lines).
    pub fn tails(&self) -> String {
        let mark = |text: &str| {
            tail(text)
                .lines()
                .map(|line| format!("L1| {line}\n"))
                .collect::<String>()
        };
        // L1's console first: it is short, and it is what an excerpt of a long failure
        // (CI shows the start) must not lose.
        format!(
            "--- L1 console (end) ---\n{}--- command output (end) ---\n{}",
            mark(&self.console),
            mark(&self.output)
        )
    }
}

/// L1's /init: a busybox script. Paths and the scratch folder come from the kernel
/// command line (`nested.scratch=`); the job is `$scratch/job.sh`.
const L1_INIT: &str = r#"
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "nested-l1: $*" >/dev/ttyS0; }
scratch=$(sed -n 's/.*nested\.scratch=\([^ ]*\).*/\1/p' /proc/cmdline)
for m in $(cat /modules/order); do
  insmod /modules/$m.ko 2>/dev/null || say "insmod $m failed"
done
[ -c /dev/kvm ] || say "no /dev/kvm after loading kvm-amd"
# Huge pages for memfd guest memory where the VMM asks for them (vmm/src/memory.rs),
# as on a host set up for microagent (`microagent doctor`); Debian's default is never.
echo advise >/sys/kernel/mm/transparent_hugepage/shmem_enabled || say "no shmem huge pages"
ip link set lo up
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=MSIZE host /host || say "cannot mount the host share"
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mkdir -p /dev/pts
mount -o bind /dev /host/dev
mount -t devpts devpts /host/dev/pts
for d in tmp run root var/tmp; do mount -t tmpfs -o mode=1777 tmpfs /host/$d; done
mkdir -p /host$scratch
mount -t 9p -o trans=virtio,version=9p2000.L,msize=MSIZE scratch /host$scratch || say "cannot mount the scratch share"
(while :; do echo . >/dev/ttyS1; sleep 2; done) &
say "running the job"
chroot /host /bin/sh $scratch/job.sh >/host$scratch/output 2>&1
echo $? >/host$scratch/status
sync
umount /host$scratch
say "job done"
reboot -f
"#;

/// Runs `job` inside a fresh L1 machine and returns what it did. One L1 at a time on
/// this machine: a second caller waits (two TCG machines on two cores only slow both).
/// If L1 is lost ([`Error::lost_l1`]: it froze, see [`FROZEN`], or its kernel panicked)
/// the job runs again in a fresh L1, at most [`FREEZE_RETRIES`] times, and `name` is
/// recorded as retried ([`report::retried`]) each time; one more loss is an error.
pub fn run(job: &Job, name: &str) -> Result<Outcome, Error> {
    let kernel = L1Kernel::locate()?;
    let _turn = LockFile::acquire(&env::temp_dir().join("microagent-nested.lock"))?;
    let mut outcome = run_once(job, &kernel);
    for _ in 0..FREEZE_RETRIES {
        match &outcome {
            Err(lost) if lost.lost_l1() => report::retried(name, &lost.to_string()),
            _ => break,
        }
        outcome = run_once(job, &kernel);
    }
    outcome
}

impl Error {
    /// L1 itself was lost, not the job: it froze, or its kernel panicked (seen
    /// 2026-11-29: a vCPU thread of L1's KVM overflowed its kernel stack in recursive
    /// page faults, "corrupted stack end detected inside scheduler"; docs/testing.md).
    pub fn lost_l1(&self) -> bool {
        match self {
            Self::Frozen { .. } => true,
            Self::NoStatus { console, .. } => console.contains("Kernel panic - not syncing"),
            _ => false,
        }
    }
}

fn run_once(job: &Job, kernel: &L1Kernel) -> Result<Outcome, Error> {
    let scratch = tempfile::Builder::new()
        .prefix("nested-")
        .tempdir()
        .map_err(io_error("scratch folder"))?;
    let dir = scratch.path();
    fs::write(dir.join("job.sh"), job_script(job)).map_err(io_error("job.sh"))?;

    let initrd = dir.join("l1-initrd.cpio");
    let mut image = initramfs::busybox_init(&L1_INIT.replace("MSIZE", &MSIZE.to_string()))?;
    image.dir("proc").dir("sys").dir("dev").dir("modules");
    let mut order = String::new();
    for module in &kernel.modules {
        let name = module.file_name().unwrap_or_default().to_string_lossy();
        let bytes = fs::read(module).map_err(io_error(module.display().to_string()))?;
        image.file(&format!("modules/{name}"), &bytes, 0o644);
        order.push_str(name.trim_end_matches(".ko"));
        order.push('\n');
    }
    image.file("modules/order", order.as_bytes(), 0o644);
    image.write(&initrd)?;

    let console = dir.join("l1-console.log");
    let output = dir.join("output");
    let heartbeat = dir.join("heartbeat");
    let started = Instant::now();
    let mut qemu = ChildGuard::spawn(&mut l1_command(kernel, &initrd, &console, dir))?;
    let mut streamed = 0;
    let mut beats = Heartbeat::new(Instant::now());
    let status = loop {
        if job.stream {
            streamed = stream_new(&output, streamed);
        }
        if let Some(status) = qemu.try_status()? {
            break status;
        }
        let beat = fs::metadata(&heartbeat).map_or(0, |m| m.len());
        if beats.frozen(beat, Instant::now()) {
            drop(qemu);
            // The tail shows the lockup reports; the backtraces before them are kept.
            let kept = std::env::temp_dir().join(format!(
                "microagent-l1-frozen-{}.log",
                dir.file_name().unwrap_or_default().to_string_lossy()
            ));
            fs::copy(&console, &kept).map_err(io_error(kept.display().to_string()))?;
            return Err(Error::Frozen {
                console: tail(&read_lossy(&console)),
                kept,
            });
        }
        if started.elapsed() >= job.timeout {
            // The guard kills QEMU, and with it everything inside L1.
            drop(qemu);
            return Err(process::Error::Timeout {
                what: format!(
                    "the nested job {} (L1 console:\n{}\ncommand output:\n{})",
                    job.program.display(),
                    tail(&read_lossy(&console)),
                    tail(&read_lossy(&output))
                ),
                timeout: job.timeout,
            }
            .into());
        }
        sleep(Duration::from_millis(100));
    };
    if job.stream {
        stream_new(&output, streamed);
    }
    let console = read_lossy(&console);
    let code = fs::read_to_string(dir.join("status"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| Error::NoStatus {
            status,
            console: tail(&console),
        })?;
    Ok(Outcome {
        code,
        output: read_lossy(&output),
        console,
        elapsed: started.elapsed(),
    })
}

/// Watches the heartbeat file's length: frozen once it has started and then not grown
/// for [`FROZEN`].
struct Heartbeat {
    len: u64,
    since: Instant,
}

impl Heartbeat {
    fn new(now: Instant) -> Self {
        Self { len: 0, since: now }
    }

    fn frozen(&mut self, len: u64, now: Instant) -> bool {
        if len != self.len {
            (self.len, self.since) = (len, now);
            return false;
        }
        len > 0 && now.duration_since(self.since) >= FROZEN
    }
}

fn l1_command(kernel: &L1Kernel, initrd: &Path, console: &Path, scratch: &Path) -> Command {
    let mut cmd = Command::new(crate::qemu::QEMU);
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2"])
        .args(["-m", &format!("{L1_MEMORY_MIB}M")])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args(["-nic", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", scratch.join("heartbeat").display()))
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=scratch,security_model=none,multidevs=remap",
            scratch.display()
        ))
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet loglevel=5 softlockup_all_cpu_backtrace=1 \
             watchdog_thresh={WATCHDOG_THRESH} nested.scratch={}",
            scratch.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// The shell script L1 runs in the chroot: the environment, the directory, the command.
fn job_script(job: &Job) -> String {
    let mut script = String::from("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp\n");
    script.push_str(&format!("export {INSIDE_ENV}=1\n"));
    for (key, value) in &job.env {
        script.push_str(&format!("export {key}={}\n", quote(value)));
    }
    let cwd = quote(&job.cwd.to_string_lossy());
    script.push_str(&format!(
        "cd {cwd} || {{ echo \"nested rig: L1 cannot see {cwd}: L1 has its own empty \
         /tmp, /run, /root and /var/tmp, so the repository must be elsewhere\" >&2; \
         exit 125; }}\n"
    ));
    script.push_str("exec");
    for word in
        std::iter::once(job.program.as_os_str()).chain(job.args.iter().map(|a| a.as_os_str()))
    {
        script.push(' ');
        script.push_str(&quote(&word.to_string_lossy()));
    }
    script.push('\n');
    script
}

/// Which of [`L2_BOOT_FAILURES`] a failed job's output shows, if any.
fn boot_failure(output: &str) -> Option<&'static str> {
    L2_BOOT_FAILURES
        .iter()
        .copied()
        .find(|signature| output.contains(signature))
}

/// Single-quoted for sh.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Prints what `path` gained since `from` bytes; returns the new length.
fn stream_new(path: &Path, from: usize) -> usize {
    use std::io::Write;
    let Ok(bytes) = fs::read(path) else {
        return from;
    };
    if bytes.len() > from {
        let mut out = io::stdout().lock();
        let _ = out.write_all(&bytes[from..]);
        let _ = out.flush();
    }
    bytes.len().max(from)
}

fn tail(text: &str) -> String {
    let mut start = text.len().saturating_sub(TAIL);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// An exclusive flock, held while the file stays open (until dropped).
struct LockFile(#[allow(dead_code)] File);

impl LockFile {
    fn acquire(path: &Path) -> Result<Self, Error> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_error(path.display().to_string()))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_error("lock for the nested rig")(
                io::Error::last_os_error(),
            ));
        }
        Ok(Self(file))
    }
}

/// Whether this host's KVM runs standard Linux guests (VMX/SVM, or inside L1).
pub fn kvm_runs_linux() -> bool {
    Path::new("/dev/kvm").exists() && microagent_vmm::host::linux_guest_limitation().is_none()
}

/// Runs a test that needs Linux guests under `microagent-vmm`: here, where this host's
/// KVM runs them; otherwise the same test (`name`, as libtest knows it) inside L1 of
/// the nested rig, failing with L1's output if it fails there. Where neither is
/// possible the test is recorded as not run (see [`report`]) with the reason.
pub fn on_linux_kvm(name: &str, body: impl FnOnce()) {
    if kvm_runs_linux() {
        body();
        return;
    }
    if env::var_os(INSIDE_ENV).is_some() {
        panic!("inside the nested rig's L1 but its KVM cannot run Linux guests");
    }
    if let Err(why) = L1Kernel::locate() {
        report::not_run(name, &format!("needs VMX/SVM or the nested rig: {why}"));
        return;
    }
    let exe = env::current_exe().expect("the test binary's path");
    let mut job = Job::new(exe)
        .arg("--exact")
        .arg(name)
        .arg("--nocapture")
        .arg("--test-threads=1");
    for key in ["RUST_BACKTRACE", "RUST_LOG"] {
        if let Ok(value) = env::var(key) {
            job.env.push((key.into(), value));
        }
    }
    let passed = |o: &Outcome| o.code == 0 && o.output.contains("test result: ok. 1 passed");
    let mut outcome = run(&job, name).unwrap_or_else(|e| panic!("nested rig: {e}"));
    for attempt in 1..=L2_RETRIES {
        let failure = Some(&outcome)
            .filter(|o| !passed(o))
            .and_then(|o| boot_failure(&o.output));
        let Some(signature) = failure else {
            break;
        };
        let tails = outcome.tails();
        eprintln!("{tails}");
        let kept = report::keep_lost_output(&format!("{name}.{attempt}"), &tails)
            .map(|path| format!("; its output: {}", path.display()))
            .unwrap_or_default();
        report::retried(
            name,
            &format!(
                "a Linux guest's boot failed ({signature}); seen only in this rig, about \
                 once in 20-50 boots, cause not known (docs/testing.md){kept}"
            ),
        );
        outcome = run(&job, name).unwrap_or_else(|e| panic!("nested rig: {e}"));
    }
    eprintln!(
        "{name}: ran inside the nested rig's L1 in {:.1} s",
        outcome.elapsed.as_secs_f64()
    );
    // libtest exits 0 when the filter matched nothing: insist that this test ran.
    assert!(
        passed(&outcome),
        "{name} failed inside the nested rig (exit {}):\n{}",
        outcome.code,
        outcome.tails()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_is_frozen_only_after_its_heartbeat_started_and_then_stopped() {
        let t0 = Instant::now();
        let mut beats = Heartbeat::new(t0);
        // Booting: no heartbeat yet, however long that takes.
        assert!(!beats.frozen(0, t0 + FROZEN * 2));
        assert!(!beats.frozen(2, t0 + FROZEN * 2));
        // Beating, with gaps shorter than FROZEN.
        assert!(!beats.frozen(2, t0 + FROZEN * 2 + FROZEN / 2));
        assert!(!beats.frozen(4, t0 + FROZEN * 3));
        // Stopped.
        assert!(!beats.frozen(4, t0 + FROZEN * 4 - Duration::from_secs(1)));
        assert!(beats.frozen(4, t0 + FROZEN * 4));
    }

    #[test]
    fn only_a_frozen_or_panicked_l1_is_lost() {
        use std::os::unix::process::ExitStatusExt;
        let frozen = Error::Frozen {
            console: String::new(),
            kept: PathBuf::from("/tmp/x"),
        };
        let ended = |console: &str| Error::NoStatus {
            status: ExitStatus::from_raw(0),
            console: console.to_owned(),
        };
        assert!(frozen.lost_l1());
        assert!(ended(
            "[  595.713033] Kernel panic - not syncing: corrupted stack end detected inside scheduler"
        )
        .lost_l1());
        // L1 that ended for another reason (the job's own reboot, QEMU killed) is not.
        assert!(!ended("nested-l1: job done").lost_l1());
        assert!(!Error::NoKernel {
            dir: PathBuf::from("/nowhere")
        }
        .lost_l1());
    }

    #[test]
    fn only_the_known_l2_boot_failures_are_run_again() {
        let triple = "L1| [..] INFO microagent_vmm] VM ended: GuestReset { how: \"triple fault or shutdown\" }";
        assert_eq!(boot_failure(triple), Some(L2_BOOT_FAILURES[0]));
        let silent =
            "L1| microagent: the agent did not answer within 60s (workspace.agent_timeout)";
        assert_eq!(boot_failure(silent), Some(L2_BOOT_FAILURES[1]));
        // A guest that reset itself on purpose, or any other failure, is not retried.
        assert_eq!(
            boot_failure("VM ended: GuestReset { how: \"i8042 reset\" }"),
            None
        );
        assert_eq!(boot_failure("assertion `left == right` failed"), None);
    }

    #[test]
    fn job_scripts_quote_every_word() {
        let mut job = Job::new("/bin/echo").arg("it's").arg("a b");
        job.cwd = PathBuf::from("/work/x y");
        job.env.push(("K".into(), "v'1".into()));
        let script = job_script(&job);
        assert!(script.contains("export K='v'\\''1'\n"), "{script}");
        assert!(script.contains("cd '/work/x y' || {"), "{script}");
        assert!(script.contains("exit 125; }\n"), "{script}");
        assert!(
            script.ends_with("exec '/bin/echo' 'it'\\''s' 'a b'\n"),
            "{script}"
        );
        assert!(script.contains(&format!("export {INSIDE_ENV}=1\n")));
    }
}
