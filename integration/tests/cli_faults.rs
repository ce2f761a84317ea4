//! Faults, with nothing lost: a disk daemon killed in the middle of guest I/O, an agent
//! that takes requests and never answers, a home that fills up during a pull, an unpack
//! or a snapshot, and the CLI itself killed at each step of create, start, snapshot
//! create, rollback and fork (debug builds die at `MICROAGENT_TEST_KILL_AT=<point>`). Each test checks what
//! a user would notice: exit codes, error codes, `list`, the store, the processes left.

use microagent_agent_protocol::frame::{read_frame, write_control};
use microagent_agent_protocol::message::AgentMessage;
use microagent_agent_protocol::PROTOCOL_VERSION;
use microagent_cli::kill_point::{KILL_AT_ENV, POINTS};
use microagent_cli::runtime::IO_TIMEOUT_ENV;
use microagent_integration::cli::{processes_under, survivors, test_guest_create, Cli, SmallFs};
use microagent_integration::flaky_proxy::{FlakyProxy, Mode};
use microagent_integration::fuse::StoppableMount;
use microagent_integration::process::ChildGuard;
use microagent_integration::registry::Registry;
use microagent_integration::registry_push::push_large_image;
use microagent_integration::vmm::test_guest;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn create_args<'a>(name: &'a str, image: &'a str, cmdline: &'a str) -> Vec<&'a str> {
    let mut args = test_guest_create(name, image, test_guest().to_str().unwrap(), cmdline);
    args.extend(["--net", "none"]);
    args
}

fn console(cli: &Cli, name: &str) -> String {
    let path = cli.home.join("workspaces").join(name).join("console.log");
    String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned()
}

/// Waits until the console shows `needle`; returns the console.
fn wait_console(cli: &Cli, name: &str, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = console(cli, name);
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} on {name}'s console:\n{text}\n{}",
            cli.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Names in `dir` (sorted), hidden ones included.
fn names(dir: &Path) -> Vec<String> {
    let mut all: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    all.sort();
    all
}

/// Runs `args` in a debug build told to die at `point`, and checks that it did.
fn killed_at(cli: &Cli, point: &str, args: &[&str]) {
    let out = cli
        .command(args)
        .env(KILL_AT_ENV, point)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "microagent {args:?} did not die at {point}: {out:?}"
    );
}

#[test]
fn a_blk_daemon_killed_mid_io_fails_the_guests_disk_keeps_every_acknowledged_write_and_delete_cleans_up(
) {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    const BASE: u64 = 2048;
    cli.ok(&create_args(
        "ws",
        &image,
        &format!("scenario=blk_loop blk_sector={BASE}"),
    ));
    cli.ok(&["start", "ws"]);
    let pids = cli.pids("ws");
    let disk = cli.home.join("workspaces/ws/rootfs.ext4");
    let size = fs::metadata(&disk).unwrap().len();
    wait_console(&cli, "ws", "blk-io 20 ", Duration::from_secs(60));
    // SAFETY: SIGKILL to the blk daemon this test started through the CLI (pids[1]).
    unsafe { libc::kill(pids[1] as i32, libc::SIGKILL) };

    // The guest sees its device fail instead of waiting forever.
    let text = wait_console(&cli, "ws", "BLK-ERROR", Duration::from_secs(60));
    let acknowledged: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("blk-io ")?.split(' ').next()?.parse().ok())
        .collect();
    assert!(acknowledged.len() > 20, "{text}");
    assert!(
        text.lines()
            .filter(|l| l.starts_with("blk-io "))
            .all(|l| l.ends_with(" status=0")),
        "a write failed before the kill:\n{text}"
    );
    let state = cli.entry("ws")["state"].clone();
    assert_eq!(state["state"], "crashed", "{state}");
    assert!(
        state["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("microagent-vhost-blk (pid {}) is gone", pids[1])),
        "{state}"
    );
    cli.fails(&["exec", "ws", "--", "true"], "workspace.crashed");

    // Every write the guest saw completed is on the disk, whole; the file kept its size.
    let data = fs::read(&disk).unwrap();
    assert_eq!(data.len() as u64, size);
    for n in &acknowledged {
        let at = ((BASE + n) * 512) as usize;
        let want = format!("blkloop {n}");
        let sector = &data[at..at + 512];
        assert_eq!(
            &sector[..want.len()],
            want.as_bytes(),
            "sector {}",
            BASE + n
        );
        assert!(
            sector[want.len()..].iter().all(|&b| b == 0),
            "sector {} has more than its record",
            BASE + n
        );
    }

    cli.ok(&["delete", "ws", "--yes"]);
    assert_eq!(survivors(&pids), Vec::<u32>::new());
    assert_eq!(processes_under(&cli.runtime), Vec::new());
    assert!(!cli.home.join("workspaces/ws").exists());
}

