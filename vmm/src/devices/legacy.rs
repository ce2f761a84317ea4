//! Port I/O: the 8250 UART on COM1 (vm-superio) and the i8042 controller
//! ([`super::i8042`]), whose CPU reset command ends the VM.

use super::i8042::I8042;
use super::EventFdTrigger;
use std::io::Write;
use std::sync::Mutex;
use vm_superio::Serial;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
const COM1_LEN: u16 = 8;
pub const I8042_BASE: u16 = 0x60;
const I8042_LEN: u16 = 5;

pub type SerialDevice = Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// The port-I/O bus. Unclaimed ports read as all ones and ignore writes, as on a PC.
pub struct PioBus {
    serial: Mutex<SerialDevice>,
    i8042: Mutex<I8042>,
}

impl PioBus {
    pub fn new(serial: SerialDevice, i8042: I8042) -> Self {
        Self {
            serial: Mutex::new(serial),
            i8042: Mutex::new(i8042),
        }
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        let value = if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) {
            lock(&self.serial).read((port - COM1_BASE) as u8)
        } else if (I8042_BASE..I8042_BASE + I8042_LEN).contains(&port) {
            lock(&self.i8042).read((port - I8042_BASE) as u8)
        } else {
            0xff
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) {
            if let Err(e) = lock(&self.serial).write((port - COM1_BASE) as u8, value) {
                log::warn!("serial: {e:?}");
            }
        } else if (I8042_BASE..I8042_BASE + I8042_LEN).contains(&port) {
            lock(&self.i8042).write((port - I8042_BASE) as u8, value);
        }
    }
}

/// A poisoned device lock only means another vCPU thread panicked mid-access; the
/// device state is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_output_and_i8042_reset() {
        let sink = Sink::default();
        let irq = EventFdTrigger(EventFd::new(EFD_NONBLOCK).unwrap());
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let kbd_irq = EventFdTrigger(EventFd::new(EFD_NONBLOCK).unwrap());
        let bus = PioBus::new(
            Serial::new(irq, Box::new(sink.clone())),
            I8042::new(EventFdTrigger(reset.try_clone().unwrap()), kbd_irq),
        );
        for b in b"hi" {
            bus.write(COM1_BASE, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        let mut byte = [0u8];
        bus.read(0x80, &mut byte);
        assert_eq!(byte[0], 0xff);
        assert!(reset.read().is_err(), "reset before the command");
        bus.write(0x64, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
