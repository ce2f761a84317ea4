//! The guest kernel the rigs boot: `MICROAGENT_KERNEL`, else the project's cached build.

use microagent_cli::home::{self, Home};
use std::env;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Home(#[from] home::Error),
    #[error("guest kernel {path} is missing: run `make kernel` (scripts/build-kernel.sh)")]
    Missing { path: PathBuf },
}

pub fn guest_kernel() -> Result<PathBuf, Error> {
    let path = match env::var_os("MICROAGENT_KERNEL").filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => Home::from_env()?.default_kernel(),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Missing { path })
    }
}
