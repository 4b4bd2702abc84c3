//! Layers that outlive the daemon.
//!
//! With an fd holder ([`LazyFs::keep_mounts`]) every mounted layer's connection is
//! handed to the holder as soon as it is mounted. At exit the daemon leaves its layers
//! mounted ([`LazyFs::leave_mounted`]); at start the next daemon takes back the
//! connections whose mounts are still there ([`LazyFs::take_over`]) and serves them
//! again in the background, while every other remote snapshot is only registered and
//! mounted at its first use ([`LazyFs::restore`], [`LazyFs::ensure_restored`]), so the
//! socket opens without waiting for a registry. A connection whose mount was detached
//! while containers still used it (unlazy) is served on, without a mountpoint, until
//! its last user lets go.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use lazysnap_fuse::{Connection, MountOptions};
use tracing::{info, warn};

use super::{LazyFs, lock};
use crate::error::Result;
use crate::layer::RemoteLayer;
use crate::layer::mount::{LayerContent, build_tree, mount_layer};
use crate::layer::workers::Workers;
use crate::snapshot::RemoteFs;
use crate::snapshot::holder::{Held, Holder, Record};
use crate::snapshot::restore::real_mountpoint;

/// Longest pause between attempts to serve a taken-over layer again.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A remote snapshot registered at start and not served yet.
struct Pending {
    labels: HashMap<String, String>,
    /// Held while it is being mounted, so that one caller mounts and others wait.
    busy: Mutex<()>,
}

/// What [`LazyFs`] keeps for restarts.
#[derive(Default)]
pub(super) struct State {
    holder: OnceLock<Holder>,
    /// Mountpoints whose connection the holder has.
    kept: Mutex<HashSet<PathBuf>>,
    /// Connections taken back from the holder, waiting to be served again.
    held: Mutex<HashMap<PathBuf, Connection>>,
    pending: Mutex<HashMap<PathBuf, Arc<Pending>>>,
    /// Detached layers still in use, served until their users let go.
    orphans: Mutex<Vec<lazysnap_fuse::Mount>>,
    leaving: AtomicBool,
}

impl State {
    /// After a mount: the holder gets a duplicate of the connection.
    pub(super) fn keep(
        &self,
        mountpoint: &Path,
        fuse: &lazysnap_fuse::Mount,
        labels: &HashMap<String, String>,
    ) {
        let Some(holder) = self.holder.get() else {
            return;
        };
        let kept = fuse.connection().map_err(|e| e.to_string()).and_then(|c| {
            holder
                .put(
                    &Record {
                        info: c.info.clone(),
                        labels: labels.clone(),
                    },
                    &c,
                )
                .map_err(|e| e.to_string())
        });
        match kept {
            Ok(()) => {
                lock(&self.kept).insert(mountpoint.to_path_buf());
            }
            Err(e) => warn!(mountpoint = %mountpoint.display(), error = %e,
                "fd holder refused the connection; this layer will not survive a restart"),
        }
    }

    /// Before an unmount: the holder lets the connection go.
    pub(super) fn forget(&self, mountpoint: &Path) {
        lock(&self.pending).remove(mountpoint);
        let held = lock(&self.held).remove(mountpoint);
        let kept = lock(&self.kept).remove(mountpoint);
        if let Some(holder) = self.holder.get()
            && (kept || held.is_some())
            && let Err(e) = holder.forget(&real_mountpoint(mountpoint))
        {
            warn!(mountpoint = %mountpoint.display(), error = %e, "fd holder did not release the connection");
        }
    }

    /// Whether the daemon is exiting with its layers left mounted.
    pub(super) fn leaving(&self) -> bool {
        self.leaving.load(Ordering::Relaxed)
    }
}

