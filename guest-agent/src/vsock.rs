//! An AF_VSOCK stream listener. Accepted connections are returned as `UnixStream`s: only
//! socket-generic calls (read, write, shutdown, dup) are made on them.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

pub struct Listener(OwnedFd);

/// `_IO(7, 0xb9)` from linux/vm_sockets.h.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// This guest's CID as the kernel's vsock transport knows it (it changes when the
/// device's configuration says so after a transport reset, as in a fork).
pub fn local_cid() -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let dev = std::fs::File::open("/dev/vsock")?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 through the pointer, which is valid for it.
    if unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cid)
}

impl Listener {
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor owned by nothing else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_vm is valid; the fields are set below.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: bind with a valid sockaddr_vm of the size passed.
        let bound = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        // SAFETY: listen on our socket.
        if bound < 0 || unsafe { libc::listen(fd, 128) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(owned))
    }

    pub fn accept(&self) -> io::Result<UnixStream> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: accept4 on our listening socket, no address wanted.
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: fd is a fresh connected socket owned by nothing else.
                return Ok(unsafe { UnixStream::from_raw_fd(fd) });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
