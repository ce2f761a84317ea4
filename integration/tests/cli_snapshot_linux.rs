//! Workspace snapshots, rollback and forks with a real Linux guest and the agent, from
//! an OCI image served by a registry on loopback: here where this host's KVM runs Linux
//! guests, otherwise inside the nested rig's L1 (see `microagent_integration::nested`).
//! The walkthrough of issue 13, end to end, with secrets and fork identity.

use microagent_integration::cli::{survivors, Cli};
use microagent_integration::nested::on_linux_kvm;
use std::fs;

const SECRET: &str = "s3cret-token-value-7f3a9c";

fn exec(cli: &Cli, name: &str, script: &str) -> String {
    cli.ok(&["exec", name, "--", "sh", "-c", script])
}

/// The secret is back at /run/secrets/token, 0400 root.
fn assert_secret(cli: &Cli, name: &str, when: &str) {
    assert_eq!(
        exec(cli, name, "cat /run/secrets/token"),
        format!("{SECRET}\n"),
        "{name} {when}"
    );
    assert_eq!(
        exec(cli, name, "stat -c '%a %u' /run/secrets/token"),
        "400 0\n",
        "{name} {when}"
    );
}

/// Where `needle` is in `haystack` (the memory file: below 3 GiB its offsets are guest
/// physical addresses).
fn occurrences(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(at, _)| at)
        .collect()
}

/// 128 bytes either side of `at` as hex and text, to tell what held a stray copy (a
/// vsock packet header, an agent frame, a page of its own).
fn context(memory: &[u8], at: usize) -> String {
    let start = at.saturating_sub(128) & !15;
    let end = (at + 128).min(memory.len());
    let mut out = format!("at {at:#x} (page offset {:#x}):\n", at & 0xfff);
    for (i, row) in memory[start..end].chunks(16).enumerate() {
        let hex: String = row.iter().map(|b| format!("{b:02x} ")).collect();
        let text: String = row
            .iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
            .collect();
        out.push_str(&format!("  {:#010x}: {hex:<48} {text}\n", start + 16 * i));
    }
    out
}

