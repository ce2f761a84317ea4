//! The QEMU Linux rig proven on its own, before any microagent daemon is involved: the
//! project's kernel under QEMU reads and writes a disk exported by
//! `qemu-storage-daemon` as vhost-user-blk.

use microagent_integration::qemu::run_busybox_guest;
use microagent_integration::storage_daemon::StorageDaemon;
use std::fs;
use std::path::Path;
use std::time::Duration;

const HOST_PATTERN: &[u8] = b"microagent-host-pattern-0042";
const GUEST_PATTERN: &str = "written-by-the-guest-0017";
const GUEST_OFFSET: usize = 8 * 512;
const BOOT: Duration = Duration::from_secs(120);

/// Reads the host's pattern from sector 0, writes its own at sector 8, and powers off.
const GUEST_SCRIPT: &str = r#"
echo "RIG-READ:$(head -c 28 /dev/vda)"
if printf 'written-by-the-guest-0017' | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null
then echo RIG-WRITE-OK
else echo RIG-WRITE-FAILED
fi
echo RIG-DONE
reboot -f
"#;

fn make_disk(path: &Path) {
    let mut disk = vec![0u8; 1 << 20];
    disk[..HOST_PATTERN.len()].copy_from_slice(HOST_PATTERN);
    fs::write(path, disk).unwrap();
}

/// Boots the busybox guest against a `qemu-storage-daemon` export of a fresh disk and
/// returns the console and the disk's contents after the guest powered off.
fn run_guest(writable: bool) -> (String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk);
    let export = StorageDaemon::start(&disk, &dir.path().join("blk.sock"), writable).unwrap();
    let console = run_busybox_guest(
        dir.path(),
        GUEST_SCRIPT,
        |config| config.blk.push(export.socket().to_owned()),
        "RIG-DONE",
        BOOT,
    )
    .unwrap();
    drop(export);
    (console, fs::read(&disk).unwrap())
}

#[test]
fn guest_reads_and_writes_a_disk_served_by_qemu_storage_daemon() {
    let (console, disk) = run_guest(true);
    let expected = format!("RIG-READ:{}", String::from_utf8_lossy(HOST_PATTERN));
    assert!(
        console.contains(&expected),
        "guest did not read the host pattern:\n{console}"
    );
    assert!(console.contains("RIG-WRITE-OK"), "{console}");
    assert_eq!(
        &disk[GUEST_OFFSET..GUEST_OFFSET + GUEST_PATTERN.len()],
        GUEST_PATTERN.as_bytes(),
        "the guest's write did not reach the host file"
    );
}

#[test]
fn guest_write_to_a_read_only_export_never_reaches_the_file() {
    let (console, disk) = run_guest(false);
    assert!(console.contains("RIG-WRITE-FAILED"), "{console}");
    assert!(
        disk[GUEST_OFFSET..GUEST_OFFSET + 512]
            .iter()
            .all(|&b| b == 0),
        "a read-only export changed the file"
    );
}
