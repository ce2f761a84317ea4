//! Registries with their own CA: docker-registry serving TLS (a certificate from a CA
//! made by openssl for the test) with htpasswd auth, on 127.0.0.2 so microagent uses
//! HTTPS. Untrusted without the CA, trusted through `--ca-cert` and Docker's certs.d
//! convention, login included.

use microagent_integration::cli::Cli;
use microagent_integration::registry::{push_as, write_layout, Registry};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};

const USER: &str = "bob";
const PASSWORD: &str = "tls-pw";

fn run(cli: &Cli, docker: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let mut child = cli
        .command(&all)
        .env("DOCKER_CONFIG", docker)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn reply(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{out:?}: {e}"))
}

#[test]
fn a_private_ca_is_trusted_through_ca_cert_or_certs_d_and_refused_without() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, ca) = Registry::start_tls(dir.path(), Some((USER, PASSWORD)));
    let layout = dir.path().join("layout");
    write_layout(&layout);
    push_as(
        &layout,
        &registry,
        "test/secure:v1",
        Some(&format!("{USER}:{PASSWORD}")),
    );
    let image = format!("{}/test/secure:v1", registry.addr);
    let docker = dir.path().join("docker-config");
    let cli = Cli::new(&dir.path().join("a"));
    let ca_arg = ca.to_str().unwrap();

    // No CA: the certificate is refused, with what to do about it.
    let out = run(&cli, &docker, &["image", "pull", &image], b"");
    let r = reply(&out);
    assert_eq!(r["error"]["code"], "image.tls_untrusted", "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&registry.addr)
            && message.contains("certs.d")
            && message.contains("--ca-cert"),
        "{message}"
    );
    let out = run(
        &cli,
        &docker,
        &[
            "image",
            "login",
            &registry.addr,
            "-u",
            USER,
            "--password-stdin",
        ],
        PASSWORD.as_bytes(),
    );
    assert_eq!(
        reply(&out)["error"]["code"],
        "image.login_failed",
        "{out:?}"
    );

    // --ca-cert: login over TLS, then the pull with the stored credentials.
    let out = run(
        &cli,
        &docker,
        &[
            "image",
            "login",
            &registry.addr,
            "-u",
            USER,
            "--password-stdin",
            "--ca-cert",
            ca_arg,
        ],
        PASSWORD.as_bytes(),
    );
    assert_eq!(reply(&out)["logged_in"], registry.addr, "{out:?}");
    let out = run(
        &cli,
        &docker,
        &["image", "pull", "--ca-cert", ca_arg, &image],
        b"",
    );
    assert_eq!(reply(&out)["downloaded"], 3, "{out:?}");

    // certs.d/<registry>/ca.crt under the home, as Docker's /etc/docker/certs.d.
    let other = Cli::new(&dir.path().join("b"));
    let certs = other.home.join("certs.d").join(&registry.addr);
    fs::create_dir_all(&certs).unwrap();
    fs::copy(&ca, certs.join("ca.crt")).unwrap();
    let out = run(&other, &docker, &["image", "pull", &image], b"");
    assert_eq!(reply(&out)["downloaded"], 3, "{out:?}");

    // A CA file that is not PEM is refused by name.
    let junk = dir.path().join("junk.crt");
    fs::write(&junk, b"junk").unwrap();
    let out = run(
        &cli,
        &docker,
        &["image", "pull", "--ca-cert", junk.to_str().unwrap(), &image],
        b"",
    );
    let r = reply(&out);
    assert_eq!(r["error"]["code"], "image.bad_ca_cert", "{r}");
}
