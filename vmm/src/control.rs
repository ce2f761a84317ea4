//! The control socket's connections, served without ever blocking the event loop.
//!
//! Every client socket is non-blocking and has its own input and output buffers: a
//! client that sends half a line, or never reads its replies, costs memory up to a
//! bound and nothing else. A line longer than [`MAX_LINE`] or more than
//! [`MAX_PENDING`] bytes of unread replies drops that client. Every complete line is
//! answered, also when several arrive in one read. When the process runs out of file
//! descriptors the listener is disarmed for [`ACCEPT_BACKOFF`] instead of spinning on
//! a level-triggered accept that keeps failing.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Longest request line, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;
/// Most reply bytes kept for a client that does not read them.
pub const MAX_PENDING: usize = 1 << 20;
/// How long accepting pauses when file descriptors run out.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);
/// At most this much is read from one client per event, so that one fast writer
/// cannot starve the rest of the loop.
const READ_BUDGET: usize = 4 * MAX_LINE;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("making the control socket non-blocking: {0}")]
    NonBlocking(io::Error),
    #[error("watching the control socket: {0}")]
    Epoll(io::Error),
}

/// What a readable client produced.
pub struct Lines {
    /// Complete request lines, in order, without their newline.
    pub lines: Vec<String>,
    /// The client sent a line longer than [`MAX_LINE`]: it is answered with an error
    /// and dropped once its replies are written.
    pub overflow: bool,
}

/// Takes the complete lines (without their newline) off the front of a client's input;
/// what follows the last newline stays for the next read. A line, or an unfinished
/// rest, longer than [`MAX_LINE`] is an overflow: the input is then dropped.
pub fn split_lines(input: &mut Vec<u8>) -> Lines {
    let mut lines = Vec::new();
    let mut overflow = false;
    while let Some(end) = input.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = input.drain(..=end).collect();
        if line.len() - 1 > MAX_LINE {
            overflow = true;
            break;
        }
        lines.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
    }
    if overflow || input.len() > MAX_LINE {
        overflow = true;
        *input = Vec::new();
    }
    Lines { lines, overflow }
}

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// The events epoll watches for this client.
    armed: EventSet,
    /// No more input is read; the client is dropped once `output` is written.
    closing: bool,
}

/// The listener and its clients; tokens are `token_base | fd`.
pub struct Server {
    listener: UnixListener,
    listener_token: u64,
    token_base: u64,
    clients: HashMap<u64, Client>,
    backoff_until: Option<Instant>,
}

