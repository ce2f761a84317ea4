use clap::Parser;
use microagent_vmm::config::{Args, VmmConfig};
use microagent_vmm::vcpu::Outcome;
use std::process::ExitCode;

fn error_json(code: &str, message: &str) -> String {
    serde_json::json!({"error": {"code": code, "message": message}}).to_string()
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = match VmmConfig::try_from(Args::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}", error_json("vmm.bad_config", &e.to_string()));
            return ExitCode::from(2);
        }
    };
    match microagent_vmm::vm::run(&config) {
        Ok(Outcome::VcpuError(failure)) => {
            let report = serde_json::json!({"error": failure});
            eprintln!("{report}");
            ExitCode::FAILURE
        }
        Ok(outcome) => {
            log::info!("VM ended: {outcome:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", error_json(e.code(), &e.to_string()));
            ExitCode::FAILURE
        }
    }
}
