//! What PID 1 does before serving: API filesystems, the root disk, the hostname; and
//! how it ends the VM.

use crate::console;
use std::ffi::CString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROOT_MOUNT: &str = "/mnt/root";
const DEFAULT_ROOT_DEVICE: &str = "/dev/vda";
const ROOT_DEVICE_WAIT: Duration = Duration::from_secs(5);

/// Where commands run: the root disk's mount point, or `/` when not PID 1.
#[derive(Debug, Clone)]
pub struct Root(PathBuf);

impl Root {
    pub fn host() -> Self {
        Self("/".into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

fn mount(source: &str, target: &str, fstype: &str, data: Option<&str>) -> io::Result<()> {
    fs::create_dir_all(target)?;
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::other("NUL in a mount argument"));
    let (source, target_c, fstype) = (c(source)?, c(target)?, c(fstype)?);
    let data = data.map(c).transpose()?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("mount {target}: {e}")));
    }
    Ok(())
}

fn bind(source: &str, target: &str) -> io::Result<()> {
    fs::create_dir_all(target)?;
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::other("NUL in a mount argument"));
    let (source_c, target_c) = (c(source)?, c(target)?);
    // SAFETY: a bind mount between two NUL-terminated paths that outlive the call.
    let ret = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("bind {source} on {target}: {e}"),
        ));
    }
    Ok(())
}

/// The API filesystems every root needs, relative to `prefix`.
fn mount_api_filesystems(prefix: &str) -> io::Result<()> {
    mount("proc", &format!("{prefix}/proc"), "proc", None)?;
    mount("sysfs", &format!("{prefix}/sys"), "sysfs", None)?;
    mount("devtmpfs", &format!("{prefix}/dev"), "devtmpfs", None)?;
    mount(
        "tmpfs",
        &format!("{prefix}/run"),
        "tmpfs",
        Some("mode=0755"),
    )?;
    mount(
        "tmpfs",
        &format!("{prefix}/tmp"),
        "tmpfs",
        Some("mode=1777"),
    )?;
    Ok(())
}

/// `key=value` from the kernel command line.
fn cmdline_param(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
}

pub fn setup() -> Result<Root, String> {
    mount_api_filesystems("").map_err(|e| e.to_string())?;
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(name) = cmdline_param(&cmdline, "microagent.hostname") {
        // SAFETY: sethostname with a pointer/length pair into a live String.
        if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } < 0 {
            console(&format!(
                "sethostname {name}: {}",
                io::Error::last_os_error()
            ));
        }
    }
    let device = cmdline_param(&cmdline, "microagent.root")
        .unwrap_or_else(|| DEFAULT_ROOT_DEVICE.to_owned());
    let deadline = Instant::now() + ROOT_DEVICE_WAIT;
    while !Path::new(&device).exists() {
        if Instant::now() >= deadline {
            return Err(format!(
                "root disk {device} did not appear within {ROOT_DEVICE_WAIT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    mount(&device, ROOT_MOUNT, "ext4", None)
        .map_err(|e| format!("cannot mount root disk {device} as ext4: {e}"))?;
    mount_api_filesystems(ROOT_MOUNT).map_err(|e| e.to_string())?;
    // Terminals: one devpts instance, seen at /dev/pts by the agent and the workspace.
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        Some("ptmxmode=0666,mode=0620"),
    )
    .map_err(|e| e.to_string())?;
    bind("/dev/pts", &format!("{ROOT_MOUNT}/dev/pts")).map_err(|e| e.to_string())?;
    // POSIX shared memory and named semaphores (shm_open, sem_open: Python's
    // multiprocessing, PostgreSQL's dynamic shared memory) live on a tmpfs at /dev/shm.
    mount(
        "tmpfs",
        &format!("{ROOT_MOUNT}/dev/shm"),
        "tmpfs",
        Some("mode=1777"),
    )
    .map_err(|e| e.to_string())?;
    console(&format!("root disk {device} mounted"));
    let root = Root(ROOT_MOUNT.into());
    match crate::net::from_cmdline(&cmdline) {
        Some(Ok(config)) => match crate::net::configure(&root, &config) {
            Ok(iface) => console(&format!("{iface}: {}/{}", config.addr, config.prefix)),
            Err(e) => console(&format!("network not configured: {e}")),
        },
        Some(Err(e)) => console(&format!("network not configured: {e}")),
        None => {}
    }
    Ok(root)
}

/// Time since the kernel's clock started (CLOCK_BOOTTIME, the base of the console's
/// printk timestamps): from early kernel start-up to now.
pub fn since_kernel_start() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid, exclusively borrowed timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } < 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Ends the VM: a reset, which microagent-vmm (i8042, `reboot=k`) and QEMU with
/// `-no-reboot` both turn into an exit.
pub fn power_off() -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) as PID 1; it does not return on success.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Syncs and unmounts the root disk (lazily, so busy mounts do not block), then ends.
pub fn shutdown(root: &Root) -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if root.path() != Path::new("/") {
        for sub in ["tmp", "run", "dev/pts", "dev", "sys", "proc", ""] {
            let target = root.path().join(sub);
            if let Ok(c) = CString::new(target.as_os_str().as_encoded_bytes()) {
                // SAFETY: umount2 with a NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
    power_off()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_parameters_are_found_by_exact_key() {
        let cmdline =
            "console=ttyS0 microagent.hostname=ws-1 microagent.rootx=no microagent.root=/dev/vdb";
        assert_eq!(
            cmdline_param(cmdline, "microagent.hostname").as_deref(),
            Some("ws-1")
        );
        assert_eq!(
            cmdline_param(cmdline, "microagent.root").as_deref(),
            Some("/dev/vdb")
        );
        assert_eq!(cmdline_param(cmdline, "missing"), None);
    }
}
