//! A fault-injecting registry: serves one blob (plain tokio TCP, HTTP/1.1 keep-alive)
//! and, on demand, resets connections, answers 5xx or 429 with `Retry-After`,
//! stalls, truncates bodies, answers 200 instead of 206, sends a wrong
//! `Content-Range`, rejects multi-range requests, redirects to a "storage" URL whose
//! signature can expire, and requires bearer tokens that can be expired.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use tokio::{io::AsyncWriteExt, net::TcpListener, net::TcpStream, task::JoinHandle};

use super::http::{Request, read_request, response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection without answering.
    Reset,
    /// Answer this status with an empty body.
    Status(u16),
    /// 429 with `Retry-After: <secs>`.
    TooMany(u64),
    /// Read the request and never answer.
    StallHeaders,
    /// Send headers and half the body, then stall.
    StallBody,
    /// Send headers with the full length, half the body, then close.
    Truncate,
    /// 200 with the whole blob, ignoring `Range`.
    FullBody,
    /// 200 with a blob-sized body of garbage.
    GarbageFullBody,
    /// 206 for the range shifted by one byte (Content-Range says so honestly).
    WrongContentRange,
    /// 206 whose Content-Range claims the requested range but with fewer bytes.
    ShortBody,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiMode {
    /// multipart/byteranges.
    Supported,
    /// Reject multi-range requests with this status.
    Reject(u16),
    /// Answer multi-range requests with 200 and the whole blob.
    Whole,
}

pub struct State {
    pub blob: Vec<u8>,
    pub digest: String,
    pub repo: String,
    pub faults: Mutex<VecDeque<Fault>>,
    pub persistent: Mutex<Option<Fault>>,
    pub multi: Mutex<MultiMode>,
    pub require_token: AtomicBool,
    pub token_gen: AtomicU64,
    pub token_requests: AtomicUsize,
    pub redirect: AtomicBool,
    pub sig: AtomicU64,
    pub not_found: AtomicBool,
    pub log: Mutex<Vec<Request>>,
    pub connections: AtomicUsize,
    pub inflight: AtomicUsize,
    pub max_inflight: AtomicUsize,
    pub delay_ms: AtomicU64,
    pub port: AtomicU16,
}

pub struct FaultServer {
    pub port: u16,
    pub state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultServer {
    pub async fn start(repo: &str, blob: Vec<u8>) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(State {
            digest: super::registry::sha256(&blob),
            blob,
            repo: repo.to_string(),
            faults: Mutex::default(),
            persistent: Mutex::default(),
            multi: Mutex::new(MultiMode::Supported),
            require_token: AtomicBool::new(false),
            token_gen: AtomicU64::new(1),
            token_requests: AtomicUsize::new(0),
            redirect: AtomicBool::new(false),
            sig: AtomicU64::new(1),
            not_found: AtomicBool::new(false),
            log: Mutex::default(),
            connections: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            max_inflight: AtomicUsize::new(0),
            delay_ms: AtomicU64::new(0),
            port: AtomicU16::new(port),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                st.connections.fetch_add(1, SeqCst);
                conns.spawn(serve_conn(st.clone(), stream));
            }
        });
        FaultServer { port, state, task }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn push_faults(&self, faults: &[Fault]) {
        self.state
            .faults
            .lock()
            .expect("lock")
            .extend(faults.iter().cloned());
    }

    pub fn set_persistent(&self, f: Option<Fault>) {
        *self.state.persistent.lock().expect("lock") = f;
    }

    pub fn set_multi(&self, m: MultiMode) {
        *self.state.multi.lock().expect("lock") = m;
    }

    /// Requests whose path starts with `prefix`.
    pub fn requests(&self, prefix: &str) -> Vec<Request> {
        self.state
            .log
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.path().starts_with(prefix))
            .cloned()
            .collect()
    }

    pub fn blob_path(&self) -> String {
        format!("/v2/{}/blobs/{}", self.state.repo, self.state.digest)
    }
}

async fn serve_conn(st: Arc<State>, mut stream: TcpStream) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf).await {
        st.log.lock().expect("lock").push(req.clone());
        let n = st.inflight.fetch_add(1, SeqCst) + 1;
        st.max_inflight.fetch_max(n, SeqCst);
        let keep = handle(&st, &req, &mut stream).await;
        st.inflight.fetch_sub(1, SeqCst);
        if !keep {
            return;
        }
    }
}

fn unauthorized(st: &State) -> Vec<u8> {
    let port = st.port.load(SeqCst);
    response(
        401,
        "Unauthorized",
        &[(
            "WWW-Authenticate",
            format!(
                r#"Bearer realm="http://127.0.0.1:{port}/token",service="fault",scope="repository:{}:pull""#,
                st.repo
            ),
        )],
        b"",
    )
}

