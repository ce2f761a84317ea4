//! VHOST_USER_SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE, shared by every daemon: the
//! state moves through the file descriptor on a thread of its own (the request must not
//! block), and the check collects the outcome and hands loaded bytes to the daemon.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::Mutex;
use std::thread::{self, JoinHandle};
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};

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
    #[error("only the STOPPED phase can transfer state")]
    Phase,
    #[error("serializing the device state: {0}")]
    Encode(crate::Error),
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

    /// VHOST_USER_SET_DEVICE_STATE_FD: a SAVE writes what `state` serializes (the
    /// device is quiesced, its rings stopped), a LOAD reads the frontend's bytes.
    pub fn set_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
        state: impl FnOnce() -> Result<Vec<u8>, crate::Error>,
    ) -> io::Result<Option<File>> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(io::Error::other(Error::Phase));
        }
        match direction {
            VhostTransferStateDirection::SAVE => {
                let bytes = state().map_err(|e| io::Error::other(Error::Encode(e)))?;
                self.start_save(file, bytes);
            }
            VhostTransferStateDirection::LOAD => self.start_load(file),
        }
        Ok(None)
    }

    /// VHOST_USER_CHECK_DEVICE_STATE: how the transfer ended; after a LOAD, `adopt`
    /// validates and takes the bytes. Failures are logged (the frontend learns only
    /// that it failed).
    pub fn check<E>(&self, adopt: impl FnOnce(&[u8]) -> Result<(), E>) -> io::Result<()>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let result = match self.finish() {
            Ok(None) => Ok(()),
            Ok(Some(bytes)) => adopt(&bytes).map_err(io::Error::other),
            Err(e) => Err(io::Error::other(e)),
        };
        if let Err(e) = &result {
            log::error!("device state: {e}");
        }
        result
    }

    /// SAVE: writes `state` (already serialized, the device quiesced) to `file`.
    fn start_save(&self, mut file: File, state: Vec<u8>) {
        self.set(Transfer::Saving(thread::spawn(move || {
            file.write_all(&state)
        })));
    }

    /// LOAD: reads the frontend's state from `file` to EOF.
    fn start_load(&self, file: File) {
        self.set(Transfer::Loading(thread::spawn(move || {
            let mut bytes = Vec::new();
            // One byte over the limit tells an oversized state from one at the limit.
            file.take(MAX_STATE + 1).read_to_end(&mut bytes)?;
            Ok(bytes)
        })));
    }

    /// Waits for the transfer: `None` after a save, the bytes read after a load.
    fn finish(&self) -> Result<Option<Vec<u8>>, Error> {
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