/// A disk that stops answering, as on a hung network filesystem (the workspace's image on
/// a FUSE mount whose server is stopped): after `MICROAGENT_IO_TIMEOUT` the disk daemon
/// gives up, the guest sees its device fail instead of waiting forever, and the
/// workspace is crashed with the daemon's logged reason.
#[test]
fn a_disk_that_stops_answering_fails_the_guests_disk_and_the_workspace_says_why() {
    if !StoppableMount::available(
        "a_disk_that_stops_answering_fails_the_guests_disk_and_the_workspace_says_why",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    cli.ok(&create_args(
        "ws",
        &image,
        "scenario=blk_loop blk_sector=2048",
    ));
    let (src, mnt) = (dir.path().join("fuse-src"), dir.path().join("fuse-mnt"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    let rootfs = cli.home.join("workspaces/ws/rootfs.ext4");
    fs::rename(&rootfs, src.join("rootfs.ext4")).unwrap();
    let mount = StoppableMount::new(&src, &mnt);
    std::os::unix::fs::symlink(mnt.join("rootfs.ext4"), &rootfs).unwrap();
    let start = cli
        .command(&["start", "ws"])
        .env(IO_TIMEOUT_ENV, "2")
        .output()
        .unwrap();
    assert!(start.status.success(), "{start:?}\n{}", cli.logs());
    let pids = cli.pids("ws");
    wait_console(&cli, "ws", "blk-io 20 ", Duration::from_secs(60));

    mount.stop();
    wait_console(&cli, "ws", "BLK-ERROR", Duration::from_secs(30));
    // The daemon drops its frontend before it logs why, so the reason may lag a little
    // behind the guest's error. It counts as gone once it is exiting (its cmdline reads
    // empty), though its exit waits for the filesystem.
    let deadline = Instant::now() + Duration::from_secs(10);
    let state = loop {
        let state = cli.entry("ws")["state"].clone();
        let reason = state["reason"].as_str().unwrap_or_default();
        let explained = reason.contains("microagent-vhost-blk (pid ")
            && reason.contains("its last logged error: queue 0: I/O on")
            && reason.contains("has not completed in");
        if explained || Instant::now() > deadline {
            break state;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(state["state"], "crashed", "{state}");
    assert!(
        state["reason"]
            .as_str()
            .unwrap()
            .contains("its last logged error: queue 0: I/O on"),
        "{state}"
    );
    cli.fails(&["exec", "ws", "--", "true"], "workspace.crashed");

    mount.resume();
    cli.ok(&["delete", "ws", "--yes"]);
    assert_eq!(survivors(&pids), Vec::<u32>::new());
    assert!(!cli.home.join("workspaces/ws").exists());
}

/// Plays the start of an agent's connection on `stream`: the daemon's `OK` to a CONNECT
/// line, then the version check, naming itself `agent`. Returns the read and write sides.
fn agent_handshake(
    stream: &UnixStream,
    agent: &str,
) -> std::io::Result<(BufReader<UnixStream>, UnixStream)> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("CONNECT ") {
        return Err(std::io::Error::other(format!(
            "not a CONNECT line: {line:?}"
        )));
    }
    let mut writer = stream.try_clone()?;
    writer.write_all(b"OK 1024\n")?;
    read_frame(&mut reader).map_err(std::io::Error::other)?; // Hello
    let hello = AgentMessage::Hello {
        version: PROTOCOL_VERSION,
        agent: agent.into(),
        cid: Some(3),
    };
    write_control(&mut writer, &hello).map_err(std::io::Error::other)?;
    Ok((reader, writer))
}

/// Stands in for an agent that is hung: it takes the connection and the version check
/// (the guest was fine a moment ago), then reads requests and never answers.
fn silent_agent(socket: &Path) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(4) {
            let Ok(stream) = stream else { return };
            if agent_handshake(&stream, "hung").is_ok() {
                held.push(stream);
            }
        }
    })
}

#[test]
fn an_agent_that_takes_a_request_and_never_answers_fails_exec_with_agent_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    cli.ok(&create_args("ws", &image, "scenario=halt"));
    cli.ok(&["start", "ws"]);
    let _agent = silent_agent(&cli.runtime.join("ws/agent.vsock"));
    let started = Instant::now();
    let message = cli.fails(&["exec", "ws", "--", "true"], "agent.timeout");
    let took = started.elapsed();
    assert!(message.contains("did not answer within"), "{message}");
    assert!(
        took < Duration::from_secs(60),
        "exec took {took:?} to give up"
    );
    // The workspace itself is not harmed: it halts.
    cli.ok(&["halt", "ws"]);
    assert_eq!(cli.state("ws"), "halted");
}

