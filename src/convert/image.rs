//! Reading the image to convert: the document the source names, the platform images
//! of an index, their manifests and configs, each checked to be a container image
//! (an artifact, a nested index or a config that does not match its layers is refused
//! with the reason).

use bytes::Bytes;
use lazysnap_registry::{Descriptor, Digest};

use super::oci::media_types::{DOCKER_MANIFEST, OCI_MANIFEST};
use super::oci::{self, ImageConfig, SourceIndex, SourceManifest};
use super::source::Source;
use crate::error::{Error, Result};

/// A platform image of the source.
pub(crate) struct Image {
    /// The index entry it came from.
    pub entry: Option<Descriptor>,
    /// Its manifest's digest.
    pub digest: Digest,
    pub manifest: SourceManifest,
    /// The config's exact bytes (kept when nothing in it changes).
    pub config: Bytes,
    pub parsed: ImageConfig,
}

/// The source's images, and its index if it has one.
pub(crate) struct Tree {
    pub index: Option<SourceIndex>,
    pub images: Vec<Image>,
    /// Index entries left out (attestations).
    pub dropped: usize,
}

fn not_an_image(name: &str, reason: impl Into<String>) -> Error {
    Error::NotAnImage {
        image: name.to_string(),
        reason: reason.into(),
    }
}

fn load_image(
    source: &Source,
    entry: Option<Descriptor>,
    digest: Digest,
    bytes: &[u8],
) -> Result<Image> {
    let name = format!("{}@{digest}", source.name());
    let manifest: SourceManifest = serde_json::from_slice(bytes)
        .map_err(|e| not_an_image(&name, format!("malformed manifest: {e}")))?;
    if manifest.schema_version != 2 {
        return Err(not_an_image(
            &name,
            format!("manifest schema version {}", manifest.schema_version),
        ));
    }
    if !oci::is_image_config(&manifest.config.media_type) {
        return Err(not_an_image(
            &name,
            format!(
                "its config has media type {:?} (an artifact, not an image)",
                manifest.config.media_type
            ),
        ));
    }
    for l in &manifest.layers {
        if oci::oci_layer_type(&l.media_type).is_none() {
            return Err(not_an_image(
                &name,
                format!(
                    "{} has media type {:?}, not a layer",
                    l.digest, l.media_type
                ),
            ));
        }
    }
    let config = source.config(&manifest.config)?;
    let parsed: ImageConfig = serde_json::from_slice(&config)
        .map_err(|e| not_an_image(&name, format!("config {}: {e}", manifest.config.digest)))?;
    if parsed.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(not_an_image(
            &name,
            format!(
                "its config lists {} diff ids for {} layers",
                parsed.rootfs.diff_ids.len(),
                manifest.layers.len()
            ),
        ));
    }
    Ok(Image {
        entry,
        digest,
        manifest,
        config,
        parsed,
    })
}

/// Index entries that are not runnable images: buildx attestations and the like.
fn is_attestation(d: &Descriptor) -> bool {
    d.annotations.contains_key("vnd.docker.reference.type")
        || d.platform.as_ref().is_some_and(|p| p.os == "unknown")
}

pub(crate) fn load_tree(source: &Source) -> Result<Tree> {
    let name = source.name();
    let root = source.root()?;
    let value: serde_json::Value = serde_json::from_slice(&root.bytes)
        .map_err(|e| not_an_image(&name, format!("its manifest is not JSON: {e}")))?;
    if !oci::is_index(&root.media_type, &value) {
        let image = load_image(source, None, root.digest, &root.bytes)?;
        return Ok(Tree {
            index: None,
            images: vec![image],
            dropped: 0,
        });
    }
    let index: SourceIndex = serde_json::from_value(value)
        .map_err(|e| not_an_image(&name, format!("malformed index: {e}")))?;
    if index.schema_version != 2 {
        return Err(not_an_image(
            &name,
            format!("index schema version {}", index.schema_version),
        ));
    }
    let mut images = Vec::new();
    let mut dropped = 0;
    for entry in &index.manifests {
        if is_attestation(entry) {
            dropped += 1;
            continue;
        }
        if !matches!(
            entry.media_type.as_str(),
            OCI_MANIFEST | DOCKER_MANIFEST | ""
        ) {
            return Err(not_an_image(
                &name,
                format!(
                    "index entry {} has media type {:?} (nested indexes are not supported)",
                    entry.digest, entry.media_type
                ),
            ));
        }
        let bytes = source.document(entry)?;
        images.push(load_image(
            source,
            Some(entry.clone()),
            entry.digest.clone(),
            &bytes,
        )?);
    }
    if images.is_empty() {
        return Err(not_an_image(&name, "its index lists no image"));
    }
    Ok(Tree {
        index: Some(index),
        images,
        dropped,
    })
}
