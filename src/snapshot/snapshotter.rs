//! The snapshotter: containerd's overlay snapshotter plus remote snapshots.
//!
//! Directories follow containerd's order: a `snapshots/new-*` temp dir is made, the
//! metadata is written in the transaction, the temp dir is renamed to `snapshots/<id>`
//! and only then is the transaction committed; any failure removes the directory and
//! rolls the metadata back, so a directory exists only for committed metadata (a crash
//! between rename and commit leaves an orphan that [`Snapshotter::cleanup`] removes).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tracing::{info, warn};

use super::filter::Filter;
use super::labels::{self, TARGET_REF, UNLAZY};
use super::mounts::{self, Layout, Mount};
use super::remote::RemoteFs;
use super::store::{Query, Snapshot, Store};
use super::usage::disk_usage;
use super::{Info, Kind, Labels, SnapshotId, UnlazyPolicy, Usage, restore};
use crate::error::{Error, IoContext, Result};

mod remote_prepare;
mod unlazy;

/// How many snapshots of each kind exist (for `status` and metrics).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// Active snapshots.
    pub active: u64,
    /// Views.
    pub view: u64,
    /// Committed snapshots.
    pub committed: u64,
    /// Committed snapshots that are remote mounts.
    pub remote: u64,
}

/// The snapshotter over one root directory.
pub struct Snapshotter {
    layout: Layout,
    store: Store,
    remote: Option<Arc<dyn RemoteFs>>,
    index_off: bool,
    /// One lock per remote target, so concurrent Prepares of a layer share one mount
    /// (and one per snapshot being unlazied).
    targets: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    policy: UnlazyPolicy,
    /// Set by [`Snapshotter::close`]; the policy watcher stops.
    closing: AtomicBool,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter")
            .field("layout", &self.layout)
            .field("remote", &self.remote.is_some())
            .finish()
    }
}

fn to_map(labels: &Labels) -> HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .ctx(|| format!("creating {}", path.display()))
}

impl Snapshotter {
    /// Opens the snapshotter at `root` (created 0700 with `snapshots/` and
    /// `metadata.db`). Call [`Snapshotter::restore`] before serving.
    pub fn open(root: &Path, remote: Option<Arc<dyn RemoteFs>>) -> Result<Snapshotter> {
        let layout = Layout::new(root);
        for dir in [root.to_path_buf(), layout.snapshots()] {
            if !dir.exists() {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .recursive(true)
                    .create(&dir)
                    .ctx(|| format!("creating {}", dir.display()))?;
            }
        }
        let store = Store::open(&root.join("metadata.db"))?;
        Ok(Snapshotter {
            layout,
            store,
            remote,
            index_off: mounts::overlay_index_param(),
            targets: Mutex::new(HashMap::new()),
            policy: UnlazyPolicy::default(),
            closing: AtomicBool::new(false),
        })
    }

    /// Sets the unlazy policies (before serving).
    pub fn with_policy(mut self, policy: UnlazyPolicy) -> Snapshotter {
        self.policy = policy;
        self
    }

    /// The directory layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The remote filesystem, if one is configured.
    pub fn remote(&self) -> Option<&Arc<dyn RemoteFs>> {
        self.remote.as_ref()
    }