/// Runs a command that starts `name`; on failure the panic shows the workspace's logs.
fn starts(cli: &Cli, name: &str, args: &[&str]) -> String {
    let out = cli.run(args);
    if !out.status.success() {
        let dir = cli.home.join("workspaces").join(name);
        let logs: Vec<String> = ["blk.log", "vsock.log", "vmm.log", "console.log"]
            .iter()
            .map(|f| {
                let text = fs::read_to_string(dir.join(f)).unwrap_or_default();
                format!("--- {f}:\n{}", &text[text.len().saturating_sub(3000)..])
            })
            .collect();
        panic!(
            "microagent {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            logs.join("\n")
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn linux_snapshot_rollback_and_fork_walkthrough() {
    on_linux_kvm("linux_snapshot_rollback_and_fork_walkthrough", || {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (cli, _registry, image) = Cli::with_workspace_image(d);
        let _reaper = cli.reaper();
        let secret = d.join("token.txt");
        fs::write(&secret, format!("{SECRET}\n")).unwrap();

        cli.ok(&[
            "create",
            "builder",
            "--image",
            &image,
            "--memory",
            "256M",
            "--secret",
            &format!("token=@{}", secret.display()),
        ]);
        starts(&cli, "builder", &["start", "builder"]);
        assert_secret(&cli, "builder", "after start");
        exec(&cli, "builder", "echo checkpoint-1 > /root/progress.txt");
        let source_id = exec(&cli, "builder", "cat /etc/machine-id 2>/dev/null; hostname");

        // snapshot create: the exact line; the source runs on with its secret back.
        let out = cli.ok(&["snapshot", "create", "builder", "--tag", "baseline"]);
        let prefix = "snapshot baseline created (256 MiB RAM, 2 vCPU) at ";
        assert!(
            out.starts_with(prefix) && out.len() == prefix.len() + 21 && out.ends_with("Z\n"),
            "{out:?}"
        );
        assert_eq!(cli.state("builder"), "running");
        assert_secret(&cli, "builder", "after the snapshot");
        // The secret's bytes are not in the snapshot's memory.
        let memory = fs::read(
            cli.home
                .join("workspaces/builder/snapshots/baseline/vm/memory.bin"),
        )
        .unwrap();
        let found = occurrences(&memory, SECRET.as_bytes());
        assert!(
            found.is_empty(),
            "the secret is in the snapshot's memory file {} time(s):\n{}",
            found.len(),
            found
                .iter()
                .take(4)
                .map(|&at| context(&memory, at))
                .collect::<String>()
        );

        let list = cli.ok(&["snapshot", "list", "builder"]);
        let lines: Vec<&str> = list.lines().collect();
        assert_eq!(lines.len(), 2, "{list}");
        assert_eq!(lines[0], "TAG SIZE CREATED IMAGE");
        let row: Vec<&str> = lines[1].split(' ').collect();
        assert_eq!(row.len(), 4, "{list}");
        assert_eq!(row[0], "baseline");
        assert!(row[1].ends_with("iB"), "{list}");
        assert!(row[3].ends_with("test/workspace:v1"), "{list}");

        // Work after the snapshot is lost by the rollback.
        exec(
            &cli,
            "builder",
            "echo after-snapshot > /root/progress.txt && sync",
        );
        // An exec still running when the workspace goes back ends with a clear error.
        let running = cli
            .command(&["exec", "builder", "--", "sleep", "600"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_secs(1));
        cli.ok(&["halt", "builder"]);
        let ended = running.wait_with_output().unwrap();
        assert_ne!(ended.status.code(), Some(0), "{ended:?}");
        let why = String::from_utf8_lossy(&ended.stderr);
        assert!(why.starts_with("microagent: "), "{ended:?}");
        let out = starts(
            &cli,
            "builder",
            &["start", "builder", "--from-snapshot", "baseline"],
        );
        assert!(
            out.starts_with("started builder from snapshot baseline in "),
            "{out}"
        );
        assert_eq!(cli.state("builder"), "running");
        assert_eq!(
            cli.ok(&["exec", "builder", "--", "cat", "/root/progress.txt"]),
            "checkpoint-1\n"
        );
        assert_secret(&cli, "builder", "after the rollback");
        cli.fails(
            &["start", "builder", "--from-snapshot", "baseline"],
            "workspace.running",
        );

        // A fork: its own disk, name, machine-id and secret.
        let out = starts(
            &cli,
            "builder-fork",
            &[
                "create",
                "builder-fork",
                "--from-snapshot",
                "builder:baseline",
            ],
        );
        assert!(
            out.starts_with("created builder-fork from snapshot builder:baseline, running in "),
            "{out}"
        );
        assert_eq!(cli.state("builder-fork"), "running");
        assert_eq!(
            cli.ok(&["exec", "builder-fork", "--", "cat", "/root/progress.txt"]),
            "checkpoint-1\n"
        );
        exec(&cli, "builder-fork", "echo fork-only > /root/progress.txt");
        assert_eq!(
            cli.ok(&["exec", "builder-fork", "--", "cat", "/root/progress.txt"]),
            "fork-only\n"
        );
        assert_eq!(
            cli.ok(&["exec", "builder", "--", "cat", "/root/progress.txt"]),
            "checkpoint-1\n"
        );
        assert_eq!(exec(&cli, "builder-fork", "hostname"), "builder-fork\n");
        let fork_id = exec(
            &cli,
            "builder-fork",
            "cat /etc/machine-id 2>/dev/null; hostname",
        );
        let machine_id = |text: &str| text.lines().next().unwrap_or("").to_owned();
        assert_eq!(machine_id(&fork_id).len(), 32, "{fork_id:?}");
        assert_ne!(
            machine_id(&fork_id),
            machine_id(&source_id),
            "{fork_id:?} {source_id:?}"
        );
        assert_secret(&cli, "builder-fork", "after the fork");
        // Its own vsock CID, as the guest's kernel reads it after the transport reset.
        let inspect = |name: &str| -> serde_json::Value {
            serde_json::from_str(&cli.ok(&["inspect", name])).unwrap()
        };
        let (source, fork) = (inspect("builder"), inspect("builder-fork"));
        assert_eq!(source["agent"]["cid"], 3, "{source}");
        assert_ne!(fork["config"]["cid"], 3, "{fork}");
        assert_eq!(fork["agent"]["cid"], fork["config"]["cid"], "{fork}");

        // Cleanup: the source and its snapshots go; the fork runs on.
        let pids = [cli.pids("builder"), cli.pids("builder-fork")].concat();
        cli.ok(&["delete", "builder", "--yes", "--force"]);
        assert!(!cli.home.join("workspaces/builder").exists());
        assert_eq!(
            cli.ok(&["exec", "builder-fork", "--", "cat", "/root/progress.txt"]),
            "fork-only\n"
        );
        cli.ok(&["delete", "builder-fork", "--yes", "--force"]);
        assert!(
            survivors(&pids).is_empty(),
            "left running: {:?}",
            survivors(&pids)
        );
    });
}
