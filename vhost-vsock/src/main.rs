use clap::Parser;
use microagent_vhost_vsock::config::{Args, VsockConfig};
use std::process::ExitCode;

fn main() -> ExitCode {
    microagent_daemon_kit::serve::main("microagent-vhost-vsock", || {
        let config = VsockConfig::try_from(Args::parse()).map_err(|e| e.to_string())?;
        microagent_vhost_vsock::serve(config).map_err(|e| e.to_string())
    })
}