/// Plays an agent on `socket` that starts one command, then stops answering anything:
/// the connection stays open and silent, and no new connection is taken (as a guest
/// whose kernel or vsock transport stopped). Says on `started` when the command started.
fn agent_that_hangs_mid_command(
    socket: &Path,
    started: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        drop(listener); // new connections are refused from here on
        let (mut reader, mut writer) = agent_handshake(&stream, "hangs").unwrap();
        read_frame(&mut reader).unwrap(); // Exec
        write_control(&mut writer, &AgentMessage::Started { pid: 1 }).unwrap();
        started.send(()).unwrap();
        // Silent until the host gives up and closes.
        while read_frame(&mut reader).is_ok() {}
    })
}

/// A command's output may pause for as long as it likes, but a guest that stops while it
/// runs used to leave `exec` waiting for ever. While the command is silent the agent is
/// probed on a new connection (here every 2 s, `MICROAGENT_EXEC_PROBE_INTERVAL=2`), and
/// 3 failures in a row end `exec` with `agent.timeout`; except while the workspace is
/// paused by its user, when the command waits.
#[test]
fn an_agent_that_stops_answering_while_a_command_runs_fails_exec_with_agent_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    cli.ok(&create_args("ws", &image, "scenario=halt"));
    cli.ok(&["start", "ws"]);
    let (started, command_started) = std::sync::mpsc::channel();
    let agent = agent_that_hangs_mid_command(&cli.runtime.join("ws/agent.vsock"), started);
    let mut exec = ChildGuard::spawn(
        cli.command(&["--json", "exec", "ws", "--", "sleep", "600"])
            .env("MICROAGENT_EXEC_PROBE_INTERVAL", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .unwrap();
    command_started
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("exec never started its command: {e}\n{}", cli.logs()));
    // Paused for 5 probe intervals: the guest is not probed, the command waits.
    cli.ok(&["pause", "ws"]);
    std::thread::sleep(Duration::from_secs(10));
    assert!(
        exec.try_status().unwrap().is_none(),
        "exec gave up on a paused workspace"
    );
    cli.ok(&["resume", "ws"]);
    let resumed = Instant::now();
    exec.wait_timeout(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", cli.logs()));
    let took = resumed.elapsed();
    let out = exec.into_output().unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"]["code"], "agent.timeout", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("stopped answering while the command ran"),
        "{message}"
    );
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(30)).contains(&took),
        "exec took {took:?} after the resume to give up"
    );
    agent.join().unwrap();
    cli.ok(&["halt", "ws"]);
    assert_eq!(cli.state("ws"), "halted");
}

/// A probe interval that is not a whole number of seconds above 0 is refused, before
/// anything else is looked at.
#[test]
fn a_bad_exec_probe_interval_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    cli.ok(&create_args("ws", &image, "scenario=halt"));
    for bad in ["0", "ten", "-1"] {
        let out = cli
            .command(&["--json", "exec", "ws", "--", "true"])
            .env("MICROAGENT_EXEC_PROBE_INTERVAL", bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125), "{bad}: {out:?}");
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(reply["error"]["code"], "input.bad_env", "{bad}: {reply}");
    }
}

