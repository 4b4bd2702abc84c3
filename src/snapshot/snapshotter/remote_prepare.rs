//! The remote-snapshot protocol (stargz-snapshotter's `prepareRemoteSnapshot`): mount
//! the layer with the [`RemoteFs`], commit it under the `containerd.io/snapshot.ref`
//! name, answer AlreadyExists; one Prepare per target at a time, so concurrent
//! Prepares of a layer share one mount.

use tracing::{debug, info, warn};

use super::{Snapshotter, to_map};
use crate::error::{Error, Result};
use crate::snapshot::labels::{REMOTE, REMOTE_VALUE};
use crate::snapshot::store::Query;
use crate::snapshot::{Kind, Labels, Mount, RemoteFs, SnapshotKey, Usage};

impl Snapshotter {
    pub(super) fn prepare_remote(
        &self,
        key: &str,
        parent: &str,
        labels: Labels,
        target: &str,
        remote: &dyn RemoteFs,
    ) -> Result<Vec<Mount>> {
        let lock = self.key_lock(target);
        let result = {
            let _serial = lock.lock().unwrap_or_else(|e| e.into_inner());
            self.prepare_remote_locked(key, parent, labels, target, remote)
        };
        self.release_key_lock(target, lock);
        result
    }

    fn prepare_remote_locked(
        &self,
        key: &str,
        parent: &str,
        labels: Labels,
        target: &str,
        remote: &dyn RemoteFs,
    ) -> Result<Vec<Mount>> {
        let exists = || Error::AlreadyExists(format!("target snapshot {target}"));
        if self.store.read(|tx| tx.record(target))?.is_some() {
            debug!(key, target, "remote target already committed");
            return Err(exists());
        }
        let snap = self.create(Kind::Active, key, parent, labels.clone())?;
        let fs_dir = self.layout.fs(snap.id);
        if let Err(e) = remote.mount(&fs_dir, &to_map(&labels)) {
            info!(key, target, error = %e, "remote-snapshot-prepared=false");
            return self.new_mounts(key, &snap);
        }
        let mut labels = labels;
        labels.insert(REMOTE.to_string(), REMOTE_VALUE.to_string());
        match self
            .store
            .write(|tx| tx.commit_active(key, target, Usage::default(), labels))
        {
            Ok(_) => {
                let namespace = SnapshotKey(key).namespace().unwrap_or("");
                info!(key, target, namespace, id = %snap.id, "remote-snapshot-prepared=true");
                Err(exists())
            }
            Err(e) => {
                if let Err(u) = remote.unmount(&fs_dir) {
                    warn!(key, error = %u, "unmount after failed remote commit");
                }
                if let Err(r) = self.remove(key) {
                    warn!(key, error = %r, "removing snapshot after failed remote commit");
                }
                match e {
                    Error::AlreadyExists(_) => Err(exists()),
                    e => Err(e),
                }
            }
        }
    }
}
