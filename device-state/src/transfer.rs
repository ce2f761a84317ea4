//! VHOST_USER_SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE, shared by every daemon: the
//! state moves through the file descriptor on a thread of its own (the request must not
//! block), and the check collects the outcome and hands loaded bytes to the daemon.
//!
//! Every transfer is bounded in time: the descriptor is made non-blocking and each read
//! or write waits at most until [`TRANSFER_TIMEOUT`] after SET_DEVICE_STATE_FD, and so
//! does CHECK_DEVICE_STATE. A frontend that keeps its end of a LOAD pipe open (no EOF)
//! or never reads a SAVE therefore gets a failed check instead of a daemon stuck in the
//! request handler, which could then no longer notice the frontend going away.

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};

/// Largest state a LOAD reads: one container at its limit.
const MAX_STATE: u64 = (crate::MAX_PAYLOAD + 128) as u64;
/// How long a transfer may take, from SET_DEVICE_STATE_FD to the end of the check. A
/// well-behaved frontend has written (LOAD) or read (SAVE) everything before it sends
/// CHECK_DEVICE_STATE, and states are a few hundred bytes.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no state transfer was started")]
    NoTransfer,
    #[error("state transfer thread panicked")]
    Panicked,
    #[error("state transfer: {0}")]
    Io(#[from] io::Error),
    #[error("device state of more than {MAX_STATE} bytes refused")]
    TooLarge,
    #[error("only the STOPPED phase can transfer state")]
    Phase,
    #[error("serializing the device state: {0}")]
    Encode(crate::Error),
    #[error("state transfer not finished within {0:?} (the frontend kept its end open)")]
    TimedOut(Duration),
}

enum Transfer {
    Saving(Receiver<io::Result<()>>, Instant),
    Loading(Receiver<io::Result<Vec<u8>>>, Instant),
}

/// At most one transfer in progress per daemon.
#[derive(Default)]
pub struct Slot(Mutex<Option<Transfer>>);

impl Slot {
    fn set(&self, transfer: Transfer) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(transfer);
    }

    /// VHOST_USER_SET_DEVICE_STATE_FD: a SAVE writes the container of what `state`
    /// returns (the device is quiesced, its rings stopped), a LOAD reads the frontend's
    /// bytes.
    pub fn set_fd<S: crate::Saved>(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
        state: impl FnOnce() -> S,
    ) -> io::Result<Option<File>> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(io::Error::other(Error::Phase));
        }
        match direction {
            VhostTransferStateDirection::SAVE => {
                let bytes = state()
                    .encode()
                    .map_err(|e| io::Error::other(Error::Encode(e)))?;
                self.start_save(file, bytes);
            }
            VhostTransferStateDirection::LOAD => self.start_load(file),
        }
        Ok(None)
    }

    /// VHOST_USER_CHECK_DEVICE_STATE: how the transfer ended; after a LOAD, the bytes
    /// are decoded and `adopt` validates and takes the state. Failures are logged (the
    /// frontend learns only that it failed).
    pub fn check<S, E>(&self, adopt: impl FnOnce(S) -> Result<(), E>) -> io::Result<()>
    where
        S: crate::Saved,
        E: std::error::Error + Send + Sync + 'static,
    {
        let result = match self.finish() {
            Ok(None) => Ok(()),
            Ok(Some(bytes)) => match S::decode(&bytes) {
                Ok(state) => adopt(state).map_err(io::Error::other),
                Err(e) => Err(io::Error::other(e)),
            },
            Err(e) => Err(io::Error::other(e)),
        };
        if let Err(e) = &result {
            log::error!("device state: {e}");
        }
        result
    }

    /// SAVE: writes `state` (already serialized, the device quiesced) to `file`.
    fn start_save(&self, file: File, state: Vec<u8>) {
        let deadline = Instant::now() + TRANSFER_TIMEOUT;
        let (done, outcome) = mpsc::channel();
        thread::spawn(move || {
            let _ = done.send(write_all_by(file, &state, deadline));
        });
        self.set(Transfer::Saving(outcome, deadline));
    }

    /// LOAD: reads the frontend's state from `file` to EOF.
    fn start_load(&self, file: File) {
        let deadline = Instant::now() + TRANSFER_TIMEOUT;
        let (done, outcome) = mpsc::channel();
        thread::spawn(move || {
            // One byte over the limit tells an oversized state from one at the limit.
            let _ = done.send(read_to_end_by(file, MAX_STATE + 1, deadline));
        });
        self.set(Transfer::Loading(outcome, deadline));
    }

    /// Waits for the transfer, at most until its deadline: `None` after a save, the
    /// bytes read after a load.
    fn finish(&self) -> Result<Option<Vec<u8>>, Error> {
        let transfer = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(Error::NoTransfer)?;
        match transfer {
            Transfer::Saving(outcome, deadline) => {
                wait(&outcome, deadline)?.map_err(io_error)?;
                Ok(None)
            }
            Transfer::Loading(outcome, deadline) => {
                let bytes = wait(&outcome, deadline)?.map_err(io_error)?;
                if bytes.len() as u64 > MAX_STATE {
                    return Err(Error::TooLarge);
                }
                Ok(Some(bytes))
            }
        }
    }
}