#[test]
fn a_create_killed_at_each_step_leaves_no_workspace_and_the_next_create_sweeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let workspaces = cli.home.join("workspaces");
    for point in POINTS.iter().filter(|p| p.starts_with("create.")) {
        let name = format!("ws-{}", point.replace(['.', '_'], "-"));
        killed_at(&cli, point, &create_args(&name, &image, "scenario=halt"));
        assert_eq!(cli.state(&name), "absent", "{point}");
        // Another create sweeps what the killed one left, and works.
        cli.ok(&create_args("other", &image, "scenario=halt"));
        let half: Vec<String> = names(&workspaces)
            .into_iter()
            .filter(|n| n.starts_with(".creating-"))
            .collect();
        assert_eq!(half, Vec::<String>::new(), "{point}");
        cli.ok(&create_args(&name, &image, "scenario=halt"));
        assert_eq!(cli.state(&name), "created");
        cli.ok(&["delete", &name, "--yes"]);
        cli.ok(&["delete", "other", "--yes"]);
    }
    // The image store kept no temporary files either.
    let leftovers: Vec<String> = names(&cli.home.join("images/rootfs"))
        .into_iter()
        .chain(names(&cli.home.join("images/blobs/sha256")))
        .filter(|n| n.starts_with('.'))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new());
}

