//! A tiny HTTP/1.1 endpoint for `/metrics` (Prometheus, on the loopback metrics
//! address) and `/status` (JSON, also on the status unix socket that
//! `lazysnap status` reads). One request per connection.

use std::sync::Arc;

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::metrics::Metrics;
use crate::snapshot::Snapshotter;

/// What the endpoint serves.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The snapshotter (counts, remote status).
    pub snapshotter: Arc<Snapshotter>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
}

impl Endpoint {
    /// The `/status` document.
    pub async fn status(&self) -> serde_json::Value {
        let s = self.snapshotter.clone();
        let r = tokio::task::spawn_blocking(move || {
            let counts = s.counts();
            let layers = s.remote().map(|r| r.status()).unwrap_or_default();
            (counts, layers)
        })
        .await;
        match r {
            Ok((Ok(counts), layers)) => json!({ "snapshots": counts, "layers": layers }),
            Ok((Err(e), layers)) => json!({ "error": e.to_string(), "layers": layers }),
            Err(e) => json!({ "error": e.to_string() }),
        }
    }

    async fn metrics_text(&self) -> String {
        let s = self.snapshotter.clone();
        let (counts, layers) = tokio::task::spawn_blocking(move || {
            (s.counts().ok(), s.remote().map_or(0, |r| r.status().len()))
        })
        .await
        .unwrap_or((None, 0));
        self.metrics.render(counts, layers)
    }

    /// Answers one request, giving up on clients slower than a few seconds.
    pub async fn handle_bounded<IO: AsyncRead + AsyncWrite + Unpin>(&self, io: IO) {
        if tokio::time::timeout(std::time::Duration::from_secs(5), self.handle(io))
            .await
            .is_err()
        {
            debug!("http request timed out");
        }
    }

    /// Answers one request on `io`.
    pub async fn handle<IO: AsyncRead + AsyncWrite + Unpin>(&self, mut io: IO) {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let head = String::from_utf8_lossy(&buf);
        let mut parts = head.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        debug!(method, path, "http request");
        let (status, ctype, body) = match (method, path) {
            ("GET", "/metrics") => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics_text().await,
            ),
            ("GET", "/status") => (
                "200 OK",
                "application/json",
                self.status().await.to_string(),
            ),
            ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "method not allowed\n".to_string(),
            ),
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = io.write_all(resp.as_bytes()).await;
        let _ = io.shutdown().await;
    }
}
