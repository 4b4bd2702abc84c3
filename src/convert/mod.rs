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
mod layer;
pub mod layout;
pub mod location;
mod oci;
mod optimize;
pub mod progress;
mod remote;
mod sandbox;
mod source;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use lazysnap_registry::{
    BlobSource, Descriptor, Digest, Platform, PushOutcome, RegistryClient, RegistryConfig,
};
use serde::Serialize;

pub use location::Location;
pub use optimize::{Recording, Workload};
pub use progress::{Progress, Silent, Step};

use dest::Dest;
use layer::{Ctx, Done, Fetched, Job};
use oci::media_types::{OCI_CONFIG, OCI_INDEX, OCI_MANIFEST};
use oci::{ImageConfig, SourceIndex, SourceManifest};
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

/// One layer's fate.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    pub source_digest: String,
    pub source_size: u64,
    pub source_media_type: String,
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub toc_digest: Option<String>,
    /// Already in the wanted format: stored as it was.
    pub passthrough: bool,
    /// Files placed before `.prefetch.landmark`.
    pub prioritized: usize,
    /// `uploaded`, `mounted`, `existing`, or `foreign` (never fetched).
    pub stored: &'static str,
}

/// One platform image of the result.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    pub platform: Option<String>,
    pub source_digest: String,
    pub digest: String,
    pub config_digest: String,
    pub layers: Vec<String>,
}

/// What a conversion did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub source: String,
    pub destination: String,
    pub format: &'static str,
    /// Digest and media type of what the destination tag now names.
    pub digest: String,
    pub media_type: &'static str,
    pub images: Vec<ImageSummary>,
    /// Each distinct layer once.
    pub layers: Vec<LayerSummary>,
    /// Compressed bytes of the distinct layers, before and after.
    pub size_before: u64,
    pub size_after: u64,
    pub converted: usize,
    pub passed_through: usize,
    /// Index entries left out (attestations and other non-images).
    pub dropped: usize,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimize: Option<Recording>,
}

/// A platform image of the source.
struct Image {
    /// The index entry it came from.
    entry: Option<Descriptor>,
    digest: Digest,
    manifest: SourceManifest,
    config: Bytes,
    parsed: ImageConfig,
}

/// The source's images, and its index if it has one.
struct Tree {
    index: Option<SourceIndex>,
    images: Vec<Image>,
    dropped: usize,
}

fn not_an_image(name: &str, reason: impl Into<String>) -> Error {
    Error::NotAnImage {
        image: name.to_string(),
        reason: reason.into(),
    }
}

fn load_image(
    source: &Source,
    entry: Option<Descriptor>,
    digest: Digest,
    bytes: &[u8],
) -> Result<Image> {
    let name = format!("{}@{digest}", source.name());
    let manifest: SourceManifest = serde_json::from_slice(bytes)
        .map_err(|e| not_an_image(&name, format!("malformed manifest: {e}")))?;
    if manifest.schema_version != 2 {
        return Err(not_an_image(
            &name,
            format!("manifest schema version {}", manifest.schema_version),
        ));
    }
    if !oci::is_image_config(&manifest.config.media_type) {
        return Err(not_an_image(
            &name,
            format!(
                "its config has media type {:?} (an artifact, not an image)",
                manifest.config.media_type
            ),
        ));
    }
    for l in &manifest.layers {
        if oci::oci_layer_type(&l.media_type).is_none() {
            return Err(not_an_image(
                &name,
                format!(
                    "{} has media type {:?}, not a layer",
                    l.digest, l.media_type
                ),
            ));
        }
    }
    let config = source.config(&manifest.config)?;
    let parsed: ImageConfig = serde_json::from_slice(&config)
        .map_err(|e| not_an_image(&name, format!("config {}: {e}", manifest.config.digest)))?;
    if parsed.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(not_an_image(
            &name,
            format!(
                "its config lists {} diff ids for {} layers",
                parsed.rootfs.diff_ids.len(),
                manifest.layers.len()
            ),
        ));
    }
    Ok(Image {
        entry,
        digest,
        manifest,
        config,
        parsed,
    })
}

