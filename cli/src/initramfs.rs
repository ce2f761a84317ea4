//! A newc ("070701") cpio writer: the initramfs that carries the agent as /init.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
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
}
