//! The `microagent` lifecycle on this machine: the KVM test guest as `--kernel …
//! --no-agent`, a real image from a registry on loopback, real daemons and VMM.

use microagent_integration::cli::{alive, survivors, test_guest_create, Cli};
use microagent_integration::net_services::{free_port, free_udp_port};
use microagent_integration::registry::write_layout;
use microagent_integration::vmm::test_guest;
use std::path::Path;
use std::process::Stdio;

fn create(cli: &Cli, name: &str, image: &str) {
    create_running(cli, name, image, "scenario=halt");
}

/// A workspace whose test guest runs `cmdline` (a `scenario=`).
fn create_running(cli: &Cli, name: &str, image: &str, cmdline: &str) {
    let kernel = test_guest().to_str().unwrap();
    cli.ok(&test_guest_create(name, image, kernel, cmdline));
}

#[test]
fn lifecycle_create_start_pause_resume_halt_start_delete_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    create(&cli, "ws1", &image);
    assert_eq!(cli.state("ws1"), "created");

    assert!(cli.ok(&["start", "ws1"]).starts_with("started ws1 in "));
    assert_eq!(cli.state("ws1"), "running");
    let pids = cli.pids("ws1");
    assert_eq!(
        pids.len(),
        3,
        "vmm, blk and net daemons (--net user is the default)"
    );
    assert!(pids.iter().all(|&p| alive(p)));

    cli.ok(&["pause", "ws1"]);
    assert_eq!(cli.state("ws1"), "paused");
    cli.ok(&["resume", "ws1"]);
    assert_eq!(cli.state("ws1"), "running");
    let list = cli.ok(&["list"]);
    assert!(
        list.contains("ws1") && list.contains("running") && list.contains("test/img:v1"),
        "{list}"
    );

    cli.ok(&["halt", "ws1"]);
    assert_eq!(cli.state("ws1"), "halted");
    assert_eq!(
        survivors(&pids),
        Vec::<u32>::new(),
        "processes survived halt"
    );
    assert!(
        !cli.runtime.join("ws1").exists(),
        "runtime directory left behind"
    );

    cli.ok(&["start", "ws1"]);
    assert_eq!(cli.state("ws1"), "running");
    cli.fails(&["delete", "ws1", "--yes"], "workspace.running");
    let pids = cli.pids("ws1");
    cli.ok(&["delete", "ws1", "--yes", "--force"]);
    assert_eq!(
        survivors(&pids),
        Vec::<u32>::new(),
        "processes survived delete"
    );
    assert!(!cli.home.join("workspaces/ws1").exists());
    assert!(!cli.runtime.join("ws1").exists());
    assert_eq!(cli.ok(&["--json", "list"]).trim(), "[]");
}

#[test]
fn a_killed_vmm_or_daemon_shows_crashed_and_delete_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    for (name, victim, binary) in [
        ("ws-vmm", 0usize, "microagent-vmm"),
        ("ws-blk", 1, "microagent-vhost-blk"),
        ("ws-net", 2, "microagent-vhost-net"),
    ] {
        create(&cli, name, &image);
        cli.ok(&["start", name]);
        let pids = cli.pids(name);
        // SAFETY: SIGKILL to a process this test started through the CLI.
        unsafe { libc::kill(pids[victim] as i32, libc::SIGKILL) };
        std::thread::sleep(std::time::Duration::from_millis(300));
        let state = cli.entry(name)["state"].clone();
        assert_eq!(state["state"], "crashed", "{state}");
        assert!(
            state["reason"]
                .as_str()
                .unwrap()
                .contains(&format!("{binary} (pid {}) is gone", pids[victim])),
            "{state}"
        );
        // exec names the dead process instead of calling the workspace "not running".
        let message = cli.fails(&["exec", name, "--", "true"], "workspace.crashed");
        assert!(message.contains(binary), "{message}");
        cli.ok(&["delete", name, "--yes"]);
        assert_eq!(
            survivors(&pids),
            Vec::<u32>::new(),
            "{name}: processes left"
        );
        assert!(!cli.home.join("workspaces").join(name).exists());
        assert!(!cli.runtime.join(name).exists());
    }
}

