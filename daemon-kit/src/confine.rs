//! Confinement of a daemon (see `microagent-confine`), in two thread kinds:
//!
//! - **main**: the main thread, vhost-user-backend's request handler and the gate's
//!   relay threads. They speak vhost-user to the frontend, map the guest memory it
//!   shares, and move device state through pipes. Entered by [`crate::serve::serve`] once
//!   the socket is listening, on every thread at once (TSYNC). Capabilities are gone
//!   before the first thread starts.
//! - **worker**: vhost-user-backend's vring worker threads, which handle what the guest
//!   puts in the rings. They were spawned before set-up ended, so each enters its own
//!   profile (on top of main's) when it handles its first event: [`worker_thread`],
//!   the first line of every daemon's `handle_event`.
//!
//! Each daemon adds its own syscalls to both through a [`Policy`].

use microagent_confine::filter::PRCTL_CONFINE;
use microagent_confine::{Confinement, Ioctl, Profile, Seccomp};
use std::cell::Cell;
use std::sync::OnceLock;

/// A daemon's syscalls beyond daemon-kit's own, per thread kind.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// `vhost-blk`, `vhost-vsock`, `vhost-net`: the profiles are `<daemon>/main` and
    /// `<daemon>/worker`.
    pub daemon: &'static str,
    pub seccomp: Seccomp,
    pub main: &'static [i64],
    pub worker: &'static [i64],
}

/// Descriptor ioctls of Rust's std (set_nonblocking, close-on-exec) and isatty() of the
/// logger.
const STD_IOCTLS: &[Ioctl] = &[
    Ioctl::Request(0x5401), // TCGETS
    Ioctl::Request(0x5413), // TIOCGWINSZ
    Ioctl::Request(0x5421), // FIONBIO
    Ioctl::Request(0x5450), // FIONCLEX
    Ioctl::Request(0x5451), // FIOCLEX
];

/// Entering a profile on top of another: the privilege drop and the filter itself.
const ENTER: &[i64] = &[libc::SYS_capget, libc::SYS_capset, libc::SYS_seccomp];

/// What daemon-kit's main, handler and gate threads do after set-up.
const MAIN: &[i64] = &[
    // the frontend's connection and the gate's private pair; messages carry fds
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // the gate's relay threads (started just before the frontend is accepted)
    libc::SYS_clone,
    libc::SYS_clone3,
    // vring kick and call fds into the workers' epoll; exit events
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    // SET_DEVICE_STATE_FD pipes; CHECK_DEVICE_STATE
    libc::SYS_pipe2,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    // removing the socket when the session ends
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_getcwd,
];

/// What daemon-kit asks of a worker thread: its epoll loop and eventfds.
const WORKER: &[i64] = &[
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
];

/// The profile of the main thread kind of `policy`'s daemon.
pub fn main_profile(policy: &Policy) -> Profile {
    Profile::new(&format!("{}/main", policy.daemon))
        .allow(ENTER)
        .allow(MAIN)
        .allow(policy.main)
        .ioctls(STD_IOCTLS)
        .prctls(PRCTL_CONFINE)
}

/// The profile of the worker thread kind of `policy`'s daemon.
pub fn worker_profile(policy: &Policy) -> Profile {
    Profile::new(&format!("{}/worker", policy.daemon))
        .allow(ENTER)
        .allow(WORKER)
        .allow(policy.worker)
        .ioctls(STD_IOCTLS)
        .prctls(PRCTL_CONFINE)
}

/// The worker confinement, once the main one is in place (not before: a worker filter
/// installed first would make the main thread's TSYNC fail).
static WORKER_CONFINEMENT: OnceLock<Confinement> = OnceLock::new();

thread_local! {
    static WORKER_ENTERED: Cell<bool> = const { Cell::new(false) };
}

/// Called by [`crate::serve::serve`] after the main confinement is in place.
pub(crate) fn arm_workers(confinement: Confinement) {
    let _ = WORKER_CONFINEMENT.set(confinement);
}

/// Confines the calling worker thread the first time it is called after set-up; cheap
/// afterwards. A worker that cannot confine itself ends the daemon rather than serve
/// the guest unconfined.
pub fn worker_thread() {
    if WORKER_ENTERED.with(Cell::get) {
        return;
    }
    let Some(confinement) = WORKER_CONFINEMENT.get() else {
        return;
    };
    WORKER_ENTERED.with(|entered| entered.set(true));
    if let Err(e) = confinement.enter() {
        log::error!("a worker thread could not confine itself, stopping: {e}");
        std::process::exit(1);
    }
}
