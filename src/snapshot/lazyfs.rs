//! The real [`RemoteFs`]: layers named by the remote-snapshot labels are opened from
//! the registry (footer and TOC, verified against the TOC digest), mounted with FUSE
//! at the snapshot's `fs` directory, prefetched and fetched in the background.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use lazysnap_fuse::MountOptions;
use lazysnap_registry::{Digest as RegDigest, Image, Reference, RegistryClient, RegistryConfig};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::apply::{ApplyStats, apply_layer};
use super::labels::{
    CRI_IMAGE_LAYERS, CRI_IMAGE_REF, CRI_LAYER_DIGEST, STARGZ_DIGEST, STARGZ_LAYERS,
    STARGZ_REFERENCE,
};
use super::remote::{Progress, RemoteFs};
use crate::cache::{CacheConfig, ChunkCache};
use crate::error::{Error, Result};
use crate::format::{ANNOTATION_TOC_DIGEST, OpenOptions};
use crate::layer::workers::Workers;
use crate::layer::{LayerConfig, RegistryBlob, RemoteLayer, image};

mod handover;

/// Layer descriptor annotations containerd forwards as labels (prefix
/// `containerd.io/snapshot/`): the eStargz TOC digest.
const LABEL_TOC_DIGEST: &str = ANNOTATION_TOC_DIGEST;

/// How long a layer opened ahead waits for its Prepare.
const AHEAD_TTL: std::time::Duration = std::time::Duration::from_secs(300);

struct Mounted {
    fuse: Option<lazysnap_fuse::Mount>,
    layer: Arc<RemoteLayer>,
    stop: Arc<AtomicBool>,
    reference: String,
    digest: String,
}

struct Inner {
    client: RegistryClient,
    handle: tokio::runtime::Handle,
    cache: Arc<ChunkCache>,
    cfg: LayerConfig,
    fuse: MountOptions,
    workers: Arc<Workers>,
    mounts: Mutex<HashMap<PathBuf, Mounted>>,
    layers: Mutex<HashMap<String, Weak<RemoteLayer>>>,
    /// Layers opened ahead of their Prepare, held until it comes (or for a while).
    ahead: Mutex<HashMap<String, (Arc<RemoteLayer>, std::time::Instant)>>,
    /// One open at a time per digest.
    opening: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    images: Mutex<HashMap<String, Arc<Image>>>,
    handover: handover::State,
}

/// Lazily mounted layers for the snapshotter.
pub struct LazyFs {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl LazyFs {
    /// Stops serving the layer at `mountpoint` and unmounts it: `detach` leaves it to
    /// the overlays and open files already using it until they let go (unlazy);
    /// otherwise the unmount is immediate. The holder lets go of the connection too,
    /// so that it ends with its last user.
    fn take_down(&self, mountpoint: &Path, detach: bool) -> Result<()> {
        self.inner.handover.forget(mountpoint);
        let m = lock(&self.inner.mounts).remove(mountpoint);
        let Some(mut m) = m else {
            if lazysnap_fuse::is_mountpoint(mountpoint) {
                // a stale mount of an earlier process
                let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
            return Ok(());
        };
        m.stop.store(true, Ordering::Relaxed);
        if let Some(f) = m.fuse.take() {
            let (what, done) = if detach {
                ("detach", f.detach())
            } else {
                ("unmount", f.unmount())
            };
            done.map_err(|e| {
                Error::io(
                    format!("{}: {what}", mountpoint.display()),
                    std::io::Error::other(e.to_string()),
                )
            })?;
        }
        Ok(())
    }

    /// Starts the registry I/O runtime, opens the chunk cache and the read workers.
    pub fn new(
        layer: LayerConfig,
        cache: &CacheConfig,
        registry: RegistryConfig,
        fuse: MountOptions,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lazysnap-registry")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the registry runtime", e))?;
        let inner = Arc::new(Inner {
            client: RegistryClient::new(registry),
            handle: runtime.handle().clone(),
            cache: Arc::new(ChunkCache::new(cache)?),
            cfg: layer,
            fuse,
            workers: Workers::new(16, "lazysnap-read"),
            mounts: Mutex::new(HashMap::new()),
            layers: Mutex::new(HashMap::new()),
            ahead: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            handover: handover::State::default(),
        });
        Ok(LazyFs {
            inner,
            runtime: Some(runtime),
        })
    }

