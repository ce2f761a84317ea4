//! One host connection: version handshake, then one request.

use crate::init::{self, Root};
use crate::reaper::Reaper;
use crate::{exec, files, identity, secrets};
use microagent_agent_protocol::frame::{read_frame, write_control};
use microagent_agent_protocol::message::{codes, AgentMessage, HostMessage};
use microagent_agent_protocol::PROTOCOL_VERSION;
use std::os::unix::net::UnixStream;

fn error(code: &str, message: impl Into<String>) -> AgentMessage {
    AgentMessage::Error {
        code: code.into(),
        message: message.into(),
    }
}

fn reply(writer: &mut UnixStream, result: Result<(), String>, code: &str) {
    let message = match result {
        Ok(()) => AgentMessage::Done,
        Err(e) => error(code, e),
    };
    let _ = write_control(writer, &message);
}

pub fn serve(stream: UnixStream, root: &Root, reaper: &Reaper) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    // Unbuffered: a buffer would keep copies of secret values around.
    let mut reader = stream;
    let hello = AgentMessage::Hello {
        version: PROTOCOL_VERSION,
        agent: env!("CARGO_PKG_VERSION").into(),
        cid: crate::vsock::local_cid().ok(),
    };
    match read_frame(&mut reader).and_then(|f| f.parse::<HostMessage>()) {
        Ok(HostMessage::Hello { version }) if version == PROTOCOL_VERSION => {
            if write_control(&mut writer, &hello).is_err() {
                return;
            }
        }
        Ok(HostMessage::Hello { version }) => {
            let _ = write_control(&mut writer, &hello);
            let message = format!("host speaks protocol {version}, agent {PROTOCOL_VERSION}");
            let _ = write_control(&mut writer, &error(codes::VERSION_MISMATCH, message));
            return;
        }
        Ok(other) => {
            let _ = write_control(
                &mut writer,
                &error(codes::BAD_REQUEST, format!("expected hello, got {other:?}")),
            );
            return;
        }
        Err(_) => return,
    }
    match read_frame(&mut reader).and_then(|f| f.parse::<HostMessage>()) {
        Ok(HostMessage::Exec(request)) => exec::run(request, root, reaper, reader, writer),
        Ok(HostMessage::Shutdown) if std::process::id() == 1 => {
            let _ = write_control(&mut writer, &AgentMessage::ShuttingDown);
            init::shutdown(root);
        }
        Ok(HostMessage::PutSecrets { names }) => {
            let result = secrets::put(root, &names, &mut reader);
            reply(&mut writer, result, codes::SECRETS);
        }
        Ok(HostMessage::PrepareSnapshot) => {
            reply(&mut writer, secrets::prepare_snapshot(root), codes::SECRETS);
        }
        Ok(HostMessage::SetIdentity {
            hostname,
            machine_id,
            mut entropy,
            mac,
        }) => {
            let result = identity::apply(root, &hostname, &machine_id, &entropy, mac.as_deref());
            secrets::wipe(&mut entropy);
            reply(&mut writer, result, codes::IDENTITY);
        }
        Ok(HostMessage::WriteFile { path, mode }) => {
            let result = files::write(root, &path, mode, &mut reader);
            reply(&mut writer, result, codes::FILE);
        }
        Ok(HostMessage::ReadFile { path }) => {
            let result = files::read(root, &path, &mut writer);
            reply(&mut writer, result, codes::FILE);
        }
        Ok(other) => {
            let _ = write_control(
                &mut writer,
                &error(codes::BAD_REQUEST, format!("cannot serve {other:?} here")),
            );
        }
        Err(e) => {
            let _ = write_control(&mut writer, &error(codes::BAD_REQUEST, e.to_string()));
        }
    }
}
