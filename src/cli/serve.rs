//! `lazysnap serve`: the daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use std::sync::Arc;

use lazysnap::service::{self, Config};
use lazysnap::snapshot::RemoteFs;
use lazysnap::snapshot::lazyfs::LazyFs;

/// Arguments of `lazysnap serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); default /etc/lazysnap/config.toml if it exists.
    #[arg(long, env = "LAZYSNAP_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Runs the daemon until SIGTERM/SIGINT. Log verbosity comes from `RUST_LOG`
/// (e.g. `RUST_LOG=lazysnap=info`).
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref()).context("loading configuration")?;
    let remote: Option<Arc<dyn RemoteFs>> = if config.lazy {
        let fs = LazyFs::new(
            config.layer.clone(),
            &config.cache_config(),
            config.registry.clone(),
            config.fuse.mount_options(),
        )
        .context("starting the lazy layer filesystem")?;
        Some(Arc::new(fs))
    } else {
        None
    };
    service::run(config, remote).context("lazysnap serve")
}
