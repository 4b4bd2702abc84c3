//! Image documents: the manifests, indexes and configs a conversion reads (OCI and
//! Docker schema 2 alike) and the OCI ones it writes. Written documents are plain
//! `serde_json` output of fixed structures, so the same input gives the same bytes.

use std::collections::BTreeMap;

use lazysnap_registry::Descriptor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Media types a conversion reads and writes.
pub mod media_types {
    pub use lazysnap_registry::media_types::{
        DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST,
    };
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// OCI layers.
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// OCI non-distributable (foreign) layers, which are never fetched or converted.
    pub const OCI_FOREIGN: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
    pub const OCI_FOREIGN_GZIP: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
    pub const OCI_FOREIGN_ZSTD: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
}

use media_types::*;

/// An image manifest as read (OCI or Docker schema 2).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SourceManifest {
    #[serde(default)]
    pub schema_version: u32,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// An image index or Docker manifest list as read.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SourceIndex {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image manifest as written.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest<'a> {
    pub schema_version: u32,
    pub media_type: &'static str,
    pub config: &'a Descriptor,
    pub layers: &'a [Descriptor],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: &'a BTreeMap<String, String>,
}

/// An OCI image index as written.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Index<'a> {
    pub schema_version: u32,
    pub media_type: &'static str,
    pub manifests: &'a [Descriptor],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: &'a BTreeMap<String, String>,
}

/// Compact JSON of a document to write.
pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::InvalidArgument(format!("encoding JSON: {e}")))
}

/// The OCI spelling of a layer media type (Docker's, or OCI's own); `None` for what
/// is not a layer.
pub(crate) fn oci_layer_type(media_type: &str) -> Option<&'static str> {
    Some(match media_type {
        OCI_LAYER | "application/vnd.docker.image.rootfs.diff.tar" => OCI_LAYER,
        OCI_LAYER_GZIP | "application/vnd.docker.image.rootfs.diff.tar.gzip" => OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD | "application/vnd.docker.image.rootfs.diff.tar.zstd" => OCI_LAYER_ZSTD,
        OCI_FOREIGN => OCI_FOREIGN,
        OCI_FOREIGN_GZIP | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            OCI_FOREIGN_GZIP
        }
        OCI_FOREIGN_ZSTD => OCI_FOREIGN_ZSTD,
        _ => return None,
    })
}

/// Whether a layer is non-distributable: it lives elsewhere (`urls`) and is kept as is.
pub(crate) fn is_foreign(oci_type: &str) -> bool {
    matches!(oci_type, OCI_FOREIGN | OCI_FOREIGN_GZIP | OCI_FOREIGN_ZSTD)
}

/// Whether a config media type is an image config (not some artifact's).
pub(crate) fn is_image_config(media_type: &str) -> bool {
    matches!(media_type, OCI_CONFIG | DOCKER_CONFIG)
}

/// Whether a document is an index (by media type, or by shape when it has none).
pub(crate) fn is_index(media_type: &str, value: &serde_json::Value) -> bool {
    match media_type {
        OCI_INDEX | DOCKER_MANIFEST_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        _ => value.get("manifests").is_some() && value.get("layers").is_none(),
    }
}

/// The parts of an image config a conversion uses.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ImageConfig {
    #[serde(default)]
    pub rootfs: RootFs,
    #[serde(default)]
    pub config: RunConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// How the image runs (for `--optimize`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RunConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
}

/// The config with `rootfs.diff_ids` replaced; the original bytes when nothing
/// changes (so an image whose layers all pass through keeps its config digest).
pub(crate) fn with_diff_ids(config: &[u8], diff_ids: &[String]) -> Result<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(config)
        .map_err(|e| Error::InvalidArgument(format!("image config is not JSON: {e}")))?;
    let new = serde_json::Value::from(diff_ids.to_vec());
    if v.pointer("/rootfs/diff_ids") == Some(&new) {
        return Ok(config.to_vec());
    }
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Error::InvalidArgument("image config is not a JSON object".into()))?;
    let rootfs = obj
        .entry("rootfs")
        .or_insert_with(|| serde_json::json!({"type": "layers"}));
    match rootfs.as_object_mut() {
        Some(r) => {
            r.insert("diff_ids".into(), new);
        }
        None => {
            return Err(Error::InvalidArgument(
                "image config: rootfs is not an object".into(),
            ));
        }
    }
    to_json(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_diff_ids_only_when_they_change() {
        let cfg = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:a"]},"config":{"Env":["A=1"]}}"#;
        assert_eq!(
            with_diff_ids(cfg, &["sha256:a".into()]).unwrap(),
            cfg.to_vec()
        );
        let out = with_diff_ids(cfg, &["sha256:b".into(), "sha256:c".into()]).unwrap();
        let parsed: ImageConfig = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed.rootfs.diff_ids, ["sha256:b", "sha256:c"]);
        assert_eq!(parsed.config.env.unwrap(), ["A=1"]);
        assert_eq!(
            out,
            with_diff_ids(cfg, &["sha256:b".into(), "sha256:c".into()]).unwrap()
        );
        assert!(with_diff_ids(b"[1]", &[]).is_err());
    }

    #[test]
    fn maps_layer_media_types() {
        assert_eq!(
            oci_layer_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(OCI_LAYER_GZIP)
        );
        assert_eq!(oci_layer_type(OCI_LAYER), Some(OCI_LAYER));
        assert_eq!(
            oci_layer_type("application/vnd.cncf.helm.chart.content.v1.tar+gzip"),
            None
        );
        assert!(is_foreign(
            oci_layer_type("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip").unwrap()
        ));
    }
}
