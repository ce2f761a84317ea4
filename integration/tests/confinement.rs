//! Confinement of the real processes (issue 16): every thread of a serving daemon and of
//! a running VMM is under a seccomp filter, with no_new_privs and no capabilities; a
//! forbidden syscall kills the process with SIGSYS (debug builds call one on request,
//! `MICROAGENT_SECCOMP_SELFTEST=<profile>`), and `--seccomp=off` is the only way out.
//! That the normal work runs with the filters on is proven by every other test here:
//! the filters are on by default.

use microagent_confine::{landlock, SELFTEST_ENV};
use microagent_integration::daemon::{binary, Daemon};
use microagent_integration::frontend::{Buf, Frontend, GuestMemory, Setup};
use microagent_integration::process::ChildGuard;
use microagent_integration::vmm::{Vmm, VmmArgs};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;

const WAIT: Duration = Duration::from_secs(20);

/// `binary --socket-path SOCKET ARGS` with the self-test asking for `profile`; its log
/// goes to `dir/daemon.log`.
fn daemon_command(dir: &Path, binary_name: &str, args: &[&str], profile: &str) -> Command {
    let mut cmd = Command::new(binary(binary_name).unwrap());
    let log = fs::File::create(dir.join("daemon.log")).unwrap();
    cmd.arg("--socket-path")
        .arg(dir.join("vhost.sock"))
        .args(args)
        .env(SELFTEST_ENV, profile)
        .stdin(Stdio::null())
        .stderr(Stdio::from(log));
    cmd
}

fn daemon_args(dir: &Path, daemon: &str) -> Vec<String> {
    match daemon {
        "vhost-blk" => {
            let disk = dir.join("disk.img");
            fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
            vec!["--disk".into(), disk.to_str().unwrap().into()]
        }
        "vhost-vsock" => vec![
            "--guest-cid".into(),
            "3".into(),
            "--uds-path".into(),
            dir.join("vsock").to_str().unwrap().into(),
        ],
        "vhost-net" => vec!["--dns".into(), "127.0.0.1:53".into()],
        other => panic!("no daemon {other}"),
    }
}

fn assert_sigsys(status: ExitStatus, what: &str, log: &str) {
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{what}: expected death by SIGSYS, got {status}; log:\n{log}"
    );
    assert!(
        log.contains("calling personality(2)"),
        "{what}: the self-test did not run; log:\n{log}"
    );
    assert!(
        !log.contains("still alive"),
        "{what}: survived the syscall; log:\n{log}"
    );
}

#[test]
fn every_daemon_dies_of_sigsys_when_its_main_thread_makes_a_forbidden_syscall() {
    for daemon in ["vhost-blk", "vhost-vsock", "vhost-net"] {
        let dir = tempfile::tempdir().unwrap();
        let args = daemon_args(dir.path(), daemon);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = daemon_command(
            dir.path(),
            &format!("microagent-{daemon}"),
            &args,
            &format!("{daemon}/main"),
        );
        let mut child = ChildGuard::spawn(&mut cmd).unwrap();
        let status = child.wait_timeout(WAIT).unwrap();
        let log = fs::read_to_string(dir.path().join("daemon.log")).unwrap();
        assert_sigsys(status, daemon, &log);
        assert!(
            log.contains(&format!("confined {daemon}/main")),
            "{daemon}: no confinement line in the log:\n{log}"
        );
    }
}