#[test]
fn a_start_killed_at_each_step_leaves_no_orphan_once_started_again_or_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    for point in POINTS.iter().filter(|p| p.starts_with("start.")) {
        cli.ok(&create_args("ws", &image, "scenario=halt"));
        killed_at(&cli, point, &["start", "ws"]);
        if *point == "start.vmm_spawned" {
            // Everything was started: the VMM comes up on its own.
            let api = cli.runtime.join("ws/api.sock");
            let deadline = Instant::now() + Duration::from_secs(30);
            while !api.exists() {
                assert!(Instant::now() < deadline, "the VMM never came up");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let left = processes_under(&cli.runtime);
        assert!(!left.is_empty(), "{point}: nothing was started");
        let state = cli.entry("ws")["state"].clone();
        assert_ne!(state["state"], "created", "{point}: {left:?} runs unseen");

        // Started again: the new processes only, none of the old. A start killed once
        // the VMM runs has started it: it halts like any running workspace.
        if state["state"] == "running" {
            cli.fails(&["start", "ws"], "workspace.running");
            cli.ok(&["halt", "ws"]);
        }
        cli.ok(&["start", "ws"]);
        assert_eq!(cli.state("ws"), "running", "{point}");
        let old: Vec<u32> = left.iter().map(|(p, _)| *p).collect();
        assert_eq!(survivors(&old), Vec::<u32>::new(), "{point}: {left:?}");
        assert_eq!(processes_under(&cli.runtime).len(), 2, "{point}");
        cli.ok(&["delete", "ws", "--yes", "--force"]);

        // Killed again, then deleted: nothing survives.
        cli.ok(&create_args("ws", &image, "scenario=halt"));
        killed_at(&cli, point, &["start", "ws"]);
        cli.ok(&["delete", "ws", "--yes", "--force"]);
        assert_eq!(processes_under(&cli.runtime), Vec::new(), "{point}");
        assert!(!cli.runtime.join("ws").exists(), "{point}");
    }
}

#[test]
fn a_snapshot_killed_at_each_step_leaves_no_half_snapshot_and_the_next_one_resumes_the_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    cli.ok(&create_args("ws", &image, "scenario=counter"));
    cli.ok(&["start", "ws"]);
    let snapshots = cli.home.join("workspaces/ws/snapshots");
    let mut kept = Vec::new();
    for point in POINTS.iter().filter(|p| p.starts_with("snapshot.")) {
        let tag = format!("t-{}", point.replace(['.', '_'], "-"));
        killed_at(&cli, point, &["snapshot", "create", "ws", "--tag", &tag]);
        let list: serde_json::Value =
            serde_json::from_str(&cli.ok(&["--json", "snapshot", "list", "ws"])).unwrap();
        assert_eq!(
            list.as_array().unwrap().len(),
            kept.len(),
            "{point}: {list}"
        );
        // The next snapshot sweeps the half one and puts the VM back to running.
        let next = format!("ok-{}", point.replace(['.', '_'], "-"));
        cli.ok(&["snapshot", "create", "ws", "--tag", &next]);
        kept.push(next);
        assert_eq!(cli.state("ws"), "running", "{point}: left paused");
        let mut want = kept.clone();
        want.sort();
        assert_eq!(names(&snapshots), want, "{point}");
        // And the guest really runs: its counter moves.
        let before = console(&cli, "ws").len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while console(&cli, "ws")[before..].matches("tick").count() < 3 {
            assert!(Instant::now() < deadline, "{point}: the guest does not run");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(!cli.runtime.join("ws/snapshot-interrupted").exists());
    cli.ok(&["delete", "ws", "--yes", "--force"]);
}

fn sha256_of(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(fs::read(path).unwrap()))
}

/// A rollback killed before its disk copy replaced the workspace's leaves the workspace's
/// own disk, byte for byte; killed after, the snapshot's. Either way the workspace is
/// halted, not crashed, the next start sweeps the copy, and the rollback run again works.
#[test]
fn a_rollback_killed_at_each_step_leaves_a_whole_disk_and_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    cli.ok(&create_args("ws", &image, "scenario=counter"));
    cli.ok(&["start", "ws"]);
    cli.ok(&["snapshot", "create", "ws", "--tag", "t1"]);
    let ws = cli.home.join("workspaces/ws");
    let snapshot_disk = fs::read_dir(ws.join("snapshots/t1"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "ext4"))
        .expect("the snapshot keeps a disk");
    let restoring = ws.join(".rootfs.restoring");
    for point in POINTS.iter().filter(|p| p.starts_with("rollback.")) {
        cli.ok(&["halt", "ws"]);
        // The workspace's disk differs from the snapshot's from here on.
        let disk = ws.join("rootfs.ext4");
        let mut bytes = fs::read(&disk).unwrap();
        bytes[6 * 512..6 * 512 + 16].copy_from_slice(b"after-snapshot!!");
        fs::write(&disk, bytes).unwrap();
        let own = sha256_of(&disk);

        killed_at(&cli, point, &["start", "ws", "--from-snapshot", "t1"]);
        assert_eq!(cli.state("ws"), "halted", "{point}");
        let want = if *point == "rollback.disk_copied" {
            assert!(restoring.exists(), "{point}: the copy was not left");
            own
        } else {
            sha256_of(&snapshot_disk)
        };
        assert_eq!(sha256_of(&disk), want, "{point}: the disk is not whole");
        assert_eq!(processes_under(&cli.runtime), Vec::new(), "{point}");

        cli.ok(&["start", "ws", "--from-snapshot", "t1"]);
        assert_eq!(cli.state("ws"), "running", "{point}");
        assert!(!restoring.exists(), "{point}: the copy is still there");
    }
    // A plain start sweeps a copy left behind too.
    cli.ok(&["halt", "ws"]);
    killed_at(
        &cli,
        "rollback.disk_copied",
        &["start", "ws", "--from-snapshot", "t1"],
    );
    cli.ok(&["start", "ws"]);
    assert!(!restoring.exists(), "start left the rollback's copy");
    cli.ok(&["delete", "ws", "--yes", "--force"]);
}

