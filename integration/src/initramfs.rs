//! Test initramfs images with busybox-static, built on the CLI's cpio writer.

pub use microagent_cli::initramfs::{Error, Initramfs};
use std::fs;

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// An initramfs holding busybox as `/bin/busybox` and `/bin/sh`, and `init` (a shell
/// script run by busybox) as `/init`. The script's applets are installed by
/// `busybox --install -s` before it runs.
pub fn busybox_init(init_script: &str) -> Result<Initramfs, Error> {
    let busybox = fs::read(BUSYBOX).map_err(|source| Error::Read {
        path: BUSYBOX.into(),
        source,
    })?;
    assert!(
        is_static_elf(&busybox),
        "{BUSYBOX} is not static (apt-get install busybox-static)"
    );
    let mut image = Initramfs::new();
    image.file("bin/busybox", &busybox, 0o755);
    image.symlink("bin/sh", "busybox");
    let script = format!(
        "#!/bin/busybox sh\n/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin\n\
         /bin/busybox --install -s\n{init_script}"
    );
    image.file("init", script.as_bytes(), 0o755);
    Ok(image)
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

    #[test]
    fn debian_busybox_is_static_and_a_dynamic_binary_is_not() {
        assert!(is_static_elf(&fs::read(BUSYBOX).unwrap()));
        assert!(!is_static_elf(&fs::read("/bin/ls").unwrap()));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
    }
}
