//! Image conversion: every layer of every platform of an image (in a registry or an
//! OCI layout) rewritten as eStargz, eStargz-zstd or zstd:chunked, with the layer
//! annotations lazy readers need and the configs' diff ids updated, then stored at
//! the destination: blobs first, manifests by digest, the tag last. Layers already in
//! the wanted format pass through. The output depends only on the input and the
//! options (no timestamps), so converting twice gives the same digests.
//!
//! With [`Priorities::Record`] (`--optimize`) the image's workload runs first in its
//! lazily mounted root filesystem, and the files it opens are written first in each
//! layer, followed by `.prefetch.landmark`.

mod dest;
mod image;
mod layer;
pub mod layout;
pub mod location;
mod oci;
mod optimize;
pub mod progress;
mod publish;
mod remote;
mod sandbox;
mod source;
mod summary;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use lazysnap_registry::{Digest, RegistryClient, RegistryConfig};

pub use location::Location;
pub use optimize::{Recording, Workload};
pub use progress::{Progress, Silent, Step};
pub use summary::{ImageSummary, LayerSummary, Summary};

use dest::Dest;
use image::load_tree;
use layer::{Ctx, Done, Fetched, Job};
use source::Source;

use crate::error::{Error, IoContext, Result};
use crate::format::Format;
use crate::format::writer::{DEFAULT_CHUNK_SIZE, WriteOptions};

/// Which files go first in each layer.
#[derive(Debug, Clone, Default)]
pub enum Priorities {
    /// None: eStargz layers start with `.no.prefetch.landmark`.
    #[default]
    None,
    /// These paths, in this order, in every layer that has them.
    List(Vec<String>),
    /// The files the workload opens, per layer, in the order it opens them.
    Record(Workload),
}

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub format: Format,
    /// Chunk size of regular files.
    pub chunk_size: u64,
    /// Compression level; `None` for the format's default.
    pub level: Option<i32>,
    /// Compression threads per layer; `None` for every core.
    pub threads: Option<usize>,
    /// Layers converted at once: each holds a decompressed tar on disk and one
    /// writer batch (about 32 MiB) in memory.
    pub jobs: usize,
    pub priorities: Priorities,
    /// Registry client settings (hosts, credentials, timeouts) for both ends.
    pub registry: RegistryConfig,
    /// Where temporary files go (default: the system's temporary directory).
    pub temp_dir: Option<PathBuf>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            format: Format::Estargz,
            chunk_size: DEFAULT_CHUNK_SIZE,
            level: None,
            threads: None,
            jobs: 2,
            priorities: Priorities::None,
            registry: RegistryConfig::default(),
            temp_dir: None,
        }
    }
}

/// Converts the image at `src` and stores the result at `dst`.
pub fn convert(
    src: &Location,
    dst: &Location,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<Summary> {
    let started = Instant::now();
    if opts.format == Format::LegacyStargz {
        return Err(Error::InvalidArgument(
            "legacy stargz is read-only; convert to estargz instead".into(),
        ));
    }
    if matches!(opts.priorities, Priorities::Record(_)) {
        optimize::check_root()?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lazysnap-convert-io")
        .enable_all()
        .build()
        .ctx(|| "starting the I/O runtime".into())?;
    let client = RegistryClient::new(opts.registry.clone());
    let tmp = match &opts.temp_dir {
        Some(d) => tempfile::Builder::new()
            .prefix("lazysnap-convert-")
            .tempdir_in(d),
        None => tempfile::Builder::new()
            .prefix("lazysnap-convert-")
            .tempdir(),
    }
    .ctx(|| "creating a temporary directory".into())?;
    let source = Source::open(src, &client, rt.handle().clone())?;
    let tree = load_tree(&source)?;
    let dest = Dest::open(dst, &client, rt.handle().clone())?;
    let write = WriteOptions {
        format: opts.format,
        chunk_size: opts.chunk_size,
        level: opts.level,
        prioritized: Vec::new(),
        threads: opts.threads,
    };
    let fetched = Fetched::default();
    let ctx = Ctx {
        source: &source,
        dest: &dest,
        tmp: tmp.path(),
        write: &write,
        progress,
        fetched: &fetched,
        mount_from: source.reference(),
    };

    // which files go first, per layer
    let mut priorities: HashMap<Digest, Vec<String>> = HashMap::new();
    let mut recording = None;
    match &opts.priorities {
        Priorities::None => {}
        Priorities::List(list) => {
            for img in &tree.images {
                for l in &img.manifest.layers {
                    priorities.insert(l.digest.clone(), list.clone());
                }
            }
        }
        Priorities::Record(w) => {
            let (lists, rec) = optimize::record_image(&ctx, &tree, w, opts.threads)?;
            priorities = lists;
            recording = Some(rec);
        }
    }

    // every distinct layer once, in order of appearance
    let mut jobs: Vec<Job> = Vec::new();
    for img in &tree.images {
        for l in &img.manifest.layers {
            let oci_type =
                oci::oci_layer_type(&l.media_type).unwrap_or(oci::media_types::OCI_LAYER);
            // non-distributable layers are kept as they are, never fetched
            if oci::is_foreign(oci_type) {
                continue;
            }
            if jobs.iter().all(|j| j.source.digest != l.digest) {
                jobs.push(Job {
                    source: l.clone(),
                    oci_type,
                    prioritized: priorities.get(&l.digest).cloned().unwrap_or_default(),
                });
            }
        }
    }
    progress.start(jobs.len());
    let done = run_jobs(&ctx, &jobs, opts.jobs.max(1))?;

    // configs and manifests, then the tag
    let (top, media_type, images) = publish::publish(&tree, &done, &dest)?;

    let layers: Vec<LayerSummary> = jobs
        .iter()
        .filter_map(|j| done.get(&j.source.digest).map(|d| LayerSummary::new(j, d)))
        .collect();
    Ok(Summary {
        source: src.to_string(),
        destination: dest.name(),
        format: opts.format.name(),
        digest: top.to_string(),
        media_type,
        images,
        size_before: layers.iter().map(|l| l.source_size).sum(),
        size_after: layers.iter().map(|l| l.size).sum(),
        converted: layers.iter().filter(|l| !l.passthrough).count(),
        passed_through: layers.iter().filter(|l| l.passthrough).count(),
        layers,
        dropped: tree.dropped,
        seconds: started.elapsed().as_secs_f64(),
        optimize: recording,
    })
}

/// Runs the layer jobs on `workers` threads; the first failure stops the rest.
fn run_jobs(ctx: &Ctx<'_>, jobs: &[Job], workers: usize) -> Result<HashMap<Digest, Done>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<HashMap<Digest, Done>> = Mutex::default();
    let error: Mutex<Option<Error>> = Mutex::default();
    std::thread::scope(|s| {
        for _ in 0..workers.min(jobs.len()) {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    match layer::run(ctx, job) {
                        Ok(d) => {
                            ctx.progress.finish(job.source.digest.as_str());
                            results
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(job.source.digest.clone(), d);
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(results.into_inner().unwrap_or_else(|p| p.into_inner()))
}
