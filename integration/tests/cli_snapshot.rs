//! `microagent snapshot`, rollback (`start --from-snapshot`) and forks
//! (`create --from-snapshot`) on this machine: the KVM test guest as `--kernel …
//! --no-agent`, a real image from a registry on loopback, real daemons and VMM. The
//! guest's counter (`tick N` / `wait N` on its console) shows where a restored VM
//! continues; `scenario=blk_snapshot` shows which disk it reads.

use microagent_integration::cli::{alive, survivors, test_guest_create, Cli, SmallFs};
use microagent_integration::vmm::test_guest;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RUN: Duration = Duration::from_secs(60);

fn create(cli: &Cli, name: &str, image: &str, kernel: &Path, cmdline: &str) {
    let kernel = kernel.to_str().unwrap();
    cli.ok(&test_guest_create(name, image, kernel, cmdline));
}

fn console_path(cli: &Cli, name: &str) -> PathBuf {
    cli.home.join("workspaces").join(name).join("console.log")
}

fn console(cli: &Cli, name: &str) -> String {
    String::from_utf8_lossy(&fs::read(console_path(cli, name)).unwrap_or_default()).into_owned()
}

/// The numbers of every complete `WORD N` line, in order.
fn numbers(text: &str, word: &str) -> Vec<u64> {
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| l.strip_prefix(word)?.strip_prefix(' ')?.parse().ok())
        .collect()
}

