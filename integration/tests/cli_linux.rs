//! The `microagent` workspace lifecycle with a real Linux guest and the agent, from an
//! OCI image served by a registry on loopback: here where this host's KVM runs Linux
//! guests, otherwise inside the nested rig's L1 (see `microagent_integration::nested`).

use microagent_integration::cli::{survivors, Cli};
use microagent_integration::nested::on_linux_kvm;
use microagent_integration::net_services::{
    dns_server, free_port, http_server, pattern, sha256_hex,
};
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

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
        assert_eq!(pids.len(), 4, "VMM, disk, vsock and net daemons: {pids:?}");

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
        // `shell`: /bin/sh on a terminal, reading what the user types, its exit status
        // passed through.
        let out = cli.run_with_stdin(
            &["shell", "ws"],
            b"[ -t 0 ] && echo shell-on-a-tty TERM=$TERM\nexit 3\n",
        );
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        assert!(
            stdout(&out).contains("shell-on-a-tty TERM=xterm-256color"),
            "{out:?}"
        );
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
        let logs_before_halt = cli.logs();
        let halting = Instant::now();
        let halt = cli.run(&["halt", "ws"]);
        let halt_took = halting.elapsed();
        eprintln!("halt took {halt_took:?}");
        assert!(halt.status.success(), "{halt:?}\n{logs_before_halt}");
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
            "not a guest-initiated halt (took {halt_took:?}; stderr: {}):\n{vmm_log}\n\
             logs before the halt:\n{logs_before_halt}\nafter:\n{}",
            stderr(&halt),
            cli.logs()
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

/// Fetches `http://files.test:PORT/` in the workspace (the name resolved through
/// 10.0.2.3, forwarded to the test's DNS server) and returns the sha256 of the file.
fn fetch_by_name(cli: &Cli, name: &str, port: u16) -> String {
    let script = format!(
        "wget -q -O /tmp/blob http://files.test:{port}/ && sha256sum /tmp/blob && rm /tmp/blob"
    );
    let out = cli.ok(&["exec", name, "--", "sh", "-c", &script]);
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// The default network end to end: the guest is 10.0.2.15, resolves a name through
/// 10.0.2.3 and fetches a file from an HTTP server on the host's loopback (10.0.2.2);
/// a --publish'ed host port reaches a server in the guest; two forks of one snapshot
/// (same guest IP, each its own MAC and daemon) fetch at the same time.
#[test]
fn linux_workspace_default_network_fetches_by_name_publishes_and_forks() {
    on_linux_kvm(
        "linux_workspace_default_network_fetches_by_name_publishes_and_forks",
        || {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let (cli, _registry, image) = Cli::with_workspace_image(d);
            let _reaper = cli.reaper();
            let blob = pattern(4 << 20);
            let want = sha256_hex(&blob);
            let http = http_server(blob);
            let dns = dns_server("files.test", Ipv4Addr::new(10, 0, 2, 2));
            let published = free_port();
            cli.ok(&[
                "create",
                "ws",
                "--image",
                &image,
                "--memory",
                "256M",
                "--dns",
                &dns.to_string(),
                "--publish",
                &format!("127.0.0.1:{published}:8080"),
            ]);
            cli.ok(&["start", "ws"]);
            let pids = cli.pids("ws");
            assert_eq!(pids.len(), 4, "VMM, disk, vsock and net daemons: {pids:?}");
            let addr = cli.ok(&["exec", "ws", "--", "ip", "-4", "addr"]);
            assert!(addr.contains("10.0.2.15/24"), "{addr}");
            assert_eq!(fetch_by_name(&cli, "ws", http.port()), want);

            // Inbound: a one-shot server in the guest, reached through the host port.
            let server = {
                let cli = Cli::new(d);
                std::thread::spawn(move || {
                    cli.run(&[
                        "exec",
                        "ws",
                        "--",
                        "sh",
                        "-c",
                        "echo hello-from-guest | nc -l -p 8080",
                    ])
                })
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            let greeting = loop {
                let mut got = String::new();
                if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", published)) {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = stream.read_to_string(&mut got);
                }
                if got.contains("hello-from-guest") || Instant::now() > deadline {
                    break got;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            assert_eq!(greeting.trim(), "hello-from-guest");
            let served = server.join().unwrap();
            assert!(served.status.success(), "{served:?}");

            // Forks: identical guest addresses, each behind its own daemon.
            cli.ok(&["snapshot", "create", "ws", "--tag", "net"]);
            cli.ok(&["create", "f1", "--from-snapshot", "ws:net"]);
            cli.ok(&["create", "f2", "--from-snapshot", "ws:net"]);
            // Both forks resumed one kernel CRNG state, yet their random values must
            // differ (tokens, keys, temp names made in forks must not repeat). The agent
            // reseeds each fork with the host's entropy; with that reseed taken out this
            // still passed once (the kernel reseeds from the interrupt timings after the
            // restore), so it guards the property, not the agent's reseed alone.
            // (A random UUID is 122 bits from the kernel's CRNG.)
            let random =
                |name: &str| cli.ok(&["exec", name, "--", "cat", "/proc/sys/kernel/random/uuid"]);
            let (r1, r2) = (random("f1"), random("f2"));
            assert_eq!(r1.trim().len(), 36, "{r1:?}");
            assert_ne!(
                r1, r2,
                "two forks of one snapshot drew the same random UUID"
            );
            let fetches: Vec<_> = ["f1", "f2"]
                .into_iter()
                .map(|fork| {
                    let cli = Cli::new(d);
                    let port = http.port();
                    std::thread::spawn(move || fetch_by_name(&cli, fork, port))
                })
                .collect();
            for fetched in fetches {
                assert_eq!(fetched.join().unwrap(), want);
            }
            // Each fork has its own MAC, set by the agent, and its traffic still flows
            // (the fetches above ran after it changed).
            let mac =
                |name: &str| cli.ok(&["exec", name, "--", "cat", "/sys/class/net/eth0/address"]);
            let macs = [mac("ws"), mac("f1"), mac("f2")];
            assert_eq!(macs[0], "52:54:00:12:34:56\n");
            assert!(
                macs[1] != macs[0] && macs[2] != macs[0] && macs[1] != macs[2],
                "{macs:?}"
            );
            for (name, mac) in ["f1", "f2"].iter().zip(&macs[1..]) {
                let config: serde_json::Value =
                    serde_json::from_str(&cli.ok(&["inspect", name])).unwrap();
                assert_eq!(
                    config["config"]["mac"].as_str(),
                    Some(mac.trim()),
                    "{config}"
                );
            }
            let fork: serde_json::Value =
                serde_json::from_str(&cli.ok(&["inspect", "f1"])).unwrap();
            assert_eq!(fork["config"]["publish"], serde_json::json!([]), "{fork}");
            for name in ["f1", "f2", "ws"] {
                cli.ok(&["delete", name, "--yes", "--force"]);
            }
            assert!(survivors(&pids).is_empty(), "{:?}", survivors(&pids));
        },
    );
}
