//! The registry client: manifests, configs and blob handles.

use std::sync::Arc;

use bytes::Bytes;
use reqwest::{
    Method, StatusCode,
    header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue},
};

use crate::{
    blob::Blob,
    config::RegistryConfig,
    error::{ErrorKind, Result, Target},
    hosts::{self, Host},
    manifest::{self, Descriptor, ImageIndex, ImageManifest, Platform, media_types},
    reference::{Digest, Reference},
    stats::Stats,
    transport::{Failure, Transport, read_body, status_failure},
};

/// Manifests and configs larger than this are refused (they are JSON documents).
const MAX_MANIFEST: u64 = 4 << 20;
/// Largest config blob accepted.
const MAX_CONFIG: u64 = 16 << 20;

/// A client for OCI registries. Cheap to clone; clones share connections, tokens,
/// concurrency limits and counters.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    pub(crate) transport: Arc<Transport>,
}

/// A resolved image: the platform manifest, its config, and the layer descriptors
/// (with annotations) in order from the base layer up.
#[derive(Debug, Clone)]
pub struct Image {
    /// The reference, pinned to the platform manifest's digest.
    pub reference: Reference,
    /// Digest of the platform manifest.
    pub manifest_digest: Digest,
    /// Digest of the index the manifest was chosen from, if the reference named one.
    pub index_digest: Option<Digest>,
    /// That index's exact bytes and media type (a puller stores them too).
    pub index: Option<(String, Bytes)>,
    /// Media type of the manifest (OCI or Docker).
    pub media_type: String,
    /// The manifest's exact bytes.
    pub manifest: Bytes,
    /// Manifest annotations.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The config descriptor.
    pub config_descriptor: Descriptor,
    /// The config blob (verified against its digest).
    pub config: Bytes,
    /// Layer descriptors, base first.
    pub layers: Vec<Descriptor>,
}

/// A manifest or index exactly as the registry sent it (digest verified).
#[derive(Debug, Clone)]
pub struct Document {
    /// The document's bytes.
    pub bytes: Bytes,
    /// Its media type, from `Content-Type` (empty if the registry sent none).
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
}

