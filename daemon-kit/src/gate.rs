//! The gate: the frontend talks to this relay, and the relay to vhost-user-backend's
//! handler over a private socket. Every frontend message passes [`crate::checks`] first;
//! a refused one is answered with a failed REPLY_ACK (when the frontend asked for one)
//! and ends the session, as a request the handler itself refuses does. Replies flow back
//! unchanged. Only control messages take this path: rings and kicks do not. The gate
//! also evens out one ordering difference between frontends and the handler
//! ([`checks::Order`]: QEMU's early SET_VRING_ENABLE).

use crate::checks::{self, Admit, Limits, Order, Refusal};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// `struct VhostUserMsgHeader`: request u32, flags u32, size u32.
const HEADER_LEN: usize = 12;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vhost-user socket: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Refused(Refusal),
    #[error("starting the gate thread: {0}")]
    Spawn(io::Error),
}

/// One vhost-user message with the descriptors that came with it.
struct Message {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    files: Vec<File>,
}

impl Message {
    fn word(&self, at: usize) -> u32 {
        let h = &self.header;
        u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
    }

    fn request(&self) -> u32 {
        self.word(0)
    }

    fn need_reply(&self) -> bool {
        self.word(4) & FLAG_NEED_REPLY != 0
    }

    /// A request of the gate's own, wanting no reply.
    fn new_request(request: u32, payload: &[u8]) -> Self {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&FLAG_VERSION_1.to_le_bytes());
        header[8..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Self {
            header,
            payload: payload.to_vec(),
            files: Vec::new(),
        }
    }

    /// A REPLY_ACK for this request: 0 for success, anything else for failure.
    fn ack(&self, status: u64) -> Self {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&self.request().to_le_bytes());
        header[4..8].copy_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
        header[8..].copy_from_slice(&8u32.to_le_bytes());
        Self {
            header,
            payload: status.to_le_bytes().to_vec(),
            files: Vec::new(),
        }
    }
}

/// Reads one message; `None` when the peer closed the connection.
fn recv(stream: &UnixStream) -> Result<Option<Message>, Error> {
    let mut header = [0u8; HEADER_LEN];
    let mut fds: [RawFd; MAX_ATTACHED_FD_ENTRIES] = [-1; MAX_ATTACHED_FD_ENTRIES];
    let (got, nfds) = loop {
        let mut iov = [libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: HEADER_LEN,
        }];
        // SAFETY: the iovec points into `header`, which any bytes may fill.
        match unsafe { stream.recv_with_fds(&mut iov, &mut fds) } {
            Ok(done) => break done,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    let files: Vec<File> = fds[..nfds]
        .iter()
        // SAFETY: recvmsg just installed these descriptors; nothing else owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if got == 0 {
        return Ok(None);
    }
    let mut reader = stream;
    reader.read_exact(&mut header[got..])?;
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_MSG_SIZE {
        let request = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        return Err(Error::Refused(Refusal::TooLarge {
            request,
            size,
            max: MAX_MSG_SIZE,
        }));
    }
    let mut payload = vec![0u8; size];
    reader.read_exact(&mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        files,
    }))
}

/// Writes one message, its descriptors attached to its first byte.
fn send(stream: &UnixStream, msg: &Message) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + msg.payload.len());
    bytes.extend_from_slice(&msg.header);
    bytes.extend_from_slice(&msg.payload);
    let fds: Vec<RawFd> = msg.files.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = loop {
        match stream.send_with_fds(&[&bytes[..]], &fds) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    };
    let mut writer = stream;
    writer.write_all(&bytes[sent..])
}

/// The two relay threads of one session.
pub struct Gate {
    handler: UnixStream,
    up: JoinHandle<Option<Refusal>>,
    down: JoinHandle<()>,
    /// Hands the frontend to the threads once it connects; dropped, it ends them.
    connect: Option<(Sender<Frontend>, Sender<Replies>)>,
    frontend: Option<UnixStream>,
}

/// The frontend as the request relay reads it, and where replies go.
type Frontend = (UnixStream, Replies);
/// The frontend as the relays write to it (both may answer).
type Replies = Arc<Mutex<UnixStream>>;

