//! Progress bars per layer (stderr, drawn only on a terminal) and the summary.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// What became of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Mounted lazily by the snapshotter; read from the registry on demand.
    Lazy,
    /// Fetched and extracted by lazysnap.
    Unpacked,
    /// Mounted lazily, then made a plain directory by the daemon (`--unlazy`).
    Unlazied,
    /// The snapshot existed before this pull.
    Present,
}

impl State {
    fn word(self) -> &'static str {
        match self {
            State::Lazy => "lazy",
            State::Unpacked => "unpacked",
            State::Unlazied => "unlazied",
            State::Present => "present",
        }
    }
}

/// One layer's line of the summary.
#[derive(Debug, Serialize)]
pub struct LayerReport {
    pub digest: String,
    pub chain_id: String,
    pub state: State,
    /// Blob bytes this pull downloaded for the layer (none for lazy ones).
    pub downloaded_bytes: u64,
}

/// What `lazysnap pull` prints at the end.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub image: String,
    pub manifest: String,
    pub snapshotter: String,
    pub layers: Vec<LayerReport>,
    pub lazy: usize,
    pub unpacked: usize,
    pub unlazied: usize,
    pub present: usize,
    /// Everything fetched from the registry: manifests, config, unpacked layers.
    pub downloaded_bytes: u64,
    pub seconds: f64,
}

impl Summary {
    /// Counts the layer states.
    pub fn count(&mut self) {
        let n = |s: State| self.layers.iter().filter(|l| l.state == s).count();
        (self.lazy, self.unpacked, self.unlazied, self.present) = (
            n(State::Lazy),
            n(State::Unpacked),
            n(State::Unlazied),
            n(State::Present),
        );
    }

    /// The human-readable lines.
    pub fn text(&self) -> String {
        let mut parts = Vec::new();
        for (n, s) in [
            (self.lazy, State::Lazy),
            (self.unpacked, State::Unpacked),
            (self.unlazied, State::Unlazied),
            (self.present, State::Present),
        ] {
            if n > 0 {
                parts.push(format!("{n} {}", s.word()));
            }
        }
        if parts.is_empty() {
            parts.push("none".into());
        }
        format!(
            "{} ({})\n{} layer{}: {}; {} downloaded in {:.2} s",
            self.image,
            self.manifest,
            self.layers.len(),
            if self.layers.len() == 1 { "" } else { "s" },
            parts.join(", "),
            indicatif::HumanBytes(self.downloaded_bytes),
            self.seconds
        )
    }
}

/// The bars of one pull.
pub struct Bars {
    multi: MultiProgress,
}

impl Bars {
    pub fn new() -> Bars {
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
        }
    }

    /// A bar for layer `digest` of `size` compressed bytes, waiting.
    pub fn layer(&self, digest: &str, size: u64) -> ProgressBar {
        let style = ProgressStyle::with_template(
            "{prefix} {msg:10} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let short = digest.strip_prefix("sha256:").unwrap_or(digest);
        let bar = self.multi.add(ProgressBar::new(size).with_style(style));
        bar.set_prefix(short.chars().take(12).collect::<String>());
        bar.set_message("waiting");
        bar
    }

    /// Ends a layer's bar with its state; only an unpacked layer keeps its bar
    /// (the others downloaded nothing here).
    pub fn done(bar: &ProgressBar, state: State) {
        if state != State::Unpacked
            && let Ok(style) = ProgressStyle::with_template("{prefix} {msg}")
        {
            bar.set_style(style);
        }
        bar.finish_with_message(state.word());
    }
}
