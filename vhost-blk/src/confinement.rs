//! The syscalls of this daemon beyond daemon-kit's (see `microagent_daemon_kit::confine`):
//! positional I/O on the image, flushes and discards, by the workers and, when the
//! device is stopped for a snapshot, by the request handler. A worker spreads a large
//! batch over scoped I/O threads (`backend::BlkBackend`), which inherit its filter.

use microagent_confine::Seccomp;
use microagent_daemon_kit::confine::Policy;

const DISK_IO: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    // VIRTIO_BLK_T_FLUSH
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // DISCARD and WRITE_ZEROES punch or zero ranges
    libc::SYS_fallocate,
];

/// The worker's own: disk I/O, and starting the I/O threads of a large batch.
const WORKER: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_clone,
    libc::SYS_clone3,
];

pub fn policy(seccomp: Seccomp) -> Policy {
    Policy {
        daemon: "vhost-blk",
        seccomp,
        main: DISK_IO,
        worker: WORKER,
    }
}
