use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Inspects and verifies microagent-vmm snapshots.
#[derive(Debug, Parser)]
#[command(name = "microagent-snapshot", version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manifest, logical and allocated size of every file, devices, vCPUs.
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Checks every file's checksum; exits 1 naming the first bad file.
    Verify { dir: PathBuf },
    /// Where the guest stood: each vCPU's rip, run state and pending interrupts, the
    /// IOAPIC's unmasked pins, each virtqueue's indices (for a guest that hung).
    Guest {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let result = match Args::parse().command {
        Command::Inspect { dir, json } => microagent_snapshot::inspect(&dir).map(|i| {
            if json {
                println!("{}", serde_json::to_string_pretty(&i).unwrap_or_default());
            } else {
                print!("{}", microagent_snapshot::render(&i));
            }
        }),
        Command::Guest { dir, json } => microagent_snapshot::guest::read(&dir).map(|g| {
            if json {
                println!("{}", serde_json::to_string_pretty(&g).unwrap_or_default());
            } else {
                print!("{}", microagent_snapshot::guest::render(&g));
            }
        }),
        Command::Verify { dir } => microagent_snapshot::verify(&dir).map(|m| {
            println!(
                "ok: {} and {} files verified",
                dir.display(),
                m.files.len() + 1
            );
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", microagent_snapshot::error_json(&e));
            ExitCode::FAILURE
        }
    }
}
