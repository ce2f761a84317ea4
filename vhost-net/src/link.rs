//! The link between the guest and the TCP/IP stack: two bounded frame queues that
//! smoltcp sees as an Ethernet device.

use crate::frame::MAX_FRAME;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use std::collections::VecDeque;

/// Frames waiting for the guest's RX buffers. The stack stops transmitting when this
/// many wait (TCP keeps its data in its socket buffers); replies to guest frames beyond
/// it are dropped, as a full link drops them.
pub const TO_GUEST_FRAMES: usize = 1024;
/// Frames from the guest waiting for the stack; the owner polls the stack at this mark.
pub const FROM_GUEST_FRAMES: usize = 64;

#[derive(Debug, Default)]
pub struct Link {
    pub from_guest: VecDeque<Vec<u8>>,
    pub to_guest: VecDeque<Vec<u8>>,
}

impl Link {
    /// Queues a frame for the guest; `false` (and the frame dropped) when the queue is full.
    pub fn send_to_guest(&mut self, frame: Vec<u8>) -> bool {
        if self.to_guest.len() >= TO_GUEST_FRAMES {
            return false;
        }
        self.to_guest.push_back(frame);
        true
    }
}

pub struct RxToken(Vec<u8>);
pub struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let result = f(&mut frame);
        if self.0.len() < TO_GUEST_FRAMES && len <= MAX_FRAME {
            self.0.push_back(frame);
        }
        result
    }
}

impl phy::Device for Link {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.from_guest.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.to_guest)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        (self.to_guest.len() < TO_GUEST_FRAMES).then_some(TxToken(&mut self.to_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}
