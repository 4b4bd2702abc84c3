//! `lazysnap mount`: an image's root filesystem (or one layer, or a local blob),
//! mounted lazily and read-only without containerd, until SIGINT/SIGTERM or until
//! someone unmounts it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use lazysnap::cache::{CacheConfig, ChunkCache};
use lazysnap::format::OpenOptions;
use lazysnap::layer::mount::LayerContent;
use lazysnap::layer::rootfs::Rootfs;
use lazysnap::layer::workers::Workers;
use lazysnap::layer::{FileBlob, LayerConfig, RegistryBlob, RemoteBlob, RemoteLayer, image};
use lazysnap_fuse::MountOptions;
use lazysnap_registry::{Reference, RegistryClient, RegistryConfig};

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Image reference (e.g. `127.0.0.1:5000/app:latest`), or a local layer blob file.
    source: String,
    /// Directory to mount at (must exist).
    dir: PathBuf,
    /// Mount only this layer of the image (digest, or a 0-based index).
    #[arg(long)]
    layer: Option<String>,
    /// Expected TOC digest (local blob files).
    #[arg(long)]
    toc_digest: Option<String>,
    /// Disk chunk cache directory (default: memory only).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Do not prefetch the prioritized files.
    #[arg(long)]
    no_prefetch: bool,
    /// Do not fetch the rest of each layer in the background.
    #[arg(long)]
    no_background_fetch: bool,
    /// containerd-style certs.d directory for registry hosts.
    #[arg(long, default_value = "/etc/lazysnap/certs.d")]
    certs_dir: PathBuf,
    /// Never open files in FUSE passthrough mode (by default fully cached files are
    /// read by the kernel directly where it supports passthrough).
    #[arg(long)]
    no_passthrough: bool,
    /// Print per-layer fetch statistics as JSON when unmounting.
    #[arg(long)]
    stats: bool,
}

/// Stops the background fetches, then unmounts (on every way out).
struct Cleanup {
    rootfs: Option<Rootfs>,
    stop: Arc<AtomicBool>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.rootfs.take()
            && let Err(e) = r.unmount()
        {
            eprintln!("lazysnap: {e}");
        }
    }
}

pub fn run(a: MountArgs) -> Result<()> {
    if !a.dir.is_dir() {
        bail!("{}: not a directory", a.dir.display());
    }
    let cache = Arc::new(ChunkCache::new(&CacheConfig {
        dir: a.cache_dir.clone(),
        ..CacheConfig::default()
    })?);
    let cfg = LayerConfig {
        prefetch: !a.no_prefetch,
        small_layer_bytes: if a.no_prefetch {
            0
        } else {
            LayerConfig::default().small_layer_bytes
        },
        background_fetch: !a.no_background_fetch,
        ..LayerConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    let mut blobs: Vec<(Arc<dyn RemoteBlob>, OpenOptions)> = Vec::new();
    let local = Path::new(&a.source);
    if local.is_file() {
        let toc_digest = a
            .toc_digest
            .as_deref()
            .map(str::parse)
            .transpose()
            .context("--toc-digest")?;
        blobs.push((
            FileBlob::open(local)?,
            OpenOptions {
                toc_digest,
                ..OpenOptions::default()
            },
        ));
    } else {
        let reference = Reference::parse(&a.source)
            .with_context(|| format!("{}: not a file and not an image reference", a.source))?;
        let client = RegistryClient::new(RegistryConfig {
            certs_dir: a.certs_dir.clone(),
            ..RegistryConfig::default()
        });
        let img = rt
            .block_on(client.resolve(&reference))
            .with_context(|| format!("{reference}: cannot resolve"))?;
        let chosen: Vec<(usize, &lazysnap_registry::Descriptor)> = match &a.layer {
            None => img.layers.iter().enumerate().collect(),
            Some(sel) => {
                let found = img.layers.iter().enumerate().find(|(i, d)| {
                    sel.parse::<usize>().ok() == Some(*i) || d.digest.as_str() == sel.as_str()
                });
                vec![found.with_context(|| format!("{reference}: no layer {sel}"))?]
            }
        };
        for (i, d) in chosen {
            let opts = image::open_options(&d.annotations)?.with_context(|| {
                format!(
                    "{reference}: layer {i} ({}) has no TOC digest annotation: it is not an \
                     eStargz or zstd:chunked layer and cannot be mounted lazily",
                    d.digest
                )
            })?;
            let blob = client
                .blob(&img.reference, d)
                .with_context(|| format!("{reference}: layer {}", d.digest))?;
            blobs.push((RegistryBlob::new(blob, rt.handle().clone()), opts));
        }
    }

    // each layer is opened and its prioritized files prefetched before the root
    // filesystem appears, so that the first reader finds them
    let workers = Workers::new(8, "lazysnap-read");
    let mut layers = Vec::new();
    for (i, (blob, opts)) in blobs.into_iter().enumerate() {
        let name = blob.name().to_string();
        let layer = RemoteLayer::open(blob, &opts, cache.clone(), cfg.clone())
            .with_context(|| format!("{name}: cannot open lazily"))?;
        let fetched = layer.prefetch().unwrap_or_else(|e| {
            eprintln!("lazysnap: {name}: prefetch failed: {e}");
            0
        });
        eprintln!(
            "lazysnap: layer {i} {} ({} entries{}) opened",
            name,
            layer.index().entry_count(),
            if fetched > 0 {
                format!(", {fetched} bytes prefetched")
            } else {
                String::new()
            }
        );
        layers.push(layer);
    }
    let private = std::env::temp_dir().join(format!("lazysnap-mount-{}", std::process::id()));
    let contents = layers
        .iter()
        .map(|l| LayerContent::new(l.clone(), workers.clone()))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let cleanup = Cleanup {
        rootfs: Some(Rootfs::mount(
            contents,
            &a.dir,
            &private,
            None,
            &MountOptions {
                passthrough: !a.no_passthrough,
                ..MountOptions::default()
            },
        )?),
        stop: stop.clone(),
    };
    if cfg.background_fetch {
        for layer in &layers {
            let (l, s) = (layer.clone(), stop.clone());
            std::thread::Builder::new()
                .name("lazysnap-bg".into())
                .spawn(move || {
                    if let Err(e) = l.fetch_all(&s, true) {
                        tracing::warn!(layer = l.name(), error = %e, "background fetch stopped");
                    }
                })
                .context("starting the background fetch")?;
        }
    }
    eprintln!(
        "lazysnap: {} mounted; Ctrl-C or umount to stop",
        a.dir.display()
    );

    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if !lazysnap_fuse::is_mountpoint(&a.dir) {
                        break;
                    }
                }
            }
        }
        Ok::<_, std::io::Error>(())
    })?;
    if a.stats {
        let stats: Vec<_> = layers.iter().map(|l| l.stats()).collect();
        println!("{}", serde_json::to_string_pretty(&stats)?);
    }
    drop(cleanup);
    Ok(())
}
