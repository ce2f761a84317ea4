//! Pulling an image from a registry (OCI distribution API, through oci-client) into the
//! blob store, and building its root disk once per manifest digest.

use crate::digest::{self, Digest};
use crate::download::{self, Origin, Wanted};
use crate::platform::Platform;
use crate::progress::{Event, Reporter, UnpackMeter};
use crate::reference::Reference;
use crate::rootfs;
use crate::store::{self, Store};
use crate::tls::CaCert;
use crate::unpack;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciManifest};
use oci_client::Client;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    #[error("{reference}: registry {registry} {}", unauthorized_advice(registry, user.as_deref()))]
    Unauthorized {
        reference: String,
        registry: String,
        /// The user whose credentials were refused (none were sent when `None`).
        user: Option<String>,
    },
    #[error("{reference}: registry {registry} presented a TLS certificate this host does not trust ({message}); put its CA in /etc/docker/certs.d/{registry}/ca.crt or pass --ca-cert FILE")]
    Untrusted {
        reference: String,
        registry: String,
        message: String,
    },
    #[error("{reference}: no {platform} image (it has: {}); pick one with --platform", if available.is_empty() { "none named".to_owned() } else { available.join(", ") })]
    NoPlatform {
        reference: String,
        platform: String,
        available: Vec<String>,
    },
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
    #[error("{reference}: registry {registry}: {source}")]
    Download {
        reference: String,
        registry: String,
        source: download::Error,
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
    #[error("{reference}: the missing blobs need {needed} bytes but {path} has {free} bytes free; free space (microagent image rm removes unused images) and pull again")]
    NoSpace {
        reference: String,
        path: PathBuf,
        needed: u64,
        free: u64,
    },
    #[error("unpacking layer {digest} needs more than the {room} bytes {path} can still give it (half of the {free_at_start} bytes free when the build started is kept for the root disk); free space (microagent image rm removes unused images) and retry")]
    UnpackNoSpace {
        digest: String,
        path: PathBuf,
        room: u64,
        free_at_start: u64,
    },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Registry { .. } => "image.pull_failed",
            Self::Unauthorized { .. } => "image.unauthorized",
            Self::Untrusted { .. } => "image.tls_untrusted",
            Self::NoPlatform { .. } => "image.no_platform",
            Self::Digest { source, .. } => source.code(),
            Self::BadSize { .. } => "image.blob_size_mismatch",
            Self::Download { source, .. } => source.code(),
            Self::Store(e) => e.code(),
            Self::Unpack { source, .. } => source.code(),
            Self::Rootfs(e) => e.code(),
            Self::Io { .. } => "image.store_failed",
            Self::Runtime(_) => "host.runtime_failed",
            Self::NoSpace { .. } | Self::UnpackNoSpace { .. } => "image.no_space",
        }
    }
}

/// What to do about a registry that answered 401.
fn unauthorized_advice(registry: &str, user: Option<&str>) -> String {
    let file = crate::auth::config_path().map_or_else(
        || "the Docker config".to_owned(),
        |p| p.display().to_string(),
    );
    match user {
        Some(user) => format!(
            "refused the credentials of {user} (from {file}): run `microagent image login {registry}` with the right ones"
        ),
        None => format!(
            "needs credentials and none are stored for it in {file}: run `microagent image login {registry}`"
        ),
    }
}

fn is_unauthorized(e: &oci_client::errors::OciDistributionError) -> bool {
    use oci_client::errors::OciDistributionError as E;
    matches!(e, E::UnauthorizedError { .. } | E::AuthenticationFailure(_))
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
    /// Bytes that went over the network for them.
    pub downloaded_bytes: u64,
    /// The platform its config names (`linux/amd64`), once read.
    pub platform: Option<String>,
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Plain HTTP for this registry (always allowed for localhost and 127.0.0.1).
    pub insecure: bool,
    /// Where progress events go (nowhere by default).
    pub progress: Reporter,
    /// The manifest an index resolves to (linux/amd64 by default).
    pub platform: Platform,
    /// CA certificates to trust for this registry besides the system's.
    pub ca_certs: Vec<CaCert>,
}