#[test]
fn bad_input_is_refused_with_a_code_and_nothing_half_created() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, registry, image) = Cli::with_test_image(dir.path());
    let kernel = test_guest().to_str().unwrap().to_owned();
    cli.fails(&["start", "nope"], "workspace.not_found");
    cli.fails(
        &[
            "create",
            "../evil",
            "--image",
            &image,
            "--kernel",
            &kernel,
            "--no-agent",
        ],
        "workspace.invalid_name",
    );
    cli.fails(
        &[
            "create",
            "ws",
            "--image",
            &image,
            "--kernel",
            &kernel,
            "--no-agent",
            "--memory",
            "12X",
        ],
        "input.bad_size",
    );
    cli.fails(
        &[
            "create",
            "ws",
            "--image",
            &image,
            "--kernel",
            &kernel,
            "--no-agent",
            "--disk-size",
            "lots",
        ],
        "input.bad_size",
    );
    let missing = format!("{}/test/missing:v1", registry.addr);
    cli.fails(
        &[
            "create",
            "ws",
            "--image",
            &missing,
            "--kernel",
            &kernel,
            "--no-agent",
        ],
        "image.pull_failed",
    );
    cli.fails(
        &[
            "create",
            "ws",
            "--image",
            "Bad//Ref",
            "--kernel",
            &kernel,
            "--no-agent",
        ],
        "image.bad_reference",
    );
    let workspaces = cli.home.join("workspaces");
    let leftovers: Vec<_> = std::fs::read_dir(&workspaces)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name())
                .filter(|n| !n.to_string_lossy().ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "half-created: {leftovers:?}");

    create(&cli, "ws", &image);
    cli.fails(
        &[
            "create",
            "ws",
            "--image",
            &image,
            "--kernel",
            &kernel,
            "--no-agent",
        ],
        "workspace.exists",
    );
    cli.fails(&["delete", "ws"], "input.confirmation_needed");
    assert!(workspaces.join("ws").exists());
    let message = cli.fails(&["exec", "ws", "--", "true"], "workspace.not_running");
    assert!(message.contains("ws"), "{message}");
}

#[test]
fn shell_completions_name_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    // Every command `--help` lists, and the subcommands of those that have some: a new
    // command is covered without editing this test.
    let mut commands = help_commands(&cli, &[]);
    for group in commands.clone() {
        commands.extend(help_commands(&cli, &[&group]));
    }
    for expected in [
        "create", "exec", "shell", "doctor", "snapshot", "image", "pull", "rm",
    ] {
        assert!(
            commands.iter().any(|c| c == expected),
            "--help does not list {expected}: {commands:?}"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let script = cli.ok(&["completion", shell]);
        for command in &commands {
            assert!(
                script.contains(command.as_str()),
                "{shell} completion lacks {command}"
            );
        }
    }
}

/// The command names in the `Commands:` section of `microagent ARGS… --help`.
fn help_commands(cli: &Cli, args: &[&str]) -> Vec<String> {
    let mut all = args.to_vec();
    all.push("--help");
    let help = cli.ok(&all);
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn image_pull_list_rm_and_the_image_config_becomes_exec_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let pulled: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "image", "pull", &image])).unwrap();
    assert_eq!(pulled["downloaded"], 3);
    let again: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "image", "pull", &image])).unwrap();
    assert_eq!(again["downloaded"], 0, "a second pull downloaded blobs");
    let list: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "image", "list"])).unwrap();
    assert_eq!(list[0]["reference"], image);
    assert!(list[0]["size"].as_u64().unwrap() > 0);

    create(&cli, "ws", &image);
    let inspect: serde_json::Value = serde_json::from_str(&cli.ok(&["inspect", "ws"])).unwrap();
    let defaults = &inspect["config"]["defaults"];
    assert_eq!(
        defaults["env"],
        serde_json::json!([["PATH", "/bin"]]),
        "{inspect}"
    );
    assert_eq!(defaults["cmd"], serde_json::json!(["/bin/sh"]));

    let blobs = cli.home.join("images/blobs/sha256");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 3);
    cli.ok(&["image", "rm", &image]);
    assert_eq!(
        std::fs::read_dir(&blobs).unwrap().count(),
        0,
        "blobs left after rm"
    );
    cli.fails(&["image", "rm", &image], "image.not_found");
    // The workspace keeps its own copy of the root disk.
    assert!(cli.home.join("workspaces/ws/rootfs.ext4").is_file());
}

