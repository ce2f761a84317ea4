//! OCI layers and configs from an untrusted image.
//!
//! - Layer unpacking (`unpack::apply_layer_auto`: gzip/zstd/plain detection, whiteouts,
//!   links, owners, modes, capabilities) into a fresh root under a fixed directory, and
//!   afterwards a check that nothing outside the root changed: the fixed directory still
//!   holds only `root` and `outside`, and `outside` still holds only its sentinel file
//!   with its contents. The path is fixed (`/var/tmp/microagent-fuzz-image`) so that
//!   seeds can aim symlinks and links at `outside` by absolute path as well as by `..`.
//! - The same from a tar built of fuzzer-chosen entries whose names and link targets are
//!   written raw into the headers (checksums filled in), so that the fuzzer reaches the
//!   unpacker's decisions rather than the tar checksum.
//! - An image config: JSON parsed as `source::config_json` does, then
//!   `source::exec_defaults_of` and `platform::Platform::of_json`.
//!
//! Input: byte 0 picks the mode (mod 3: raw layer, built tar, config); the rest is its
//! data. A built tar's entries are: type, name length, name, link length, link, mode
//! byte, data length, data.

#![no_main]

use libfuzzer_sys::fuzz_target;
use microagent_image::platform::Platform;
use microagent_image::source::exec_defaults_of;
use microagent_image::unpack::apply_layer_auto;
use std::fs;
use std::path::Path;

const BASE: &str = "/var/tmp/microagent-fuzz-image";
const SENTINEL: &[u8] = b"nothing may change this file";
const LIMIT: u64 = 1 << 20;

fn fresh_root() -> std::path::PathBuf {
    let base = Path::new(BASE);
    let root = base.join("root");
    let _ = fs::remove_dir_all(&root);
    let outside = base.join("outside");
    if fs::read(outside.join("sentinel")).ok().as_deref() != Some(SENTINEL) {
        let _ = fs::remove_dir_all(&outside);
        fs::create_dir_all(&outside).expect("fuzz: creating the outside directory");
        fs::write(outside.join("sentinel"), SENTINEL).expect("fuzz: writing the sentinel");
    }
    fs::create_dir_all(&root).expect("fuzz: creating the root");
    root
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn check_outside_unchanged() {
    let base = Path::new(BASE);
    assert_eq!(
        names(base),
        ["outside", "root"],
        "something was written next to the root"
    );
    let outside = base.join("outside");
    assert_eq!(
        names(&outside),
        ["sentinel"],
        "something was written outside the root"
    );
    let meta = fs::symlink_metadata(outside.join("sentinel")).expect("the sentinel is gone");
    assert!(meta.is_file(), "the sentinel was replaced");
    assert_eq!(
        fs::read(outside.join("sentinel")).expect("reading the sentinel"),
        SENTINEL,
        "the sentinel outside the root was changed"
    );
}

fn unpack(layer: &[u8]) {
    let root = fresh_root();
    let _ = apply_layer_auto(&root, layer, LIMIT);
    check_outside_unchanged();
}

/// Takes `n` bytes (fewer at the end).
fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (head, tail) = data.split_at(n);
    *data = tail;
    head
}

fn byte(data: &mut &[u8]) -> u8 {
    take(data, 1).first().copied().unwrap_or(0)
}

fn built_tar(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while !data.is_empty() && out.len() < 256 * 1024 {
        let kind = match byte(&mut data) % 6 {
            0 => tar::EntryType::Regular,
            1 => tar::EntryType::Directory,
            2 => tar::EntryType::Symlink,
            3 => tar::EntryType::Link,
            4 => tar::EntryType::Char,
            _ => tar::EntryType::Fifo,
        };
        let name_len = usize::from(byte(&mut data)).min(100);
        let name = take(&mut data, name_len);
        let link_len = usize::from(byte(&mut data)).min(100);
        let link = take(&mut data, link_len);
        let mode = byte(&mut data);
        let data_len = usize::from(byte(&mut data)) * 4;
        let contents = take(&mut data, data_len);

        let mut header = tar::Header::new_old();
        {
            let old = header.as_old_mut();
            old.name[..name.len()].copy_from_slice(name);
            old.linkname[..link.len()].copy_from_slice(link);
        }
        header.set_entry_type(kind);
        header.set_mode(u32::from(mode) << 4 | 0o644);
        header.set_uid(u64::from(mode & 3) * 1000);
        header.set_gid(0);
        let size = if kind == tar::EntryType::Regular {
            contents.len()
        } else {
            0
        };
        header.set_size(size as u64);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        if size > 0 {
            out.extend_from_slice(contents);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn config(bytes: &[u8]) {
    let Ok(config) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return;
    };
    if !config.is_object() {
        return;
    }
    let defaults = exec_defaults_of(&config);
    for (key, _) in &defaults.env {
        assert!(!key.contains('='), "an env key holds '=': {key:?}");
    }
    if let Some(p) = Platform::of_json(&config) {
        assert!(!p.os.is_empty() && !p.architecture.is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => unpack(rest),
        1 => unpack(&built_tar(rest)),
        _ => config(rest),
    }
});
