//! `microagent-vhost-blk` driven by the host-side frontend harness: a real daemon
//! process, a memfd shared as guest memory, and virtqueues built by hand.

use microagent_integration::daemon::Daemon;
use microagent_integration::frontend::{self, Buf, Frontend, GuestMemory, Setup, VirtQueue};
use microagent_integration::fuse::StoppableMount;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tempfile::TempDir;
use vhost::vhost_user::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestAddress;

const WAIT: Duration = Duration::from_secs(10);
const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

struct Rig {
    dir: TempDir,
    disk: PathBuf,
    daemon: Daemon,
    mem: GuestMemory,
    fe: Frontend,
}

/// A daemon serving a disk of `disk_size` bytes (filled by `fill`), connected.
fn rig_with(disk_size: usize, fill: impl Fn(usize) -> u8, args: &[&str], setup: Setup) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, (0..disk_size).map(fill).collect::<Vec<u8>>()).unwrap();
    let socket = dir.path().join("blk.sock");
    let mut argv: Vec<&str> = vec!["--disk", disk.to_str().unwrap()];
    argv.extend_from_slice(args);
    let daemon = Daemon::start("microagent-vhost-blk", &socket, &argv).unwrap();
    connected(dir, disk, daemon, &socket, &setup)
}

/// A rig around `daemon`, already serving `disk` on `socket`: 16 MiB of guest memory, the
/// frontend connected with `setup`.
fn connected(dir: TempDir, disk: PathBuf, daemon: Daemon, socket: &Path, setup: &Setup) -> Rig {
    let mut mem = GuestMemory::new(16 << 20).unwrap();
    let fe = Frontend::connect(socket, &mut mem, setup).unwrap();
    Rig {
        dir,
        disk,
        daemon,
        mem,
        fe,
    }
}

fn rig(args: &[&str]) -> Rig {
    rig_with(1 << 20, |_| 0, args, Setup::default())
}

fn header(request_type: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&request_type.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

enum Data<'a> {
    None,
    /// Device reads these buffers (OUT, DISCARD, WRITE_ZEROES).
    Out(&'a [&'a [u8]]),
    /// Device writes buffers of these lengths (IN, GET_ID).
    In(&'a [u32]),
}

struct Done {
    status: u8,
    used_len: u32,
    data: Vec<u8>,
}

