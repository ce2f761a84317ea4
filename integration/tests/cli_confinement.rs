//! Confinement through the CLI (issue 16): a workspace's processes run confined and
//! `doctor` says so, `MICROAGENT_SECCOMP=off` turns the filters off, and a process killed
//! by its filter is named as such in the workspace's crash reason. Alone in its binary:
//! the crash reason comes from the kernel's audit record, which the kernel rate-limits
//! (10 per 5 s without auditd), so no other test here may trigger seccomp kills.

use microagent_confine::{LANDLOCK_SELFTEST_ENV, SELFTEST_ENV};
use microagent_integration::cli::Cli;
use microagent_integration::vmm::test_guest;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn a_cli_workspace_runs_confined_doctor_says_so_and_a_seccomp_kill_is_the_crash_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    // Kills what the workspaces started if an assertion fails.
    let _reaper = cli.reaper();
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

    // Without auditd the kernel prints at most 10 audit records per 5 s; the other
    // tests of this binary are done, so a fresh window has room for this one.
    std::thread::sleep(Duration::from_millis(5100));
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

/// Reads, in a daemon's log, what its Landlock self-test said about `path`.
fn selftest_line(log: &std::path::Path, path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .find(|l| l.contains(LANDLOCK_SELFTEST_ENV) && l.contains(&*path.to_string_lossy()))
        .unwrap_or_else(|| {
            panic!(
                "no self-test line for {} in {}:\n{text}",
                path.display(),
                log.display()
            )
        })
        .to_owned()
}

#[test]
fn a_landlocked_vmm_or_daemon_cannot_read_a_host_file_outside_its_workspace_directories() {
    if let Err(e) = microagent_confine::landlock::abi() {
        microagent_integration::report::not_run(
            "a_landlocked_vmm_or_daemon_cannot_read_a_host_file_outside_its_workspace_directories",
            &format!("needs Landlock (landlock in the kernel's LSM list): {e}"),
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    cli.ok(&[
        "create",
        "ws",
        "--image",
        &image,
        "--no-agent",
        "--memory",
        "64M",
        "--kernel",
        test_guest().to_str().unwrap(),
        "--cmdline",
        "scenario=halt",
    ]);
    // A host file root may read (the test runs as root, the file is root's).
    let secret = dir.path().join("host-secret");
    std::fs::write(&secret, b"root's file").unwrap();
    let start = |path: &std::path::Path, landlock: &str| {
        let out = cli
            .command(&["start", "ws"])
            .env(LANDLOCK_SELFTEST_ENV, path)
            .env("MICROAGENT_LANDLOCK", landlock)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    start(&secret, "on");
    let logs = cli.home.join("workspaces/ws");
    for daemon in ["vmm", "blk", "net"] {
        let line = selftest_line(&logs.join(format!("{daemon}.log")), &secret);
        assert!(
            line.contains("Permission denied (os error 13)"),
            "{daemon}: {line}"
        );
    }
    let checks: serde_json::Value = serde_json::from_str(&cli.ok(&["--json", "doctor"])).unwrap();
    let checks = checks.as_array().unwrap();
    let landlock = checks.iter().find(|c| c["check"] == "landlock").unwrap();
    assert_eq!(landlock["ok"], true, "{landlock}");
    for daemon in [
        "microagent-vmm",
        "microagent-vhost-blk",
        "microagent-vhost-net",
    ] {
        let c = checks
            .iter()
            .find(|c| c["check"] == format!("landlock ws/{daemon}"))
            .unwrap_or_else(|| panic!("no landlock check for {daemon}: {checks:?}"));
        assert_eq!(c["ok"], true, "{c}");
    }
    cli.ok(&["halt", "ws"]);

    // What the rules allow is still there: the system's libraries.
    let library = std::path::Path::new("/usr/lib/os-release");
    start(library, "on");
    let line = selftest_line(&logs.join("blk.log"), library);
    assert!(line.contains("not denied"), "{line}");
    cli.ok(&["halt", "ws"]);

    // MICROAGENT_LANDLOCK=off: no ruleset, and doctor says so.
    start(&secret, "off");
    let blk_log = std::fs::read_to_string(logs.join("blk.log")).unwrap();
    assert!(!blk_log.contains("files only beneath"), "{blk_log}");
    let out = cli
        .command(&["--json", "doctor"])
        .env("MICROAGENT_LANDLOCK", "off")
        .output()
        .unwrap();
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let landlock = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "landlock")
        .unwrap()
        .clone();
    assert_eq!(landlock["ok"], false, "{landlock}");
    cli.ok(&["delete", "ws", "--yes", "--force"]);
}
