//! Port I/O: the 8250 UART on COM1 (vm-superio) and the i8042 controller
//! ([`super::i8042`]), whose CPU reset command ends the VM.

use super::i8042::{Effect, I8042State, I8042};
use super::EventFdTrigger;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::Mutex;
use vm_superio::serial::SerialState;
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

    /// Writes `data` to `port`; says whether the guest asked for a CPU reset.
    pub fn write(&self, port: u16, data: &[u8]) -> Effect {
        let Some(&value) = data.first() else {
            return Effect::None;
        };
        if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) {
            if let Err(e) = lock(&self.serial).write((port - COM1_BASE) as u8, value) {
                log::warn!("serial: {e:?}");
            }
        } else if (I8042_BASE..I8042_BASE + I8042_LEN).contains(&port) {
            return lock(&self.i8042).write((port - I8042_BASE) as u8, value);
        }
        Effect::None
    }
}

/// What the guest can observe of the port-I/O devices: plain data for snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyState {
    pub serial: SerialRegisters,
    pub i8042: I8042State,
}

/// The UART's registers and receive FIFO (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Default for SerialRegisters {
    /// A UART as it comes out of reset.
    fn default() -> Self {
        Self::from(&SerialState::default())
    }
}

impl From<&SerialState> for SerialRegisters {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialRegisters> for SerialState {
    fn from(s: &SerialRegisters) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl PioBus {
    /// The devices' state; call with the vCPUs paused (no port access in flight).
    pub fn state(&self) -> LegacyState {
        LegacyState {
            serial: SerialRegisters::from(&lock(&self.serial).state()),
            i8042: lock(&self.i8042).state().clone(),
        }
    }
}

/// The UART from saved registers (a fresh one from the default state), raising `irq`
/// and writing to `out`. Fails only for a receive FIFO larger than the UART's.
pub fn serial_from(
    state: &SerialRegisters,
    irq: EventFdTrigger,
    out: Box<dyn Write + Send>,
) -> Result<SerialDevice, String> {
    Serial::from_state(
        &SerialState::from(state),
        irq,
        vm_superio::serial::NoEvents,
        out,
    )
    .map_err(|e| format!("{e:?}"))
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
        let kbd_irq = EventFdTrigger(EventFd::new(EFD_NONBLOCK).unwrap());
        let bus = PioBus::new(
            Serial::new(irq, Box::new(sink.clone())),
            I8042::new(kbd_irq),
        );
        for b in b"hi" {
            assert_eq!(bus.write(COM1_BASE, &[*b]), Effect::None);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        let mut byte = [0u8];
        bus.read(0x80, &mut byte);
        assert_eq!(byte[0], 0xff);
        assert_eq!(
            bus.write(0x60, &[0xfe]),
            Effect::None,
            "not the command port"
        );
        assert_eq!(bus.write(0x64, &[0xfe]), Effect::CpuReset);
    }

    #[test]
    fn uart_and_i8042_state_round_trips_into_new_devices() {
        let sink = Sink::default();
        let trigger = || EventFdTrigger(EventFd::new(EFD_NONBLOCK).unwrap());
        let bus = PioBus::new(
            serial_from(
                &SerialRegisters::default(),
                trigger(),
                Box::new(sink.clone()),
            )
            .unwrap(),
            I8042::new(trigger()),
        );
        // Linux's 8250 set-up: divisor latch, 8N1, interrupts on; an i8042 control byte.
        for (reg, value) in [
            (3u16, 0x80u8),
            (0, 0x01),
            (1, 0x00),
            (3, 0x03),
            (1, 0x05),
            (7, 0x5a),
        ] {
            assert_eq!(bus.write(COM1_BASE + reg, &[value]), Effect::None);
        }
        assert_eq!(bus.write(0x64, &[0x60]), Effect::None);
        assert_eq!(bus.write(0x60, &[0x65]), Effect::None);
        let state = bus.state();
        let json = serde_json::to_string(&state).unwrap();
        let state: LegacyState = serde_json::from_str(&json).unwrap();
        let restored = PioBus::new(
            serial_from(&state.serial, trigger(), Box::new(sink.clone())).unwrap(),
            I8042::restore(state.i8042.clone(), trigger()),
        );
        assert_eq!(restored.state(), state);
        let mut byte = [0u8];
        restored.read(COM1_BASE + 1, &mut byte);
        assert_eq!(byte[0], 0x05, "interrupt enable register");
        restored.read(COM1_BASE + 3, &mut byte);
        assert_eq!(byte[0], 0x03, "line control register");
        restored.read(COM1_BASE + 7, &mut byte);
        assert_eq!(byte[0], 0x5a, "scratch register");
        assert_eq!(restored.write(0x64, &[0x20]), Effect::None);
        restored.read(0x60, &mut byte);
        assert_eq!(byte[0], 0x65, "i8042 control byte");
        // An oversized receive FIFO in a damaged state file is refused, not trusted.
        let mut bad = state.serial.clone();
        bad.in_buffer = vec![0; 4096];
        assert!(serial_from(&bad, trigger(), Box::new(sink)).is_err());
    }
}
