//! The syscalls of this daemon beyond daemon-kit's (see `microagent_daemon_kit::confine`):
//! the host side's unix sockets (accepting host connections, connecting to
//! `<uds_path>_<port>` listeners) and the muxer's timers, in the worker; the main
//! thread touches the muxer when the device stops or its state moves.

use microagent_confine::Seccomp;
use microagent_daemon_kit::confine::Policy;

const HOST_SOCKETS: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // the transport reset and tick timers
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    // the host listener's socket file goes when the muxer does
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

pub fn policy(seccomp: Seccomp) -> Policy {
    Policy {
        daemon: "vhost-vsock",
        seccomp,
        main: HOST_SOCKETS,
        worker: HOST_SOCKETS,
    }
}
