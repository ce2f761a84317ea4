//! Test layers shared by the image tests.

use tar::{Builder, EntryType, Header};

pub fn header(path: &str, kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h
}

fn file(b: &mut Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    b.append(
        &header(path, EntryType::Regular, mode, data.len() as u64),
        data,
    )
    .unwrap();
}

fn dir(b: &mut Builder<Vec<u8>>, path: &str, mode: u32) {
    b.append(&header(path, EntryType::Directory, mode, 0), &[][..])
        .unwrap();
}

fn link(b: &mut Builder<Vec<u8>>, kind: EntryType, path: &str, target: &str) {
    let mut h = header(path, kind, 0o777, 0);
    h.set_link_name(target).unwrap();
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
}

/// Two layers: the second deletes a file and replaces a directory's contents.
pub fn layers() -> (Vec<u8>, Vec<u8>) {
    let mut one = Builder::new(Vec::new());
    dir(&mut one, "bin/", 0o755);
    file(&mut one, "bin/tool", 0o755, b"#!/bin/sh\necho tool\n");
    dir(&mut one, "etc/", 0o755);
    file(&mut one, "etc/old.conf", 0o644, b"old\n");
    file(&mut one, "etc/keep.conf", 0o600, b"keep\n");
    dir(&mut one, "data/", 0o750);
    file(&mut one, "data/a", 0o644, b"a\n");
    file(&mut one, "data/b", 0o644, b"b\n");
    link(&mut one, EntryType::Symlink, "bin/sh", "tool");
    link(&mut one, EntryType::Link, "bin/tool-hard", "bin/tool");
    let one = one.into_inner().unwrap();

    let mut two = Builder::new(Vec::new());
    file(&mut two, "etc/.wh.old.conf", 0o644, b"");
    dir(&mut two, "data/", 0o750);
    file(&mut two, "data/.wh..wh..opq", 0o644, b"");
    file(&mut two, "data/c", 0o640, b"c\n");
    let two = two.into_inner().unwrap();
    (one, two)
}
