//! `lazysnap fd-holder` (hidden): the process that keeps the daemon's FUSE connections
//! open across its restarts. `lazysnap serve` starts it when none runs.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

/// Arguments of `lazysnap fd-holder`.
#[derive(Debug, Args)]
pub struct FdHolderArgs {
    /// The socket to listen on (`<root>/fdstore.sock`).
    #[arg(long)]
    pub socket: PathBuf,
}

/// Holds connections until nothing is held and no daemon is connected.
pub fn run(args: FdHolderArgs) -> anyhow::Result<()> {
    lazysnap::snapshot::holder::server::run(&args.socket)
        .with_context(|| format!("fd holder on {}", args.socket.display()))
}
