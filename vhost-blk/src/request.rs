//! virtio-blk requests: parsing a descriptor chain and carrying it out against the disk.
//! A pure function of guest memory, the chain and the disk, kept apart from the event
//! loop so that every malformed case is testable with real rings in memory.

use crate::disk::{self, Disk, GuestBuf, SECTOR_SIZE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap, Le32, Le64};

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the serial returned by GET_ID.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Segments accepted in one DISCARD or WRITE_ZEROES request (advertised in config).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Sectors in one DISCARD or WRITE_ZEROES segment (advertised in config).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;

const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("descriptor chain has no status descriptor")]
    NoStatus,
    #[error("descriptor chain is cut short (loop, bad index, or over 4 GiB)")]
    Truncated,
    #[error("status descriptor is not device-writable")]
    StatusReadOnly,
    #[error("request header is missing, too short, or device-writable")]
    BadHeader,
    #[error("request header at {0:#x} is outside guest memory")]
    HeaderMemory(u64),
    #[error("data descriptor has the wrong direction for request type {0}")]
    WrongDirection(u32),
    #[error("data length {0} is not a whole number of sectors")]
    PartialSector(u64),
    #[error("request reaches past the end of the disk (sector {sector}, {len} bytes)")]
    OutOfRange { sector: u64, len: u64 },
    #[error("discard/write-zeroes payload of {0} bytes is not whole segments, or too many")]
    BadSegments(u64),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error(transparent)]
    Disk(#[from] disk::Error),
}

/// `struct virtio_blk_outhdr`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct RequestHeader {
    request_type: Le32,
    ioprio: Le32,
    sector: Le64,
}

// SAFETY: plain little-endian integers with no padding; any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// `struct virtio_blk_discard_write_zeroes`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct Segment {
    sector: Le64,
    num_sectors: Le32,
    flags: Le32,
}

// SAFETY: plain little-endian integers with no padding; any bit pattern is valid.
unsafe impl ByteValued for Segment {}

/// What the device serves besides the disk itself.
#[derive(Debug)]
pub struct Device<'a> {
    pub disk: &'a Disk,
    pub read_only: bool,
    pub serial: &'a [u8],
}

/// A parsed request: header, data buffers and where the status byte goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub request_type: u32,
    pub sector: u64,
    pub data: Vec<GuestBuf>,
    pub status: GuestAddress,
}

/// The outcome for the used ring.
#[derive(Debug, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    /// Bytes written into device-writable buffers, status byte included.
    pub used_len: u32,
}