impl Gate {
    /// Starts the relay threads for `handler` (the handler's end of the private socket)
    /// before the frontend connects: thread creation is then not on the path of the
    /// frontend's first message. [`Gate::connect`] hands them the frontend.
    pub fn prepare(handler: UnixStream, limits: Limits) -> Result<Self, Error> {
        let (up_tx, up_rx) = mpsc::channel::<Frontend>();
        let (down_tx, down_rx) = mpsc::channel::<Replies>();
        let up = {
            let to = handler.try_clone()?;
            thread::Builder::new()
                .name("vhost-user-gate".into())
                .spawn(move || {
                    let (from, replies) = up_rx.recv().ok()?;
                    relay_requests(&from, &to, &replies, limits)
                })
                .map_err(Error::Spawn)?
        };
        let down = {
            let from = handler.try_clone()?;
            thread::Builder::new()
                .name("vhost-user-replies".into())
                .spawn(move || {
                    if let Ok(to) = down_rx.recv() {
                        relay_replies(&from, &to);
                    }
                })
                .map_err(Error::Spawn)?
        };
        Ok(Self {
            handler,
            up,
            down,
            connect: Some((up_tx, down_tx)),
            frontend: None,
        })
    }

    /// Relays between the frontend that connected and the handler.
    pub fn connect(&mut self, frontend: UnixStream) -> Result<(), Error> {
        let replies = Arc::new(Mutex::new(frontend.try_clone()?));
        let from = frontend.try_clone()?;
        self.frontend = Some(frontend);
        if let Some((up, down)) = self.connect.take() {
            // A relay that is gone has ended the session already; `stop` says why.
            let _ = down.send(replies.clone());
            let _ = up.send((from, replies));
        }
        Ok(())
    }

    /// Ends the session (if it is not over yet) and returns the refusal that ended it.
    pub fn stop(mut self) -> Option<Refusal> {
        self.connect = None;
        if let Some(frontend) = &self.frontend {
            let _ = frontend.shutdown(Shutdown::Both);
        }
        let _ = self.handler.shutdown(Shutdown::Both);
        let _ = self.down.join();
        self.up.join().unwrap_or_default()
    }
}

/// Frontend → handler, checked. Ends the session on EOF, an unreadable message or a
/// refusal; the handler then sees its socket close and returns.
fn relay_requests(
    from: &UnixStream,
    to: &UnixStream,
    replies: &Mutex<UnixStream>,
    limits: Limits,
) -> Option<Refusal> {
    let mut order = Order::default();
    let refusal = loop {
        let msg = match recv(from) {
            Ok(Some(msg)) => msg,
            Ok(None) => break None,
            Err(Error::Refused(refusal)) => {
                log::error!("refused [{}]: {refusal}", refusal.code());
                break Some(refusal);
            }
            Err(e) => {
                log::warn!("frontend: {e}");
                break None;
            }
        };
        if let Err(refusal) = checks::check(msg.request(), &msg.payload, &msg.files, limits) {
            log::error!("refused [{}]: {refusal}", refusal.code());
            if msg.need_reply() {
                let out = replies.lock().unwrap_or_else(|e| e.into_inner());
                let _ = send(&out, &msg.ack(1));
            }
            break Some(refusal);
        }
        log::trace!(
            "request {} flags {:#x} payload {:02x?}",
            msg.request(),
            msg.word(4),
            &msg.payload[..msg.payload.len().min(16)]
        );
        match order.admit(msg.request(), &msg.payload) {
            Admit::Forward => {
                if send(to, &msg).is_err() {
                    break None;
                }
            }
            Admit::AnswerHere => {
                log::debug!("SET_VRING_ENABLE before PROTOCOL_FEATURES: held for later");
                if msg.need_reply() {
                    let out = replies.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = send(&out, &msg.ack(0));
                }
            }
            Admit::ForwardThenEnable(states) => {
                let replayed = states
                    .iter()
                    .map(|state| Message::new_request(checks::request::SET_VRING_ENABLE, state));
                if std::iter::once(msg)
                    .chain(replayed)
                    .any(|m| send(to, &m).is_err())
                {
                    break None;
                }
            }
        }
    };
    let _ = to.shutdown(Shutdown::Both);
    refusal
}

/// Handler → frontend, unchanged. When the handler ends the session, so does the relay.
fn relay_replies(from: &UnixStream, to: &Mutex<UnixStream>) {
    while let Ok(Some(msg)) = recv(from) {
        let out = to.lock().unwrap_or_else(|e| e.into_inner());
        if send(&out, &msg).is_err() {
            break;
        }
    }
    let out = to.lock().unwrap_or_else(|e| e.into_inner());
    let _ = out.shutdown(Shutdown::Both);
}
