//! Unlazy: a committed remote snapshot becomes a local one, in place.
//!
//! The layer is written into `snapshots/<id>/fs.unlazy` and synced; then one metadata
//! transaction drops the remote label. That commit is the switch: before it a crash
//! leaves the remote snapshot (the half-written `fs.unlazy` is removed at restore),
//! after it the local one, whose directory swap (`fs` → `fs.remote`, `fs.unlazy` →
//! `fs`) restore finishes if the crash came in between. The FUSE mount is detached,
//! not unmounted: overlays already over it keep being served until released.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tracing::{info, warn};

use super::{Snapshotter, mkdir, to_map};
use crate::error::{Error, IoContext, Result};
use crate::snapshot::store::Query;
use crate::snapshot::usage::disk_usage;
use crate::snapshot::{ApplyStats, Kind, SnapshotId, labels, restore};

/// Where the layer is extracted before the switch.
pub(super) const FS_UNLAZY: &str = "fs.unlazy";
/// Where the old mount point goes during the swap.
const FS_REMOTE: &str = "fs.remote";

impl Snapshotter {
    /// Materializes the committed remote snapshot `key` into a plain directory and
    /// makes it a local snapshot. Returns None when it already is local.
    pub fn unlazy(&self, key: &str) -> Result<Option<ApplyStats>> {
        let lock = self.key_lock(&format!("unlazy\0{key}"));
        let result = {
            let _serial = lock.lock().unwrap_or_else(|e| e.into_inner());
            self.unlazy_locked(key)
        };
        self.release_key_lock(&format!("unlazy\0{key}"), lock);
        result
    }

    fn unlazy_locked(&self, key: &str) -> Result<Option<ApplyStats>> {
        let rec = self.store.read(|tx| tx.get(key))?;
        if rec.kind != Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is {}; only committed layers can be unlazied",
                rec.kind.as_str()
            )));
        }
        if !labels::is_remote(&rec.labels) {
            return Ok(None);
        }
        let remote = self.remote.clone().ok_or_else(|| {
            Error::Unavailable(format!(
                "snapshot {key}: no remote filesystem is configured to read it from"
            ))
        })?;
        let dir = self.layout.dir(rec.id);
        let fs_dir = self.layout.fs(rec.id);
        let tmp = dir.join(FS_UNLAZY);
        if tmp.exists() {
            self.remove_tree(&tmp);
        }
        mkdir(&tmp, 0o755)?;
        let started = std::time::Instant::now();
        let staged = (|| {
            let stats = remote.materialize(&fs_dir, &to_map(&rec.labels), &tmp)?;
            sync_fs(&tmp)?;
            let usage = disk_usage(&tmp)?;
            self.store.write(|tx| tx.make_local(key, rec.id, usage))?;
            Ok(stats)
        })();
        let stats = match staged {
            Ok(s) => s,
            Err(e) => {
                self.remove_tree(&tmp);
                return Err(e);
            }
        };
        self.finish_unlazy(rec.id);
        info!(
            snapshot = %key,
            id = %rec.id,
            entries = stats.entries,
            bytes = stats.bytes,
            ms = started.elapsed().as_millis() as u64,
            "unlazied"
        );
        Ok(Some(stats))
    }

    /// The directory swap after the switch; idempotent, so restore can finish it.
    pub(super) fn finish_unlazy(&self, id: SnapshotId) {
        let dir = self.layout.dir(id);
        let fs_dir = self.layout.fs(id);
        let tmp = dir.join(FS_UNLAZY);
        let old = dir.join(FS_REMOTE);
        if tmp.exists() {
            if let Some(remote) = &self.remote
                && let Err(e) = remote.detach(&fs_dir)
            {
                warn!(dir = %fs_dir.display(), error = %e, "unlazy: detaching the remote layer failed");
            }
            if lazysnap_fuse::is_mountpoint(&fs_dir)
                && let Err(e) = restore::detach(&fs_dir)
            {
                warn!(dir = %fs_dir.display(), error = %e, "unlazy: detach failed");
            }
            if fs_dir.exists() {
                if old.exists() {
                    remove_empty(&old);
                }
                if let Err(e) = fs::rename(&fs_dir, &old) {
                    warn!(dir = %fs_dir.display(), error = %e, "unlazy: moving the mount point aside failed");
                    return;
                }
            }
            if let Err(e) = fs::rename(&tmp, &fs_dir) {
                warn!(dir = %tmp.display(), error = %e, "unlazy: moving the layer into place failed");
                return;
            }
        }
        if old.exists() {
            remove_empty(&old);
        }
    }

    /// Restore's part: finish the swaps of switched snapshots, drop the leftovers of
    /// unlazies that did not reach the switch.
    pub(super) fn recover_unlazy(&self) -> Result<()> {
        let records = self.store.read(|tx| tx.records())?;
        for (key, rec) in &records {
            let dir = self.layout.dir(rec.id);
            let staged = dir.join(FS_UNLAZY).exists() || dir.join(FS_REMOTE).exists();
            if !staged {
                continue;
            }
            if labels::is_remote(&rec.labels) {
                info!(snapshot = %key, "removing an unfinished unlazy");
                self.remove_tree(&dir.join(FS_UNLAZY));
            } else {
                info!(snapshot = %key, "finishing an unlazy");
                self.finish_unlazy(rec.id);
            }
        }
        Ok(())
    }

    /// Unlazies the remote layers under a new active snapshot (the `on_prepare`
    /// policy). A layer that cannot be unlazied stays remote, with a warning.
    pub(super) fn unlazy_parents(&self, parent: &str) {
        let chain = match self.store.read(|tx| {
            let mut out = Vec::new();
            let mut next = Some(parent.to_string());
            while let Some(k) = next {
                let r = tx.get(&k)?;
                next = r.parent.clone();
                if labels::is_remote(&r.labels) {
                    out.push(k);
                }
            }
            Ok(out)
        }) {
            Ok(c) => c,
            Err(e) => {
                warn!(parent, error = %e, "unlazy on prepare: cannot read the parents");
                return;
            }
        };
        for key in chain {
            if let Err(e) = self.unlazy(&key) {
                warn!(snapshot = %key, error = %e, "unlazy on prepare failed; the layer stays remote");
            }
        }
    }

    /// A lock per name, shared by concurrent callers (remote prepares, unlazies).
    pub(super) fn key_lock(&self, name: &str) -> Arc<std::sync::Mutex<()>> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets.entry(name.to_string()).or_default().clone()
    }

    /// Drops the lock entry when no one else holds it.
    pub(super) fn release_key_lock(&self, name: &str, lock: Arc<std::sync::Mutex<()>>) {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&lock) == 2 {
            targets.remove(name);
        }
    }
}

