//! The HTTP layer shared by manifests and blobs: one reqwest client per TLS setup,
//! per-host concurrency limits, authentication state per (host, [`Scope`]), and the
//! retry loop (jittered exponential back-off, `Retry-After`, re-authentication on 401,
//! mirrors in order, then the origin).

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use bytes::{Bytes, BytesMut};
use reqwest::{
    Method, Response, StatusCode, Url,
    header::{AUTHORIZATION, HeaderMap, HeaderValue, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE},
};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::{
    auth::{self, Challenge, Credential},
    config::RegistryConfig,
    error::{Error, ErrorKind, Result, Target},
    hosts::Host,
    stats::Counters,
};

/// How many redirects a request may follow (registry → CDN → signed URL …).
const MAX_REDIRECTS: usize = 5;
/// Bearer tokens are refreshed this long before they expire.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);
/// A mirror that failed after all retries is skipped for this long, so that a dead
/// mirror does not cost every read a round of retries.
const HOST_DOWN_FOR: Duration = Duration::from_secs(30);
/// Token lifetime when the token server does not say (distribution's default).
const DEFAULT_TOKEN_LIFETIME: u64 = 60;

/// What a request needs a token for: the token-service scopes, and the slot its
/// Authorization header is kept in (pulls of a repository share one; pushes, which
/// need more rights, and cross-repository mounts have their own).
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    slot: String,
    scopes: Vec<String>,
}

impl Scope {
    /// Reading `repository`.
    pub(crate) fn pull(repository: &str) -> Scope {
        Scope {
            slot: repository.to_string(),
            scopes: vec![format!("repository:{repository}:pull")],
        }
    }

    /// Writing `repository`, and reading `mount_from` to mount blobs from it.
    pub(crate) fn push(repository: &str, mount_from: Option<&str>) -> Scope {
        let mut scopes = vec![format!("repository:{repository}:pull,push")];
        if let Some(from) = mount_from.filter(|f| *f != repository) {
            scopes.push(format!("repository:{from}:pull"));
        }
        Scope {
            slot: scopes.join(" "),
            scopes,
        }
    }
}

/// Why one attempt failed, and what the retry loop should do about it.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Try again after a back-off (or after `after`, from `Retry-After`).
    Retry {
        kind: ErrorKind,
        message: String,
        after: Option<Duration>,
    },
    /// Retrying this host is pointless; the next host may still work.
    Fatal { kind: ErrorKind, message: String },
    /// 401: authenticate with this challenge and try again.
    Unauthorized { challenge: Option<String> },
}

impl Failure {
    pub(crate) fn retry(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure::Retry {
            kind,
            message: message.into(),
            after: None,
        }
    }
    pub(crate) fn fatal(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure::Fatal {
            kind,
            message: message.into(),
        }
    }
}

/// What one attempt gets: the client for the host, the host, and credentials.
#[derive(Clone)]
pub(crate) struct Attempt {
    pub(crate) client: reqwest::Client,
    pub(crate) host: Host,
    pub(crate) auth: Option<HeaderValue>,
    pub(crate) registry: String,
    pub(crate) timeout: Duration,
}

impl Attempt {
    /// `<base>/<repository>/<kind>/<reference>`, plus `?ns=<registry>` for mirrors.
    pub(crate) fn url(
        &self,
        repository: &str,
        kind: &str,
        reference: &str,
    ) -> Result<Url, Failure> {
        let text = format!(
            "{}/{repository}/{kind}/{reference}",
            self.host.base.as_str().trim_end_matches('/')
        );
        let mut url = Url::parse(&text)
            .map_err(|e| Failure::fatal(ErrorKind::InvalidInput, format!("bad URL: {e}")))?;
        if self.host.mirror {
            url.query_pairs_mut().append_pair("ns", &self.registry);
        }
        Ok(url)
    }

