//! The blob handle: ranged reads of one blob, shared by every reader of a layer.
//!
//! Batches go out as one multi-range request when the server supports it; a server
//! that answers 400/416/501 or a whole 200 body is remembered as single-range only
//! and the batch is re-issued as concurrent single-range requests. Redirect targets
//! (object storage) are cached and re-resolved on 403 or expiry. Every response is
//! checked: a part whose `Content-Range` or length does not match is an error and is
//! retried, never returned.

use std::{
    fmt,
    ops::Range,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use reqwest::{
    Method, StatusCode, Url,
    header::{CONTENT_TYPE, HeaderMap, HeaderValue, RANGE},
};
use tokio::{runtime::Handle, task::JoinSet};
use tracing::{debug, warn};

use crate::{
    error::{Error, ErrorKind, Result, Target},
    hosts::Host,
    multipart,
    reference::Digest,
    stats::{Counters, Stats},
    transport::{Attempt, Failure, Transport, read_body, status_failure},
};

/// A cached redirect target is used at most this long before asking the registry
/// again (signed URLs expire; most last 10-20 minutes).
const REDIRECT_TTL: Duration = Duration::from_secs(5 * 60);
/// Ranges per multi-range request; keeps the `Range` header a reasonable size.
const MAX_RANGES_PER_REQUEST: usize = 32;
/// A server that ignores `Range` is tolerated for blobs up to this size (the whole
/// body is fetched and verified against the digest); larger ones fail.
const WHOLE_BODY_LIMIT: u64 = 32 << 20;

/// A handle to one blob in one repository. Clone it freely: clones share the
/// redirect cache, the multi-range verdict and counters.
#[derive(Clone)]
pub struct Blob {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Arc<Transport>,
    target: Target,
    repository: String,
    digest: Digest,
    size: u64,
    hosts: Vec<Host>,
    redirect: Mutex<Option<Redirect>>,
    /// The whole blob, once a server that ignores `Range` sent it and it verified;
    /// later reads are served from it instead of downloading it again.
    whole: Mutex<Option<Bytes>>,
    multi_range: AtomicBool,
    counters: Counters,
}

#[derive(Clone)]
struct Redirect {
    host: Url,
    url: Url,
    expires: Instant,
}

/// What one fetch returned: parts `(offset, data)` covering the requested ranges, or
/// the news that the server cannot do multi-range.
enum Fetched {
    Parts(Vec<(u64, Bytes)>),
    NoMultiRange(String),
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blob")
            .field("registry", &self.inner.target.registry)
            .field("repository", &self.inner.repository)
            .field("digest", &self.inner.digest)
            .field("size", &self.inner.size)
            .finish()
    }
}

fn describe(ranges: &[Range<u64>]) -> String {
    let mut s = if ranges.len() == 1 {
        "range "
    } else {
        "ranges "
    }
    .to_string();
    for (i, r) in ranges.iter().take(3).enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!("{}-{}", r.start, r.end.saturating_sub(1)));
    }
    if ranges.len() > 3 {
        s.push_str(&format!(" (+{} more)", ranges.len() - 3));
    }
    s
}

fn range_header(ranges: &[Range<u64>]) -> Result<HeaderValue, Failure> {
    let parts: Vec<String> = ranges
        .iter()
        .map(|r| format!("{}-{}", r.start, r.end - 1))
        .collect();
    HeaderValue::from_str(&format!("bytes={}", parts.join(",")))
        .map_err(|_| Failure::fatal(ErrorKind::InvalidInput, "unencodable Range header"))
}

