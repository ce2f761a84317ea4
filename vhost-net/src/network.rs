//! What is behind the device: the user network (the daemon's own TCP/IP stack and host
//! sockets) or a tap device in a network namespace. The backend sees one interface:
//! frames in, frames waiting for the guest, a poll after every event.

use crate::config::NetConfig;
use crate::stack::{self, Net, Poller, Published};
use crate::tap::{self, Tap};
use std::collections::VecDeque;
use std::fs::File;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Stack(#[from] stack::Error),
    #[error(transparent)]
    Tap(#[from] tap::Error),
}

/// What the daemon opened before it dropped its privileges.
#[derive(Debug)]
pub enum Attachment {
    /// The sockets of published ports.
    User(Published),
    /// The tap device.
    Tap(File),
}

pub enum Network {
    User(Box<Net>),
    Tap(Tap),
}

impl Network {
    /// The network, its host fds registered with the worker's epoll instance.
    pub fn new(config: &NetConfig, attachment: Attachment, poller: Poller) -> Result<Self, Error> {
        Ok(match attachment {
            Attachment::User(published) => {
                Self::User(Box::new(Net::new(config, published, poller)?))
            }
            Attachment::Tap(file) => Self::Tap(Tap::new(file, poller)?),
        })
    }

    /// One frame from the guest.
    pub fn guest_frame(&mut self, frame: &[u8]) {
        match self {
            Self::User(net) => net.guest_frame(frame),
            Self::Tap(tap) => tap.guest_frame(frame),
        }
    }

    /// Frames waiting for the guest's RX buffers.
    pub fn to_guest(&mut self) -> &mut VecDeque<Vec<u8>> {
        match self {
            Self::User(net) => &mut net.link.to_guest,
            Self::Tap(tap) => &mut tap.to_guest,
        }
    }

    /// Serves the host side after any event; how long it may wait for the next call.
    pub fn poll(&mut self) -> Option<Duration> {
        match self {
            Self::User(net) => net.poll(),
            Self::Tap(tap) => tap.poll(),
        }
    }
}
