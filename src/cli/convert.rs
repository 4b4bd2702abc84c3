//! `lazysnap convert SRC DST`: a whole image (registry or OCI layout) to eStargz,
//! eStargz-zstd or zstd:chunked, with progress bars on a terminal and a summary.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use lazysnap::convert::{self, ConvertOptions, Location, Priorities, Progress, Step, Workload};
use lazysnap::format::writer::DEFAULT_CHUNK_SIZE;
use lazysnap_registry::RegistryConfig;

use super::layer::{FormatArg, read_path_list};

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source image: a registry reference, or `oci:DIR[:TAG]` (an OCI image layout).
    source: String,
    /// Destination: a registry reference (a tag), or `oci:DIR[:TAG]` (created if
    /// needed; the tag defaults to `latest`).
    destination: String,
    #[arg(long, value_enum, default_value = "estargz")]
    format: FormatArg,
    /// Split files into chunks of this many bytes.
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
    chunk_size: u64,
    /// Compression level (gzip 1-12, default 9; zstd 1-22, default 3).
    #[arg(long)]
    level: Option<i32>,
    /// Compression threads per layer (default: all cores). Output is identical for
    /// any count.
    #[arg(long)]
    threads: Option<usize>,
    /// Layers converted at once (each holds its decompressed tar in the temporary
    /// directory and about 32 MiB in memory).
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Run a workload in the image (the command after `--`, or the image's own
    /// entrypoint and command) and put the files it opens first in each layer.
    /// Needs root; the workload runs without network.
    #[arg(long, conflicts_with = "prefetch_list")]
    optimize: bool,
    /// With --optimize: stop the workload after this many seconds.
    #[arg(long, default_value_t = 60, requires = "optimize")]
    timeout: u64,
    /// With --optimize: an environment setting for the workload (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", requires = "optimize")]
    env: Vec<String>,
    /// With --optimize: write the workload's output to this file instead of stderr.
    #[arg(long, requires = "optimize")]
    workload_output: Option<PathBuf>,
    /// Put the paths listed in this file (one a line, in access order) first in
    /// every layer that has them.
    #[arg(long)]
    prefetch_list: Option<PathBuf>,
    /// containerd-style certs.d directory for registry hosts.
    #[arg(long, default_value = "/etc/lazysnap/certs.d")]
    certs_dir: PathBuf,
    /// Directory for temporary files (decompressed layers).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// The workload for --optimize.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Progress bars on stderr: one per layer at work, and the layer count.
struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    layers: Mutex<HashMap<String, ProgressBar>>,
    style: ProgressStyle,
    shown: bool,
}

impl Bars {
    fn new() -> Bars {
        let shown = std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if shown {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let total = multi.add(ProgressBar::new(0));
        total.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>4} layers {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        total.enable_steady_tick(Duration::from_millis(200));
        Bars {
            multi,
            total,
            layers: Mutex::default(),
            style: ProgressStyle::with_template(
                "  {prefix} {msg:8} [{bar:30}] {bytes:>10}/{total_bytes:10} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
            shown,
        }
    }

    fn bar(&self, layer: &str) -> ProgressBar {
        let mut m = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(layer.to_string())
            .or_insert_with(|| {
                let b = self.multi.add(ProgressBar::new(0));
                b.set_style(self.style.clone());
                let short = layer.trim_start_matches("sha256:");
                b.set_prefix(short.get(..12).unwrap_or(short).to_string());
                b
            })
            .clone()
    }
}

impl Progress for Bars {
    fn start(&self, layers: usize) {
        self.total.set_length(layers as u64);
    }
    fn step(&self, layer: &str, step: Step, total: u64) {
        let b = self.bar(layer);
        b.set_message(step.name());
        b.set_length(total);
        b.set_position(0);
    }
    fn advance(&self, layer: &str, bytes: u64) {
        let b = self.bar(layer);
        b.set_position((b.position() + bytes).min(b.length().unwrap_or(u64::MAX)));
    }
    fn finish(&self, layer: &str) {
        if let Some(b) = self
            .layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(layer)
        {
            b.finish_and_clear();
            self.multi.remove(&b);
        }
        self.total.inc(1);
    }
    fn note(&self, message: &str) {
        if self.shown {
            let _ = self.multi.println(format!("lazysnap: {message}"));
        } else {
            eprintln!("lazysnap: {message}");
        }
    }
}

pub fn run(a: ConvertArgs) -> Result<()> {
    if !a.command.is_empty() && !a.optimize {
        bail!("a command after `--` is the --optimize workload; add --optimize");
    }
    let priorities = if a.optimize {
        Priorities::Record(Workload {
            command: a.command.clone(),
            env: a.env.clone(),
            timeout: Duration::from_secs(a.timeout.max(1)),
            output: a.workload_output.clone(),
        })
    } else if let Some(p) = &a.prefetch_list {
        Priorities::List(read_path_list(p)?)
    } else {
        Priorities::None
    };
    let opts = ConvertOptions {
        format: a.format.into(),
        chunk_size: a.chunk_size,
        level: a.level,
        threads: a.threads,
        jobs: a.jobs.max(1),
        priorities,
        registry: RegistryConfig {
            certs_dir: a.certs_dir.clone(),
            ..RegistryConfig::default()
        },
        temp_dir: a.tmp_dir.clone(),
    };
    let src = Location::parse(&a.source)?;
    let dst = Location::parse(&a.destination)?;
    let bars = Bars::new();
    let result = convert::convert(&src, &dst, &opts, &bars);
    bars.total.finish_and_clear();
    let _ = bars.multi.clear();
    let s = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let kind = if s.images.len() > 1 || s.media_type.ends_with("index.v1+json") {
        format!("index of {} images", s.images.len())
    } else {
        "image".to_string()
    };
    println!("{} -> {} ({})", s.source, s.destination, s.format);
    println!("  digest  {} ({kind})", s.digest);
    println!(
        "  layers  {}: {} converted, {} passed through",
        s.layers.len(),
        s.converted,
        s.passed_through
    );
    let change = if s.size_before > 0 {
        format!(
            " ({:+.1} %)",
            (s.size_after as f64 / s.size_before as f64 - 1.0) * 100.0
        )
    } else {
        String::new()
    };
    println!(
        "  size    {} -> {}{change}",
        HumanBytes(s.size_before),
        HumanBytes(s.size_after)
    );
    if let Some(o) = &s.optimize {
        println!(
            "  optimize `{}`: {}, {} files first",
            o.command.join(" "),
            o.outcome,
            o.files.len()
        );
    }
    println!("  time    {:.1} s", s.seconds);
    Ok(())
}
