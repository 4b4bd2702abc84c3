//! Converting one layer: its blob as a local file, decompressed to a temporary tar,
//! rewritten by the format writer into a temporary blob, then stored at the
//! destination; the temporary files go as soon as they are used, so a conversion
//! holds at most a few layers on disk and one writer batch per layer in memory.
//! Layers already in the wanted format pass through untouched.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lazysnap_registry::{BlobSource, Descriptor, Digest, PushOutcome, Reference};

use super::dest::Dest;
use super::oci::media_types::{OCI_LAYER_GZIP, OCI_LAYER_ZSTD};
use super::progress::{Counted, CountedRead, Progress, Step};
use super::source::{LocalBlob, Source};
use crate::error::{Error, IoContext, Result};
use crate::format::input::InputCompression;
use crate::format::writer::{self, WriteOptions, WriteResult};
use crate::format::{ANNOTATION_TOC_DIGEST, ANNOTATION_ZSTD_CHECKSUM, FileSource, Format};

/// One layer to convert.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    /// The descriptor as the source manifest has it.
    pub source: Descriptor,
    /// The OCI spelling of its media type.
    pub oci_type: &'static str,
    /// Paths to put first, in order (empty: none).
    pub prioritized: Vec<String>,
}

/// What became of a layer.
#[derive(Debug, Clone)]
pub(crate) struct Done {
    /// The descriptor for the new manifest.
    pub descriptor: Descriptor,
    /// The new diff id; `None` when the source config's still holds.
    pub diff_id: Option<String>,
    pub toc_digest: Option<String>,
    pub passthrough: bool,
    /// Prioritized files found in the layer.
    pub prioritized: usize,
    pub outcome: PushOutcome,
}

/// Source blobs fetched ahead (by `--optimize`), used once by the conversion.
#[derive(Debug, Default)]
pub(crate) struct Fetched(Mutex<HashMap<Digest, LocalBlob>>);

impl Fetched {
    pub fn put(&self, digest: Digest, blob: LocalBlob) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest, blob);
    }

    fn take(&self, digest: &Digest) -> Option<LocalBlob> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(digest)
    }
}

/// What every layer job shares.
pub(crate) struct Ctx<'a> {
    pub source: &'a Source,
    pub dest: &'a Dest,
    pub tmp: &'a Path,
    pub write: &'a WriteOptions,
    pub progress: &'a dyn Progress,
    pub fetched: &'a Fetched,
    /// The source's repository, when the destination may mount blobs from it.
    pub mount_from: Option<&'a Reference>,
}

/// Whether a layer is already what `format` writes: the compression and the TOC
/// annotations a lazy reader needs.
pub(crate) fn already_converted(d: &Descriptor, oci_type: &str, format: Format) -> bool {
    let a = &d.annotations;
    let toc = a.contains_key(ANNOTATION_TOC_DIGEST);
    let chunked = a.contains_key(ANNOTATION_ZSTD_CHECKSUM);
    match format {
        Format::Estargz => oci_type == OCI_LAYER_GZIP && toc,
        Format::EstargzZstd => oci_type == OCI_LAYER_ZSTD && toc && !chunked,
        Format::ZstdChunked => oci_type == OCI_LAYER_ZSTD && chunked && !toc,
        Format::LegacyStargz => false,
    }
}

fn layer_error(ctx: &Ctx<'_>, digest: &Digest, e: impl std::fmt::Display) -> Error {
    Error::Fetch {
        blob: format!("{} layer {digest}", ctx.source.name()),
        reason: e.to_string(),
    }
}

/// Gets the source blob of `d` (fetched ahead, or now).
pub(crate) fn fetch(ctx: &Ctx<'_>, d: &Descriptor) -> Result<LocalBlob> {
    if let Some(b) = ctx.fetched.take(&d.digest) {
        return Ok(b);
    }
    let name = d.digest.to_string();
    ctx.progress.step(&name, Step::Fetch, d.size);
    ctx.source
        .fetch_layer(d, ctx.tmp, &|n| ctx.progress.advance(&name, n))
}

fn discard(blob: LocalBlob) {
    if blob.temporary {
        let _ = std::fs::remove_file(blob.path);
    }
}

