//! What a conversion reports: per layer, per platform image, and in all (the CLI
//! prints it, `--json` as it is).

use lazysnap_registry::PushOutcome;
use serde::Serialize;

use super::layer::{Done, Job};
use super::optimize::Recording;

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

impl LayerSummary {
    pub(crate) fn new(job: &Job, d: &Done) -> LayerSummary {
        LayerSummary {
            source_digest: job.source.digest.to_string(),
            source_size: job.source.size,
            source_media_type: job.source.media_type.clone(),
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
        }
    }
}
