//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command), with a
//! PS/2 keyboard behind it and no auxiliary (mouse) port.
//!
//! Enough of the controller for Linux to probe it cleanly (read and write the control
//! byte, self-tests, output port, the AUX checks failing as on a machine without a
//! mouse port) and for the keyboard driver to identify a keyboard; its command 0xFE
//! pulses the CPU reset line, which ends the VM: [`I8042::write`] reports it to the vCPU
//! that wrote it, which stops there rather than run the guest on. Keyboard bytes raise
//! IRQ 1 when the control byte enables it, as on a PC; controller replies are polled by
//! the driver.

use super::EventFdTrigger;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use vm_superio::Trigger;

/// Data port offset (0x60) and status/command port offset (0x64) from the base.
pub const DATA: u8 = 0;
pub const COMMAND: u8 = 4;
/// The keyboard's interrupt line.
pub const KBD_IRQ: u32 = 1;

// Status register bits.
const STR_OBF: u8 = 0x01;
const STR_SYSFLAG: u8 = 0x04;
const STR_CMDDAT: u8 = 0x08;
/// Set: the keyboard is not inhibited by the key lock.
const STR_KEYLOCK: u8 = 0x10;

// Control byte bits.
const CTR_KBDINT: u8 = 0x01;
const CTR_SYSFLAG: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

// Controller commands (written to 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

// Replies.
const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
/// AUX interface test: clock line stuck low, i.e. no usable mouse port.
const AUX_ABSENT: u8 = 0x01;

// Keyboard commands (written to 0x60 with no controller command pending) and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_RATE: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
/// An MF2 keyboard.
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_SCANCODE_SET_2: u8 = 0x02;

/// Bytes waiting for the guest; more would mean a guest writing without reading.
const QUEUE_MAX: usize = 16;

/// Everything the guest can observe of the controller: plain data for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub control: u8,
    pub output_port: u8,
    /// The last write went to the command port (status bit 3).
    pub last_was_command: bool,
    /// A controller command waiting for its parameter byte on the data port.
    pub pending_command: Option<u8>,
    /// A keyboard command waiting for its parameter byte.
    pub pending_kbd_command: Option<u8>,
    /// Bytes for the data port, oldest first.
    pub output: VecDeque<u8>,
    /// The queued bytes come from the keyboard (they raise IRQ 1), not the controller.
    pub output_from_kbd: bool,
}

impl Default for I8042State {
    /// As firmware leaves it: keyboard interrupt on, translation on, POST passed.
    fn default() -> Self {
        Self {
            control: CTR_KBDINT | CTR_SYSFLAG | CTR_XLATE,
            output_port: 0x01,
            last_was_command: false,
            pending_command: None,
            pending_kbd_command: None,
            output: VecDeque::new(),
            output_from_kbd: false,
        }
    }
}

/// What a write to the controller asks of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Effect {
    None,
    /// Command 0xFE: pulse the CPU reset line.
    CpuReset,
}

/// The controller with its keyboard interrupt.
pub struct I8042 {
    state: I8042State,
    kbd_irq: EventFdTrigger,
}

impl I8042 {
    pub fn new(kbd_irq: EventFdTrigger) -> Self {
        Self::restore(I8042State::default(), kbd_irq)
    }

    pub fn restore(state: I8042State, kbd_irq: EventFdTrigger) -> Self {
        Self { state, kbd_irq }
    }

