//! `microagent-snapshot`: inspects and verifies snapshots written by `microagent-vmm`,
//! through the VMM's own snapshot types (as Firecracker's snapshot-editor uses its
//! vmm crate).

pub mod guest;

use microagent_vmm::snapshot::manifest::{Manifest, MANIFEST};
use microagent_vmm::snapshot::{dir, Error};
use serde::Serialize;
use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// One file of a snapshot as it is on disk.
#[derive(Debug, Serialize)]
pub struct FileReport {
    pub name: String,
    /// Logical size in bytes.
    pub size: u64,
    /// Bytes allocated on disk (a sparse memory file allocates only populated pages).
    pub allocated: u64,
}

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub manifest: Manifest,
    pub files: Vec<FileReport>,
}

/// Reads the manifest (its own checksum and format checked) and sizes every file.
pub fn inspect(snapshot: &Path) -> Result<Inspection, Error> {
    let manifest = dir::read_manifest(snapshot)?;
    let names = std::iter::once(MANIFEST).chain(manifest.files.iter().map(|f| f.name.as_str()));
    let files = names
        .map(|name| {
            let path = snapshot.join(name);
            let meta = std::fs::metadata(&path).map_err(|source| Error::Read { path, source })?;
            Ok(FileReport {
                name: name.to_owned(),
                size: meta.len(),
                allocated: meta.blocks() * 512,
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(Inspection { manifest, files })
}

/// The human-readable form of [`inspect`].
pub fn render(inspection: &Inspection) -> String {
    let m = &inspection.manifest;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "format {}.{}, microagent-vmm {}, created {} (unix time)",
        m.format.major, m.format.minor, m.vmm_version, m.created_unix
    );
    let _ = writeln!(
        out,
        "kernel   {} sha256 {}",
        m.kernel.path.display(),
        m.kernel.sha256
    );
    if let Some(initrd) = &m.initrd {
        let _ = writeln!(
            out,
            "initrd   {} sha256 {}",
            initrd.path.display(),
            initrd.sha256
        );
    }
    let _ = writeln!(out, "cmdline  {}", m.cmdline);
    let _ = writeln!(out, "cpu      {}", m.cpu.describe());
    let _ = writeln!(
        out,
        "vcpus    {}\nmemory   {} MiB ({} bytes populated)",
        m.vcpus, m.memory_mib, m.memory_populated
    );
    if m.devices.is_empty() {
        let _ = writeln!(out, "devices  none");
    }
    for d in &m.devices {
        let _ = writeln!(
            out,
            "device   {} at {:#x} irq {}",
            d.kind, d.mmio_base, d.irq
        );
    }
    let _ = writeln!(out, "{:<14} {:>14} {:>14}", "FILE", "SIZE", "ALLOCATED");
    for f in &inspection.files {
        let _ = writeln!(out, "{:<14} {:>14} {:>14}", f.name, f.size, f.allocated);
    }
    out
}

/// Checks every file against the manifest; the error names the first bad file.
pub fn verify(snapshot: &Path) -> Result<Manifest, Error> {
    dir::verify(snapshot)
}

/// `{"error":{"code":...,"message":...}}` for a failure.
pub fn error_json(e: &Error) -> String {
    serde_json::json!({"error": {"code": e.code(), "message": e.to_string()}}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use microagent_vmm::snapshot::manifest::{
        Artifact, CpuIdentity, DeviceEntry, Format, FORMAT_MAJOR, FORMAT_MINOR,
    };

    #[test]
    fn render_lists_the_manifest_devices_and_file_sizes() {
        let inspection = Inspection {
            manifest: Manifest {
                format: Format {
                    major: FORMAT_MAJOR,
                    minor: FORMAT_MINOR,
                },
                vmm_version: "0.1.0".into(),
                created_unix: 7,
                kernel: Artifact {
                    path: "/k/vmlinux".into(),
                    sha256: "ab".into(),
                },
                initrd: None,
                cmdline: "console=ttyS0".into(),
                cpu: CpuIdentity {
                    vendor: "AuthenticAMD".into(),
                    family: 25,
                    model: 17,
                    stepping: 1,
                    fingerprint: "0123456789abcdef".into(),
                },
                vcpus: 2,
                memory_mib: 128,
                memory_populated: 61440,
                devices: vec![DeviceEntry {
                    kind: "block".into(),
                    mmio_base: 0xd000_0000,
                    irq: 5,
                }],
                files: Vec::new(),
                checksum: String::new(),
            },
            files: vec![FileReport {
                name: "memory.bin".into(),
                size: 128 << 20,
                allocated: 61440,
            }],
        };
        let text = render(&inspection);
        assert!(
            text.contains("memory   128 MiB (61440 bytes populated)"),
            "{text}"
        );
        assert!(
            text.contains("device   block at 0xd0000000 irq 5"),
            "{text}"
        );
        assert!(text.contains("AuthenticAMD family 25 model 17"), "{text}");
        assert!(text.contains("memory.bin"), "{text}");
        assert!(text.contains("134217728"), "{text}");
    }
}
