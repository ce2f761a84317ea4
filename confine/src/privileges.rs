//! Giving up privileges a process no longer needs: `no_new_privs` (no execve can grant
//! any), and every capability of the calling thread.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(io::Error),
    #[error("clearing the ambient capability set: {0}")]
    Ambient(io::Error),
    #[error("dropping capability {cap} from the bounding set: {source}")]
    Bounding { cap: u32, source: io::Error },
    #[error("reading this thread's capabilities: {0}")]
    Get(io::Error),
    #[error("dropping every capability: {0}")]
    Set(io::Error),
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_SETPCAP: u32 = 8;
/// Above every capability Linux defines (40 in 6.x); PR_CAPBSET_DROP says EINVAL past
/// the last one.
const CAP_SCAN_LIMIT: u32 = 64;

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What this thread holds now, as `/proc/self/status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub no_new_privs: bool,
    pub effective: u64,
    pub permitted: u64,
}

/// Reads the calling thread's no_new_privs bit and capability sets.
pub fn held() -> Result<Held, Error> {
    // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointers.
    let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    let mut header = Header {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two `Data` for version 3, which `data` holds.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::Get(io::Error::last_os_error()));
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(Held {
        no_new_privs: nnp == 1,
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
    })
}

/// Sets no_new_privs and empties every capability set of the calling thread. Threads
/// spawned afterwards inherit that; threads that already exist keep theirs.
pub fn drop_all() -> Result<(), Error> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Error::NoNewPrivs(io::Error::last_os_error()));
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // Kernels before 4.3 have no ambient set: nothing to clear.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(Error::Ambient(e));
        }
    }
    // The bounding set can only shrink with CAP_SETPCAP; without it (an unprivileged
    // user) there is nothing an execve could gain anyway, and no_new_privs forbids it.
    if held()?.effective & (1 << CAP_SETPCAP) != 0 {
        for cap in 0..CAP_SCAN_LIMIT {
            // SAFETY: PR_CAPBSET_DROP takes a capability number, no pointers.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(Error::Bounding { cap, source: e });
            }
        }
    }
    let mut header = Header {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: capset reads two `Data` for version 3, which `data` holds.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(Error::Set(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_drops_everything_holds_nothing() {
        let held = std::thread::spawn(|| drop_all().and_then(|()| held()))
            .join()
            .expect("thread")
            .expect("drop");
        assert_eq!(
            held,
            Held {
                no_new_privs: true,
                effective: 0,
                permitted: 0
            }
        );
    }
}