/// `image rm busybox` removes what `pull busybox` stored, docker.io/library/busybox:latest
/// (Docker Hub is not reachable here: the store holds a local registry's image under
/// that name, as a pull from Docker Hub would have left it).
#[test]
fn image_rm_takes_the_short_name_a_docker_hub_image_was_pulled_by() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    cli.ok(&["image", "pull", &image]);
    let refs_path = cli.home.join("images/refs.json");
    let refs = std::fs::read_to_string(&refs_path).unwrap();
    assert!(refs.contains(&format!("\"{image}\"")), "{refs}");
    std::fs::write(
        &refs_path,
        refs.replace(&image, "docker.io/library/busybox:latest"),
    )
    .unwrap();
    let list: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "image", "list"])).unwrap();
    assert_eq!(list[0]["reference"], "docker.io/library/busybox:latest");

    // Another short name, or another tag, is not that image.
    cli.fails(&["image", "rm", "busybox:1.36"], "image.not_found");
    cli.fails(&["image", "rm", "alpine"], "image.not_found");
    let removed: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "image", "rm", "busybox"])).unwrap();
    assert_eq!(removed["removed"], "docker.io/library/busybox:latest");
    let list: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "image", "list"])).unwrap();
    assert_eq!(list, serde_json::json!([]));
    let blobs = cli.home.join("images/blobs/sha256");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 0, "blobs left");
    cli.fails(&["image", "rm", "busybox"], "image.not_found");
}

#[test]
fn a_start_that_fails_names_the_step_and_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    // Not a kernel: the VMM refuses it during start-up.
    let not_a_kernel = dir.path().join("not-a-kernel");
    std::fs::write(&not_a_kernel, vec![0x5a; 8192]).unwrap();
    cli.ok(&[
        "create",
        "broken",
        "--image",
        &image,
        "--no-agent",
        "--memory",
        "64M",
        "--kernel",
        not_a_kernel.to_str().unwrap(),
    ]);
    let out = cli.run(&["--json", "start", "broken"]);
    assert_eq!(out.status.code(), Some(125));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"]["code"], "workspace.start_failed", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("microagent-vmm") && message.contains("bzImage"),
        "{message}"
    );
    assert!(
        !cli.runtime.join("broken").exists(),
        "runtime directory left behind"
    );
    // The workspace is still there, not started, and can be started again later.
    assert_eq!(cli.state("broken"), "created");
}

/// A CLI with its own home and an `oci:` image (no registry), and a stand-in kernel
/// file for workspaces that are never booted.
fn local_setup(dir: &Path) -> (Cli, String, String) {
    let layout = dir.join("layout");
    write_layout(&layout);
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"never booted").unwrap();
    let cli = Cli::new(dir);
    (
        cli,
        format!("oci:{}:v1", layout.display()),
        kernel.to_str().unwrap().to_owned(),
    )
}

#[test]
fn memory_beyond_the_host_is_refused_at_create_and_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, image, kernel) = local_setup(dir.path());
    let create = |memory: &str| {
        vec![
            "create".to_owned(),
            "ws".into(),
            "--image".into(),
            image.clone(),
            "--no-agent".into(),
            "--kernel".into(),
            kernel.clone(),
            "--memory".into(),
            memory.into(),
        ]
    };
    for memory in ["99999999G", "1T"] {
        let args = create(memory);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli.fails(&args, "input.memory_exceeds_host");
        let out = cli.run(&args);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains(&format!("--memory {memory}")) && text.contains("more than this host"),
            "{text}"
        );
    }
    assert!(!cli.home.join("workspaces/ws").exists(), "half-created");

    // A workspace whose memory no longer fits (created elsewhere, or edited).
    let args = create("64M");
    cli.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let path = cli.home.join("workspaces/ws/workspace.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["memory_mib"] = serde_json::json!(1u64 << 20);
    std::fs::write(&path, config.to_string()).unwrap();
    cli.fails(&["start", "ws"], "workspace.memory_exceeds_host");
    assert_eq!(cli.state("ws"), "created", "something was started");
    assert!(
        !cli.runtime.join("ws/state.json").exists(),
        "processes were recorded"
    );
}