/// Whether `registry` is reached over plain HTTP: with `--insecure`, or on loopback,
/// unless a CA is configured for it (then it speaks TLS).
pub fn plain_http(registry: &str, insecure: bool, has_ca: bool) -> bool {
    let host = registry.split(':').next().unwrap_or_default();
    (insecure || host == "localhost" || host == "127.0.0.1") && !has_ca
}

fn client_for(reference: &Reference, options: &PullOptions) -> Result<Client, Error> {
    let plain = plain_http(
        &reference.registry,
        options.insecure,
        !options.ca_certs.is_empty(),
    );
    let protocol = if plain {
        ClientProtocol::HttpsExcept(vec![reference.registry.clone()])
    } else {
        ClientProtocol::Https
    };
    let extra_root_certificates = options
        .ca_certs
        .iter()
        .map(|ca| Certificate {
            encoding: CertificateEncoding::Pem,
            data: ca.pem.clone(),
        })
        .collect();
    Client::try_from(ClientConfig {
        protocol,
        extra_root_certificates,
        ..Default::default()
    })
    .map_err(|e| Error::Registry {
        reference: reference.to_string(),
        registry: reference.registry.clone(),
        message: format!("setting up the HTTP client: {}", describe(&e)),
    })
}

/// An error with every cause in its chain (a TLS refusal is three levels down).
pub(crate) fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
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