/// Answers one request; false to close the connection.
async fn handle(st: &State, req: &Request, stream: &mut TcpStream) -> bool {
    let path = req.path().to_string();
    if path == "/token" {
        st.token_requests.fetch_add(1, SeqCst);
        let body = format!(
            r#"{{"token":"tok-{}","expires_in":300}}"#,
            st.token_gen.load(SeqCst)
        );
        return stream
            .write_all(&response(200, "OK", &[], body.as_bytes()))
            .await
            .is_ok();
    }
    if st.not_found.load(SeqCst) {
        return stream
            .write_all(&response(404, "Not Found", &[], b"{}"))
            .await
            .is_ok();
    }
    let blob_path = format!("/v2/{}/blobs/{}", st.repo, st.digest);
    if path == blob_path {
        if st.require_token.load(SeqCst) {
            let want = format!("Bearer tok-{}", st.token_gen.load(SeqCst));
            if req.header("authorization") != Some(want.as_str()) {
                return stream.write_all(&unauthorized(st)).await.is_ok();
            }
        }
        if req.method == "HEAD" {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                st.blob.len()
            );
            return stream.write_all(head.as_bytes()).await.is_ok();
        }
        if st.redirect.load(SeqCst) {
            let loc = format!("/storage/blob?sig={}", st.sig.load(SeqCst));
            return stream
                .write_all(&response(
                    307,
                    "Temporary Redirect",
                    &[("Location", loc)],
                    b"",
                ))
                .await
                .is_ok();
        }
        return serve_blob(st, req, stream).await;
    }
    if path == "/storage/blob" {
        let sig: u64 = req
            .query()
            .get("sig")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if sig != st.sig.load(SeqCst) {
            return stream
                .write_all(&response(403, "Forbidden", &[], b"expired"))
                .await
                .is_ok();
        }
        return serve_blob(st, req, stream).await;
    }
    stream
        .write_all(&response(404, "Not Found", &[], b"{}"))
        .await
        .is_ok()
}

fn parse_ranges(h: &str) -> Vec<(u64, u64)> {
    h.trim()
        .strip_prefix("bytes=")
        .unwrap_or("")
        .split(',')
        .filter_map(|r| {
            let (a, b) = r.trim().split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

async fn serve_blob(st: &State, req: &Request, stream: &mut TcpStream) -> bool {
    let delay = st.delay_ms.load(SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let blob = &st.blob;
    let size = blob.len() as u64;
    let ranges = req.header("range").map(parse_ranges).unwrap_or_default();
    let fault = {
        let mut q = st.faults.lock().expect("lock");
        q.pop_front()
            .or_else(|| st.persistent.lock().expect("lock").clone())
    };
    let (first, last) = ranges.first().copied().unwrap_or((0, size - 1));
    let part = |a: u64, b: u64| &blob[a as usize..=(b.min(size - 1)) as usize];
    if let Some(f) = fault {
        match f {
            Fault::Reset => return false,
            Fault::Status(code) => {
                return stream
                    .write_all(&response(code, "Fault", &[], b""))
                    .await
                    .is_ok();
            }
            Fault::TooMany(secs) => {
                let r = response(
                    429,
                    "Too Many Requests",
                    &[("Retry-After", secs.to_string())],
                    b"",
                );
                return stream.write_all(&r).await.is_ok();
            }
            Fault::StallHeaders => {
                tokio::time::sleep(Duration::from_secs(120)).await;
                return false;
            }
            Fault::StallBody | Fault::Truncate => {
                let data = part(first, last);
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {first}-{last}/{size}\r\n\r\n",
                    data.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&data[..data.len() / 2]).await;
                let _ = stream.flush().await;
                if f == Fault::StallBody {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                }
                return false;
            }
            Fault::FullBody => {
                return stream
                    .write_all(&response(200, "OK", &[], blob))
                    .await
                    .is_ok();
            }
            Fault::GarbageFullBody => {
                let garbage = vec![0x5au8; blob.len()];
                return stream
                    .write_all(&response(200, "OK", &[], &garbage))
                    .await
                    .is_ok();
            }
            Fault::WrongContentRange => {
                let (a, b) = (first + 1, (last + 1).min(size - 1));
                let r = response(
                    206,
                    "Partial Content",
                    &[("Content-Range", format!("bytes {a}-{b}/{size}"))],
                    part(a, b),
                );
                return stream.write_all(&r).await.is_ok();
            }
            Fault::ShortBody => {
                let data = part(first, last);
                let r = response(
                    206,
                    "Partial Content",
                    &[("Content-Range", format!("bytes {first}-{last}/{size}"))],
                    &data[..data.len() / 2],
                );
                return stream.write_all(&r).await.is_ok();
            }
        }
    }
    if ranges.is_empty() {
        return stream
            .write_all(&response(200, "OK", &[], blob))
            .await
            .is_ok();
    }
    if ranges.len() == 1 {
        let r = response(
            206,
            "Partial Content",
            &[("Content-Range", format!("bytes {first}-{last}/{size}"))],
            part(first, last),
        );
        return stream.write_all(&r).await.is_ok();
    }
    let mode = *st.multi.lock().expect("lock");
    match mode {
        MultiMode::Reject(code) => stream
            .write_all(&response(code, "Rejected", &[], b""))
            .await
            .is_ok(),
        MultiMode::Whole => stream
            .write_all(&response(200, "OK", &[], blob))
            .await
            .is_ok(),
        MultiMode::Supported => {
            let mut body = Vec::new();
            for (a, b) in &ranges {
                body.extend_from_slice(
                    format!("\r\n--FAULTB\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{b}/{size}\r\n\r\n")
                        .as_bytes(),
                );
                body.extend_from_slice(part(*a, *b));
            }
            body.extend_from_slice(b"\r\n--FAULTB--\r\n");
            let r = response(
                206,
                "Partial Content",
                &[(
                    "Content-Type",
                    "multipart/byteranges; boundary=FAULTB".to_string(),
                )],
                &body,
            );
            stream.write_all(&r).await.is_ok()
        }
    }
}