    /// Sends `method url` with auth and host headers; follows redirects without them
    /// (credentials must not leak to object storage). Returns the response and the
    /// final redirect target, if any.
    pub(crate) async fn send(
        &self,
        method: Method,
        url: Url,
        headers: &HeaderMap,
        counters: &[&Counters],
    ) -> Result<(Response, Option<Url>), Failure> {
        let mut req = self
            .client
            .request(method.clone(), url.clone())
            .timeout(self.timeout)
            .headers(headers.clone());
        for (k, v) in &self.host.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(a) = &self.auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        let mut resp = send_counted(req, counters).await?;
        let mut current = url;
        let mut redirected = None;
        for _ in 0..MAX_REDIRECTS {
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok((resp, redirected));
            }
            let target = location(&resp, &current, "redirect")?;
            debug!(from = %current.path(), "following redirect");
            let req = self
                .client
                .request(method.clone(), target.clone())
                .timeout(self.timeout)
                .headers(headers.clone());
            resp = send_counted(req, counters).await?;
            current = target.clone();
            redirected = Some(target);
        }
        Err(Failure::fatal(
            ErrorKind::Protocol,
            format!("more than {MAX_REDIRECTS} redirects"),
        ))
    }

    /// Sends to an already known redirect target: no credentials, no host headers.
    pub(crate) async fn send_direct(
        &self,
        url: Url,
        headers: &HeaderMap,
        counters: &[&Counters],
    ) -> Result<Response, Failure> {
        let req = self
            .client
            .get(url)
            .timeout(self.timeout)
            .headers(headers.clone());
        send_counted(req, counters).await
    }
}

/// The URL an answer's `Location` names, resolved against the request's URL; `what`
/// names the answer in errors (a redirect, an upload answer).
pub(crate) fn location(resp: &Response, current: &Url, what: &str) -> Result<Url, Failure> {
    let loc = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Failure::fatal(
                ErrorKind::Protocol,
                format!("{what} {} without Location", resp.status().as_u16()),
            )
        })?;
    current.join(loc).map_err(|_| {
        Failure::fatal(
            ErrorKind::Protocol,
            format!("{what} to an invalid Location"),
        )
    })
}

pub(crate) async fn send_counted(
    req: reqwest::RequestBuilder,
    counters: &[&Counters],
) -> Result<Response, Failure> {
    for c in counters {
        c.request();
    }
    req.send()
        .await
        .map_err(|e| transport_failure(&e, "request"))
}

/// Classifies a reqwest error; the message never contains the URL (signed redirect
/// URLs carry credentials in their query).
pub(crate) fn transport_failure(e: &reqwest::Error, during: &str) -> Failure {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Network
    };
    let mut msg = if e.is_timeout() {
        format!("{during} timed out")
    } else {
        format!("{during} failed")
    };
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    // A certificate the verifier rejected will be rejected again: do not retry.
    if msg.contains("certificate") && !e.is_timeout() {
        return Failure::fatal(ErrorKind::Network, msg);
    }
    Failure::retry(kind, msg)
}

