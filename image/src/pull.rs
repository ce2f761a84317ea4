//! Pulling an image from a registry (OCI distribution API, through oci-client) into the
//! blob store, and building its root disk once per manifest digest.

use crate::digest::{self, Digest};
use crate::reference::Reference;
use crate::rootfs;
use crate::store::{self, BlobWriter, Store};
use crate::unpack;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciManifest};
use oci_client::Client;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Prefix of the trees layers are unpacked into (`.tree-<hex>-<pid>` under `rootfs/`).
pub const TMP_TREE: &str = ".tree-";
/// Prefix of root disks being built (`.disk-<hex>-<pid>` under `rootfs/`).
pub const TMP_DISK: &str = ".disk-";

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
    #[error("{reference}: {source}")]
    Digest {
        reference: String,
        source: digest::Error,
    },
    #[error("{reference}: blob {digest} declares a negative size ({size}); refusing it")]
    BadSize {
        reference: String,
        digest: String,
        size: i64,
    },
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

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Registry { .. } => "image.pull_failed",
            Self::NoPlatform { .. } => "image.no_platform",
            Self::Digest { source, .. } => source.code(),
            Self::BadSize { .. } => "image.blob_size_mismatch",
            Self::Store(e) => e.code(),
            Self::Unpack { source, .. } => source.code(),
            Self::Rootfs(e) => e.code(),
            Self::Io { .. } => "image.store_failed",
            Self::Runtime(_) => "host.runtime_failed",
        }
    }
}

/// A pulled image: everything it needs is in the store.
#[derive(Debug, Clone)]
pub struct Image {
    pub reference: String,
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    /// Layer digests and media types, bottom first.
    pub layers: Vec<(Digest, String)>,
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

/// A descriptor's size as a byte count, refusing negative ones.
fn declared_size(reference: &Reference, descriptor: &OciDescriptor) -> Result<u64, Error> {
    u64::try_from(descriptor.size).map_err(|_| Error::BadSize {
        reference: reference.to_string(),
        digest: descriptor.digest.clone(),
        size: descriptor.size,
    })
}

/// A blob download written straight into the store (never held in memory), refused
/// as soon as it passes its declared size.
struct Sink(BlobWriter);

impl tokio::io::AsyncWrite for Sink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.get_mut().0.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().0.flush())
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
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
    let parse = |text: &str| {
        Digest::parse(text).map_err(|source| Error::Digest {
            reference: reference.to_string(),
            source,
        })
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
        oci_ref = oci_reference(reference, Some(parse(&entry.digest)?.as_str()));
        (manifest, digest) = client
            .pull_manifest(&oci_ref, &auth)
            .await
            .map_err(registry_err)?;
    }
    let digest = parse(&digest)?;
    let OciManifest::Image(image) = manifest else {
        return Err(Error::NoPlatform {
            reference: reference.to_string(),
        });
    };
    // Every digest and size is checked before anything is fetched or named on disk.
    let config = (
        parse(&image.config.digest)?,
        declared_size(reference, &image.config)?,
        image.config.clone(),
    );
    let mut layers = Vec::new();
    for descriptor in &image.layers {
        layers.push((
            parse(&descriptor.digest)?,
            declared_size(reference, descriptor)?,
            descriptor.clone(),
        ));
    }
    let wanted: Vec<_> = std::iter::once(&config).chain(&layers).collect();
    // Every missing blob is fetched at once; each is verified as it lands in the store.
    let mut tasks = tokio::task::JoinSet::new();
    let mut total = 0;
    for (digest, size, descriptor) in wanted.iter().filter(|(d, ..)| !store.has(d)) {
        let mut sink = Sink(store.writer(Some(digest), *size)?);
        let (client, oci_ref, descriptor, size) =
            (client.clone(), oci_ref.clone(), descriptor.clone(), *size);
        total += 1;
        tasks.spawn(async move {
            let result = client.pull_blob(&oci_ref, &descriptor, &mut sink).await;
            (descriptor, size, sink, result)
        });
    }
    let mut downloaded = 0;
    while let Some(joined) = tasks.join_next().await {
        let Ok((descriptor, size, Sink(writer), result)) = joined else {
            continue; // a panicked task: its blob is missing and the check below fails
        };
        if writer.overflowed() {
            return Err(store::Error::TooLarge {
                digest: descriptor.digest,
                limit: size,
            }
            .into());
        }
        result.map_err(registry_err)?;
        writer.commit(Some(size))?;
        downloaded += 1;
        if options.progress {
            eprintln!(
                "  {downloaded}/{total} {} {:.1} MiB",
                &descriptor.digest[..19.min(descriptor.digest.len())],
                size as f64 / f64::from(1u32 << 20)
            );
        }
    }
    if let Some((absent, ..)) = wanted.iter().find(|(d, ..)| !store.has(d)) {
        return Err(Error::Registry {
            reference: reference.to_string(),
            registry: reference.registry.clone(),
            message: format!("blob {absent} was not fetched"),
        });
    }
    let manifest_json = serde_json::to_vec(&image).unwrap_or_default();
    store.put_manifest(&digest, &manifest_json)?;
    Ok(Image {
        reference: reference.to_string(),
        manifest_digest: digest,
        config_digest: config.0,
        layers: layers
            .into_iter()
            .map(|(d, _, l)| (d, l.media_type))
            .collect(),
        downloaded,
    })
}

/// The image's root disk, built once per manifest digest under `<store>/rootfs/`.
/// Layers are streamed from their blob files, each bounded by
/// [`unpack::expansion_limit`]; temporary trees and disks of dead processes are
/// removed first.
pub fn root_disk(store: &Store, image: &Image, size: Option<u64>) -> Result<PathBuf, Error> {
    let hex = image.manifest_digest.hex();
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
    store.sweep_stale();
    let pid = std::process::id();
    let tree = dir.join(format!("{TMP_TREE}{hex}-{pid}"));
    let tmp = dir.join(format!("{TMP_DISK}{hex}-{pid}"));
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(&tree).map_err(io(&tree))?;
    let result = (|| {
        let free_at_start = rootfs::free_bytes(&tree).map_err(io(&tree))?;
        for (digest, _) in &image.layers {
            let blob = store.open(digest)?;
            let compressed = blob.metadata().map_err(io(&store.blob_path(digest)))?.len();
            let free = rootfs::free_bytes(&tree).map_err(io(&tree))?;
            let unpack_err = |source| Error::Unpack {
                digest: digest.to_string(),
                source,
            };
            unpack::apply_layer_auto(
                &tree,
                io::BufReader::new(blob),
                unpack::expansion_limit(compressed, unpack::room(free_at_start, free)),
            )
            .map_err(unpack_err)?;
        }
        rootfs::build_ext4(&tree, &tmp, size)?;
        let out = match size {
            None => disk.clone(),
            Some(size) => dir.join(format!("{hex}-{size}.ext4")),
        };
        fs::rename(&tmp, &out).map_err(io(&out))?;
        Ok(out)
    })();
    let _ = fs::remove_dir_all(&tree);
    let _ = fs::remove_file(&tmp);
    result
}
