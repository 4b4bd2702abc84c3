//! The `lazysnap` binary: the daemon and the command-line tools.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Large buffers (the FUSE threads' 16 MiB request buffers above all) come straight
    // from mmap: glibc's adaptive threshold would otherwise serve them from an arena
    // and zero them, making every mounted layer cost tens of MiB of resident memory.
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let cli = cli::Cli::parse();
    // the daemon logs its work; one-shot commands only warnings (RUST_LOG overrides)
    let default = match cli.command {
        cli::Command::Serve(_) | cli::Command::FdHolder(_) => {
            "warn,lazysnap=info,lazysnap_fuse=info,lazysnap_registry=info"
        }
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // a reader that went away (`lazysnap layer toc … | head`) is no error to report
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::from(141)
        }
        Err(e) => {
            // one line; a cause the message already ends with is not repeated
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.ends_with(&c) {
                    msg = format!("{msg}: {c}");
                }
            }
            eprintln!("lazysnap: {msg}");
            ExitCode::FAILURE
        }
    }
}
