//! Where an image comes from: a registry reference, or a local `oci:DIR[:TAG]` layout,
//! `oci-archive:FILE` or `docker-archive:FILE` (`docker save` output). Every source ends
//! as the same [`Image`] in the blob store, so root disks are built one way.

use crate::digest::{self, Digest};
use crate::platform::Platform;
use crate::pull::{self, Image, PullOptions};
use crate::reference::Reference;
use crate::store::{self, Store, MAX_JSON};
use crate::unpack;
use serde_json::Value;
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Prefix of the directories archives are unpacked into (`.import-<pid>` in the store).
pub const TMP_IMPORT: &str = ".import-";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Reference(#[from] crate::reference::Error),
    #[error(transparent)]
    Pull(#[from] pull::Error),
    #[error("{source_name}: {source}")]
    Store {
        source_name: String,
        source: store::Error,
    },
    #[error("{source_name}: {source}")]
    Digest {
        source_name: String,
        source: digest::Error,
    },
    #[error("{source_name}: unpacking the archive: {source}")]
    Unpack {
        source_name: String,
        source: unpack::Error,
    },
    #[error("{source_name}: {path} is not a regular file inside the image (a symlink out of it, a device or a FIFO); refusing it")]
    NotInside { source_name: String, path: PathBuf },
    #[error("{source_name}: {what} is larger than {limit} bytes; refusing it")]
    TooLarge {
        source_name: String,
        what: String,
        limit: u64,
    },
    #[error("{source_name}: the image config {digest} is not a JSON object ({why}); the image is not usable")]
    BadConfig {
        source_name: String,
        digest: String,
        why: String,
    },
    #[error("{source_name}: {message}")]
    Local {
        source_name: String,
        message: String,
    },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Reference(_) => "image.bad_reference",
            Self::Pull(e) => e.code(),
            Self::Store { source, .. } => source.code(),
            Self::Digest { source, .. } => source.code(),
            Self::Unpack { source, .. } => source.code(),
            Self::NotInside { .. } => "image.unsafe_path",
            Self::TooLarge { .. } => "image.blob_size_mismatch",
            Self::BadConfig { .. } => "image.bad_config",
            Self::Local { .. } => "image.bad_source",
        }
    }
}

/// A parsed `--image` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Registry(Reference),
    OciLayout { dir: PathBuf, tag: Option<String> },
    OciArchive(PathBuf),
    DockerArchive(PathBuf),
}

impl Source {
    pub fn parse(text: &str) -> Result<Self, Error> {
        if let Some(rest) = text.strip_prefix("oci:") {
            // A tag follows the last ':' unless that would cut a path.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.contains('/') && !tag.is_empty() => {
                    (dir, Some(tag.to_owned()))
                }
                _ => (rest, None),
            };
            return Ok(Self::OciLayout {
                dir: dir.into(),
                tag,
            });
        }
        if let Some(file) = text.strip_prefix("oci-archive:") {
            return Ok(Self::OciArchive(file.into()));
        }
        if let Some(file) = text.strip_prefix("docker-archive:") {
            return Ok(Self::DockerArchive(file.into()));
        }
        Ok(Self::Registry(text.parse()?))
    }
}

fn local(name: &str, message: impl Into<String>) -> Error {
    Error::Local {
        source_name: name.into(),
        message: message.into(),
    }
}

/// Opens `rel` under `dir` for reading. The file actually opened (after symlinks) must
/// be a regular file inside `dir`: checked on the open descriptor, so nothing can swap
/// it in between. Opened non-blocking, so a FIFO is refused instead of waited on.
fn open_inside(dir: &Path, rel: &Path, name: &str) -> Result<(fs::File, u64), Error> {
    let path = dir.join(rel);
    let refused = || Error::NotInside {
        source_name: name.into(),
        path: rel.to_owned(),
    };
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(refused());
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| local(name, format!("{}: {e}", rel.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| local(name, format!("{}: {e}", rel.display())))?;
    let real = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| local(name, format!("{}: {e}", rel.display())))?;
    let base = fs::canonicalize(dir).map_err(|e| local(name, format!("{}: {e}", dir.display())))?;
    if !meta.is_file() || !real.starts_with(&base) {
        return Err(refused());
    }
    Ok((file, meta.len()))
}

