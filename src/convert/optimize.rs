//! `--optimize`: the image's workload runs in its root filesystem, mounted lazily by
//! lazysnap from quickly converted copies of its layers with an access recorder on,
//! inside fresh namespaces without network and with a time limit; the files it opens,
//! in order, are what each layer then puts first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lazysnap_fuse::MountOptions;
use serde::Serialize;

use lazysnap_registry::{Digest as RegistryDigest, Platform};

use super::image::Tree;
use super::layer::{self, Ctx};
use super::oci::{self, RunConfig};
use super::progress::Step;
use super::sandbox;
use crate::cache::{CacheConfig, ChunkCache};
use crate::error::{Error, Result};
use crate::format::writer::WriteOptions;
use crate::format::{Digest, Format, OpenOptions};
use crate::layer::access::AccessRecorder;
use crate::layer::mount::LayerContent;
use crate::layer::rootfs::{Rootfs, Upper};
use crate::layer::workers::Workers;
use crate::layer::{FileBlob, LayerConfig, RemoteLayer};

/// `PATH` for a workload whose image sets none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run to learn which files an image needs.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The command and its arguments; empty: the image's entrypoint and command.
    pub command: Vec<String>,
    /// `KEY=VALUE` settings on top of the image's environment.
    pub env: Vec<String>,
    /// The workload is stopped after this long; the files opened so far count.
    pub timeout: Duration,
    /// Where its standard output and error go (default: this process's stderr).
    pub output: Option<PathBuf>,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            command: Vec::new(),
            env: Vec::new(),
            timeout: Duration::from_secs(60),
            output: None,
        }
    }
}

/// What the workload did.
#[derive(Debug, Clone, Serialize)]
pub struct Recording {
    /// The command as run.
    pub command: Vec<String>,
    /// How it ended (`exit 0`, `signal 9`, `timed out after 60 s`).
    pub outcome: String,
    /// The files it opened, in order of first open (paths from the root).
    pub files: Vec<String>,
}

/// A layer converted for the recording run only: fast, never pushed.
#[derive(Debug, Clone)]
pub(crate) struct Quick {
    pub blob: PathBuf,
    pub toc_digest: Digest,
}

/// How the recording copies are written: eStargz-zstd at level 1, because only
/// their TOC and file bytes matter.
pub(crate) fn quick_options(threads: Option<usize>) -> WriteOptions {
    WriteOptions {
        format: Format::EstargzZstd,
        level: Some(1),
        threads,
        ..WriteOptions::default()
    }
}

/// The command line and environment the workload runs with.
fn command_line(run: &RunConfig, w: &Workload) -> Result<(Vec<String>, Vec<String>, String)> {
    let argv: Vec<String> = if w.command.is_empty() {
        run.entrypoint
            .iter()
            .chain(run.cmd.iter())
            .flatten()
            .cloned()
            .collect()
    } else {
        w.command.clone()
    };
    if argv.is_empty() {
        return Err(Error::InvalidArgument(
            "--optimize: the image has no entrypoint or command; give one after `--`".into(),
        ));
    }
    let mut env: Vec<String> = run.env.clone().unwrap_or_default();
    for kv in &w.env {
        let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
        env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
        env.push(kv.clone());
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_string());
    }
    let cwd = run
        .working_dir
        .clone()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/".into());
    Ok((argv, env, cwd))
}

/// The recording run mounts filesystems and makes namespaces: it needs root.
pub(crate) fn check_root() -> Result<()> {
    if nix::unistd::Uid::effective().is_root() {
        return Ok(());
    }
    Err(Error::InvalidArgument(
        "--optimize needs root (FUSE, overlayfs and namespaces)".into(),
    ))
}

