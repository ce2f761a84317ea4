//! `microagent create --net tap` on this machine (root): the workspace's network
//! namespace, veth pair and NAT rules are made at start and removed on halt, on
//! delete (also after the net daemon was SIGKILLed) and on a failed start; without
//! privileges `create` refuses with a code.

use microagent_integration::cli::{survivors, test_guest_create, Cli};
use microagent_integration::tap_net;
use microagent_integration::vmm::test_guest;
use microagent_vhost_net::netns;
use std::process::Command;

/// Workspace names are global to the host's namespaces: unique per test run.
fn unique(tag: &str) -> String {
    format!("tap{}-{tag}", std::process::id())
}

fn create_args<'a>(name: &'a str, image: &'a str, kernel: &'a str) -> Vec<&'a str> {
    let mut args = test_guest_create(name, image, kernel, "scenario=halt");
    args.extend(["--net", "tap"]);
    args
}

#[test]
fn a_tap_workspace_gets_its_namespace_at_start_and_delete_removes_it_after_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let name = unique("ws");
    let kernel = test_guest().to_str().unwrap();
    cli.ok(&create_args(&name, &image, kernel));
    let ns = format!("microagent-{name}");
    assert!(!netns::exists(&ns), "made before the start");
    let inspect: serde_json::Value = serde_json::from_str(&cli.ok(&["inspect", &name])).unwrap();
    assert_eq!(inspect["config"]["net"], "tap", "{inspect}");

    cli.ok(&["start", &name]);
    let net = netns::lookup(&ns).unwrap().expect("the namespace exists");
    tap_net::assert_present(&net);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cli.runtime.join(&name).join("state.json")).unwrap(),
    )
    .unwrap();
    let net_pid = state["net"].as_u64().expect("a net daemon pid") as u32;
    let argv = std::fs::read(format!("/proc/{net_pid}/cmdline")).unwrap();
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(argv.contains(&format!("--mode tap --netns {ns}")), "{argv}");

    // Halt removes it, the next start makes it again.
    cli.ok(&["halt", &name]);
    assert_eq!(tap_net::traces(&net), Vec::<String>::new());
    cli.ok(&["start", &name]);
    let net = netns::lookup(&ns).unwrap().expect("made again");
    tap_net::assert_present(&net);

    let pids = cli.pids(&name);
    // SAFETY: SIGKILL to the net daemon this test started through the CLI.
    unsafe { libc::kill(net_pid_of(&cli, &name) as i32, libc::SIGKILL) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(cli.state(&name), "crashed");
    cli.ok(&["delete", &name, "--yes"]);
    assert_eq!(survivors(&pids), Vec::<u32>::new());
    assert_eq!(tap_net::traces(&net), Vec::<String>::new());
}

fn net_pid_of(cli: &Cli, name: &str) -> u32 {
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cli.runtime.join(name).join("state.json")).unwrap(),
    )
    .unwrap();
    state["net"].as_u64().unwrap() as u32
}

/// The VMM refuses its kernel during start-up: the tap network made for the start goes
/// again with the processes.
#[test]
fn a_failed_start_of_a_tap_workspace_removes_its_network() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let name = unique("broken");
    let not_a_kernel = dir.path().join("not-a-kernel");
    std::fs::write(&not_a_kernel, vec![0x5a; 8192]).unwrap();
    cli.ok(&create_args(&name, &image, not_a_kernel.to_str().unwrap()));
    let message = cli.fails(&["start", &name], "workspace.start_failed");
    assert!(message.contains("microagent-vmm"), "{message}");
    let ns = format!("microagent-{name}");
    assert!(!netns::exists(&ns), "namespace {ns} left behind");
    let links = String::from_utf8(
        Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let nat = String::from_utf8(
        Command::new("iptables")
            .args(["-w", "-t", "nat", "-S"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!nat.contains(&format!("microagent:{ns}\"")), "{nat}");
    // Its veth would have been the only one whose peer is in that namespace: none is
    // left whose namespace is gone (a veth without its namespace has no peer name).
    assert!(!links.contains(&ns), "{links}");
    assert_eq!(cli.state(&name), "created");
    cli.ok(&["delete", &name, "--yes"]);
}

/// `create --net tap` without CAP_NET_ADMIN and CAP_SYS_ADMIN is refused before
/// anything is made; `--publish` with tap is refused too.
#[test]
fn create_net_tap_without_privileges_or_with_publish_is_refused_with_a_code() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let name = unique("nopriv");
    let kernel = test_guest().to_str().unwrap();
    let mut args = vec!["--json"];
    args.extend(create_args(&name, &image, kernel));
    let cmd = cli.command(&args);
    let out = Command::new("setpriv")
        .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"]["code"], "net.tap_needs_root", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("CAP_NET_ADMIN") && message.contains("--net user"),
        "{message}"
    );
    assert_eq!(cli.entry(&name), serde_json::Value::Null, "nothing created");

    let mut args = create_args(&name, &image, kernel);
    args.extend(["--publish", "8080:80"]);
    cli.fails(&args, "input.user_net_only");
}

/// A fork of a tap workspace runs beside its source with a network of its own (same
/// guest address inside each namespace); deleting either removes only its own.
#[test]
fn a_fork_of_a_tap_workspace_gets_its_own_namespace_beside_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let (cli, _registry, image) = Cli::with_test_image(dir.path());
    let _reaper = cli.reaper();
    let source = unique("src");
    let fork = unique("fork");
    let kernel = test_guest().to_str().unwrap();
    cli.ok(&create_args(&source, &image, kernel));
    cli.ok(&["start", &source]);
    cli.ok(&["snapshot", "create", &source, "--tag", "base"]);
    cli.ok(&[
        "create",
        &fork,
        "--from-snapshot",
        &format!("{source}:base"),
    ]);
    assert_eq!(cli.state(&fork), "running");
    assert_eq!(cli.state(&source), "running");
    let ours = netns::lookup(&format!("microagent-{source}"))
        .unwrap()
        .unwrap();
    let theirs = netns::lookup(&format!("microagent-{fork}"))
        .unwrap()
        .unwrap();
    assert_ne!(ours.index, theirs.index);
    tap_net::assert_present(&ours);
    tap_net::assert_present(&theirs);
    let inspect: serde_json::Value = serde_json::from_str(&cli.ok(&["inspect", &fork])).unwrap();
    assert_eq!(inspect["config"]["net"], "tap", "{inspect}");
    cli.ok(&["delete", &fork, "--yes", "--force"]);
    assert_eq!(tap_net::traces(&theirs), Vec::<String>::new());
    tap_net::assert_present(&ours);
    cli.ok(&["delete", &source, "--yes", "--force"]);
    assert_eq!(tap_net::traces(&ours), Vec::<String>::new());
}