/// Reads a JSON document of at most [`MAX_JSON`] bytes from `rel` under `dir`.
fn read_json(name: &str, dir: &Path, rel: &str) -> Result<Value, Error> {
    let (file, len) = open_inside(dir, Path::new(rel), name)?;
    if len > MAX_JSON {
        return Err(Error::TooLarge {
            source_name: name.into(),
            what: rel.into(),
            limit: MAX_JSON,
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_JSON)
        .read_to_end(&mut bytes)
        .map_err(|e| local(name, format!("{rel}: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| local(name, format!("{rel}: {e}")))
}

/// Pulls or imports `source` into `store` and records its name. An image whose config
/// is not a JSON object is refused here, before any root disk is built from it, and
/// its blobs that no other image uses are dropped again.
pub fn fetch(store: &Store, source: &Source, options: &PullOptions) -> Result<Image, Error> {
    store.sweep_stale();
    let mut image = fetch_blobs(store, source, options)?;
    let checked = exec_defaults(store, &image).and_then(|_| {
        let platform = config_platform(store, &image)?;
        // A single-manifest image names its platform only in its config.
        match &platform {
            Some(p)
                if !options
                    .platform
                    .matches(&p.os, &p.architecture, p.variant.as_deref()) =>
            {
                Err(Error::Pull(pull::Error::NoPlatform {
                    reference: image.reference.clone(),
                    platform: options.platform.to_string(),
                    available: vec![p.to_string()],
                }))
            }
            _ => Ok(platform),
        }
    });
    match checked {
        Ok(platform) => image.platform = platform.map(|p| p.to_string()),
        Err(e) => {
            store.discard_unreferenced(
                &image.manifest_digest,
                std::iter::once(&image.config_digest).chain(image.layers.iter().map(|(d, _)| d)),
            );
            return Err(e);
        }
    }
    let entry = store::Entry {
        manifest_digest: image.manifest_digest.to_string(),
        config_digest: image.config_digest.to_string(),
        layers: image.layers.iter().map(|(d, _)| d.to_string()).collect(),
        pulled_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        platform: image.platform.clone(),
    };
    store
        .tag(&image.reference, entry)
        .map_err(|source| Error::Store {
            source_name: image.reference.clone(),
            source,
        })?;
    Ok(image)
}

/// The defaults an image's config gives the commands run in it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecDefaults {
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// The image's config as JSON (checked to be an object).
pub fn config_json(store: &Store, image: &Image) -> Result<Value, Error> {
    let bad = |why: String| Error::BadConfig {
        source_name: image.reference.clone(),
        digest: image.config_digest.to_string(),
        why,
    };
    let blob = store
        .read_small(&image.config_digest, MAX_JSON)
        .map_err(|e| bad(e.to_string()))?;
    let config: Value = serde_json::from_slice(&blob).map_err(|e| bad(e.to_string()))?;
    if !config.is_object() {
        return Err(bad("it is JSON, but not an object".into()));
    }
    Ok(config)
}

/// The platform the image's config names (`os`, `architecture`, `variant`), if it does.
fn config_platform(store: &Store, image: &Image) -> Result<Option<Platform>, Error> {
    Ok(Platform::of_json(&config_json(store, image)?))
}

/// Reads Env, WorkingDir, User, Entrypoint and Cmd from the image's config blob.
pub fn exec_defaults(store: &Store, image: &Image) -> Result<ExecDefaults, Error> {
    Ok(exec_defaults_of(&config_json(store, image)?))
}

/// Env, WorkingDir, User, Entrypoint and Cmd of a parsed image config; fields of the
/// wrong type count as absent.
pub fn exec_defaults_of(config: &Value) -> ExecDefaults {
    let c = &config["config"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    ExecDefaults {
        env: strings(&c["Env"])
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect(),
        working_dir: text(&c["WorkingDir"]),
        user: text(&c["User"]),
        entrypoint: strings(&c["Entrypoint"]),
        cmd: strings(&c["Cmd"]),
    }
}

fn fetch_blobs(store: &Store, source: &Source, options: &PullOptions) -> Result<Image, Error> {
    match source {
        Source::Registry(reference) => Ok(pull::pull(store, reference, options)?),
        Source::OciLayout { dir, tag } => from_layout(
            store,
            dir,
            tag.as_deref(),
            &display(source),
            &options.platform,
        ),
        Source::OciArchive(file) => {
            let tmp = unpack_archive(store, file, &display(source))?;
            let result = from_layout(store, &tmp, None, &display(source), &options.platform);
            let _ = fs::remove_dir_all(&tmp);
            result
        }
        Source::DockerArchive(file) => {
            let tmp = unpack_archive(store, file, &display(source))?;
            let result = from_docker_save(store, &tmp, &display(source));
            let _ = fs::remove_dir_all(&tmp);
            result
        }
    }
}

fn display(source: &Source) -> String {
    match source {
        Source::Registry(r) => r.to_string(),
        Source::OciLayout { dir, tag } => match tag {
            Some(tag) => format!("oci:{}:{tag}", dir.display()),
            None => format!("oci:{}", dir.display()),
        },
        Source::OciArchive(f) => format!("oci-archive:{}", f.display()),
        Source::DockerArchive(f) => format!("docker-archive:{}", f.display()),
    }
}

fn unpack_archive(store: &Store, file: &Path, name: &str) -> Result<PathBuf, Error> {
    let tmp = store
        .root()
        .join(format!("{TMP_IMPORT}{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| local(name, e.to_string()))?;
    let result = (|| {
        let archive = fs::File::open(file).map_err(|e| local(name, e.to_string()))?;
        let size = archive
            .metadata()
            .map_err(|e| local(name, e.to_string()))?
            .len();
        let free = crate::rootfs::free_bytes(&tmp).map_err(|e| local(name, e.to_string()))?;
        // The archive is only a container of blobs and JSON: the unpacker's escape checks
        // apply, it cannot expand past its own size, and nothing from it is used until
        // verified against a digest.
        unpack::apply_layer(
            &tmp,
            std::io::BufReader::new(archive),
            size.min(unpack::room(free, free)),
        )
        .map_err(|source| Error::Unpack {
            source_name: name.into(),
            source,
        })
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// A digest from a layout's JSON, parsed before it names any file.
fn parse_digest(name: &str, value: &Value) -> Result<Digest, Error> {
    Digest::parse(value.as_str().unwrap_or_default()).map_err(|source| Error::Digest {
        source_name: name.into(),
        source,
    })
}

/// Copies the blob a descriptor names from a layout into the store: its digest parsed
/// first, no more than its declared size read, its content verified.
fn import_blob(store: &Store, dir: &Path, descriptor: &Value, name: &str) -> Result<Digest, Error> {
    let digest = parse_digest(name, &descriptor["digest"])?;
    let size = descriptor["size"].as_u64().ok_or_else(|| {
        local(
            name,
            format!(
                "descriptor of {digest} has no valid size: {}",
                descriptor["size"]
            ),
        )
    })?;
    if store.has(&digest) {
        return Ok(digest);
    }
    let rel = Path::new("blobs/sha256").join(digest.hex());
    let (file, _) = open_inside(dir, &rel, name)?;
    store
        .import(file, Some(&digest), Some(size))
        .map_err(|source| Error::Store {
            source_name: name.into(),
            source,
        })
}

/// Imports a manifest or index blob and parses it.
fn import_json(
    store: &Store,
    dir: &Path,
    descriptor: &Value,
    name: &str,
) -> Result<(Digest, Value), Error> {
    let digest = import_blob(store, dir, descriptor, name)?;
    let store_err = |source| Error::Store {
        source_name: name.into(),
        source,
    };
    let bytes = store.read_small(&digest, MAX_JSON).map_err(store_err)?;
    let value =
        serde_json::from_slice(&bytes).map_err(|e| local(name, format!("{digest}: {e}")))?;
    Ok((digest, value))
}

fn from_layout(
    store: &Store,
    dir: &Path,
    tag: Option<&str>,
    name: &str,
    platform: &Platform,
) -> Result<Image, Error> {
    let index = read_json(name, dir, "index.json")?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let chosen = match tag {
        Some(tag) => manifests
            .iter()
            .find(|m| m["annotations"][ANNOTATION_REF_NAME] == tag)
            .ok_or_else(|| local(name, format!("no image tagged {tag}")))?,
        None if manifests.len() == 1 => &manifests[0],
        None => {
            return Err(local(
                name,
                "several images in the layout: name one with :TAG",
            ))
        }
    };
    let (mut digest, mut manifest) = import_json(store, dir, chosen, name)?;
    if chosen["mediaType"] == MEDIA_INDEX || manifest["manifests"].is_array() {
        let entry = manifest["manifests"]
            .as_array()
            .and_then(|m| {
                m.iter().find(|e| {
                    Platform::of_json(&e["platform"]).is_some_and(|p| {
                        platform.matches(&p.os, &p.architecture, p.variant.as_deref())
                    })
                })
            })
            .cloned()
            .ok_or_else(|| local(name, format!("no {platform} image in its index")))?;
        (digest, manifest) = import_json(store, dir, &entry, name)?;
    }
    let config = import_blob(store, dir, &manifest["config"], name)?;
    let mut layers = Vec::new();
    for layer in manifest["layers"].as_array().cloned().unwrap_or_default() {
        let d = import_blob(store, dir, &layer, name)?;
        layers.push((
            d,
            layer["mediaType"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    store
        .put_manifest(&digest, manifest.to_string().as_bytes())
        .map_err(|source| Error::Store {
            source_name: name.into(),
            source,
        })?;
    Ok(Image {
        reference: name.into(),
        manifest_digest: digest,
        config_digest: config,
        layers,
        downloaded: 0,
        downloaded_bytes: 0,
        platform: None,
    })
}

/// `docker save` output: manifest.json names the config and the layer tars by path
/// inside the archive; their digests are computed as they are streamed into the store.
fn from_docker_save(store: &Store, dir: &Path, name: &str) -> Result<Image, Error> {
    let manifest = read_json(name, dir, "manifest.json")?;
    let entry = manifest
        .as_array()
        .and_then(|m| m.first())
        .ok_or_else(|| local(name, "manifest.json lists no image"))?;
    let import = |value: &Value| -> Result<(Digest, u64), Error> {
        let rel = Path::new(value.as_str().unwrap_or_default());
        let (file, len) = open_inside(dir, rel, name)?;
        let digest = store
            .import(file, None, Some(len))
            .map_err(|source| Error::Store {
                source_name: name.into(),
                source,
            })?;
        Ok((digest, len))
    };
    let (config_digest, config_size) = import(&entry["Config"])?;
    let mut layers = Vec::new();
    for rel in entry["Layers"].as_array().cloned().unwrap_or_default() {
        let (digest, _) = import(&rel)?;
        layers.push((digest, MEDIA_LAYER_TAR.to_owned()));
    }
    // A stable identity for the image: the OCI manifest it corresponds to.
    let oci = serde_json::json!({
        "schemaVersion": 2,
        "config": {"digest": config_digest.as_str(), "size": config_size},
        "layers": layers.iter().map(|(d, m)| serde_json::json!({"digest": d.as_str(), "mediaType": m})).collect::<Vec<_>>(),
    })
    .to_string();
    let manifest_digest = Digest::of(oci.as_bytes());
    store
        .put_manifest(&manifest_digest, oci.as_bytes())
        .map_err(|source| Error::Store {
            source_name: name.into(),
            source,
        })?;
    Ok(Image {
        reference: name.into(),
        manifest_digest,
        config_digest,
        layers,
        downloaded: 0,
        downloaded_bytes: 0,
        platform: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_sources_are_recognised() {
        assert_eq!(
            Source::parse("oci:/tmp/layout:v1").unwrap(),
            Source::OciLayout {
                dir: "/tmp/layout".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            Source::parse("oci:/tmp/layout").unwrap(),
            Source::OciLayout {
                dir: "/tmp/layout".into(),
                tag: None
            }
        );
        assert_eq!(
            Source::parse("docker-archive:/x.tar").unwrap(),
            Source::DockerArchive("/x.tar".into())
        );
        assert_eq!(
            Source::parse("oci-archive:/x.tar").unwrap(),
            Source::OciArchive("/x.tar".into())
        );
        assert!(matches!(
            Source::parse("alpine:3.20").unwrap(),
            Source::Registry(_)
        ));
        assert!(Source::parse("Bad//Ref").is_err());
    }
}
