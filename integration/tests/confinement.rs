//! Confinement of the real processes (issue 16): every thread of a serving daemon and of
//! a running VMM is under a seccomp filter, with no_new_privs and no capabilities; a
//! forbidden syscall kills the process with SIGSYS (debug builds call one on request,
//! `MICROAGENT_SECCOMP_SELFTEST=<profile>`), and `--seccomp=off` is the only way out.
//! That the normal work runs with the filters on is proven by every other test here:
//! the filters are on by default.

use microagent_confine::SELFTEST_ENV;
use microagent_integration::cli::Cli;
use microagent_integration::daemon::{binary, Daemon};
use microagent_integration::frontend::{Buf, Frontend, GuestMemory, Setup};
use microagent_integration::process::ChildGuard;
use microagent_integration::registry::{push, write_layout, Registry};
use microagent_integration::vmm::{test_guest, Vmm, VmmArgs};
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

fn assert_all_confined(pid: u32, what: &str) {
    let threads = threads(pid);
    assert!(threads.len() > 1, "{what}: {threads:?}");
    // SAFETY: geteuid has no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    for (name, seccomp, nnp, eff, bnd) in &threads {
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
    assert_all_confined(daemon.pid().unwrap(), "vhost-blk");
}

#[test]
fn every_thread_of_a_running_vmm_is_confined() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = VmmArgs::test_guest("scenario=halt");
    args.extra = vec!["--cpus".into(), "2".into()];
    let vmm = Vmm::start(&args, dir.path()).unwrap();
    vmm.wait_for("HALTING", WAIT).unwrap();
    assert_all_confined(vmm.pid().unwrap(), "microagent-vmm");
    // The loop still serves its control socket under the filter.
    assert_eq!(vmm.api(r#"{"cmd":"status"}"#).unwrap()["state"], "running");
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

#[test]
fn a_cli_workspace_runs_confined_doctor_says_so_and_a_seccomp_kill_is_the_crash_reason() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let layout = dir.path().join("layout");
    write_layout(&layout);
    push(&layout, &registry, "test/img:v1");
    let image = format!("{}/test/img:v1", registry.addr);
    let cli = Cli::new(dir.path());
    let create = |name: &str, cmdline: &str| {
        cli.ok(&[
            "create",
            name,
            "--image",
            &image,
            "--no-agent",
            "--memory",
            "64M",
            "--kernel",
            test_guest().to_str().unwrap(),
            "--cmdline",
            cmdline,
        ]);
    };

    create("confined", "scenario=halt");
    cli.ok(&["start", "confined"]);
    let checks: serde_json::Value = serde_json::from_str(&cli.ok(&["--json", "doctor"])).unwrap();
    let checks = checks.as_array().unwrap();
    let seccomp = checks.iter().find(|c| c["check"] == "seccomp").unwrap();
    assert_eq!(seccomp["ok"], true, "{seccomp}");
    let confined: Vec<&serde_json::Value> = checks
        .iter()
        .filter(|c| {
            c["check"]
                .as_str()
                .unwrap()
                .starts_with("confinement confined/")
        })
        .collect();
    // The VMM, blk, vsock and net.
    assert_eq!(confined.len(), cli.pids("confined").len(), "{checks:?}");
    for c in &confined {
        assert_eq!(c["ok"], true, "{c}");
    }
    cli.ok(&["halt", "confined"]);

    // MICROAGENT_SECCOMP=off starts every process without filters, and doctor says so.
    let off = |args: &[&str]| {
        let out = cli
            .command(args)
            .env("MICROAGENT_SECCOMP", "off")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    off(&["start", "confined"]);
    let checks: serde_json::Value = serde_json::from_str(&off(&["--json", "doctor"])).unwrap();
    let checks = checks.as_array().unwrap();
    let seccomp = checks.iter().find(|c| c["check"] == "seccomp").unwrap();
    assert_eq!(seccomp["ok"], false, "{seccomp}");
    let vmm = checks
        .iter()
        .find(|c| c["check"] == "confinement confined/microagent-vmm")
        .unwrap();
    assert_eq!(vmm["ok"], false, "{vmm}");
    assert!(
        vmm["detail"].as_str().unwrap().contains("seccomp 0/"),
        "{vmm}"
    );
    cli.ok(&["halt", "confined"]);

    // The guest writes to its disk: the blk worker's first event runs the self-test.
    create("killed", "scenario=blk blk_pattern=x blk_sector=6");
    let out = cli
        .command(&["start", "killed"])
        .env(SELFTEST_ENV, "vhost-blk/worker")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let blk = cli.pids("killed")[1];
    let mut reason = String::new();
    for _ in 0..100 {
        let state = cli.entry("killed")["state"].clone();
        if state["state"] == "crashed" {
            reason = state["reason"].as_str().unwrap().to_owned();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        reason.contains(&format!(
            "microagent-vhost-blk (pid {blk}) was killed by SIGSYS (seccomp): syscall {}",
            libc::SYS_personality
        )),
        "{reason}"
    );
    cli.ok(&["delete", "killed", "--yes"]);
}
