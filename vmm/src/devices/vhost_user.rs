//! vhost-user frontend steps shared by the VMM's transports and the integration
//! harness (`integration/src/frontend.rs`): connecting to a daemon that may still be
//! starting, and moving its device state through VHOST_USER_SET_DEVICE_STATE_FD and
//! checking it with CHECK_DEVICE_STATE.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use vhost::vhost_user::{Frontend, VhostUserFrontend};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating the state pipe: {0}")]
    Pipe(io::Error),
    #[error("VHOST_USER_SET_DEVICE_STATE_FD: {0}")]
    SetFd(vhost::Error),
    #[error("moving the device state through the pipe: {0}")]
    Transfer(io::Error),
    #[error("VHOST_USER_CHECK_DEVICE_STATE: the daemon reports a failed transfer: {0}")]
    Check(vhost::Error),
}

/// Connects to a daemon's socket, retrying until `timeout` while the daemon starts;
/// the last connection error otherwise.
pub fn connect(path: &Path, max_queues: u64, timeout: Duration) -> Result<Frontend, vhost::Error> {
    let deadline = Instant::now() + timeout;
    loop {
        match Frontend::connect(path, max_queues) {
            Ok(vu) => return Ok(vu),
            Err(_) if Instant::now() < deadline => sleep(Duration::from_millis(10)),
            Err(e) => return Err(e),
        }
    }
}

/// Asks a daemon whose rings are stopped (GET_VRING_BASE) for its device state.
pub fn save_device_state(vu: &mut Frontend) -> Result<Vec<u8>, Error> {
    let (mut read_end, write_end) = pipe()?;
    let reply = vu
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            write_end,
        )
        .map_err(Error::SetFd)?;
    let mut state = Vec::new();
    match reply {
        // The daemon chose its own descriptor; ours is unused.
        Some(mut file) => file.read_to_end(&mut state),
        None => read_end.read_to_end(&mut state),
    }
    .map_err(Error::Transfer)?;
    vu.check_device_state().map_err(Error::Check)?;
    Ok(state)
}

/// Hands a daemon whose rings are not started the state a SAVE produced.
pub fn load_device_state(vu: &mut Frontend, state: &[u8]) -> Result<(), Error> {
    let (read_end, write_end) = pipe()?;
    let reply = vu
        .set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(read_end),
        )
        .map_err(Error::SetFd)?;
    let mut sink = match reply {
        Some(file) => file,
        None => File::from(write_end),
    };
    sink.write_all(state).map_err(Error::Transfer)?;
    drop(sink);
    vu.check_device_state().map_err(Error::Check)
}

fn pipe() -> Result<(File, OwnedFd), Error> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(Error::Pipe(io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
