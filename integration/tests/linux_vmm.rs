//! Real Linux under `microagent-vmm` on a KVM that runs Linux guests: here where this
//! host has VMX/SVM, otherwise inside the nested rig's L1 (QEMU's emulated AMD SVM; see
//! `microagent_integration::nested`). The project kernel boots to a busybox /init with 1
//! and 2 vCPUs, and drives our blk and vsock daemons with interrupts.

use microagent_integration::daemon::Daemon;
use microagent_integration::ext4::debugfs;
use microagent_integration::initramfs::busybox_init;
use microagent_integration::kernel::guest_kernel;
use microagent_integration::nested::{on_linux_kvm, L1Kernel};
use microagent_integration::qemu::GUEST_PRELUDE;
use microagent_integration::vmm::{Vmm, VmmArgs};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(120);

/// VMM arguments for the project kernel with a busybox initramfs running `script`
/// (after [`GUEST_PRELUDE`]) and `files` added to it.
fn linux(dir: &Path, cpus: u8, script: &str, files: &[(&str, &[u8])]) -> VmmArgs {
    let initrd = dir.join(format!("initrd-{cpus}.cpio"));
    let mut image = busybox_init(&format!("{GUEST_PRELUDE}{script}")).unwrap();
    image.dir("proc").dir("sys").dir("dev").dir("mnt");
    for (path, contents) in files {
        image.file(path, contents, 0o755);
    }
    image.write(&initrd).unwrap();
    let mut args = VmmArgs::test_guest("console=ttyS0 reboot=k panic=1");
    args.kernel = guest_kernel().unwrap();
    args.memory_mib = 256;
    args.extra = vec![
        "--initrd".into(),
        initrd.into(),
        "--cpus".into(),
        cpus.to_string().into(),
    ];
    args
}

#[test]
fn linux_boots_fully_under_microagent_vmm() {
    on_linux_kvm("linux_boots_fully_under_microagent_vmm", || {
        for cpus in [1u8, 2] {
            let dir = tempfile::tempdir().unwrap();
            let script = "echo LINUX-USERSPACE-UP\necho CPUS-ONLINE=$(cat /sys/devices/system/cpu/online)\nreboot -f\n";
            let (output, console) = linux(dir.path(), cpus, script, &[])
                .run(dir.path(), BOOT)
                .unwrap();
            assert!(console.contains("LINUX-USERSPACE-UP"), "{console}");
            let online = if cpus == 1 { "0" } else { "0-1" };
            assert!(
                console.contains(&format!("CPUS-ONLINE={online}\n"))
                    || console.contains(&format!("CPUS-ONLINE={online}\r\n")),
                "{cpus} vCPUs: {console}"
            );
            // The i8042 model answers Linux's probe (it used to fail reading the CTR)
            // and the keyboard behind it identifies itself through IRQ 1.
            assert!(!console.contains("i8042: Can't read CTR"), "{console}");
            assert!(!console.contains("probe of i8042 failed"), "{console}");
            assert!(
                console.contains("serio: i8042 KBD port at 0x60,0x64 irq 1"),
                "{console}"
            );
            assert!(
                console.contains("input: AT Translated Set 2 keyboard"),
                "{console}"
            );
            // `reboot -f` with reboot=k resets through the i8042: a clean exit.
            assert!(output.status.success(), "{output:?}\n{console}");
        }
    });
}

/// A bzImage boots too: Debian's stock kernel (the nested rig's own L1 kernel, with its
/// EFI stub and compressed payload) goes through the 64-bit boot protocol to a busybox
/// /init, and `reboot -f` resets through the i8042.
#[test]
fn a_bzimage_kernel_boots_to_its_initramfs_under_microagent_vmm() {
    on_linux_kvm(
        "a_bzimage_kernel_boots_to_its_initramfs_under_microagent_vmm",
        || {
            let dir = tempfile::tempdir().unwrap();
            let script = "echo BZIMAGE-USERSPACE-UP kernel=$(uname -r)\nreboot -f\n";
            let mut args = linux(dir.path(), 1, script, &[]);
            args.kernel = L1Kernel::locate().unwrap().vmlinuz;
            let head = std::fs::read(&args.kernel).unwrap();
            assert_eq!(&head[0x202..0x206], b"HdrS", "not a bzImage");
            let (output, console) = args.run(dir.path(), BOOT).unwrap();
            assert!(
                console.contains("BZIMAGE-USERSPACE-UP kernel=6."),
                "{console}"
            );
            // The VM has no PCI bus: the VMM tells a bzImage so, and it skips the scans
            // for one (each config-space read an exit to the VMM; they took 35 s of this
            // boot in the nested rig).
            assert!(console.contains("pci=off"), "{console}");
            assert!(!console.contains("AGP: Checking aperture"), "{console}");
            assert!(output.status.success(), "{output:?}\n{console}");
        },
    );
}

