//! Registries with their own certificate authority, trusted the way Docker does: every
//! `*.crt` in `<certs.d>/<registry>/` (`/etc/docker/certs.d/localhost:5000/ca.crt`),
//! plus CA files given with `--ca-cert`. A registry with a CA configured is always
//! reached over HTTPS, also on loopback.

use std::fs;
use std::path::{Path, PathBuf};

/// The most a CA file may hold (a bundle of a few hundred certificates).
const MAX_CA_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CA certificate {path}: {why}; give a PEM file (as `--ca-cert` or in certs.d/<registry>/*.crt)")]
    BadCa { path: PathBuf, why: String },
}

impl Error {
    pub fn code(&self) -> &'static str {
        "image.bad_ca_cert"
    }
}

/// A CA certificate file, read and checked to be PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCert {
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

impl CaCert {
    pub fn read(path: &Path) -> Result<Self, Error> {
        let bad = |why: String| Error::BadCa {
            path: path.to_owned(),
            why,
        };
        let len = fs::metadata(path).map_err(|e| bad(e.to_string()))?.len();
        if len > MAX_CA_FILE {
            return Err(bad(format!("larger than {MAX_CA_FILE} bytes")));
        }
        let pem = fs::read(path).map_err(|e| bad(e.to_string()))?;
        if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            return Err(bad("no PEM certificate in it".into()));
        }
        Ok(Self {
            path: path.to_owned(),
            pem,
        })
    }
}

/// The CA files Docker's convention names for `registry` under each of `dirs`
/// (`<dir>/<registry>/*.crt`, sorted), then `extra`.
pub fn ca_certs(registry: &str, dirs: &[PathBuf], extra: &[PathBuf]) -> Result<Vec<CaCert>, Error> {
    let mut paths = Vec::new();
    // A registry name never contains '/', so it names one directory under each dir.
    if !registry.contains('/') && registry != "." && registry != ".." {
        for dir in dirs {
            let Ok(entries) = fs::read_dir(dir.join(registry)) else {
                continue;
            };
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "crt"))
                .collect();
            found.sort();
            paths.extend(found);
        }
    }
    paths.extend(extra.iter().cloned());
    paths.iter().map(|p| CaCert::read(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn certs_d_files_of_the_registry_and_extra_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let certs_d = dir.path().join("certs.d");
        fs::create_dir_all(certs_d.join("localhost:5000")).unwrap();
        fs::create_dir_all(certs_d.join("other:1")).unwrap();
        fs::write(certs_d.join("localhost:5000/ca.crt"), PEM).unwrap();
        fs::write(certs_d.join("localhost:5000/client.key"), b"key").unwrap();
        fs::write(certs_d.join("other:1/ca.crt"), PEM).unwrap();
        let extra = dir.path().join("extra.pem");
        fs::write(&extra, PEM).unwrap();
        let found = ca_certs(
            "localhost:5000",
            std::slice::from_ref(&certs_d),
            std::slice::from_ref(&extra),
        )
        .unwrap();
        let paths: Vec<_> = found.iter().map(|c| c.path.clone()).collect();
        assert_eq!(paths, [certs_d.join("localhost:5000/ca.crt"), extra]);
        assert!(ca_certs("nothing:1", std::slice::from_ref(&certs_d), &[])
            .unwrap()
            .is_empty());
        assert!(ca_certs("..", &[certs_d.join("other:1")], &[])
            .unwrap()
            .is_empty());

        let junk = dir.path().join("junk.crt");
        fs::write(&junk, b"not a certificate").unwrap();
        let err = ca_certs("x", &[], &[junk]).unwrap_err();
        assert_eq!(err.code(), "image.bad_ca_cert");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }
}