fn io_error(e: io::Error) -> Error {
    match e.kind() {
        ErrorKind::TimedOut => Error::TimedOut(TRANSFER_TIMEOUT),
        _ => Error::Io(e),
    }
}

fn wait<T>(outcome: &Receiver<T>, deadline: Instant) -> Result<T, Error> {
    // A little past the deadline: the thread's own I/O gives up at the deadline itself.
    let limit = deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(100);
    outcome.recv_timeout(limit).map_err(|e| match e {
        RecvTimeoutError::Timeout => Error::TimedOut(TRANSFER_TIMEOUT),
        RecvTimeoutError::Disconnected => Error::Panicked,
    })
}

/// Sets O_NONBLOCK on a descriptor the frontend handed over. The flag lives on the open
/// file description, which the frontend shares; frontends use non-blocking eventfds and
/// pipes for these anyway.
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor borrowed for the duration of the call.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with flags read above plus O_NONBLOCK; no memory is passed.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `file` is ready for `events` or the deadline passes.
fn ready_by(file: &File, events: libc::c_short, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(ErrorKind::TimedOut, "device state transfer"));
    }
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd for the duration of the call.
    if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Reads to EOF, at most `limit` bytes, giving up at `deadline`.
fn read_to_end_by(mut file: File, limit: u64, deadline: Instant) -> io::Result<Vec<u8>> {
    set_nonblocking(&file)?;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 << 10];
    while (bytes.len() as u64) < limit {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => ready_by(&file, libc::POLLIN, deadline)?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(bytes)
}

/// Writes all of `data`, giving up at `deadline`.
fn write_all_by(mut file: File, mut data: &[u8], deadline: Instant) -> io::Result<()> {
    set_nonblocking(&file)?;
    while !data.is_empty() {
        match file.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                ready_by(&file, libc::POLLOUT, deadline)?
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array; checked below.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are fresh and owned by nothing else.
        unsafe {
            (
                File::from(OwnedFd::from_raw_fd(fds[0])),
                File::from(OwnedFd::from_raw_fd(fds[1])),
            )
        }
    }

    #[test]
    fn save_then_load_moves_the_bytes_and_a_second_finish_is_refused() {
        let slot = Slot::default();
        let (mut read_end, write_end) = pipe();
        slot.start_save(write_end, b"state".to_vec());
        let mut got = Vec::new();
        read_end.read_to_end(&mut got).unwrap();
        assert_eq!(slot.finish().unwrap(), None);
        assert_eq!(got, b"state");
        assert!(matches!(slot.finish(), Err(Error::NoTransfer)));

        let (read_end, mut write_end) = pipe();
        slot.start_load(read_end);
        write_end.write_all(b"loaded").unwrap();
        drop(write_end);
        assert_eq!(slot.finish().unwrap(), Some(b"loaded".to_vec()));
    }

    #[test]
    fn a_save_nobody_reads_times_out_instead_of_blocking() {
        let slot = Slot::default();
        let (read_end, write_end) = pipe();
        // More than a pipe holds, and the frontend never reads.
        slot.start_save(write_end, vec![7; 1 << 20]);
        let started = Instant::now();
        let err = slot.finish().unwrap_err();
        assert!(matches!(err, Error::TimedOut(_)), "{err}");
        assert!(started.elapsed() < TRANSFER_TIMEOUT + Duration::from_secs(2));
        drop(read_end);
    }

    #[test]
    fn a_load_whose_pipe_stays_open_times_out_instead_of_blocking() {
        let slot = Slot::default();
        let (read_end, mut write_end) = pipe();
        slot.start_load(read_end);
        write_end.write_all(b"partial").unwrap();
        let started = Instant::now();
        let err = slot.finish().unwrap_err();
        assert!(matches!(err, Error::TimedOut(_)), "{err}");
        assert!(started.elapsed() < TRANSFER_TIMEOUT + Duration::from_secs(2));
        drop(write_end);
    }
}
