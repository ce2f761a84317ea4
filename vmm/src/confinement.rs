//! What the VMM's threads may do once the VM is built (see `microagent-confine`). The
//! main thread runs the event loop, the control socket and snapshots; each vCPU thread
//! runs KVM_RUN and the devices its exits reach (serial, i8042, virtio-mmio transports,
//! whose activation speaks vhost-user to the daemons).

use microagent_confine::{filter::PRCTL_CONFINE, Ioctl, Profile};

/// `_IOC_TYPE` of every KVM ioctl: system, VM and vCPU ones alike (the fds are opened
/// before confinement, so these cannot reach anything else).
const KVMIO: u8 = 0xAE;

/// Terminal and descriptor ioctls Rust's std and the logger use on stdio and sockets.
pub const STDIO_IOCTLS: &[Ioctl] = &[
    Ioctl::Request(0x5401), // TCGETS: isatty() on the log and serial outputs
    Ioctl::Request(0x5413), // TIOCGWINSZ
    Ioctl::Request(0x5421), // FIONBIO
    Ioctl::Request(0x5450), // FIONCLEX
    Ioctl::Request(0x5451), // FIOCLEX
];

/// Speaking vhost-user to a daemon: messages carry descriptors (memory, eventfds,
/// device state pipes).
const VHOST_USER_FRONTEND: &[i64] = &[
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_eventfd2,
    libc::SYS_pipe2,
    libc::SYS_shutdown,
];

/// The event loop thread.
pub fn main_thread() -> Profile {
    Profile::new("vmm/main")
        .allow(VHOST_USER_FRONTEND)
        .allow(&[
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_pwait2,
            // the control socket
            libc::SYS_accept4,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            // snapshots: a temporary directory written, fsynced and renamed into place;
            // memory as a sparse file (SEEK_DATA/SEEK_HOLE, copy ranges); free space
            libc::SYS_openat,
            libc::SYS_mkdir,
            libc::SYS_mkdirat,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_rmdir,
            libc::SYS_getdents64,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_ftruncate,
            libc::SYS_fallocate,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_copy_file_range,
            libc::SYS_sendfile,
            libc::SYS_statfs,
            libc::SYS_fstatfs,
            libc::SYS_fchmod,
            libc::SYS_access,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
            libc::SYS_readlink,
            libc::SYS_getcwd,
            // vCPU threads end when the VM does
            libc::SYS_sched_getaffinity,
        ])
        .ioctls(&[Ioctl::Type(KVMIO)])
        .ioctls(STDIO_IOCTLS)
        .prctls(PRCTL_CONFINE)
}

/// A vCPU thread.
pub fn vcpu_thread() -> Profile {
    Profile::new("vmm/vcpu")
        .allow(VHOST_USER_FRONTEND)
        .ioctls(&[Ioctl::Type(KVMIO)])
        .ioctls(STDIO_IOCTLS)
        .prctls(PRCTL_CONFINE)
}