/// Connects through the vsock daemon's hybrid socket, retrying while the guest's
/// listener is not up yet (the daemon closes a connection the guest refuses).
fn vsock_connect(uds: &Path, port: u32, timeout: Duration) -> UnixStream {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut stream) = UnixStream::connect(uds) {
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            writeln!(stream, "CONNECT {port}").unwrap();
            let mut line = Vec::new();
            let mut byte = [0u8];
            while stream.read(&mut byte).unwrap_or(0) == 1 {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
            if line.starts_with(b"OK ") {
                return stream;
            }
        }
        assert!(
            Instant::now() < deadline,
            "vsock port {port} never answered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

#[test]
fn linux_drives_blk_and_vsock_with_interrupts_under_microagent_vmm() {
    on_linux_kvm(
        "linux_drives_blk_and_vsock_with_interrupts_under_microagent_vmm",
        || {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            // An ext4 disk holding 1 MiB the host wrote.
            let tree = d.join("tree");
            fs::create_dir_all(&tree).unwrap();
            let from_host: Vec<u8> = (0..1u32 << 20)
                .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
                .collect();
            fs::write(tree.join("from-host.bin"), &from_host).unwrap();
            let disk = d.join("disk.img");
            let made = Command::new("mke2fs")
                .args(["-q", "-F", "-t", "ext4", "-d"])
                .arg(&tree)
                .arg(&disk)
                .arg("64M")
                .status()
                .unwrap();
            assert!(made.success());

            let blk_socket = d.join("blk.sock");
            let mut blk = Daemon::start(
                "microagent-vhost-blk",
                &blk_socket,
                ["--disk", disk.to_str().unwrap()],
            )
            .unwrap();
            let uds = d.join("vsock");
            let vsock_socket = d.join("vsock.sock");
            let _vsock = Daemon::start(
                "microagent-vhost-vsock",
                &vsock_socket,
                ["--guest-cid", "3", "--uds-path", uds.to_str().unwrap()],
            )
            .unwrap();

            let script = "mount -t ext4 /dev/vda /mnt || echo MOUNT-FAILED
echo FROM-HOST=$(sha256sum /mnt/from-host.bin)
dd if=/dev/urandom of=/mnt/from-guest.bin bs=64k count=16 2>/dev/null
echo FROM-GUEST=$(sha256sum /mnt/from-guest.bin)
sync
umount /mnt
vsock_echo listen 5000 1
grep virtio /proc/interrupts | sed 's/^/IRQ: /'
echo DEVICES-DONE
reboot -f
";
            let echo = fs::read(env!("MICROAGENT_VSOCK_ECHO")).unwrap();
            let mut args = linux(d, 2, script, &[("bin/vsock_echo", &echo)]);
            args.blk.push(blk_socket.clone());
            args.extra.push("--vsock".into());
            args.extra.push(vsock_socket.clone().into());
            let mut vmm = Vmm::start(&args, d).unwrap();

            // 1 MiB echoed by the guest over vsock.
            let mut stream = vsock_connect(&uds, 5000, BOOT);
            let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + 3) as u8).collect();
            let mut writer = stream.try_clone().unwrap();
            let sent = payload.clone();
            let sender = std::thread::spawn(move || {
                writer.write_all(&sent).unwrap();
                writer.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut echoed = Vec::new();
            stream.read_to_end(&mut echoed).unwrap();
            sender.join().unwrap();
            assert_eq!(sha256_hex(&echoed), sha256_hex(&payload), "vsock echo");

            let console = vmm.wait_for("DEVICES-DONE", BOOT).unwrap();
            assert!(vmm.wait_exit(Duration::from_secs(30)).unwrap().success());
            assert!(!console.contains("MOUNT-FAILED"), "{console}");
            assert!(
                console.contains(&format!("FROM-HOST={}", sha256_hex(&from_host))),
                "{console}"
            );
            // What the guest wrote is in the host's file, as the guest hashed it.
            let guest_hash = console
                .lines()
                .find_map(|l| l.strip_prefix("FROM-GUEST="))
                .and_then(|l| l.split_whitespace().next())
                .unwrap_or_else(|| panic!("{console}"))
                .to_owned();
            let dumped = d.join("from-guest.bin");
            debugfs(&disk, &format!("dump /from-guest.bin {}", dumped.display()));
            assert_eq!(sha256_hex(&fs::read(&dumped).unwrap()), guest_hash);
            // Both devices completed requests through interrupts (IO-APIC lines).
            let irqs: Vec<u64> = console
                .lines()
                .filter_map(|l| l.split("IRQ: ").nth(1))
                .map(|l| {
                    l.split_whitespace()
                        .skip(1)
                        .take(2)
                        .filter_map(|n| n.parse::<u64>().ok())
                        .sum()
                })
                .collect();
            assert_eq!(irqs.len(), 2, "two virtio interrupt lines: {console}");
            assert!(
                irqs.iter().all(|&n| n > 0),
                "interrupt counts {irqs:?}: {console}"
            );
            assert!(blk.wait_exit(Duration::from_secs(10)).unwrap().success());
        },
    );
}
