//! `lazysnap layer …`: convert a tar into a lazy layer, and list, read, verify or
//! dump the TOC of a layer blob.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use lazysnap::format::index::clean_path;
use lazysnap::format::input::InputCompression;
use lazysnap::format::writer::{self, WriteOptions};
use lazysnap::format::{self, Digest, FileSource, Format, Kind, Layer, OpenOptions, ReadAt};
use lazysnap::layer::tail::TailCached;
use lazysnap::layer::{RegistryBlob, RemoteBlob, image};
use lazysnap_registry::{Reference, RegistryClient, RegistryConfig};
use std::sync::Arc;

/// `lazysnap layer` subcommands.
#[derive(Debug, Subcommand)]
pub enum LayerCommand {
    /// Convert a layer (tar, tar.gz or tar.zst) to eStargz, eStargz-zstd or zstd:chunked.
    Convert(ConvertArgs),
    /// List the entries of a layer's table of contents.
    Ls(SrcArgs),
    /// Print a file of a layer to standard output (verified chunk by chunk).
    Cat {
        #[command(flatten)]
        src: SrcArgs,
        /// Path of the file inside the layer.
        path: String,
    },
    /// Check the TOC digest and every chunk of a layer.
    Verify(SrcArgs),
    /// Print the layer's table of contents as stored.
    Toc(SrcArgs),
}

/// Output formats of `layer convert`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// eStargz with gzip members (readable by every runtime as tar+gzip).
    Estargz,
    /// stargz-snapshotter's zstd variant of eStargz.
    EstargzZstd,
    /// containers/storage zstd:chunked (podman, CRI-O).
    ZstdChunked,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Estargz => Format::Estargz,
            FormatArg::EstargzZstd => Format::EstargzZstd,
            FormatArg::ZstdChunked => Format::ZstdChunked,
        }
    }
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Input layer: a tar, tar.gz or tar.zst file ("-" for standard input).
    input: PathBuf,
    /// Output blob file.
    output: PathBuf,
    #[arg(long, value_enum, default_value = "estargz")]
    format: FormatArg,
    /// Split files into chunks of this many bytes.
    #[arg(long, default_value_t = writer::DEFAULT_CHUNK_SIZE)]
    chunk_size: u64,
    /// Compression level (gzip 1-12, default 9; zstd 1-22, default 3).
    #[arg(long)]
    level: Option<i32>,
    /// File listing paths to put first (one per line, in access order); they are
    /// prefetched when the layer is mounted.
    #[arg(long)]
    prioritized: Option<PathBuf>,
    /// Compression threads (default: all cores). Output is identical for any count.
    #[arg(long)]
    threads: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct SrcArgs {
    /// The layer blob file, or with --layer an image reference in a registry.
    src: String,
    /// Read layer N (0-based, base first) or DIGEST of the image SRC names.
    #[arg(long)]
    layer: Option<String>,
    /// With --layer: containerd-style certs.d directory for registry hosts.
    #[arg(long, default_value = "/etc/lazysnap/certs.d")]
    certs_dir: PathBuf,
    /// Expected TOC digest (the `containerd.io/snapshot/stargz/toc.digest` annotation,
    /// or the zstd:chunked manifest checksum).
    #[arg(long)]
    toc_digest: Option<String>,
    /// Print JSON (ls, verify).
    #[arg(long)]
    json: bool,
}

/// Runs a `layer` subcommand.
pub fn run(cmd: LayerCommand) -> Result<()> {
    match cmd {
        LayerCommand::Convert(a) => convert(a),
        LayerCommand::Ls(a) => ls(&a),
        LayerCommand::Cat { src, path } => cat(&src, &path),
        LayerCommand::Verify(a) => verify(&a),
        LayerCommand::Toc(a) => {
            let (layer, _src) = open(&a)?;
            std::io::stdout().write_all(&layer.toc().json)?;
            Ok(())
        }
    }
}

