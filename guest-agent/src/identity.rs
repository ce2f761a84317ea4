//! A forked workspace's own identity: hostname, machine-id, and a reseeded kernel CRNG
//! so that two forks of one snapshot do not produce the same random numbers.

use crate::init::Root;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;

/// `_IOW('R', 0x03, int[2])`
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn valid_machine_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

pub fn apply(
    root: &Root,
    hostname: &str,
    machine_id: &str,
    entropy: &[u8],
    mac: Option<&str>,
) -> Result<(), String> {
    if !valid_hostname(hostname) {
        return Err(format!("invalid hostname {hostname:?}"));
    }
    if !valid_machine_id(machine_id) {
        return Err(format!(
            "machine-id must be 32 lowercase hex digits, got {machine_id:?}"
        ));
    }
    let mac = mac
        .map(|text| {
            crate::net::parse_mac(text).ok_or_else(|| format!("invalid MAC address {text:?}"))
        })
        .transpose()?;
    // SAFETY: sethostname with a pointer/length pair into a live str.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } < 0 {
        return Err(format!("sethostname: {}", io::Error::last_os_error()));
    }
    let etc = root.path().join("etc");
    fs::create_dir_all(&etc).map_err(|e| e.to_string())?;
    fs::write(etc.join("hostname"), format!("{hostname}\n")).map_err(|e| e.to_string())?;
    fs::write(etc.join("machine-id"), format!("{machine_id}\n")).map_err(|e| e.to_string())?;
    reseed(entropy).map_err(|e| format!("reseeding the kernel CRNG: {e}"))?;
    mac.map_or(Ok(()), crate::net::set_mac)
}

/// Credits `entropy` to the input pool, then forces the CRNG to reseed from it.
fn reseed(entropy: &[u8]) -> io::Result<()> {
    let random = File::options().write(true).open("/dev/random")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: the buffer is a complete rand_pool_info of the sizes it declares.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_validated() {
        assert!(valid_hostname("builder-fork-2"));
        assert!(!valid_hostname("bad host"));
        assert!(!valid_hostname(""));
        assert!(valid_machine_id("0123456789abcdef0123456789abcdef"));
        assert!(!valid_machine_id("0123456789ABCDEF0123456789ABCDEF"));
        assert!(!valid_machine_id("short"));
    }
}