/// Index entries that are not runnable images: buildx attestations and the like.
fn is_attestation(d: &Descriptor) -> bool {
    d.annotations.contains_key("vnd.docker.reference.type")
        || d.platform.as_ref().is_some_and(|p| p.os == "unknown")
}

fn load_tree(source: &Source) -> Result<Tree> {
    let name = source.name();
    let root = source.root()?;
    let value: serde_json::Value = serde_json::from_slice(&root.bytes)
        .map_err(|e| not_an_image(&name, format!("its manifest is not JSON: {e}")))?;
    if !oci::is_index(&root.media_type, &value) {
        let image = load_image(source, None, root.digest, &root.bytes)?;
        return Ok(Tree {
            index: None,
            images: vec![image],
            dropped: 0,
        });
    }
    let index: SourceIndex = serde_json::from_value(value)
        .map_err(|e| not_an_image(&name, format!("malformed index: {e}")))?;
    if index.schema_version != 2 {
        return Err(not_an_image(
            &name,
            format!("index schema version {}", index.schema_version),
        ));
    }
    let mut images = Vec::new();
    let mut dropped = 0;
    for entry in &index.manifests {
        if is_attestation(entry) {
            dropped += 1;
            continue;
        }
        if !matches!(
            entry.media_type.as_str(),
            OCI_MANIFEST | oci::media_types::DOCKER_MANIFEST | ""
        ) {
            return Err(not_an_image(
                &name,
                format!(
                    "index entry {} has media type {:?} (nested indexes are not supported)",
                    entry.digest, entry.media_type
                ),
            ));
        }
        let bytes = source.document(entry)?;
        images.push(load_image(
            source,
            Some(entry.clone()),
            entry.digest.clone(),
            &bytes,
        )?);
    }
    if images.is_empty() {
        return Err(not_an_image(&name, "its index lists no image"));
    }
    Ok(Tree {
        index: Some(index),
        images,
        dropped,
    })
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
            let (lists, rec) = record(&ctx, &tree, w, opts)?;
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
    let mut images = Vec::new();
    let mut entries = Vec::new();
    let single = tree.index.is_none();
    let mut top: Option<Digest> = None;
    for img in &tree.images {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (l, old_id) in img.manifest.layers.iter().zip(&img.parsed.rootfs.diff_ids) {
            match done.get(&l.digest) {
                Some(d) => {
                    layers.push(d.descriptor.clone());
                    diff_ids.push(d.diff_id.clone().unwrap_or_else(|| old_id.clone()));
                }
                None => {
                    let mut kept = l.clone();
                    kept.media_type = oci::oci_layer_type(&l.media_type)
                        .unwrap_or(oci::media_types::OCI_FOREIGN)
                        .to_string();
                    layers.push(kept);
                    diff_ids.push(old_id.clone());
                }
            }
        }
        let config = Bytes::from(oci::with_diff_ids(&img.config, &diff_ids)?);
        let config_desc = Descriptor {
            media_type: OCI_CONFIG.to_string(),
            digest: Digest::sha256_of(&config),
            size: config.len() as u64,
            annotations: BTreeMap::new(),
            urls: Vec::new(),
            platform: None,
        };
        dest.put_blob(
            &config_desc.digest,
            config_desc.size,
            &BlobSource::Bytes(config.clone()),
            false,
        )?;
        let manifest = Bytes::from(oci::to_json(&oci::Manifest {
            schema_version: 2,
            media_type: OCI_MANIFEST,
            config: &config_desc,
            layers: &layers,
            annotations: &img.manifest.annotations,
        })?);
        let digest = if single {
            let d = dest.tag(false, &manifest)?;
            top = Some(d.clone());
            d
        } else {
            dest.put_manifest(OCI_MANIFEST, &manifest)?
        };
        if let Some(e) = &img.entry {
            entries.push(Descriptor {
                media_type: OCI_MANIFEST.to_string(),
                digest: digest.clone(),
                size: manifest.len() as u64,
                annotations: e.annotations.clone(),
                urls: Vec::new(),
                platform: e.platform.clone(),
            });
        }
        images.push(ImageSummary {
            platform: img
                .entry
                .as_ref()
                .and_then(|e| e.platform.as_ref())
                .map(Platform::to_string),
            source_digest: img.digest.to_string(),
            digest: digest.to_string(),
            config_digest: config_desc.digest.to_string(),
            layers: layers.iter().map(|l| l.digest.to_string()).collect(),
        });
    }
    let media_type = match &tree.index {
        Some(index) => {
            let bytes = Bytes::from(oci::to_json(&oci::Index {
                schema_version: 2,
                media_type: OCI_INDEX,
                manifests: &entries,
                annotations: &index.annotations,
            })?);
            top = Some(dest.tag(true, &bytes)?);
            OCI_INDEX
        }
        None => OCI_MANIFEST,
    };

    let mut layers = Vec::new();
    for j in &jobs {
        if let Some(d) = done.get(&j.source.digest) {
            layers.push(LayerSummary {
                source_digest: j.source.digest.to_string(),
                source_size: j.source.size,
                source_media_type: j.source.media_type.clone(),
                digest: d.descriptor.digest.to_string(),
                size: d.descriptor.size,
                media_type: d.descriptor.media_type.clone(),
                toc_digest: d.toc_digest.clone(),
                passthrough: d.passthrough,
                prioritized: d.prioritized,
                stored: match d.outcome {
                    PushOutcome::Uploaded => "uploaded",
                    PushOutcome::Mounted => "mounted",
                    PushOutcome::Exists => "existing",
                },
            });
        }
    }
    Ok(Summary {
        source: src.to_string(),
        destination: dest.name(),
        format: opts.format.name(),
        digest: top.map(|d| d.to_string()).unwrap_or_default(),
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

/// `--optimize`: the host platform's layers, quickly converted and mounted, run the
/// workload; returns each layer's opened files (by source digest).
fn record(
    ctx: &Ctx<'_>,
    tree: &Tree,
    w: &Workload,
    opts: &ConvertOptions,
) -> Result<(HashMap<Digest, Vec<String>>, Recording)> {
    let host = Platform::host();
    let img = tree
        .images
        .iter()
        .find(|i| {
            i.entry
                .as_ref()
                .and_then(|e| e.platform.as_ref())
                .is_none_or(|p| host.matches(p))
        })
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--optimize: {} has no image for this machine ({host}) to run",
                ctx.source.name()
            ))
        })?;
    let quick_opts = optimize::quick_options(opts.threads);
    let mut quick = Vec::new();
    for l in &img.manifest.layers {
        let oci_type = oci::oci_layer_type(&l.media_type).unwrap_or_default();
        if oci::is_foreign(oci_type) {
            return Err(Error::InvalidArgument(format!(
                "--optimize: layer {} is non-distributable and cannot be mounted",
                l.digest
            )));
        }
        let name = l.digest.to_string();
        ctx.progress
            .note(&format!("layer {name}: preparing to run the workload"));
        let blob = layer::fetch(ctx, l)?;
        let tar = layer::unpack(&blob.path, ctx.tmp, &|n| ctx.progress.advance(&name, n));
        // the conversion proper reads the blob again
        ctx.fetched.put(l.digest.clone(), blob);
        let tar = tar?;
        let (out, res) = layer::write(tar.path(), ctx.tmp, &quick_opts, &|_| {})?;
        drop(tar);
        let toc_digest = res.toc_digest.parse().map_err(|_| {
            Error::Toc(format!("writer gave a bad TOC digest {:?}", res.toc_digest))
        })?;
        let path = out.into_temp_path();
        quick.push(optimize::Quick {
            blob: path.to_path_buf(),
            toc_digest,
        });
        // kept until the temporary directory goes
        let _ = path.keep();
    }
    ctx.progress.note("running the workload");
    let work = ctx.tmp.join("optimize");
    let (lists, rec) = optimize::record(&quick, &img.parsed.config, w, &work)?;
    ctx.progress.note(&format!(
        "workload: {} ({} files opened)",
        rec.outcome,
        rec.files.len()
    ));
    let mut by_digest: HashMap<Digest, Vec<String>> = HashMap::new();
    for (l, files) in img.manifest.layers.iter().zip(lists) {
        let list = by_digest.entry(l.digest.clone()).or_default();
        for f in files {
            if !list.contains(&f) {
                list.push(f);
            }
        }
    }
    by_digest.retain(|_, v| !v.is_empty());
    Ok((by_digest, rec))
}
