//! SIGTERM and SIGINT both mean a clean shutdown: stop accepting, drain calls in
//! flight, then leave remote layers mounted for the next daemon (when the fd holder
//! keeps their connections) or unmount them.

use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::error::{Error, Result};

/// Resolves at the first SIGTERM or SIGINT. Installs the handlers at once, so that a
/// signal that arrives before the returned future is polled is not lost.
pub fn shutdown() -> Result<impl std::future::Future<Output = ()>> {
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| Error::io("installing SIGTERM handler", e))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| Error::io("installing SIGINT handler", e))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
    })
}