impl RegistryClient {
    /// A client with `config`. Nothing is contacted until a request is made.
    pub fn new(config: RegistryConfig) -> Self {
        RegistryClient {
            transport: Arc::new(Transport::new(config)),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &RegistryConfig {
        &self.transport.config
    }

    /// Requests, bytes, retries and failures of everything this client did.
    pub fn stats(&self) -> Stats {
        self.transport.counters.snapshot()
    }

    /// The hosts tried for `registry`, mirrors first (from `hosts.toml`).
    pub fn hosts(&self, registry: &str) -> Result<Vec<Host>> {
        hosts::hosts_for(&self.transport.config.certs_dir, registry)
    }

    /// Resolves `reference` to the image for the platform this process runs on.
    pub async fn resolve(&self, reference: &Reference) -> Result<Image> {
        self.resolve_for(reference, &Platform::host()).await
    }

    /// Resolves `reference` to the image for `platform`: follows an index or manifest
    /// list to the matching manifest, then fetches and verifies the config.
    pub async fn resolve_for(&self, reference: &Reference, platform: &Platform) -> Result<Image> {
        let first = self.fetch_document(reference).await?;
        let target = |object: String| Target {
            registry: reference.registry().to_string(),
            repository: reference.repository().to_string(),
            object,
        };
        let value: serde_json::Value = serde_json::from_slice(&first.bytes).map_err(|e| {
            target(format!("manifest {}", reference.manifest_ref()))
                .error(ErrorKind::Protocol, format!("not JSON: {e}"))
        })?;
        let (doc, index_digest, index) = if manifest::is_index(&first.media_type, &value) {
            let index: ImageIndex = serde_json::from_value(value).map_err(|e| {
                target(format!("index {}", first.digest))
                    .error(ErrorKind::Protocol, format!("malformed index: {e}"))
            })?;
            let entry = manifest::select_platform(&index, platform).ok_or_else(|| {
                let available: Vec<String> = index
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                    .collect();
                target(format!("index {}", first.digest)).error(
                    ErrorKind::NotFound,
                    format!(
                        "no manifest for platform {platform} (available: {})",
                        available.join(", ")
                    ),
                )
            })?;
            let doc = self
                .fetch_document(&reference.with_digest(entry.digest.clone()))
                .await?;
            (
                doc,
                Some(first.digest),
                Some((first.media_type, first.bytes)),
            )
        } else {
            (first, None, None)
        };
        let mtarget = target(format!("manifest {}", doc.digest));
        let m: ImageManifest = serde_json::from_slice(&doc.bytes).map_err(|e| {
            mtarget.error(
                ErrorKind::Protocol,
                format!("malformed image manifest: {e}"),
            )
        })?;
        if m.schema_version != 2 {
            return Err(mtarget.error(
                ErrorKind::Unsupported,
                format!("schema version {} (only 2 is supported)", m.schema_version),
            ));
        }
        let media_type = m.media_type.clone().unwrap_or(doc.media_type);
        let pinned = reference.with_digest(doc.digest.clone());
        let config = self.fetch_blob(&pinned, &m.config, MAX_CONFIG).await?;
        Ok(Image {
            reference: pinned,
            manifest_digest: doc.digest,
            index_digest,
            index,
            media_type,
            manifest: doc.bytes,
            annotations: m.annotations,
            config_descriptor: m.config,
            config,
            layers: m.layers,
        })
    }

    /// Fetches the manifest or index `reference` names as it is, without following an
    /// index to a platform (converters and copiers need every platform).
    pub async fn fetch_manifest(&self, reference: &Reference) -> Result<Document> {
        self.fetch_document(reference).await
    }

    /// Fetches the manifest or index `reference` names and checks its digest (against
    /// the pinned digest, else the registry's `Docker-Content-Digest`).
    async fn fetch_document(&self, reference: &Reference) -> Result<Document> {
        let by_digest = reference.digest().is_some();
        let hosts: Vec<Host> = self
            .hosts(reference.registry())?
            .into_iter()
            .filter(|h| {
                if by_digest {
                    h.capabilities.pull
                } else {
                    h.capabilities.resolve
                }
            })
            .collect();
        let target = Target {
            registry: reference.registry().to_string(),
            repository: reference.repository().to_string(),
            object: format!("manifest {}", reference.manifest_ref()),
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static(media_types::ACCEPT_MANIFESTS),
        );
        let counters = [&self.transport.counters];
        self.transport
            .run(&target, "", &hosts, None, |a| {
                let headers = &headers;
                let counters = &counters;
                async move {
                    let url = a.url(
                        reference.repository(),
                        "manifests",
                        reference.manifest_ref(),
                    )?;
                    let (resp, _) = a.send(Method::GET, url, headers, counters).await?;
                    if resp.status() != StatusCode::OK {
                        return Err(status_failure(&resp));
                    }
                    let media_type = resp
                        .headers()
                        .get(CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
                        .unwrap_or_default();
                    let header_digest = resp
                        .headers()
                        .get("docker-content-digest")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| Digest::parse(v.trim()).ok());
                    let bytes = read_body(resp, None, MAX_MANIFEST, counters).await?;
                    let digest = match (reference.digest(), header_digest) {
                        (Some(d), _) => d.clone(),
                        (None, Some(d)) => d,
                        (None, None) => Digest::sha256_of(&bytes),
                    };
                    if !digest.matches(&bytes) {
                        return Err(Failure::retry(
                            ErrorKind::Protocol,
                            format!("manifest content does not match digest {digest}"),
                        ));
                    }
                    Ok(Document {
                        bytes,
                        media_type,
                        digest,
                    })
                }
            })
            .await
    }

    /// Fetches a whole (small) blob such as a config and verifies its digest.
    pub async fn fetch_blob(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
        limit: u64,
    ) -> Result<Bytes> {
        let target = Target {
            registry: reference.registry().to_string(),
            repository: reference.repository().to_string(),
            object: format!("blob {}", descriptor.digest),
        };
        if descriptor.size > limit {
            return Err(target.error(
                ErrorKind::InvalidInput,
                format!(
                    "size {} exceeds the limit of {limit} bytes for a whole fetch",
                    descriptor.size
                ),
            ));
        }
        let hosts: Vec<Host> = self
            .hosts(reference.registry())?
            .into_iter()
            .filter(|h| h.capabilities.pull)
            .collect();
        let counters = [&self.transport.counters];
        let headers = HeaderMap::new();
        self.transport
            .run(&target, "", &hosts, None, |a| {
                let headers = &headers;
                let counters = &counters;
                async move {
                    let url = a.url(reference.repository(), "blobs", descriptor.digest.as_str())?;
                    let (resp, _) = a.send(Method::GET, url, headers, counters).await?;
                    if resp.status() != StatusCode::OK {
                        return Err(status_failure(&resp));
                    }
                    let bytes = read_body(resp, Some(descriptor.size), limit, counters).await?;
                    if !descriptor.digest.matches(&bytes) {
                        return Err(Failure::retry(
                            ErrorKind::Protocol,
                            "content does not match its digest",
                        ));
                    }
                    Ok(bytes)
                }
            })
            .await
    }

    /// A handle for ranged reads of the blob `descriptor` names, in `reference`'s
    /// repository. No request is made until the first read.
    pub fn blob(&self, reference: &Reference, descriptor: &Descriptor) -> Result<Blob> {
        let hosts: Vec<Host> = self
            .hosts(reference.registry())?
            .into_iter()
            .filter(|h| h.capabilities.pull)
            .collect();
        Ok(Blob::new(
            self.transport.clone(),
            reference.registry(),
            reference.repository(),
            descriptor.digest.clone(),
            descriptor.size,
            hosts,
        ))
    }

    /// A handle for the blob `digest` when only its digest is known: asks the registry
    /// for its size first (`HEAD`).
    pub async fn open_blob(&self, reference: &Reference, digest: &Digest) -> Result<Blob> {
        let target = Target {
            registry: reference.registry().to_string(),
            repository: reference.repository().to_string(),
            object: format!("blob {digest}"),
        };
        let hosts: Vec<Host> = self
            .hosts(reference.registry())?
            .into_iter()
            .filter(|h| h.capabilities.pull)
            .collect();
        let counters = [&self.transport.counters];
        let headers = HeaderMap::new();
        let size = self
            .transport
            .run(&target, "", &hosts, None, |a| {
                let headers = &headers;
                let counters = &counters;
                async move {
                    let url = a.url(reference.repository(), "blobs", digest.as_str())?;
                    let (resp, _) = a.send(Method::HEAD, url, headers, counters).await?;
                    if resp.status() != StatusCode::OK {
                        return Err(status_failure(&resp));
                    }
                    resp.headers()
                        .get(reqwest::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| {
                            Failure::retry(
                                ErrorKind::Protocol,
                                "HEAD answer without Content-Length",
                            )
                        })
                }
            })
            .await?;
        let descriptor = Descriptor {
            media_type: String::new(),
            digest: digest.clone(),
            size,
            annotations: Default::default(),
            urls: Vec::new(),
            platform: None,
        };
        self.blob(reference, &descriptor)
    }
}
