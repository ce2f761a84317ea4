//! Devices the VMM itself emulates: the legacy port-I/O devices and the virtio-mmio
//! transports whose device side lives in vhost-user daemons.

pub mod i8042;
pub mod legacy;
pub mod vhost_user;
pub mod virtio_mmio;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An eventfd as a vm-superio trigger (an irqfd, or the VMM's reset event).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}