/// One request on `queue`: header, data buffers, one status byte.
fn request(rig: &mut Rig, queue: usize, request_type: u32, sector: u64, data: Data) -> Done {
    let mark = rig.mem.mark();
    let hdr = rig.mem.alloc(16, 16).unwrap();
    rig.mem.write(hdr, &header(request_type, sector));
    let mut bufs = vec![Buf::readable(hdr, 16)];
    let mut inputs = Vec::new();
    match data {
        Data::None => {}
        Data::Out(chunks) => {
            for chunk in chunks {
                let at = rig.mem.alloc(chunk.len() as u64, 512).unwrap();
                rig.mem.write(at, chunk);
                bufs.push(Buf::readable(at, chunk.len() as u32));
            }
        }
        Data::In(lens) => {
            for &len in lens {
                let at = rig.mem.alloc(u64::from(len), 512).unwrap();
                rig.mem.write(at, &vec![0xEE; len as usize]);
                bufs.push(Buf::writable(at, len));
                inputs.push((at, len));
            }
        }
    }
    let status_at = rig.mem.alloc(1, 1).unwrap();
    rig.mem.write(status_at, &[0xFF]);
    bufs.push(Buf::writable(status_at, 1));
    let q = &mut rig.fe.queues[queue];
    let head = q.submit(&rig.mem, &bufs).unwrap();
    let used = q.wait_used(&rig.mem, 1, WAIT).unwrap();
    assert_eq!(used[0].0, head, "completion for another chain");
    let mut out = Vec::new();
    for (at, len) in inputs {
        out.extend(rig.mem.read(at, len as usize));
    }
    let status = rig.mem.read(status_at, 1)[0];
    rig.mem.release_to(mark);
    Done {
        status,
        used_len: used[0].1,
        data: out,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = Vec::with_capacity(16);
    s.extend_from_slice(&sector.to_le_bytes());
    s.extend_from_slice(&sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn config_space_and_features_describe_the_disk() {
    let mut rig = rig(&["--queues", "2"]);
    let config = rig.fe.config(60).unwrap();
    let capacity = u64::from_le_bytes(config[0..8].try_into().unwrap());
    assert_eq!(capacity, (1 << 20) / 512);
    assert_eq!(
        u16::from_le_bytes([config[34], config[35]]),
        2,
        "num_queues"
    );
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert!(
            rig.fe.features & (1 << bit) != 0,
            "feature bit {bit} missing"
        );
    }
    assert_eq!(rig.fe.features & (1 << VIRTIO_BLK_F_RO), 0);
    assert!(rig
        .fe
        .protocol_features
        .contains(VhostUserProtocolFeatures::DEVICE_STATE | VhostUserProtocolFeatures::CONFIG));
}

#[test]
fn write_then_read_returns_the_data_and_reaches_the_file() {
    let mut rig = rig(&[]);
    let data = pattern(8192, 7);
    let done = request(
        &mut rig,
        0,
        VIRTIO_BLK_T_OUT,
        16,
        Data::Out(&[&data[..4096], &data[4096..]]),
    );
    assert_eq!((done.status, done.used_len), (S_OK, 1));
    assert_eq!(&fs::read(&rig.disk).unwrap()[8192..16384], &data[..]);

    let done = request(
        &mut rig,
        0,
        VIRTIO_BLK_T_IN,
        16,
        Data::In(&[512, 3584, 4096]),
    );
    assert_eq!(done.status, S_OK);
    assert_eq!(
        done.used_len,
        8192 + 1,
        "used length counts data and status"
    );
    assert_eq!(done.data, data);
}

#[test]
fn direct_io_reads_and_writes_like_buffered_io() {
    let mut rig = rig(&["--direct-io"]);
    let data = pattern(4096 + 512, 3);
    // Odd-sized, sector-multiple buffers go through the aligned bounce buffer.
    let done = request(
        &mut rig,
        0,
        VIRTIO_BLK_T_OUT,
        3,
        Data::Out(&[&data[..1536], &data[1536..]]),
    );
    assert_eq!(done.status, S_OK);
    let done = request(&mut rig, 0, VIRTIO_BLK_T_IN, 3, Data::In(&[4608]));
    assert_eq!(done.status, S_OK);
    assert_eq!(done.data, data);
    assert_eq!(&fs::read(&rig.disk).unwrap()[1536..1536 + 4608], &data[..]);
}

#[test]
fn flush_succeeds_and_get_id_returns_the_serial() {
    let mut rig = rig(&["--serial", "disk-serial-1"]);
    let done = request(&mut rig, 0, VIRTIO_BLK_T_FLUSH, 0, Data::None);
    assert_eq!((done.status, done.used_len), (S_OK, 1));

    let done = request(&mut rig, 0, VIRTIO_BLK_T_GET_ID, 0, Data::In(&[20]));
    assert_eq!(done.status, S_OK);
    assert_eq!(done.used_len, 21);
    let mut expected = b"disk-serial-1".to_vec();
    expected.resize(20, 0);
    assert_eq!(done.data, expected);
}

#[test]
fn discard_punches_a_hole_in_the_host_file() {
    let mut rig = rig_with(4 << 20, |i| (i % 251) as u8 | 1, &[], Setup::default());
    let blocks_before = fs::metadata(&rig.disk).unwrap().blocks();
    let seg = segment(0, 2048, 0); // the first MiB
    let done = request(&mut rig, 0, VIRTIO_BLK_T_DISCARD, 0, Data::Out(&[&seg]));
    assert_eq!(done.status, S_OK);
    let meta = fs::metadata(&rig.disk).unwrap();
    assert_eq!(meta.len(), 4 << 20, "discard must not change the size");
    assert!(
        meta.blocks() + 2048 <= blocks_before,
        "no hole: {} blocks before, {} after",
        blocks_before,
        meta.blocks()
    );
    let contents = fs::read(&rig.disk).unwrap();
    assert!(contents[..1 << 20].iter().all(|&b| b == 0));
    assert!(
        contents[(1 << 20)..].iter().all(|&b| b != 0),
        "discard went too far"
    );
}

#[test]
fn write_zeroes_zeroes_exactly_the_range() {
    let mut rig = rig_with(1 << 20, |_| 0xAB, &[], Setup::default());
    let segs = [segment(8, 8, 0), segment(100, 1, 1)];
    let done = request(
        &mut rig,
        0,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        Data::Out(&[&segs[0], &segs[1]]),
    );
    assert_eq!(done.status, S_OK);
    let contents = fs::read(&rig.disk).unwrap();
    assert!(contents[4096..8192].iter().all(|&b| b == 0));
    assert!(contents[100 * 512..101 * 512].iter().all(|&b| b == 0));
    assert!(contents[..4096].iter().all(|&b| b == 0xAB));
    assert!(contents[8192..100 * 512].iter().all(|&b| b == 0xAB));
    assert!(contents[101 * 512..].iter().all(|&b| b == 0xAB));
}

#[test]
fn read_only_disk_fails_writes_and_never_touches_the_file() {
    let mut rig = rig_with(1 << 20, |i| i as u8, &["--read-only"], Setup::default());
    let before = fs::read(&rig.disk).unwrap();
    assert!(rig.fe.features & (1 << VIRTIO_BLK_F_RO) != 0);
    assert_eq!(rig.fe.features & (1 << VIRTIO_BLK_F_DISCARD), 0);

    let data = pattern(512, 1);
    let done = request(&mut rig, 0, VIRTIO_BLK_T_OUT, 0, Data::Out(&[&data]));
    assert_eq!(done.status, S_IOERR);
    let seg = segment(0, 8, 0);
    let done = request(&mut rig, 0, VIRTIO_BLK_T_DISCARD, 0, Data::Out(&[&seg]));
    assert_eq!(done.status, S_IOERR);
    let done = request(
        &mut rig,
        0,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        Data::Out(&[&seg]),
    );
    assert_eq!(done.status, S_IOERR);
    assert_eq!(fs::read(&rig.disk).unwrap(), before);

    let done = request(&mut rig, 0, VIRTIO_BLK_T_IN, 1, Data::In(&[512]));
    assert_eq!(done.status, S_OK);
    assert_eq!(done.data, before[512..1024]);
}

/// Submits a raw chain on queue 0 and returns its used length.
fn raw(rig: &mut Rig, bufs: &[Buf]) -> u32 {
    let q: &mut VirtQueue = &mut rig.fe.queues[0];
    q.submit(&rig.mem, bufs).unwrap();
    q.wait_used(&rig.mem, 1, WAIT).unwrap()[0].1
}

#[test]
fn malformed_requests_get_errors_and_the_queue_keeps_working() {
    let mut rig = rig(&[]);
    let hdr_in = rig.mem.alloc(16, 16).unwrap();
    rig.mem.write(hdr_in, &header(VIRTIO_BLK_T_IN, 0));
    let data = rig.mem.alloc(4096, 512).unwrap();
    let status = rig.mem.alloc(1, 1).unwrap();
    let status_of = |rig: &Rig| rig.mem.read(status, 1)[0];
    let outside = GuestAddress(rig.mem.size() + 4096);

    // Only a header: no status descriptor to report anything in.
    assert_eq!(raw(&mut rig, &[Buf::readable(hdr_in, 16)]), 0);

    // Header in a device-writable buffer.
    rig.mem.write(status, &[0xFF]);
    let used = raw(
        &mut rig,
        &[
            Buf::writable(hdr_in, 16),
            Buf::writable(data, 512),
            Buf::writable(status, 1),
        ],
    );
    assert_eq!((used, status_of(&rig)), (1, S_IOERR));

    // Header too short.
    rig.mem.write(status, &[0xFF]);
    let used = raw(
        &mut rig,
        &[Buf::readable(hdr_in, 8), Buf::writable(status, 1)],
    );
    assert_eq!((used, status_of(&rig)), (1, S_IOERR));

    // IN whose data buffer the device may not write.
    rig.mem.write(status, &[0xFF]);
    let used = raw(
        &mut rig,
        &[
            Buf::readable(hdr_in, 16),
            Buf::readable(data, 512),
            Buf::writable(status, 1),
        ],
    );
    assert_eq!((used, status_of(&rig)), (1, S_IOERR));

    // Data buffer outside guest memory.
    rig.mem.write(status, &[0xFF]);
    let used = raw(
        &mut rig,
        &[
            Buf::readable(hdr_in, 16),
            Buf::writable(outside, 512),
            Buf::writable(status, 1),
        ],
    );
    assert_eq!((used, status_of(&rig)), (1, S_IOERR));

    // Header outside guest memory.
    rig.mem.write(status, &[0xFF]);
    let used = raw(
        &mut rig,
        &[Buf::readable(outside, 16), Buf::writable(status, 1)],
    );
    assert_eq!((used, status_of(&rig)), (1, S_IOERR));

    // Status byte outside guest memory: nothing can be reported.
    let used = raw(
        &mut rig,
        &[Buf::readable(hdr_in, 16), Buf::writable(outside, 1)],
    );
    assert_eq!(used, 0);

    // Status descriptor the device may not write.
    let used = raw(
        &mut rig,
        &[Buf::readable(hdr_in, 16), Buf::readable(status, 1)],
    );
    assert_eq!(used, 0);

    // Sector beyond the end of the disk, and a request straddling it.
    for sector in [2048, 2047, u64::MAX / 512] {
        rig.mem.write(hdr_in, &header(VIRTIO_BLK_T_IN, sector));
        rig.mem.write(status, &[0xFF]);
        let used = raw(
            &mut rig,
            &[
                Buf::readable(hdr_in, 16),
                Buf::writable(data, 1024),
                Buf::writable(status, 1),
            ],
        );
        assert_eq!((used, status_of(&rig)), (1, S_IOERR), "sector {sector}");
    }

    // Data that is not a whole number of sectors.
    rig.mem.write(hdr_in, &header(VIRTIO_BLK_T_OUT, 0));
    rig.mem.write(status, &[0xFF]);
    let used = raw(
        &mut rig,
        &[
            Buf::readable(hdr_in, 16),
            Buf::readable(data, 100),
            Buf::writable(status, 1),
        ],
    );
    assert_eq!((used, status_of(&rig)), (1, S_IOERR));

    // Unknown request type.
    rig.mem.write(hdr_in, &header(99, 0));
    rig.mem.write(status, &[0xFF]);
    let used = raw(
        &mut rig,
        &[Buf::readable(hdr_in, 16), Buf::writable(status, 1)],
    );
    assert_eq!((used, status_of(&rig)), (1, S_UNSUPP));

    // A descriptor that chains to itself: the walk is cut off, nothing is trusted.
    let q = &mut rig.fe.queues[0];
    let head = q.write_chain(&rig.mem, &[Buf::readable(hdr_in, 16)]);
    q.write_descriptor(
        &rig.mem,
        head,
        Descriptor::new(hdr_in.0, 16, frontend::VIRTQ_DESC_F_NEXT, head),
    );
    q.publish(&rig.mem, head);
    q.kick().unwrap();
    assert_eq!(q.wait_used(&rig.mem, 1, WAIT).unwrap()[0].1, 0);

    // The queue still serves a well-formed request, and the daemon is alive.
    let done = request(&mut rig, 0, VIRTIO_BLK_T_IN, 0, Data::In(&[512]));
    assert_eq!(done.status, S_OK);
    assert!(rig.daemon.try_status().unwrap().is_none(), "daemon died");
}

#[test]
fn corrupt_avail_index_breaks_only_that_queue() {
    let setup = Setup {
        queues: 2,
        ..Setup::default()
    };
    let mut rig = rig_with(1 << 20, |_| 0x5A, &["--queues", "2"], setup);
    // Queue 0 claims more new buffers than it has slots.
    let q0 = &mut rig.fe.queues[0];
    q0.set_avail_idx(&rig.mem, q0.avail_idx().wrapping_add(q0.size() + 5));
    q0.kick().unwrap();
    std::thread::sleep(Duration::from_millis(100));

    let done = request(&mut rig, 1, VIRTIO_BLK_T_IN, 0, Data::In(&[512]));
    assert_eq!(done.status, S_OK);
    assert!(done.data.iter().all(|&b| b == 0x5A));
    assert!(rig.daemon.try_status().unwrap().is_none(), "daemon died");
}

#[test]
fn both_queues_serve_interleaved_writes() {
    let setup = Setup {
        queues: 2,
        ..Setup::default()
    };
    let mut rig = rig_with(1 << 20, |_| 0, &["--queues", "2"], setup);
    for i in 0..32u64 {
        let queue = (i % 2) as usize;
        let data = pattern(512, i as u8);
        let done = request(&mut rig, queue, VIRTIO_BLK_T_OUT, i, Data::Out(&[&data]));
        assert_eq!(done.status, S_OK);
    }
    let contents = fs::read(&rig.disk).unwrap();
    for i in 0..32usize {
        assert_eq!(
            &contents[i * 512..(i + 1) * 512],
            &pattern(512, i as u8)[..]
        );
    }
}

#[test]
fn daemon_exits_zero_when_its_frontend_disconnects() {
    // `_dir` keeps the disk's directory until the end of the test.
    let Rig {
        dir: _dir,
        disk,
        mut daemon,
        fe,
        ..
    } = rig(&[]);
    drop(fe);
    let status = daemon.wait_exit(WAIT).unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
    // The disk is left as it was: nothing truncated or removed on the way out.
    assert_eq!(fs::metadata(&disk).unwrap().len(), 1 << 20);
}

#[test]
fn saved_state_restores_into_a_fresh_daemon_that_continues_the_rings() {
    let mut rig = rig(&["--serial", "snap"]);
    let data = pattern(4096, 42);
    for _ in 0..3 {
        let done = request(&mut rig, 0, VIRTIO_BLK_T_OUT, 100, Data::Out(&[&data]));
        assert_eq!(done.status, S_OK);
    }
    let bases = rig.fe.stop().unwrap();
    assert_eq!(bases, [3], "next avail index after three requests");
    let state = rig.fe.save_state().unwrap();
    let Rig {
        dir,
        disk,
        mut daemon,
        mut mem,
        fe,
    } = rig;
    drop(fe);
    assert!(daemon.wait_exit(WAIT).unwrap().success());

    let socket = dir.path().join("restored.sock");
    let _restored = Daemon::start(
        "microagent-vhost-blk",
        &socket,
        ["--disk", disk.to_str().unwrap(), "--serial", "snap"],
    )
    .unwrap();
    let setup = Setup {
        vring_bases: bases,
        load_state: Some(state),
        ..Setup::default()
    };
    let fe = Frontend::connect(&socket, &mut mem, &setup).unwrap();
    let mut rig = Rig {
        dir,
        disk,
        daemon: _restored,
        mem,
        fe,
    };
    let done = request(&mut rig, 0, VIRTIO_BLK_T_IN, 100, Data::In(&[4096]));
    assert_eq!(done.status, S_OK);
    assert_eq!(
        done.data, data,
        "restored daemon does not see data written before the save"
    );
    // GET_ID answers with the serial of the daemon serving the disk now.
    let done = request(&mut rig, 0, VIRTIO_BLK_T_GET_ID, 0, Data::In(&[20]));
    let mut serial = b"snap".to_vec();
    serial.resize(20, 0);
    assert_eq!((done.status, done.data), (S_OK, serial));
}

#[test]
fn corrupt_truncated_or_foreign_state_is_refused() {
    let mut rig = rig(&[]);
    rig.fe.stop().unwrap();
    let state = rig.fe.save_state().unwrap();
    let disk = rig.disk.clone();

    let mut flipped = state.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 1;
    // State saved by a daemon whose disk is half the size.
    let mut small = rig_with(512 << 10, |_| 0, &[], Setup::default());
    small.fe.stop().unwrap();
    let for_smaller_disk = small.fe.save_state().unwrap();
    // (state, serial of the daemon that loads it, what its log must name)
    let cases = [
        (
            state[..state.len() / 2].to_vec(),
            "microagent",
            "header says",
        ),
        (flipped, "microagent", "checksum does not match"),
        (Vec::new(), "microagent", "shorter than its header"),
        (for_smaller_disk, "microagent", "sectors"),
    ];
    for (bad, serial, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("blk.sock");
        let log = dir.path().join("blk.log");
        let _daemon = Daemon::start_logged(
            "microagent-vhost-blk",
            &socket,
            ["--disk", disk.to_str().unwrap(), "--serial", serial],
            &log,
        )
        .unwrap();
        let mut mem = GuestMemory::new(1 << 20).unwrap();
        let setup = Setup {
            load_state: Some(bad),
            ..Setup::default()
        };
        frontend::assert_state_refused(Frontend::connect(&socket, &mut mem, &setup), &log, reason);
    }
}

/// The daemon's peak resident memory.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

#[test]
fn direct_io_with_huge_buffers_outside_guest_memory_fails_without_allocating_them() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    // Sparse, so that the request below fits the disk.
    fs::File::create(&disk).unwrap().set_len(8 << 30).unwrap();
    let socket = dir.path().join("blk.sock");
    let daemon = Daemon::start(
        "microagent-vhost-blk",
        &socket,
        ["--disk", disk.to_str().unwrap(), "--direct-io"],
    )
    .unwrap();
    let mut rig = connected(dir, disk, daemon, &socket, &Setup::default());

    // A buffer of almost 4 GiB (the most one chain may describe) far outside the 16 MiB
    // of guest memory: a bounce buffer sized from the descriptor would be filled from
    // the disk before the address was found bad.
    let hdr = rig.mem.alloc(16, 16).unwrap();
    rig.mem.write(hdr, &header(VIRTIO_BLK_T_IN, 0));
    let status_at = rig.mem.alloc(1, 1).unwrap();
    rig.mem.write(status_at, &[0xFF]);
    let mut bufs = vec![Buf::readable(hdr, 16)];
    bufs.push(Buf::writable(GuestAddress(1 << 40), 0xFFFF_0000));
    bufs.push(Buf::writable(status_at, 1));
    raw(&mut rig, &bufs);
    assert_eq!(rig.mem.read(status_at, 1), [S_IOERR]);

    assert!(rig.daemon.try_status().unwrap().is_none(), "daemon died");
    let peak = peak_rss_kib(rig.daemon.pid().unwrap());
    assert!(peak < 64 << 10, "daemon peak RSS {peak} KiB");
    let done = request(&mut rig, 0, VIRTIO_BLK_T_IN, 0, Data::In(&[4096]));
    assert_eq!((done.status, done.data), (S_OK, vec![0; 4096]));
}

#[test]
fn direct_io_moves_requests_larger_than_the_bounce_buffer_intact() {
    let mut rig = rig_with(
        8 << 20,
        |i| (i / 512) as u8,
        &["--direct-io"],
        Setup::default(),
    );
    // 3 MiB over uneven buffers: the bounce buffer (1 MiB) is refilled across them.
    let lens = [
        512,
        (1 << 20) + 1024,
        3 << 19,
        (3 << 20) - (1 << 20) - 1536 - (3 << 19),
    ];
    let done = request(&mut rig, 0, VIRTIO_BLK_T_IN, 8, Data::In(&lens));
    assert_eq!(done.status, S_OK);
    let expected: Vec<u8> = (8 * 512..8 * 512 + (3 << 20))
        .map(|i: usize| (i / 512) as u8)
        .collect();
    assert!(done.data == expected, "read data differs");

    let data = pattern(3 << 20, 9);
    let (a, b) = data.split_at((1 << 20) + 512);
    let done = request(&mut rig, 0, VIRTIO_BLK_T_OUT, 16, Data::Out(&[a, b]));
    assert_eq!(done.status, S_OK);
    let file = fs::read(&rig.disk).unwrap();
    assert!(
        file[16 * 512..16 * 512 + (3 << 20)] == data[..],
        "file differs"
    );
}

/// A request's chain without submitting it: header, one data buffer, status byte.
/// Returns the buffers and where the status byte is.
fn chain(rig: &mut Rig, request_type: u32, sector: u64, data: &[u8]) -> (Vec<Buf>, GuestAddress) {
    let hdr = rig.mem.alloc(16, 16).unwrap();
    rig.mem.write(hdr, &header(request_type, sector));
    let at = rig.mem.alloc(data.len() as u64, 512).unwrap();
    rig.mem.write(at, data);
    let status = rig.mem.alloc(1, 1).unwrap();
    rig.mem.write(status, &[0xFF]);
    let buf = if request_type == VIRTIO_BLK_T_IN {
        Buf::writable(at, data.len() as u32)
    } else {
        Buf::readable(at, data.len() as u32)
    };
    (
        vec![Buf::readable(hdr, 16), buf, Buf::writable(status, 1)],
        status,
    )
}

/// Polls the used ring (never the call eventfd, which the test counts) for `count`
/// completions.
fn poll_completions(rig: &mut Rig, count: usize) -> Vec<(u16, u32)> {
    let deadline = std::time::Instant::now() + WAIT;
    let mut done = Vec::new();
    while done.len() < count {
        done.extend(rig.fe.queues[0].poll_used(&rig.mem));
        assert!(std::time::Instant::now() < deadline, "completions missing");
        std::thread::sleep(Duration::from_millis(1));
    }
    done
}

/// With VIRTIO_RING_F_EVENT_IDX the driver says when it wants an interrupt (used_event)
/// and the device says when it wants a kick (avail_event). A device that signalled on
/// every completion would cost the guest an interrupt each; one that missed the
/// crossing would hang it.
#[test]
fn event_idx_signals_the_guest_only_when_the_used_index_passes_used_event() {
    let setup = Setup {
        refuse_features: 0,
        ..Setup::default()
    };
    let mut rig = rig_with(1 << 20, |_| 0, &[], setup);
    assert!(
        rig.fe.features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0,
        "EVENT_IDX not negotiated"
    );
    // Interrupt once the used index passes 2, that is at the third completion.
    rig.fe.queues[0].set_used_event(&rig.mem, 2);
    for n in 1..=3u16 {
        let data = pattern(4096, n as u8);
        let (bufs, status) = chain(&mut rig, VIRTIO_BLK_T_OUT, u64::from(n) * 8, &data);
        rig.fe.queues[0].submit(&rig.mem, &bufs).unwrap();
        assert_eq!(poll_completions(&mut rig, 1)[0].1, 1);
        assert_eq!(rig.mem.read(status, 1)[0], S_OK);
        // The device asks to be kicked for the next request, whatever it is.
        assert_eq!(rig.fe.queues[0].avail_event(&rig.mem), n, "avail_event");
        // A signal, if any, comes with the used index: give it time all the same.
        std::thread::sleep(Duration::from_millis(50));
        let calls = rig.fe.queues[0].take_calls();
        if n < 3 {
            assert_eq!(calls, 0, "signalled at completion {n}, before used_event");
        } else {
            assert!(calls > 0, "no signal when the used index passed used_event");
        }
    }
    let file = fs::read(&rig.disk).unwrap();
    for n in 1..=3usize {
        assert_eq!(&file[n * 4096..(n + 1) * 4096], &pattern(4096, n as u8)[..]);
    }
}

/// A chain may sit in an indirect descriptor table (VIRTIO_RING_F_INDIRECT_DESC, which
/// Linux uses for requests with several segments); a table the device cannot read gets
/// no data moved and the queue goes on.
#[test]
fn indirect_descriptor_tables_carry_requests_and_a_bad_one_is_refused() {
    let mut rig = rig(&[]);
    assert!(
        rig.fe.features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC) != 0,
        "INDIRECT_DESC not offered"
    );
    let submit_indirect = |rig: &mut Rig, bufs: &[Buf]| {
        let table = rig.mem.alloc(16 * bufs.len() as u64, 16).unwrap();
        let q = &mut rig.fe.queues[0];
        let head = q.write_indirect_chain(&rig.mem, table, bufs);
        q.publish(&rig.mem, head);
        q.kick().unwrap();
        let used = q.wait_used(&rig.mem, 1, WAIT).unwrap();
        assert_eq!(used[0].0, head);
        used[0].1
    };
    let data = pattern(8192, 41);
    let (bufs, status) = chain(&mut rig, VIRTIO_BLK_T_OUT, 64, &data);
    assert_eq!(submit_indirect(&mut rig, &bufs), 1);
    assert_eq!(rig.mem.read(status, 1)[0], S_OK);
    assert_eq!(
        &fs::read(&rig.disk).unwrap()[64 * 512..64 * 512 + 8192],
        &data[..]
    );

    let (bufs, status) = chain(&mut rig, VIRTIO_BLK_T_IN, 64, &[0u8; 8192]);
    assert_eq!(submit_indirect(&mut rig, &bufs), 8192 + 1);
    assert_eq!(rig.mem.read(status, 1)[0], S_OK);
    assert_eq!(rig.mem.read(bufs[1].addr, 8192), data);

    // A table outside guest memory, and one whose length is not whole descriptors.
    let outside = GuestAddress(rig.mem.size() + 4096);
    let q = &mut rig.fe.queues[0];
    for (addr, len) in [(outside.0, 48), (bufs[0].addr.0, 40)] {
        let head = q.write_chain(&rig.mem, &[Buf::readable(GuestAddress(0), 16)]);
        q.write_descriptor(
            &rig.mem,
            head,
            Descriptor::new(addr, len, frontend::VIRTQ_DESC_F_INDIRECT, 0),
        );
        q.publish(&rig.mem, head);
        q.kick().unwrap();
        assert_eq!(q.wait_used(&rig.mem, 1, WAIT).unwrap()[0].1, 0);
    }
    let done = request(&mut rig, 0, VIRTIO_BLK_T_IN, 64, Data::In(&[4096]));
    assert_eq!((done.status, &done.data[..]), (S_OK, &data[..4096]));
    assert!(rig.daemon.try_status().unwrap().is_none(), "daemon died");
}