impl Server {
    pub fn new(
        listener: UnixListener,
        epoll: &Epoll,
        listener_token: u64,
        token_base: u64,
    ) -> Result<Self, Error> {
        listener.set_nonblocking(true).map_err(Error::NonBlocking)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, listener_token),
            )
            .map_err(Error::Epoll)?;
        Ok(Self {
            listener,
            listener_token,
            token_base,
            clients: HashMap::new(),
            backoff_until: None,
        })
    }

    /// Whether `token` names one of this server's clients.
    pub fn owns(&self, token: u64) -> bool {
        self.clients.contains_key(&token)
    }

    /// When the event loop must wake up to re-arm the listener.
    pub fn wake_at(&self) -> Option<Instant> {
        self.backoff_until
    }

    /// Re-arms the listener once a backoff has passed.
    pub fn tick(&mut self, epoll: &Epoll) {
        if self.backoff_until.is_some_and(|t| Instant::now() >= t) {
            self.backoff_until = None;
            let event = EpollEvent::new(EventSet::IN, self.listener_token);
            if let Err(e) = epoll.ctl(ControlOperation::Modify, self.listener.as_raw_fd(), event) {
                log::error!("re-arming the control socket: {e}");
            }
        }
    }

    /// Accepts every waiting connection.
    pub fn accept(&mut self, epoll: &Epoll) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.add(epoll, stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    log::warn!(
                        "control socket: cannot accept ({e}); pausing accepts for {ACCEPT_BACKOFF:?}"
                    );
                    self.backoff_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    let idle = EpollEvent::new(EventSet::empty(), self.listener_token);
                    let fd = self.listener.as_raw_fd();
                    if let Err(e) = epoll.ctl(ControlOperation::Modify, fd, idle) {
                        log::error!("disarming the control socket: {e}");
                    }
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and friends concern one connection only.
                    log::warn!("control socket: accept: {e}");
                    return;
                }
            }
        }
    }

    fn add(&mut self, epoll: &Epoll, stream: UnixStream) {
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("control client: {e}");
            return;
        }
        let fd = stream.as_raw_fd();
        let token = self.token_base | fd as u64;
        let events = EventSet::IN | EventSet::READ_HANG_UP;
        if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token)) {
            log::warn!("control client: {e}");
            return;
        }
        self.clients.insert(
            token,
            Client {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                armed: events,
                closing: false,
            },
        );
    }

    /// Reads what a client sent and splits it into complete lines.
    pub fn read(&mut self, token: u64) -> Lines {
        let none = Lines {
            lines: Vec::new(),
            overflow: false,
        };
        let Some(client) = self.clients.get_mut(&token) else {
            return none;
        };
        if client.closing {
            return none;
        }
        let mut closing = false;
        let mut budget = READ_BUDGET;
        let mut chunk = [0u8; 16 * 1024];
        while budget > 0 {
            match client.stream.read(&mut chunk) {
                Ok(0) => {
                    closing = true;
                    break;
                }
                Ok(n) => {
                    client.input.extend_from_slice(&chunk[..n]);
                    budget = budget.saturating_sub(n);
                    if pending_line_len(&client.input) > MAX_LINE {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    closing = true;
                    break;
                }
            }
        }
        let split = split_lines(&mut client.input);
        client.closing = closing || split.overflow;
        split
    }

    /// Queues a reply (one line, newline included).
    pub fn queue(&mut self, token: u64, reply: &str) {
        if let Some(client) = self.clients.get_mut(&token) {
            client.output.extend_from_slice(reply.as_bytes());
        }
    }

    /// Writes what the client will take; drops it when it is gone, has too much unread
    /// output, or is closing and has nothing left to write.
    pub fn flush(&mut self, epoll: &Epoll, token: u64) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        let close = client.closing;
        let mut broken = false;
        while !client.output.is_empty() {
            match client.stream.write(&client.output) {
                Ok(0) => {
                    broken = true;
                    break;
                }
                Ok(n) => {
                    client.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if broken || client.output.len() > MAX_PENDING || (close && client.output.is_empty()) {
            if client.output.len() > MAX_PENDING {
                log::warn!(
                    "control client left {} bytes of replies unread; dropping it",
                    client.output.len()
                );
            }
            self.drop_client(epoll, token);
            return;
        }
        // A closing client is no longer read: only its output matters.
        let mut events = if close {
            EventSet::READ_HANG_UP
        } else {
            EventSet::IN | EventSet::READ_HANG_UP
        };
        if !client.output.is_empty() {
            events |= EventSet::OUT;
        }
        if events != client.armed {
            client.armed = events;
            let fd = client.stream.as_raw_fd();
            if epoll
                .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
                .is_err()
            {
                self.drop_client(epoll, token);
            }
        }
    }

    pub fn drop_client(&mut self, epoll: &Epoll, token: u64) {
        if let Some(client) = self.clients.remove(&token) {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                client.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }
}

/// Length of the unterminated line at the end of `input`.
fn pending_line_len(input: &[u8]) -> usize {
    match input.iter().rposition(|&b| b == b'\n') {
        Some(last) => input.len() - last - 1,
        None => input.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unterminated_tail_is_what_counts_against_the_line_limit() {
        assert_eq!(pending_line_len(b""), 0);
        assert_eq!(pending_line_len(b"abc"), 3);
        assert_eq!(pending_line_len(b"{\"cmd\":1}\n"), 0);
        assert_eq!(pending_line_len(b"one\ntwo\nthr"), 3);
    }

    #[test]
    fn complete_lines_are_taken_and_the_rest_waits_or_overflows() {
        let mut input = b"{\"cmd\":\"status\"}\n\n{\"cmd\"".to_vec();
        let read = split_lines(&mut input);
        assert_eq!(read.lines, ["{\"cmd\":\"status\"}", ""]);
        assert!(!read.overflow);
        assert_eq!(input, b"{\"cmd\"");

        let mut input = vec![b'x'; MAX_LINE + 1];
        assert!(split_lines(&mut input).overflow);
        assert!(input.is_empty());
        let mut input = vec![b'x'; MAX_LINE];
        input.push(b'\n');
        let read = split_lines(&mut input);
        assert_eq!((read.lines.len(), read.overflow), (1, false));
    }
}