impl Snapshotter {
    /// Starts the watcher thread of the `when_complete` and `read_fraction` policies
    /// (nothing when both are off). It holds the snapshotter weakly and ends at
    /// [`Snapshotter::close`].
    pub fn start_policies(self: &Arc<Self>) {
        if !self.policy.watches() || self.remote.is_none() {
            return;
        }
        let weak: Weak<Snapshotter> = Arc::downgrade(self);
        let interval = Duration::from_millis(self.policy.interval_ms);
        let spawned = std::thread::Builder::new()
            .name("lazysnap-unlazy".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    let Some(s) = weak.upgrade() else { return };
                    if s.closing.load(Ordering::SeqCst) {
                        return;
                    }
                    s.apply_policies();
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the unlazy policy watcher");
        }
    }

    /// One pass of the watcher: unlazies every remote layer a policy asks for.
    fn apply_policies(&self) {
        let Some(remote) = &self.remote else { return };
        let records = match self.store.read(|tx| tx.records()) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "unlazy policy: cannot list snapshots");
                return;
            }
        };
        for (key, rec) in records.iter().filter(|(_, r)| labels::is_remote(&r.labels)) {
            if self.closing.load(Ordering::SeqCst) {
                return;
            }
            let Some(progress) = remote.progress(&self.layout.fs(rec.id)) else {
                continue;
            };
            let Some(reason) = self.policy.reason(&progress) else {
                continue;
            };
            info!(snapshot = %key, reason, "unlazy policy");
            if let Err(e) = self.unlazy(key) {
                warn!(snapshot = %key, error = %e, "unlazy policy: unlazy failed");
            }
        }
    }
}

/// Removes the emptied mount point; never recursively, so that nothing mounted can
/// be reached.
fn remove_empty(dir: &Path) {
    if let Err(e) = fs::remove_dir(dir) {
        warn!(dir = %dir.display(), error = %e, "unlazy: cannot remove the old mount point");
    }
}

/// Makes the extracted layer durable before the metadata switch names it.
fn sync_fs(dir: &Path) -> Result<()> {
    let f = fs::File::open(dir).ctx(|| format!("opening {}", dir.display()))?;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc != 0 {
        return Err(Error::io(
            format!("syncing {}", dir.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