/// A batch moving at least 512 KiB is spread over several I/O threads
/// (vhost-blk/src/backend.rs, PARALLEL_BATCH_BYTES): every request of it completes
/// once, with its own length and status, and its own data.
#[test]
fn a_batch_of_a_mebibyte_completes_every_request_once_with_its_own_data() {
    const REQUESTS: usize = 16;
    const LEN: usize = 64 << 10;
    let mut rig = rig_with(4 << 20, |_| 0, &[], Setup::default());
    let round = |rig: &mut Rig, request_type: u32| {
        let mut sent = std::collections::HashMap::new();
        for i in 0..REQUESTS {
            let data = if request_type == VIRTIO_BLK_T_OUT {
                pattern(LEN, i as u8)
            } else {
                vec![0; LEN]
            };
            let (bufs, status) = chain(rig, request_type, (i * LEN / 512) as u64, &data);
            let q = &mut rig.fe.queues[0];
            let head = q.write_chain(&rig.mem, &bufs);
            q.publish(&rig.mem, head);
            sent.insert(head, (i, bufs[1].addr, status));
        }
        // One kick for the whole batch.
        rig.fe.queues[0].kick().unwrap();
        let used = rig.fe.queues[0]
            .wait_used(&rig.mem, REQUESTS, WAIT)
            .unwrap();
        assert_eq!(used.len(), REQUESTS, "{used:?}");
        let mut seen = std::collections::HashSet::new();
        let mut out = vec![Vec::new(); REQUESTS];
        for (head, len) in used {
            assert!(seen.insert(head), "request {head} completed twice");
            let (i, data, status) = sent[&head];
            assert_eq!(rig.mem.read(status, 1)[0], S_OK, "request {i}");
            let want = if request_type == VIRTIO_BLK_T_IN {
                LEN as u32 + 1
            } else {
                1
            };
            assert_eq!(len, want, "request {i}");
            out[i] = rig.mem.read(data, LEN);
        }
        out
    };
    let mark = rig.mem.mark();
    round(&mut rig, VIRTIO_BLK_T_OUT);
    rig.mem.release_to(mark);
    let file = fs::read(&rig.disk).unwrap();
    for i in 0..REQUESTS {
        assert_eq!(
            &file[i * LEN..(i + 1) * LEN],
            &pattern(LEN, i as u8)[..],
            "request {i}"
        );
    }
    let read = round(&mut rig, VIRTIO_BLK_T_IN);
    for (i, data) in read.iter().enumerate() {
        assert_eq!(data, &pattern(LEN, i as u8), "read {i}");
    }
}

