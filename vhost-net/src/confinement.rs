//! The syscalls of this daemon beyond daemon-kit's (see `microagent_daemon_kit::confine`):
//! guest TCP and UDP flows become host sockets (connect, DNS forwarding to the host's
//! resolvers, accepting on published ports), and the stack's poll timer, in the worker;
//! the main thread touches the stack when the device stops or its state moves.

use microagent_confine::Seccomp;
use microagent_daemon_kit::confine::Policy;

const HOST_SOCKETS: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    // a UDP flow binds its host socket before connecting it
    libc::SYS_bind,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvmmsg,
    libc::SYS_sendmmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

pub fn policy(seccomp: Seccomp) -> Policy {
    Policy {
        daemon: "vhost-net",
        seccomp,
        main: HOST_SOCKETS,
        worker: HOST_SOCKETS,
    }
}
