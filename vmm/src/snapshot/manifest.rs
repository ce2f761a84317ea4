//! The manifest: what a snapshot was taken from and the checksum of every file.

use super::Error;
use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Breaking changes bump the major; additive ones the minor. A reader refuses a major it
/// does not know and ignores fields it does not know within its major.
pub const FORMAT_MAJOR: u32 = 1;
pub const FORMAT_MINOR: u32 = 1;

pub const MANIFEST: &str = "manifest.json";
pub const STATE: &str = "state.json";
pub const MEMORY: &str = "memory.bin";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Format {
    pub major: u32,
    pub minor: u32,
}

/// A file the VM was booted from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub path: PathBuf,
    pub sha256: String,
}

impl Artifact {
    pub fn of(path: &Path) -> Result<Self, Error> {
        Ok(Self {
            path: path.to_owned(),
            sha256: sha256_file(path)?,
        })
    }
}

/// The CPU as KVM presents it to guests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuIdentity {
    pub vendor: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    /// sha256 of KVM's supported CPUID entries, without the per-host-CPU APIC IDs.
    pub fingerprint: String,
}

impl CpuIdentity {
    pub fn of_host(kvm: &Kvm) -> Result<Self, Error> {
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Restore {
                what: "the host CPU identity",
                message: e.to_string(),
            })?;
        Ok(Self::of_supported(&cpuid))
    }

    /// The identity in KVM's supported CPUID `cpuid`.
    pub fn of_supported(cpuid: &CpuId) -> Self {
        let entries = cpuid.as_slice();
        let leaf = |function| {
            entries
                .iter()
                .find(|e| e.function == function && e.index == 0)
        };
        let vendor = leaf(0)
            .map(|e| {
                [e.ebx, e.edx, e.ecx]
                    .iter()
                    .flat_map(|r| r.to_le_bytes())
                    .map(char::from)
                    .collect()
            })
            .unwrap_or_default();
        let eax = leaf(1).map_or(0, |e| e.eax);
        let base_family = (eax >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((eax >> 20) & 0xff)
        } else {
            base_family
        };
        let model = ((eax >> 4) & 0xf) | (((eax >> 16) & 0xf) << 4);
        let mut hash = Sha256::new();
        for e in entries {
            // KVM fills in the APIC ID of the host CPU the caller runs on: leave it out.
            let (mut eax, mut ebx, mut edx) = (e.eax, e.ebx, e.edx);
            match e.function {
                1 => ebx &= 0x00ff_ffff,
                0xb | 0x1f => edx = 0,
                0x8000_001e => (eax, ebx) = (0, ebx & !0xff),
                _ => {}
            }
            for word in [e.function, e.index, e.flags, eax, ebx, e.ecx, edx] {
                hash.update(word.to_le_bytes());
            }
        }
        Self {
            vendor,
            family,
            model,
            stepping: eax & 0xf,
            fingerprint: format!("{:x}", hash.finalize()),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} family {} model {} stepping {}, CPUID {}",
            self.vendor,
            self.family,
            self.model,
            self.stepping,
            self.fingerprint.get(..12).unwrap_or(&self.fingerprint)
        )
    }
}

/// One virtio-mmio device of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    pub kind: String,
    pub mmio_base: u64,
    pub irq: u32,
}

/// One file of the snapshot besides the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    /// Logical size in bytes.
    pub size: u64,
    /// sha256 of the contents; for the memory file, of its populated pages (see
    /// [`super::memory`]).
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: Format,
    pub vmm_version: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    pub kernel: Artifact,
    pub initrd: Option<Artifact>,
    /// The full command line the guest booted with, device entries included.
    pub cmdline: String,
    pub cpu: CpuIdentity,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Bytes of guest memory the memory file holds (populated, non-zero pages).
    pub memory_populated: u64,
    pub devices: Vec<DeviceEntry>,
    pub files: Vec<FileEntry>,
    /// sha256 of the manifest itself: see [`checksum_of`].
    #[serde(default)]
    pub checksum: String,
}

/// The manifest's own checksum: sha256 of its compact JSON without the `checksum`
/// field. Formatting does not count; every value and key does.
pub fn checksum_of(value: &serde_json::Value) -> String {
    let mut value = value.clone();
    if let Some(map) = value.as_object_mut() {
        map.remove("checksum");
    }
    format!("{:x}", Sha256::digest(value.to_string().as_bytes()))
}

