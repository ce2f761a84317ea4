//! `make demo` until the `microagent` lifecycle commands exist: the project's guest
//! kernel boots under QEMU (software emulation) with its root disk served by
//! microagent-vhost-blk; the guest writes a file to ext4 and the host reads it back.

use microagent_integration::daemon::Daemon;
use microagent_integration::ext4::debugfs;
use microagent_integration::qemu::run_busybox_guest;
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

const SCRIPT: &str = r#"
mount -t ext4 /dev/vda /mnt || echo "DEMO: mount failed"
echo "DEMO: guest sees $(cat /mnt/etc/motd)"
echo checkpoint-1 > /mnt/root/progress.txt
echo "DEMO: guest wrote /root/progress.txt: $(cat /mnt/root/progress.txt)"
sync
umount /mnt
echo DEMO-DONE
reboot -f
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("rootfs");
    fs::create_dir_all(root.join("etc"))?;
    fs::create_dir_all(root.join("root"))?;
    fs::write(
        root.join("etc/motd"),
        "a disk the host made with mke2fs -d\n",
    )?;
    let disk = dir.path().join("root.img");
    let made = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&root)
        .arg(&disk)
        .arg("64M")
        .status()?;
    if !made.success() {
        return Err("mke2fs failed".into());
    }
    println!("== root disk: {} (ext4, 64 MiB, sparse)", disk.display());

    let socket = dir.path().join("blk.sock");
    let mut daemon = Daemon::start(
        "microagent-vhost-blk",
        &socket,
        ["--disk", disk.to_str().ok_or("path")?],
    )?;
    println!("== microagent-vhost-blk serving it on {}", socket.display());
    println!("== booting the project kernel under QEMU TCG (vhost-user frontend: QEMU)");
    let started = Instant::now();
    let console = run_busybox_guest(
        dir.path(),
        SCRIPT,
        |config| config.blk.push(socket.clone()),
        "DEMO-DONE",
        Duration::from_secs(180),
    )?;
    for line in console.lines().filter(|l| l.starts_with("DEMO:")) {
        println!("   {}", line.trim_end());
    }
    println!(
        "== guest powered off after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let status = daemon.wait_exit(Duration::from_secs(10))?;
    println!("== microagent-vhost-blk exited with {status} when QEMU disconnected");

    println!(
        "== host reads /root/progress.txt with debugfs: {}",
        debugfs(&disk, "cat /root/progress.txt").trim()
    );
    Ok(())
}
