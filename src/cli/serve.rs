//! `lazysnap serve`: the daemon.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tracing::{info, warn};

use lazysnap::service::{self, Config, takeover};
use lazysnap::snapshot::RemoteFs;
use lazysnap::snapshot::holder::Holder;
use lazysnap::snapshot::lazyfs::LazyFs;

/// The fd holder's socket, under the root.
const HOLDER_SOCKET: &str = "fdstore.sock";

/// How long a successor waits for the running daemon to hand over and exit.
const TAKEOVER_WAIT: Duration = Duration::from_secs(60);

/// Arguments of `lazysnap serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); default /etc/lazysnap/config.toml if it exists.
    #[arg(long, env = "LAZYSNAP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Replace the daemon running with this configuration (an upgrade): it stops and
    /// exits without unmounting, and this one serves its layers on.
    #[arg(long)]
    pub takeover: bool,
}

/// Runs the daemon until SIGTERM/SIGINT or a successor's takeover. Log verbosity
/// comes from `RUST_LOG` (e.g. `RUST_LOG=lazysnap=info`).
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref()).context("loading configuration")?;
    if args.takeover {
        match takeover::request(&takeover::socket(&config.root), TAKEOVER_WAIT)
            .context("taking over from the running daemon")?
        {
            Some(pid) => info!(pid, "the running daemon handed over"),
            None => info!("no daemon to take over from; starting"),
        }
    }
    let remote: Option<Arc<dyn RemoteFs>> = if config.lazy {
        let fs = LazyFs::new(
            config.layer.clone(),
            &config.cache_config(),
            config.registry.clone(),
            config.fuse.mount_options(),
        )
        .context("starting the lazy layer filesystem")?;
        if config.fuse.keep_mounts_on_exit {
            match holder(&config.root) {
                Ok(h) => fs.keep_mounts(h),
                Err(e) => warn!("layers will not survive a restart: {e:#}"),
            }
        } else if let Ok(h) = Holder::connect(&config.root.join(HOLDER_SOCKET)) {
            // Kept by an earlier daemon that was configured to keep them: nobody will
            // take them over now, so let their users see an error, not wait forever.
            match h.release_all() {
                Ok(n) => info!(
                    layers = n,
                    "keep_mounts_on_exit = false: released kept layers"
                ),
                Err(e) => warn!("cannot release the layers the fd holder keeps: {e}"),
            }
        }
        Some(Arc::new(fs))
    } else {
        None
    };
    service::run(config, remote).context("lazysnap serve")
}

/// Connects to the fd holder of `root`, starting one if none runs.
fn holder(root: &Path) -> anyhow::Result<Holder> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(root)
        .with_context(|| format!("creating {}", root.display()))?;
    let socket = root.join(HOLDER_SOCKET);
    Holder::connect_or_spawn(&socket, || spawn_holder(&socket)).map_err(Into::into)
}

/// Starts `lazysnap fd-holder` in its own process group (a terminal's ^C or a kill of
/// the daemon's group leaves it running), logging where the daemon logs.
fn spawn_holder(socket: &Path) -> std::io::Result<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("fd-holder")
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()?;
    // Reaped if it exits while we run; it normally outlives us.
    std::thread::Builder::new()
        .name("lazysnap-holder-wait".into())
        .spawn(move || {
            let _ = child.wait();
        })?;
    Ok(())
}
