//! A newc ("070701") cpio writer for test initramfs images, with busybox-static.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} is not a static busybox (apt-get install busybox-static)")]
    NotStaticBusybox { path: PathBuf },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// An initramfs under construction. Parent directories are created implicitly.
#[derive(Debug, Default)]
pub struct Initramfs {
    archive: Vec<u8>,
    dirs: BTreeSet<String>,
    next_ino: u32,
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// An initramfs holding busybox as `/bin/busybox` and `/bin/sh`, and `init` (a shell
    /// script run by busybox) as `/init`. The script's applets are installed by
    /// `busybox --install -s` before it runs.
    pub fn busybox_init(init_script: &str) -> Result<Self, Error> {
        let busybox = fs::read(BUSYBOX).map_err(|source| Error::Read {
            path: BUSYBOX.into(),
            source,
        })?;
        if !is_static_elf(&busybox) {
            return Err(Error::NotStaticBusybox {
                path: BUSYBOX.into(),
            });
        }
        let mut image = Self::new();
        image.file("bin/busybox", &busybox, 0o755);
        image.symlink("bin/sh", "busybox");
        let script = format!(
            "#!/bin/busybox sh\n/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin\n\
             /bin/busybox --install -s\n{init_script}"
        );
        image.file("init", script.as_bytes(), 0o755);
        Ok(image)
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return self;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_owned());
        self.entry(path, S_IFDIR | 0o755, b"");
        self
    }

    pub fn file(&mut self, path: &str, contents: &[u8], mode: u32) -> &mut Self {
        let path = self.parent_ready(path);
        self.entry(&path, S_IFREG | (mode & 0o7777), contents);
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let path = self.parent_ready(path);
        self.entry(&path, S_IFLNK | 0o777, target.as_bytes());
        self
    }

    /// Finishes the archive and writes it to `path`.
    pub fn write(mut self, path: &Path) -> Result<(), Error> {
        self.entry("TRAILER!!!", 0, b"");
        fs::write(path, &self.archive).map_err(|source| Error::Write {
            path: path.to_owned(),
            source,
        })
    }

    fn parent_ready(&mut self, path: &str) -> String {
        let path = path.trim_matches('/').to_owned();
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        path
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            name.len() as u32 + 1,
            0, // check
        ];
        self.archive.extend_from_slice(b"070701");
        for field in fields {
            self.archive
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.archive.extend_from_slice(name.as_bytes());
        self.archive.push(0);
        self.pad();
        self.archive.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.archive.len().is_multiple_of(4) {
            self.archive.push(0);
        }
    }
}

/// An ELF executable without a PT_INTERP program header, i.e. statically linked.
fn is_static_elf(image: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let read_u16 = |at: usize| {
        image
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let read_u32 = |at: usize| {
        image
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let read_u64 = |at: usize| {
        image
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // 64-bit little-endian ELF only.
    if image.get(..6) != Some(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (read_u64(0x20), read_u16(0x36), read_u16(0x38))
    else {
        return false;
    };
    (0..u64::from(phnum)).all(|i| {
        let at = phoff + i * u64::from(phentsize);
        usize::try_from(at)
            .ok()
            .and_then(read_u32)
            .is_some_and(|p_type| p_type != PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn cpio_lists_every_entry_with_parents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd.cpio");
        let mut image = Initramfs::new();
        image.file("etc/deep/motd", b"hello", 0o644);
        image.symlink("bin/link", "../etc/deep/motd");
        image.write(&path).unwrap();

        let out = Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8(out.stdout).unwrap();
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(
            names,
            ["etc", "etc/deep", "etc/deep/motd", "bin", "bin/link"]
        );
    }

    #[test]
    fn cpio_extracts_contents_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd.cpio");
        let mut image = Initramfs::new();
        image.file("run.sh", b"#!/bin/sh\necho odd-length\n", 0o750);
        image.symlink("link", "run.sh");
        image.write(&path).unwrap();

        let out_dir = dir.path().join("out");
        fs::create_dir(&out_dir).unwrap();
        let status = Command::new("cpio")
            .args(["-i", "--quiet", "-F"])
            .arg(&path)
            .current_dir(&out_dir)
            .status()
            .unwrap();
        assert!(status.success());
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(out_dir.join("run.sh")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
        assert_eq!(
            fs::read(out_dir.join("run.sh")).unwrap(),
            b"#!/bin/sh\necho odd-length\n"
        );
        assert_eq!(
            fs::read_link(out_dir.join("link")).unwrap(),
            Path::new("run.sh")
        );
    }

    #[test]
    fn debian_busybox_is_static_and_a_dynamic_binary_is_not() {
        assert!(is_static_elf(&fs::read(BUSYBOX).unwrap()));
        assert!(!is_static_elf(&fs::read("/bin/ls").unwrap()));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
    }
}