/// An uncompressed tar: the input file itself, or a decompressed temporary copy.
fn input_tar(path: &Path) -> Result<(FileSource, Option<tempfile::NamedTempFile>)> {
    let mut reader: Box<dyn Read> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(File::open(path).with_context(|| format!("{}: cannot open", path.display()))?)
    };
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = reader
            .read(&mut head[got..])
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let kind = InputCompression::sniff(&head[..got]);
    if kind == InputCompression::None && path != Path::new("-") {
        let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        return Ok((FileSource::new(f)?, None));
    }
    let chained: Box<dyn Read> = Box::new(std::io::Cursor::new(head[..got].to_vec()).chain(reader));
    let mut dec = kind.decoder(chained)?;
    let mut tmp = tempfile::NamedTempFile::new().context("creating a temporary file")?;
    std::io::copy(&mut dec, &mut BufWriter::new(tmp.as_file_mut()))
        .with_context(|| format!("{}: decompressing ({kind:?})", path.display()))?;
    let src = FileSource::new(tmp.reopen()?)?;
    Ok((src, Some(tmp)))
}

fn convert(a: ConvertArgs) -> Result<()> {
    let (src, _tmp) = input_tar(&a.input)?;
    let prioritized = match &a.prioritized {
        Some(p) => read_path_list(p)?,
        None => Vec::new(),
    };
    let opts = WriteOptions {
        format: a.format.into(),
        chunk_size: a.chunk_size,
        level: a.level,
        prioritized,
        threads: a.threads,
    };
    let dir = a
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("{}: cannot create the output", a.output.display()))?;
    let res = writer::write_layer(&src, &mut BufWriter::new(tmp.as_file_mut()), &opts)
        .with_context(|| format!("{}: conversion failed", a.input.display()))?;
    tmp.persist(&a.output)
        .with_context(|| format!("{}: cannot write the output", a.output.display()))?;
    for m in &res.missing_prioritized {
        tracing::warn!(path = %m, "prioritized file is not in the layer");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&res)?);
    } else {
        println!("format: {}", res.format);
        println!("media_type: {}", res.media_type);
        println!("blob_digest: {}", res.blob_digest);
        println!("blob_size: {}", res.blob_size);
        println!("toc_digest: {}", res.toc_digest);
        println!("diff_id: {}", res.diff_id);
        println!("uncompressed_size: {}", res.uncompressed_size);
        println!("entries: {}", res.entries);
        for (k, v) in &res.annotations {
            println!("annotation: {k}={v}");
        }
    }
    Ok(())
}