    pub fn state(&self) -> &I8042State {
        &self.state
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            DATA => {
                let byte = self.state.output.pop_front().unwrap_or(0);
                if !self.state.output.is_empty() {
                    self.kbd_interrupt();
                }
                byte
            }
            COMMAND => self.status(),
            // 0x61-0x63 belong to other PC devices; reading them finds nothing here.
            _ => 0,
        }
    }

    pub fn write(&mut self, offset: u8, value: u8) -> Effect {
        match offset {
            DATA => {
                self.state.last_was_command = false;
                match self.state.pending_command.take() {
                    Some(command) => self.command_parameter(command, value),
                    None => self.keyboard(value),
                }
                Effect::None
            }
            COMMAND => {
                self.state.last_was_command = true;
                self.command(value)
            }
            _ => Effect::None,
        }
    }

    fn status(&self) -> u8 {
        let mut status = STR_SYSFLAG | STR_KEYLOCK;
        if !self.state.output.is_empty() {
            status |= STR_OBF;
        }
        if self.state.last_was_command {
            status |= STR_CMDDAT;
        }
        status
    }

    fn command(&mut self, command: u8) -> Effect {
        let s = &mut self.state;
        match command {
            CMD_READ_CTR => self.reply(self.state.control),
            CMD_READ_OUTP => self.reply(self.state.output_port),
            CMD_SELF_TEST => self.reply(SELF_TEST_OK),
            CMD_KBD_TEST => self.reply(INTERFACE_OK),
            CMD_AUX_TEST => self.reply(AUX_ABSENT),
            CMD_AUX_DISABLE => s.control |= CTR_AUXDIS,
            CMD_AUX_ENABLE => s.control &= !CTR_AUXDIS,
            CMD_KBD_DISABLE => s.control |= CTR_KBDDIS,
            CMD_KBD_ENABLE => s.control &= !CTR_KBDDIS,
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUT | CMD_WRITE_AUX_OUT
            | CMD_WRITE_AUX => s.pending_command = Some(command),
            CMD_RESET_CPU => return Effect::CpuReset,
            _ => log::debug!("i8042: ignoring controller command {command:#04x}"),
        }
        Effect::None
    }

    fn command_parameter(&mut self, command: u8, value: u8) {
        match command {
            CMD_WRITE_CTR => self.state.control = value,
            CMD_WRITE_OUTP => self.state.output_port = value,
            CMD_WRITE_KBD_OUT => self.keyboard_sends(&[value]),
            // Echoed as a controller byte, not as AUX data: Linux's AUX loop test then
            // fails at once, as on a machine without a mouse port.
            CMD_WRITE_AUX_OUT => self.reply(value),
            // No device behind the AUX port: the byte goes nowhere.
            _ => {}
        }
    }

    fn keyboard(&mut self, value: u8) {
        if let Some(command) = self.state.pending_kbd_command.take() {
            if command == KBD_SCANCODE_SET && value == 0 {
                self.keyboard_sends(&[KBD_ACK, KBD_SCANCODE_SET_2]);
            } else {
                self.keyboard_sends(&[KBD_ACK]);
            }
            return;
        }
        match value {
            KBD_RESET => self.keyboard_sends(&[KBD_ACK, KBD_SELF_TEST_OK]),
            KBD_GET_ID => self.keyboard_sends(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_ECHO => self.keyboard_sends(&[KBD_ECHO]),
            KBD_SET_LEDS | KBD_SET_RATE | KBD_SCANCODE_SET => {
                self.state.pending_kbd_command = Some(value);
                self.keyboard_sends(&[KBD_ACK]);
            }
            _ => self.keyboard_sends(&[KBD_ACK]),
        }
    }

    /// A controller reply, read by polling.
    fn reply(&mut self, byte: u8) {
        self.state.output_from_kbd = false;
        self.queue(&[byte]);
    }

    /// Bytes from the keyboard, announced on IRQ 1.
    fn keyboard_sends(&mut self, bytes: &[u8]) {
        self.state.output_from_kbd = true;
        self.queue(bytes);
        self.kbd_interrupt();
    }

    fn queue(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.state.output.len() < QUEUE_MAX {
                self.state.output.push_back(b);
            }
        }
    }

    fn kbd_interrupt(&self) {
        let enabled = self.state.control & (CTR_KBDINT | CTR_KBDDIS) == CTR_KBDINT;
        if self.state.output_from_kbd && enabled {
            if let Err(e) = self.kbd_irq.trigger() {
                log::warn!("i8042 keyboard interrupt: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct Rig {
        dev: I8042,
        irq: EventFd,
    }

    fn rig() -> Rig {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = I8042::new(EventFdTrigger(irq.try_clone().unwrap()));
        Rig { dev, irq }
    }

    /// A controller command with an optional parameter, then the bytes it answered.
    fn command(dev: &mut I8042, cmd: u8, param: Option<u8>) -> Vec<u8> {
        assert_eq!(dev.write(COMMAND, cmd), Effect::None);
        if let Some(p) = param {
            assert_eq!(dev.write(DATA, p), Effect::None);
        }
        let mut out = Vec::new();
        while dev.read(COMMAND) & STR_OBF != 0 {
            out.push(dev.read(DATA));
        }
        out
    }

    #[test]
    fn linux_probe_sequence_reads_and_writes_the_control_byte() {
        let Rig { mut dev, irq, .. } = rig();
        assert_eq!(dev.read(COMMAND) & (STR_OBF | STR_KEYLOCK), STR_KEYLOCK);
        assert_eq!(command(&mut dev, CMD_SELF_TEST, None), [SELF_TEST_OK]);
        let ctr = command(&mut dev, CMD_READ_CTR, None);
        assert_eq!(ctr, [CTR_KBDINT | CTR_SYSFLAG | CTR_XLATE]);
        assert!(command(&mut dev, CMD_WRITE_CTR, Some(0x65)).is_empty());
        assert_eq!(command(&mut dev, CMD_READ_CTR, None), [0x65]);
        assert_eq!(command(&mut dev, CMD_KBD_TEST, None), [INTERFACE_OK]);
        assert!(irq.read().is_err(), "controller replies are polled");
    }

    #[test]
    fn the_aux_checks_fail_as_without_a_mouse_port() {
        let Rig { mut dev, .. } = rig();
        // Loop test: the byte comes back without the AUX data flag.
        assert_eq!(dev.write(COMMAND, CMD_WRITE_AUX_OUT), Effect::None);
        assert_eq!(dev.write(DATA, 0x5a), Effect::None);
        assert_eq!(dev.read(COMMAND) & 0x20, 0);
        assert_eq!(dev.read(DATA), 0x5a);
        assert_eq!(command(&mut dev, CMD_AUX_TEST, None), [AUX_ABSENT]);
    }

    #[test]
    fn keyboard_answers_reset_and_identify_with_interrupts() {
        let Rig { mut dev, irq, .. } = rig();
        assert_eq!(dev.write(DATA, KBD_GET_ID), Effect::None);
        assert_eq!(irq.read().unwrap(), 1);
        let mut id = Vec::new();
        while dev.read(COMMAND) & STR_OBF != 0 {
            id.push(dev.read(DATA));
        }
        assert_eq!(id, [KBD_ACK, 0xab, 0x83]);
        assert_eq!(
            irq.read().unwrap(),
            2,
            "one interrupt per byte still queued"
        );
        assert_eq!(dev.write(DATA, KBD_SET_LEDS), Effect::None);
        assert_eq!(dev.write(DATA, 0x07), Effect::None);
        assert_eq!([dev.read(DATA), dev.read(DATA)], [KBD_ACK, KBD_ACK]);
        // Keyboard interrupts off in the control byte: no interrupt.
        command(&mut dev, CMD_WRITE_CTR, Some(CTR_SYSFLAG));
        let _ = irq.read();
        assert_eq!(dev.write(DATA, KBD_RESET), Effect::None);
        assert!(irq.read().is_err());
        assert_eq!(
            [dev.read(DATA), dev.read(DATA)],
            [KBD_ACK, KBD_SELF_TEST_OK]
        );
    }

    #[test]
    fn reset_command_asks_for_a_cpu_reset() {
        let Rig { mut dev, .. } = rig();
        assert_eq!(dev.write(COMMAND, CMD_READ_CTR), Effect::None);
        assert_eq!(
            dev.write(DATA, CMD_RESET_CPU),
            Effect::None,
            "as a keyboard byte"
        );
        assert_eq!(dev.write(COMMAND, CMD_RESET_CPU), Effect::CpuReset);
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_queue() {
        let Rig { mut dev, .. } = rig();
        for _ in 0..10_000 {
            assert_eq!(dev.write(DATA, KBD_GET_ID), Effect::None);
        }
        assert_eq!(dev.state().output.len(), QUEUE_MAX);
    }

    #[test]
    fn state_round_trips_and_restores_the_same_behaviour() {
        let Rig { mut dev, .. } = rig();
        command(&mut dev, CMD_WRITE_CTR, Some(0x47));
        assert_eq!(dev.write(COMMAND, CMD_WRITE_OUTP), Effect::None);
        let json = serde_json::to_string(dev.state()).unwrap();
        let state: I8042State = serde_json::from_str(&json).unwrap();
        assert_eq!(&state, dev.state());
        let Rig { irq, .. } = rig();
        let mut restored = I8042::restore(state, EventFdTrigger(irq));
        // The pending output-port parameter.
        assert_eq!(restored.write(DATA, 0x03), Effect::None);
        assert_eq!(command(&mut restored, CMD_READ_OUTP, None), [0x03]);
        assert_eq!(command(&mut restored, CMD_READ_CTR, None), [0x47]);
    }
}