/// Mounts a layer, or serves again the connection taken over for `mountpoint`.
pub(super) fn mount_or_resume(
    state: &State,
    layer: Arc<RemoteLayer>,
    mountpoint: &Path,
    opts: &MountOptions,
    workers: Arc<Workers>,
) -> Result<lazysnap_fuse::Mount> {
    let Some(conn) = lock(&state.held).remove(mountpoint) else {
        return mount_layer(layer, mountpoint, opts, workers);
    };
    let tree = Arc::new(build_tree(layer.index())?);
    let content = LayerContent::new(layer.clone(), workers.clone());
    let info = conn.info.clone();
    match lazysnap_fuse::resume(tree, content, conn, opts) {
        Ok(m) => {
            lock(&state.kept).insert(mountpoint.to_path_buf());
            Ok(m)
        }
        Err(e) => {
            // Nobody can serve the old connection: let it end (its users see an
            // error rather than wait forever) and mount afresh.
            warn!(mountpoint = %mountpoint.display(), error = %e, "cannot take the mount over; mounting again");
            if let Some(holder) = state.holder.get()
                && let Err(e) = holder.forget_mount(&info)
            {
                warn!(error = %e, "fd holder did not release the connection");
            }
            if lazysnap_fuse::is_live(&info)
                && let Err(e) =
                    nix::mount::umount2(&info.mountpoint, nix::mount::MntFlags::MNT_DETACH)
            {
                warn!(mountpoint = %mountpoint.display(), error = %e, "cannot detach the old mount");
            }
            mount_layer(layer, mountpoint, opts, workers)
        }
    }
}

impl LazyFs {
    /// Hands every mounted layer's connection to `holder`, so that layers stay mounted
    /// and keep working when the daemon exits, is killed or is replaced.
    pub fn keep_mounts(&self, holder: Holder) {
        if self.inner.handover.holder.set(holder).is_err() {
            warn!("an fd holder is already set");
        }
    }

