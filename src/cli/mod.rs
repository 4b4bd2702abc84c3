//! The `lazysnap` command line.

pub mod convert;
pub mod fd_holder;
pub mod layer;
pub mod mount;
pub mod pull;
pub mod serve;
pub mod status;
pub mod unlazy;

use clap::{Parser, Subcommand};

/// lazysnap: start containers before their images are downloaded.
#[derive(Debug, Parser)]
#[command(name = "lazysnap", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Convert a whole image (registry or OCI layout) to eStargz or zstd:chunked,
    /// optionally optimized for a workload.
    Convert(convert::ConvertArgs),
    /// Work with single layer blobs: convert, list, read, verify.
    #[command(subcommand)]
    Layer(layer::LayerCommand),
    /// Mount an image's root filesystem (or one layer, or a local blob) lazily and
    /// read-only, without containerd, until interrupted or unmounted.
    Mount(mount::MountArgs),
    /// Pull an image into containerd with the remote-snapshot labels set: lazy
    /// layers are mounted on demand, the others unpacked by lazysnap.
    Pull(pull::PullArgs),
    /// Run the daemon: containerd's snapshots API on a unix socket.
    Serve(serve::ServeArgs),
    /// Show the running daemon's snapshots and mounted layers with fetch progress.
    Status(status::StatusArgs),
    /// Turn remote layers (one snapshot, or every remote layer of an image) into
    /// plain directories, through the running daemon.
    Unlazy(unlazy::UnlazyArgs),
    /// Keep the daemon's FUSE connections open across its restarts (started by `serve`).
    #[command(hide = true)]
    FdHolder(fd_holder::FdHolderArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Convert(a) => convert::run(a),
        Command::Layer(c) => layer::run(c),
        Command::Serve(a) => serve::run(a),
        Command::Status(a) => status::run(a),
        Command::Mount(a) => mount::run(a),
        Command::Pull(a) => pull::run(a),
        Command::Unlazy(a) => unlazy::run(a),
        Command::FdHolder(a) => fd_holder::run(a),
    }
}
