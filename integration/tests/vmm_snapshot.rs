//! Snapshot and restore of `microagent-vmm` on this machine's KVM with the freestanding
//! test guest's counter: the restored VM continues where the snapshot was taken, in new
//! processes, and every refusal has its stable code with nothing started or left behind.

use microagent_integration::cli::SmallFs;
use microagent_integration::daemon::Daemon;
use microagent_integration::vmm::{restore_refused, Vmm, VmmArgs};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

const RUN: Duration = Duration::from_secs(60);

/// The numbers of every complete `tick N` line, in order.
fn ticks(console: &str) -> Vec<u64> {
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("tick "))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

/// The AP counters of every complete `tick N ap0=.. ap1=..` line, in order.
fn ap_counters(console: &str) -> Vec<Vec<u64>> {
    console
        .split_inclusive('\n')
        .filter(|l| l.starts_with("tick ") && l.ends_with('\n'))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.split_once('=')?.1.parse().ok())
                .collect()
        })
        .collect()
}

/// Asserts that `ticks` counts up by one from 0 without gap or repeat.
fn assert_consecutive(ticks: &[u64], what: &str) {
    for (i, &t) in ticks.iter().enumerate() {
        assert_eq!(t, i as u64, "{what}: tick {i} is {t}: {ticks:?}");
    }
}

fn snapshot(vmm: &Vmm, dir: &Path) -> serde_json::Value {
    let request = microagent_vmm::api::Request::Snapshot {
        dir: dir.to_owned(),
    };
    vmm.api(request.to_line().trim_end()).unwrap()
}

/// Boots the counter guest, lets it count, pauses it and snapshots it into
/// `dir/snap`; returns the VMM (paused) and its console at the snapshot.
fn paused_counter_snapshot(dir: &Path, extra: &[&str]) -> (Vmm, String, PathBuf) {
    let mut args = VmmArgs::test_guest("scenario=counter");
    args.extra = extra.iter().map(Into::into).collect();
    let vmm = Vmm::start(&args, &dir.join("src-run")).unwrap_or_else(|e| panic!("{e}"));
    vmm.wait_for("tick 5\n", RUN).unwrap();
    assert_eq!(vmm.api(r#"{"cmd":"pause"}"#).unwrap()["state"], "paused");
    let console = vmm.console();
    let snap = dir.join("snap");
    let reply = snapshot(&vmm, &snap);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(
        reply["state"], "paused",
        "a paused VM stays paused: {reply}"
    );
    (vmm, console, snap)
}

fn run_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn new_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("src-run")).unwrap();
    dir
}

/// Waits until the restored console has at least `n` complete ticks after the
/// source's console, and checks the whole is one unbroken count.
fn assert_continues(source_console: &str, restored: &Vmm, n: usize, what: &str) -> Vec<u64> {
    let before = ticks(source_console).len();
    for _ in 0..3000 {
        let all = ticks(&format!("{source_console}{}", restored.console()));
        if all.len() >= before + n {
            assert_consecutive(&all, what);
            return all;
        }
        sleep(Duration::from_millis(10));
    }
    panic!(
        "{what}: the restored guest did not count; console:\n{}",
        restored.console()
    );
}

