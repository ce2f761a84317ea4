//! Block benchmark: `microagent-vhost-blk` against `qemu-storage-daemon`'s vhost-user-blk
//! export, through the same host-side frontend, same file, same queue depth.
//!
//! cargo build --release --workspace
//! cargo run --release -p microagent-integration --example bench_blk [-- SECONDS ROUNDS]
//!
//! Each round runs every workload on both daemons back to back, alternating which goes
//! first; the table reports the median over rounds and the ratio ours / theirs.
//! Between runs every request still in flight is drained and the disk file is synced
//! (`fsync`, then `sync`), so no daemon starts while the other's dirty pages are still
//! being written back; the page cache stays warm (clean) for both.

use microagent_integration::daemon::Daemon;
use microagent_integration::frontend::{Frontend, GuestMemory, Setup, VirtQueue};
use microagent_integration::storage_daemon::StorageDaemon;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestAddress;

const DISK_SIZE: u64 = 512 << 20;
const DEPTH: usize = 32;

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    request_type: u32,
    block: u32,
    random: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4 KiB random read",
        request_type: VIRTIO_BLK_T_IN,
        block: 4096,
        random: true,
    },
    Workload {
        name: "4 KiB random write",
        request_type: VIRTIO_BLK_T_OUT,
        block: 4096,
        random: true,
    },
    Workload {
        name: "1 MiB sequential read",
        request_type: VIRTIO_BLK_T_IN,
        block: 1 << 20,
        random: false,
    },
    Workload {
        name: "1 MiB sequential write",
        request_type: VIRTIO_BLK_T_OUT,
        block: 1 << 20,
        random: false,
    },
];

/// One in-flight slot: three fixed descriptors and its own buffers.
struct Slot {
    header: GuestAddress,
    data: GuestAddress,
    status: GuestAddress,
}

/// xorshift64: cheap, deterministic offsets.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Runs `workload` for `seconds` on the device behind `socket`; returns requests/s and
/// how long the vhost-user set-up took (connect to a started ring: every control message
/// passes microagent's gate, none of the data path does).
fn run(socket: &Path, workload: Workload, seconds: f64) -> (f64, Duration) {
    let mut mem = GuestMemory::new(64 << 20).expect("guest memory");
    let set_up = Instant::now();
    let mut fe = Frontend::connect(socket, &mut mem, &Setup::default()).expect("connect");
    let set_up = set_up.elapsed();
    let slots: Vec<Slot> = (0..DEPTH)
        .map(|_| Slot {
            header: mem.alloc(16, 16).unwrap(),
            data: mem.alloc(u64::from(workload.block), 4096).unwrap(),
            status: mem.alloc(1, 1).unwrap(),
        })
        .collect();
    let blocks = DISK_SIZE / u64::from(workload.block);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut sequential = 0u64;
    let queue = &mut fe.queues[0];
    let data_flags = if workload.request_type == VIRTIO_BLK_T_IN {
        2
    } else {
        0
    };

    let mut submit = |slot: usize, queue: &mut VirtQueue| {
        let block = if workload.random {
            next_random(&mut rng) % blocks
        } else {
            sequential = (sequential + 1) % blocks;
            sequential
        };
        let sector = block * u64::from(workload.block) / 512;
        let s = &slots[slot];
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(&workload.request_type.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&sector.to_le_bytes());
        mem.write(s.header, &header);
        // A status the device did not write reads as a failure, not as the last success.
        mem.write(s.status, &[0xFF]);
        let head = (slot * 3) as u16;
        queue.write_descriptor(&mem, head, Descriptor::new(s.header.0, 16, 1, head + 1));
        queue.write_descriptor(
            &mem,
            head + 1,
            Descriptor::new(s.data.0, workload.block, 1 | data_flags, head + 2),
        );
        queue.write_descriptor(&mem, head + 2, Descriptor::new(s.status.0, 1, 2, 0));
        queue.publish(&mem, head);
    };

    for slot in 0..DEPTH {
        submit(slot, queue);
    }
    queue.kick().unwrap();
    let start = Instant::now();
    let mut done = 0u64;
    // Every slot is in flight from here on: each completion is resubmitted at once.
    while start.elapsed().as_secs_f64() < seconds {
        let used = queue.poll_used(&mem);
        if used.is_empty() {
            queue.wait_call(Duration::from_millis(5));
            continue;
        }
        for (head, _) in &used {
            let slot = usize::from(*head) / 3;
            assert_eq!(mem.read(slots[slot].status, 1)[0], 0, "request failed");
            submit(slot, queue);
        }
        done += used.len() as u64;
        queue.kick().unwrap();
    }
    let rate = done as f64 / start.elapsed().as_secs_f64();
    // Drain all DEPTH requests still in flight before disconnecting.
    let drained = queue
        .wait_used(&mem, DEPTH, Duration::from_secs(30))
        .expect("requests in flight did not complete");
    for (head, _) in drained {
        let status = mem.read(slots[usize::from(head) / 3].status, 1)[0];
        assert_eq!(status, 0, "request failed");
    }
    (rate, set_up)
}

