//! The transfer side of VHOST_USER_SET_DEVICE_STATE_FD, shared by every daemon: the
//! state moves through the file descriptor on a thread of its own (the request must not
//! block), and CHECK_DEVICE_STATE collects the outcome.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::Mutex;
use std::thread::{self, JoinHandle};

/// Largest state a LOAD reads: one container at its limit.
const MAX_STATE: u64 = (crate::MAX_PAYLOAD + 128) as u64;

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
}

enum Transfer {
    Saving(JoinHandle<io::Result<()>>),
    Loading(JoinHandle<io::Result<Vec<u8>>>),
}

/// At most one transfer in progress per daemon.
#[derive(Default)]
pub struct Slot(Mutex<Option<Transfer>>);

impl Slot {
    fn set(&self, transfer: Transfer) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(transfer);
    }

    /// SAVE: writes `state` (already serialized, the device quiesced) to `file`.
    pub fn start_save(&self, mut file: File, state: Vec<u8>) {
        self.set(Transfer::Saving(thread::spawn(move || {
            file.write_all(&state)
        })));
    }

    /// LOAD: reads the frontend's state from `file` to EOF.
    pub fn start_load(&self, file: File) {
        self.set(Transfer::Loading(thread::spawn(move || {
            let mut bytes = Vec::new();
            // One byte over the limit tells an oversized state from one at the limit.
            file.take(MAX_STATE + 1).read_to_end(&mut bytes)?;
            Ok(bytes)
        })));
    }

    /// Waits for the transfer: `None` after a save, the bytes read after a load.
    pub fn finish(&self) -> Result<Option<Vec<u8>>, Error> {
        let transfer = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(Error::NoTransfer)?;
        match transfer {
            Transfer::Saving(handle) => {
                handle.join().map_err(|_| Error::Panicked)??;
                Ok(None)
            }
            Transfer::Loading(handle) => {
                let bytes = handle.join().map_err(|_| Error::Panicked)??;
                if bytes.len() as u64 > MAX_STATE {
                    return Err(Error::TooLarge);
                }
                Ok(Some(bytes))
            }
        }
    }
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
}
