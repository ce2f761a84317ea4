//! `create --disk-size` against the real loopback registry: a larger disk is the
//! image's cached root disk grown with resize2fs (no second unpack), checked clean by
//! e2fsck; one the tree cannot fit is refused.

use microagent_image::progress::Event;
use microagent_integration::cli::Cli;
use microagent_integration::ext4::debugfs;
use microagent_integration::registry::{push, write_layout, Registry};
use std::fs;
use std::process::Command;

#[test]
fn a_larger_disk_size_grows_the_cached_disk_without_unpacking_and_a_tiny_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let layout = dir.path().join("layout");
    write_layout(&layout);
    push(&layout, &registry, "test/img:v1");
    let image = format!("{}/test/img:v1", registry.addr);
    let cli = Cli::new(dir.path());
    let kernel = dir.path().join("kernel");
    fs::write(&kernel, b"not booted").unwrap();
    let create = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "--json",
            "create",
            name,
            "--image",
            &image,
            "--no-agent",
            "--net",
            "none",
            "--kernel",
            kernel.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        cli.run(&args)
    };
    let events = |out: &std::process::Output| -> Vec<Event> {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    };

    let first = create("small", &[]);
    assert!(first.status.success(), "{first:?}");
    let default_size = fs::metadata(cli.home.join("workspaces/small/rootfs.ext4"))
        .unwrap()
        .len();
    assert!(default_size < 1 << 30);

    let grown = create("big", &["--disk-size", "1G"]);
    assert!(grown.status.success(), "{grown:?}");
    let events = events(&grown);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::LayerUnpacking { .. } | Event::DiskFormatting)),
        "unpacked again: {events:?}"
    );
    assert!(
        events.contains(&Event::DiskResizing { size: 1 << 30 }),
        "{events:?}"
    );
    let disk = cli.home.join("workspaces/big/rootfs.ext4");
    assert_eq!(fs::metadata(&disk).unwrap().len(), 1 << 30);
    let stats = debugfs(&disk, "stats");
    let blocks: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{stats}"));
    let block_size: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{stats}"));
    assert_eq!(blocks * block_size, 1 << 30, "the filesystem was not grown");
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "e2fsck: {fsck:?}");
    let busybox = debugfs(&disk, "stat /bin/busybox");
    let size = fs::metadata("/bin/busybox").unwrap().len();
    assert!(busybox.contains(&format!("Size: {size}")), "{busybox}");

    let message = cli.fails(
        &[
            "create",
            "tiny",
            "--image",
            &image,
            "--no-agent",
            "--net",
            "none",
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk-size",
            "1M",
        ],
        "input.disk_too_small",
    );
    assert!(
        message.contains("smaller than the image content"),
        "{message}"
    );
    assert!(!cli.home.join("workspaces/tiny").exists());
}
