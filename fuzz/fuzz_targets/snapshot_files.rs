//! Snapshot files as `microagent-vmm --restore` reads them: `manifest.json`
//! (`Manifest::parse`: format, checksum, fields) and `state.json` (`SnapshotState`), and
//! then the legacy devices restored from that state (the UART through `serial_from`, the
//! i8042 through `I8042::restore`) driven on the port bus by guest port I/O, since a
//! hand-edited state must not let the guest crash the VMM.
//!
//! Input: byte 0 bit 0 set: the manifest's checksum is recomputed before parsing (so the
//! fuzzer reaches the fields, not only the checksum check); byte 1: the number of port
//! operations, each 3 bytes (port, read/write, value); then a u16 LE manifest length,
//! the manifest, and the rest is state.json.

#![no_main]

use libfuzzer_sys::fuzz_target;
use microagent_vmm::devices::i8042::I8042;
use microagent_vmm::devices::legacy::{serial_from, PioBus, COM1_BASE, I8042_BASE};
use microagent_vmm::devices::EventFdTrigger;
use microagent_vmm::snapshot::manifest::{checksum_of, Manifest};
use microagent_vmm::snapshot::SnapshotState;
use std::path::Path;
use vmm_sys_util::eventfd::EventFd;

fn manifest(fix_checksum: bool, text: &[u8]) {
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let path = Path::new("manifest.json");
    let text = if fix_checksum {
        let Ok(mut value) = serde_json::from_str::<serde_json::Value>(text) else {
            return;
        };
        let checksum = checksum_of(&value);
        if let Some(map) = value.as_object_mut() {
            map.insert("checksum".into(), checksum.into());
        }
        value.to_string()
    } else {
        text.to_owned()
    };
    if let Ok(parsed) = Manifest::parse(path, &text) {
        // Written again, it parses to the same manifest. Only the stored checksum may
        // differ: it covers the JSON as read, and a field left out (an absent `initrd`)
        // is written back as `null`.
        let written = parsed.to_json().expect("writing a parsed manifest");
        let written = String::from_utf8(written).expect("a manifest is UTF-8");
        let again = Manifest::parse(path, &written).expect("parsing a written manifest");
        let without_checksum = |m: &Manifest| Manifest {
            checksum: String::new(),
            ..m.clone()
        };
        assert_eq!(without_checksum(&again), without_checksum(&parsed));
    }
}

fn trigger() -> Option<EventFdTrigger> {
    EventFd::new(libc::EFD_NONBLOCK).ok().map(EventFdTrigger)
}

fn state(json: &[u8], ops: &[u8]) {
    let Ok(state) = serde_json::from_slice::<SnapshotState>(json) else {
        return;
    };
    let (Some(serial_irq), Some(kbd_irq)) = (trigger(), trigger()) else {
        return;
    };
    let Ok(serial) = serial_from(&state.legacy.serial, serial_irq, Box::new(std::io::sink()))
    else {
        return;
    };
    let bus = PioBus::new(
        serial,
        I8042::restore(state.legacy.i8042.clone(), kbd_irq),
    );
    for op in ops.chunks_exact(3) {
        let port = match op[0] % 4 {
            0 => COM1_BASE + u16::from(op[0] >> 2) % 8,
            1 => I8042_BASE,
            2 => I8042_BASE + 4,
            _ => I8042_BASE + u16::from(op[0] >> 2) % 8,
        };
        if op[1] & 1 == 0 {
            let mut byte = [0u8; 1];
            bus.read(port, &mut byte);
        } else {
            // A reset request (i8042 0xFE) is the VMM's to act on; here it is only state.
            let _ = bus.write(port, &[op[2]]);
        }
    }
    let after = bus.state();
    let json = serde_json::to_vec(&after).expect("serializing the legacy state");
    let _: microagent_vmm::devices::legacy::LegacyState =
        serde_json::from_slice(&json).expect("the legacy state round trips");
}

fuzz_target!(|data: &[u8]| {
    let [mode, nops, rest @ ..] = data else {
        return;
    };
    let ops_len = (usize::from(*nops) * 3).min(rest.len());
    let (ops, rest) = rest.split_at(ops_len);
    let [lo, hi, rest @ ..] = rest else {
        return;
    };
    let mlen = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
    let (manifest_text, state_json) = rest.split_at(mlen);
    manifest(mode & 1 != 0, manifest_text);
    state(state_json, ops);
});