#[test]
fn a_restored_counter_continues_at_the_snapshot_count_plus_one() {
    let dir = new_dir();
    let (source, console, snap) = paused_counter_snapshot(dir.path(), &[]);
    let at_snapshot = *ticks(&console).last().unwrap();

    let manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(snap.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["format"]["major"], 1);
    assert_eq!(manifest["vcpus"], 1);
    assert_eq!(manifest["memory_mib"], 64);
    assert!(manifest["cmdline"]
        .as_str()
        .unwrap()
        .contains("scenario=counter"));
    // Only populated pages: a 64 MiB guest that touched a few pages writes little.
    let populated = manifest["memory_populated"].as_u64().unwrap();
    assert!(populated > 0 && populated < 4 << 20, "{populated} bytes");

    let restored = Vmm::restore(&snap, &run_dir(dir.path(), "restored"), &[]).unwrap();
    let all = assert_continues(&console, &restored, 5, "restored");
    assert_eq!(all[ticks(&console).len()], at_snapshot + 1);
    assert!(
        !restored.console().contains("microagent test guest"),
        "the restored guest booted again"
    );
    let status = restored.api(r#"{"cmd":"status"}"#).unwrap();
    assert_eq!(status["state"], "running", "{status}");

    // A restored VM is snapshotted and restored again: the count still continues.
    assert_eq!(
        restored.api(r#"{"cmd":"pause"}"#).unwrap()["state"],
        "paused"
    );
    let console2 = format!("{console}{}", restored.console());
    let snap2 = dir.path().join("snap2");
    assert_eq!(snapshot(&restored, &snap2)["ok"], true);
    let manifest2: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(snap2.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest2["kernel"], manifest["kernel"]);
    assert_eq!(manifest2["cmdline"], manifest["cmdline"]);
    let again = Vmm::restore(&snap2, &run_dir(dir.path(), "again"), &[]).unwrap();
    assert_continues(&console2, &again, 3, "restored twice");

    // The source resumes independently, from the same count.
    assert_eq!(
        source.api(r#"{"cmd":"resume"}"#).unwrap()["state"],
        "running"
    );
    source
        .wait_for(&format!("tick {}\n", at_snapshot + 3), RUN)
        .unwrap();
    assert_consecutive(&ticks(&source.console()), "source");
}

#[test]
fn two_restores_of_one_snapshot_run_at_once_independently() {
    let dir = new_dir();
    let (_source, console, snap) = paused_counter_snapshot(dir.path(), &[]);
    let a = Vmm::restore(&snap, &run_dir(dir.path(), "a"), &[]).unwrap();
    let b = Vmm::restore(&snap, &run_dir(dir.path(), "b"), &[]).unwrap();
    assert_continues(&console, &a, 3, "restore a");
    assert_continues(&console, &b, 3, "restore b");
    // Pausing one does not pause the other.
    assert_eq!(a.api(r#"{"cmd":"pause"}"#).unwrap()["state"], "paused");
    // Three ticks beyond what b had printed (`assert_continues` counts the source's).
    let b_ticks = ticks(&b.console()).len();
    assert_continues(&console, &b, b_ticks + 3, "restore b");
    assert_eq!(a.api(r#"{"cmd":"status"}"#).unwrap()["state"], "paused");
}

#[test]
fn four_vcpus_counting_each_on_its_own_continue_after_restore() {
    let dir = new_dir();
    let mut args = VmmArgs::test_guest("scenario=smp smp_aps=3");
    args.extra = vec!["--cpus".into(), "4".into()];
    let source = Vmm::start(&args, &dir.path().join("src-run")).unwrap();
    source.wait_for("SMP-UP=3\n", RUN).unwrap();
    source.wait_for("tick 3 ", RUN).unwrap();
    assert_eq!(source.api(r#"{"cmd":"pause"}"#).unwrap()["state"], "paused");
    let console = source.console();
    let at_snapshot = ap_counters(&console).last().unwrap().clone();
    assert_eq!(at_snapshot.len(), 3, "{console}");
    let snap = dir.path().join("snap");
    assert_eq!(snapshot(&source, &snap)["ok"], true);
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(snap.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["vcpus"].as_array().unwrap().len(), 4);

    let restored = Vmm::restore(&snap, &run_dir(dir.path(), "restored"), &[]).unwrap();
    let all = assert_continues(&console, &restored, 5, "restored");
    assert!(all.len() >= 5);
    // Every AP resumed from its own count: never below it, and moving on.
    let after = ap_counters(&format!("{console}{}", restored.console()));
    let last = after.last().unwrap();
    for (ap, (&then, &now)) in at_snapshot.iter().zip(last).enumerate() {
        assert!(
            now > then,
            "AP {ap} did not count after restore: {then} -> {now}"
        );
    }
    for line in &after[ap_counters(&console).len()..] {
        for (ap, (&then, &now)) in at_snapshot.iter().zip(line).enumerate() {
            assert!(now >= then, "AP {ap} restarted: {then} -> {now}");
        }
    }
    let reply = restored.api(r#"{"cmd":"pause"}"#).unwrap();
    assert_eq!(reply["vcpus"], 4, "{reply}");
    assert_eq!(reply["state"], "paused", "{reply}");
}

#[test]
fn restore_with_paused_stays_paused_until_resumed() {
    let dir = new_dir();
    let (_source, console, snap) = paused_counter_snapshot(dir.path(), &[]);
    let restored = Vmm::restore(&snap, &run_dir(dir.path(), "restored"), &["--paused"]).unwrap();
    assert_eq!(
        restored.api(r#"{"cmd":"status"}"#).unwrap()["state"],
        "paused"
    );
    sleep(Duration::from_millis(500));
    assert!(
        ticks(&restored.console()).is_empty(),
        "the guest ran while paused: {}",
        restored.console()
    );
    assert_eq!(
        restored.api(r#"{"cmd":"resume"}"#).unwrap()["state"],
        "running"
    );
    assert_continues(&console, &restored, 3, "resumed");
}

#[test]
fn a_running_vm_is_snapshotted_and_keeps_running() {
    let dir = new_dir();
    let vmm = Vmm::start(
        &VmmArgs::test_guest("scenario=counter"),
        &dir.path().join("src-run"),
    )
    .unwrap();
    vmm.wait_for("tick 3\n", RUN).unwrap();
    let reply = snapshot(&vmm, &dir.path().join("snap"));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["state"], "running", "{reply}");
    assert!(reply["snapshot"]["memory_populated"].as_u64().unwrap() > 0);
    let count = ticks(&vmm.console()).len();
    vmm.wait_for(&format!("tick {}\n", count + 3), RUN).unwrap();
    // The snapshot of a running VM restores too (its count is where the pause fell).
    let restored = Vmm::restore(
        &dir.path().join("snap"),
        &run_dir(dir.path(), "restored"),
        &[],
    )
    .unwrap();
    // The first complete `tick N` line: `wait_for("tick ")` can return while that line is
    // still being written, before its number and newline.
    let deadline = std::time::Instant::now() + RUN;
    let first = loop {
        if let Some(&first) = ticks(&restored.console()).first() {
            break first;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no tick after the restore:\n{}",
            restored.console()
        );
        sleep(Duration::from_millis(5));
    };
    assert!(first > 3, "restarted from {first}");
}

fn error_code(output: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: serde_json::Value = stderr
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON error on stderr:\n{stderr}"));
    assert!(!output.status.success());
    report["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn copy_snapshot(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .args(["-r", "--sparse=always"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

fn edit_manifest(snap: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = snap.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut manifest);
    // Re-sealed, as a manifest written on another host would be.
    let checksum = microagent_vmm::snapshot::manifest::checksum_of(&manifest);
    manifest["checksum"] = checksum.into();
    fs::write(&path, manifest.to_string()).unwrap();
}

#[test]
fn damaged_or_foreign_snapshots_are_refused_with_stable_codes_and_nothing_starts() {
    let dir = tempfile::tempdir().unwrap();
    // A kernel of our own, to change after the snapshot.
    let kernel = dir.path().join("guest.elf");
    fs::copy(microagent_integration::vmm::test_guest(), &kernel).unwrap();
    let mut args = VmmArgs::test_guest("scenario=counter");
    args.kernel = kernel.clone();
    let src = run_dir(dir.path(), "src-run");
    let vmm = Vmm::start(&args, &src).unwrap();
    vmm.wait_for("tick 2\n", RUN).unwrap();
    let snap = dir.path().join("snap");
    assert_eq!(snapshot(&vmm, &snap)["ok"], true);

    // Snapshot refusals.
    let again = snapshot(&vmm, &snap);
    assert_eq!(again["error"]["code"], "snapshot.exists", "{again}");
    let nowhere = snapshot(&vmm, &dir.path().join("no/such/parent"));
    assert_eq!(nowhere["error"]["code"], "snapshot.bad_dir", "{nowhere}");
    drop(vmm);

    let case = |name: &str, damage: &dyn Fn(&Path), extra: &[&str], code: &str| {
        let copy = dir.path().join(name);
        copy_snapshot(&snap, &copy);
        damage(&copy);
        let run = run_dir(dir.path(), &format!("{name}-run"));
        let output = restore_refused(&copy, &run, extra).unwrap();
        assert_eq!(error_code(&output), code, "{name}: {output:?}");
        assert!(!run.join("api.sock").exists(), "{name}: the VMM started");
    };
    case(
        "format",
        &|s| edit_manifest(s, |m| m["format"]["major"] = 99.into()),
        &[],
        "snapshot.format_unsupported",
    );
    case(
        "cpu",
        &|s| {
            edit_manifest(s, |m| {
                let model = m["cpu"]["model"].as_u64().unwrap();
                m["cpu"]["model"] = (model + 1).into();
            })
        },
        &[],
        "snapshot.cpu_mismatch",
    );
    case(
        "memory-flip",
        &|s| {
            // The guest's code is at 2 MiB: a populated page.
            use std::os::unix::fs::FileExt;
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(s.join("memory.bin"))
                .unwrap();
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, 0x20_0010).unwrap();
            file.write_all_at(&[byte[0] ^ 0xff], 0x20_0010).unwrap();
        },
        &[],
        "snapshot.checksum_mismatch",
    );
    case(
        "state-flip",
        &|s| {
            let path = s.join("state.json");
            let mut bytes = fs::read(&path).unwrap();
            let i = bytes.iter().position(|&b| b == b'1').unwrap();
            bytes[i] = b'2';
            fs::write(&path, bytes).unwrap();
        },
        &[],
        "snapshot.checksum_mismatch",
    );
    case(
        "manifest-edit",
        &|s| {
            let path = s.join("manifest.json");
            let text = fs::read_to_string(&path).unwrap();
            fs::write(&path, text.replace("scenario=counter", "scenario=cOunter")).unwrap();
        },
        &[],
        "snapshot.checksum_mismatch",
    );
    case(
        "missing",
        &|s| fs::remove_file(s.join("state.json")).unwrap(),
        &[],
        "snapshot.file_missing",
    );
    case(
        "truncated",
        &|s| {
            let file = fs::OpenOptions::new()
                .write(true)
                .open(s.join("memory.bin"))
                .unwrap();
            file.set_len(1 << 20).unwrap();
        },
        &[],
        "snapshot.file_truncated",
    );
    case(
        "devices",
        &|_| {},
        &["--blk", "/nonexistent/blk.sock"],
        "snapshot.device_mismatch",
    );
    // Last: the kernel the snapshot was taken with changes.
    let mut bytes = fs::read(&kernel).unwrap();
    bytes.push(0);
    fs::write(&kernel, bytes).unwrap();
    case("kernel", &|_| {}, &[], "snapshot.kernel_mismatch");
}

#[test]
fn a_full_disk_is_refused_before_the_vm_pauses_and_leaves_nothing() {
    let dir = new_dir();
    let small = SmallFs::mount(dir.path().join("small"), "64k");
    let vmm = Vmm::start(
        &VmmArgs::test_guest("scenario=counter"),
        &dir.path().join("src-run"),
    )
    .unwrap();
    vmm.wait_for("tick 2\n", RUN).unwrap();
    let reply = snapshot(&vmm, &small.0.join("snap"));
    assert_eq!(reply["error"]["code"], "snapshot.no_space", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("preflight"), "{message}");
    let left: Vec<_> = fs::read_dir(&small.0).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(vmm.api(r#"{"cmd":"status"}"#).unwrap()["state"], "running");
    let count = ticks(&vmm.console()).len();
    vmm.wait_for(&format!("tick {}\n", count + 3), RUN).unwrap();
}

#[test]
fn enospc_while_writing_removes_the_partial_snapshot() {
    use microagent_vmm::snapshot::{dir, manifest, state, SnapshotState};
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let small = SmallFs::mount(tmp.path().join("small"), "1m");
    // 4 MiB of guest memory, 2 MiB of it populated: more than the file system holds.
    let memfd = tempfile::tempfile().unwrap();
    memfd.set_len(4 << 20).unwrap();
    memfd.write_all_at(&vec![0x5a; 2 << 20], 1 << 20).unwrap();
    let manifest = manifest::Manifest {
        format: manifest::Format {
            major: manifest::FORMAT_MAJOR,
            minor: manifest::FORMAT_MINOR,
        },
        vmm_version: "test".into(),
        created_unix: 0,
        kernel: manifest::Artifact {
            path: "/k".into(),
            sha256: String::new(),
        },
        initrd: None,
        cmdline: String::new(),
        cpu: manifest::CpuIdentity {
            vendor: String::new(),
            family: 0,
            model: 0,
            stepping: 0,
            fingerprint: String::new(),
        },
        vcpus: 0,
        memory_mib: 4,
        memory_populated: 0,
        devices: Vec::new(),
        files: Vec::new(),
        checksum: String::new(),
    };
    let snapshot_state = SnapshotState {
        vm: state::VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        vcpus: Vec::new(),
        devices: Vec::new(),
        legacy: Default::default(),
    };
    let target = small.0.join("snap");
    let err = dir::write(&target, manifest, &snapshot_state, &[], &memfd, 4 << 20).unwrap_err();
    assert_eq!(err.code(), "snapshot.no_space", "{err}");
    assert!(err.to_string().contains("memory.bin"), "{err}");
    let left: Vec<_> = fs::read_dir(&small.0).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_dead_daemon_fails_the_snapshot_with_no_directory_and_the_vm_running() {
    let dir = new_dir();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path().join("blk.sock");
    let daemon = Daemon::start(
        "microagent-vhost-blk",
        &socket,
        ["--disk", disk.to_str().unwrap()],
    )
    .unwrap();
    let mut args = VmmArgs::test_guest("scenario=counter");
    args.blk.push(socket);
    let vmm = Vmm::start(&args, &dir.path().join("src-run")).unwrap();
    vmm.wait_for("tick 2\n", RUN).unwrap();
    drop(daemon); // SIGKILL
    for _ in 0..200 {
        if vmm.api(r#"{"cmd":"status"}"#).unwrap()["devices"][0]["failed"] == true {
            break;
        }
        sleep(Duration::from_millis(10));
    }
    let reply = snapshot(&vmm, &dir.path().join("snap"));
    assert_eq!(reply["error"]["code"], "snapshot.device_state", "{reply}");
    assert!(!dir.path().join("snap").exists());
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(vmm.api(r#"{"cmd":"status"}"#).unwrap()["state"], "running");
    let count = ticks(&vmm.console()).len();
    vmm.wait_for(&format!("tick {}\n", count + 3), RUN).unwrap();
}

#[test]
fn a_daemon_killed_while_the_vmm_waits_on_it_mid_snapshot_leaves_no_directory() {
    let dir = new_dir();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path().join("blk.sock");
    let daemon = Daemon::start(
        "microagent-vhost-blk",
        &socket,
        ["--disk", disk.to_str().unwrap()],
    )
    .unwrap();
    let mut args =
        VmmArgs::test_guest("scenario=blk_snapshot blk_pattern=x blk_sector=1 blk_wait=100000");
    args.blk.push(socket);
    let vmm = Vmm::start(&args, &dir.path().join("src-run")).unwrap();
    vmm.wait_for("BLK-WRITTEN\n", RUN).unwrap();
    let pid = daemon.pid().unwrap() as libc::pid_t;
    // SAFETY: signalling a child process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let snap = dir.path().join("snap");
    let request = serde_json::json!({"cmd": "snapshot", "dir": &snap}).to_string();
    let socket = vmm.api_socket();
    let waiter = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        writeln!(stream, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    });
    // The VMM is now blocked on the stopped daemon's reply inside the snapshot.
    sleep(Duration::from_millis(500));
    assert!(!snap.exists());
    drop(daemon); // SIGKILL
    let reply = waiter.join().unwrap();
    assert_eq!(reply["error"]["code"], "snapshot.device_state", "{reply}");
    assert!(!snap.exists());
    let status = vmm.api(r#"{"cmd":"status"}"#).unwrap();
    assert_eq!(status["devices"][0]["failed"], true, "{status}");
    assert_eq!(
        fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .count(),
        0
    );
    assert_eq!(vmm.api(r#"{"cmd":"status"}"#).unwrap()["state"], "running");
    let waits = vmm.console().matches("wait ").count();
    vmm.wait_for(&format!("wait {}\n", waits + 3), RUN).unwrap();
}

#[test]
fn a_restored_guest_reads_its_sector_back_through_a_fresh_blk_daemon_on_a_disk_copy() {
    let dir = new_dir();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path().join("blk.sock");
    let _daemon = Daemon::start(
        "microagent-vhost-blk",
        &socket,
        ["--disk", disk.to_str().unwrap()],
    )
    .unwrap();
    let mut args = VmmArgs::test_guest(
        "scenario=blk_snapshot blk_pattern=written-before-snapshot blk_sector=6 blk_wait=300",
    );
    args.blk.push(socket);
    let source = Vmm::start(&args, &dir.path().join("src-run")).unwrap();
    source.wait_for("BLK-WRITTEN\n", RUN).unwrap();
    let snap = dir.path().join("snap");
    assert_eq!(source.api(r#"{"cmd":"pause"}"#).unwrap()["state"], "paused");
    assert!(
        !source.console().contains("BLK-READBACK"),
        "the guest read back before the snapshot: raise blk_wait"
    );
    let reply = snapshot(&source, &snap);
    assert_eq!(reply["ok"], true, "{reply}");
    let manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(snap.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["devices"][0]["kind"], "block", "{manifest}");
    assert!(snap.join("device-0.state").exists());

    // The caller's disk copy, taken while the source is paused; then the source's own
    // disk changes, so that what the restored guest reads proves which disk it uses.
    let copy = dir.path().join("copy.img");
    fs::copy(&disk, &copy).unwrap();
    let mut bytes = fs::read(&disk).unwrap();
    bytes[6 * 512..6 * 512 + 14].copy_from_slice(b"source-changed");
    bytes[6 * 512 + 14..7 * 512].fill(0);
    fs::write(&disk, bytes).unwrap();

    let socket2 = dir.path().join("blk2.sock");
    let _daemon2 = Daemon::start(
        "microagent-vhost-blk",
        &socket2,
        ["--disk", copy.to_str().unwrap()],
    )
    .unwrap();
    let run = run_dir(dir.path(), "restored");
    let restored = Vmm::restore(&snap, &run, &["--blk", socket2.to_str().unwrap()]).unwrap();
    let console = restored.wait_for("TEST-GUEST-DONE", RUN).unwrap();
    assert!(console.contains("BLK-READ-STATUS=0"), "{console}");
    assert!(
        console.contains("BLK-READBACK=written-before-snapshot"),
        "{console}"
    );
    assert!(
        !console.contains("BLK-WRITTEN"),
        "the guest wrote again: {console}"
    );

    // The source's rings restarted where GET_VRING_BASE stopped them: it reads its own
    // (changed) disk after resuming.
    assert_eq!(
        source.api(r#"{"cmd":"resume"}"#).unwrap()["state"],
        "running"
    );
    let console = source.wait_for("TEST-GUEST-DONE", RUN).unwrap();
    assert!(console.contains("BLK-READBACK=source-changed"), "{console}");
}

/// A vsock daemon for guest CID 3 with its hybrid socket in `dir`.
fn vsock_daemon(dir: &Path, name: &str) -> (Daemon, PathBuf, PathBuf) {
    let uds = dir.join(format!("{name}.vsock"));
    let socket = dir.join(format!("{name}.sock"));
    let daemon = Daemon::start(
        "microagent-vhost-vsock",
        &socket,
        ["--guest-cid", "3", "--uds-path", uds.to_str().unwrap()],
    )
    .unwrap();
    (daemon, socket, uds)
}

/// Restores `snap` with a fresh vsock daemon and checks that its guest sees the
/// transport reset and then echoes through a new connection.
fn assert_restored_vsock_guest_echoes(dir: &Path, snap: &Path) {
    use std::io::{Read, Write};
    let (_daemon, socket, uds) = vsock_daemon(dir, "restored");
    let listener =
        std::os::unix::net::UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let host = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap();
        conn.write_all(&[b"echo:", &buf[..n]].concat()).unwrap();
        buf[..n].to_vec()
    });
    let run = run_dir(dir, "restored");
    let restored = Vmm::restore(snap, &run, &["--vsock", socket.to_str().unwrap()]).unwrap();
    let console = restored.wait_for("TEST-GUEST-DONE", RUN).unwrap();
    assert!(console.contains("VSOCK-EVENT=0\n"), "{console}");
    assert!(
        console.contains("VSOCK-ECHO=echo:hello-after-restore"),
        "{console}"
    );
    assert_eq!(host.join().unwrap(), b"hello-after-restore");
}

#[test]
fn a_restored_guest_sees_a_vsock_transport_reset_and_a_new_connection_echoes() {
    let dir = new_dir();
    let (_d1, socket1, _) = vsock_daemon(dir.path(), "source");
    let mut args = VmmArgs::test_guest(
        "scenario=vsock_snapshot vsock_port=5000 vsock_msg=hello-after-restore",
    );
    args.extra = vec!["--vsock".into(), socket1.into()];
    let source = Vmm::start(&args, &dir.path().join("src-run")).unwrap();
    source.wait_for("VSOCK-READY\n", RUN).unwrap();
    let snap = dir.path().join("snap");
    let reply = snapshot(&source, &snap);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["state"], "running", "{reply}");
    assert_restored_vsock_guest_echoes(dir.path(), &snap);
    // The source, with its own daemon, saw no reset.
    assert!(
        !source.console().contains("VSOCK-EVENT"),
        "{}",
        source.console()
    );
}

/// Issue 12's ring-consistency defect, made to happen every time: host traffic reaches
/// the vsock daemon while the snapshot has the rings stopped (the debug build's gate
/// holds the snapshot there). The daemon must not deliver it into guest memory before
/// memory is written: until 6f34a95 the rings were restarted right after the device
/// state was saved, the daemon wrote the host's REQUEST into an RX buffer, and the saved
/// memory held a used entry the saved ring state did not count (a restored guest then
/// saw "rx:id N is not a head"). `microagent-snapshot verify` and the restore check it.
#[test]
fn host_traffic_while_a_snapshot_has_the_rings_stopped_is_not_in_its_memory() {
    use std::io::Write;
    let dir = new_dir();
    let (_d1, socket1, uds1) = vsock_daemon(dir.path(), "source");
    let gate = dir.path().join("snapshot-gate");
    let mut args = VmmArgs::test_guest(
        "scenario=vsock_snapshot vsock_port=5000 vsock_msg=hello-after-restore",
    );
    args.extra = vec!["--vsock".into(), socket1.into()];
    args.env
        .push(("MICROAGENT_TEST_SNAPSHOT_GATE".into(), gate.clone().into()));
    let source = Vmm::start(&args, &dir.path().join("src-run")).unwrap();
    source.wait_for("VSOCK-READY\n", RUN).unwrap();

    // While the gate holds the snapshot, a host program connects to the guest's port
    // 1234: the daemon has a REQUEST for the guest and RX buffers to put it in.
    let host = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !gate.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the snapshot never reached its gate (a release build of the VMM?)"
            );
            sleep(Duration::from_millis(5));
        }
        let mut conn = std::os::unix::net::UnixStream::connect(&uds1).unwrap();
        conn.write_all(b"CONNECT 1234\n").unwrap();
        // Time for a running daemon to deliver it.
        sleep(Duration::from_millis(500));
        fs::remove_file(&gate).unwrap();
        conn
    });
    let snap = dir.path().join("snap");
    let reply = snapshot(&source, &snap);
    let _conn = host.join().unwrap();
    assert_eq!(reply["ok"], true, "{reply}");

    let verify = snapshot_tool(&["verify".as_ref(), snap.as_os_str()]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_restored_vsock_guest_echoes(dir.path(), &snap);
}

fn snapshot_tool(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let tool = microagent_integration::daemon::binary("microagent-snapshot").unwrap();
    Command::new(tool).args(args).output().unwrap()
}

#[test]
fn microagent_snapshot_verify_catches_one_flipped_byte_in_every_file() {
    let dir = new_dir();
    let (_source, _, snap) = paused_counter_snapshot(dir.path(), &[]);
    let ok = snapshot_tool(&["verify".as_ref(), snap.as_os_str()]);
    assert!(ok.status.success(), "{ok:?}");

    let inspect = snapshot_tool(&["inspect".as_ref(), "--json".as_ref(), snap.as_os_str()]);
    assert!(inspect.status.success(), "{inspect:?}");
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(report["manifest"]["vcpus"], 1);
    let memory = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "memory.bin")
        .unwrap();
    assert_eq!(memory["size"], 64 << 20);
    assert!(memory["allocated"].as_u64().unwrap() < 4 << 20, "{memory}");
    let text = snapshot_tool(&["inspect".as_ref(), snap.as_os_str()]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("memory   64 MiB"));

    // (file, offset of the flipped byte): inside the command line, inside the state,
    // inside the guest's code page.
    let manifest = fs::read_to_string(snap.join("manifest.json")).unwrap();
    let in_cmdline = manifest.find("scenario=counter").unwrap() + 3;
    for (name, offset) in [
        ("manifest.json", in_cmdline as u64),
        ("state.json", 100),
        ("memory.bin", 0x20_0010),
    ] {
        let copy = dir.path().join(format!("flip-{name}"));
        copy_snapshot(&snap, &copy);
        use std::os::unix::fs::FileExt;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(copy.join(name))
            .unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, offset).unwrap();
        file.write_all_at(&[byte[0] ^ 0x01], offset).unwrap();
        let out = snapshot_tool(&["verify".as_ref(), copy.as_os_str()]);
        assert!(!out.status.success(), "{name}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(name), "{name}: {stderr}");
        assert!(
            stderr.contains("snapshot.checksum_mismatch"),
            "{name}: {stderr}"
        );
    }
}

/// `microagent-snapshot guest`, what a hung guest is read with: the test guest's polled
/// vsock set-up is exactly known (8 RX buffers and 1 event buffer posted, none used, no
/// interrupts: its vCPU spins with them off, every IOAPIC pin masked).
#[test]
fn microagent_snapshot_guest_shows_the_vcpu_and_each_ring_where_the_guest_left_them() {
    let dir = new_dir();
    let (_daemon, socket, _) = vsock_daemon(dir.path(), "source");
    let mut args = VmmArgs::test_guest("scenario=vsock_snapshot");
    args.extra = vec!["--vsock".into(), socket.into()];
    let source = Vmm::start(&args, &dir.path().join("src-run")).unwrap();
    source.wait_for("VSOCK-READY\n", RUN).unwrap();
    let snap = dir.path().join("snap");
    let reply = snapshot(&source, &snap);
    assert_eq!(reply["ok"], true, "{reply}");

    let out = snapshot_tool(&["guest".as_ref(), "--json".as_ref(), snap.as_os_str()]);
    assert!(out.status.success(), "{out:?}");
    let guest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vcpus = guest["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 1, "{guest}");
    assert_eq!(vcpus[0]["state"], "runnable", "{guest}");
    assert_eq!(vcpus[0]["interrupts_enabled"], false, "{guest}");
    assert_ne!(vcpus[0]["rip"], 0, "{guest}");
    assert_eq!(guest["ioapic"], serde_json::json!([]), "{guest}");
    let device = &guest["devices"][0];
    assert_eq!(device["kind"], "vsock", "{guest}");
    assert_eq!(device["status"], 0xf, "{guest}");
    let queues: Vec<(u64, u64, u64)> = device["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            let n = |k: &str| q["ring"][k].as_u64().unwrap();
            (q["index"].as_u64().unwrap(), n("avail"), n("used"))
        })
        .collect();
    assert_eq!(queues, [(0, 8, 0), (1, 0, 0), (2, 1, 0)], "{guest}");

    let text = snapshot_tool(&["guest".as_ref(), snap.as_os_str()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.starts_with("vcpu 0: runnable at rip 0x"), "{text}");
    assert!(
        text.contains("  queue 0 (8 entries): daemon next 0, guest avail 8, device used 0\n"),
        "{text}"
    );
}
