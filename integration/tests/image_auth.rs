//! Authenticated registries for real: Debian's docker-registry with htpasswd (bcrypt)
//! auth on loopback, credentials from a Docker config.json and from
//! `microagent image login/logout`.

use microagent_integration::cli::Cli;
use microagent_integration::registry::{push_as, write_layout, Registry};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-pw";

struct Rig {
    _registry: Registry,
    addr: String,
    reference: String,
    cli: Cli,
    /// DOCKER_CONFIG for every command.
    docker: PathBuf,
}

impl Rig {
    fn new(dir: &Path) -> Self {
        let registry = Registry::start_with_htpasswd(dir, USER, PASSWORD);
        let layout = dir.join("layout");
        write_layout(&layout);
        push_as(
            &layout,
            &registry,
            "test/private:v1",
            Some(&format!("{USER}:{PASSWORD}")),
        );
        Self {
            addr: registry.addr.clone(),
            reference: format!("{}/test/private:v1", registry.addr),
            _registry: registry,
            cli: Cli::new(dir),
            docker: dir.join("docker-config"),
        }
    }

    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let mut cmd = self.cli.command(&all);
        cmd.env("DOCKER_CONFIG", &self.docker)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs and expects exit 125 with `code`; returns the message.
    fn fails(&self, args: &[&str], stdin: &[u8], code: &str) -> String {
        let out = self.run(args, stdin);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {out:?}");
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(reply["error"]["code"], code, "{reply}");
        reply["error"]["message"].as_str().unwrap().to_owned()
    }

    fn ok(&self, args: &[&str], stdin: &[u8]) -> serde_json::Value {
        let out = self.run(args, stdin);
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn config(&self) -> PathBuf {
        self.docker.join("config.json")
    }

    fn write_config(&self, user: &str, password: &str) {
        fs::create_dir_all(&self.docker).unwrap();
        let auth = base64(format!("{user}:{password}").as_bytes());
        fs::write(
            self.config(),
            format!(
                r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}},"credsStore":"none-here"}}"#,
                self.addr
            ),
        )
        .unwrap();
    }
}

/// Standard base64, for writing config.json the way Docker does.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    out
}

#[test]
fn credentials_from_a_docker_config_open_a_private_registry_and_wrong_ones_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let rig = Rig::new(dir.path());

    let message = rig.fails(
        &["image", "pull", &rig.reference],
        b"",
        "image.unauthorized",
    );
    assert!(
        message.contains(&rig.addr) && message.contains("image login"),
        "{message}"
    );

    rig.write_config(USER, "wrong");
    let message = rig.fails(
        &["image", "pull", &rig.reference],
        b"",
        "image.unauthorized",
    );
    assert!(
        message.contains(&rig.addr) && message.contains(USER) && message.contains("refused"),
        "{message}"
    );
    assert!(
        !message.contains("wrong"),
        "the password is echoed: {message}"
    );

    rig.write_config(USER, PASSWORD);
    let pulled = rig.ok(&["image", "pull", &rig.reference], b"");
    assert_eq!(pulled["downloaded"], 3, "{pulled}");
}

#[test]
fn login_checks_and_stores_credentials_like_docker_and_logout_forgets_them() {
    let dir = tempfile::tempdir().unwrap();
    let rig = Rig::new(dir.path());
    // Another registry's entry and other keys in the file survive login and logout.
    fs::create_dir_all(&rig.docker).unwrap();
    fs::write(
        rig.config(),
        r#"{"auths":{"other.example.com":{"auth":"Ym9iOnB3"}},"psFormat":"table"}"#,
    )
    .unwrap();

    let message = rig.fails(
        &["image", "login", &rig.addr, "-u", USER, "--password-stdin"],
        b"wrong\n",
        "image.unauthorized",
    );
    assert!(message.contains(&rig.addr), "{message}");
    let untouched: serde_json::Value =
        serde_json::from_slice(&fs::read(rig.config()).unwrap()).unwrap();
    assert!(untouched["auths"].get(&rig.addr).is_none(), "{untouched}");

    rig.fails(
        &["image", "login", &rig.addr, "-u", USER],
        b"",
        "input.missing_password",
    );

    let login = rig.ok(
        &["image", "login", &rig.addr, "-u", USER, "--password-stdin"],
        format!("{PASSWORD}\n").as_bytes(),
    );
    assert_eq!(login["logged_in"], rig.addr);
    let mode = fs::metadata(rig.config()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "config.json mode {mode:o}");
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(rig.config()).unwrap()).unwrap();
    assert_eq!(
        config["auths"][&rig.addr]["auth"],
        base64(format!("{USER}:{PASSWORD}").as_bytes())
    );
    assert_eq!(config["auths"]["other.example.com"]["auth"], "Ym9iOnB3");
    assert_eq!(config["psFormat"], "table");

    let pulled = rig.ok(&["image", "pull", &rig.reference], b"");
    assert_eq!(pulled["downloaded"], 3, "{pulled}");

    let logout = rig.ok(&["image", "logout", &rig.addr], b"");
    assert_eq!(logout["removed"], true);
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(rig.config()).unwrap()).unwrap();
    assert!(config["auths"].get(&rig.addr).is_none(), "{config}");
    assert_eq!(config["auths"]["other.example.com"]["auth"], "Ym9iOnB3");
    assert_eq!(
        rig.ok(&["image", "logout", &rig.addr], b"")["removed"],
        false
    );

    // Nothing cached hides the logout: a fresh store needs the credentials again.
    let fresh = Cli::new(&dir.path().join("fresh"));
    let out = fresh
        .command(&["--json", "image", "pull", &rig.reference])
        .env("DOCKER_CONFIG", &rig.docker)
        .output()
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"]["code"], "image.unauthorized", "{reply}");
}
