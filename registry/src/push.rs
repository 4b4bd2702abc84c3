//! Pushing to a registry: existence checks, cross-repository mounts, uploads (one PUT
//! for small blobs, PATCH chunks for large ones) and manifests.
//!
//! Callers push every blob before the manifests that name them, and the tagged
//! document last, so that a failed push never leaves a tag pointing at content the
//! registry does not have. Every request goes through the transport's retries and
//! authentication, with tokens scoped `pull,push` (plus `pull` on a mount's source).

use std::{io, os::unix::fs::FileExt, path::PathBuf};

use bytes::Bytes;
use reqwest::{
    Method, Response, StatusCode, Url,
    header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue},
};
use serde::Deserialize;
use tracing::debug;

use crate::{
    client::RegistryClient,
    error::{ErrorKind, Result, Target},
    hosts::Host,
    reference::{Digest, Reference},
    transport::{Attempt, Failure, Scope, location, send_counted, status_failure},
};

/// Blobs up to this size are uploaded in one PUT; larger ones in chunks.
pub const MONOLITHIC_LIMIT: u64 = 32 << 20;
/// Bytes per PATCH of a chunked upload.
pub const UPLOAD_CHUNK: u64 = 16 << 20;
/// Of an error answer, this much is read for its message.
const ERROR_BODY_LIMIT: usize = 16 << 10;

/// Where the bytes of a blob to push come from.
#[derive(Debug, Clone)]
pub enum BlobSource {
    /// Bytes in memory.
    Bytes(Bytes),
    /// A local file, read one upload chunk at a time.
    File(PathBuf),
}

impl BlobSource {
    async fn read(&self, offset: u64, len: u64) -> io::Result<Bytes> {
        match self {
            BlobSource::Bytes(b) => {
                let end = offset.saturating_add(len);
                if end > b.len() as u64 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("blob has {} bytes, {end} wanted", b.len()),
                    ));
                }
                Ok(b.slice(offset as usize..end as usize))
            }
            BlobSource::File(path) => {
                let path = path.clone();
                let len = usize::try_from(len).map_err(io::Error::other)?;
                tokio::task::spawn_blocking(move || {
                    let f = std::fs::File::open(&path)?;
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, offset)?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(io::Error::other)?
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            BlobSource::Bytes(_) => "blob in memory".into(),
            BlobSource::File(p) => p.display().to_string(),
        }
    }
}

/// How a pushed blob got into the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The repository had it already.
    Exists,
    /// Mounted from another repository of the same registry; no bytes sent.
    Mounted,
    /// Uploaded.
    Uploaded,
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Sends to the registry or to an upload location it named; credentials and host
/// headers go only to the host itself.
async fn send_to(
    a: &Attempt,
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Bytes,
    client: &RegistryClient,
) -> Result<Response, Failure> {
    let mut req = a
        .client
        .request(method, url.clone())
        .timeout(a.timeout)
        .headers(headers)
        .header(CONTENT_LENGTH, body.len())
        .body(body);
    if same_origin(&url, &a.host.base) {
        for (k, v) in &a.host.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(h) = &a.auth {
            req = req.header(AUTHORIZATION, h.clone());
        }
    }
    send_counted(req, &[&client.transport.counters]).await
}

/// The registry's own words for a refusal (`{"errors":[{"code","message"}]}`),
/// shortened; empty when the body says nothing useful.
async fn error_detail(mut resp: Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < ERROR_BODY_LIMIT {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            _ => break,
        }
    }
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<Item>,
    }
    #[derive(Deserialize)]
    struct Item {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let text = match serde_json::from_slice::<Errors>(&buf) {
        Ok(e) => e
            .errors
            .iter()
            .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
                (false, false) => format!("{}: {}", e.code, e.message),
                (false, true) => e.code.clone(),
                _ => e.message.clone(),
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => String::from_utf8_lossy(&buf).into_owned(),
    };
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    one_line.trim().to_string()
}

/// Classifies an unexpected answer like any other request, with the registry's
/// explanation appended.
async fn refusal(resp: Response) -> Failure {
    let failure = status_failure(&resp);
    let add = |message: String, detail: &str| {
        if detail.is_empty() {
            message
        } else {
            format!("{message}: {detail}")
        }
    };
    match failure {
        Failure::Fatal { kind, message } => {
            let detail = error_detail(resp).await;
            Failure::Fatal {
                kind,
                message: add(message, &detail),
            }
        }
        Failure::Retry {
            kind,
            message,
            after,
        } => {
            let detail = error_detail(resp).await;
            Failure::Retry {
                kind,
                message: add(message, &detail),
                after,
            }
        }
        other => other,
    }
}

