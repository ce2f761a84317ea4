//! A FUSE mount whose server can be stopped: reads the host kernel has not cached then
//! wait for it, as on a hung network filesystem. The server is bindfs (a Debian package,
//! installed by scripts/install-deps.sh), mirroring a directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `src` mirrored at `mnt` by a bindfs process; resumed, unmounted and ended when dropped.
pub struct StoppableMount {
    server: Child,
    mnt: PathBuf,
}

impl StoppableMount {
    /// Whether bindfs and /dev/fuse are here; if not, records test `name` as not run.
    pub fn available(name: &str) -> bool {
        let bindfs = Command::new("bindfs")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !bindfs || !Path::new("/dev/fuse").exists() {
            crate::report::not_run(
                name,
                "needs bindfs and /dev/fuse (scripts/install-deps.sh installs bindfs)",
            );
            return false;
        }
        true
    }

    /// Mounts `src` at `mnt` (an empty directory) and waits until the mount is there.
    pub fn new(src: &Path, mnt: &Path) -> Self {
        let server = Command::new("bindfs")
            .arg("-f")
            .arg(src)
            .arg(mnt)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting bindfs");
        let mount = Self {
            server,
            mnt: mnt.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mounted = || {
            fs::read_to_string("/proc/self/mounts")
                .unwrap_or_default()
                .lines()
                .any(|l| l.split(' ').nth(1) == mnt.to_str() && l.contains("fuse"))
        };
        while !mounted() {
            assert!(Instant::now() < deadline, "bindfs never mounted {mnt:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        mount
    }

    /// Stops the server: requests to the mount wait from now on.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets the server answer again.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        // Best effort, as before: Drop resumes a server that may have exited.
        let _ = crate::process::signal(self.server.id(), signal);
    }
}

impl Drop for StoppableMount {
    fn drop(&mut self) {
        self.resume();
        // As root `umount` does it; a user's bindfs mounted through fusermount.
        let unmounted = ["umount -l", "fusermount3 -u -z", "fusermount -u -z"]
            .iter()
            .any(|command| {
                let mut words = command.split(' ');
                Command::new(words.next().unwrap_or_default())
                    .args(words)
                    .arg(&self.mnt)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
        if !unmounted {
            eprintln!("warning: {} is still mounted", self.mnt.display());
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