impl Manifest {
    /// Parses a manifest, refusing a format major this VMM does not read before looking
    /// at anything else.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let corrupt = |e: serde_json::Error| Error::Corrupt {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(corrupt)?;
        let format: Format =
            serde_json::from_value(value.get("format").cloned().unwrap_or_default())
                .map_err(corrupt)?;
        if format.major != FORMAT_MAJOR {
            return Err(Error::FormatUnsupported {
                major: format.major,
                minor: format.minor,
                supported: FORMAT_MAJOR,
            });
        }
        if value.get("checksum").and_then(|c| c.as_str()) != Some(&checksum_of(&value)) {
            return Err(Error::ChecksumMismatch {
                path: path.to_owned(),
            });
        }
        serde_json::from_value(value).map_err(corrupt)
    }

    /// The manifest as written: pretty JSON with its own checksum filled in.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut value = serde_json::to_value(self)?;
        let checksum = checksum_of(&value);
        if let Some(map) = value.as_object_mut() {
            map.insert("checksum".into(), checksum.into());
        }
        let mut text = serde_json::to_vec_pretty(&value)?;
        text.push(b'\n');
        Ok(text)
    }

    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Refuses a kernel or initrd whose contents differ from the snapshot's.
    pub fn check_artifacts(&self, kernel: &Path, initrd: Option<&Path>) -> Result<(), Error> {
        let check = |what, expected: &Artifact, path: &Path| {
            let actual = sha256_file(path)?;
            if actual == expected.sha256 {
                Ok(())
            } else {
                Err(Error::ArtifactMismatch {
                    what,
                    path: path.to_owned(),
                    expected: expected.sha256.clone(),
                    actual,
                })
            }
        };
        check("kernel", &self.kernel, kernel)?;
        if let Some(expected) = &self.initrd {
            check("initrd", expected, initrd.unwrap_or(&expected.path))?;
        }
        Ok(())
    }

    pub fn check_cpu(&self, host: &CpuIdentity) -> Result<(), Error> {
        if &self.cpu == host {
            Ok(())
        } else {
            Err(Error::CpuMismatch {
                expected: self.cpu.describe(),
                actual: host.describe(),
            })
        }
    }

    pub fn check_devices(&self, kinds: &[&str]) -> Result<(), Error> {
        let expected: Vec<&str> = self.devices.iter().map(|d| d.kind.as_str()).collect();
        if expected == kinds {
            Ok(())
        } else {
            Err(Error::DeviceMismatch {
                expected: expected.join(", "),
                actual: kinds.join(", "),
            })
        }
    }
}

pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let read = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::FileMissing(path.to_owned())
        } else {
            read(e)
        }
    })?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(read)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(format!("{:x}", hash.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: Format {
                major: FORMAT_MAJOR,
                minor: FORMAT_MINOR,
            },
            vmm_version: "0.1.0".into(),
            created_unix: 1,
            kernel: Artifact {
                path: "/k".into(),
                sha256: "aa".into(),
            },
            initrd: None,
            cmdline: "console=ttyS0".into(),
            cpu: CpuIdentity {
                vendor: "GenuineIntel".into(),
                family: 6,
                model: 85,
                stepping: 7,
                fingerprint: "ff".into(),
            },
            vcpus: 2,
            memory_mib: 128,
            memory_populated: 4096,
            devices: vec![],
            files: vec![],
            checksum: String::new(),
        }
    }

    #[test]
    fn manifests_round_trip_and_a_newer_major_is_refused_before_parsing() {
        let text = String::from_utf8(sample().to_json().unwrap()).unwrap();
        let parsed = Manifest::parse(Path::new("m"), &text).unwrap();
        assert_eq!(parsed.cmdline, sample().cmdline);
        assert_eq!(parsed.to_json().unwrap(), text.as_bytes());
        let edited = text.replace("console=ttyS0", "console=ttyS1");
        let err = Manifest::parse(Path::new("m"), &edited).unwrap_err();
        assert_eq!(err.code(), "snapshot.checksum_mismatch", "{err}");
        let newer = r#"{"format":{"major":2,"minor":0},"something":"new"}"#;
        let err = Manifest::parse(Path::new("m"), newer).unwrap_err();
        assert_eq!(err.code(), "snapshot.format_unsupported", "{err}");
        let err = Manifest::parse(Path::new("m"), "{").unwrap_err();
        assert_eq!(err.code(), "snapshot.corrupt");
    }

    #[test]
    fn other_cpus_and_device_sets_are_refused() {
        let m = sample();
        let mut other = m.cpu.clone();
        other.model = 86;
        assert_eq!(
            m.check_cpu(&other).unwrap_err().code(),
            "snapshot.cpu_mismatch"
        );
        assert!(m.check_cpu(&m.cpu).is_ok());
        assert!(m.check_devices(&[]).is_ok());
        let err = m.check_devices(&["block"]).unwrap_err();
        assert_eq!(err.code(), "snapshot.device_mismatch");
    }
}