/// Writes back what the last daemon left dirty in the page cache before the next run.
fn settle(disk: &Path) {
    File::open(disk)
        .and_then(|f| f.sync_all())
        .expect("fsync of the disk file");
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("bench.img");
    let mut file = File::create(&disk).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 1) as u8).collect();
    for _ in 0..DISK_SIZE >> 20 {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);

    println!("vhost-user-blk: microagent-vhost-blk vs qemu-storage-daemon");
    println!("disk {} MiB (buffered, page cache warm), queue depth {DEPTH}, {seconds} s per run, {rounds} rounds\n", DISK_SIZE >> 20);
    println!("| workload | microagent | qemu-storage-daemon | ratio |");
    println!("|---|---|---|---|");
    let (mut set_up_ours, mut set_up_theirs) = (Vec::new(), Vec::new());
    for workload in WORKLOADS {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let measure_ours = || {
                let socket = dir.path().join("ours.sock");
                let _ = std::fs::remove_file(&socket);
                let daemon = Daemon::start(
                    "microagent-vhost-blk",
                    &socket,
                    ["--disk", disk.to_str().unwrap()],
                )
                .unwrap();
                let result = run(&socket, workload, seconds);
                drop(daemon);
                settle(&disk);
                result
            };
            let measure_theirs = || {
                let socket = dir.path().join("qsd.sock");
                let _ = std::fs::remove_file(&socket);
                let daemon = StorageDaemon::start(&disk, &socket, true).unwrap();
                let result = run(&socket, workload, seconds);
                drop(daemon);
                settle(&disk);
                result
            };
            let (a, b) = if round % 2 == 0 {
                let a = measure_ours();
                (a, measure_theirs())
            } else {
                let b = measure_theirs();
                (measure_ours(), b)
            };
            ours.push(a.0);
            theirs.push(b.0);
            set_up_ours.push(a.1.as_secs_f64() * 1e6);
            set_up_theirs.push(b.1.as_secs_f64() * 1e6);
        }
        let (a, b) = (median(ours), median(theirs));
        let unit = |rate: f64| {
            if workload.block >= 1 << 20 {
                format!(
                    "{:.0} MiB/s",
                    rate * f64::from(workload.block) / f64::from(1u32 << 20)
                )
            } else {
                format!("{:.0} IOPS", rate)
            }
        };
        println!(
            "| {} | {} | {} | {:.2} |",
            workload.name,
            unit(a),
            unit(b),
            a / b
        );
    }
    let (a, b) = (median(set_up_ours), median(set_up_theirs));
    println!("| vhost-user set-up, connect to ring ready (lower is better) | {a:.0} µs | {b:.0} µs | {:.2} |", a / b);
}
