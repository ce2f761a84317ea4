//! The raw disk image behind the device: positional I/O straight between the file and
//! guest memory, flush, and hole punching.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

pub const SECTOR_SIZE: u64 = 512;

/// Alignment of bounce buffers for `O_DIRECT`.
const DIRECT_IO_ALIGN: usize = 4096;
/// Largest bounce buffer: a request moves through it in pieces of this size, so its
/// memory does not depend on the lengths a guest puts in its descriptors.
pub const BOUNCE_MAX: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {path}: {source}")]
    Metadata { path: PathBuf, source: io::Error },
    #[error("disk image {path} is {size} bytes, not a whole number of 512-byte sectors")]
    NotSectorAligned { path: PathBuf, size: u64 },
    #[error("guest buffer at {addr:#x} (+{len}) is outside guest memory")]
    GuestMemory { addr: u64, len: u32 },
    #[error("disk I/O at byte {offset}: {source}")]
    Io { offset: u64, source: io::Error },
    #[error("disk ended at byte {offset} in the middle of a request")]
    ShortIo { offset: u64 },
}

/// A guest buffer: address and length.
pub type GuestBuf = (GuestAddress, u32);

#[derive(Debug)]
pub struct Disk {
    file: File,
    sectors: u64,
    direct_io: bool,
}

impl Disk {
    pub fn open(path: &Path, read_only: bool, direct_io: bool) -> Result<Self, Error> {
        let mut options = OpenOptions::new();
        options.read(true).write(!read_only);
        if direct_io {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
        let size = file
            .metadata()
            .map_err(|source| Error::Metadata {
                path: path.to_owned(),
                source,
            })?
            .len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::NotSectorAligned {
                path: path.to_owned(),
                size,
            });
        }
        Ok(Self {
            file,
            sectors: size / SECTOR_SIZE,
            direct_io,
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether `len` bytes starting at `sector` lie inside the disk.
    pub fn contains(&self, sector: u64, len: u64) -> bool {
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(len));
        end.is_some_and(|end| end <= self.sectors * SECTOR_SIZE)
    }

    /// Reads the disk from byte `offset` into the guest buffers, in order.
    pub fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        bufs: &[GuestBuf],
    ) -> Result<(), Error> {
        // Every buffer is checked against guest memory before anything is allocated.
        let slices = guest_slices(mem, bufs)?;
        if self.direct_io {
            let total = total_len(bufs);
            let mut bounce = AlignedBuf::new(total.min(BOUNCE_MAX));
            let mut cursor = Cursor::new(bufs);
            let mut done = 0;
            while done < total {
                let n = (total - done).min(BOUNCE_MAX);
                let piece = offset + done as u64;
                self.transfer(piece, &mut [bounce.iovec(n)], Direction::FromDisk)?;
                cursor.write_guest(mem, &bounce.as_slice()[..n])?;
                done += n;
            }
            return Ok(());
        }
        let mut iovecs = iovecs(&slices);
        self.transfer(offset, &mut iovecs, Direction::FromDisk)
    }