/// A fork killed while its directory was still being built leaves no workspace; killed
/// once it was in place but before it ran, it is listed as crashed with the reason, a
/// start refuses it (its disk booted afresh would be a workspace nobody asked for), and
/// the same fork run again replaces it, stopping whatever the killed one had started;
/// `delete` removes it whole. The snapshot it came from is untouched throughout.
#[test]
fn a_fork_killed_at_each_step_is_absent_or_redone_by_the_same_command() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    cli.ok(&create_args("src", &image, "scenario=counter"));
    cli.ok(&["start", "src"]);
    cli.ok(&["snapshot", "create", "src", "--tag", "base"]);
    cli.ok(&["halt", "src"]);
    let fork = ["create", "f1", "--from-snapshot", "src:base"];
    let workspaces = cli.home.join("workspaces");
    for point in POINTS.iter().filter(|p| p.starts_with("fork.")) {
        killed_at(&cli, point, &fork);
        let left = processes_under(&cli.runtime);
        if *point == "fork.disk_copied" {
            assert_eq!(cli.state("f1"), "absent", "{point}");
            assert!(left.is_empty(), "{point}: {left:?}");
        } else {
            let entry = cli.entry("f1");
            assert_eq!(entry["state"]["state"], "crashed", "{point}: {entry}");
            let reason = entry["state"]["reason"].as_str().unwrap_or_default();
            assert!(reason.contains("fork"), "{point}: {reason}");
            assert_eq!(
                left.is_empty(),
                *point == "fork.in_place",
                "{point}: {left:?}"
            );
            cli.fails(&["start", "f1"], "workspace.fork_interrupted");
        }

        let out = cli.ok(&fork);
        assert!(
            out.starts_with("created f1 from snapshot src:base"),
            "{point}: {out}"
        );
        assert_eq!(cli.state("f1"), "running", "{point}");
        let old: Vec<u32> = left.iter().map(|(p, _)| *p).collect();
        assert_eq!(survivors(&old), Vec::<u32>::new(), "{point}: {left:?}");
        let hidden: Vec<String> = names(&workspaces)
            .into_iter()
            .filter(|n| n.starts_with(".creating-"))
            .collect();
        assert_eq!(hidden, Vec::<String>::new(), "{point}");
        assert!(!workspaces.join("f1/fork-pending").exists(), "{point}");
        // The fork runs on from the snapshot's count.
        let before = console(&cli, "f1").len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while console(&cli, "f1")[before..].matches("tick").count() < 3 {
            assert!(Instant::now() < deadline, "{point}: the fork does not run");
            std::thread::sleep(Duration::from_millis(50));
        }
        cli.ok(&["delete", "f1", "--yes", "--force"]);

        // Killed again, then deleted: nothing survives.
        killed_at(&cli, point, &fork);
        if *point != "fork.disk_copied" {
            cli.ok(&["delete", "f1", "--yes"]);
        }
        assert_eq!(cli.state("f1"), "absent", "{point}");
        assert_eq!(processes_under(&cli.runtime), Vec::new(), "{point}");
    }
    assert_eq!(cli.state("src"), "halted");
}

#[test]
fn a_snapshot_that_fills_the_home_while_writing_fails_with_no_space_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let small = SmallFs::mount(cli.home.clone(), "96m");
    let _reaper = cli.reaper();
    cli.ok(&create_args("ws", &image, "scenario=counter"));
    // In the runtime directory: the VMM may write nothing outside it and the snapshots.
    let gate = cli.runtime.join("ws/snapshot-gate");
    // The VMM holds the snapshot after the preflight (there was room) with its rings
    // stopped until the gate goes: the home fills up meanwhile.
    let start = cli
        .command(&["start", "ws"])
        .env("MICROAGENT_TEST_SNAPSHOT_GATE", &gate)
        .output()
        .unwrap();
    assert!(start.status.success(), "{start:?}");
    let snapshot = ChildGuard::spawn(
        cli.command(&["--json", "snapshot", "create", "ws", "--tag", "full"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !gate.exists() {
        assert!(Instant::now() < deadline, "the VMM never reached the gate");
        std::thread::sleep(Duration::from_millis(10));
    }
    let filler = small.fill_leaving(256 << 10);
    fs::remove_file(&gate).unwrap();
    let out = snapshot.into_output().unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"]["code"], "snapshot.no_space", "{reply}");
    assert_eq!(
        names(&cli.home.join("workspaces/ws/snapshots")),
        Vec::<String>::new()
    );
    assert_eq!(cli.state("ws"), "running");

    fs::remove_file(&filler).unwrap();
    cli.ok(&["snapshot", "create", "ws", "--tag", "full"]);
    assert_eq!(
        names(&cli.home.join("workspaces/ws/snapshots")),
        ["full".to_owned()]
    );
    cli.ok(&["delete", "ws", "--yes", "--force"]);
}

/// What `image list --json` lists.
fn images(cli: &Cli) -> serde_json::Value {
    serde_json::from_str(&cli.ok(&["--json", "image", "list"])).unwrap()
}

/// Hidden (temporary) names anywhere under the store.
fn store_leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            found.push(entry.path().display().to_string());
        }
        if entry.path().is_dir() {
            found.extend(store_leftovers(&entry.path()));
        }
    }
    found
}

