//! Pulling an image from a registry (OCI distribution API, through oci-client) into the
//! blob store, and building its root disk once per manifest digest.

use crate::reference::Reference;
use crate::rootfs;
use crate::store::{self, Store};
use crate::unpack;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::Client;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{reference}: registry {registry}: {message}")]
    Registry {
        reference: String,
        registry: String,
        message: String,
    },
    #[error("{reference}: no linux/amd64 image in its index")]
    NoPlatform { reference: String },
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("unpacking layer {digest}: {source}")]
    Unpack {
        digest: String,
        source: unpack::Error,
    },
    #[error(transparent)]
    Rootfs(#[from] rootfs::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the network runtime: {0}")]
    Runtime(std::io::Error),
}

/// A pulled image: everything it needs is in the store.
#[derive(Debug, Clone)]
pub struct Image {
    pub reference: String,
    pub manifest_digest: String,
    pub config_digest: String,
    /// Layer digests and media types, bottom first.
    pub layers: Vec<(String, String)>,
    /// Blobs fetched by this pull (0 when everything was cached).
    pub downloaded: usize,
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Plain HTTP for this registry (always allowed for localhost and 127.0.0.1).
    pub insecure: bool,
    /// Report each blob on stderr as it arrives (for terminals).
    pub progress: bool,
}

fn client_for(reference: &Reference, options: &PullOptions) -> Client {
    let host = reference.registry.split(':').next().unwrap_or_default();
    let plain = options.insecure || host == "localhost" || host == "127.0.0.1";
    let protocol = if plain {
        ClientProtocol::HttpsExcept(vec![reference.registry.clone()])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        ..Default::default()
    })
}

fn oci_reference(reference: &Reference, digest: Option<&str>) -> oci_client::Reference {
    let registry = reference.registry.clone();
    let repository = reference.repository.clone();
    match digest.or(reference.digest.as_deref()) {
        Some(digest) => oci_client::Reference::with_digest(registry, repository, digest.into()),
        None => oci_client::Reference::with_tag(
            registry,
            repository,
            reference.tag_or_latest().unwrap_or("latest").into(),
        ),
    }
}

/// Pulls `reference` (an index resolves to linux/amd64) into `store`; blobs already
/// there are not fetched again.
pub fn pull(store: &Store, reference: &Reference, options: &PullOptions) -> Result<Image, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    runtime.block_on(pull_async(store, reference, options))
}

async fn pull_async(
    store: &Store,
    reference: &Reference,
    options: &PullOptions,
) -> Result<Image, Error> {
    let client = client_for(reference, options);
    let auth = crate::auth::for_registry(&reference.registry);
    let registry_err = |e: oci_client::errors::OciDistributionError| Error::Registry {
        reference: reference.to_string(),
        registry: reference.registry.clone(),
        message: e.to_string(),
    };
    let mut oci_ref = oci_reference(reference, None);
    let (mut manifest, mut digest) = client
        .pull_manifest(&oci_ref, &auth)
        .await
        .map_err(registry_err)?;
    if let OciManifest::ImageIndex(index) = &manifest {
        let entry = index
            .manifests
            .iter()
            .find(|m| {
                m.platform.as_ref().is_some_and(|p| {
                    p.os.to_string() == "linux" && p.architecture.to_string() == "amd64"
                })
            })
            .ok_or_else(|| Error::NoPlatform {
                reference: reference.to_string(),
            })?;
        oci_ref = oci_reference(reference, Some(&entry.digest));
        (manifest, digest) = client
            .pull_manifest(&oci_ref, &auth)
            .await
            .map_err(registry_err)?;
    }
    let OciManifest::Image(image) = manifest else {
        return Err(Error::NoPlatform {
            reference: reference.to_string(),
        });
    };
    // Every missing blob is fetched at once; each is verified as it lands in the store.
    let missing: Vec<OciDescriptor> = std::iter::once(&image.config)
        .chain(image.layers.iter())
        .filter(|d| !store.has(&d.digest))
        .cloned()
        .collect();
    let total = missing.len();
    let mut tasks = tokio::task::JoinSet::new();
    for descriptor in missing {
        let (client, oci_ref) = (client.clone(), oci_ref.clone());
        tasks.spawn(async move {
            let mut data = Vec::with_capacity(descriptor.size.max(0) as usize);
            let result = fetch(&client, &oci_ref, &descriptor, &mut data).await;
            (descriptor, result.map(|()| data))
        });
    }
    let mut downloaded = 0;
    while let Some(joined) = tasks.join_next().await {
        let Ok((descriptor, result)) = joined else {
            continue; // a panicked task: its blob is missing and the check below fails
        };
        let data = result.map_err(registry_err)?;
        store.put(&descriptor.digest, &data)?;
        downloaded += 1;
        if options.progress {
            eprintln!(
                "  {downloaded}/{total} {} {:.1} MiB",
                &descriptor.digest[..19.min(descriptor.digest.len())],
                data.len() as f64 / f64::from(1u32 << 20)
            );
        }
    }
    if let Some(absent) = std::iter::once(&image.config)
        .chain(image.layers.iter())
        .find(|d| !store.has(&d.digest))
    {
        return Err(Error::Registry {
            reference: reference.to_string(),
            registry: reference.registry.clone(),
            message: format!("blob {} was not fetched", absent.digest),
        });
    }
    let manifest_json = serde_json::to_vec(&image).unwrap_or_default();
    store.put_manifest(&digest, &manifest_json)?;
    Ok(image_of(reference, digest, &image, downloaded))
}

async fn fetch(
    client: &Client,
    reference: &oci_client::Reference,
    descriptor: &OciDescriptor,
    out: &mut Vec<u8>,
) -> Result<(), oci_client::errors::OciDistributionError> {
    client.pull_blob(reference, descriptor, out).await
}

fn image_of(
    reference: &Reference,
    digest: String,
    image: &OciImageManifest,
    downloaded: usize,
) -> Image {
    Image {
        reference: reference.to_string(),
        manifest_digest: digest,
        config_digest: image.config.digest.clone(),
        layers: image
            .layers
            .iter()
            .map(|l| (l.digest.clone(), l.media_type.clone()))
            .collect(),
        downloaded,
    }
}

/// The image's root disk, built once per manifest digest under `<store>/rootfs/`.
pub fn root_disk(store: &Store, image: &Image, size: Option<u64>) -> Result<PathBuf, Error> {
    let hex = image
        .manifest_digest
        .strip_prefix("sha256:")
        .unwrap_or(&image.manifest_digest);
    let dir = store.root().join("rootfs");
    let disk = dir.join(format!("{hex}.ext4"));
    if disk.is_file() && size.is_none() {
        return Ok(disk);
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tree = dir.join(format!(".tree-{hex}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(&tree).map_err(io(&tree))?;
    let result = (|| {
        for (digest, _) in &image.layers {
            let blob = store.read(digest)?;
            unpack::apply_layer_auto(&tree, &blob[..]).map_err(|source| Error::Unpack {
                digest: digest.clone(),
                source,
            })?;
        }
        let tmp = dir.join(format!(".{hex}.ext4.tmp"));
        rootfs::build_ext4(&tree, &tmp, size)?;
        let out = match size {
            None => disk.clone(),
            Some(size) => dir.join(format!("{hex}-{size}.ext4")),
        };
        fs::rename(&tmp, &out).map_err(io(&out))?;
        Ok(out)
    })();
    let _ = fs::remove_dir_all(&tree);
    result
}
