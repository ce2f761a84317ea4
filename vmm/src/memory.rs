//! Guest memory: one memfd, sealed against shrinking, mapped shared so that vhost-user
//! daemons can map the same pages (VHOST_USER_SET_MEM_TABLE), and advised for
//! transparent huge pages.
//!
//! Huge pages matter most for boot: Linux writes all of its memory early on (struct
//! pages, and every free page with `init_on_free=1`), and each first touch of a 4 KiB
//! page is a fault in the host. A memfd gets huge pages only when the host allows them
//! for shmem (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` `advise` or
//! `always`; Debian's default is `never`, and `microagent doctor` says so). In the
//! nested rig a 512 MiB Linux guest reached its agent in about 11 s with them against
//! 27-36 s without (docs/benchmarks.md, "Boot to exec-ready").

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
    let mem =
        GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| Error::Map(e.to_string()))?;
    for region in mem.iter() {
        // SAFETY: madvise on a mapping this GuestMemoryMmap owns, of its own length;
        // MADV_HUGEPAGE changes how pages are allocated, never their contents.
        let advised = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if advised != 0 {
            // A kernel without transparent huge pages: 4 KiB pages work the same.
            log::debug!(
                "guest memory: no huge page advice: {}",
                io::Error::last_os_error()
            );
        }
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

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

    /// The advice is what lets the host back guest memory with huge pages (where its
    /// shmem setting allows): smaps shows it as the `hg` flag of the mapping.
    #[test]
    fn guest_memory_is_advised_for_huge_pages() {
        let mem = create(32).unwrap();
        let start = mem.iter().next().unwrap().as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let flags = smaps
            .lines()
            .skip_while(|l| !l.starts_with(&format!("{start:x}-")))
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .expect("the guest memory mapping in smaps");
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "VmFlags:{flags}"
        );
    }
}