#[test]
fn with_seccomp_off_the_same_syscall_is_survived_and_the_daemon_serves() {
    let dir = tempfile::tempdir().unwrap();
    let args = daemon_args(dir.path(), "vhost-blk");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.push("--seccomp=off");
    let mut cmd = daemon_command(dir.path(), "microagent-vhost-blk", &args, "vhost-blk/main");
    let mut child = ChildGuard::spawn(&mut cmd).unwrap();
    let socket = dir.path().join("vhost.sock");
    child.wait_for_path(&socket, WAIT).unwrap();
    // Serving a frontend proves the main thread went on past the self-test.
    let mut mem = GuestMemory::new(1 << 20).unwrap();
    let fe = Frontend::connect(&socket, &mut mem, &Setup::default()).unwrap();
    drop(fe);
    let status = child.wait_timeout(WAIT).unwrap();
    let log = fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(log.contains("seccomp is OFF"), "log:\n{log}");
    assert!(log.contains("still alive"), "log:\n{log}");
}

#[test]
fn a_blk_worker_dies_of_sigsys_at_its_first_event_after_a_forbidden_syscall() {
    let dir = tempfile::tempdir().unwrap();
    let args = daemon_args(dir.path(), "vhost-blk");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = daemon_command(
        dir.path(),
        "microagent-vhost-blk",
        &args,
        "vhost-blk/worker",
    );
    let mut child = ChildGuard::spawn(&mut cmd).unwrap();
    let socket = dir.path().join("vhost.sock");
    child.wait_for_path(&socket, WAIT).unwrap();
    let mut mem = GuestMemory::new(1 << 20).unwrap();
    // The worker may handle its first event (a kick) while the queues are being set up,
    // and die there; otherwise a request makes it.
    if let Ok(mut fe) = Frontend::connect(&socket, &mut mem, &Setup::default()) {
        let header = mem.alloc(16, 16).unwrap();
        let mut request = VIRTIO_BLK_T_GET_ID.to_le_bytes().to_vec();
        request.resize(16, 0);
        mem.write(header, &request);
        let id = mem.alloc(20, 1).unwrap();
        let status_at = mem.alloc(1, 1).unwrap();
        let bufs = [
            Buf::readable(header, 16),
            Buf::writable(id, 20),
            Buf::writable(status_at, 1),
        ];
        let _ = fe.queues[0].submit(&mem, &bufs);
    }
    let status = child.wait_timeout(WAIT).unwrap();
    let log = fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert_sigsys(status, "vhost-blk worker", &log);
    assert!(log.contains("confined vhost-blk/worker"), "log:\n{log}");
}

/// (thread name, Seccomp, NoNewPrivs, CapEff, CapBnd) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String, String, String, String)> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let stat = fs::read_to_string(task.join("stat")).unwrap_or_default();
        let flags: u64 = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .nth(6)
            .unwrap()
            .parse()
            .unwrap();
        // PF_USER_WORKER, PF_KTHREAD: KVM's NX recovery worker runs no code of ours.
        if flags & (0x4000 | 0x0020_0000) != 0 {
            continue;
        }
        let comm = fs::read_to_string(task.join("comm")).unwrap_or_default();
        let status = fs::read_to_string(task.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        out.push((
            comm.trim().to_owned(),
            field("Seccomp:"),
            field("NoNewPrivs:"),
            field("CapEff:"),
            field("CapBnd:"),
        ));
    }
    out
}

/// A daemon's threads once each has confined itself: a daemon's main thread confines
/// itself just after it listens, which a test can outrun.
fn settled_threads(pid: u32) -> Vec<(String, String, String, String, String)> {
    let mut threads = threads(pid);
    for _ in 0..50 {
        if threads.iter().all(|t| t.1 == "2") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        threads = self::threads(pid);
    }
    threads
}

fn assert_all_confined(threads: &[(String, String, String, String, String)], what: &str) {
    assert!(threads.len() > 1, "{what}: {threads:?}");
    // SAFETY: geteuid has no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    for (name, seccomp, nnp, eff, bnd) in threads {
        assert_eq!(
            seccomp, "2",
            "{what}: thread {name} has no filter: {threads:?}"
        );
        assert_eq!(nnp, "1", "{what}: thread {name} lacks no_new_privs");
        assert_eq!(
            eff, "0000000000000000",
            "{what}: thread {name} holds capabilities"
        );
        if root {
            assert_eq!(
                bnd, "0000000000000000",
                "{what}: thread {name} bounding set"
            );
        }
    }
}