/// Maps an unexpected status to a failure. 401 re-authenticates, 408/429/5xx retry,
/// 404 and other 4xx do not.
pub(crate) fn status_failure(resp: &Response) -> Failure {
    let status = resp.status();
    let code = status.as_u16();
    match code {
        401 => Failure::Unauthorized {
            challenge: resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        },
        403 => Failure::fatal(ErrorKind::Unauthorized, "access denied (403)"),
        404 => Failure::fatal(ErrorKind::NotFound, "not found (404)"),
        408 | 425 | 429 | 500..=599 => Failure::Retry {
            kind: if code == 408 {
                ErrorKind::Timeout
            } else {
                ErrorKind::Status
            },
            message: format!("server answered {code}"),
            after: retry_after(resp.headers()),
        },
        _ => Failure::fatal(ErrorKind::Status, format!("server answered {code}")),
    }
}

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Reads a whole body, refusing more than `limit` bytes and, when `expected` is set,
/// anything but exactly that many. A short or long body is a retryable failure.
pub(crate) async fn read_body(
    mut resp: Response,
    expected: Option<u64>,
    limit: u64,
    counters: &[&Counters],
) -> Result<Bytes, Failure> {
    if let Some(len) = resp.content_length() {
        if let Some(e) = expected.filter(|e| *e != len) {
            return Err(Failure::retry(
                ErrorKind::Protocol,
                format!("Content-Length {len} but {e} bytes expected"),
            ));
        }
        if len > limit {
            return Err(Failure::fatal(
                ErrorKind::Protocol,
                format!("body of {len} bytes exceeds limit {limit}"),
            ));
        }
    }
    let cap = expected
        .or(resp.content_length())
        .unwrap_or(8192)
        .min(limit);
    let mut buf = BytesMut::with_capacity(usize::try_from(cap).unwrap_or(0));
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                for k in counters {
                    k.bytes(c.len() as u64);
                }
                if (buf.len() + c.len()) as u64 > limit
                    || expected.is_some_and(|e| (buf.len() + c.len()) as u64 > e)
                {
                    return Err(Failure::retry(
                        ErrorKind::Protocol,
                        "body longer than expected",
                    ));
                }
                buf.extend_from_slice(&c);
            }
            Ok(None) => break,
            Err(e) => return Err(transport_failure(&e, "reading body")),
        }
    }
    if let Some(e) = expected.filter(|e| *e != buf.len() as u64) {
        return Err(Failure::retry(
            ErrorKind::Protocol,
            format!("body truncated: {} of {e} bytes", buf.len()),
        ));
    }
    Ok(buf.freeze())
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct TlsKey {
    skip_verify: bool,
    ca: Vec<PathBuf>,
}

/// Authentication state of one (host, scope).
#[derive(Default)]
struct AuthState {
    header: Option<HeaderValue>,
    expires: Option<Instant>,
    challenge: Option<Challenge>,
    generation: u64,
}

/// Auth state of one (host authority, scope slot), locked across a token fetch so
/// concurrent readers share one refresh.
type AuthSlot = Arc<tokio::sync::Mutex<AuthState>>;

