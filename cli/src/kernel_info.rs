//! What a guest kernel file is, for `doctor` and `inspect`: its Linux version (from the
//! `linux_banner` string of a vmlinux, or the version string a bzImage's setup header
//! points to) and the sha256 of its build configuration (the `config` file that
//! `scripts/build-kernel.sh` keeps next to a cached kernel, else the configuration the
//! kernel carries itself with CONFIG_IKCONFIG). A kernel that shows neither, such as the
//! freestanding test guest, is still a kernel: both are then absent.

use flate2::read::GzDecoder;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// What `linux_banner` starts with.
const BANNER: &[u8] = b"Linux version ";
/// The magic of a bzImage's setup header, at [`HEADER_MAGIC_AT`].
const HEADER_MAGIC: &[u8] = b"HdrS";
const HEADER_MAGIC_AT: usize = 0x202;
/// Where the setup header keeps the offset (minus 0x200) of the version string.
const KERNEL_VERSION_AT: usize = 0x20e;
/// The markers around the gzipped configuration CONFIG_IKCONFIG embeds.
const IKCONFIG_START: &[u8] = b"IKCFG_ST";
const IKCONFIG_END: &[u8] = b"IKCFG_ED";
/// No kernel configuration is this large; a larger one (a gzip bomb in a user's file)
/// is not hashed.
const MAX_CONFIG: u64 = 4 << 20;
/// How much of a kernel file is read: kernels are tens of MiB; a larger file is only
/// searched this far.
const MAX_KERNEL: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading guest kernel {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where a configuration hash came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigSource {
    /// The `config` file next to the kernel (the project's kernel cache).
    CacheEntry,
    /// The kernel's own copy (CONFIG_IKCONFIG).
    Embedded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelInfo {
    /// `6.1.192`, when the file names a Linux version.
    pub version: Option<String>,
    /// The whole version line (`Linux version 6.1.192 (root@vm) (gcc …) #1 SMP …`).
    pub banner: Option<String>,
    /// sha256 of the kernel's build configuration (`.config`), when it can be found.
    pub config_sha256: Option<String>,
    pub config_source: Option<ConfigSource>,
}

impl KernelInfo {
    /// `Linux 6.1.192, config sha256 0123abcd…` (or what is unknown), for humans.
    pub fn describe(&self) -> String {
        let version = self
            .version
            .as_deref()
            .map_or("no Linux version found".into(), |v| format!("Linux {v}"));
        let config = self
            .config_sha256
            .as_deref()
            .map_or("build config unknown".into(), |h| {
                format!("config sha256 {}", &h[..h.len().min(16)])
            });
        format!("{version}, {config}")
    }
}

/// Reads `path` and says what kernel it is.
pub fn identify(path: &Path) -> Result<KernelInfo, Error> {
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_KERNEL).read_to_end(&mut bytes))
        .map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
    let banner = bzimage_version(&bytes)
        .map(|v| format!("Linux version {v}"))
        .or_else(|| vmlinux_banner(&bytes));
    let version = banner.as_deref().and_then(|b| {
        b.strip_prefix("Linux version ")?
            .split_whitespace()
            .next()
            .map(str::to_owned)
    });
    let cached = path
        .parent()
        .map(|dir| dir.join("config"))
        .and_then(|config| read_limited(fs::File::open(config).ok()?));
    let (config_sha256, config_source) = match cached {
        Some(config) => (Some(hex(&config)), Some(ConfigSource::CacheEntry)),
        None => match embedded_config(&bytes) {
            Some(config) => (Some(hex(&config)), Some(ConfigSource::Embedded)),
            None => (None, None),
        },
    };
    Ok(KernelInfo {
        version,
        banner,
        config_sha256,
        config_source,
    })
}

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// At most [`MAX_CONFIG`] bytes from `reader`; `None` when there is more.
fn read_limited(reader: impl Read) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    reader.take(MAX_CONFIG + 1).read_to_end(&mut data).ok()?;
    (data.len() as u64 <= MAX_CONFIG).then_some(data)
}

/// The version string a bzImage's setup header points to (boot protocol 2.00+).
fn bzimage_version(bytes: &[u8]) -> Option<String> {
    if bytes.get(HEADER_MAGIC_AT..HEADER_MAGIC_AT + 4)? != HEADER_MAGIC {
        return None;
    }
    let at = bytes.get(KERNEL_VERSION_AT..KERNEL_VERSION_AT + 2)?;
    let offset = usize::from(u16::from_le_bytes([at[0], at[1]]));
    if offset == 0 {
        return None;
    }
    text_until_nul(bytes.get(offset + 0x200..)?)
}

/// The longest `Linux version …` line in an uncompressed kernel (a vmlinux also holds a
/// shorter variant without the build number).
fn vmlinux_banner(bytes: &[u8]) -> Option<String> {
    memchr::memmem::find_iter(bytes, BANNER)
        .filter_map(|at| text_until_nul(&bytes[at..]))
        .max_by_key(String::len)
}

