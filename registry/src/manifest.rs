//! Manifests, indexes and descriptors, OCI and Docker schema 2 alike.
//!
//! Own small serde types rather than oci-spec's: Docker media types would parse as
//! `Other` there, and we want the descriptor annotations (`containerd.io/snapshot/
//! stargz/toc.digest`, …) and the exact manifest bytes untouched.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::reference::Digest;

/// Media types this crate understands.
pub mod media_types {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// Docker schema 2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// The `Accept` header for manifest requests.
    pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
}

/// A content descriptor: what a manifest says about a layer, config or sub-manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type, e.g. `application/vnd.oci.image.layer.v1.tar+gzip`.
    #[serde(default)]
    pub media_type: String,
    /// Digest of the content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Annotations, e.g. the eStargz TOC digest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Alternative locations (foreign layers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Platform, for entries of an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// An image platform, as in index entries and image configs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture, Go naming (`amd64`, `arm64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant (`v8`, `v7`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// OS version (Windows).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
}

impl Platform {
    /// The platform this process runs on, in OCI (Go) naming.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            other => (other, None),
        };
        Platform {
            architecture: architecture.to_string(),
            os: std::env::consts::OS.to_string(),
            variant: variant.map(str::to_string),
            os_version: None,
        }
    }

    /// Whether an index entry for `other` can run here. A missing variant on either
    /// side matches (arm64 images rarely set `v8`).
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && match (&self.variant, &other.variant) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ImageManifest {
    #[serde(default)]
    pub(crate) schema_version: u32,
    #[serde(default)]
    pub(crate) media_type: Option<String>,
    pub(crate) config: Descriptor,
    #[serde(default)]
    pub(crate) layers: Vec<Descriptor>,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
}

/// An image index or Docker manifest list.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ImageIndex {
    #[serde(default)]
    pub(crate) manifests: Vec<Descriptor>,
}

/// Picks the index entry for `platform`: the first exact match (variant included),
/// else the first compatible one.
pub(crate) fn select_platform<'a>(
    index: &'a ImageIndex,
    platform: &Platform,
) -> Option<&'a Descriptor> {
    let candidates = || {
        index
            .manifests
            .iter()
            .filter(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
    };
    candidates()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.variant == platform.variant)
        })
        .or_else(|| candidates().next())
}

/// Whether `media_type` (or a document without one, sniffed by its fields) is an index.
pub(crate) fn is_index(media_type: &str, body: &serde_json::Value) -> bool {
    match media_type {
        media_types::OCI_INDEX | media_types::DOCKER_MANIFEST_LIST => true,
        media_types::OCI_MANIFEST | media_types::DOCKER_MANIFEST => false,
        _ => body.get("manifests").is_some() && body.get("layers").is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_platform_from_docker_list() {
        let list = r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[
          {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1,"platform":{"architecture":"arm","os":"linux","variant":"v6"}},
          {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":2,"platform":{"architecture":"arm","os":"linux","variant":"v7"}},
          {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","size":3,"platform":{"architecture":"arm64","os":"linux"}}
        ]}"#;
        let idx: ImageIndex = serde_json::from_str(list).unwrap();
        let v7 = Platform {
            architecture: "arm".into(),
            os: "linux".into(),
            variant: Some("v7".into()),
            os_version: None,
        };
        assert_eq!(select_platform(&idx, &v7).map(|d| d.size), Some(2));
        let arm64 = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: Some("v8".into()),
            os_version: None,
        };
        assert_eq!(select_platform(&idx, &arm64).map(|d| d.size), Some(3));
        let s390 = Platform {
            architecture: "s390x".into(),
            ..arm64
        };
        assert!(select_platform(&idx, &s390).is_none());
        let v: serde_json::Value = serde_json::from_str(list).unwrap();
        assert!(is_index("", &v));
    }
}
