//! The snapshotter: containerd's overlay snapshotter semantics (metadata store,
//! `snapshots/<id>/{fs,work}` directories, overlay and bind mounts) plus the
//! remote-snapshot protocol, where a [`RemoteFs`] mounts a layer lazily and the
//! snapshot is committed at once.

pub mod apply;
pub mod filter;
pub mod holder;
pub mod labels;
pub mod lazyfs;
pub mod mounts;
pub mod policy;
pub mod remote;
pub(crate) mod restore;
pub mod snapshotter;
pub mod store;
mod usage;

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use apply::ApplyStats;
pub use mounts::Mount;
pub use policy::UnlazyPolicy;
pub use remote::{Progress, RemoteFs};
pub use snapshotter::{Counts, Snapshotter};

/// Snapshot labels, sorted so that listings are stable.
pub type Labels = BTreeMap<String, String>;

/// The numeric id of a snapshot; it names its directory `snapshots/<id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotId(pub u64);

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The kind of a snapshot, as containerd's `snapshots.Kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A read-only snapshot (View).
    View,
    /// A writable snapshot (Prepare), which can be committed.
    Active,
    /// A committed, immutable snapshot; the only kind that can be a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==active`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What containerd's `Stat` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The key or name of the snapshot.
    pub name: String,
    /// The parent's name; empty when none.
    pub parent: String,
    /// The kind.
    pub kind: Kind,
    /// Labels.
    pub labels: Labels,
    /// Creation time.
    pub created: SystemTime,
    /// Last update time.
    pub updated: SystemTime,
}

/// Disk usage of a snapshot's own directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes allocated (blocks × 512), hard links counted once.
    pub size: i64,
    /// Number of inodes, the root directory included.
    pub inodes: i64,
}

/// A snapshot key as containerd's metadata layer sends it: `<namespace>/<seq>/<key>`.
/// The snapshotter treats keys as opaque; this only reads the namespace for logs and
/// metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotKey<'a>(pub &'a str);

impl<'a> SnapshotKey<'a> {
    /// The containerd namespace, if the key has the `<ns>/<seq>/<key>` form.
    pub fn namespace(&self) -> Option<&'a str> {
        let mut parts = self.0.splitn(3, '/');
        let ns = parts.next()?;
        let seq = parts.next()?;
        parts.next()?;
        (!ns.is_empty() && !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit())).then_some(ns)
    }

    /// The client's own key, without the namespace prefix.
    pub fn local(&self) -> &'a str {
        match self.namespace() {
            Some(_) => self.0.splitn(3, '/').nth(2).unwrap_or(self.0),
            None => self.0,
        }
    }
}

#[cfg(test)]
mod tests;