    /// Start-up, before stale mounts are detached: takes back from the holder the
    /// connections of these remote snapshots (mountpoint, labels) whose mounts are
    /// still there; the holder drops the others. Returns the mountpoints taken over
    /// as mountinfo shows them; they must stay mounted.
    pub(super) fn take_over_held(
        &self,
        snapshots: &[(PathBuf, HashMap<String, String>)],
    ) -> Vec<PathBuf> {
        let state = &self.inner.handover;
        let Some(holder) = state.holder.get() else {
            return Vec::new();
        };
        let held = match holder.list() {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "cannot ask the fd holder for its connections");
                return Vec::new();
            }
        };
        let by_canonical: HashMap<PathBuf, &PathBuf> = snapshots
            .iter()
            .map(|(mp, _)| (real_mountpoint(mp), mp))
            .collect();
        let mut taken = Vec::new();
        for h in held {
            let mp = h.record.info.mountpoint.clone();
            let live = lazysnap_fuse::is_live(&h.connection.info);
            match by_canonical.get(&mp).copied() {
                Some(given) if live => {
                    info!(mountpoint = %mp.display(), "taking over a live mount");
                    lock(&state.held).insert(given.clone(), h.connection);
                    taken.push(mp);
                }
                _ if !live && h.connection.is_open() => self.serve_orphan(h),
                _ => {
                    info!(mountpoint = %mp.display(), "held connection has no live mount or snapshot; released");
                    if let Err(e) = holder.forget_mount(&h.record.info) {
                        warn!(error = %e, "fd holder did not release the connection");
                    }
                }
            }
        }
        taken
    }

    /// Serves, in the background, a connection whose mount was detached while in use,
    /// until its users let go (retrying while the registry is unreachable).
    fn serve_orphan(&self, held: Held) {
        let Held { record, connection } = held;
        let mp = record.info.mountpoint.clone();
        info!(mountpoint = %mp.display(), "taking over a detached layer still in use");
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name("lazysnap-orphan".into())
            .spawn(move || {
                let state = &inner.handover;
                let mut pause = Duration::from_millis(500);
                let layer = loop {
                    if !connection.is_open() {
                        return; // its last user let go meanwhile
                    }
                    match inner.open(&record.labels) {
                        Ok((layer, _, _)) => break layer,
                        Err(e) => {
                            warn!(mountpoint = %mp.display(), error = %e, "cannot open the detached layer; retrying in {pause:?}");
                            std::thread::sleep(pause);
                            pause = (pause * 2).min(RETRY_MAX);
                        }
                    }
                };
                let served = build_tree(layer.index()).and_then(|tree| {
                    let content = LayerContent::new(layer, inner.workers.clone());
                    lazysnap_fuse::resume_detached(Arc::new(tree), content, connection, &inner.fuse)
                        .map_err(|e| crate::error::Error::Unavailable(e.to_string()))
                });
                match served {
                    Ok(m) => lock(&state.orphans).push(m),
                    Err(e) => {
                        warn!(mountpoint = %mp.display(), error = %e, "cannot serve the detached layer; its users lose it");
                        if let Some(holder) = state.holder.get() {
                            let _ = holder.forget_mount(&record.info);
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start serving a detached layer");
        }
    }

    /// Start-up: a taken-over layer is served again in the background (retrying while
    /// its registry is unreachable); any other is mounted at its first use.
    pub(super) fn restore_lazily(&self, mountpoint: &Path, labels: &HashMap<String, String>) {
        let state = &self.inner.handover;
        lock(&state.pending).insert(
            mountpoint.to_path_buf(),
            Arc::new(Pending {
                labels: labels.clone(),
                busy: Mutex::new(()),
            }),
        );
        if !lock(&state.held).contains_key(mountpoint) {
            info!(mountpoint = %mountpoint.display(), "remote snapshot registered; mounted at first use");
            return;
        }
        // A second handle on the same layers for the thread; never dropped, since
        // dropping a `LazyFs` unmounts (it holds one reference, for the process's life).
        let me = std::mem::ManuallyDrop::new(LazyFs {
            inner: self.inner.clone(),
            runtime: None,
        });
        let mp = mountpoint.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("lazysnap-resume".into())
            .spawn(move || {
                let mut pause = Duration::from_millis(500);
                while let Err(e) = me.ensure_restored(&mp) {
                    warn!(mountpoint = %mp.display(), error = %e, "taking the mount over failed; retrying in {pause:?}");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(RETRY_MAX);
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start taking the mount over; it is taken over at first use");
        }
    }

    /// Mounts (or takes over) a remote snapshot registered at start, if it is not
    /// served yet. Concurrent callers wait for one mount.
    pub(super) fn ensure_restored(&self, mountpoint: &Path) -> Result<()> {
        let state = &self.inner.handover;
        let Some(p) = lock(&state.pending).get(mountpoint).cloned() else {
            return Ok(());
        };
        let _busy = lock(&p.busy);
        if !lock(&state.pending).contains_key(mountpoint) {
            return Ok(()); // served meanwhile, or removed
        }
        if !lock(&self.inner.mounts).contains_key(mountpoint) {
            self.mount(mountpoint, &p.labels)?;
        }
        lock(&state.pending).remove(mountpoint);
        Ok(())
    }

    /// Exit: stops serving the layers the holder keeps, leaving them mounted, and
    /// returns their mountpoints (the caller unmounts the rest).
    pub(super) fn leave_kept_mounted(&self) -> Vec<PathBuf> {
        let state = &self.inner.handover;
        let Some(holder) = state.holder.get() else {
            return Vec::new();
        };
        for m in lock(&state.orphans).drain(..) {
            m.leave();
        }
        // Only what the holder really has (it may have died, or been restarted and
        // lost its records): anything else would be left mounted with nobody to
        // serve it.
        let held: HashSet<PathBuf> = match holder.list() {
            Ok(h) => h.into_iter().map(|h| h.record.info.mountpoint).collect(),
            Err(e) => {
                warn!(error = %e, "the fd holder is gone; unmounting every layer");
                return Vec::new();
            }
        };
        state.leaving.store(true, Ordering::Relaxed);
        let kept: HashSet<PathBuf> = lock(&state.kept)
            .iter()
            .filter(|mp| held.contains(&real_mountpoint(mp)))
            .cloned()
            .collect();
        let mut left: Vec<PathBuf> = lock(&state.held)
            .keys()
            .filter(|mp| held.contains(&real_mountpoint(mp)))
            .cloned()
            .collect();
        for (mp, m) in lock(&self.inner.mounts).iter_mut() {
            if !kept.contains(mp) {
                continue;
            }
            m.stop.store(true, Ordering::Relaxed);
            if let Some(f) = m.fuse.take() {
                f.leave();
            }
            left.push(mp.clone());
        }
        info!(
            layers = left.len(),
            "leaving layers mounted for the next daemon"
        );
        left
    }
}
