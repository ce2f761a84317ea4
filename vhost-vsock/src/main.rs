use clap::Parser;
use microagent_vhost_vsock::config::{Args, VsockConfig};
use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = VsockConfig::try_from(Args::parse())
        .map_err(|e| e.to_string())
        .and_then(|config| microagent_vhost_vsock::serve(config).map_err(|e| e.to_string()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("microagent-vhost-vsock: {e}");
            ExitCode::FAILURE
        }
    }
}