/// Decompresses (gzip, zstd, or none, told by the magic bytes) `blob` into a new
/// temporary tar file in `dir`.
pub(crate) fn unpack(
    blob: &Path,
    dir: &Path,
    report: &(dyn Fn(u64) + Sync),
) -> Result<tempfile::NamedTempFile> {
    let f = std::fs::File::open(blob).ctx(|| format!("{}: open", blob.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, CountedRead { inner: f, report });
    let kind = InputCompression::sniff(r.fill_buf().ctx(|| format!("{}: read", blob.display()))?);
    let mut dec = kind
        .decoder(Box::new(r))
        .ctx(|| format!("{}: {kind:?} stream", blob.display()))?;
    let mut tar = tempfile::Builder::new()
        .suffix(".tar")
        .tempfile_in(dir)
        .ctx(|| format!("{}: temporary file", dir.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, tar.as_file_mut());
    std::io::copy(&mut dec, &mut out).map_err(|e| {
        Error::Tar(format!(
            "decompressing the {kind:?} layer stream failed: {e}"
        ))
    })?;
    out.flush().ctx(|| format!("{}: write", dir.display()))?;
    drop(out);
    Ok(tar)
}

/// Writes the lazy layer of the tar at `tar` into a new temporary file in `dir`.
pub(crate) fn write(
    tar: &Path,
    dir: &Path,
    opts: &WriteOptions,
    report: &(dyn Fn(u64) + Sync),
) -> Result<(tempfile::NamedTempFile, WriteResult)> {
    let src = FileSource::new(std::fs::File::open(tar).ctx(|| format!("{}: open", tar.display()))?)
        .ctx(|| format!("{}: open", tar.display()))?;
    let mut out = tempfile::Builder::new()
        .suffix(".blob")
        .tempfile_in(dir)
        .ctx(|| format!("{}: temporary file", dir.display()))?;
    let res = {
        let mut w = BufWriter::with_capacity(1 << 20, out.as_file_mut());
        let res = writer::write_layer(&Counted { inner: src, report }, &mut w, opts)?;
        w.flush().ctx(|| format!("{}: write", dir.display()))?;
        res
    };
    Ok((out, res))
}

/// Converts (or passes through) one layer and stores it at the destination.
pub(crate) fn run(ctx: &Ctx<'_>, job: &Job) -> Result<Done> {
    let d = &job.source;
    let name = d.digest.to_string();
    if job.prioritized.is_empty() && already_converted(d, job.oci_type, ctx.write.format) {
        let outcome = pass_through(ctx, d)?;
        ctx.progress.note(&format!(
            "layer {name}: already {}",
            ctx.write.format.name()
        ));
        let mut descriptor = d.clone();
        descriptor.media_type = job.oci_type.to_string();
        return Ok(Done {
            toc_digest: d
                .annotations
                .get(ANNOTATION_TOC_DIGEST)
                .or_else(|| d.annotations.get(ANNOTATION_ZSTD_CHECKSUM))
                .cloned(),
            descriptor,
            diff_id: None,
            passthrough: true,
            prioritized: 0,
            outcome,
        });
    }
    let blob = fetch(ctx, d)?;
    ctx.progress.step(&name, Step::Unpack, d.size);
    let tar = unpack(&blob.path, ctx.tmp, &|n| ctx.progress.advance(&name, n));
    discard(blob);
    let tar = tar.map_err(|e| layer_error(ctx, &d.digest, e))?;
    let tar_size = tar
        .as_file()
        .metadata()
        .ctx(|| format!("{}: stat", tar.path().display()))?
        .len();
    ctx.progress.step(&name, Step::Convert, tar_size);
    let opts = WriteOptions {
        prioritized: job.prioritized.clone(),
        ..ctx.write.clone()
    };
    let scratch: PathBuf = ctx
        .dest
        .scratch_dir()
        .unwrap_or_else(|| ctx.tmp.to_path_buf());
    let (out, res) = write(tar.path(), &scratch, &opts, &|n| {
        ctx.progress.advance(&name, n)
    })
    .map_err(|e| layer_error(ctx, &d.digest, e))?;
    drop(tar);
    let digest = Digest::parse(&res.blob_digest)?;
    ctx.progress.step(&name, Step::Push, 0);
    let out = out.into_temp_path();
    let movable = ctx.dest.scratch_dir().is_some();
    let outcome = ctx.dest.put_blob(
        &digest,
        res.blob_size,
        &BlobSource::File(out.to_path_buf()),
        movable,
    )?;
    if movable && outcome == PushOutcome::Uploaded {
        // renamed into the layout: the temporary name is gone
        let _ = out.keep();
    }
    Ok(Done {
        descriptor: Descriptor {
            media_type: res.media_type.to_string(),
            digest,
            size: res.blob_size,
            annotations: res.annotations.clone(),
            urls: Vec::new(),
            platform: None,
        },
        diff_id: Some(res.diff_id.clone()),
        toc_digest: Some(res.toc_digest.clone()),
        passthrough: false,
        prioritized: job.prioritized.len() - res.missing_prioritized.len(),
        outcome,
    })
}

/// Stores a layer that is already converted: mounted or found at the destination
/// when it can be, else fetched and stored as it is.
fn pass_through(ctx: &Ctx<'_>, d: &Descriptor) -> Result<PushOutcome> {
    let name = d.digest.to_string();
    if let Some(o) = ctx.dest.try_mount(&d.digest, d.size, ctx.mount_from)? {
        return Ok(o);
    }
    let blob = fetch(ctx, d)?;
    ctx.progress.step(&name, Step::Push, 0);
    let r = ctx.dest.put_blob(
        &d.digest,
        d.size,
        &BlobSource::File(blob.path.clone()),
        false,
    );
    discard(blob);
    r
}