/// Shared HTTP machinery of a [`crate::RegistryClient`].
pub(crate) struct Transport {
    pub(crate) config: RegistryConfig,
    clients: Mutex<HashMap<TlsKey, reqwest::Client>>,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    auth: Mutex<HashMap<(String, String), AuthSlot>>,
    down: Mutex<HashMap<String, Instant>>,
    pub(crate) counters: Counters,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("config", &self.config)
            .field("stats", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl Transport {
    pub(crate) fn new(config: RegistryConfig) -> Self {
        Transport {
            config,
            clients: Mutex::default(),
            limits: Mutex::default(),
            auth: Mutex::default(),
            down: Mutex::default(),
            counters: Counters::default(),
        }
    }

    fn client_for(&self, host: &Host) -> Result<reqwest::Client> {
        let key = TlsKey {
            skip_verify: host.skip_verify,
            ca: host.ca.clone(),
        };
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let c = self.build_client(&key)?;
        clients.insert(key, c.clone());
        Ok(c)
    }

    fn build_client(&self, key: &TlsKey) -> Result<reqwest::Client> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_err = |m: String| Error::Usage(format!("TLS setup: {m}"));
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(e.to_string()))?;
        let mut tls = if key.skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerifier(provider)))
                .with_no_client_auth()
        } else {
            let mut extra = Vec::new();
            for path in &key.ca {
                let pem = std::fs::read(path).map_err(|e| Error::Config {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                let mut n = 0;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| Error::Config {
                        path: path.clone(),
                        message: format!("bad PEM certificate: {e}"),
                    })?;
                    extra.push(cert);
                    n += 1;
                }
                if n == 0 {
                    return Err(Error::Config {
                        path: path.clone(),
                        message: "no PEM certificate in CA file".into(),
                    });
                }
            }
            let verifier =
                rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider)
                    .map_err(|e| tls_err(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        };
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(self.config.connect_timeout())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(self.config.max_concurrent_requests_per_host.max(1))
            .tcp_nodelay(true)
            .user_agent(concat!("lazysnap/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| tls_err(e.to_string()))
    }

    fn is_down(&self, host: &Host) -> bool {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.get(host.base.as_str())
            .is_some_and(|until| *until > Instant::now())
    }

    fn mark_down(&self, host: &Host) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.insert(host.base.to_string(), Instant::now() + HOST_DOWN_FOR);
    }

    fn limit_for(&self, host: &Host) -> Arc<Semaphore> {
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        limits
            .entry(host.authority())
            .or_insert_with(|| {
                Arc::new(Semaphore::new(
                    self.config.max_concurrent_requests_per_host.max(1),
                ))
            })
            .clone()
    }

    fn auth_slot(&self, host: &Host, scope: &Scope) -> AuthSlot {
        let mut map = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((host.authority(), scope.slot.clone()))
            .or_default()
            .clone()
    }

    /// The Authorization header to send now (refreshing an expiring token first), and
    /// its generation, so a 401 only triggers one refresh among concurrent readers.
    async fn current_auth(
        &self,
        attempt: &Attempt,
        scope: &Scope,
    ) -> Result<(Option<HeaderValue>, u64), Failure> {
        let slot = self.auth_slot(&attempt.host, scope);
        let mut st = slot.lock().await;
        let expired = st
            .expires
            .is_some_and(|e| Instant::now() + TOKEN_MARGIN >= e);
        if expired && let Some(ch) = st.challenge.clone() {
            debug!(host = %attempt.host.authority(), scope = %scope.slot, "refreshing bearer token before expiry");
            let (h, exp) = self.authenticate(attempt, scope, &ch).await?;
            st.header = Some(h);
            st.expires = exp;
            st.generation += 1;
        }
        Ok((st.header.clone(), st.generation))
    }

    /// Handles a 401: parses the challenge and obtains a new header, unless another
    /// task already did so since `generation`.
    async fn reauthenticate(
        &self,
        attempt: &Attempt,
        scope: &Scope,
        challenge: Option<&str>,
        generation: u64,
    ) -> Result<(), Failure> {
        let slot = self.auth_slot(&attempt.host, scope);
        let mut st = slot.lock().await;
        if st.generation != generation {
            return Ok(());
        }
        let challenges = challenge.map(auth::parse_challenges).unwrap_or_default();
        let ch = challenges
            .iter()
            .find(|c| c.scheme == "bearer")
            .or_else(|| challenges.iter().find(|c| c.scheme == "basic"))
            .cloned()
            .ok_or_else(|| {
                Failure::fatal(
                    ErrorKind::Unauthorized,
                    "401 without a usable WWW-Authenticate challenge",
                )
            })?;
        let (h, exp) = self.authenticate(attempt, scope, &ch).await?;
        st.header = Some(h);
        st.expires = exp;
        st.challenge = Some(ch);
        st.generation += 1;
        Ok(())
    }

    /// Turns a challenge into an Authorization header: Basic directly, Bearer through
    /// the token service with the scopes of `scope`.
    async fn authenticate(
        &self,
        attempt: &Attempt,
        scope: &Scope,
        ch: &Challenge,
    ) -> Result<(HeaderValue, Option<Instant>), Failure> {
        let cred_host = if attempt.host.mirror {
            attempt.host.authority()
        } else {
            attempt.registry.clone()
        };
        let cred = auth::credentials_for(
            auth::docker_config_path(self.config.docker_config.as_deref()).as_deref(),
            &cred_host,
        )
        .await
        .map_err(|e| Failure::fatal(ErrorKind::Unauthorized, e.to_string()))?;
        let header = |s: String| {
            let mut v = HeaderValue::from_str(&s).map_err(|_| {
                Failure::fatal(
                    ErrorKind::Unauthorized,
                    "credential not valid in an HTTP header",
                )
            })?;
            v.set_sensitive(true);
            Ok::<_, Failure>(v)
        };
        if ch.scheme == "basic" {
            return match cred {
                Some(Credential::Basic { username, password }) => {
                    Ok((header(auth::basic_header(&username, &password))?, None))
                }
                _ => Err(Failure::fatal(
                    ErrorKind::Unauthorized,
                    format!(
                        "registry wants a user name and password; none configured for {cred_host}"
                    ),
                )),
            };
        }
        if let Some(Credential::RegistryToken(t)) = &cred {
            return Ok((header(format!("Bearer {t}"))?, None));
        }
        let realm = ch.params.get("realm").ok_or_else(|| {
            Failure::fatal(ErrorKind::Unauthorized, "bearer challenge without realm")
        })?;
        let mut url = Url::parse(realm).map_err(|_| {
            Failure::fatal(
                ErrorKind::Unauthorized,
                "bearer challenge with an invalid realm URL",
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Failure::fatal(
                ErrorKind::Unauthorized,
                "bearer realm is not http(s)",
            ));
        }
        let service = ch.params.get("service").cloned().unwrap_or_default();
        let req = match &cred {
            Some(Credential::IdentityToken(refresh)) => {
                let mut form = Url::parse("http://form.invalid/")
                    .map_err(|_| Failure::fatal(ErrorKind::Unauthorized, "form encoding"))?;
                form.query_pairs_mut()
                    .append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", refresh)
                    .append_pair("service", &service)
                    .extend_pairs(scope.scopes.iter().map(|s| ("scope", s)))
                    .append_pair("client_id", "lazysnap");
                attempt
                    .client
                    .post(url.clone())
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(form.query().unwrap_or("").to_string())
            }
            other => {
                {
                    let mut q = url.query_pairs_mut();
                    if !service.is_empty() {
                        q.append_pair("service", &service);
                    }
                    q.extend_pairs(scope.scopes.iter().map(|s| ("scope", s)));
                }
                let mut r = attempt.client.get(url.clone());
                if let Some(Credential::Basic { username, password }) = other {
                    r = r.header(
                        AUTHORIZATION,
                        header(auth::basic_header(username, password))?,
                    );
                }
                r
            }
        };
        let resp = send_counted(req.timeout(attempt.timeout), &[&self.counters]).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(match status.as_u16() {
                401 | 403 => Failure::fatal(
                    ErrorKind::Unauthorized,
                    format!(
                        "token service {} refused the credentials ({})",
                        url.host_str().unwrap_or(""),
                        status.as_u16()
                    ),
                ),
                _ => Failure::retry(
                    ErrorKind::Unauthorized,
                    format!(
                        "token service {} answered {}",
                        url.host_str().unwrap_or(""),
                        status.as_u16()
                    ),
                ),
            });
        }
        let body = read_body(resp, None, 1 << 20, &[&self.counters]).await?;
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            Failure::retry(
                ErrorKind::Unauthorized,
                "token service answered something that is not a token",
            )
        })?;
        let token = t
            .token
            .filter(|t| !t.is_empty())
            .or(t.access_token)
            .ok_or_else(|| {
                Failure::retry(
                    ErrorKind::Unauthorized,
                    "token service answered without a token",
                )
            })?;
        let lifetime = Duration::from_secs(t.expires_in.unwrap_or(DEFAULT_TOKEN_LIFETIME).max(1));
        debug!(host = %attempt.host.authority(), scope = %scope.slot, "obtained bearer token");
        Ok((
            header(format!("Bearer {token}"))?,
            Some(Instant::now() + lifetime),
        ))
    }

    /// Runs `op` against `hosts` in order, with retries per host, authenticated to
    /// read the target's repository. `what` prefixes the final error message (e.g.
    /// `range 0-99`).
    pub(crate) async fn run<T, F, Fut>(
        &self,
        target: &Target,
        what: &str,
        hosts: &[Host],
        extra: Option<&Counters>,
        op: F,
    ) -> Result<T>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let scope = Scope::pull(&target.repository);
        self.run_scoped(target, what, hosts, extra, &scope, op)
            .await
    }

    /// [`Transport::run`] with tokens for `scope`.
    pub(crate) async fn run_scoped<T, F, Fut>(
        &self,
        target: &Target,
        what: &str,
        hosts: &[Host],
        extra: Option<&Counters>,
        scope: &Scope,
        mut op: F,
    ) -> Result<T>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let what = if what.is_empty() {
            String::new()
        } else {
            format!("{what}: ")
        };
        let mut last: Option<Error> = None;
        for (i, host) in hosts.iter().enumerate() {
            let has_fallback = i + 1 < hosts.len();
            if has_fallback && self.is_down(host) {
                debug!(host = %host.base, "skipping host that failed recently");
                continue;
            }
            let via = if host.authority() == target.registry {
                String::new()
            } else {
                format!(" (via {})", host.authority())
            };
            let client = self.client_for(host)?;
            let sem = self.limit_for(host);
            let mut attempts = 0u32;
            let mut reauths = 0u32;
            loop {
                let mut attempt = Attempt {
                    client: client.clone(),
                    host: host.clone(),
                    auth: None,
                    registry: target.registry.clone(),
                    timeout: self.config.request_timeout(),
                };
                attempts += 1;
                let result = match self.current_auth(&attempt, scope).await {
                    Err(f) => Err((f, 0)),
                    Ok((h, generation)) => {
                        attempt.auth = h;
                        let permit = sem.acquire().await;
                        let r = op(attempt.clone()).await;
                        drop(permit);
                        r.map_err(|f| (f, generation))
                    }
                };
                let (failure, generation) = match result {
                    Ok(v) => return Ok(v),
                    Err(f) => f,
                };
                match failure {
                    Failure::Unauthorized { challenge } => {
                        if reauths >= 2 {
                            last = Some(target.error(
                                ErrorKind::Unauthorized,
                                format!("{what}registry refused the credentials (401){via}"),
                            ));
                            break;
                        }
                        reauths += 1;
                        // An authentication round trip is not a failed attempt.
                        attempts -= 1;
                        match self
                            .reauthenticate(&attempt, scope, challenge.as_deref(), generation)
                            .await
                        {
                            Ok(()) => continue,
                            Err(Failure::Retry { kind, message, .. })
                                if attempts < self.config.max_retries =>
                            {
                                debug!(%message, ?kind, "authentication failed, retrying");
                                attempts += 1;
                                self.counters.retry();
                                tokio::time::sleep(self.config.backoff(attempts)).await;
                                continue;
                            }
                            Err(
                                Failure::Retry { kind, message, .. }
                                | Failure::Fatal { kind, message },
                            ) => {
                                last = Some(target.error(kind, format!("{what}{message}{via}")));
                                break;
                            }
                            Err(Failure::Unauthorized { .. }) => {
                                last = Some(target.error(
                                    ErrorKind::Unauthorized,
                                    format!("{what}unauthorized{via}"),
                                ));
                                break;
                            }
                        }
                    }
                    Failure::Fatal { kind, message } => {
                        last = Some(target.error(kind, format!("{what}{message}{via}")));
                        break;
                    }
                    Failure::Retry {
                        kind,
                        message,
                        after,
                    } => {
                        if attempts > self.config.max_retries {
                            if has_fallback {
                                self.mark_down(host);
                            }
                            last = Some(target.error(
                                kind,
                                format!("{what}{message} after {attempts} attempts{via}"),
                            ));
                            break;
                        }
                        let max = Duration::from_millis(self.config.max_backoff_ms.max(1));
                        let delay = match after {
                            Some(d) => d.min(max),
                            None => self.config.backoff(attempts - 1),
                        };
                        debug!(registry = %target.registry, repository = %target.repository, object = %target.object, %message, attempt = attempts, ?delay, "retrying");
                        self.counters.retry();
                        if let Some(c) = extra {
                            c.retry();
                        }
                        tokio::time::sleep(delay).await;
                    }
                }
            }
            if i + 1 < hosts.len()
                && let Some(e) = &last
            {
                warn!(error = %e, "host failed, trying the next one");
            }
        }
        self.counters.failure();
        if let Some(c) = extra {
            c.failure();
        }
        Err(last.unwrap_or_else(|| {
            target.error(
                ErrorKind::Unsupported,
                format!("{what}no host configured for this operation"),
            )
        }))
    }
}

/// `skip_verify = true`: accept any certificate, but still check handshake
/// signatures so the connection is at least consistent.
#[derive(Debug)]
struct NoVerifier(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
