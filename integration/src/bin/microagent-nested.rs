//! `microagent-nested [--timeout SECS] [--env KEY=VALUE]... [--] PROGRAM [ARGS...]`
//!
//! Runs PROGRAM inside a fresh L1 machine of the nested rig (QEMU's emulated AMD SVM,
//! with a real /dev/kvm; see `microagent_integration::nested`), chrooted into this
//! machine's filesystem in the current directory, streaming its output here. Exits with
//! PROGRAM's exit status, or 125 when the rig itself fails.

use microagent_integration::nested::{self, Job};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    let mut timeout = Duration::from_secs(900);
    let mut env = Vec::new();
    while let Some(flag) = args.peek().and_then(|a| a.to_str()).map(str::to_owned) {
        match flag.as_str() {
            "--timeout" | "--env" => {
                args.next();
                let Some(value) = args.next().and_then(|v| v.into_string().ok()) else {
                    return usage(&format!("{flag} needs a value"));
                };
                if flag == "--timeout" {
                    match value.parse() {
                        Ok(secs) => timeout = Duration::from_secs(secs),
                        Err(_) => {
                            return usage(&format!("--timeout {value}: not a number of seconds"))
                        }
                    }
                } else {
                    match value.split_once('=') {
                        Some((k, v)) if !k.is_empty() => env.push((k.to_owned(), v.to_owned())),
                        _ => return usage(&format!("--env {value}: expected KEY=VALUE")),
                    }
                }
            }
            "--" => {
                args.next();
                break;
            }
            _ if flag.starts_with("--") => return usage(&format!("unknown flag {flag}")),
            _ => break,
        }
    }
    let Some(program) = args.next() else {
        return usage("no PROGRAM given");
    };
    let mut job = Job::new(program);
    job.args = args.collect();
    job.env = env;
    job.timeout = timeout;
    job.stream = true;
    match nested::run(&job, "microagent-nested") {
        Ok(outcome) => {
            eprintln!(
                "microagent-nested: exit {} after {:.1} s in L1",
                outcome.code,
                outcome.elapsed.as_secs_f64()
            );
            if outcome.code != 0 {
                eprintln!(
                    "--- L1 console (end) ---\n{}",
                    outcome
                        .console
                        .lines()
                        .rev()
                        .take(30)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            ExitCode::from(u8::try_from(outcome.code).unwrap_or(125))
        }
        Err(e) => {
            eprintln!("microagent-nested: {e}");
            ExitCode::from(125)
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("microagent-nested: {problem}\nusage: microagent-nested [--timeout SECS] [--env KEY=VALUE]... [--] PROGRAM [ARGS...]");
    ExitCode::from(125)
}
