//! Frames: `len: u32 LE` (of what follows), `kind: u8`, payload. Control frames carry
//! one JSON message; data frames carry raw bytes, so stdio is not re-encoded.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{self, Read, Write};

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Control = 0,
    Stdin = 1,
    Stdout = 2,
    Stderr = 3,
    /// A secret's value, kept out of JSON so that it can be wiped after use.
    Secret = 4,
    /// File contents (for file transfer requests).
    File = 5,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Control,
            1 => Self::Stdin,
            2 => Self::Stdout,
            3 => Self::Stderr,
            4 => Self::Secret,
            5 => Self::File,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("bad control message: {0}")]
    Json(#[from] serde_json::Error),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn control(message: &impl Serialize) -> Result<Self, Error> {
        Ok(Self {
            kind: Kind::Control,
            payload: serde_json::to_vec(message)?,
        })
    }

    pub fn data(kind: Kind, payload: &[u8]) -> Self {
        Self {
            kind,
            payload: payload.to_vec(),
        }
    }

    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Error> {
        Ok(serde_json::from_slice(&self.payload)?)
    }
}

/// Writes one frame (header and payload in one write).
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), Error> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Error::TooLarge(payload.len()));
    }
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.extend_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
    buf.push(kind as u8);
    buf.extend_from_slice(payload);
    let written = w.write_all(&buf);
    wipe(&mut buf);
    written?;
    Ok(())
}

/// Zeroes a buffer in a way the compiler cannot drop as a dead store. Every buffer that
/// held workspace data (a secret a command printed, stdin, a file) is wiped before it is
/// freed: the agent is PID 1 and its freed heap is never returned to the kernel (which
/// would zero it, `init_on_free=1`), so a snapshot of guest memory would keep the bytes.
pub fn wipe(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // SAFETY: a volatile write to a valid, exclusively borrowed byte.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

pub fn write_control(w: &mut impl Write, message: &impl Serialize) -> Result<(), Error> {
    write_frame(w, Kind::Control, &serde_json::to_vec(message)?)
}

/// Reads one frame; [`Error::Closed`] on a clean end between frames.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, Error> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(Error::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        return Err(Error::Empty);
    }
    if len - 1 > MAX_PAYLOAD {
        return Err(Error::TooLarge(len - 1));
    }
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind)?;
    let kind = Kind::from_byte(kind[0]).ok_or(Error::UnknownKind(kind[0]))?;
    let mut payload = vec![0u8; len - 1];
    r.read_exact(&mut payload)?;
    Ok(Frame { kind, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{AgentMessage, HostMessage};

    #[test]
    fn control_and_data_frames_round_trip() {
        let mut wire = Vec::new();
        write_control(&mut wire, &HostMessage::Hello { version: 1 }).unwrap();
        write_frame(&mut wire, Kind::Stdout, b"bytes\x00\xff").unwrap();
        let mut r = &wire[..];
        let hello: HostMessage = read_frame(&mut r).unwrap().parse().unwrap();
        assert_eq!(hello, HostMessage::Hello { version: 1 });
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Frame::data(Kind::Stdout, b"bytes\x00\xff")
        );
        assert!(matches!(read_frame(&mut r), Err(Error::Closed)));
    }

    #[test]
    fn truncated_oversized_and_unknown_frames_are_rejected() {
        let mut wire = Vec::new();
        write_control(
            &mut wire,
            &AgentMessage::Exited {
                code: Some(3),
                signal: None,
            },
        )
        .unwrap();
        let cut = &wire[..wire.len() - 2];
        assert!(matches!(read_frame(&mut &cut[..]), Err(Error::Io(_))));

        let huge = ((MAX_PAYLOAD + 2) as u32).to_le_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(Error::TooLarge(_))
        ));
        assert!(matches!(
            write_frame(&mut Vec::new(), Kind::Stdin, &vec![0; MAX_PAYLOAD + 1]),
            Err(Error::TooLarge(_))
        ));
        assert!(matches!(
            read_frame(&mut &[0u8, 0, 0, 0][..]),
            Err(Error::Empty)
        ));
        assert!(matches!(
            read_frame(&mut &[1u8, 0, 0, 0, 9][..]),
            Err(Error::UnknownKind(9))
        ));
        let junk = Frame::data(Kind::Control, b"{not json");
        assert!(matches!(junk.parse::<HostMessage>(), Err(Error::Json(_))));
    }
}
