//! `lazysnap serve --takeover`: a new daemon (an upgrade) replaces the running one.
//!
//! The running daemon listens on `<root>/takeover.sock` (0600). A successor connects
//! and writes `takeover`; the daemon answers with its process id and shuts down as at
//! SIGTERM: calls in flight drain, layers the fd holder keeps stay mounted, and it
//! exits. The successor waits for that exit (the metadata store is one process's at a
//! time), then starts and takes the layers over from the holder.

use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tracing::{info, warn};

use crate::error::{Error, IoContext, Result};

const REQUEST: &str = "takeover";

/// The takeover socket of the daemon with this root.
pub fn socket(root: &Path) -> PathBuf {
    root.join("takeover.sock")
}

/// Binds the takeover socket now; the future resolves when a successor asks, after
/// telling it our process id.
pub fn listen(path: &Path) -> Result<impl Future<Output = ()> + use<>> {
    let listener = super::bind_unix(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .ctx(|| format!("chmod {}", path.display()))?;
    Ok(async move {
        loop {
            let mut io = match listener.accept().await {
                Ok((io, _)) => io,
                Err(e) => {
                    warn!("takeover socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut line = String::new();
            let mut reader = BufReader::new(&mut io);
            let read = reader.read_line(&mut line);
            match tokio::time::timeout(Duration::from_secs(5), read).await {
                Ok(Ok(_)) if line.trim() == REQUEST => {}
                _ => continue,
            }
            let pid = format!("{}\n", std::process::id());
            if io.write_all(pid.as_bytes()).await.is_ok() {
                info!("a successor takes over: shutting down, layers stay mounted");
                return;
            }
        }
    })
}

/// Asks the daemon listening at `path` to hand over, and waits up to `limit` for it to
/// exit. `None` when no daemon listens there.
pub fn request(path: &Path, limit: Duration) -> Result<Option<u32>> {
    let mut s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(Error::io(format!("connecting to {}", path.display()), e)),
    };
    let ctx = || format!("asking the daemon at {} to hand over", path.display());
    s.set_read_timeout(Some(Duration::from_secs(10))).ctx(ctx)?;
    s.write_all(format!("{REQUEST}\n").as_bytes()).ctx(ctx)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ctx(ctx)?;
    let pid: u32 = answer.trim().parse().map_err(|_| {
        Error::Unavailable(format!(
            "{}: the daemon refused to hand over ({answer:?})",
            path.display()
        ))
    })?;
    let start = Instant::now();
    while !exited(pid) {
        if start.elapsed() > limit {
            return Err(Error::Unavailable(format!(
                "daemon {pid} agreed to hand over but is still running after {limit:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Some(pid))
}

/// Whether process `pid` is gone (a zombie counts: it holds nothing any more).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // the state follows the command name, which is in parentheses
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_running_process_has_not_exited() {
        assert!(!super::exited(std::process::id()));
        assert!(super::exited(u32::MAX));
    }
}