impl Request {
    /// Parses a chain. On error, the status descriptor (when the chain has a usable one)
    /// is returned with it so that the caller can still report IOERR to the driver.
    pub fn parse(
        mem: &GuestMemoryMmap,
        chain: &[Descriptor],
    ) -> Result<Self, (Error, Option<GuestAddress>)> {
        let last = chain.last().ok_or((Error::NoStatus, None))?;
        if last.has_next() {
            // The chain iterator stopped early: nothing in it can be trusted.
            return Err((Error::Truncated, None));
        }
        if chain.len() < 2 {
            return Err((Error::NoStatus, None));
        }
        if !last.is_write_only() || last.len() < 1 {
            return Err((Error::StatusReadOnly, None));
        }
        // The status byte is the last byte of the last descriptor.
        let status = GuestAddress(last.addr().0.wrapping_add(u64::from(last.len()) - 1));
        let fail = |e| (e, Some(status));

        let head = chain[0];
        if head.is_write_only() || (head.len() as usize) < std::mem::size_of::<RequestHeader>() {
            return Err(fail(Error::BadHeader));
        }
        let header: RequestHeader = mem
            .read_obj(head.addr())
            .map_err(|_| fail(Error::HeaderMemory(head.addr().0)))?;
        let request_type = header.request_type.to_native();

        let middle = &chain[1..chain.len() - 1];
        let mut data: Vec<GuestBuf> = middle.iter().map(|d| (d.addr(), d.len())).collect();
        // A status descriptor longer than one byte carries data in front of the status.
        if last.len() > 1 {
            data.push((last.addr(), last.len() - 1));
        }
        let device_writes = matches!(request_type, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
        let writable_ok = |d: &Descriptor| d.is_write_only() == device_writes;
        if !middle.iter().all(writable_ok) || (last.len() > 1 && !device_writes) {
            return Err(fail(Error::WrongDirection(request_type)));
        }
        Ok(Self {
            request_type,
            sector: header.sector.to_native(),
            data,
            status,
        })
    }

    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|&(_, len)| u64::from(len)).sum()
    }

    /// Carries the request out and writes its status byte.
    pub fn execute(&self, mem: &GuestMemoryMmap, device: &Device<'_>) -> Completion {
        let (status, data_written) = match self.run(mem, device) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
            Err(Failed(e)) => {
                log::warn!(
                    "request type {} at sector {}: {e}",
                    self.request_type,
                    self.sector
                );
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        let used_len = if write_status(mem, self.status, status) {
            data_written + 1
        } else {
            0
        };
        Completion { status, used_len }
    }

    /// Returns how many bytes went into device-writable data buffers.
    fn run(&self, mem: &GuestMemoryMmap, device: &Device<'_>) -> Result<u32, Outcome> {
        let disk = device.disk;
        let writes_disk = matches!(
            self.request_type,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
        );
        if writes_disk && device.read_only {
            return Err(Failed(Error::ReadOnly));
        }
        match self.request_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let len = self.data_len();
                if !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(Failed(Error::PartialSector(len)));
                }
                if !disk.contains(self.sector, len) {
                    return Err(Failed(Error::OutOfRange {
                        sector: self.sector,
                        len,
                    }));
                }
                let offset = self.sector * SECTOR_SIZE;
                if self.request_type == VIRTIO_BLK_T_IN {
                    disk.read_to_guest(mem, offset, &self.data)
                        .map_err(|e| Failed(e.into()))?;
                    Ok(len as u32)
                } else {
                    disk.write_from_guest(mem, offset, &self.data)
                        .map_err(|e| Failed(e.into()))?;
                    Ok(0)
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                disk.flush().map_err(|e| Failed(e.into()))?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
                let n = device.serial.len().min(VIRTIO_BLK_ID_BYTES);
                id[..n].copy_from_slice(&device.serial[..n]);
                let mut written = 0usize;
                for &(addr, len) in &self.data {
                    let take = (len as usize).min(id.len() - written);
                    mem.write_slice(&id[written..written + take], addr)
                        .map_err(|_| {
                            Failed(Error::Disk(disk::Error::GuestMemory { addr: addr.0, len }))
                        })?;
                    written += take;
                }
                Ok(written as u32)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                for segment in self.segments(mem)? {
                    let sector = segment.sector.to_native();
                    let len = u64::from(segment.num_sectors.to_native()) * SECTOR_SIZE;
                    if !disk.contains(sector, len) {
                        return Err(Failed(Error::OutOfRange { sector, len }));
                    }
                    let offset = sector * SECTOR_SIZE;
                    let unmap = segment.flags.to_native() & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                    let done = if self.request_type == VIRTIO_BLK_T_DISCARD || unmap {
                        disk.punch_hole(offset, len)
                    } else {
                        disk.write_zeroes(offset, len)
                    };
                    done.map_err(|e| Failed(e.into()))?;
                }
                Ok(0)
            }
            _ => Err(Unsupported),
        }
    }

    fn segments(&self, mem: &GuestMemoryMmap) -> Result<Vec<Segment>, Outcome> {
        let size = std::mem::size_of::<Segment>() as u64;
        let len = self.data_len();
        if len == 0 || !len.is_multiple_of(size) || len / size > u64::from(MAX_DISCARD_SEGMENTS) {
            return Err(Failed(Error::BadSegments(len)));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        for &(addr, n) in &self.data {
            let mut chunk = vec![0u8; n as usize];
            mem.read_slice(&mut chunk, addr).map_err(|_| {
                Failed(Error::Disk(disk::Error::GuestMemory {
                    addr: addr.0,
                    len: n,
                }))
            })?;
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes
            .chunks_exact(size as usize)
            .filter_map(Segment::from_slice)
            .copied()
            .collect())
    }
}

enum Outcome {
    Unsupported,
    Failed(Error),
}
use Outcome::{Failed, Unsupported};

/// What [`Request::parse`] made of one chain.
pub type Parsed = Result<Request, (Error, Option<GuestAddress>)>;

/// Completes one parsed chain on `queue` and returns its used length: a request is
/// carried out; a malformed chain gets IOERR when it has a usable status byte.
pub fn complete(queue: usize, mem: &GuestMemoryMmap, device: &Device<'_>, parsed: &Parsed) -> u32 {
    match parsed {
        Ok(request) => request.execute(mem, device).used_len,
        Err((e, status)) => {
            log::warn!("queue {queue}: malformed request: {e}");
            match status {
                Some(at) if write_status(mem, *at, VIRTIO_BLK_S_IOERR) => 1,
                _ => 0,
            }
        }
    }
}

/// Writes a status byte; false if its address is outside guest memory.
pub fn write_status(mem: &GuestMemoryMmap, addr: GuestAddress, status: u8) -> bool {
    mem.write_obj(status, addr).is_ok()
}
