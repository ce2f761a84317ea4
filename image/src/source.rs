//! Where an image comes from: a registry reference, or a local `oci:DIR[:TAG]` layout,
//! `oci-archive:FILE` or `docker-archive:FILE` (`docker save` output). Every source ends
//! as the same [`Image`] in the blob store, so root disks are built one way.

use crate::pull::{self, Image, PullOptions};
use crate::reference::Reference;
use crate::store::{self, Store};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};

const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Reference(#[from] crate::reference::Error),
    #[error(transparent)]
    Pull(#[from] pull::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("{source_name}: {message}")]
    Local {
        source_name: String,
        message: String,
    },
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

fn read_json(name: &str, path: &Path) -> Result<Value, Error> {
    let bytes = fs::read(path).map_err(|e| local(name, format!("{}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| local(name, format!("{}: {e}", path.display())))
}

/// Pulls or imports `source` into `store` and records its name.
pub fn fetch(store: &Store, source: &Source, options: &PullOptions) -> Result<Image, Error> {
    let image = fetch_blobs(store, source, options)?;
    let entry = store::Entry {
        manifest_digest: image.manifest_digest.clone(),
        config_digest: image.config_digest.clone(),
        layers: image.layers.iter().map(|(d, _)| d.clone()).collect(),
        pulled_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    store.tag(&image.reference, entry)?;
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

/// Reads Env, WorkingDir, User, Entrypoint and Cmd from the image's config blob.
pub fn exec_defaults(store: &Store, image: &Image) -> Result<ExecDefaults, Error> {
    let blob = store.read(&image.config_digest)?;
    let config: Value = serde_json::from_slice(&blob)
        .map_err(|e| local(&image.reference, format!("image config: {e}")))?;
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
    Ok(ExecDefaults {
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
    })
}

fn fetch_blobs(store: &Store, source: &Source, options: &PullOptions) -> Result<Image, Error> {
    match source {
        Source::Registry(reference) => Ok(pull::pull(store, reference, options)?),
        Source::OciLayout { dir, tag } => from_layout(store, dir, tag.as_deref(), &display(source)),
        Source::OciArchive(file) => {
            let tmp = unpack_archive(store, file, &display(source))?;
            let result = from_layout(store, &tmp, None, &display(source));
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
    let tmp = store.root().join(format!(".import-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| local(name, e.to_string()))?;
    let archive = fs::File::open(file).map_err(|e| local(name, e.to_string()))?;
    // The archive is only a container of blobs and JSON: the unpacker's escape checks
    // apply, and nothing from it is used until verified against a digest.
    crate::unpack::apply_layer(&tmp, archive).map_err(|e| local(name, e.to_string()))?;
    Ok(tmp)
}

/// Copies a blob from a layout into the store, verifying its digest.
fn import_blob(store: &Store, dir: &Path, digest: &str, name: &str) -> Result<Vec<u8>, Error> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| local(name, format!("unsupported digest {digest}")))?;
    let data = fs::read(dir.join("blobs/sha256").join(hex))
        .map_err(|e| local(name, format!("blob {digest}: {e}")))?;
    store.put(digest, &data)?;
    Ok(data)
}

fn from_layout(store: &Store, dir: &Path, tag: Option<&str>, name: &str) -> Result<Image, Error> {
    let index = read_json(name, &dir.join("index.json"))?;
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
    let mut digest = chosen["digest"].as_str().unwrap_or_default().to_owned();
    let mut manifest: Value = serde_json::from_slice(&import_blob(store, dir, &digest, name)?)
        .map_err(|e| local(name, e.to_string()))?;
    if chosen["mediaType"] == MEDIA_INDEX || manifest["manifests"].is_array() {
        let entry = manifest["manifests"]
            .as_array()
            .and_then(|m| {
                m.iter().find(|e| {
                    e["platform"]["os"] == "linux" && e["platform"]["architecture"] == "amd64"
                })
            })
            .ok_or_else(|| local(name, "no linux/amd64 image in its index"))?;
        digest = entry["digest"].as_str().unwrap_or_default().to_owned();
        manifest = serde_json::from_slice(&import_blob(store, dir, &digest, name)?)
            .map_err(|e| local(name, e.to_string()))?;
    }
    let config = manifest["config"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    import_blob(store, dir, &config, name)?;
    let mut layers = Vec::new();
    for layer in manifest["layers"].as_array().cloned().unwrap_or_default() {
        let d = layer["digest"].as_str().unwrap_or_default().to_owned();
        import_blob(store, dir, &d, name)?;
        layers.push((
            d,
            layer["mediaType"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    store.put_manifest(&digest, manifest.to_string().as_bytes())?;
    Ok(Image {
        reference: name.into(),
        manifest_digest: digest,
        config_digest: config,
        layers,
        downloaded: 0,
    })
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// `docker save` output: manifest.json names the config and the layer tars.
fn from_docker_save(store: &Store, dir: &Path, name: &str) -> Result<Image, Error> {
    let manifest = read_json(name, &dir.join("manifest.json"))?;
    let entry = manifest
        .as_array()
        .and_then(|m| m.first())
        .ok_or_else(|| local(name, "manifest.json lists no image"))?;
    let read = |rel: &str| -> Result<Vec<u8>, Error> {
        if rel.contains("..") || rel.starts_with('/') {
            return Err(local(name, format!("{rel:?} escapes the archive")));
        }
        fs::read(dir.join(rel)).map_err(|e| local(name, format!("{rel}: {e}")))
    };
    let config = read(entry["Config"].as_str().unwrap_or_default())?;
    let config_digest = sha256(&config);
    store.put(&config_digest, &config)?;
    let mut layers = Vec::new();
    for rel in entry["Layers"].as_array().cloned().unwrap_or_default() {
        let data = read(rel.as_str().unwrap_or_default())?;
        let digest = sha256(&data);
        store.put(&digest, &data)?;
        layers.push((digest, MEDIA_LAYER_TAR.to_owned()));
    }
    // A stable identity for the image: the OCI manifest it corresponds to.
    let oci = serde_json::json!({
        "schemaVersion": 2,
        "config": {"digest": config_digest, "size": config.len()},
        "layers": layers.iter().map(|(d, m)| serde_json::json!({"digest": d, "mediaType": m})).collect::<Vec<_>>(),
    })
    .to_string();
    let manifest_digest = sha256(oci.as_bytes());
    store.put_manifest(&manifest_digest, oci.as_bytes())?;
    Ok(Image {
        reference: name.into(),
        manifest_digest,
        config_digest,
        layers,
        downloaded: 0,
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