#[test]
fn a_pull_into_a_full_home_fails_with_no_space_leaves_no_half_blob_and_works_once_freed() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let reference = push_large_image(dir.path(), &registry, "test/big", 24 << 20).reference;
    let cli = Cli::new(dir.path());
    let small = SmallFs::mount(cli.home.clone(), "64m");
    let before = images(&cli);
    let filler = small.fill_leaving(12 << 20);
    let message = cli.fails(&["image", "pull", &reference], "image.no_space");
    assert!(message.contains("free"), "{message}");
    assert_eq!(images(&cli), before);
    assert_eq!(
        store_leftovers(&cli.home.join("images")),
        Vec::<String>::new()
    );

    fs::remove_file(&filler).unwrap();
    cli.ok(&["image", "pull", &reference]);
    assert_eq!(images(&cli).as_array().unwrap().len(), 1);
}

#[test]
fn a_pull_that_fills_the_home_midway_fails_with_no_space_and_keeps_no_half_blob() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let image = push_large_image(dir.path(), &registry, "test/big", 24 << 20);
    let proxy = FlakyProxy::start(&registry.addr);
    let reference = image.reference.replace(&registry.addr, &proxy.addr);
    let cli = Cli::new(dir.path());
    let small = SmallFs::mount(cli.home.clone(), "64m");
    // The preflight sees room; after 1 MiB of the layer the proxy holds the download
    // while the home fills up, then sends the rest.
    let gate = dir.path().join("hold");
    fs::write(&gate, b"").unwrap();
    proxy.set_mode(Mode::Hold {
        digest: image.layer.digest.clone(),
        after: 1 << 20,
        until_gone: gate.clone(),
    });
    let pull = ChildGuard::spawn(
        cli.command(&["--json", "image", "pull", &reference])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .unwrap();
    let partial = cli
        .home
        .join("images/blobs/sha256")
        .join(format!(".partial-{}", &image.layer.digest[7..]));
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::metadata(&partial).map_or(0, |m| m.len()) < 1 << 20 {
        assert!(
            Instant::now() < deadline,
            "the layer's first MiB never arrived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let filler = small.fill_leaving(256 << 10);
    fs::remove_file(&gate).unwrap();
    let out = pull.into_output().unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"]["code"], "image.no_space", "{reply}");
    assert_eq!(images(&cli), serde_json::json!([]));
    assert_eq!(
        store_leftovers(&cli.home.join("images")),
        Vec::<String>::new()
    );

    fs::remove_file(&filler).unwrap();
    proxy.set_mode(Mode::Pass);
    cli.ok(&["image", "pull", &reference]);
    assert_eq!(images(&cli).as_array().unwrap().len(), 1);
}

#[test]
fn an_unpack_into_a_full_home_fails_with_a_code_leaves_no_tree_or_disk_and_works_once_freed() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    // A layer of 12 MiB that does not compress: the blob fits, its tree does not.
    let reference = push_large_image(dir.path(), &registry, "test/wide", 12 << 20).reference;
    let cli = Cli::new(dir.path());
    let small = SmallFs::mount(cli.home.clone(), "64m");
    cli.ok(&["image", "pull", &reference]);
    let filler = small.fill_leaving(16 << 20);
    let kernel = test_guest();
    let create = [
        "create",
        "ws",
        "--image",
        &reference,
        "--no-agent",
        "--net",
        "none",
        "--kernel",
        kernel.to_str().unwrap(),
    ];
    let out = cli.run(&[&["--json"][..], &create].concat());
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"]["code"], "image.no_space", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("free space"), "{message}");
    assert_eq!(cli.state("ws"), "absent");
    assert_eq!(
        store_leftovers(&cli.home.join("images")),
        Vec::<String>::new()
    );
    assert_eq!(names(&cli.home.join("images/rootfs")), Vec::<String>::new());

    fs::remove_file(&filler).unwrap();
    cli.ok(&create);
    assert_eq!(cli.state("ws"), "created");
}