/// Sorts and merges overlapping or touching ranges.
fn merge(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges.iter().filter(|r| r.start < r.end).cloned().collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Takes `want` out of `parts`; `None` if no part covers it.
fn slice_from(parts: &[(u64, Bytes)], want: &Range<u64>) -> Option<Bytes> {
    parts.iter().find_map(|(off, data)| {
        let end = off + data.len() as u64;
        (*off <= want.start && want.end <= end)
            .then(|| data.slice((want.start - off) as usize..(want.end - off) as usize))
    })
}

impl Blob {
    pub(crate) fn new(
        transport: Arc<Transport>,
        registry: &str,
        repository: &str,
        digest: Digest,
        size: u64,
        hosts: Vec<Host>,
    ) -> Self {
        let multi = transport.config.multi_range;
        Blob {
            inner: Arc::new(Inner {
                target: Target {
                    registry: registry.to_string(),
                    repository: repository.to_string(),
                    object: format!("blob {digest}"),
                },
                transport,
                repository: repository.to_string(),
                digest,
                size,
                hosts,
                redirect: Mutex::new(None),
                whole: Mutex::new(None),
                multi_range: AtomicBool::new(multi),
                counters: Counters::default(),
            }),
        }
    }

    /// Size of the blob in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The blob's digest.
    pub fn digest(&self) -> &Digest {
        &self.inner.digest
    }

    /// Registry host the blob is read from (as named in the reference).
    pub fn registry(&self) -> &str {
        &self.inner.target.registry
    }

    /// Repository the blob is read from.
    pub fn repository(&self) -> &str {
        &self.inner.repository
    }

    /// Requests and bytes of this blob (all clones).
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// Whether batched reads still use multi-range requests (false once the server
    /// has shown it cannot).
    pub fn uses_multi_range(&self) -> bool {
        self.inner.multi_range.load(Relaxed)
    }

    /// Reads `len` bytes at `offset`. Fails if the range goes past the end.
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| self.out_of_bounds(offset, u64::MAX))?;
        let mut v = self
            .read_ranges(std::slice::from_ref(&(offset..end)))
            .await?;
        Ok(v.pop().unwrap_or_default())
    }

    /// Reads several ranges, in one multi-range request where the server supports it.
    /// Results are in the order of `ranges`; empty ranges give empty buffers.
    pub async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        for r in ranges {
            if r.start > r.end || r.end > self.inner.size {
                return Err(self.out_of_bounds(r.start, r.end));
            }
        }
        let whole = self
            .inner
            .whole
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(w) = whole {
            return Ok(ranges
                .iter()
                .map(|r| w.slice(r.start as usize..r.end as usize))
                .collect());
        }
        let merged = merge(ranges);
        let mut parts: Vec<(u64, Bytes)> = Vec::with_capacity(merged.len());
        if merged.len() == 1 || !self.uses_multi_range() {
            parts = self.fetch_singles(&merged).await?;
        } else {
            for batch in merged.chunks(MAX_RANGES_PER_REQUEST) {
                if !self.uses_multi_range() {
                    parts.extend(self.fetch_singles(batch).await?);
                    continue;
                }
                match self.fetch(batch.to_vec(), true).await? {
                    Fetched::Parts(p) => parts.extend(p),
                    Fetched::NoMultiRange(why) => {
                        warn!(registry = %self.inner.target.registry, digest = %self.inner.digest, reason = %why,
                            "server does not support multi-range requests; using single ranges");
                        self.inner.multi_range.store(false, Relaxed);
                        parts.extend(self.fetch_singles(batch).await?);
                    }
                }
            }
        }
        ranges
            .iter()
            .map(|r| {
                if r.start == r.end {
                    return Ok(Bytes::new());
                }
                slice_from(&parts, r).ok_or_else(|| {
                    self.inner.target.error(
                        ErrorKind::Protocol,
                        format!(
                            "{}: missing from the response",
                            describe(std::slice::from_ref(r))
                        ),
                    )
                })
            })
            .collect()
    }

    /// Blocking [`Blob::read_at`] for plain threads (FUSE workers). `handle` must belong
    /// to a multi-thread runtime (a current-thread runtime's driver would not run), and
    /// this must not be called from inside a runtime: that is refused with
    /// [`Error::Usage`] rather than deadlocking.
    pub fn read_at_blocking(&self, handle: &Handle, offset: u64, len: usize) -> Result<Bytes> {
        Self::check_blocking()?;
        handle.block_on(self.read_at(offset, len))
    }

    /// Blocking [`Blob::read_ranges`].
    pub fn read_ranges_blocking(
        &self,
        handle: &Handle,
        ranges: &[Range<u64>],
    ) -> Result<Vec<Bytes>> {
        Self::check_blocking()?;
        handle.block_on(self.read_ranges(ranges))
    }

    fn check_blocking() -> Result<()> {
        if Handle::try_current().is_ok() {
            return Err(Error::Usage(
                "blocking blob read called from inside a tokio runtime; use the async read".into(),
            ));
        }
        Ok(())
    }

    fn out_of_bounds(&self, start: u64, end: u64) -> Error {
        self.inner.target.error(
            ErrorKind::InvalidInput,
            format!(
                "range {start}..{end} is outside the blob (size {})",
                self.inner.size
            ),
        )
    }

    /// One request per range, concurrently (bounded by the per-host limit).
    async fn fetch_singles(&self, ranges: &[Range<u64>]) -> Result<Vec<(u64, Bytes)>> {
        if ranges.len() == 1 {
            return match self.fetch(ranges.to_vec(), false).await? {
                Fetched::Parts(p) => Ok(p),
                Fetched::NoMultiRange(m) => Err(self.inner.target.error(ErrorKind::Protocol, m)),
            };
        }
        let mut set = JoinSet::new();
        for (i, r) in ranges.iter().enumerate() {
            let me = self.clone();
            let r = r.clone();
            set.spawn(async move { (i, me.fetch(vec![r], false).await) });
        }
        let mut out = vec![Vec::new(); ranges.len()];
        while let Some(joined) = set.join_next().await {
            let (i, res) = joined.map_err(|e| Error::Usage(format!("read task failed: {e}")))?;
            match res? {
                Fetched::Parts(p) => out[i] = p,
                Fetched::NoMultiRange(m) => {
                    return Err(self.inner.target.error(ErrorKind::Protocol, m));
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    async fn fetch(&self, ranges: Vec<Range<u64>>, multi: bool) -> Result<Fetched> {
        let what = describe(&ranges);
        let inner = &*self.inner;
        let ranges = &ranges;
        inner
            .transport
            .run(
                &inner.target,
                &what,
                &inner.hosts,
                Some(&inner.counters),
                |a| async move { self.attempt(a, ranges, multi).await },
            )
            .await
    }

    fn cached_redirect(&self, host: &Host) -> Option<Url> {
        let guard = self
            .inner
            .redirect
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .filter(|r| r.host == host.base && r.expires > Instant::now())
            .map(|r| r.url.clone())
    }

    fn set_redirect(&self, host: &Host, url: Option<Url>) {
        let mut guard = self
            .inner
            .redirect
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *guard = url.map(|url| Redirect {
            host: host.base.clone(),
            url,
            expires: Instant::now() + REDIRECT_TTL,
        });
    }

    async fn attempt(
        &self,
        a: Attempt,
        ranges: &[Range<u64>],
        multi: bool,
    ) -> Result<Fetched, Failure> {
        let inner = &*self.inner;
        let counters = [&inner.transport.counters, &inner.counters];
        let mut headers = HeaderMap::new();
        headers.insert(RANGE, range_header(ranges)?);
        let (resp, via_redirect) = match self.cached_redirect(&a.host) {
            Some(url) => (a.send_direct(url, &headers, &counters).await?, true),
            None => {
                let url = a.url(&inner.repository, "blobs", inner.digest.as_str())?;
                let (resp, redirected) = a.send(Method::GET, url, &headers, &counters).await?;
                let via = redirected.is_some();
                if redirected.is_some() {
                    self.set_redirect(&a.host, redirected);
                }
                (resp, via)
            }
        };
        let status = resp.status();
        if via_redirect
            && (status.is_redirection() || matches!(status.as_u16(), 400 | 401 | 403 | 404 | 410))
        {
            // Signed URLs expire with 403 (or 400 on some stores): ask the registry again.
            debug!(
                status = status.as_u16(),
                "redirect target refused; resolving again"
            );
            self.set_redirect(&a.host, None);
            return Err(Failure::retry(
                ErrorKind::Status,
                format!("redirect target answered {}", status.as_u16()),
            ));
        }
        let total_len: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let boundary = resp
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(multipart::boundary);
                let parts = if let Some(b) = boundary {
                    let limit = total_len + 4096 + 256 * ranges.len() as u64;
                    let body = read_body(resp, None, limit, &counters).await?;
                    multipart::parse(&body, &b, inner.size)
                        .map_err(|m| Failure::retry(ErrorKind::Protocol, m))?
                } else {
                    let cr = resp
                        .headers()
                        .get("content-range")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let cr = cr
                        .as_deref()
                        .and_then(multipart::parse_content_range)
                        .ok_or_else(|| {
                            Failure::retry(
                                ErrorKind::Protocol,
                                format!("206 with missing or invalid Content-Range {cr:?}"),
                            )
                        })?;
                    if cr.total.is_some_and(|t| t != inner.size) {
                        return Err(Failure::retry(
                            ErrorKind::Protocol,
                            format!(
                                "Content-Range total {} but the blob has {} bytes",
                                cr.total.unwrap_or(0),
                                inner.size
                            ),
                        ));
                    }
                    if !multi {
                        let want = &ranges[0];
                        if cr.first != want.start || cr.last + 1 != want.end {
                            return Err(Failure::retry(
                                ErrorKind::Protocol,
                                format!(
                                    "server sent Content-Range {}-{} instead",
                                    cr.first, cr.last
                                ),
                            ));
                        }
                    }
                    if cr.last >= inner.size {
                        return Err(Failure::retry(
                            ErrorKind::Protocol,
                            "Content-Range past the end of the blob",
                        ));
                    }
                    let len = cr.last - cr.first + 1;
                    let body = read_body(resp, Some(len), len, &counters).await?;
                    vec![(cr.first, body)]
                };
                for r in ranges {
                    if slice_from(&parts, r).is_none() {
                        return Err(Failure::retry(
                            ErrorKind::Protocol,
                            format!("response lacks {}", describe(std::slice::from_ref(r))),
                        ));
                    }
                }
                Ok(Fetched::Parts(parts))
            }
            StatusCode::OK if multi => Ok(Fetched::NoMultiRange(
                "server answered 200 to a multi-range request".into(),
            )),
            StatusCode::OK => {
                // The server ignored Range. Take the whole blob only if it is small,
                // and only if it verifies.
                if inner.size > WHOLE_BODY_LIMIT {
                    return Err(Failure::fatal(
                        ErrorKind::Unsupported,
                        "server ignores Range requests (answered 200) and the blob is too large to fetch whole",
                    ));
                }
                let body = read_body(resp, Some(inner.size), inner.size, &counters).await?;
                if !inner.digest.matches(&body) {
                    return Err(Failure::retry(
                        ErrorKind::Protocol,
                        "server answered 200 with a body that does not match the digest",
                    ));
                }
                warn!(registry = %inner.target.registry, digest = %inner.digest,
                    "server ignores Range requests; keeping the whole blob in memory");
                *inner.whole.lock().unwrap_or_else(|p| p.into_inner()) = Some(body.clone());
                Ok(Fetched::Parts(vec![(0, body)]))
            }
            StatusCode::BAD_REQUEST
            | StatusCode::NOT_IMPLEMENTED
            | StatusCode::RANGE_NOT_SATISFIABLE
                if multi =>
            {
                Ok(Fetched::NoMultiRange(format!(
                    "server answered {} to a multi-range request",
                    status.as_u16()
                )))
            }
            StatusCode::RANGE_NOT_SATISFIABLE => Err(Failure::fatal(
                ErrorKind::InvalidInput,
                format!(
                    "server says the range is not satisfiable (416); blob size {}",
                    inner.size
                ),
            )),
            _ => Err(status_failure(&resp)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}

    #[test]
    fn handle_is_shareable() {
        assert_send_sync::<Blob>();
        assert_send_sync::<crate::RegistryClient>();
    }

    #[test]
    fn merges_overlapping_and_touching_ranges() {
        assert_eq!(
            merge(&[10..20, 0..5, 5..7, 15..30, 40..40, 50..60]),
            vec![0..7, 10..30, 50..60]
        );
        assert!(merge(std::slice::from_ref(&(3..3))).is_empty());
    }

    #[test]
    fn slices_only_fully_covered_ranges() {
        let parts = vec![(10u64, Bytes::from_static(b"abcdef"))];
        assert_eq!(
            slice_from(&parts, &(11..13)),
            Some(Bytes::from_static(b"bc"))
        );
        assert_eq!(
            slice_from(&parts, &(10..16)),
            Some(Bytes::from_static(b"abcdef"))
        );
        assert_eq!(slice_from(&parts, &(9..12)), None);
        assert_eq!(slice_from(&parts, &(15..17)), None);
    }

    #[test]
    fn describes_ranges_inclusively() {
        assert_eq!(describe(std::slice::from_ref(&(0..100))), "range 0-99");
        assert_eq!(
            describe(&[0..1, 5..6, 9..10, 20..30]),
            "ranges 0-0,5-5,9-9 (+1 more)"
        );
    }
}