/// Printable text up to a NUL or a newline, at most 256 bytes.
fn text_until_nul(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().take(256).position(|&b| b == 0 || b == b'\n')?;
    let text = std::str::from_utf8(&bytes[..end]).ok()?;
    (!text.is_empty() && text.chars().all(|c| !c.is_control())).then(|| text.to_owned())
}

/// The configuration CONFIG_IKCONFIG put between its markers, gunzipped.
fn embedded_config(bytes: &[u8]) -> Option<Vec<u8>> {
    let start = memchr::memmem::find(bytes, IKCONFIG_START)? + IKCONFIG_START.len();
    let len = memchr::memmem::find(&bytes[start..], IKCONFIG_END)?;
    read_limited(GzDecoder::new(&bytes[start..start + len]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    const LINE: &str = "Linux version 6.1.192 (root@vm) (gcc 12.2.0) #1 SMP Sun Nov 29 2026";

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn a_vmlinux_banner_gives_the_version_and_its_embedded_config_a_hash() {
        let dir = tempfile::tempdir().unwrap();
        let mut image = vec![0u8; 4096];
        image.extend_from_slice(b"Linux version 6.1.192 (root@vm) (gcc 12.2.0) # SMP \0");
        image.extend_from_slice(LINE.as_bytes());
        image.extend_from_slice(b"\n\0");
        image.extend_from_slice(IKCONFIG_START);
        image.extend_from_slice(&gzip(b"CONFIG_IO_URING=y\n"));
        image.extend_from_slice(IKCONFIG_END);
        let path = dir.path().join("vmlinux");
        fs::write(&path, &image).unwrap();

        let info = identify(&path).unwrap();
        assert_eq!(info.version.as_deref(), Some("6.1.192"));
        assert_eq!(info.banner.as_deref(), Some(LINE));
        assert_eq!(info.config_sha256, Some(hex(b"CONFIG_IO_URING=y\n")));
        assert_eq!(info.config_source, Some(ConfigSource::Embedded));
        assert_eq!(
            info.describe(),
            format!(
                "Linux 6.1.192, config sha256 {}",
                &hex(b"CONFIG_IO_URING=y\n")[..16]
            )
        );
    }

    #[test]
    fn the_cache_entry_config_is_preferred_to_the_embedded_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux");
        let mut image = LINE.as_bytes().to_vec();
        image.push(0);
        image.extend_from_slice(IKCONFIG_START);
        image.extend_from_slice(&gzip(b"embedded\n"));
        image.extend_from_slice(IKCONFIG_END);
        fs::write(&path, &image).unwrap();
        fs::write(dir.path().join("config"), b"cached\n").unwrap();
        let info = identify(&path).unwrap();
        assert_eq!(info.config_sha256, Some(hex(b"cached\n")));
        assert_eq!(info.config_source, Some(ConfigSource::CacheEntry));
    }

    #[test]
    fn an_embedded_config_that_inflates_past_the_limit_is_not_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux");
        let mut image = IKCONFIG_START.to_vec();
        image.extend_from_slice(&gzip(&vec![b'y'; MAX_CONFIG as usize + 1]));
        image.extend_from_slice(IKCONFIG_END);
        fs::write(&path, &image).unwrap();
        assert_eq!(identify(&path).unwrap().config_sha256, None);
    }

    #[test]
    fn a_bzimage_setup_header_gives_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut image = vec![0u8; 0x1000];
        image[HEADER_MAGIC_AT..HEADER_MAGIC_AT + 4].copy_from_slice(HEADER_MAGIC);
        // The version string at 0x200 + 0x300.
        image[KERNEL_VERSION_AT..KERNEL_VERSION_AT + 2].copy_from_slice(&0x300u16.to_le_bytes());
        let text = b"6.1.0-28-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        image[0x500..0x500 + text.len()].copy_from_slice(text);
        let path = dir.path().join("bzImage");
        fs::write(&path, &image).unwrap();
        let info = identify(&path).unwrap();
        assert_eq!(info.version.as_deref(), Some("6.1.0-28-amd64"));
        assert_eq!(info.config_sha256, None);
        assert_eq!(
            info.describe(),
            "Linux 6.1.0-28-amd64, build config unknown"
        );
    }

    #[test]
    fn a_file_without_a_banner_is_a_kernel_of_unknown_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.elf");
        // A header that points outside the file, and no banner.
        let mut image = vec![0xffu8; 0x300];
        image[HEADER_MAGIC_AT..HEADER_MAGIC_AT + 4].copy_from_slice(HEADER_MAGIC);
        fs::write(&path, &image).unwrap();
        let info = identify(&path).unwrap();
        assert_eq!(
            (info.version, info.banner, info.config_sha256),
            (None, None, None)
        );
        assert!(matches!(
            identify(&dir.path().join("missing")),
            Err(Error::Read { .. })
        ));
    }
}