#[test]
fn a_command_waiting_for_a_busy_workspace_says_so_and_gives_up_or_waits() {
    use microagent_integration::process::ChildGuard;
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let (cli, image, _) = local_setup(dir.path());
    // Another command holds the workspace's lock.
    std::fs::create_dir_all(cli.home.join("workspaces")).unwrap();
    let held = std::fs::File::create(cli.home.join("workspaces/.ws.lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    std::fs::write(
        cli.home.join("workspaces/.ws.lock"),
        "pid 4242: microagent start ws\n",
    )
    .unwrap();
    let missing = dir.path().join("no-kernel");
    let args = [
        "create",
        "ws",
        "--image",
        &image,
        "--no-agent",
        "--kernel",
        missing.to_str().unwrap(),
    ];

    let started = std::time::Instant::now();
    let mut bounded = vec!["--lock-timeout", "1"];
    bounded.extend_from_slice(&args);
    cli.fails(&bounded, "workspace.busy");
    let out = cli.run(&bounded);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("waiting for workspace ws: pid 4242: microagent start ws holds it"),
        "{stderr}"
    );
    assert!(stderr.contains("--wait"), "{stderr}");

    // --wait: still waiting after 2 s, and carries on once the lock is free.
    let waiting_args: Vec<&str> = ["--json", "--wait"]
        .iter()
        .chain(args.iter())
        .copied()
        .collect();
    let mut waiting = ChildGuard::spawn(
        cli.command(&waiting_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        waiting.try_status().unwrap().is_none(),
        "gave up despite --wait"
    );
    drop(held);
    waiting
        .wait_timeout(std::time::Duration::from_secs(20))
        .unwrap();
    let out = waiting.into_output().unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"]["code"], "kernel.missing", "{reply}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("as long as it takes"),
        "{out:?}"
    );
}

#[test]
fn doctor_names_what_is_missing_and_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let doctor = |cli: &Cli| -> Vec<serde_json::Value> {
        let checks: serde_json::Value =
            serde_json::from_str(&cli.ok(&["--json", "doctor"])).unwrap();
        let checks = checks.as_array().unwrap().clone();
        for c in &checks {
            let ok = c["ok"].as_bool().unwrap();
            assert!(!c["detail"].as_str().unwrap().is_empty(), "{c}");
            // A failed check says how to fix it; a passing one has nothing to fix.
            assert_eq!(c["fix"].as_str().unwrap().is_empty(), ok, "{c}");
        }
        checks
    };
    let find = |checks: &[serde_json::Value], name: &str| {
        checks
            .iter()
            .find(|c| c["check"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("doctor has no {name} check: {checks:?}"))
    };

    // A fresh home has no guest kernel.
    let checks = doctor(&cli);
    let kernel = find(&checks, "guest_kernel");
    assert_eq!(kernel["ok"], false, "{kernel}");
    assert_eq!(kernel["fix"], "make kernel");
    assert!(
        kernel["detail"]
            .as_str()
            .unwrap()
            .starts_with(cli.home.join("kernels").to_str().unwrap()),
        "{kernel}"
    );
    let kvm_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert_eq!(find(&checks, "kvm")["ok"], kvm_usable);
    for name in ["hardware_virtualization", "mke2fs", "cp", "free_space"] {
        find(&checks, name);
    }
    // Guest memory gets huge pages only where the host allows them for shmem.
    let shmem = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    let allowed = ["[advise]", "[always]", "[within_size]", "[force]"]
        .iter()
        .any(|setting| shmem.contains(setting));
    let huge = find(&checks, "huge_pages");
    assert_eq!(huge["ok"], allowed, "{huge} ({shmem})");

    // With the project's kernel in place the same check passes, and names the kernel's
    // version and the hash of the configuration it was built from.
    cli.link_kernels();
    let kernel = find(&doctor(&cli), "guest_kernel");
    assert_eq!(
        (&kernel["ok"], &kernel["fix"]),
        (&true.into(), &"".into()),
        "{kernel}"
    );
    let config_hash = project_kernel_config_hash();
    assert!(
        kernel["kernel"]["version"]
            .as_str()
            .unwrap()
            .starts_with("6.1."),
        "{kernel}"
    );
    assert_eq!(
        kernel["kernel"]["config_sha256"],
        config_hash.as_str(),
        "{kernel}"
    );
    let detail = kernel["detail"].as_str().unwrap();
    assert!(
        detail.contains("(Linux 6.1.")
            && detail.contains(&format!("config sha256 {}", &config_hash[..16])),
        "{detail}"
    );
}

