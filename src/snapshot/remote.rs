//! The seam to the lazy layer filesystem (stargz-snapshotter's `FileSystem`).

use std::collections::HashMap;
use std::path::Path;

use crate::error::Result;

/// Mounts remote layers. Implemented by the lazy layer filesystem (the lead's `LazyFs`) and by test fakes.
pub trait RemoteFs: Send + Sync + 'static {
    /// Mounts the layer the labels identify at `mountpoint` (an existing empty dir). Err = cannot be lazy → ordinary Prepare.
    fn mount(&self, mountpoint: &Path, labels: &HashMap<String, String>) -> Result<()>;
    /// Whether the mount at `mountpoint` is healthy (Mounts answers Unavailable if not).
    fn check(&self, mountpoint: &Path, labels: &HashMap<String, String>) -> Result<()>;
    /// Unmounts (idempotent; a missing mount is Ok).
    fn unmount(&self, mountpoint: &Path) -> Result<()>;
    /// Mounted layers and their fetch progress, for `lazysnap status` and metrics.
    fn status(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }
    /// Registers the filesystem's own metrics (fetch counters, cache use) with the
    /// daemon's Prometheus registry; called once at start.
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}
}