    #[cfg(test)]
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Creates an active snapshot. With `containerd.io/snapshot.ref` and labels that
    /// identify a layer, and a remote filesystem configured, the layer is mounted
    /// lazily and committed under the target name, and the answer is AlreadyExists;
    /// if it cannot be mounted the snapshot stays an ordinary active one.
    pub fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        labels::validate(&labels)?;
        let target = labels.get(TARGET_REF).filter(|t| !t.is_empty()).cloned();
        if let (Some(target), Some(remote)) = (target, self.remote.clone())
            && labels::identifies_layer(&labels)
        {
            return self.prepare_remote(key, parent, labels, &target, remote.as_ref());
        }
        if self.policy.on_prepare && !parent.is_empty() && !labels.contains_key(TARGET_REF) {
            self.unlazy_parents(parent);
        }
        let snap = self.create(Kind::Active, key, parent, labels)?;
        self.new_mounts(key, &snap)
    }

    /// Creates a read-only view.
    pub fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        labels::validate(&labels)?;
        let snap = self.create(Kind::View, key, parent, labels)?;
        self.new_mounts(key, &snap)
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let snap = self.store.read(|tx| tx.snapshot(key))?;
        if snap.kind == Kind::Committed {
            // As containerd's storage.GetSnapshot.
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is committed, not active or view"
            )));
        }
        self.mounts_of(key, &snap)
    }

    /// Commits the active snapshot `key` as `name`, measuring its usage.
    pub fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        labels::validate(&labels)?;
        let rec = self.store.read(|tx| tx.get(key))?;
        let usage = if rec.kind == Kind::Active {
            disk_usage(&self.layout.fs(rec.id))?
        } else {
            Usage::default()
        };
        self.store.write(|tx| {
            let id = tx.commit_active(key, name, usage, labels)?;
            if id != rec.id {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} was replaced while it was being committed"
                )));
            }
            Ok(())
        })
    }

    /// Removes a snapshot: the metadata first, then (after the commit) its directory,
    /// unmounting a remote layer first.
    pub fn remove(&self, key: &str) -> Result<()> {
        let rec = self.store.write(|tx| tx.remove(key))?;
        self.remove_dir(rec.id, labels::is_remote(&rec.labels));
        Ok(())
    }

    /// The snapshot's Info.
    pub fn stat(&self, key: &str) -> Result<Info> {
        self.store.read(|tx| tx.info(key))
    }

    /// Updates labels (field paths `labels`, `labels.<k>`). Setting the
    /// [`UNLAZY`] label asks for the snapshot to be unlazied; it is not stored.
    pub fn update(&self, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        labels::validate(&info.labels)?;
        let asked = labels::asks_unlazy(&info.labels)
            && (fieldpaths.is_empty()
                || fieldpaths
                    .iter()
                    .any(|p| p == "labels" || p.strip_prefix("labels.") == Some(UNLAZY)));
        let mut info = info.clone();
        info.labels.remove(UNLAZY);
        let paths: Vec<String> = fieldpaths
            .iter()
            .filter(|p| p.strip_prefix("labels.") != Some(UNLAZY))
            .cloned()
            .collect();
        if asked {
            self.unlazy(&info.name)?;
        }
        if paths.is_empty() && !fieldpaths.is_empty() {
            // only the unlazy label was named
            return self.stat(&info.name);
        }
        self.store.write(|tx| tx.update(&info, &paths))
    }

    /// Disk usage: measured now for active snapshots, stored at commit otherwise.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self.store.read(|tx| tx.get(key))?;
        match rec.kind {
            Kind::Active => disk_usage(&self.layout.fs(rec.id)),
            _ => Ok(rec.usage),
        }
    }

    /// Every snapshot matching any of the filters (containerd syntax).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filter = Filter::parse_all(filters)?;
        let records = self.store.read(|tx| tx.records())?;
        Ok(records
            .into_iter()
            .map(|(k, r)| r.info(&k))
            .filter(|i| filter.matches(i))
            .collect())
    }

    /// Removes directories under `snapshots/` that no snapshot owns (leftovers of
    /// crashes and of failed removals), unmounting what is mounted in them.
    pub fn cleanup(&self) -> Result<()> {
        // Listing inside a write transaction keeps concurrent creators (whose temp dirs
        // exist only inside their own write transaction) out.
        let orphans = self.store.write(|tx| {
            let ids = tx.id_map()?;
            let dir = self.layout.snapshots();
            let mut out = Vec::new();
            for entry in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
                let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let owned = name
                    .parse::<u64>()
                    .is_ok_and(|id| ids.contains_key(&SnapshotId(id)));
                if !owned {
                    out.push(entry.path());
                }
            }
            Ok(out)
        })?;
        for dir in orphans {
            info!(dir = %dir.display(), "cleanup: removing unowned snapshot directory");
            if let Some(remote) = &self.remote
                && let Err(e) = remote.unmount(&dir.join("fs"))
            {
                warn!(dir = %dir.display(), error = %e, "cleanup: unmount failed");
            }
            self.remove_tree(&dir);
        }
        Ok(())
    }

    /// Start-up: takes over the remote layers still mounted from the previous daemon
    /// (see [`RemoteFs::take_over`]), detaches every other mount under `snapshots/`
    /// (left by a crash), removes unowned directories, and makes every remote
    /// snapshot available again from its stored labels ([`RemoteFs::restore`]: at
    /// once, or at first use). A layer that cannot be mounted is logged and kept;
    /// `Mounts` over it answers Unavailable until it can be.
    pub fn restore(&self) -> Result<()> {
        let records = self.store.read(|tx| tx.records())?;
        let remote: Vec<_> = records
            .iter()
            .filter(|(_, r)| labels::is_remote(&r.labels))
            .collect();
        let taken = match &self.remote {
            Some(fs) => fs.take_over(
                &remote
                    .iter()
                    .map(|(_, r)| (self.layout.fs(r.id), to_map(&r.labels)))
                    .collect::<Vec<_>>(),
            ),
            None => Vec::new(),
        };
        for mp in restore::mounts_under(&self.layout.snapshots())? {
            if taken.contains(&mp) {
                continue;
            }
            info!(mountpoint = %mp.display(), "detaching stale mount");
            if let Err(e) = restore::detach(&mp) {
                warn!(mountpoint = %mp.display(), error = %e, "cannot detach stale mount");
            }
        }
        self.cleanup()?;
        self.recover_unlazy()?;
        for (key, rec) in remote {
            let fs_dir = self.layout.fs(rec.id);
            // A taken-over mount is not looked at: nobody serves it yet.
            let kept = taken.contains(&restore::real_mountpoint(&fs_dir));
            if !kept && !fs_dir.exists() {
                fs::DirBuilder::new()
                    .mode(0o755)
                    .recursive(true)
                    .create(&fs_dir)
                    .ctx(|| format!("creating {}", fs_dir.display()))?;
            }
            let Some(remote) = &self.remote else {
                warn!(snapshot = %key, "remote snapshot kept unmounted: no remote filesystem configured");
                continue;
            };
            match remote.restore(&fs_dir, &to_map(&rec.labels)) {
                Ok(()) => info!(snapshot = %key, id = %rec.id, "remote snapshot restored"),
                Err(e) => warn!(snapshot = %key, id = %rec.id, error = %e,
                    "cannot mount remote snapshot again; Mounts over it answer unavailable"),
            }
        }
        Ok(())
    }

    /// Shutdown: leaves mounted the remote layers the remote filesystem can hand to
    /// the next daemon ([`RemoteFs::leave_mounted`]) and unmounts the others.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let Some(remote) = &self.remote else { return };
        let records = match self.store.read(|tx| tx.records()) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "close: cannot list snapshots");
                return;
            }
        };
        let left = remote.leave_mounted();
        for (key, rec) in records.iter().filter(|(_, r)| labels::is_remote(&r.labels)) {
            let fs_dir = self.layout.fs(rec.id);
            if left.contains(&fs_dir) {
                continue;
            }
            if let Err(e) = remote.unmount(&fs_dir) {
                warn!(snapshot = %key, error = %e, "close: unmount failed");
            }
        }
    }

    /// Snapshot counts by kind.
    pub fn counts(&self) -> Result<Counts> {
        let records = self.store.read(|tx| tx.records())?;
        let mut c = Counts::default();
        for (_, r) in records {
            match r.kind {
                Kind::Active => c.active += 1,
                Kind::View => c.view += 1,
                Kind::Committed => c.committed += 1,
            }
            if labels::is_remote(&r.labels) {
                c.remote += 1;
            }
        }
        Ok(c)
    }

    fn create(&self, kind: Kind, key: &str, parent: &str, labels: Labels) -> Result<Snapshot> {
        let parent = (!parent.is_empty()).then_some(parent);
        let mut placed: Option<PathBuf> = None;
        let result = self.store.write(|tx| {
            let temp = self.temp_dir(kind)?;
            let r = (|| {
                let snap = tx.create(kind, key, parent, labels)?;
                if let Some((pid, plabels)) = snap.parents.first() {
                    let pfs = self.layout.fs(*pid);
                    let md = fs::metadata(&pfs).map_err(|e| {
                        if labels::is_remote(plabels) {
                            Error::Unavailable(format!(
                                "snapshot {key}: remote parent {} is unavailable: {e}",
                                pfs.display()
                            ))
                        } else {
                            Error::io(format!("stat {}", pfs.display()), e)
                        }
                    })?;
                    std::os::unix::fs::lchown(temp.join("fs"), Some(md.uid()), Some(md.gid()))
                        .ctx(|| format!("chown {}", temp.display()))?;
                }
                let dir = self.layout.dir(snap.id);
                if dir.exists() {
                    warn!(dir = %dir.display(), "replacing unowned directory");
                    self.remove_tree(&dir);
                }
                fs::rename(&temp, &dir)
                    .ctx(|| format!("renaming {} to {}", temp.display(), dir.display()))?;
                Ok((snap, dir))
            })();
            match r {
                Ok((snap, dir)) => {
                    placed = Some(dir);
                    Ok(snap)
                }
                Err(e) => {
                    let _ = fs::remove_dir_all(&temp);
                    Err(e)
                }
            }
        });
        if result.is_err()
            && let Some(dir) = placed
        {
            let _ = fs::remove_dir_all(&dir);
        }
        result
    }

    fn temp_dir(&self, kind: Kind) -> Result<PathBuf> {
        let snapshots = self.layout.snapshots();
        let temp = tempfile::Builder::new()
            .prefix("new-")
            .tempdir_in(&snapshots)
            .ctx(|| format!("creating a directory in {}", snapshots.display()))?
            .keep();
        // tempfile makes the directory 0700, as containerd's MkdirTemp.
        let r = (|| {
            mkdir(&temp.join("fs"), 0o755)?;
            if kind == Kind::Active {
                mkdir(&temp.join("work"), 0o711)?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            let _ = fs::remove_dir_all(&temp);
            return Err(e);
        }
        Ok(temp)
    }

    /// Mounts of a snapshot just created; if they cannot be given (a remote lower is
    /// unavailable) the snapshot is removed again, so the failed call leaves nothing.
    fn new_mounts(&self, key: &str, snap: &Snapshot) -> Result<Vec<Mount>> {
        self.mounts_of(key, snap).inspect_err(|_| {
            if let Err(e) = self.remove(key) {
                warn!(key, error = %e, "removing snapshot whose mounts are unavailable");
            }
        })
    }

    fn mounts_of(&self, key: &str, snap: &Snapshot) -> Result<Vec<Mount>> {
        self.check_available(key, snap)?;
        Ok(mounts::mounts(
            &self.layout,
            snap.id,
            snap.kind,
            &snap.parent_ids(),
            self.index_off,
        ))
    }

    /// stargz's `checkAvailability`: every remote layer below must be healthy.
    fn check_available(&self, key: &str, snap: &Snapshot) -> Result<()> {
        let own = (snap.id, &snap.labels);
        let chain = std::iter::once(own).chain(snap.parents.iter().map(|(i, l)| (*i, l)));
        for (id, labels) in chain.filter(|(_, l)| labels::is_remote(l)) {
            let fs_dir = self.layout.fs(id);
            let Some(remote) = &self.remote else {
                return Err(Error::Unavailable(format!(
                    "snapshot {key}: remote layer {} has no remote filesystem",
                    fs_dir.display()
                )));
            };
            remote.check(&fs_dir, &to_map(labels)).map_err(|e| {
                Error::Unavailable(format!(
                    "snapshot {key}: remote layer {} is unavailable: {e}",
                    fs_dir.display()
                ))
            })?;
        }
        Ok(())
    }

    fn remove_dir(&self, id: SnapshotId, remote: bool) {
        let dir = self.layout.dir(id);
        if remote
            && let Some(fs) = &self.remote
            && let Err(e) = fs.unmount(&self.layout.fs(id))
        {
            warn!(dir = %dir.display(), error = %e, "unmounting removed remote snapshot failed");
        }
        self.remove_tree(&dir);
    }

    /// Removes a snapshot directory after detaching anything still mounted in it, so
    /// that removal never reaches into a mounted filesystem. Failures are logged, as
    /// containerd does after the metadata is gone.
    fn remove_tree(&self, dir: &Path) {
        match restore::mounts_under(dir) {
            Ok(mps) => {
                for mp in mps {
                    if let Err(e) = restore::detach(&mp) {
                        warn!(mountpoint = %mp.display(), error = %e, "detach failed");
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot read mounts"),
        }
        if let Err(e) = fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(dir = %dir.display(), error = %e, "removing snapshot directory failed");
        }
    }
}
