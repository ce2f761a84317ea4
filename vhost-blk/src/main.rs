use clap::Parser;
use microagent_vhost_blk::config::{Args, BlkConfig};
use std::process::ExitCode;

fn main() -> ExitCode {
    microagent_daemon_kit::serve::main("microagent-vhost-blk", || {
        let config = BlkConfig::try_from(Args::parse()).map_err(|e| e.to_string())?;
        microagent_vhost_blk::serve(config).map_err(|e| e.to_string())
    })
}
