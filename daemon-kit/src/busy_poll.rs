//! Adaptive busy polling: a worker that has just served the guest keeps watching for
//! its next request a moment before it sleeps in epoll, so that an exchange of
//! request and answer with the guest (a packet and its used-ring signal, a connection
//! request and its response) does not pay a thread wake-up in the daemon each way.
//!
//! The window adapts as QEMU's event loop does (`util/aio-posix.c`, `poll-max-ns`),
//! by how long the worker waited for its next event, spinning and sleeping together:
//! it starts at nothing, doubles (from [`START`]) each time the wait was longer than
//! the current window but within the longest one (a longer window would have caught
//! that event), and falls back to nothing after a wait longer than the longest window
//! (polling could not have caught it). An idle or slow guest therefore
//! costs no polling at all; a guest in a tight exchange costs at most the longest
//! window of CPU per exchange.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// The first window after polling was off.
pub const START: Duration = Duration::from_micros(4);

#[derive(Debug)]
pub struct BusyPoll {
    max: Duration,
    window: Duration,
    /// When the worker last began to wait (to spin, then to sleep in epoll).
    waiting_since: Option<Instant>,
}

impl BusyPoll {
    /// `max` zero turns polling off.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            window: Duration::ZERO,
            waiting_since: None,
        }
    }

    /// An event reached the worker: adapts the window to how long it waited.
    pub fn woke(&mut self) {
        if let Some(since) = self.waiting_since.take() {
            self.adapt(since.elapsed());
        }
    }

    /// A wait within the window caught its event: no change.
    fn adapt(&mut self, waited: Duration) {
        if waited > self.max {
            self.window = Duration::ZERO;
        } else if waited > self.window {
            self.window = (self.window * 2).max(START).min(self.max);
        }
    }

    /// Before the worker returns to epoll: waits, spinning, until `epoll_fd` has an
    /// event for the worker's loop (a kick, a host socket, a timer) or the window
    /// passes. An event that comes within the window is then handled without the
    /// worker having slept.
    ///
    /// vhost-user-backend hands the events of one `epoll_wait` to the backend one at a
    /// time, so this also runs between events of one batch; those are ready, and the
    /// spin ends at its first check.
    pub fn spin(&mut self, epoll_fd: RawFd) {
        let start = Instant::now();
        self.waiting_since = Some(start);
        let deadline = start + self.window;
        while !self.window.is_zero() && !ready(epoll_fd) && Instant::now() < deadline {
            std::hint::spin_loop();
        }
    }
}

/// Whether an epoll instance has an event ready, without taking it.
fn ready(epoll_fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: epoll_fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; a zero timeout never blocks.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    const MAX: Duration = Duration::from_micros(50);

    #[test]
    fn the_window_grows_while_events_come_soon_and_stops_when_they_come_late() {
        let mut poll = BusyPoll::new(MAX);
        assert!(poll.window.is_zero());
        poll.adapt(Duration::from_micros(10));
        assert_eq!(poll.window, START);
        poll.adapt(Duration::from_micros(10));
        assert_eq!(poll.window, START * 2);
        // Caught within the window: no change.
        poll.adapt(Duration::from_micros(2));
        assert_eq!(poll.window, START * 2);
        for _ in 0..10 {
            poll.adapt(Duration::from_micros(40));
        }
        assert_eq!(poll.window, MAX, "never beyond the longest window");
        poll.adapt(Duration::from_millis(5));
        assert!(poll.window.is_zero(), "a long sleep turns polling off");
    }

    /// The window settles where it catches a guest that answers in a steady time, and
    /// goes to nothing for one slower than the longest window (a spin that cannot catch
    /// the answer must not be paid on every exchange).
    #[test]
    fn a_steady_answer_is_caught_and_a_slow_one_turns_polling_off() {
        for (answer, settles) in [(30, 32), (45, 50), (70, 0)] {
            let answer = Duration::from_micros(answer);
            let mut poll = BusyPoll::new(MAX);
            let mut caught = 0;
            for _ in 0..20 {
                // The event comes `answer` after the wait began; a window that long
                // catches it (the wait then ends with it), otherwise the worker sleeps.
                if answer <= poll.window {
                    caught += 1;
                }
                poll.adapt(answer);
            }
            assert_eq!(poll.window, Duration::from_micros(settles), "{answer:?}");
            assert_eq!(
                caught > 10,
                settles > 0,
                "{answer:?}: caught {caught} of 20"
            );
        }
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut poll = BusyPoll::new(Duration::ZERO);
        poll.adapt(Duration::from_nanos(1));
        assert!(poll.window.is_zero());
    }

    /// The spin ends as soon as the epoll instance has an event, and otherwise when the
    /// window passes.
    #[test]
    fn spinning_stops_for_an_epoll_event_or_at_the_end_of_the_window() {
        // SAFETY: epoll_create1 with valid flags; checked below.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0);
        let mut poll = BusyPoll::new(Duration::from_millis(200));
        for _ in 0..20 {
            poll.adapt(Duration::from_millis(150));
        }
        assert_eq!(poll.window, Duration::from_millis(200));
        let started = Instant::now();
        poll.spin(epoll);
        assert!(
            started.elapsed() >= poll.window,
            "returned before the window"
        );

        let event = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 1,
        };
        // SAFETY: valid epoll and eventfd descriptors and event.
        let added =
            unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, event.as_raw_fd(), &mut ev) };
        assert_eq!(added, 0);
        event.write(1).unwrap();
        let started = Instant::now();
        poll.spin(epoll);
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "an event ready in epoll did not end the spin"
        );
        // SAFETY: closing the epoll descriptor created above.
        unsafe { libc::close(epoll) };
    }
}