#[test]
fn every_thread_of_a_serving_daemon_is_confined() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path().join("blk.sock");
    let daemon = Daemon::start(
        "microagent-vhost-blk",
        &socket,
        ["--disk", disk.to_str().unwrap(), "--queues", "2"],
    )
    .unwrap();
    let mut mem = GuestMemory::new(1 << 20).unwrap();
    let setup = Setup {
        queues: 2,
        ..Setup::default()
    };
    let mut fe = Frontend::connect(&socket, &mut mem, &setup).unwrap();
    // One request per queue: each worker handles an event, so each confined itself.
    for q in 0..2 {
        let header = mem.alloc(16, 16).unwrap();
        let mut request = VIRTIO_BLK_T_GET_ID.to_le_bytes().to_vec();
        request.resize(16, 0);
        mem.write(header, &request);
        let id = mem.alloc(20, 1).unwrap();
        let status_at = mem.alloc(1, 1).unwrap();
        let bufs = [
            Buf::readable(header, 16),
            Buf::writable(id, 20),
            Buf::writable(status_at, 1),
        ];
        fe.queues[q].submit(&mem, &bufs).unwrap();
        fe.queues[q].wait_used(&mem, 1, WAIT).unwrap();
        assert_eq!(mem.read(status_at, 1)[0], 0, "GET_ID on queue {q}");
    }
    assert_all_confined(&settled_threads(daemon.pid().unwrap()), "vhost-blk");
}

#[test]
fn every_thread_of_a_running_vmm_is_confined() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = VmmArgs::test_guest("scenario=halt");
    args.extra = vec!["--cpus".into(), "2".into()];
    let vmm = Vmm::start(&args, dir.path()).unwrap();
    vmm.wait_for("HALTING", WAIT).unwrap();
    assert_all_confined(&threads(vmm.pid().unwrap()), "microagent-vmm");
    // The loop still serves its control socket under the filter.
    assert_eq!(vmm.api(r#"{"cmd":"status"}"#).unwrap()["state"], "running");
}

/// The control socket appears only once the main thread and every vCPU thread are
/// confined: whoever reaches the VMM (`microagent doctor` right after `start`) finds no
/// unfiltered thread. Before the VMM waited for its vCPU threads, a vCPU thread not yet
/// scheduled could still be unfiltered then: doctor saw "seccomp 2/3 threads" once on a
/// machine at load 8. This test does not recreate that load, so it passes on the old
/// code too; it guards the promise, not the race.
#[test]
fn every_vmm_thread_is_confined_as_soon_as_its_control_socket_is_up() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let mut args = VmmArgs::test_guest("scenario=halt");
        args.extra = vec!["--cpus".into(), "16".into()];
        let vmm = Vmm::start(&args, dir.path()).unwrap();
        let threads = threads(vmm.pid().unwrap());
        assert_eq!(threads.len(), 17, "main and 16 vCPUs: {threads:?}");
        assert_all_confined(&threads, &format!("microagent-vmm, round {round}"));
    }
}

#[test]
fn the_vmm_dies_of_sigsys_when_its_main_or_a_vcpu_thread_makes_a_forbidden_syscall() {
    for profile in ["vmm/main", "vmm/vcpu"] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = VmmArgs::test_guest("scenario=halt");
        args.env = vec![(SELFTEST_ENV.into(), profile.into())];
        let (output, _console) = args.run(dir.path(), WAIT).unwrap();
        let log = String::from_utf8_lossy(&output.stderr);
        assert_sigsys(output.status, profile, &log);
        assert!(
            log.contains(&format!("confined {profile}")),
            "{profile}: log:\n{log}"
        );
    }
}

