//! Writing the converted images' documents: each config with the new diff ids, each
//! manifest (OCI media types, the layer descriptors with their annotations), the
//! index, and the tag last.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use lazysnap_registry::{BlobSource, Descriptor, Digest, Platform};

use super::dest::Dest;
use super::image::Tree;
use super::layer::Done;
use super::oci;
use super::oci::media_types::{OCI_CONFIG, OCI_FOREIGN, OCI_INDEX, OCI_MANIFEST};
use super::summary::ImageSummary;
use crate::error::{Error, Result};

/// Stores the configs and manifests of `tree` with the converted layers `done`, then
/// tags the top document; returns its digest and media type, and each image.
pub(crate) fn publish(
    tree: &Tree,
    done: &HashMap<Digest, Done>,
    dest: &Dest,
) -> Result<(Digest, &'static str, Vec<ImageSummary>)> {
    let mut images = Vec::new();
    let mut entries = Vec::new();
    let single = tree.index.is_none();
    for img in &tree.images {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (l, old_id) in img.manifest.layers.iter().zip(&img.parsed.rootfs.diff_ids) {
            match done.get(&l.digest) {
                Some(d) => {
                    layers.push(d.descriptor.clone());
                    diff_ids.push(d.diff_id.clone().unwrap_or_else(|| old_id.clone()));
                }
                None => {
                    let mut kept = l.clone();
                    kept.media_type = oci::oci_layer_type(&l.media_type)
                        .unwrap_or(OCI_FOREIGN)
                        .to_string();
                    layers.push(kept);
                    diff_ids.push(old_id.clone());
                }
            }
        }
        let config = Bytes::from(oci::with_diff_ids(&img.config, &diff_ids)?);
        let config_desc = Descriptor {
            media_type: OCI_CONFIG.to_string(),
            digest: Digest::sha256_of(&config),
            size: config.len() as u64,
            annotations: BTreeMap::new(),
            urls: Vec::new(),
            platform: None,
        };
        dest.put_blob(
            &config_desc.digest,
            config_desc.size,
            &BlobSource::Bytes(config.clone()),
            false,
        )?;
        let manifest = Bytes::from(oci::to_json(&oci::Manifest {
            schema_version: 2,
            media_type: OCI_MANIFEST,
            config: &config_desc,
            layers: &layers,
            annotations: &img.manifest.annotations,
        })?);
        let digest = if single {
            dest.tag(false, &manifest)?
        } else {
            dest.put_manifest(OCI_MANIFEST, &manifest)?
        };
        if let Some(e) = &img.entry {
            entries.push(Descriptor {
                media_type: OCI_MANIFEST.to_string(),
                digest: digest.clone(),
                size: manifest.len() as u64,
                annotations: e.annotations.clone(),
                urls: Vec::new(),
                platform: e.platform.clone(),
            });
        }
        images.push(ImageSummary {
            platform: img
                .entry
                .as_ref()
                .and_then(|e| e.platform.as_ref())
                .map(Platform::to_string),
            source_digest: img.digest.to_string(),
            digest: digest.to_string(),
            config_digest: config_desc.digest.to_string(),
            layers: layers.iter().map(|l| l.digest.to_string()).collect(),
        });
    }
    match &tree.index {
        Some(index) => {
            let bytes = Bytes::from(oci::to_json(&oci::Index {
                schema_version: 2,
                media_type: OCI_INDEX,
                manifests: &entries,
                annotations: &index.annotations,
            })?);
            let top = dest.tag(true, &bytes)?;
            Ok((top, OCI_INDEX, images))
        }
        None => {
            let top = images
                .first()
                .and_then(|i| Digest::parse(&i.digest).ok())
                .ok_or_else(|| Error::InvalidArgument("no image was written".into()))?;
            Ok((top, OCI_MANIFEST, images))
        }
    }
}