fn octet_stream() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h
}

impl RegistryClient {
    fn push_hosts(&self, reference: &Reference) -> Result<Vec<Host>> {
        Ok(self
            .hosts(reference.registry())?
            .into_iter()
            .filter(|h| h.capabilities.push)
            .collect())
    }

    fn push_target(reference: &Reference, object: String) -> Target {
        Target {
            registry: reference.registry().to_string(),
            repository: reference.repository().to_string(),
            object,
        }
    }

    /// The size of blob `digest` if `reference`'s repository has it (`HEAD`).
    pub async fn blob_exists(&self, reference: &Reference, digest: &Digest) -> Result<Option<u64>> {
        let target = Self::push_target(reference, format!("blob {digest}"));
        let hosts = self.push_hosts(reference)?;
        let scope = Scope::push(reference.repository(), None);
        let counters = [&self.transport.counters];
        let headers = HeaderMap::new();
        self.transport
            .run_scoped(&target, "", &hosts, None, &scope, |a| {
                let (headers, counters) = (&headers, &counters);
                async move {
                    let url = a.url(reference.repository(), "blobs", digest.as_str())?;
                    let (resp, _) = a.send(Method::HEAD, url, headers, counters).await?;
                    match resp.status() {
                        // a HEAD answer has no body: its size is the header's
                        StatusCode::OK => Ok(Some(
                            resp.headers()
                                .get(CONTENT_LENGTH)
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0),
                        )),
                        StatusCode::NOT_FOUND => Ok(None),
                        _ => Err(status_failure(&resp)),
                    }
                }
            })
            .await
    }

    /// Asks the registry to mount blob `digest` from repository `from` (same
    /// registry) into `reference`'s repository. `false` when it would not (the
    /// source lacks the blob, or mounting is unsupported); the caller uploads then.
    pub async fn mount_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        from: &str,
    ) -> Result<bool> {
        let target = Self::push_target(reference, format!("blob {digest} (mount from {from})"));
        let hosts = self.push_hosts(reference)?;
        let scope = Scope::push(reference.repository(), Some(from));
        self.transport
            .run_scoped(&target, "", &hosts, None, &scope, |a| async move {
                let mut url = a.url(reference.repository(), "blobs", "uploads/")?;
                url.query_pairs_mut()
                    .append_pair("mount", digest.as_str())
                    .append_pair("from", from);
                let resp = send_to(
                    &a,
                    Method::POST,
                    url.clone(),
                    HeaderMap::new(),
                    Bytes::new(),
                    self,
                )
                .await?;
                match resp.status() {
                    StatusCode::CREATED => Ok(true),
                    StatusCode::ACCEPTED => {
                        // an upload session was opened instead: close it, the caller
                        // uploads in its own
                        if let Ok(loc) = location(&resp, &url, "upload answer") {
                            let _ = send_to(
                                &a,
                                Method::DELETE,
                                loc,
                                HeaderMap::new(),
                                Bytes::new(),
                                self,
                            )
                            .await;
                        }
                        Ok(false)
                    }
                    _ => Err(refusal(resp).await),
                }
            })
            .await
    }

    /// Uploads `size` bytes of `source` as blob `digest`: in one PUT up to
    /// [`MONOLITHIC_LIMIT`] (unless `chunk` is given), else in PATCH chunks of `chunk`
    /// (default [`UPLOAD_CHUNK`]) bytes. A failure restarts the upload from the start;
    /// the registry checks the digest.
    pub async fn upload_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
        source: &BlobSource,
        chunk: Option<u64>,
    ) -> Result<()> {
        let target = Self::push_target(reference, format!("blob {digest}"));
        let hosts = self.push_hosts(reference)?;
        let scope = Scope::push(reference.repository(), None);
        let chunked = chunk.is_some() || size > MONOLITHIC_LIMIT;
        let step = chunk.unwrap_or(UPLOAD_CHUNK).max(1);
        let read = |offset: u64, len: u64| async move {
            source.read(offset, len).await.map_err(|e| {
                Failure::fatal(
                    ErrorKind::InvalidInput,
                    format!("reading {}: {e}", source.describe()),
                )
            })
        };
        self.transport
            .run_scoped(&target, "upload", &hosts, None, &scope, |a| async move {
                let start = a.url(reference.repository(), "blobs", "uploads/")?;
                let resp = send_to(
                    &a,
                    Method::POST,
                    start.clone(),
                    HeaderMap::new(),
                    Bytes::new(),
                    self,
                )
                .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(refusal(resp).await);
                }
                let mut loc = location(&resp, &start, "upload answer")?;
                let mut body = Bytes::new();
                if chunked {
                    let mut offset = 0u64;
                    while offset < size {
                        let n = step.min(size - offset);
                        let data = read(offset, n).await?;
                        let mut h = octet_stream();
                        let range = format!("{offset}-{}", offset + n - 1);
                        h.insert(
                            "content-range",
                            HeaderValue::from_str(&range).map_err(|_| {
                                Failure::fatal(ErrorKind::InvalidInput, "bad Content-Range")
                            })?,
                        );
                        let resp = send_to(&a, Method::PATCH, loc.clone(), h, data, self).await?;
                        if resp.status() != StatusCode::ACCEPTED {
                            return Err(refusal(resp).await);
                        }
                        loc = location(&resp, &loc, "upload answer")?;
                        offset += n;
                    }
                } else {
                    body = read(0, size).await?;
                }
                loc.query_pairs_mut().append_pair("digest", digest.as_str());
                let resp = send_to(&a, Method::PUT, loc, octet_stream(), body, self).await?;
                match resp.status() {
                    StatusCode::CREATED | StatusCode::NO_CONTENT | StatusCode::OK => Ok(()),
                    _ => Err(refusal(resp).await),
                }
            })
            .await
    }

    /// Makes blob `digest` (`size` bytes of `source`) present in `reference`'s
    /// repository: nothing if it is there, a mount from `mount_from` when that is
    /// another repository of the same registry, else an upload.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
        source: &BlobSource,
        mount_from: Option<&Reference>,
    ) -> Result<PushOutcome> {
        if self.blob_exists(reference, digest).await?.is_some() {
            return Ok(PushOutcome::Exists);
        }
        if let Some(from) = mount_from.filter(|f| {
            f.registry() == reference.registry() && f.repository() != reference.repository()
        }) {
            match self.mount_blob(reference, digest, from.repository()).await {
                Ok(true) => return Ok(PushOutcome::Mounted),
                Ok(false) => {}
                Err(e) => debug!(error = %e, "cross-repository mount failed; uploading"),
            }
        }
        self.upload_blob(reference, digest, size, source, None)
            .await?;
        Ok(PushOutcome::Uploaded)
    }

    /// Puts a manifest or index under `reference` (its tag, or its digest) with
    /// `media_type` as Content-Type; returns the document's digest.
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        media_type: &str,
        body: Bytes,
    ) -> Result<Digest> {
        let target = Self::push_target(reference, format!("manifest {}", reference.manifest_ref()));
        let hosts = self.push_hosts(reference)?;
        let scope = Scope::push(reference.repository(), None);
        let digest = Digest::sha256_of(&body);
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(media_type).map_err(|_| {
                target.error(
                    ErrorKind::InvalidInput,
                    format!("media type {media_type:?} is not a header value"),
                )
            })?,
        );
        let (headers, body, digest_ref) = (&headers, &body, &digest);
        self.transport
            .run_scoped(&target, "", &hosts, None, &scope, |a| async move {
                let url = a.url(
                    reference.repository(),
                    "manifests",
                    reference.manifest_ref(),
                )?;
                let resp =
                    send_to(&a, Method::PUT, url, headers.clone(), body.clone(), self).await?;
                if !matches!(resp.status(), StatusCode::CREATED | StatusCode::OK) {
                    return Err(refusal(resp).await);
                }
                let said = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(|v| v.trim().to_string());
                match said {
                    Some(d) if d != digest_ref.as_str() => Err(Failure::fatal(
                        ErrorKind::Protocol,
                        format!("registry stored the manifest as {d}, expected {digest_ref}"),
                    )),
                    _ => Ok(()),
                }
            })
            .await?;
        Ok(digest)
    }
}
