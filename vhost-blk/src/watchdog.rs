//! The I/O watchdog. A request whose disk never answers (an image on a hung network or
//! FUSE filesystem) would hold its queue's worker forever, and with it the ring lock that
//! the frontend's GET_VRING_BASE (a snapshot, a device reset) waits for. When a queue has
//! waited `--io-timeout` without a request completing, the daemon gives up: it shuts
//! down its sockets, logs the queue and the disk, and exits with [`EXIT_IO_TIMEOUT`].
//! The frontend sees the device go at once
//! (microagent-vmm marks it failed for the guest, and `microagent` reports the workspace
//! crashed with the logged line); the process itself may linger until the filesystem
//! answers, as closing the image waits for it.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// The daemon's exit status when a request outlived `--io-timeout`.
pub const EXIT_IO_TIMEOUT: i32 = 3;

/// Since when each queue has waited for the disk: the start of its current batch or the
/// last request of it that completed, as milliseconds since `epoch` plus one (0: idle).
pub struct InFlight {
    epoch: Instant,
    since: Vec<AtomicU64>,
}

/// A queue marked busy until this is dropped.
pub struct Busy<'a>(Option<&'a AtomicU64>);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            slot.store(0, Ordering::Release);
        }
    }
}

impl InFlight {
    pub fn new(queues: usize) -> Self {
        Self {
            epoch: Instant::now(),
            since: (0..queues).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Marks `queue` busy while the returned guard lives.
    pub fn busy(&self, queue: usize) -> Busy<'_> {
        self.progress(queue);
        Busy(self.since.get(queue))
    }

    /// A request of `queue`'s batch completed: the disk answers, the clock starts again.
    pub fn progress(&self, queue: usize) {
        if let Some(slot) = self.since.get(queue) {
            slot.store(self.now(), Ordering::Release);
        }
    }

    /// Milliseconds since `epoch`, plus one so that 0 stays "idle".
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// The queue busy for longest, and for how long.
    fn oldest(&self) -> Option<(usize, Duration)> {
        let now = self.epoch.elapsed();
        self.since
            .iter()
            .enumerate()
            .filter_map(|(queue, slot)| match slot.load(Ordering::Acquire) {
                0 => None,
                started => Some((
                    queue,
                    now.saturating_sub(Duration::from_millis(started - 1)),
                )),
            })
            .max_by_key(|&(_, busy)| busy)
    }
}

/// Watches `in_flight` from a thread of its own and ends the process once a queue has
/// waited `timeout` for a request to complete.
pub fn start(in_flight: Arc<InFlight>, timeout: Duration, disk: PathBuf) -> io::Result<()> {
    let period = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    thread::Builder::new()
        .name("io-watchdog".into())
        .spawn(move || loop {
            thread::sleep(period);
            let Some((queue, busy)) = in_flight.oldest() else {
                continue;
            };
            if busy >= timeout {
                // The frontend must learn first: the log may sit on the same stuck
                // filesystem as the image.
                sever_sockets();
                log::error!(
                    "queue {queue}: I/O on {} has not completed in {:.1} s (--io-timeout \
                     {} s): the disk is not answering; exiting, so that the VM sees the \
                     device fail",
                    disk.display(),
                    busy.as_secs_f64(),
                    timeout.as_secs()
                );
                std::process::exit(EXIT_IO_TIMEOUT);
            }
        })?;
    Ok(())
}

/// Shuts down every socket of this process (the frontend's connection, the gate's pair),
/// so that the frontend sees the device go at once: the exit that follows can wait until
/// the stuck filesystem answers, as closing the image flushes it. Sockets are told apart
/// by SO_TYPE, which (unlike fstat) never asks the filesystem of a file descriptor. The
/// daemon's few descriptors are all below the default limit of 1024.
fn sever_sockets() {
    for fd in 0..1024 {
        let mut kind: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `kind`, which we own; a
        // descriptor that is not a socket (or not open) fails with ENOTSOCK (EBADF).
        let is_socket = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut kind as *mut libc::c_int).cast(),
                &mut len,
            )
        } == 0;
        if is_socket {
            // SAFETY: shutdown of a socket this process holds; no memory is involved.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completed_request_restarts_the_clock() {
        let in_flight = InFlight::new(1);
        let _busy = in_flight.busy(0);
        thread::sleep(Duration::from_millis(30));
        in_flight.progress(0);
        let (_, waited) = in_flight.oldest().unwrap();
        assert!(waited < Duration::from_millis(30), "{waited:?}");
    }

    #[test]
    fn only_a_busy_queue_ages_and_the_guard_marks_it_idle_again() {
        let in_flight = InFlight::new(2);
        assert_eq!(in_flight.oldest(), None);
        {
            let _busy = in_flight.busy(1);
            thread::sleep(Duration::from_millis(30));
            let (queue, busy) = in_flight.oldest().unwrap();
            assert_eq!(queue, 1);
            assert!(busy >= Duration::from_millis(30), "{busy:?}");
        }
        assert_eq!(in_flight.oldest(), None);
        // A queue the daemon does not have is never marked.
        let _busy = in_flight.busy(7);
        assert_eq!(in_flight.oldest(), None);
    }
}
