//! Snapshot and restore of a real Linux guest with the agent under `microagent-vmm`:
//! here where this host's KVM runs Linux guests, otherwise inside the nested rig's L1.
//! A process counts in guest memory while the VM is snapshotted; the snapshot is
//! restored into a new VMM with new daemons on a copy of the disk, and the count goes on
//! from where it was, the file system holds what was written, and a new exec works after
//! the vsock transport reset, and the serial console keeps working.

use microagent_agent_protocol::client::{Connection, Exit};
use microagent_integration::agent::{argv_request, busybox_root_disk, static_agent};
use microagent_integration::daemon::Daemon;
use microagent_integration::initramfs::Initramfs;
use microagent_integration::kernel::guest_kernel;
use microagent_integration::nested::on_linux_kvm;
use microagent_integration::vmm::{Vmm, VmmArgs};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(180);

/// Runs `script` with sh in the guest; returns stdout, failing on a non-zero exit.
fn sh(uds: &Path, script: &str) -> String {
    let conn = Connection::open(uds, BOOT).unwrap_or_else(|e| panic!("agent at {uds:?}: {e}"));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exit = conn
        .exec(
            argv_request(&["sh", "-c", script]),
            std::io::empty(),
            &mut out,
            &mut err,
        )
        .unwrap();
    assert_eq!(
        exit,
        Exit::Code(0),
        "{script}: {}",
        String::from_utf8_lossy(&err)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// The counter's numbers, one per line; asserts they run 1, 2, 3, ... without a gap.
fn counts(uds: &Path) -> Vec<u64> {
    let text = sh(uds, "cat /run/counts");
    let counts: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
    for (i, &n) in counts.iter().enumerate() {
        assert_eq!(n, i as u64 + 1, "the count jumped or restarted: {counts:?}");
    }
    counts
}

struct Daemons {
    _blk: Daemon,
    _vsock: Daemon,
    blk: std::path::PathBuf,
    vsock: std::path::PathBuf,
    uds: std::path::PathBuf,
}

fn daemons(dir: &Path, disk: &Path) -> Daemons {
    fs::create_dir_all(dir).unwrap();
    let (blk, vsock, uds) = (
        dir.join("blk.sock"),
        dir.join("vsock.sock"),
        dir.join("agent.vsock"),
    );
    Daemons {
        _blk: Daemon::start(
            "microagent-vhost-blk",
            &blk,
            ["--disk", disk.to_str().unwrap()],
        )
        .unwrap(),
        _vsock: Daemon::start(
            "microagent-vhost-vsock",
            &vsock,
            ["--guest-cid", "3", "--uds-path", uds.to_str().unwrap()],
        )
        .unwrap(),
        blk,
        vsock,
        uds,
    }
}

fn device_args(d: &Daemons) -> Vec<String> {
    vec![
        "--blk".into(),
        d.blk.display().to_string(),
        "--vsock".into(),
        d.vsock.display().to_string(),
    ]
}

#[test]
fn linux_with_the_agent_snapshots_and_restores_into_new_processes() {
    on_linux_kvm(
        "linux_with_the_agent_snapshots_and_restores_into_new_processes",
        || {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let disk = busybox_root_disk(d, 64).unwrap();
            let initrd = d.join("agent-initrd.cpio");
            let mut image = Initramfs::new();
            image.file("init", &fs::read(static_agent().unwrap()).unwrap(), 0o755);
            image.write(&initrd).unwrap();

            let src = daemons(&d.join("src"), &disk);
            let mut args =
                VmmArgs::test_guest("console=ttyS0 reboot=k panic=1 microagent.hostname=snap");
            args.kernel = guest_kernel().unwrap();
            args.memory_mib = 256;
            args.extra = ["--initrd", initrd.to_str().unwrap(), "--cpus", "2"]
                .iter()
                .map(Into::into)
                .chain(device_args(&src).into_iter().map(Into::into))
                .collect();
            let source = Vmm::start(&args, &d.join("src")).unwrap();

            sh(
                &src.uds,
                "echo written-before-snapshot > /root/marker && sync",
            );
            assert_eq!(sh(&src.uds, "nproc"), "2\n");
            // A counter in guest memory (tmpfs), detached from the exec that starts it.
            sh(
                &src.uds,
                "(i=0; while :; do i=$((i+1)); echo $i >> /run/counts; sleep 0.1; done) \
                 </dev/null >/dev/null 2>&1 &",
            );
            while counts(&src.uds).len() < 5 {
                std::thread::sleep(Duration::from_millis(200));
            }

            // Pause, snapshot (a paused VM stays paused), copy the disk while nothing
            // writes to it, resume.
            assert_eq!(source.api(r#"{"cmd":"pause"}"#).unwrap()["state"], "paused");
            let snap = d.join("snap");
            let request = serde_json::json!({"cmd": "snapshot", "dir": snap}).to_string();
            let reply = source.api_within(&request, BOOT).unwrap();
            assert_eq!(reply["ok"], true, "{reply}");
            assert_eq!(reply["state"], "paused", "{reply}");
            let disk_copy = d.join("restored-disk.img");
            let copied = Command::new("cp")
                .args(["--sparse=always"])
                .arg(&disk)
                .arg(&disk_copy)
                .status()
                .unwrap();
            assert!(copied.success());
            assert_eq!(
                source.api(r#"{"cmd":"resume"}"#).unwrap()["state"],
                "running"
            );
            let at_snapshot = counts(&src.uds).len();

            // Restore into a new VMM with new daemons on the copy.
            let dst = daemons(&d.join("dst"), &disk_copy);
            let extra: Vec<String> = device_args(&dst);
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let restored = Vmm::restore(&snap, &d.join("dst"), &extra).unwrap();
            let first = counts(&dst.uds);
            assert!(
                first.len() >= 5,
                "the restored guest lost the count ({} numbers)",
                first.len()
            );
            assert!(
                first.len() <= at_snapshot + 50,
                "the restored count {} is not the snapshot's (source had {at_snapshot} just after)",
                first.len()
            );
            // It keeps counting, on its own.
            std::thread::sleep(Duration::from_secs(2));
            let later = counts(&dst.uds);
            assert!(later.len() > first.len(), "the restored counter stopped");
            assert_eq!(
                sh(&dst.uds, "cat /root/marker"),
                "written-before-snapshot\n"
            );
            assert_eq!(sh(&dst.uds, "nproc"), "2\n");
            // Both VMs run independently: a file in one is not in the other.
            sh(&dst.uds, "echo only-restored > /root/only && sync");
            assert_eq!(
                sh(&src.uds, "cat /root/only 2>/dev/null || echo absent"),
                "absent\n"
            );
            // The console works after restore. (Linux's 8250 driver re-arms the UART's
            // interrupt enable when it starts sending, so this does not tell whether the
            // registers were restored; vmm's legacy unit test proves that.)
            sh(
                &dst.uds,
                "for i in $(seq 40); do echo console-line-$i; done > /dev/console",
            );
            restored
                .wait_for("console-line-40", Duration::from_secs(60))
                .unwrap();
            assert!(!restored.console().contains("Kernel panic"));
            drop(source);
        },
    );
}