    /// Writes the guest buffers, in order, to the disk from byte `offset`.
    pub fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        bufs: &[GuestBuf],
    ) -> Result<(), Error> {
        // Every buffer is checked against guest memory before anything is allocated.
        let slices = guest_slices(mem, bufs)?;
        if self.direct_io {
            let total = total_len(bufs);
            let mut bounce = AlignedBuf::new(total.min(BOUNCE_MAX));
            let mut cursor = Cursor::new(bufs);
            let mut done = 0;
            while done < total {
                let n = (total - done).min(BOUNCE_MAX);
                cursor.read_guest(mem, &mut bounce.as_mut_slice()[..n])?;
                let piece = offset + done as u64;
                self.transfer(piece, &mut [bounce.iovec(n)], Direction::ToDisk)?;
                done += n;
            }
            return Ok(());
        }
        let mut iovecs = iovecs(&slices);
        self.transfer(offset, &mut iovecs, Direction::ToDisk)
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), Error> {
        self.file
            .sync_data()
            .map_err(|source| Error::Io { offset: 0, source })
    }

    /// Deallocates a byte range (reads return zeroes afterwards).
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes a byte range, keeping it allocated.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Error> {
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // Filesystems without ZERO_RANGE (tmpfs) still punch holes, which read as zeroes.
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.punch_hole(offset, len)
            }
            other => other,
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> Result<(), Error> {
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(Error::ShortIo { offset });
        };
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
        if ret < 0 {
            return Err(Error::Io {
                offset,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// preadv/pwritev until every iovec is done.
    fn transfer(
        &self,
        mut offset: u64,
        mut iovecs: &mut [libc::iovec],
        direction: Direction,
    ) -> Result<(), Error> {
        while !iovecs.is_empty() {
            let count = iovecs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
            let off = i64::try_from(offset).map_err(|_| Error::ShortIo { offset })?;
            let fd = self.file.as_raw_fd();
            let ret = match direction {
                // SAFETY: every iovec points into guest memory (kept mapped by the caller's
                // memory guard) or a bounce buffer, valid for its length; the kernel writes
                // only within them.
                Direction::FromDisk => unsafe { libc::preadv(fd, iovecs.as_ptr(), count, off) },
                // SAFETY: as above; the kernel only reads the buffers.
                Direction::ToDisk => unsafe { libc::pwritev(fd, iovecs.as_ptr(), count, off) },
            };
            if ret < 0 {
                let source = io::Error::last_os_error();
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io { offset, source });
            }
            if ret == 0 {
                return Err(Error::ShortIo { offset });
            }
            offset += ret as u64;
            iovecs = advance(iovecs, ret as usize);
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Direction {
    FromDisk,
    ToDisk,
}

fn total_len(bufs: &[GuestBuf]) -> usize {
    bufs.iter().map(|&(_, len)| len as usize).sum()
}

/// The host slices behind the guest buffers; fails if any byte is outside guest memory.
fn guest_slices<'m>(
    mem: &'m GuestMemoryMmap,
    bufs: &[GuestBuf],
) -> Result<Vec<VolatileSlice<'m>>, Error> {
    let mut slices = Vec::with_capacity(bufs.len());
    for &(addr, len) in bufs {
        let bad = || Error::GuestMemory { addr: addr.0, len };
        if !GuestMemoryBackend::check_range(mem, addr, len as usize) {
            return Err(bad());
        }
        for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
            slices.push(slice.map_err(|_| bad())?);
        }
    }
    Ok(slices)
}

fn iovecs(slices: &[VolatileSlice<'_>]) -> Vec<libc::iovec> {
    slices
        .iter()
        .map(|slice| libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        })
        .collect()
}

/// Drops `n` transferred bytes from the front of `iovecs`.
fn advance(iovecs: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    let mut first = 0;
    while first < iovecs.len() && n >= iovecs[first].iov_len {
        n -= iovecs[first].iov_len;
        first += 1;
    }
    let rest = &mut iovecs[first..];
    if let Some(iov) = rest.first_mut() {
        // SAFETY: n < iov_len, so the new base stays inside the same buffer.
        iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
        iov.iov_len -= n;
    }
    rest
}

fn copy_to_guest(mem: &GuestMemoryMmap, addr: GuestAddress, data: &[u8]) -> Result<(), Error> {
    use vm_memory::Bytes;
    mem.write_slice(data, addr).map_err(|_| Error::GuestMemory {
        addr: addr.0,
        len: data.len() as u32,
    })
}

fn copy_from_guest(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    data: &mut [u8],
) -> Result<(), Error> {
    use vm_memory::Bytes;
    mem.read_slice(data, addr).map_err(|_| Error::GuestMemory {
        addr: addr.0,
        len: data.len() as u32,
    })
}

/// A position in a list of guest buffers, which bounce-buffer pieces are copied to or
/// from in order.
struct Cursor<'b> {
    bufs: &'b [GuestBuf],
    /// Index of the current buffer, and bytes of it already copied.
    index: usize,
    within: u32,
}

impl<'b> Cursor<'b> {
    fn new(bufs: &'b [GuestBuf]) -> Self {
        Self {
            bufs,
            index: 0,
            within: 0,
        }
    }

    /// The next run of guest bytes, at most `max` long: (address, length).
    fn next_run(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        while let Some(&(addr, len)) = self.bufs.get(self.index) {
            let left = (len - self.within) as usize;
            if left == 0 {
                self.index += 1;
                self.within = 0;
                continue;
            }
            let n = left.min(max);
            let at = GuestAddress(addr.0 + u64::from(self.within));
            self.within += n as u32;
            return Some((at, n));
        }
        None
    }

    fn write_guest(&mut self, mem: &GuestMemoryMmap, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() {
            let (at, n) = self
                .next_run(data.len())
                .ok_or(Error::ShortIo { offset: 0 })?;
            copy_to_guest(mem, at, &data[..n])?;
            data = &data[n..];
        }
        Ok(())
    }

    fn read_guest(&mut self, mem: &GuestMemoryMmap, mut data: &mut [u8]) -> Result<(), Error> {
        while !data.is_empty() {
            let (at, n) = self
                .next_run(data.len())
                .ok_or(Error::ShortIo { offset: 0 })?;
            let (head, tail) = data.split_at_mut(n);
            copy_from_guest(mem, at, head)?;
            data = tail;
        }
        Ok(())
    }
}

/// A zeroed heap buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        // A zero-sized allocation is not allowed; one aligned block is harmless.
        let size = len.max(1).next_multiple_of(DIRECT_IO_ALIGN);
        let layout = std::alloc::Layout::from_size_align(size, DIRECT_IO_ALIGN)
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<u8>()));
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { ptr, len, layout }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of layout.size() >= len zeroed bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The first `len` bytes as one iovec: aligned start (`len` is whole sectors).
    fn iovec(&mut self, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: len.min(self.len),
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}