/// Pulls `reference` (an index resolves to `options.platform`) into `store`; blobs already
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
    let client = client_for(reference, options)?;
    let auth = crate::auth::for_registry(&reference.registry);
    let user = match &auth {
        oci_client::secrets::RegistryAuth::Basic(user, _) => Some(user.clone()),
        _ => None,
    };
    let unauthorized = || Error::Unauthorized {
        reference: reference.to_string(),
        registry: reference.registry.clone(),
        user: user.clone(),
    };
    let registry_err = |e: oci_client::errors::OciDistributionError| {
        if is_unauthorized(&e) {
            return unauthorized();
        }
        let message = describe(&e);
        if message.contains("certificate") {
            return Error::Untrusted {
                reference: reference.to_string(),
                registry: reference.registry.clone(),
                message,
            };
        }
        Error::Registry {
            reference: reference.to_string(),
            registry: reference.registry.clone(),
            message,
        }
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
        let wanted = &options.platform;
        let entry = index
            .manifests
            .iter()
            .find(|m| {
                m.platform.as_ref().is_some_and(|p| {
                    wanted.matches(
                        &p.os.to_string(),
                        &p.architecture.to_string(),
                        p.variant.as_deref(),
                    )
                })
            })
            .ok_or_else(|| Error::NoPlatform {
                reference: reference.to_string(),
                platform: wanted.to_string(),
                available: index
                    .manifests
                    .iter()
                    .filter_map(|m| m.platform.as_ref())
                    .map(|p| {
                        let mut text = format!("{}/{}", p.os, p.architecture);
                        if let Some(variant) = &p.variant {
                            text.push('/');
                            text.push_str(variant);
                        }
                        text
                    })
                    .collect(),
            })?;
        oci_ref = oci_reference(reference, Some(parse(&entry.digest)?.as_str()));
        (manifest, digest) = client
            .pull_manifest(&oci_ref, &auth)
            .await
            .map_err(registry_err)?;
    }
    let digest = parse(&digest)?;
    let OciManifest::Image(image) = manifest else {
        return Err(Error::Registry {
            reference: reference.to_string(),
            registry: reference.registry.clone(),
            message: "an index names another index where an image manifest was expected".into(),
        });
    };
    // Every digest and size is checked before anything is fetched or named on disk.
    let config = Wanted {
        digest: parse(&image.config.digest)?,
        size: declared_size(reference, &image.config)?,
        descriptor: image.config.clone(),
    };
    let mut layers = Vec::new();
    for descriptor in &image.layers {
        layers.push(Wanted {
            digest: parse(&descriptor.digest)?,
            size: declared_size(reference, descriptor)?,
            descriptor: descriptor.clone(),
        });
    }
    let wanted: Vec<&Wanted> = std::iter::once(&config).chain(&layers).collect();
    let missing: Vec<Wanted> = wanted
        .iter()
        .filter(|w| !store.has(&w.digest))
        .map(|w| (*w).clone())
        .collect();
    // Room for what is still to come, checked before a byte is fetched: a download that
    // fills the file system would leave a half blob where the space is needed.
    let needed: u64 = missing
        .iter()
        .map(|w| w.size.saturating_sub(store.partial_len(&w.digest)))
        .sum();
    let root = store.root().to_path_buf();
    fs::create_dir_all(&root).map_err(|source| Error::Io {
        path: root.clone(),
        source,
    })?;
    let free = rootfs::free_bytes(&root).map_err(|source| Error::Io {
        path: root.clone(),
        source,
    })?;
    if free < needed {
        return Err(Error::NoSpace {
            reference: reference.to_string(),
            path: root,
            needed,
            free,
        });
    }
    let started = Instant::now();
    options.progress.emit(Event::Resolved {
        reference: reference.to_string(),
        digest: digest.to_string(),
        blobs: wanted.len(),
        missing: missing.len(),
        missing_bytes: missing.iter().map(|w| w.size).sum(),
    });
    // Every missing blob is fetched at once, each streamed into the store and verified
    // there. On the first failure the others stop; after an interruption what they had
    // is kept for the next pull to continue from.
    let mut tasks = tokio::task::JoinSet::new();
    for blob in missing {
        let (client, oci_ref, store, reporter) = (
            client.clone(),
            oci_ref.clone(),
            store.clone(),
            options.progress.clone(),
        );
        tasks.spawn(async move {
            let origin = Origin {
                client: &client,
                reference: &oci_ref,
            };
            download::fetch(origin, &store, &blob, &reporter).await
        });
    }
    let (mut downloaded, mut downloaded_bytes) = (0, 0);
    while let Some(joined) = tasks.join_next().await {
        let Ok(result) = joined else {
            continue; // a panicked task: its blob is missing and the check below fails
        };
        match result {
            Ok(bytes) => downloaded_bytes += bytes,
            Err(source) => {
                if source.is_refusal() || source.is_no_space() {
                    // The image is refused as a whole, or the disk is full: what the
                    // other downloads had is dropped too, so nothing is left behind.
                    tasks.shutdown().await;
                    for blob in &wanted {
                        store.discard_partial(&blob.digest);
                    }
                }
                if matches!(&source, download::Error::Registry(e) if is_unauthorized(e)) {
                    return Err(unauthorized());
                }
                return Err(Error::Download {
                    reference: reference.to_string(),
                    registry: reference.registry.clone(),
                    source,
                });
            }
        }
        downloaded += 1;
    }
    if let Some(absent) = wanted.iter().find(|w| !store.has(&w.digest)) {
        return Err(Error::Registry {
            reference: reference.to_string(),
            registry: reference.registry.clone(),
            message: format!("blob {} was not fetched", absent.digest),
        });
    }
    let manifest_json = serde_json::to_vec(&image).unwrap_or_default();
    store.put_manifest(&digest, &manifest_json)?;
    options.progress.emit(Event::Pulled {
        reference: reference.to_string(),
        digest: digest.to_string(),
        downloaded_bytes,
        seconds: started.elapsed().as_secs_f64(),
    });
    Ok(Image {
        reference: reference.to_string(),
        manifest_digest: digest,
        config_digest: config.digest,
        layers: layers
            .into_iter()
            .map(|w| (w.digest, w.descriptor.media_type))
            .collect(),
        downloaded,
        downloaded_bytes,
        platform: None,
    })
}

