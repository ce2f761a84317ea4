//! Telling a silent command from a lost guest. A running command's output may pause for
//! as long as it likes (a build can be quiet for minutes), so the host cannot time out
//! on silence; but a guest whose kernel or vsock transport stopped would leave it
//! waiting for ever. So, while the command's connection is silent, the host dials the
//! agent's port again every [`Liveness::interval`]: the guest's kernel answers that by
//! itself for a listening socket (the daemon's `OK` line), which a stopped guest cannot.
//! [`Liveness::probes`] failures in a row mean the guest is lost ([`Lost`]).

use crate::client::dial;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How often a silent command's agent is probed, and how many probes in a row must
/// fail before the command counts as lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    pub interval: Duration,
    pub probes: u32,
}

/// Every 10 s of silence; 3 failures, each at most the vsock daemon's 5 s wait for the
/// guest's answer, end the command within about 45 s.
pub const LIVENESS: Liveness = Liveness {
    interval: Duration::from_secs(10),
    probes: 3,
};

/// The guest stopped answering while a command ran.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the agent stopped answering while the command ran: {probes} new connections over \
     {waited:?} found no agent (last: {last}); the guest may be hung (microagent logs shows \
     its console; halt or restart it)"
)]
pub struct Lost {
    pub probes: u32,
    pub waited: Duration,
    pub last: String,
}

/// Whether the guest is held on purpose (paused by its user, or by its VMM while it
/// writes a snapshot): silence then is not a failure, and the guest is not probed.
pub type HoldCheck = Box<dyn Fn() -> bool + Send>;

/// The read side of a running command's connection: each read from the socket first
/// waits for data, probing the agent while none comes. A read that finds the guest lost
/// fails with an `io::Error` carrying [`Lost`] (see [`lost`]).
pub struct Watched {
    pub stream: UnixStream,
    /// The vsock daemon's host socket to dial; None reads without probing.
    pub uds: Option<PathBuf>,
    pub liveness: Liveness,
    pub held: Option<HoldCheck>,
}

impl Watched {
    fn await_data(&self) -> io::Result<()> {
        let Some(uds) = self.uds.as_deref() else {
            return Ok(());
        };
        let since = Instant::now();
        let mut failed = 0;
        while !readable(&self.stream, self.liveness.interval)? {
            if self.held.as_ref().is_some_and(|held| held()) {
                failed = 0;
                continue;
            }
            match dial(uds) {
                Ok(_) => failed = 0,
                Err(e) => {
                    failed += 1;
                    if failed >= self.liveness.probes {
                        return Err(io::Error::other(Lost {
                            probes: failed,
                            waited: since.elapsed(),
                            last: e.to_string(),
                        }));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.await_data()?;
        self.stream.read(buf)
    }
}

/// The [`Lost`] a [`Watched`] read failed with, if that is why it failed.
pub fn lost(e: &io::Error) -> Option<&Lost> {
    e.get_ref()?.downcast_ref::<Lost>()
}

/// Whether `stream` has bytes to read (or its end) within `timeout`; consumes nothing.
fn readable(stream: &UnixStream, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, alive for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A daemon's host socket whose "guest" answers `OK` to the first `answers`
    /// connections and closes every other at once; counts the connections.
    fn daemon(path: &std::path::Path, answers: usize) -> Arc<AtomicUsize> {
        let listener = UnixListener::bind(path).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut line = String::new();
                let _ = BufReader::new(&stream).read_line(&mut line); // CONNECT
                if counter.fetch_add(1, Ordering::SeqCst) < answers {
                    let _ = stream.write_all(b"OK 1024\n");
                    let _ = stream.read(&mut [0u8; 64]); // until the prober closes
                }
            }
        });
        seen
    }

    fn watched(stream: UnixStream, uds: PathBuf) -> Watched {
        Watched {
            stream,
            uds: Some(uds),
            liveness: Liveness {
                interval: Duration::from_millis(50),
                probes: 3,
            },
            held: None,
        }
    }

    #[test]
    fn a_silent_connection_whose_guest_answers_probes_keeps_waiting_for_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let seen = daemon(&uds, usize::MAX);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(600));
            theirs.write_all(b"late").unwrap();
            theirs
        });
        let mut buf = [0u8; 4];
        watched(ours, uds).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"late");
        assert!(seen.load(Ordering::SeqCst) >= 5, "the guest was not probed");
        drop(writer.join());
    }

    #[test]
    fn three_failed_probes_in_a_row_lose_the_guest_but_a_held_one_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let seen = daemon(&uds, 2);
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let e = watched(ours, uds.clone()).read(&mut [0u8; 1]).unwrap_err();
        let lost = lost(&e).unwrap_or_else(|| panic!("not lost: {e}"));
        assert_eq!(lost.probes, 3);
        // The two answered probes reset the count: lost at the fifth.
        assert_eq!(seen.load(Ordering::SeqCst), 5, "{lost}");
        assert!(lost.to_string().contains("stopped answering"), "{lost}");

        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut held = watched(ours, uds);
        held.held = Some(Box::new(|| true));
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            theirs.write_all(b"x").unwrap();
            theirs
        });
        held.read_exact(&mut [0u8; 1]).unwrap();
        drop(writer.join());
    }
}
