//! The `microagent` workspace lifecycle with a real Linux guest and the agent, from an
//! OCI image served by a registry on loopback: here where this host's KVM runs Linux
//! guests, otherwise inside the nested rig's L1 (see `microagent_integration::nested`).

use microagent_integration::cli::{survivors, Cli};
use microagent_integration::nested::on_linux_kvm;
use std::fs;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn linux_workspace_lifecycle_through_the_cli() {
    on_linux_kvm("linux_workspace_lifecycle_through_the_cli", || {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (cli, _registry, image) = Cli::with_workspace_image(d);
        let secret = d.join("token.txt");
        fs::write(&secret, "s3cret-token-value\n").unwrap();

        cli.ok(&[
            "create",
            "ws",
            "--image",
            &image,
            "--memory",
            "256M",
            "--secret",
            &format!("token=@{}", secret.display()),
        ]);
        let started = cli.ok(&["start", "ws"]);
        assert!(started.starts_with("started ws in "), "{started}");
        assert_eq!(cli.state("ws"), "running");
        let pids = cli.pids("ws");
        assert_eq!(pids.len(), 3, "VMM, disk and vsock daemons: {pids:?}");

        // Exit statuses pass through; stdout and stderr stay apart.
        cli.ok(&[
            "exec",
            "ws",
            "--",
            "sh",
            "-c",
            "echo checkpoint-1 > /root/progress.txt",
        ]);
        assert_eq!(
            cli.ok(&["exec", "ws", "--", "cat", "/root/progress.txt"]),
            "checkpoint-1\n"
        );
        let out = cli.run(&[
            "exec",
            "ws",
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 42",
        ]);
        assert_eq!(out.status.code(), Some(42), "{out:?}");
        assert_eq!(stdout(&out), "to-out\n");
        assert_eq!(stderr(&out), "to-err\n");
        let out = cli.run(&["exec", "ws", "--", "/no/such/command"]);
        assert_eq!(out.status.code(), Some(127), "{out:?}");
        let out = cli.run(&["exec", "ws", "--", "/etc/passwd"]);
        assert_eq!(out.status.code(), Some(126), "{out:?}");
        // stdin with -i.
        let out = cli.run_with_stdin(
            &[
                "exec",
                "-i",
                "ws",
                "--",
                "sh",
                "-c",
                "wc -c; cat >/dev/null",
            ],
            &[b'x'; 100_000],
        );
        assert!(out.status.success(), "{out:?}");
        assert_eq!(stdout(&out).trim(), "100000");
        // A terminal with -t.
        let out = cli.ok(&[
            "exec",
            "-t",
            "ws",
            "--",
            "sh",
            "-c",
            "tty; [ -t 0 ] && echo is-a-tty",
        ]);
        assert!(out.contains("/dev/pts/"), "{out:?}");
        assert!(out.contains("is-a-tty"), "{out:?}");
        // The image's user and identity.
        assert_eq!(
            cli.ok(&["exec", "-u", "app", "ws", "--", "id", "-u"]),
            "1000\n"
        );
        assert_eq!(cli.ok(&["exec", "ws", "--", "hostname"]), "ws\n");

        // The secret, delivered at start: 0400, and not readable by another user.
        assert_eq!(
            cli.ok(&["exec", "ws", "--", "cat", "/run/secrets/token"]),
            "s3cret-token-value\n"
        );
        assert_eq!(
            cli.ok(&[
                "exec",
                "ws",
                "--",
                "stat",
                "-c",
                "%a %u",
                "/run/secrets/token"
            ]),
            "400 0\n"
        );
        let out = cli.run(&["exec", "-u", "app", "ws", "--", "cat", "/run/secrets/token"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(stderr(&out).contains("Permission denied"), "{out:?}");

        // Pause and resume.
        cli.ok(&["pause", "ws"]);
        assert_eq!(cli.state("ws"), "paused");
        cli.fails(&["exec", "ws", "--", "true"], "workspace.not_running");
        cli.ok(&["resume", "ws"]);
        assert_eq!(cli.state("ws"), "running");
        assert_eq!(
            cli.ok(&["exec", "ws", "--", "echo", "after-resume"]),
            "after-resume\n"
        );

        // Halt goes through the agent: the guest syncs and resets itself.
        cli.ok(&["halt", "ws"]);
        assert_eq!(cli.state("ws"), "halted");
        assert!(
            survivors(&pids).is_empty(),
            "left running: {:?}",
            survivors(&pids)
        );
        let vmm_log =
            fs::read_to_string(cli.home.join("workspaces/ws/vmm.log")).unwrap_or_default();
        assert!(
            vmm_log.contains("i8042 reset"),
            "not a guest-initiated halt:\n{vmm_log}"
        );

        // Start again: the data is still there, the secret delivered again.
        cli.ok(&["start", "ws"]);
        assert_eq!(
            cli.ok(&["exec", "ws", "--", "cat", "/root/progress.txt"]),
            "checkpoint-1\n"
        );
        assert_eq!(
            cli.ok(&["exec", "ws", "--", "cat", "/run/secrets/token"]),
            "s3cret-token-value\n"
        );
        let pids = cli.pids("ws");
        cli.ok(&["halt", "ws"]);
        cli.ok(&["delete", "ws", "--yes"]);
        assert_eq!(cli.state("ws"), "absent");
        assert!(!cli.home.join("workspaces/ws").exists());
        assert!(!cli.runtime.join("ws").exists());
        assert!(survivors(&pids).is_empty());
    });
}
