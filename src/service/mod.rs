//! The daemon: containerd's snapshots gRPC API on a unix socket, a status socket for
//! `lazysnap status`, an optional Prometheus endpoint, and signal handling.
//!
//! The lazy layer filesystem plugs in here: build it from [`Config::layer`] and
//! [`Config::cache`] and pass it to [`run`] (or [`serve`]) as the [`RemoteFs`].
//!
//! containerd loads the daemon as a proxy plugin (start lazysnap first):
//!
//! ```toml
//! [proxy_plugins.lazysnap]
//!   type = "snapshot"
//!   address = "/run/lazysnap/lazysnap.sock"
//! ```
//!
//! Shutdown (SIGTERM or SIGINT, or a successor started with `--takeover`) stops
//! accepting and lets calls in flight finish (up to 10 s). Remote layers whose FUSE
//! connections the fd holder keeps (`fuse.keep_mounts_on_exit`, the default) stay
//! mounted, and the next daemon serves them again, so containers running on them keep
//! working; otherwise they are unmounted.

pub mod config;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod signals;
pub mod takeover;

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

pub use config::Config;

use crate::error::{Error, IoContext, Result};
use crate::snapshot::{RemoteFs, Snapshotter};
use metrics::Metrics;

/// How long in-flight calls may take to drain after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

/// Runs the daemon until SIGTERM or SIGINT (`lazysnap serve`).
pub fn run(config: Config, remote: Option<Arc<dyn RemoteFs>>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lazysnap")
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    rt.block_on(async move {
        let stop = signals::shutdown()?;
        serve(config, remote, stop).await
    })
}

/// Binds a unix socket at `path`: the parent directory is created (0711) if missing,
/// a stale socket file is removed, and the socket is made 0660.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .mode(0o711)
            .recursive(true)
            .create(dir)
            .ctx(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path)
            .ctx(|| format!("removing stale socket {}", path.display()))?,
        Ok(_) => {
            return Err(Error::InvalidArgument(format!(
                "{}: exists and is not a socket",
                path.display()
            )));
        }
        Err(_) => {}
    }
    let l = UnixListener::bind(path).ctx(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .ctx(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

/// Opens the snapshotter, mounts remote snapshots again, then serves until
/// `shutdown` resolves; at shutdown it drains calls and unmounts remote layers.
pub async fn serve(
    config: Config,
    remote: Option<Arc<dyn RemoteFs>>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    config.validate().map_err(Error::InvalidArgument)?;
    let root = config.root.clone();
    let policy = config.unlazy.clone();
    let metrics = Arc::new(Metrics::new(remote.as_deref()));
    let snapshotter = tokio::task::spawn_blocking(move || -> Result<Arc<Snapshotter>> {
        let s = Snapshotter::open(&root, remote)?.with_policy(policy);
        s.restore()?;
        let s = Arc::new(s);
        s.start_policies();
        Ok(s)
    })
    .await
    .map_err(|e| Error::Store(format!("start-up task: {e}")))??;

    let endpoint = http::Endpoint {
        snapshotter: snapshotter.clone(),
        metrics: metrics.clone(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    let status_path = config.status_socket();
    let status = bind_unix(&status_path)?;
    let ep = endpoint.clone();
    tasks.spawn(async move {
        while let Ok((io, _)) = status.accept().await {
            ep.handle_bounded(io).await;
        }
    });
    if let Some(addr) = config.metrics_address {
        let l = TcpListener::bind(addr)
            .await
            .ctx(|| format!("binding metrics address {addr}"))?;
        info!(%addr, "metrics endpoint listening");
        let ep = endpoint.clone();
        tasks.spawn(async move {
            while let Ok((io, _)) = l.accept().await {
                ep.handle_bounded(io).await;
            }
        });
    }

    let takeover_path = takeover::socket(&config.root);
    let successor = takeover::listen(&takeover_path)?;
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = successor => {}
        }
    };

    let listener = bind_unix(&config.socket)?;
    info!(socket = %config.socket.display(), root = %config.root.display(), "serving containerd snapshots API");
    let svc = grpc::SnapshotsService::new(snapshotter.clone(), metrics);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = {
        let server = tonic::transport::Server::builder().serve_with_incoming_shutdown(
            svc,
            UnixListenerStream::new(listener),
            async {
                let _ = stop_rx.await;
            },
        );
        tokio::pin!(server);
        tokio::select! {
            r = &mut server => r,
            _ = shutdown => {
                let _ = stop_tx.send(());
                match tokio::time::timeout(DRAIN, &mut server).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!("calls still running after {DRAIN:?}; stopping anyway");
                        Ok(())
                    }
                }
            }
        }
    };
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(endpoint);
    for p in [&config.socket, &status_path, &takeover_path] {
        let _ = std::fs::remove_file(p);
    }
    // Unmount (or leave mounted for the next daemon), and drop the snapshotter (and with it the remote filesystem, which may
    // own a runtime of its own) on the blocking pool, never on an async worker.
    let _ = tokio::task::spawn_blocking(move || {
        snapshotter.close();
        drop(snapshotter);
    })
    .await;
    info!("stopped");
    served.map_err(|e| Error::Unavailable(format!("gRPC server: {e}")))
}
