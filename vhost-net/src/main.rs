use clap::Parser;
use microagent_vhost_net::config::{Args, NetConfig};
use std::process::ExitCode;

fn main() -> ExitCode {
    microagent_daemon_kit::serve::main("microagent-vhost-net", || {
        let config =
            NetConfig::try_from(Args::parse()).map_err(|e| format!("[{}] {e}", e.code()))?;
        microagent_vhost_net::serve(config).map_err(|e| match e.code() {
            Some(code) => format!("[{code}] {e}"),
            None => e.to_string(),
        })
    })
}