    /// The shared chunk cache.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.inner.cache
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let mounts: Vec<Mounted> = lock(&self.inner.mounts).drain().map(|(_, m)| m).collect();
        for mut m in mounts {
            m.stop.store(true, Ordering::Relaxed);
            if let Some(f) = m.fuse.take() {
                let _ = f.unmount();
            }
        }
        if let Some(rt) = self.runtime.take() {
            if self.inner.handover.leaving() {
                // Left mounts are served until the process exits, from this runtime.
                std::mem::forget(rt);
            } else {
                rt.shutdown_background();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn label<'a>(labels: &'a HashMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| labels.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Runs blocking layer work on a plain thread: the registry client's blocking reads
/// refuse to run inside a tokio runtime, and the gRPC service calls us from one.
fn off_runtime<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|_| Err(Error::InvalidArgument("layer worker panicked".into())))
    })
}

impl Inner {
    fn image(&self, reference: &Reference) -> Result<Arc<Image>> {
        let key = reference.to_string();
        if let Some(i) = lock(&self.images).get(&key) {
            return Ok(i.clone());
        }
        let img = self
            .handle
            .block_on(self.client.resolve(reference))
            .map_err(|e| Error::Fetch {
                blob: key.clone(),
                reason: e.to_string(),
            })?;
        let img = Arc::new(img);
        lock(&self.images).insert(key, img.clone());
        Ok(img)
    }

    /// Opens (or shares) the layer the labels name.
    fn open(&self, labels: &HashMap<String, String>) -> Result<(Arc<RemoteLayer>, String, String)> {
        let reference = label(labels, &[CRI_IMAGE_REF, STARGZ_REFERENCE])
            .ok_or_else(|| Error::InvalidArgument("labels name no image reference".into()))?;
        let digest = label(labels, &[CRI_LAYER_DIGEST, STARGZ_DIGEST])
            .ok_or_else(|| Error::InvalidArgument("labels name no layer digest".into()))?;
        let layer = self.open_layer(reference, digest, labels.get(LABEL_TOC_DIGEST))?;
        Ok((layer, reference.to_string(), digest.to_string()))
    }

    /// Opens a layer once: concurrent opens of one digest wait for the first, and a
    /// layer opened ahead (or still mounted) is shared.
    fn open_layer(
        &self,
        reference: &str,
        digest: &str,
        toc_label: Option<&String>,
    ) -> Result<Arc<RemoteLayer>> {
        let gate = lock(&self.opening)
            .entry(digest.to_string())
            .or_default()
            .clone();
        let result = {
            let _one = lock(&gate);
            self.open_locked(reference, digest, toc_label)
        };
        let mut opening = lock(&self.opening);
        if Arc::strong_count(&gate) == 2 {
            opening.remove(digest);
        }
        result
    }