/// Waits until the workspace's console (from byte `from` on) contains `needle`.
fn wait_for(cli: &Cli, name: &str, from: usize, needle: &str) -> String {
    let deadline = Instant::now() + RUN;
    loop {
        let text = console(cli, name);
        let tail = text.get(from..).unwrap_or("").to_owned();
        if tail.contains(needle) {
            return tail;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: no {needle:?} on the console; it ends with:\n{}",
            &tail[tail.len().saturating_sub(500)..]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `name` prints `word` lines past `after`; returns the new numbers.
fn counts_past(cli: &Cli, name: &str, from: usize, word: &str, after: u64) -> Vec<u64> {
    let deadline = Instant::now() + RUN;
    loop {
        let text = console(cli, name);
        let seen = numbers(text.get(from..).unwrap_or(""), word);
        if seen.last().is_some_and(|&n| n > after) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stopped counting at {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_consecutive(counts: &[u64], what: &str) {
    for pair in counts.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "{what}: the count jumped: {counts:?}");
    }
}

fn snapshot_list_json(cli: &Cli, name: &str) -> Vec<serde_json::Value> {
    let text = cli.ok(&["--json", "snapshot", "list", name]);
    serde_json::from_str::<serde_json::Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// `snapshot T created (64 MiB RAM, 1 vCPU) at 2026-06-11T08:52:44Z`, the time checked.
fn assert_created_line(out: &str, tag: &str) {
    let line = out.strip_suffix('\n').unwrap_or_else(|| panic!("{out:?}"));
    let time = line
        .strip_prefix(&format!("snapshot {tag} created (64 MiB RAM, 1 vCPU) at "))
        .unwrap_or_else(|| panic!("{line:?}"));
    let b = time.as_bytes();
    assert!(
        b.len() == 20 && b[4] == b'-' && b[10] == b'T' && b[13] == b':' && b[19] == b'Z',
        "{time:?}"
    );
}

/// Files of a workspace's snapshot directory, temporary ones included.
fn snapshot_dirs(cli: &Cli, name: &str) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(cli.home.join("workspaces").join(name).join("snapshots"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn snapshots_of_running_and_paused_workspaces_list_and_delete_with_exact_formats() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    create(&cli, "ws", &image, test_guest(), "scenario=counter");
    cli.ok(&["start", "ws"]);
    counts_past(&cli, "ws", 0, "tick", 3);

    // Running: briefly paused, snapshotted, running again and still counting.
    let out = cli.ok(&["snapshot", "create", "ws", "--tag", "baseline"]);
    assert_created_line(&out, "baseline");
    assert_eq!(cli.state("ws"), "running");
    let now = *numbers(&console(&cli, "ws"), "tick").last().unwrap();
    counts_past(&cli, "ws", 0, "tick", now + 3);

    cli.fails(
        &["snapshot", "create", "ws", "--tag", "baseline"],
        "snapshot.tag_exists",
    );
    cli.fails(
        &["snapshot", "create", "ws", "--tag", "../escape"],
        "snapshot.invalid_tag",
    );
    cli.fails(
        &["snapshot", "create", "ws", "--tag", "a:b"],
        "snapshot.invalid_tag",
    );

    // Paused: snapshotted and left paused; the default tag is the UTC time.
    cli.ok(&["pause", "ws"]);
    let out = cli.ok(&["snapshot", "create", "ws"]);
    let tag = out
        .strip_prefix("snapshot ")
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .to_owned();
    assert!(
        tag.len() == 16 && tag.starts_with("20") && tag.ends_with('Z') && tag.as_bytes()[8] == b'T',
        "{tag}"
    );
    assert_created_line(&out, &tag);
    assert_eq!(cli.state("ws"), "paused");
    cli.ok(&["resume", "ws"]);

    // list: the exact header, one row per snapshot, SIZE in human units.
    let text = cli.ok(&["snapshot", "list", "ws"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "TAG SIZE CREATED IMAGE", "{text}");
    assert_eq!(lines.len(), 3, "{text}");
    let row: Vec<&str> = lines[1].split(' ').collect();
    assert_eq!(row.len(), 4, "{text}");
    assert_eq!(row[0], "baseline");
    assert!(row[1].ends_with("iB") || row[1].ends_with('B'), "{text}");
    assert_eq!(row[3], image.as_str(), "{text}");
    assert_eq!(lines[2].split(' ').next(), Some(tag.as_str()));

    // --json: bytes, logical and allocated; the 64 MiB memory file is sparse.
    let items = snapshot_list_json(&cli, "ws");
    assert_eq!(items.len(), 2, "{items:?}");
    let logical = items[0]["logical_bytes"].as_u64().unwrap();
    let allocated = items[0]["allocated_bytes"].as_u64().unwrap();
    assert!(logical >= 64 << 20, "{items:?}");
    assert!(allocated > 0 && allocated < logical, "{items:?}");
    assert_eq!(items[0]["tag"], "baseline");
    assert_eq!(items[0]["image"], image.as_str());

    assert_eq!(cli.entry("ws")["snapshots"], 2);
    let inspect: serde_json::Value = serde_json::from_str(&cli.ok(&["inspect", "ws"])).unwrap();
    assert_eq!(inspect["snapshots"], 2);

    assert_eq!(
        cli.ok(&["snapshot", "delete", "ws", "baseline"]),
        "deleted snapshot baseline of ws\n"
    );
    cli.fails(
        &["snapshot", "delete", "ws", "baseline"],
        "snapshot.not_found",
    );
    assert_eq!(snapshot_dirs(&cli, "ws"), vec![tag.clone()]);

    // Halted: a clear refusal and nothing written.
    cli.ok(&["halt", "ws"]);
    cli.fails(
        &["snapshot", "create", "ws", "--tag", "late"],
        "workspace.not_running",
    );
    assert_eq!(snapshot_dirs(&cli, "ws"), vec![tag]);

    // Deleting the workspace removes its snapshots.
    cli.ok(&["delete", "ws", "--yes"]);
    assert!(!cli.home.join("workspaces/ws").exists());
}

#[test]
fn rollback_brings_back_the_count_and_the_disk_block_written_before_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    create(
        &cli,
        "ws",
        &image,
        test_guest(),
        "scenario=blk_snapshot blk_pattern=written-before-snapshot blk_sector=6 blk_wait=600",
    );
    cli.ok(&["start", "ws"]);
    wait_for(&cli, "ws", 0, "BLK-WRITTEN\n");
    counts_past(&cli, "ws", 0, "wait", 5);
    cli.ok(&["snapshot", "create", "ws", "--tag", "t1"]);
    // The source goes on past the snapshot, then halts.
    let at_snapshot = *numbers(&console(&cli, "ws"), "wait").last().unwrap();
    let later = counts_past(&cli, "ws", 0, "wait", at_snapshot + 20);
    cli.fails(
        &["start", "ws", "--from-snapshot", "t1"],
        "workspace.running",
    );
    cli.ok(&["halt", "ws"]);
    let halted_at = *numbers(&console(&cli, "ws"), "wait").last().unwrap();
    assert!(halted_at >= *later.last().unwrap());

    // A block written after the snapshot: the rollback must lose it.
    let disk = cli.home.join("workspaces/ws/rootfs.ext4");
    let mut bytes = fs::read(&disk).unwrap();
    bytes[6 * 512..6 * 512 + 20].copy_from_slice(b"written-after-snapsh");
    bytes[6 * 512 + 20..7 * 512].fill(0);
    fs::write(&disk, bytes).unwrap();

    cli.fails(
        &["start", "ws", "--from-snapshot", "nope"],
        "snapshot.not_found",
    );
    let from = console(&cli, "ws").len();
    let out = cli.ok(&["start", "ws", "--from-snapshot", "t1"]);
    assert!(out.starts_with("started ws from snapshot t1 in "), "{out}");
    assert_eq!(cli.state("ws"), "running");
    let tail = wait_for(&cli, "ws", from, "TEST-GUEST-DONE");
    let resumed = numbers(&tail, "wait");
    assert_consecutive(&resumed, "after rollback");
    let first = resumed[0];
    assert!(
        first <= at_snapshot + 1 && first + 5 >= at_snapshot,
        "the rollback continued at wait {first}; the snapshot was taken at about {at_snapshot} (halted at {halted_at})"
    );
    assert!(
        !tail.contains("microagent test guest: cmdline"),
        "it booted again: {tail}"
    );
    assert!(!tail.contains("BLK-WRITTEN"), "it wrote again: {tail}");
    assert!(
        tail.contains("BLK-READBACK=written-before-snapshot"),
        "the disk was not rolled back: {tail}"
    );
}

#[test]
fn forks_continue_from_the_snapshot_count_and_outlive_their_deleted_source() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    create(&cli, "src", &image, test_guest(), "scenario=counter");
    cli.ok(&["start", "src"]);
    counts_past(&cli, "src", 0, "tick", 3);
    cli.ok(&["snapshot", "create", "src", "--tag", "base"]);
    // The source is halted so that the forks have the two cores.
    cli.ok(&["halt", "src"]);
    let source_ticks = numbers(&console(&cli, "src"), "tick");

    // Eight forks at once.
    let forks = [
        "fork-1", "fork-2", "fork-3", "fork-4", "fork-5", "fork-6", "fork-7", "fork-8",
    ];
    let children: Vec<_> = forks
        .iter()
        .map(|f| {
            cli.command(&["create", f, "--from-snapshot", "src:base"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (fork, child) in forks.iter().zip(children) {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{fork}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with(&format!(
                "created {fork} from snapshot src:base, running in "
            )),
            "{text}"
        );
        assert_eq!(cli.state(fork), "running");
    }
    let mut firsts = Vec::new();
    for fork in forks {
        let ticks = counts_past(&cli, fork, 0, "tick", 0);
        let ticks = counts_past(&cli, fork, 0, "tick", ticks[0] + 3);
        assert_consecutive(&ticks, fork);
        assert!(
            !console(&cli, fork).contains("microagent test guest: cmdline"),
            "{fork} booted instead of restoring"
        );
        // The source printed the tick before the fork's first one: the same moment.
        assert!(
            source_ticks.contains(&(ticks[0] - 1)),
            "{fork} starts at {} but the source had {:?}",
            ticks[0],
            &source_ticks[source_ticks.len().saturating_sub(5)..]
        );
        firsts.push(ticks[0]);
    }
    assert!(firsts.iter().all(|&f| f == firsts[0]), "{firsts:?}");
    // Each fork has its own processes and disk.
    let pids: Vec<Vec<u32>> = forks.iter().map(|f| cli.pids(f)).collect();
    for (i, p) in pids.iter().enumerate() {
        for q in &pids[i + 1..] {
            assert!(p.iter().all(|x| !q.contains(x)), "{pids:?}");
        }
    }
    cli.fails(
        &["create", "fork-1", "--from-snapshot", "src:base"],
        "workspace.exists",
    );
    cli.fails(
        &["create", "fork-x", "--from-snapshot", "src:nope"],
        "snapshot.not_found",
    );
    cli.fails(
        &["create", "fork-x", "--from-snapshot", "src"],
        "input.bad_snapshot_ref",
    );

    // They diverge: one halted, the others go on; the source and its snapshots deleted,
    // the forks keep running.
    cli.ok(&["halt", "fork-1"]);
    cli.ok(&["delete", "src", "--yes"]);
    assert!(!cli.home.join("workspaces/src").exists());
    for fork in &forks[1..] {
        let now = *numbers(&console(&cli, fork), "tick").last().unwrap();
        counts_past(&cli, fork, 0, "tick", now + 5);
        assert_eq!(cli.state(fork), "running");
    }
    // A fork starts again on its own after the source is gone (cold boot).
    cli.ok(&["start", "fork-1"]);
    assert_eq!(cli.state("fork-1"), "running");
    let all: Vec<u32> = forks.iter().flat_map(|f| cli.pids(f)).collect();
    for fork in forks {
        cli.ok(&["delete", fork, "--yes", "--force"]);
    }
    assert_eq!(survivors(&all), Vec::<u32>::new());
    assert!(all.iter().all(|&p| !alive(p)));
}

#[test]
fn a_changed_kernel_is_refused_for_rollback_and_fork() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    let kernel = dir.path().join("kernel");
    fs::copy(test_guest(), &kernel).unwrap();
    create(&cli, "ws", &image, &kernel, "scenario=counter");
    cli.ok(&["start", "ws"]);
    counts_past(&cli, "ws", 0, "tick", 2);
    cli.ok(&["snapshot", "create", "ws", "--tag", "k"]);
    cli.ok(&["halt", "ws"]);
    let disk = cli.home.join("workspaces/ws/rootfs.ext4");
    fs::write(&disk, b"marker: not the snapshot's disk").unwrap();

    let mut bytes = fs::read(&kernel).unwrap();
    bytes.push(0);
    fs::write(&kernel, bytes).unwrap();
    let message = cli.fails(
        &["start", "ws", "--from-snapshot", "k"],
        "snapshot.kernel_mismatch",
    );
    assert!(message.contains("kernel"), "{message}");
    assert_eq!(cli.state("ws"), "halted");
    assert_eq!(
        fs::read(&disk).unwrap(),
        b"marker: not the snapshot's disk",
        "the refused rollback changed the disk"
    );
    cli.fails(
        &["create", "fork", "--from-snapshot", "ws:k"],
        "snapshot.kernel_mismatch",
    );
    assert!(!cli.home.join("workspaces/fork").exists());
    assert_eq!(cli.state("fork"), "absent");
}

#[test]
fn a_full_home_refuses_the_snapshot_leaves_nothing_and_the_workspace_running() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let small = SmallFs::mount(cli.home.clone(), "64m");
    // Dropped before the tmpfs is unmounted.
    let _reaper = cli.reaper();
    create(&cli, "ws", &image, test_guest(), "scenario=counter");
    cli.ok(&["start", "ws"]);
    counts_past(&cli, "ws", 0, "tick", 2);
    // Fill the home but for 1 MiB.
    let filler = small.fill_leaving(1 << 20);

    let message = cli.fails(
        &["snapshot", "create", "ws", "--tag", "full"],
        "snapshot.no_space",
    );
    assert!(message.contains("free"), "{message}");
    assert_eq!(snapshot_dirs(&cli, "ws"), Vec::<String>::new());
    assert_eq!(cli.state("ws"), "running");
    let now = *numbers(&console(&cli, "ws"), "tick").last().unwrap();
    counts_past(&cli, "ws", 0, "tick", now + 3);

    // With room again it works.
    fs::remove_file(&filler).unwrap();
    cli.ok(&["snapshot", "create", "ws", "--tag", "full"]);
    assert_eq!(snapshot_dirs(&cli, "ws"), vec!["full".to_owned()]);
    cli.ok(&["delete", "ws", "--yes", "--force"]);
}

#[test]
fn the_reaper_kills_workspaces_a_failing_test_leaves_running() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let reaper = cli.reaper();
    create(&cli, "ws", &image, test_guest(), "scenario=halt");
    cli.ok(&["start", "ws"]);
    let pids = cli.pids("ws");
    assert!(pids.iter().all(|&p| alive(p)));
    drop(reaper);
    assert_eq!(survivors(&pids), Vec::<u32>::new());
}

/// A fork has its own net daemon but not its source's published host ports: it starts
/// while the source still holds them, and `inspect` shows none; the source's port keeps
/// accepting.
#[test]
fn a_fork_gets_its_own_net_daemon_without_the_sources_published_ports() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    let port = microagent_integration::net_services::free_port();
    let spec = format!("127.0.0.1:{port}:80");
    let mut create = test_guest_create(
        "web",
        &image,
        test_guest().to_str().unwrap(),
        "scenario=halt",
    );
    create.extend(["--publish", &spec]);
    cli.ok(&create);
    cli.ok(&["start", "web"]);
    cli.ok(&["snapshot", "create", "web", "--tag", "base"]);
    cli.ok(&["create", "web-fork", "--from-snapshot", "web:base"]);
    assert_eq!(cli.state("web-fork"), "running");
    let source = cli.pids("web");
    let fork = cli.pids("web-fork");
    assert_eq!(fork.len(), 3, "VMM, disk and net daemons: {fork:?}");
    assert!(
        fork.iter().all(|p| !source.contains(p)),
        "{source:?} {fork:?}"
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&cli.ok(&["inspect", "web-fork"])).unwrap();
    assert_eq!(inspect["config"]["net"], "user", "{inspect}");
    assert_eq!(
        inspect["config"]["publish"],
        serde_json::json!([]),
        "{inspect}"
    );
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("the source still publishes");
    for name in ["web-fork", "web"] {
        cli.ok(&["delete", name, "--yes", "--force"]);
    }
    assert_eq!(survivors(&[source, fork].concat()), Vec::<u32>::new());
}