/// sha256 of the `config` file `scripts/build-kernel.sh` keeps next to the project kernel.
fn project_kernel_config_hash() -> String {
    use sha2::{Digest, Sha256};
    let kernel = microagent_integration::kernel::guest_kernel().unwrap();
    let config = std::fs::read(kernel.with_file_name("config")).unwrap();
    Sha256::digest(config)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn inspect_shows_the_kernel_version_and_config_hash_and_a_users_own_kernel_still_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    cli.link_kernels();
    let config_hash = project_kernel_config_hash();
    let inspect = |name: &str| -> serde_json::Value {
        serde_json::from_str(&cli.ok(&["inspect", name])).unwrap()
    };

    // The project kernel: the version from its banner, the hash of its cache entry's config.
    cli.ok(&["create", "project", "--image", &image, "--no-agent"]);
    let kernel = inspect("project")["kernel"].clone();
    assert!(
        kernel["version"].as_str().unwrap().starts_with("6.1."),
        "{kernel}"
    );
    assert!(
        kernel["banner"]
            .as_str()
            .unwrap()
            .starts_with("Linux version 6.1."),
        "{kernel}"
    );
    assert_eq!(
        (&kernel["config_sha256"], &kernel["config_source"]),
        (&config_hash.as_str().into(), &"cache_entry".into()),
        "{kernel}"
    );

    // A copy elsewhere (a user's kernel file) still names its config: the kernel
    // carries it (CONFIG_IKCONFIG), byte for byte the cache entry's.
    let own = dir.path().join("own");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::copy(
        microagent_integration::kernel::guest_kernel().unwrap(),
        own.join("vmlinux"),
    )
    .unwrap();
    cli.ok(&[
        "create",
        "copy",
        "--image",
        &image,
        "--no-agent",
        "--kernel",
        own.join("vmlinux").to_str().unwrap(),
    ]);
    let kernel = inspect("copy")["kernel"].clone();
    assert_eq!(
        (&kernel["config_sha256"], &kernel["config_source"]),
        (&config_hash.as_str().into(), &"embedded".into()),
        "{kernel}"
    );

    // A user's own kernel that is not Linux at all (the freestanding test guest): no
    // version, no config, and it still starts and runs.
    create(&cli, "guest", &image);
    let kernel = inspect("guest")["kernel"].clone();
    assert_eq!(
        (&kernel["version"], &kernel["config_sha256"]),
        (&serde_json::Value::Null, &serde_json::Value::Null),
        "{kernel}"
    );
    assert!(cli.ok(&["start", "guest"]).starts_with("started guest in "));
    assert_eq!(cli.state("guest"), "running");
    cli.ok(&["halt", "guest"]);
    assert_eq!(cli.state("guest"), "halted");
}

