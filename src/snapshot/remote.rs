//! The seam to the lazy layer filesystem (stargz-snapshotter's `FileSystem`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::ApplyStats;
use crate::error::Result;

/// How much of a mounted layer is local, and how much of it readers have asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Uncompressed bytes of file content in the layer.
    pub bytes_total: u64,
    /// Of those, bytes held in the chunk cache.
    pub bytes_cached: u64,
    /// File bytes served to readers (repeated reads count again).
    pub bytes_served: u64,
}

impl Progress {
    /// Whether every chunk of the layer is local.
    pub fn complete(&self) -> bool {
        self.bytes_cached >= self.bytes_total
    }
}

/// Mounts remote layers. Implemented by the lazy layer filesystem (the lead's `LazyFs`) and by test fakes.
pub trait RemoteFs: Send + Sync + 'static {
    /// Mounts the layer the labels identify at `mountpoint` (an existing empty dir). Err = cannot be lazy → ordinary Prepare.
    fn mount(&self, mountpoint: &Path, labels: &HashMap<String, String>) -> Result<()>;
    /// Start-up, before stale mounts under `snapshots/` are detached: takes over the
    /// still-mounted layers of these remote snapshots (mountpoint, labels) whose
    /// connections outlived the previous daemon; returns their mountpoints (as
    /// mountinfo shows them), which must stay mounted.
    fn take_over(&self, snapshots: &[(PathBuf, HashMap<String, String>)]) -> Vec<PathBuf> {
        let _ = snapshots;
        Vec::new()
    }
    /// Start-up: makes a remote snapshot available again. The default mounts it now;
    /// a lazy implementation serves taken-over layers and mounts the rest at first use
    /// (`check`).
    fn restore(&self, mountpoint: &Path, labels: &HashMap<String, String>) -> Result<()> {
        self.mount(mountpoint, labels)
    }
    /// Shutdown: stops serving, leaving mounted the layers the next daemon can take
    /// over; returns their mountpoints (the caller unmounts the others).
    fn leave_mounted(&self) -> Vec<PathBuf> {
        Vec::new()
    }
    /// Whether the mount at `mountpoint` is healthy (Mounts answers Unavailable if not).
    fn check(&self, mountpoint: &Path, labels: &HashMap<String, String>) -> Result<()>;
    /// Unmounts (idempotent; a missing mount is Ok).
    fn unmount(&self, mountpoint: &Path) -> Result<()>;
    /// Writes the layer mounted at `mountpoint` (or, when it is not mounted, the one
    /// the labels name) into `dest`, an empty directory, as a plain overlay layer
    /// directory: chunks come from the cache or are fetched. Unlazy calls it.
    fn materialize(
        &self,
        mountpoint: &Path,
        labels: &HashMap<String, String>,
        dest: &Path,
    ) -> Result<ApplyStats>;
    /// Detaches the mount at `mountpoint` without waiting for its users: overlays
    /// already over it keep being served until they are released (unlazy).
    fn detach(&self, mountpoint: &Path) -> Result<()> {
        self.unmount(mountpoint)
    }
    /// The fetch and read progress of the layer mounted at `mountpoint`, for the
    /// unlazy policies; None when it is not mounted.
    fn progress(&self, _mountpoint: &Path) -> Option<Progress> {
        None
    }
    /// Mounted layers and their fetch progress, for `lazysnap status` and metrics.
    fn status(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }
    /// Registers the filesystem's own metrics (fetch counters, cache use) with the
    /// daemon's Prometheus registry; called once at start.
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}
}