    fn open_locked(
        &self,
        reference: &str,
        digest: &str,
        toc_label: Option<&String>,
    ) -> Result<Arc<RemoteLayer>> {
        if let Some((l, _)) = lock(&self.ahead).remove(digest) {
            return Ok(l);
        }
        if let Some(l) = lock(&self.layers).get(digest).and_then(Weak::upgrade) {
            return Ok(l);
        }
        let r = Reference::parse(reference).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let d = RegDigest::parse(digest).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // The TOC digest comes from the forwarded annotation label when the image
        // carries it; otherwise (zstd:chunked annotations are not forwarded) from the
        // layer descriptor in the image manifest.
        let (opts, blob) = match toc_label {
            Some(toc) => {
                let mut ann = std::collections::BTreeMap::new();
                ann.insert(ANNOTATION_TOC_DIGEST.to_string(), toc.clone());
                let opts = image::open_options(&ann)?;
                let blob = self
                    .handle
                    .block_on(self.client.open_blob(&r, &d))
                    .map_err(|e| Error::Fetch {
                        blob: format!("{r}@{d}"),
                        reason: e.to_string(),
                    })?;
                (opts, blob)
            }
            None => {
                let img = self.image(&r)?;
                let desc = img.layers.iter().find(|l| l.digest == d).ok_or_else(|| {
                    Error::InvalidArgument(format!("{r}: manifest has no layer {d}"))
                })?;
                let blob = self
                    .client
                    .blob(&img.reference, desc)
                    .map_err(|e| Error::Fetch {
                        blob: format!("{r}@{d}"),
                        reason: e.to_string(),
                    })?;
                (image::open_options(&desc.annotations)?, blob)
            }
        };
        let opts: OpenOptions = opts.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{r}@{d}: no TOC digest: not an eStargz or zstd:chunked layer"
            ))
        })?;
        let layer = RemoteLayer::open(
            RegistryBlob::new(blob, self.handle.clone()),
            &opts,
            self.cache.clone(),
            self.cfg.clone(),
        )?;
        lock(&self.layers).insert(digest.to_string(), Arc::downgrade(&layer));
        Ok(layer)
    }

    /// Opens the image's following layers (the layers label lists them) in the
    /// background and prefetches them, so that the Prepares containerd sends next
    /// find their TOCs, and prioritized files, already fetched.
    fn open_ahead(
        self: &Arc<Self>,
        reference: &str,
        current: &str,
        labels: &HashMap<String, String>,
    ) {
        let Some(list) = label(labels, &[CRI_IMAGE_LAYERS, STARGZ_LAYERS]) else {
            return;
        };
        {
            let mut ahead = lock(&self.ahead);
            ahead.retain(|_, (_, at)| at.elapsed() < AHEAD_TTL);
        }
        for d in list
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty() && *d != current)
        {
            let known = lock(&self.ahead).contains_key(d)
                || lock(&self.opening).contains_key(d)
                || lock(&self.layers)
                    .get(d)
                    .is_some_and(|w| w.strong_count() > 0);
            if known {
                continue;
            }
            let (inner, reference, d) = (self.clone(), reference.to_string(), d.to_string());
            let spawned = std::thread::Builder::new()
                .name("lazysnap-ahead".into())
                .spawn(move || match inner.open_layer(&reference, &d, None) {
                    Ok(layer) => {
                        lock(&inner.ahead)
                            .insert(d.clone(), (layer.clone(), std::time::Instant::now()));
                        if let Err(e) = layer.prefetch() {
                            tracing::debug!(layer = %d, error = %e, "prefetch ahead failed");
                        }
                    }
                    Err(e) => tracing::debug!(layer = %d, error = %e, "not opened ahead"),
                });
            if let Err(e) = spawned {
                tracing::debug!(error = %e, "cannot open layers ahead");
                return;
            }
        }
    }
}