#[test]
fn an_agent_workspace_boots_with_init_on_free_and_keeps_the_users_cmdline() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, image, kernel) = local_setup(dir.path());
    cli.ok(&[
        "create",
        "ws",
        "--image",
        &image,
        "--kernel",
        &kernel,
        "--cmdline",
        "quiet loglevel=3",
    ]);
    let inspect: serde_json::Value = serde_json::from_str(&cli.ok(&["inspect", "ws"])).unwrap();
    let cmdline = inspect["config"]["cmdline"].as_str().unwrap();
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    // Freed pages are zeroed, so wiped secrets leave no copies in a snapshot's memory.
    for word in [
        "init_on_free=1",
        "microagent.hostname=ws",
        "quiet",
        "loglevel=3",
    ] {
        assert!(words.contains(&word), "{word} missing from {cmdline:?}");
    }
}

#[test]
fn an_agent_workspace_is_refused_at_start_where_linux_cannot_boot() {
    const NAME: &str = "an_agent_workspace_is_refused_at_start_where_linux_cannot_boot";
    let Some(why) = microagent_vmm::host::linux_guest_limitation() else {
        microagent_integration::report::not_run(
            NAME,
            "this host has VMX/SVM (or no PVM): a Linux guest can start here",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (cli, image, kernel) = local_setup(dir.path());
    cli.ok(&["create", "ws", "--image", &image, "--kernel", &kernel]);
    let message = cli.fails(&["start", "ws"], "host.no_hardware_virtualization");
    assert!(
        message.starts_with("ws cannot start here: ") && message.ends_with(&why),
        "{message}"
    );
    assert_eq!(cli.state("ws"), "created", "something was started");
    assert!(
        !cli.runtime.join("ws/state.json").exists(),
        "processes were recorded"
    );
}

fn net_create(cli: &Cli, name: &str, image: &str, extra: &[&str]) -> std::process::Output {
    let kernel = test_guest().to_str().unwrap();
    let mut args = vec!["--json"];
    args.extend(test_guest_create(name, image, kernel, "scenario=halt"));
    args.extend_from_slice(extra);
    cli.run(&args)
}

/// `--net user` (the default) starts microagent-vhost-net next to the VMM, which gets a
/// virtio-net device; `--publish` listens on the host while the workspace runs and is
/// shown by `inspect` and `list`; `--net none` starts no net daemon.
#[test]
fn the_default_network_runs_a_net_daemon_and_publishes_ports_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let port = free_port();
    let spec = format!("127.0.0.1:{port}:80/tcp");
    let udp_port = free_udp_port();
    let udp_spec = format!("{udp_port}:53/udp");
    let out = net_create(
        &cli,
        "web",
        &image,
        &["--publish", &spec, "--publish", &udp_spec],
    );
    assert!(out.status.success(), "{out:?}");

    let inspect: serde_json::Value = serde_json::from_str(&cli.ok(&["inspect", "web"])).unwrap();
    assert_eq!(inspect["config"]["net"], "user", "{inspect}");
    let both = serde_json::json!([spec, udp_spec]);
    assert_eq!(inspect["config"]["publish"], both);
    assert_eq!(cli.entry("web")["publish"], both);
    let table = cli.ok(&["list"]);
    assert!(
        table.contains("PORTS") && table.contains(&format!("{spec},{udp_spec}")),
        "{table}"
    );

    // Nothing listens before the start.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let udp_free = || std::net::UdpSocket::bind(("127.0.0.1", udp_port)).is_ok();
    assert!(udp_free());
    cli.ok(&["start", "web"]);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cli.runtime.join("web/state.json")).unwrap())
            .unwrap();
    let net_pid = state["net"].as_u64().expect("a net daemon pid") as u32;
    let cmdline = std::fs::read(format!("/proc/{net_pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(argv[0].ends_with("microagent-vhost-net"), "{argv:?}");
    assert!(argv.contains(&spec) && argv.contains(&udp_spec), "{argv:?}");
    let vmm_pid = state["vmm"].as_u64().unwrap();
    let vmm_argv =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{vmm_pid}/cmdline")).unwrap())
            .replace('\0', " ");
    assert!(vmm_argv.contains("--net "), "{vmm_argv}");
    // The VMM connected: the daemon serves its frontend, the published port accepts.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("the published port accepts");
    assert!(!udp_free(), "the daemon holds the published UDP port");
    assert_eq!(cli.state("web"), "running");

    let pids = cli.pids("web");
    cli.ok(&["halt", "web"]);
    assert_eq!(
        survivors(&pids),
        Vec::<u32>::new(),
        "processes survived halt"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the published port outlived the workspace"
    );
    assert!(udp_free(), "the published UDP port outlived the workspace");

    let out = net_create(&cli, "offline", &image, &["--net", "none"]);
    assert!(out.status.success(), "{out:?}");
    cli.ok(&["start", "offline"]);
    assert_eq!(cli.pids("offline").len(), 2, "vmm and blk daemon only");
    assert_eq!(cli.entry("offline")["net"], "none");
    cli.ok(&["delete", "offline", "--yes", "--force"]);
    cli.ok(&["delete", "web", "--yes"]);
}

/// Bad `--publish` specs are refused at create (nothing is made); a port already taken
/// on the host fails the start with the daemon's reason and leaves nothing running.
#[test]
fn bad_or_taken_published_ports_are_refused_with_a_code() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    for (extra, needle) in [
        (vec!["--publish", "8080"], "is not [IP:]HOSTPORT:GUESTPORT"),
        (
            vec!["--publish", "127.0.0.1:0:80"],
            "is not [IP:]HOSTPORT:GUESTPORT",
        ),
        (vec!["--publish", "8080:80/sctp"], "[/tcp|udp]"),
        (vec!["--publish", "8080:80/UDP"], "[/tcp|udp]"),
        (
            vec!["--net", "none", "--publish", "8080:80"],
            "needs a network",
        ),
    ] {
        let out = net_create(&cli, "bad", &image, &extra);
        assert_eq!(out.status.code(), Some(125), "{extra:?}: {out:?}");
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(reply["error"]["code"], "input.bad_publish", "{reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{extra:?}: {message}");
        assert_eq!(cli.state("bad"), "absent", "{extra:?} left a workspace");
    }

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let spec = format!("{port}:80");
    let out = net_create(&cli, "clash", &image, &["--publish", &spec]);
    assert!(out.status.success(), "{out:?}");
    let message = cli.fails(&["start", "clash"], "workspace.start_failed");
    assert!(
        message.contains("microagent-vhost-net exited during start-up")
            && message.contains(&format!("127.0.0.1:{port}")),
        "{message}"
    );
    assert!(!cli.runtime.join("clash").exists(), "runtime left behind");
    assert_eq!(cli.state("clash"), "created");
}

