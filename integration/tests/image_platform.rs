//! `image pull --platform` against the real loopback registry: an index of linux/arm64
//! and linux/amd64 images pushed with `skopeo copy --all`, each platform picked on
//! request, shown by `image list` and `image inspect`.

use microagent_integration::cli::Cli;
use microagent_integration::registry::{write_multi_arch_layout, Registry};
use std::process::Command;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

#[test]
fn platform_picks_the_index_entry_and_list_and_inspect_show_it() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let layout = dir.path().join("multi");
    write_multi_arch_layout(&layout);
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{}/test/multi:v1", registry.addr))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let reference = format!("{}/test/multi:v1", registry.addr);

    // Two homes: the store keeps one image per name, as Docker does.
    let arm = Cli::new(&dir.path().join("arm"));
    let pulled = json(&arm.ok(&[
        "--json",
        "image",
        "pull",
        "--platform",
        "linux/arm64",
        &reference,
    ]));
    assert_eq!(pulled["platform"], "linux/arm64", "{pulled}");
    let amd = Cli::new(&dir.path().join("amd"));
    let default = json(&amd.ok(&["--json", "image", "pull", &reference]));
    assert_eq!(default["platform"], "linux/amd64", "{default}");
    assert_ne!(pulled["digest"], default["digest"]);

    let list = json(&arm.ok(&["--json", "image", "list"]));
    assert_eq!(list[0]["platform"], "linux/arm64", "{list}");
    let table = arm.ok(&["image", "list"]);
    assert!(
        table.contains("PLATFORM") && table.contains("linux/arm64"),
        "{table}"
    );

    let info = json(&arm.ok(&["--json", "image", "inspect", &reference]));
    assert_eq!(info["digest"], pulled["digest"]);
    assert_eq!(info["platform"], "linux/arm64");
    assert_eq!(info["config"]["architecture"], "arm64");
    let layers = info["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{info}");
    assert!(layers[0]["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(layers[0]["size"].as_u64().unwrap() > 0);
    assert!(
        layers[0]["media_type"].as_str().unwrap().contains("layer"),
        "{info}"
    );
    assert!(info["size"].as_u64().unwrap() > 0);

    let message = arm.fails(
        &["image", "pull", "--platform", "linux/s390x", &reference],
        "image.no_platform",
    );
    assert!(
        message.contains("linux/s390x")
            && message.contains("linux/arm64")
            && message.contains("linux/amd64"),
        "{message}"
    );
    arm.fails(
        &["image", "pull", "--platform", "arm64", &reference],
        "input.bad_platform",
    );
    let message = arm.fails(&["image", "inspect", "nothing/here:v9"], "image.not_found");
    assert!(message.contains("nothing/here:v9"), "{message}");
}