/// A driver that resets the device and sets it up again (Linux does on a driver
/// reload, kexec or error recovery) gets a working device on fresh rings from index 0,
/// with the features of the new negotiation: here EVENT_IDX first, then not.
#[test]
fn after_a_device_reset_fresh_rings_work_with_the_new_features() {
    let with_event_idx = Setup {
        refuse_features: 0,
        ..Setup::default()
    };
    let mut rig = rig_with(1 << 20, |_| 0, &[], with_event_idx);
    let first = pattern(4096, 1);
    for n in 0..5u64 {
        let done = request(&mut rig, 0, VIRTIO_BLK_T_OUT, n * 8, Data::Out(&[&first]));
        assert_eq!(done.status, S_OK);
    }
    // A request published but never completed stays behind with the old rings.
    let (bufs, _) = chain(&mut rig, VIRTIO_BLK_T_IN, 0, &[0u8; 512]);
    let q = &mut rig.fe.queues[0];
    let head = q.write_chain(&rig.mem, &bufs);
    q.publish(&rig.mem, head);

    rig.fe.reset(&mut rig.mem, &Setup::default()).unwrap();
    assert_eq!(
        rig.fe.features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX),
        0
    );
    assert_eq!(rig.fe.queues[0].avail_idx(), 0);
    // Without EVENT_IDX every completion is signalled (used_event is not read).
    let second = pattern(4096, 2);
    let (bufs, status) = chain(&mut rig, VIRTIO_BLK_T_OUT, 40, &second);
    let q = &mut rig.fe.queues[0];
    q.set_used_event(&rig.mem, 100);
    let head = q.submit(&rig.mem, &bufs).unwrap();
    let used = poll_completions(&mut rig, 1);
    assert_eq!(used, vec![(head, 1)], "only the new request completes");
    assert_eq!(rig.mem.read(status, 1)[0], S_OK);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        rig.fe.queues[0].take_calls() > 0,
        "completion not signalled"
    );
    let done = request(&mut rig, 0, VIRTIO_BLK_T_IN, 40, Data::In(&[4096]));
    assert_eq!((done.status, done.data), (S_OK, second));
    assert!(rig.daemon.try_status().unwrap().is_none(), "daemon died");
}

