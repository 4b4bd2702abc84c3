//! `lazysnap status`: asks the running daemon for its snapshots and mounted layers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use lazysnap::service::Config;

/// Arguments of `lazysnap status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Configuration file of the daemon (to find its status socket).
    #[arg(long, env = "LAZYSNAP_CONFIG")]
    pub config: Option<PathBuf>,
    /// The daemon's status socket (overrides the configuration).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Print the raw JSON document.
    #[arg(long)]
    pub json: bool,
}

fn fetch(socket: &PathBuf) -> anyhow::Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to {} (is `lazysnap serve` running?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: lazysnap\r\nConnection: close\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp);
    let Some((head, body)) = resp.split_once("\r\n\r\n") else {
        bail!("malformed answer from {}", socket.display());
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "{}: {}",
            socket.display(),
            head.lines().next().unwrap_or("")
        );
    }
    serde_json::from_str(body).context("parsing the daemon's status")
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Prints the status.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let socket = match args.socket {
        Some(s) => s,
        None => Config::load(args.config.as_deref())
            .context("loading configuration")?
            .status_socket(),
    };
    let status = fetch(&socket)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    if let Some(e) = status.get("error").and_then(|e| e.as_str()) {
        println!("error: {e}");
    }
    if let Some(s) = status.get("snapshots") {
        let n = |k: &str| s.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        println!(
            "snapshots: {} committed ({} remote), {} active, {} views",
            n("committed"),
            n("remote"),
            n("active"),
            n("view")
        );
    }
    let layers = status
        .get("layers")
        .and_then(|l| l.as_array())
        .cloned()
        .unwrap_or_default();
    println!("mounted remote layers: {}", layers.len());
    for l in layers {
        let s = |k: &str| l.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
        let n = |k: &str| l.get(k).and_then(|v| v.as_u64());
        let fetched = n("fetched_bytes").unwrap_or(0);
        let mut progress = match n("blob_size") {
            Some(size) if size > 0 => format!(
                "{} of {} fetched ({:.1}%)",
                human(fetched),
                human(size),
                fetched as f64 * 100.0 / size as f64
            ),
            _ => format!("{} fetched", human(fetched)),
        };
        if let Some(f) = l.get("fraction_complete").and_then(|v| v.as_f64()) {
            progress.push_str(&format!(", {:.1}% of file bytes cached", f * 100.0));
        }
        let name = if s("digest") != "-" {
            s("digest")
        } else {
            s("name")
        };
        println!("  {name}  {}  {progress}", s("mountpoint"));
    }
    Ok(())
}