/// Mounts `layers` (base first) lazily with a recorder, runs the workload in the
/// root filesystem under `work`, and returns the opened files of each layer, in
/// order, and what happened.
pub(crate) fn record(
    layers: &[Quick],
    run: &RunConfig,
    w: &Workload,
    work: &Path,
) -> Result<(Vec<Vec<String>>, Recording)> {
    check_root()?;
    let (argv, env, cwd) = command_line(run, w)?;
    let cache = Arc::new(ChunkCache::new(&CacheConfig::default())?);
    let cfg = LayerConfig {
        prefetch: false,
        background_fetch: false,
        small_layer_bytes: 0,
        ..LayerConfig::default()
    };
    let workers = Workers::new(4, "lazysnap-optimize");
    let recorder = AccessRecorder::new();
    let mut contents = Vec::new();
    for (i, q) in layers.iter().enumerate() {
        let opts = OpenOptions {
            toc_digest: Some(q.toc_digest),
            ..OpenOptions::default()
        };
        let layer = RemoteLayer::open(FileBlob::open(&q.blob)?, &opts, cache.clone(), cfg.clone())?;
        contents.push(LayerContent::recording(
            layer,
            workers.clone(),
            recorder.clone(),
            i,
        ));
    }
    let root = work.join("rootfs");
    std::fs::create_dir_all(&root)
        .map_err(|e| Error::io(format!("{}: create", root.display()), e))?;
    let rootfs = Rootfs::mount(
        contents,
        &root,
        &work.join("layers"),
        Some(&Upper {
            upper: work.join("upper"),
            work: work.join("work"),
        }),
        &MountOptions {
            passthrough: false,
            ..MountOptions::default()
        },
    )?;
    sandbox::prepare(&root)?;
    let outcome = sandbox::run(&root, &argv, &env, &cwd, w.timeout, w.output.as_deref());
    let mounted: Vec<Arc<RemoteLayer>> = rootfs.layers().to_vec();
    rootfs.unmount()?;
    let outcome = outcome?;
    let opened = recorder.opened();
    let mut names: Vec<HashMap<crate::format::NodeId, String>> =
        vec![HashMap::new(); mounted.len()];
    for (i, layer) in mounted.iter().enumerate() {
        if opened.iter().any(|(l, _)| *l == i) {
            for (path, id) in layer.index().walk() {
                names[i].entry(id).or_insert(path);
            }
        }
    }
    let mut per_layer = vec![Vec::new(); mounted.len()];
    let mut files = Vec::new();
    for (l, id) in opened {
        if let Some(p) = names[l].get(&id) {
            per_layer[l].push(p.clone());
            files.push(p.clone());
        }
    }
    Ok((
        per_layer,
        Recording {
            command: argv,
            outcome: outcome.to_string(),
            files,
        },
    ))
}

/// `--optimize`: the host platform's layers, quickly converted and mounted, run the
/// workload; returns each layer's opened files (by source digest).
pub(crate) fn record_image(
    ctx: &Ctx<'_>,
    tree: &Tree,
    w: &Workload,
    threads: Option<usize>,
) -> Result<(HashMap<RegistryDigest, Vec<String>>, Recording)> {
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
    let quick_opts = quick_options(threads);
    let mut quick = Vec::new();
    ctx.progress.note(&format!(
        "preparing the workload's root filesystem ({} layers)",
        img.manifest.layers.len()
    ));
    for l in &img.manifest.layers {
        let oci_type = oci::oci_layer_type(&l.media_type).unwrap_or_default();
        if oci::is_foreign(oci_type) {
            return Err(Error::InvalidArgument(format!(
                "--optimize: layer {} is non-distributable and cannot be mounted",
                l.digest
            )));
        }
        let name = l.digest.to_string();
        let blob = layer::fetch(ctx, l)?;
        ctx.progress.step(&name, Step::Unpack, l.size);
        let tar = layer::unpack(&blob.path, ctx.tmp, &|n| ctx.progress.advance(&name, n));
        // the conversion proper reads the blob again
        ctx.fetched.put(l.digest.clone(), blob);
        let tar = tar?;
        let size = tar.as_file().metadata().map(|m| m.len()).unwrap_or(0);
        ctx.progress.step(&name, Step::Convert, size);
        let (out, res) = layer::write(tar.path(), ctx.tmp, &quick_opts, &|n| {
            ctx.progress.advance(&name, n)
        })?;
        drop(tar);
        let toc_digest = res.toc_digest.parse().map_err(|_| {
            Error::Toc(format!("writer gave a bad TOC digest {:?}", res.toc_digest))
        })?;
        let path = out.into_temp_path();
        quick.push(Quick {
            blob: path.to_path_buf(),
            toc_digest,
        });
        // kept until the temporary directory goes
        let _ = path.keep();
    }
    ctx.progress.note("running the workload");
    let work = ctx.tmp.join("optimize");
    let (lists, rec) = record(&quick, &img.parsed.config, w, &work)?;
    ctx.progress.note(&format!(
        "workload: {} ({} files opened)",
        rec.outcome,
        rec.files.len()
    ));
    let mut by_digest: HashMap<RegistryDigest, Vec<String>> = HashMap::new();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_from_image_and_overrides() {
        let run = RunConfig {
            env: Some(vec!["PATH=/x".into(), "A=1".into()]),
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
            cmd: Some(vec!["echo hi".into()]),
            working_dir: Some("/app".into()),
        };
        let (argv, env, cwd) = command_line(&run, &Workload::default()).unwrap();
        assert_eq!(argv, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(env, ["PATH=/x", "A=1"]);
        assert_eq!(cwd, "/app");
        let w = Workload {
            command: vec!["python3".into()],
            env: vec!["A=2".into()],
            ..Workload::default()
        };
        let (argv, env, _) = command_line(&RunConfig::default(), &w).unwrap();
        assert_eq!(argv, ["python3"]);
        assert_eq!(env, ["A=2", DEFAULT_PATH]);
        assert!(command_line(&RunConfig::default(), &Workload::default()).is_err());
    }
}
