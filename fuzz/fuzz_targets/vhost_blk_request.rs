//! vhost-blk: descriptor chains from a guest-controlled split queue, parsed and carried
//! out by `microagent_vhost_blk::request` against a small disk image (buffered and, where
//! the filesystem allows it, O_DIRECT), as `BlkBackend::process_queue` does.
//!
//! Input: byte 0 selects read-only (bit 0) and O_DIRECT (bit 1); the rest is guest
//! memory from address 0 (descriptor table at 0x0, available ring at 0x100, used ring at
//! 0x200, 16 descriptors).

#![no_main]

use libfuzzer_sys::fuzz_target;
use microagent_fuzz::{guest_memory, queue};
use microagent_vhost_blk::disk::{Disk, SECTOR_SIZE};
use microagent_vhost_blk::request::{Device, Request};
use std::sync::OnceLock;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueOwnedT;
use virtio_queue::QueueT;

const DISK_SECTORS: u64 = 64;

struct Disks {
    _dir: tempfile::TempDir,
    buffered: Disk,
    direct: Option<Disk>,
}

fn disks() -> &'static Disks {
    static DISKS: OnceLock<Disks> = OnceLock::new();
    DISKS.get_or_init(|| {
        // Not tmpfs: O_DIRECT needs a filesystem that supports it.
        let base = std::env::var_os("FUZZ_TMPDIR").unwrap_or_else(|| "/var/tmp".into());
        let dir = tempfile::tempdir_in(base).expect("fuzz: a temporary directory");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0xa5u8; (DISK_SECTORS * SECTOR_SIZE) as usize])
            .expect("fuzz: writing the disk image");
        let buffered = Disk::open(&path, false, false).expect("fuzz: opening the disk");
        let direct = Disk::open(&path, false, true).ok();
        Disks {
            _dir: dir,
            buffered,
            direct,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, memory)) = data.split_first() else {
        return;
    };
    let Some(mem) = guest_memory(memory) else {
        return;
    };
    let Some(mut q) = queue(&mem) else {
        return;
    };
    let disks = disks();
    let disk = match (flags & 2 != 0, &disks.direct) {
        (true, Some(direct)) => direct,
        _ => &disks.buffered,
    };
    let device = Device {
        disk,
        read_only: flags & 1 != 0,
        serial: b"fuzz-serial-0123456789",
    };
    let Ok(iter) = q.iter(&mem) else {
        return;
    };
    let chains: Vec<_> = iter
        .map(|chain| {
            let head = chain.head_index();
            let descriptors: Vec<Descriptor> = chain.collect();
            (head, Request::parse(&mem, &descriptors))
        })
        .collect();
    for (head, parsed) in chains {
        let used_len = microagent_vhost_blk::request::complete(0, &mem, &device, &parsed);
        if let Ok(request) = &parsed {
            assert!(
                u64::from(used_len) <= request.data_len() + 1,
                "used length {used_len} is more than the chain's {} bytes",
                request.data_len() + 1
            );
        }
        let _ = q.add_used(&mem, head, used_len);
    }
});
