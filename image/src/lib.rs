//! Images: references, the content-addressed store, layers unpacked for
//! overlayfs, registries, and archives (docs/images.md).
//!
//! Every source (a registry, a `docker save` archive, an OCI layout) ends
//! the same way: the manifest, the config and the layer blobs are in the
//! store, verified; [`record`] checks that the config is for linux/amd64
//! and has a diff ID per layer, unpacks each layer once, and names the
//! image.
//!
//! The crate knows nothing of containers or VMs (docs/design.md): the
//! runtime and the docker-style layer use it.
#![deny(missing_docs)]

pub mod archive;
pub mod reference;
pub mod registry;
pub mod store;
pub mod unpack;

use oci_spec::image::{Arch, ImageConfiguration, ImageIndex, ImageManifest, Os};

use reference::Reference;
use store::{Image, Layer, Store, StoreError};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker's image manifest (schema 2).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker's manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The most of a manifest or index husk reads (registries cap them at 4 MiB).
pub const MANIFEST_LIMIT: u64 = 4 << 20;

/// What can go wrong with an image; each names the image or the part.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A reference does not parse.
    #[error(transparent)]
    Reference(#[from] reference::ReferenceError),
    /// A registry failed.
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    /// A manifest, index or config is not what an image needs.
    #[error("{image}: {message}")]
    Invalid {
        /// The image.
        image: String,
        /// What is wrong.
        message: String,
    },
    /// An index has no manifest for this platform.
    #[error("{image}: no image for linux/amd64 (the index has {available})")]
    Platform {
        /// The image.
        image: String,
        /// The platforms it has.
        available: String,
    },
    /// An archive cannot be read.
    #[error("{path}: {message}")]
    Archive {
        /// The archive.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Whether a media type (or, when none is given, the JSON's shape) is an
/// index or manifest list.
pub fn is_index(media_type: Option<&str>, bytes: &[u8]) -> bool {
    match media_type {
        Some(t) if t == OCI_INDEX || t == DOCKER_LIST => true,
        Some(t) if t == OCI_MANIFEST || t == DOCKER_MANIFEST => false,
        _ => serde_json::from_slice::<serde_json::Value>(bytes)
            .is_ok_and(|v| v.get("manifests").is_some()),
    }
}

/// The linux/amd64 manifest of an index: its digest.
pub fn select_platform(image: &str, index: &[u8]) -> Result<String, ImageError> {
    let index = ImageIndex::from_reader(index).map_err(|e| ImageError::Invalid {
        image: image.to_owned(),
        message: format!("its index does not parse: {e}"),
    })?;
    let mut available = Vec::new();
    for m in index.manifests() {
        match m.platform() {
            Some(p) if *p.os() == Os::Linux && *p.architecture() == Arch::Amd64 => {
                return Ok(m.digest().to_string());
            }
            Some(p) => available.push(format!("{}/{}", p.os(), p.architecture())),
            None => available.push("no platform".into()),
        }
    }
    Err(ImageError::Platform {
        image: image.to_owned(),
        available: if available.is_empty() {
            "no manifests".into()
        } else {
            available.join(", ")
        },
    })
}

/// The blobs a manifest needs: its config's digest, and its layers.
pub fn manifest_blobs(image: &str, manifest: &[u8]) -> Result<(String, Vec<Layer>), ImageError> {
    let m = ImageManifest::from_reader(manifest).map_err(|e| ImageError::Invalid {
        image: image.to_owned(),
        message: format!("its manifest does not parse: {e}"),
    })?;
    let layers = m
        .layers()
        .iter()
        .map(|l| Layer {
            digest: l.digest().to_string(),
            diff_id: String::new(),
            size: l.size(),
            media_type: l.media_type().to_string(),
        })
        .collect();
    Ok((m.config().digest().to_string(), layers))
}

/// The config of a stored image.
pub fn config(store: &Store, image: &Image) -> Result<ImageConfiguration, ImageError> {
    let bytes = store.read_blob(&image.config)?;
    ImageConfiguration::from_reader(&bytes[..]).map_err(|e| ImageError::Invalid {
        image: image.name.clone(),
        message: format!("its config does not parse: {e}"),
    })
}

/// Names an image whose manifest, config and layer blobs are stored:
/// checks the config's platform and diff IDs, unpacks every layer (once),
/// and records it under `name`.
pub fn record(
    store: &Store,
    name: &Reference,
    manifest_digest: &str,
    manifest: &[u8],
) -> Result<Image, ImageError> {
    let image = name.to_string();
    let invalid = |message: String| ImageError::Invalid {
        image: image.clone(),
        message,
    };
    let (config_digest, mut layers) = manifest_blobs(&image, manifest)?;
    let config_bytes = store.read_blob(&config_digest)?;
    let config = ImageConfiguration::from_reader(&config_bytes[..])
        .map_err(|e| invalid(format!("its config does not parse: {e}")))?;
    if *config.os() != Os::Linux || *config.architecture() != Arch::Amd64 {
        return Err(invalid(format!(
            "the image is for {}/{}, not linux/amd64",
            config.os(),
            config.architecture()
        )));
    }
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != layers.len() {
        return Err(invalid(format!(
            "the manifest has {} layers, the config {} diff IDs",
            layers.len(),
            diff_ids.len()
        )));
    }
    for (layer, diff_id) in layers.iter_mut().zip(diff_ids) {
        layer.diff_id = diff_id.clone();
    }
    // Layers unpack independently (each into its own directory): in
    // parallel, as many at once as there are CPUs.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::Mutex::new(layers.iter());
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..cpus.min(layers.len()) {
            s.spawn(|| {
                while let Some(layer) = next.lock().unwrap().next() {
                    if let Err(e) = store.unpack(layer) {
                        failed.lock().unwrap().get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e.into());
    }
    let image = Image {
        name: image,
        manifest: manifest_digest.to_owned(),
        config: config_digest,
        layers,
        stored: crate::now_rfc3339(),
    };
    store.add_image(image.clone())?;
    Ok(image)
}

/// Now, as RFC 3339 with nanoseconds (the `created` and `stored` times).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}
