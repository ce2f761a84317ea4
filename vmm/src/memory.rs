//! Guest memory: one memfd, sealed against shrinking, mapped shared so that vhost-user
//! daemons can map the same pages (VHOST_USER_SET_MEM_TABLE).

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating the guest memory memfd: {0}")]
    Memfd(io::Error),
    #[error("sizing guest memory to {size} bytes: {source}")]
    Size { size: u64, source: io::Error },
    #[error("sealing guest memory: {0}")]
    Seal(io::Error),
    #[error("mapping guest memory: {0}")]
    Map(String),
    #[error("guest memory of {0} MiB is too small (at least 16 MiB)")]
    TooSmall(u64),
}

/// The guest RAM ranges for `size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Creates `mib` MiB of guest memory backed by one memfd.
pub fn create(mib: u64) -> Result<GuestMemoryMmap, Error> {
    if mib < 16 {
        return Err(Error::TooSmall(mib));
    }
    let size = mib << 20;
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"microagent-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(Error::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| Error::Size { size, source })?;
    // SAFETY: F_ADD_SEALS on our own memfd with valid seal flags.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } < 0 {
        return Err(Error::Seal(io::Error::last_os_error()));
    }
    let mut offset = 0;
    let ranges: Vec<_> = ram_ranges(size)
        .into_iter()
        .map(|(addr, len)| {
            let range = (
                addr,
                len as usize,
                Some(FileOffset::new(file.try_clone()?, offset)),
            );
            offset += len;
            Ok(range)
        })
        .collect::<Result<_, io::Error>>()
        .map_err(|e| Error::Map(e.to_string()))?;
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| Error::Map(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn memory_above_the_gap_resumes_at_4_gib() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            ranges[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
    }

    #[test]
    fn guest_memory_is_one_shared_sealed_memfd() {
        let mem = create(32).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let region = mem.iter().next().unwrap();
        let file = region.file_offset().unwrap().file();
        use std::os::fd::AsRawFd;
        // SAFETY: F_GET_SEALS on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        assert!(seals & libc::F_SEAL_SHRINK != 0);
        // The same bytes are visible through the file: the mapping is shared.
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 4];
        file.read_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert!(matches!(create(8), Err(Error::TooSmall(8))));
    }
}