/// The largest `tick N` in `text`.
fn last_tick(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn logs_follow_prints_what_the_guest_writes_next_and_ends_when_the_workspace_halts() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    create_running(&cli, "ws", &image, "scenario=counter");
    cli.ok(&["start", "ws"]);
    let console = cli.home.join("workspaces/ws/console.log");

    let mut follow = cli
        .command(&["logs", "-f", "ws"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (ticks, seen) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line
                .strip_prefix("tick ")
                .and_then(|n| n.parse::<u64>().ok())
            {
                let _ = ticks.send(n);
            }
        }
    });
    // What the console holds a second after `logs -f` read it first: a tick past this
    // can only come from following.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let mark = last_tick(&std::fs::read_to_string(&console).unwrap()) + 100;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match seen.recv_timeout(left) {
            Ok(n) if n > mark => break,
            Ok(_) => {}
            Err(e) => panic!("logs -f printed no tick past {mark}: {e}"),
        }
    }

    cli.ok(&["halt", "ws"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = follow.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = follow.kill();
            panic!("logs -f still runs after the workspace halted");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    drop(seen);
    reader.join().unwrap();

    // Without -f on a halted workspace: the whole console, then exit.
    let all = cli.ok(&["logs", "ws"]);
    assert_eq!(all, std::fs::read_to_string(&console).unwrap());
    assert!(last_tick(&all) > mark, "{}", all.len());
}
