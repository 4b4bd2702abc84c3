//! A fault-injecting HTTP/1.1 proxy to put between lazysnap and a real registry.
//! Each request is forwarded to the registry unless the seeded schedule picks a
//! fault for it: reset the connection, stall past the client's timeout, answer
//! 500/502/503 or 429, truncate the body, or flip a byte in the body. The proxy can
//! also go fully down (its port closed, open connections dropped) and come back on
//! the same port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::Rng;

/// A fault the proxy injects into one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// Drop the connection without answering.
    Reset,
    /// Read the request and answer nothing until the stall time has passed.
    Stall,
    /// Answer this status with an empty body.
    Status(u16),
    /// 429 with `Retry-After: 1`.
    TooMany,
    /// Forward the headers and half the body, then close.
    Truncate,
    /// Forward the response with one body byte flipped.
    Flip,
}

impl Fault {
    /// Every fault, in the order the schedule picks from.
    pub const ALL: [Fault; 8] = [
        Fault::Reset,
        Fault::Stall,
        Fault::Status(500),
        Fault::Status(502),
        Fault::Status(503),
        Fault::TooMany,
        Fault::Truncate,
        Fault::Flip,
    ];

    pub fn name(self) -> String {
        match self {
            Fault::Reset => "reset".into(),
            Fault::Stall => "stall".into(),
            Fault::Status(s) => format!("status-{s}"),
            Fault::TooMany => "status-429".into(),
            Fault::Truncate => "truncate".into(),
            Fault::Flip => "flip".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Pass,
    /// Each request gets a fault with this probability.
    Faulty(f64),
}

struct State {
    upstream: SocketAddr,
    mode: Mutex<Mode>,
    rng: Mutex<Rng>,
    stall: Duration,
    requests: AtomicU64,
    injected: Mutex<BTreeMap<String, u64>>,
    /// Bumped when the proxy goes down: every connection task ends.
    down: watch::Sender<u64>,
}

/// The proxy, on 127.0.0.1 with its own runtime; stopped on drop.
pub struct FaultProxy {
    pub port: u16,
    state: Arc<State>,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.go_down();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// What went through the proxy.
#[derive(Debug, Clone, Default)]
pub struct FaultStats {
    pub requests: u64,
    /// Faults injected, by [`Fault::name`].
    pub injected: BTreeMap<String, u64>,
}

impl FaultStats {
    pub fn total_injected(&self) -> u64 {
        self.injected.values().sum()
    }
}

impl FaultProxy {
    /// Starts forwarding to the registry on 127.0.0.1:`upstream`, with no faults;
    /// `seed` seeds the fault schedule and `stall` is how long a stall lasts.
    pub fn start(upstream: u16, seed: u64, stall: Duration) -> FaultProxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let state = Arc::new(State {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream)),
            mode: Mutex::new(Mode::Pass),
            rng: Mutex::new(Rng::new(seed)),
            stall,
            requests: AtomicU64::new(0),
            injected: Mutex::default(),
            down: watch::channel(0).0,
        });
        let accept = rt.spawn(accept_loop(listener, state.clone()));
        FaultProxy {
            port,
            state,
            accept: Mutex::new(Some(accept)),
            rt: Some(rt),
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Forward everything.
    pub fn set_pass(&self) {
        *self.state.mode.lock().expect("mode") = Mode::Pass;
    }

    /// Give each request a fault with probability `p`.
    pub fn set_faulty(&self, p: f64) {
        *self.state.mode.lock().expect("mode") = Mode::Faulty(p);
    }

    /// Closes the port and drops every open connection.
    pub fn go_down(&self) {
        if let Some(h) = self.accept.lock().expect("accept").take() {
            h.abort();
        }
        self.state.down.send_modify(|g| *g += 1);
    }

    /// Listens on the same port again.
    pub fn come_up(&self) {
        let rt = self.rt.as_ref().expect("runtime");
        let mut accept = self.accept.lock().expect("accept");
        if accept.is_some() {
            return;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        // the aborted accept task drops its listener asynchronously: retry briefly
        let mut listener = None;
        for _ in 0..100 {
            match rt.block_on(TcpListener::bind(addr)) {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let listener = listener.unwrap_or_else(|| panic!("cannot listen on {addr} again"));
        *accept = Some(rt.spawn(accept_loop(listener, self.state.clone())));
    }

    pub fn stats(&self) -> FaultStats {
        FaultStats {
            requests: self.state.requests.load(Ordering::Relaxed),
            injected: self.state.injected.lock().expect("injected").clone(),
        }
    }
}

async fn accept_loop(listener: TcpListener, st: Arc<State>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        conns.spawn(serve(st.clone(), stream, st.down.subscribe()));
        while conns.try_join_next().is_some() {}
    }
}

impl State {
    fn decide(&self) -> Option<Fault> {
        let mode = *self.mode.lock().expect("mode");
        let Mode::Faulty(p) = mode else {
            return None;
        };
        let mut rng = self.rng.lock().expect("rng");
        if !rng.chance(p) {
            return None;
        }
        let f = Fault::ALL[rng.below(Fault::ALL.len() as u64) as usize];
        *self
            .injected
            .lock()
            .expect("injected")
            .entry(f.name())
            .or_default() += 1;
        Some(f)
    }
}

/// Reads one request (head and `Content-Length` body) from `buf` + `s`.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 1 << 20 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let body_len = header(&buf[..head_end], "content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + body_len {
        let mut chunk = [0u8; 65536];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf.drain(..head_end + body_len).collect())
}

fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    std::str::from_utf8(head).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `head` with its `Connection` header replaced by `connection` (or dropped).
fn with_connection(head: &[u8], connection: Option<&str>) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let is_conn = line
            .split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("connection"));
        if !is_conn {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    if let Some(c) = connection {
        out.push_str(&format!("Connection: {c}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// Sends the request upstream on a fresh connection and reads the whole response:
/// (head, body exactly as framed on the wire).
async fn forward(upstream: SocketAddr, req: &[u8]) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let head_end = req
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(req.len(), |i| i + 4);
    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(&with_connection(&req[..head_end], Some("close")))
        .await?;
    up.write_all(&req[head_end..]).await?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp).await?;
    let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(std::io::Error::other("upstream sent no response head"));
    };
    let body = resp.split_off(i + 4);
    Ok((resp, body))
}

fn status(code: u16, extra: &str) -> Vec<u8> {
    format!("HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\n{extra}\r\n").into_bytes()
}

async fn serve(st: Arc<State>, mut client: TcpStream, mut down: watch::Receiver<u64>) {
    let mut buf = Vec::new();
    loop {
        let req = tokio::select! {
            r = read_request(&mut client, &mut buf) => r,
            _ = down.changed() => return,
        };
        let Some(req) = req else { return };
        st.requests.fetch_add(1, Ordering::Relaxed);
        let fault = st.decide();
        match fault {
            Some(Fault::Reset) => return,
            Some(Fault::Stall) => {
                tokio::select! {
                    _ = tokio::time::sleep(st.stall) => {}
                    _ = down.changed() => {}
                }
                return;
            }
            Some(Fault::Status(code)) => {
                if client.write_all(&status(code, "")).await.is_err() {
                    return;
                }
                continue;
            }
            Some(Fault::TooMany) => {
                if client
                    .write_all(&status(429, "Retry-After: 1\r\n"))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            _ => {}
        }
        let (head, mut body) = match forward(st.upstream, &req).await {
            Ok(r) => r,
            Err(_) => {
                let _ = client.write_all(&status(502, "")).await;
                return;
            }
        };
        // a body delimited only by the end of the connection must end it here too
        let framed = header(&head, "content-length").is_some()
            || header(&head, "transfer-encoding").is_some();
        let mut out = with_connection(&head, (!framed).then_some("close"));
        let ok = head.starts_with(b"HTTP/1.1 2") || head.starts_with(b"HTTP/1.0 2");
        match fault {
            Some(Fault::Truncate) => {
                out.extend_from_slice(&body[..body.len() / 2]);
                let _ = client.write_all(&out).await;
                return;
            }
            Some(Fault::Flip) if ok && !body.is_empty() => {
                let i = st.rng.lock().expect("rng").below(body.len() as u64) as usize;
                body[i] ^= 0x5a;
            }
            _ => {}
        }
        out.extend_from_slice(&body);
        if client.write_all(&out).await.is_err() || !framed {
            return;
        }
    }
}