#[test]
fn a_disk_that_stops_answering_ends_the_daemon_after_its_io_timeout() {
    if !StoppableMount::available(
        "a_disk_that_stops_answering_ends_the_daemon_after_its_io_timeout",
    ) {
        return;
    }
    const DISK: usize = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (src, mnt) = (dir.path().join("src"), dir.path().join("mnt"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(src.join("disk.img"), pattern(DISK, 7)).unwrap();
    let mount = StoppableMount::new(&src, &mnt);
    let disk = mnt.join("disk.img");
    let socket = dir.path().join("blk.sock");
    let log = dir.path().join("blk.log");
    let daemon = Daemon::start_logged(
        "microagent-vhost-blk",
        &socket,
        ["--disk", disk.to_str().unwrap(), "--io-timeout", "2"],
        &log,
    )
    .unwrap();
    let mut rig = connected(dir, disk, daemon, &socket, &Setup::default());
    // Dropped first should an assertion fail: the server runs again and the mount goes
    // before the daemon is reaped and the directory removed, which would wait for it.
    let mount = mount;

    // While the filesystem answers, the disk works.
    let done = request(&mut rig, 0, VIRTIO_BLK_T_IN, 0, Data::In(&[512]));
    assert_eq!(done.status, S_OK);
    assert_eq!(done.data, pattern(DISK, 7)[..512]);

    // Its server stops. A read 3 MiB further on (beyond any readahead) waits for it.
    mount.stop();
    let hdr = rig.mem.alloc(16, 16).unwrap();
    rig.mem.write(hdr, &header(VIRTIO_BLK_T_IN, 6144));
    let data = rig.mem.alloc(512, 512).unwrap();
    let status = rig.mem.alloc(1, 1).unwrap();
    rig.mem.write(status, &[0xFF]);
    let bufs = [
        Buf::readable(hdr, 16),
        Buf::writable(data, 512),
        Buf::writable(status, 1),
    ];
    let asked = std::time::Instant::now();
    rig.fe.queues[0].submit(&rig.mem, &bufs).unwrap();

    // The daemon gives up after its 2 s, says why, and drops the frontend's connection:
    // the frontend sees the device go instead of a request that never completes.
    let needle = format!(
        "queue 0: I/O on {} has not completed in",
        rig.disk.display()
    );
    let logged = || fs::read_to_string(&log).unwrap_or_default();
    while !logged().contains(&needle) {
        assert!(asked.elapsed() < Duration::from_secs(15), "{}", logged());
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = asked.elapsed();
    assert!(took >= Duration::from_secs(2), "{took:?}");
    let mut hangup = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(rig.fe.vu()),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on the frontend's own socket with one valid pollfd.
    let ready = unsafe { libc::poll(&mut hangup, 1, 5_000) };
    assert_eq!(
        ready,
        1,
        "the daemon kept the frontend's connection:\n{}",
        logged()
    );
    let mut byte = [0u8; 1];
    // SAFETY: a one-byte read into a buffer we own.
    let read = unsafe { libc::recv(hangup.fd, byte.as_mut_ptr().cast(), 1, libc::MSG_DONTWAIT) };
    assert_eq!(read, 0, "expected the connection closed");
    assert_eq!(
        rig.mem.read(status, 1)[0],
        0xFF,
        "the request was completed"
    );

    // Its exit waits for the filesystem (closing the image flushes it); once the server
    // runs again the daemon is gone, with status 3.
    mount.resume();
    let exit = rig.daemon.wait_exit(Duration::from_secs(30)).unwrap();
    assert_eq!(exit.code(), Some(3), "{exit}");
    drop(mount);
    // The image itself is untouched.
    assert_eq!(
        fs::read(rig.dir.path().join("src/disk.img")).unwrap(),
        pattern(DISK, 7)
    );
}