/// Found by `qemu_vhost_blk.rs` (fstrim under real Linux): a batch of at least 512 KiB
/// is spread over scoped I/O threads, and the blk worker profile had no `clone3`, so
/// the first big batch killed the daemon with SIGSYS.
#[test]
fn a_blk_batch_big_enough_for_io_threads_is_served_under_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0x5Au8; 4 << 20]).unwrap();
    let socket = dir.path().join("blk.sock");
    let mut daemon = Daemon::start(
        "microagent-vhost-blk",
        &socket,
        ["--disk", disk.to_str().unwrap()],
    )
    .unwrap();
    let mut mem = GuestMemory::new(8 << 20).unwrap();
    let mut fe = Frontend::connect(&socket, &mut mem, &Setup::default()).unwrap();
    // Eight reads of 128 KiB (1 MiB in all), published together and kicked once.
    let mut statuses = Vec::new();
    for i in 0..8u64 {
        let header = mem.alloc(16, 16).unwrap();
        let mut request = virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN
            .to_le_bytes()
            .to_vec();
        request.extend_from_slice(&0u32.to_le_bytes());
        request.extend_from_slice(&(i * 256).to_le_bytes());
        mem.write(header, &request);
        let data = mem.alloc(128 << 10, 512).unwrap();
        let status_at = mem.alloc(1, 1).unwrap();
        mem.write(status_at, &[0xFF]);
        let bufs = [
            Buf::readable(header, 16),
            Buf::writable(data, 128 << 10),
            Buf::writable(status_at, 1),
        ];
        let head = fe.queues[0].write_chain(&mem, &bufs);
        fe.queues[0].publish(&mem, head);
        statuses.push((data, status_at));
    }
    fe.queues[0].kick().unwrap();
    let used = fe.queues[0].wait_used(&mem, 8, WAIT);
    assert_eq!(daemon.try_status().unwrap(), None, "the daemon died");
    assert_eq!(used.unwrap().len(), 8);
    for (data, status_at) in statuses {
        assert_eq!(mem.read(status_at, 1)[0], 0);
        assert!(mem.read(data, 128 << 10).iter().all(|&b| b == 0x5A));
    }
}

/// In a thread of its own: the restriction stays with that thread.
#[test]
fn a_restricted_thread_reads_writes_and_removes_files_beneath_its_directory_only() {
    if let Err(e) = landlock::abi() {
        microagent_integration::report::not_run(
            "a_restricted_thread_reads_writes_and_removes_files_beneath_its_directory_only",
            &format!("needs Landlock: {e}"),
        );
        return;
    }
    let allowed = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("host-file"), b"secret").unwrap();
    let (inside_dir, outside_file) = (
        allowed.path().to_path_buf(),
        outside.path().join("host-file"),
    );
    let result = std::thread::spawn(move || {
        microagent_confine::privileges::drop_all().unwrap();
        landlock::restrict(std::slice::from_ref(&inside_dir), &[]).unwrap();
        let inside = std::fs::write(inside_dir.join("mine"), b"ok");
        let read_outside = std::fs::read(&outside_file);
        let write_outside = std::fs::write(outside_file.with_file_name("new"), b"x");
        // unlink is in the daemons' seccomp lists (their sockets): Landlock bounds it.
        let remove_outside = std::fs::remove_file(&outside_file);
        let remove_inside = std::fs::remove_file(inside_dir.join("mine"));
        (
            inside.is_ok() && remove_inside.is_ok(),
            read_outside.map(drop).map_err(|e| e.raw_os_error()),
            write_outside.map_err(|e| e.raw_os_error()),
            remove_outside.map_err(|e| e.raw_os_error()),
        )
    })
    .join()
    .unwrap();
    let denied: Result<(), Option<i32>> = Err(Some(libc::EACCES));
    assert_eq!(result, (true, denied, denied, denied));
    // This thread was not restricted.
    assert_eq!(
        std::fs::read(outside.path().join("host-file")).unwrap(),
        b"secret"
    );
}