/// The image's root disk, built once per manifest digest under `<store>/rootfs/`.
/// Layers are streamed from their blob files, each bounded by
/// [`unpack::expansion_limit`]; temporary trees and disks of dead processes are
/// removed first. With a `size` at least that of the default disk, when it is cached,
/// the disk is grown (resize2fs) instead of unpacking again; otherwise it is built
/// from the tree at that size, refused (`input.disk_too_small`) when the tree does not
/// fit. Each size is kept.
pub fn root_disk(store: &Store, image: &Image, size: Option<u64>) -> Result<PathBuf, Error> {
    root_disk_observed(store, image, size, &Reporter::default())
}

/// [`root_disk`], reporting each layer's unpacking and the ext4 build to `progress`
/// (nothing when the disk is cached).
pub fn root_disk_observed(
    store: &Store,
    image: &Image,
    size: Option<u64>,
    progress: &Reporter,
) -> Result<PathBuf, Error> {
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
    if let Some(size) = size.map(rootfs::disk_size).filter(|_| disk.is_file()) {
        // With the default disk cached, a larger one is that disk grown; otherwise
        // the disk is built from the tree below at its size (refused if the tree
        // does not fit).
        let started = Instant::now();
        let default_size = fs::metadata(&disk).map_err(io(&disk))?.len();
        if size >= default_size {
            let out = dir.join(format!("{hex}-{size}.ext4"));
            if out.is_file() {
                return Ok(out);
            }
            let tmp = dir.join(format!("{TMP_DISK}{hex}-{}", std::process::id()));
            progress.emit(Event::DiskResizing { size });
            let grown = rootfs::grow_ext4(&disk, &tmp, size)
                .map_err(Error::from)
                .and_then(|()| fs::rename(&tmp, &out).map_err(io(&out)));
            let _ = fs::remove_file(&tmp);
            grown?;
            progress.emit(Event::DiskBuilt {
                seconds: started.elapsed().as_secs_f64(),
            });
            return Ok(out);
        }
    }
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    store.sweep_stale();
    let pid = std::process::id();
    let tree = dir.join(format!("{TMP_TREE}{hex}-{pid}"));
    let tmp = dir.join(format!("{TMP_DISK}{hex}-{pid}"));
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(&tree).map_err(io(&tree))?;
    let started = Instant::now();
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
            let metered = UnpackMeter::new(blob, progress, digest.as_str(), compressed);
            let room = unpack::room(free_at_start, free);
            let limit = unpack::expansion_limit(compressed, room);
            unpack::apply_layer_auto(&tree, io::BufReader::new(metered), limit).map_err(
                |source| match source {
                    // The free space, not the layer's ratio, set the limit: a full disk,
                    // not a hostile layer.
                    unpack::Error::TooLarge { .. } if limit == room => Error::UnpackNoSpace {
                        digest: digest.to_string(),
                        path: dir.clone(),
                        room,
                        free_at_start,
                    },
                    source => unpack_err(source),
                },
            )?;
            progress.emit(Event::LayerUnpacking {
                digest: digest.to_string(),
                bytes: compressed,
                size: compressed,
            });
        }
        progress.emit(Event::DiskFormatting);
        rootfs::build_ext4(&tree, &tmp, size)?;
        let out = match size {
            None => disk.clone(),
            Some(size) => dir.join(format!("{hex}-{}.ext4", rootfs::disk_size(size))),
        };
        fs::rename(&tmp, &out).map_err(io(&out))?;
        progress.emit(Event::DiskBuilt {
            seconds: started.elapsed().as_secs_f64(),
        });
        Ok(out)
    })();
    let _ = fs::remove_dir_all(&tree);
    let _ = fs::remove_file(&tmp);
    result
}
