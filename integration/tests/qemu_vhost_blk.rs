//! `microagent-vhost-blk` under a real Linux guest, with QEMU as the vhost-user frontend:
//! ext4 written by the guest and read back on the host with debugfs, a second boot from
//! the same disk, GET_ID through sysfs, and fstrim punching holes in the host file.

use microagent_integration::daemon::Daemon;
use microagent_integration::ext4::debugfs;
use microagent_integration::qemu::run_busybox_guest;
use sha2::{Digest, Sha256};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(180);
/// The ring QEMU 7.2's vhost-user-blk sets up (1024 entries), all of it usable by the
/// driver's block queue since descriptors may be indirect.
const QUEUE_DEPTH: &str = "1024";

fn mke2fs(dir: &Path, disk: &Path) {
    let root = dir.join("rootfs");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("hello.txt"), "hello from the host\n").unwrap();
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&root)
        .arg(disk)
        .arg("64M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn debugfs_dump(disk: &Path, file: &str, out: &Path) -> Vec<u8> {
    debugfs(disk, &format!("dump {file} {}", out.display()));
    fs::read(out).unwrap_or_default()
}

/// Boots once against a fresh daemon on `disk` and returns the console.
fn boot(dir: &Path, disk: &Path, script: &str, marker: &str) -> String {
    let socket = dir.join("blk.sock");
    let _ = fs::remove_file(&socket);
    let mut daemon = Daemon::start(
        "microagent-vhost-blk",
        &socket,
        ["--disk", disk.to_str().unwrap(), "--serial", "ws-root-0001"],
    )
    .unwrap();
    let console = run_busybox_guest(
        dir,
        script,
        |config| config.blk.push(socket.clone()),
        marker,
        BOOT,
    )
    .unwrap();
    let status = daemon.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(
        status.success(),
        "daemon ended with {status} after QEMU exited"
    );
    console
}

fn line_after<'a>(console: &'a str, prefix: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} line on the console:\n{console}"))
}

const FIRST_BOOT: &str = r#"
echo "SERIAL:$(cat /sys/block/vda/serial)"
echo "FEATURES:$(cat /sys/block/vda/device/features)"
echo "DEPTH:$(cat /sys/block/vda/mq/0/nr_tags)"
mount -t ext4 /dev/vda /mnt || echo MOUNT-FAILED
echo "HELLO:$(cat /mnt/hello.txt)"
dd if=/dev/urandom of=/mnt/data.bin bs=64k count=32 2>/dev/null
echo "SHA:$(sha256sum /mnt/data.bin | cut -d' ' -f1)"
sync
umount /mnt
echo BOOT-ONE-DONE
reboot -f
"#;

const SECOND_BOOT: &str = r#"
mount -t ext4 /dev/vda /mnt || echo MOUNT-FAILED
echo "SHA-AGAIN:$(sha256sum /mnt/data.bin | cut -d' ' -f1)"
dd if=/dev/zero of=/mnt/big.bin bs=1M count=16 2>/dev/null
sync
rm /mnt/big.bin
sync
echo "TRIM:$(fstrim -v /mnt)"
umount /mnt
echo BOOT-TWO-DONE
reboot -f
"#;

#[test]
fn linux_guest_writes_ext4_the_host_reads_it_and_fstrim_punches_holes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    mke2fs(dir.path(), &disk);

    let console = boot(dir.path(), &disk, FIRST_BOOT, "BOOT-ONE-DONE");
    assert!(!console.contains("MOUNT-FAILED"), "{console}");
    assert_eq!(line_after(&console, "SERIAL:"), "ws-root-0001");
    // The driver's negotiated features, one character per bit: EVENT_IDX (29) and
    // INDIRECT_DESC (28) are in use, so the block queue is as deep as the ring.
    let features = line_after(&console, "FEATURES:");
    assert_eq!(features.get(28..30), Some("11"), "features {features}");
    assert_eq!(line_after(&console, "DEPTH:"), QUEUE_DEPTH, "{console}");
    assert_eq!(line_after(&console, "HELLO:"), "hello from the host");
    let guest_sha = line_after(&console, "SHA:").to_owned();

    let data = debugfs_dump(&disk, "/data.bin", &dir.path().join("data.out"));
    assert_eq!(data.len(), 2 << 20, "debugfs found no 2 MiB /data.bin");
    let host_sha = format!("{:x}", Sha256::digest(&data));
    assert_eq!(host_sha, guest_sha, "host and guest disagree on /data.bin");
    let blocks_after_first = fs::metadata(&disk).unwrap().blocks();

    let console = boot(dir.path(), &disk, SECOND_BOOT, "BOOT-TWO-DONE");
    assert!(!console.contains("MOUNT-FAILED"), "{console}");
    assert_eq!(line_after(&console, "SHA-AGAIN:"), guest_sha);
    assert!(
        line_after(&console, "TRIM:").contains("trimmed"),
        "fstrim failed:\n{console}"
    );
    // 16 MiB were written and deleted: without discard they would still be allocated.
    let blocks_after_second = fs::metadata(&disk).unwrap().blocks();
    assert!(
        blocks_after_second < blocks_after_first + (8 << 20) / 512,
        "fstrim punched no holes: {blocks_after_first} -> {blocks_after_second} blocks"
    );
}