impl RemoteFs for LazyFs {
    fn mount(&self, mountpoint: &Path, labels: &HashMap<String, String>) -> Result<()> {
        let inner = self.inner.clone();
        let mp = mountpoint.to_path_buf();
        let labels = labels.clone();
        off_runtime(move || {
            let (layer, reference, digest) = inner.open(&labels)?;
            inner.open_ahead(&reference, &digest, &labels);
            let fuse = handover::mount_or_resume(
                &inner.handover,
                layer.clone(),
                &mp,
                &MountOptions {
                    fs_name: format!(
                        "lazysnap:{}",
                        digest.trim_start_matches("sha256:").get(..12).unwrap_or("")
                    ),
                    ..inner.fuse.clone()
                },
                inner.workers.clone(),
            )?;
            inner.handover.keep(&mp, &fuse, &labels);
            let stop = Arc::new(AtomicBool::new(false));
            // prefetch, then the rest of the layer, off the Prepare path
            let (l, s, bg) = (layer.clone(), stop.clone(), inner.cfg.background_fetch);
            let spawned = std::thread::Builder::new()
                .name("lazysnap-fetch".into())
                .spawn(move || {
                    if let Err(e) = l.prefetch() {
                        tracing::warn!(layer = l.name(), error = %e, "prefetch failed");
                    }
                    if bg
                        && !s.load(Ordering::Relaxed)
                        && let Err(e) = l.fetch_all(&s, true)
                    {
                        tracing::warn!(layer = l.name(), error = %e, "background fetch stopped");
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the background fetch");
            }
            tracing::info!(layer = layer.name(), mountpoint = %mp.display(), "remote layer mounted");
            lock(&inner.mounts).insert(
                mp,
                Mounted {
                    fuse: Some(fuse),
                    layer,
                    stop,
                    reference,
                    digest,
                },
            );
            Ok(())
        })
    }

    fn take_over(&self, snapshots: &[(PathBuf, HashMap<String, String>)]) -> Vec<PathBuf> {
        self.take_over_held(snapshots)
    }

    fn restore(&self, mountpoint: &Path, labels: &HashMap<String, String>) -> Result<()> {
        self.restore_lazily(mountpoint, labels);
        Ok(())
    }

    fn leave_mounted(&self) -> Vec<PathBuf> {
        self.leave_kept_mounted()
    }

    fn check(&self, mountpoint: &Path, _labels: &HashMap<String, String>) -> Result<()> {
        self.ensure_restored(mountpoint)?;
        let known = lock(&self.inner.mounts).contains_key(mountpoint);
        if known && lazysnap_fuse::is_mountpoint(mountpoint) {
            Ok(())
        } else {
            Err(Error::Unavailable(format!(
                "{}: remote layer is not mounted",
                mountpoint.display()
            )))
        }
    }

    fn unmount(&self, mountpoint: &Path) -> Result<()> {
        self.take_down(mountpoint, false)
    }

    fn materialize(
        &self,
        mountpoint: &Path,
        labels: &HashMap<String, String>,
        dest: &Path,
    ) -> Result<ApplyStats> {
        let mounted = lock(&self.inner.mounts)
            .get(mountpoint)
            .map(|m| m.layer.clone());
        let inner = self.inner.clone();
        let labels = labels.clone();
        let dest = dest.to_path_buf();
        off_runtime(move || {
            let layer = match mounted {
                Some(l) => l,
                None => inner.open(&labels)?.0,
            };
            apply_layer(&layer, &dest)
        })
    }

    fn detach(&self, mountpoint: &Path) -> Result<()> {
        self.take_down(mountpoint, true)
    }

    fn progress(&self, mountpoint: &Path) -> Option<Progress> {
        let s = lock(&self.inner.mounts).get(mountpoint)?.layer.stats();
        Some(Progress {
            bytes_total: s.bytes_total,
            bytes_cached: s.bytes_cached,
            bytes_served: s.served_bytes,
        })
    }

    fn status(&self) -> Vec<serde_json::Value> {
        lock(&self.inner.mounts)
            .iter()
            .map(|(mp, m)| {
                let mut v = serde_json::to_value(m.layer.stats()).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("mountpoint".into(), mp.display().to_string().into());
                    o.insert("reference".into(), m.reference.clone().into());
                    o.insert("digest".into(), m.digest.clone().into());
                }
                v
            })
            .collect()
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(LayerMetrics(Arc::downgrade(&self.inner))));
    }
}

/// Per-layer fetch counters and cache use, read at scrape time.
#[derive(Debug)]
struct LayerMetrics(Weak<Inner>);

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LazyFs")
    }
}

impl Collector for LayerMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(inner) = self.0.upgrade() else {
            return Ok(());
        };
        let stats: Vec<(String, crate::layer::LayerStats)> = lock(&inner.mounts)
            .values()
            .map(|m| (m.digest.clone(), m.layer.stats()))
            .collect();
        type Field = fn(&crate::layer::LayerStats) -> u64;
        let counters: [(&str, &str, Field); 4] = [
            (
                "fetched_bytes",
                "Compressed bytes fetched from the registry",
                |s| s.fetched_bytes,
            ),
            (
                "fetch_requests",
                "Range requests sent to the registry (on demand, prefetch, background)",
                |s| s.fetch_requests,
            ),
            ("served_bytes", "File bytes served to readers", |s| {
                s.served_bytes
            }),
            ("read_errors", "Reads answered with EIO", |s| s.read_errors),
        ];
        for (name, help, f) in counters {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (d, s) in &stats {
                let labels = [("layer", d.as_str())];
                ConstCounter::new(f(s)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "cached_bytes",
            "Uncompressed bytes of the layer held in the chunk cache",
            None,
            MetricType::Gauge,
        )?;
        for (d, s) in &stats {
            let labels = [("layer", d.as_str())];
            ConstGauge::new(s.bytes_cached as i64).encode(m.encode_family(&labels)?)?;
        }
        let c = inner.cache.stats();
        for (name, help, v) in [
            (
                "cache_disk_bytes",
                "Bytes in the disk chunk cache",
                c.disk_bytes,
            ),
            (
                "cache_memory_bytes",
                "Bytes in the memory chunk cache",
                c.memory_bytes,
            ),
        ] {
            let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v as i64).encode(m)?;
        }
        for (name, help, v) in [
            ("cache_hits", "Disk chunk cache hits", c.hits),
            ("cache_misses", "Disk chunk cache misses", c.misses),
        ] {
            let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(m)?;
        }
        Ok(())
    }
}