/// Paths listed in a file, one a line, in order (blank lines and `#` comments
/// skipped): what `--prioritized` and `--prefetch-list` read.
pub fn read_path_list(p: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string(p)
        .with_context(|| format!("{}: cannot read the list of paths", p.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

/// A blob to read: a local file, or a registry blob read by ranges (the runtime
/// that drives the registry client lives as long as the source).
struct Source {
    name: String,
    read: Arc<dyn ReadAt>,
    toc_digest: Option<Digest>,
    toc_location: Option<format::TocLocation>,
    _rt: Option<tokio::runtime::Runtime>,
}

fn source(a: &SrcArgs) -> Result<Source> {
    let flag_digest = a
        .toc_digest
        .as_deref()
        .map(str::parse::<Digest>)
        .transpose()
        .with_context(|| "--toc-digest".to_string())?;
    let Some(sel) = a.layer.as_deref() else {
        let path = Path::new(&a.src);
        let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        return Ok(Source {
            name: path.display().to_string(),
            read: Arc::new(FileSource::new(f)?),
            toc_digest: flag_digest,
            toc_location: None,
            _rt: None,
        });
    };
    let image = a.src.as_str();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let reference = Reference::parse(image).with_context(|| format!("{image}: bad reference"))?;
    let client = RegistryClient::new(RegistryConfig {
        certs_dir: a.certs_dir.clone(),
        ..RegistryConfig::default()
    });
    let img = rt
        .block_on(client.resolve(&reference))
        .with_context(|| format!("{image}: cannot resolve"))?;
    let (i, d) = img
        .layers
        .iter()
        .enumerate()
        .find(|(i, d)| sel.parse::<usize>().ok() == Some(*i) || d.digest.as_str() == sel)
        .with_context(|| format!("{image}: no layer {sel} (it has {})", img.layers.len()))?;
    let opts = image::open_options(&d.annotations)?.unwrap_or_default();
    let blob = client
        .blob(&img.reference, d)
        .with_context(|| format!("{image}: layer {i}"))?;
    let remote: Arc<dyn RemoteBlob> = RegistryBlob::new(blob, rt.handle().clone());
    let name = remote.name().to_string();
    Ok(Source {
        name,
        read: Arc::new(TailCached::new(remote)?),
        toc_digest: flag_digest.or(opts.toc_digest),
        toc_location: opts.toc_location,
        _rt: Some(rt),
    })
}

fn open(a: &SrcArgs) -> Result<(Layer<Arc<dyn ReadAt>>, Source)> {
    let src = source(a)?;
    let opts = OpenOptions {
        toc_digest: src.toc_digest,
        toc_location: src.toc_location,
        ..OpenOptions::default()
    };
    let layer = Layer::open(src.read.clone(), &opts)
        .with_context(|| format!("{}: not a readable lazy layer", src.name))?;
    Ok((layer, src))
}

#[derive(serde::Serialize)]
struct LsEntry<'a> {
    path: String,
    #[serde(rename = "type")]
    kind: &'a str,
    size: i64,
    mode: String,
    uid: i64,
    gid: i64,
    link: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    modtime: &'a str,
}

fn display_name(name: &str) -> Result<String> {
    Ok(format!("/{}", clean_path(name)?.join("/")))
}

fn ls(a: &SrcArgs) -> Result<()> {
    let (layer, _src) = open(a)?;
    let toc = format::toc::parse_json(&layer.toc().json)?;
    let mut rows = Vec::new();
    for e in toc.entries.iter().filter(|e| e.kind != "chunk") {
        let link = if e.kind == "hardlink" {
            display_name(&e.link_name)?
        } else {
            e.link_name.clone()
        };
        rows.push((display_name(&e.name)?, e, link));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = BufWriter::new(std::io::stdout().lock());
    for (path, e, link) in &rows {
        let link = if link.is_empty() { "-" } else { link.as_str() };
        if a.json {
            let row = LsEntry {
                path: path.clone(),
                kind: &e.kind,
                size: e.size,
                mode: format!("{:o}", e.mode),
                uid: e.uid,
                gid: e.gid,
                link,
                modtime: &e.modtime,
            };
            writeln!(out, "{}", serde_json::to_string(&row)?)?;
        } else {
            writeln!(
                out,
                "{path}\t{}\t{}\t{:o}\t{}\t{}\t{link}",
                e.kind, e.size, e.mode, e.uid, e.gid
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

fn cat(a: &SrcArgs, path: &str) -> Result<()> {
    let (layer, src) = open(a)?;
    let id = layer
        .index()
        .lookup_path(path)
        .with_context(|| format!("{}: {path}: no such file in the layer", src.name))?;
    let node = layer
        .index()
        .node(id)
        .with_context(|| format!("{path}: bad node"))?;
    if node.kind != Kind::Reg {
        bail!("{}: {path}: not a regular file", src.name);
    }
    let mut out = BufWriter::new(std::io::stdout().lock());
    layer
        .copy_file(id, path, &mut out)
        .with_context(|| src.name.clone())?;
    out.flush()?;
    Ok(())
}

fn verify(a: &SrcArgs) -> Result<()> {
    let (layer, src) = open(a)?;
    let report = layer
        .verify_all()
        .with_context(|| format!("{}: verification failed", src.name))?;
    if a.json {
        let v = serde_json::json!({
            "format": layer.format().name(),
            "toc_digest": layer.toc().digest.to_string(),
            "manifest_checksum": layer.toc().compressed_digest.map(|d| d.to_string()),
            "files": report.files,
            "chunks": report.chunks,
            "bytes": report.bytes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "ok: {} layer, TOC {}, {} files, {} chunks, {} bytes verified",
            layer.format().name(),
            layer.toc().digest,
            report.files,
            report.chunks,
            report.bytes
        );
    }
    Ok(())
}
