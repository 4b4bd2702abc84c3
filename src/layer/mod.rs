//! A remote layer: blob handle + verified TOC + chunk cache. Reads map to chunks;
//! cached chunks answer at once, missing ones are fetched with one range request per
//! run of adjacent chunks, shared by concurrent readers, decompressed, verified
//! against their digests, cached and returned.

pub mod access;
pub mod blob;
mod bulk;
mod fetch;
pub mod image;
pub mod mount;
pub mod rootfs;
pub mod tail;
pub mod workers;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use blob::{FileBlob, RegistryBlob, RemoteBlob};
use fetch::Inflights;

use crate::cache::{CacheKey, ChunkCache};
use crate::error::{Error, Result};
use crate::format::index::Chunk;
use crate::format::{Digest, Format, Index, Layer, NodeId, OpenOptions};

/// How layers fetch (`[layer]` in the daemon's config file).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LayerConfig {
    /// Fetch the prioritized files (before `.prefetch.landmark`) at mount.
    pub prefetch: bool,
    /// Fetch the rest of the layer in the background, at low priority.
    pub background_fetch: bool,
    /// Layers up to this many compressed bytes are fetched whole at mount: lazy
    /// pulling loses on tiny layers.
    pub small_layer_bytes: u64,
    /// Adjacent missing chunks are fetched together up to this many bytes.
    pub max_fetch_span: u64,
    /// Bytes per background-fetch request.
    pub background_span: u64,
    /// Background fetch waits until no read has needed the network for this many
    /// milliseconds (and the mount is at least that old), and pauses again while
    /// reads do: a starting workload gets the whole link (stargz's silence period).
    pub background_delay_ms: u64,
    /// After an on-demand read, fetch this many following bytes of the same file
    /// in the background, so sequential readers overlap download and decompression.
    pub readahead_bytes: u64,
    /// Serve chunks of legacy layers that carry no digests.
    pub allow_unverified: bool,
}

impl Default for LayerConfig {
    fn default() -> Self {
        LayerConfig {
            prefetch: true,
            background_fetch: true,
            small_layer_bytes: 2 << 20,
            max_fetch_span: 8 << 20,
            background_span: 4 << 20,
            background_delay_ms: 2000,
            readahead_bytes: 16 << 20,
            allow_unverified: false,
        }
    }
}

#[derive(Default)]
struct Counters {
    fetched_bytes: AtomicU64,
    fetch_requests: AtomicU64,
    served_bytes: AtomicU64,
    cached_chunks: AtomicU64,
    cached_bytes: AtomicU64,
    errors: AtomicU64,
}

/// A snapshot of a layer's counters.
#[derive(Debug, Clone, Serialize)]
pub struct LayerStats {
    pub name: String,
    pub format: &'static str,
    pub toc_digest: String,
    pub blob_size: u64,
    pub fetched_bytes: u64,
    pub fetch_requests: u64,
    pub served_bytes: u64,
    pub chunks_total: u64,
    pub chunks_cached: u64,
    pub bytes_total: u64,
    pub bytes_cached: u64,
    /// Share of the layer's file bytes held in the cache, 0..=1.
    pub fraction_complete: f64,
    pub read_errors: u64,
}

/// A lazily read layer.
pub struct RemoteLayer {
    blob: Arc<dyn RemoteBlob>,
    format: Format,
    index: Index,
    toc_digest: Digest,
    cache: Arc<ChunkCache>,
    cfg: LayerConfig,
    cached: Vec<AtomicBool>,
    inflight: Inflights,
    counters: Counters,
    demand: AtomicUsize,
    /// When a read last needed the network, in ms since `opened`.
    last_demand: AtomicU64,
    opened: std::time::Instant,
    bytes_total: u64,
    /// Files whose passthrough backing file this process built.
    backing: std::sync::Mutex<std::collections::HashSet<NodeId>>,
    /// Files whose backing file a thread is building now: one builder per file, so
    /// that no open ever sees a file another builder is still writing.
    building: std::sync::Mutex<std::collections::HashSet<NodeId>>,
    /// The blob's tail read at open (offset, bytes), kept for small layers: their
    /// prefetch then asks the registry only for what comes before it.
    tail: Option<(u64, Bytes)>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RemoteLayer {
    /// Reads the footer and TOC (one request for both when the TOC sits in the
    /// blob's tail), verifies the TOC and builds the index.
    pub fn open(
        blob: Arc<dyn RemoteBlob>,
        opts: &OpenOptions,
        cache: Arc<ChunkCache>,
        cfg: LayerConfig,
    ) -> Result<Arc<Self>> {
        let name = blob.name().to_string();
        let src = tail::TailCached::new(blob.clone()).map_err(|e| Error::Fetch {
            blob: name.clone(),
            reason: e.to_string(),
        })?;
        let mut opts = opts.clone();
        opts.allow_unverified |= cfg.allow_unverified;
        let layer = Layer::open(src, &opts).map_err(|e| match e {
            e @ Error::Fetch { .. } => e,
            e => Error::Fetch {
                blob: name.clone(),
                reason: e.to_string(),
            },
        })?;
        let format = layer.format();
        let (src, _, toc, index) = layer.into_parts();
        let (toc_bytes, toc_requests) = src.spent();
        // what the opening request read of a small layer is served from memory
        let tail = (blob.size() <= cfg.small_layer_bytes).then(|| src.tail());
        let n = index.all_chunks().len();
        let bytes_total = index.all_chunks().iter().map(|c| c.size).sum();
        let l = Arc::new(RemoteLayer {
            blob,
            format,
            index,
            toc_digest: toc.digest,
            cache,
            cfg,
            cached: (0..n).map(|_| AtomicBool::new(false)).collect(),
            inflight: Inflights::default(),
            counters: Counters::default(),
            demand: AtomicUsize::new(0),
            last_demand: AtomicU64::new(0),
            opened: std::time::Instant::now(),
            bytes_total,
            backing: Default::default(),
            building: Default::default(),
            tail,
        });
        // the footer and TOC count as fetched, as the registry sees them
        l.counters
            .fetched_bytes
            .fetch_add(toc_bytes, Ordering::Relaxed);
        l.counters
            .fetch_requests
            .fetch_add(toc_requests, Ordering::Relaxed);
        // chunks already in the shared cache (another layer, an earlier run)
        for i in 0..n {
            if l.cache.contains(&l.key(&l.index.all_chunks()[i])) {
                l.mark_cached(i);
            }
        }
        Ok(l)
    }

    /// The index of files.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The blob's format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// sha256 of the TOC JSON.
    pub fn toc_digest(&self) -> &Digest {
        &self.toc_digest
    }

    /// The blob's name (registry/repository@digest or path).
    pub fn name(&self) -> &str {
        self.blob.name()
    }

    fn key(&self, c: &Chunk) -> CacheKey {
        match c.digest {
            Some(d) => CacheKey::Verified(d),
            None => CacheKey::unverified(self.blob.name(), c.compressed_offset, c.inner_offset),
        }
    }

    fn mark_cached(&self, i: usize) {
        if !self.cached[i].swap(true, Ordering::Relaxed) {
            self.counters.cached_chunks.fetch_add(1, Ordering::Relaxed);
            self.counters
                .cached_bytes
                .fetch_add(self.index.all_chunks()[i].size, Ordering::Relaxed);
        }
    }

    /// The global chunk indices covering `[offset, offset+size)` of file `id`,
    /// and the clipped end.
    fn span(&self, id: NodeId, offset: u64, size: u32) -> (Vec<usize>, u64) {
        let file_size = self.index.node(id).map_or(0, |n| n.size);
        let end = offset.saturating_add(size as u64).min(file_size);
        if offset >= end {
            return (Vec::new(), end);
        }
        let span = self.index.chunk_span(id);
        let all = self.index.all_chunks();
        let first = self
            .index
            .chunk_at(id, offset)
            .map_or(span.start, |i| span.start + i);
        let idxs = (first..span.end)
            .take_while(|&i| all[i].file_offset < end)
            .collect();
        (idxs, end)
    }

    fn assemble(&self, idxs: &[usize], data: &[Bytes], offset: u64, end: u64) -> Vec<u8> {
        let all = self.index.all_chunks();
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (&i, d) in idxs.iter().zip(data) {
            let c = &all[i];
            let from = offset.max(c.file_offset) - c.file_offset;
            let to = end.min(c.file_offset + c.size) - c.file_offset;
            out.extend_from_slice(&d[from as usize..to as usize]);
        }
        self.counters
            .served_bytes
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        out
    }

    /// Reads file bytes only if every chunk they need is cached (no I/O wait);
    /// FUSE threads use it to answer hits inline.
    pub fn read_cached(&self, id: NodeId, offset: u64, size: u32) -> Option<Vec<u8>> {
        let (idxs, end) = self.span(id, offset, size);
        let all = self.index.all_chunks();
        let mut data = Vec::with_capacity(idxs.len());
        for &i in &idxs {
            let c = &all[i];
            if c.zeros {
                data.push(Bytes::from(vec![0u8; c.size as usize]));
                continue;
            }
            data.push(self.cache.get(&self.key(c))?);
        }
        Some(self.assemble(&idxs, &data, offset, end))
    }

    /// Reads file bytes, fetching missing chunks. Blocks; call from a worker.
    pub fn read(&self, id: NodeId, offset: u64, size: u32) -> Result<Vec<u8>> {
        let (idxs, end) = self.span(id, offset, size);
        self.demand.fetch_add(1, Ordering::SeqCst);
        let r = self.chunks(&idxs, self.cfg.max_fetch_span);
        self.demand.fetch_sub(1, Ordering::SeqCst);
        self.last_demand
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
        match r {
            Ok(data) => Ok(self.assemble(&idxs, &data, offset, end)),
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                let path = self
                    .index
                    .path_of(id)
                    .unwrap_or_else(|| format!("inode {id}"));
                tracing::error!(layer = self.name(), file = %path, error = %e, "read failed");
                Err(crate::format::chunk::with_path(e, &path))
            }
        }
    }

    /// Bytes to read ahead after an on-demand read.
    pub fn readahead_window(&self) -> u64 {
        self.cfg.readahead_bytes
    }

    /// Whether a sequential reader at `offset` of file `id` is about to run out of
    /// fetched chunks: the chunk half a window ahead is neither cached nor in flight.
    pub fn readahead_due(&self, id: NodeId, offset: u64, window: u64) -> bool {
        let span = self.index.chunk_span(id);
        let ahead = offset.saturating_add(window / 2);
        match self.index.chunk_at(id, ahead) {
            Some(i) => {
                let g = span.start + i;
                !self.cached[g].load(Ordering::Relaxed) && !self.inflight.contains(g)
            }
            None => false,
        }
    }

    /// Whether file `id` is wholly cached.
    pub fn file_cached(&self, id: NodeId) -> bool {
        self.index
            .chunk_span(id)
            .all(|i| self.cached[i].load(Ordering::Relaxed))
    }

    /// A local file with the whole content of file `id`, for FUSE passthrough, when
    /// it has been assembled from verified cached chunks by this process
    /// ([`RemoteLayer::build_backing_file`]); files left by an earlier process are
    /// not trusted.
    pub fn backing_file(&self, id: NodeId) -> Option<std::fs::File> {
        if !lock(&self.backing).contains(&id) {
            return None;
        }
        let path = self.backing_path(id)?;
        // the disk cache may have evicted it to stay under its limit
        let f = self
            .cache
            .disk()
            .is_some_and(|d| d.touch_file(&path))
            .then(|| std::fs::File::open(&path).ok())
            .flatten();
        if f.is_none() {
            lock(&self.backing).remove(&id);
        }
        f
    }

    /// Whether [`RemoteLayer::build_backing_file`] would have work to do.
    pub fn wants_backing_file(&self, id: NodeId) -> bool {
        self.cache.disk().is_some()
            && self.file_cached(id)
            && !lock(&self.backing).contains(&id)
            && !lock(&self.building).contains(&id)
    }

    fn backing_path(&self, id: NodeId) -> Option<std::path::PathBuf> {
        let dir = self.cache.disk()?.files_dir();
        Some(dir.join(format!("{}-{id}", self.toc_digest.hex())))
    }

    /// Writes file `id` from its verified cached chunks into the cache's `files/`
    /// directory (streamed, temporary name, rename), for later passthrough opens.
    /// Only one thread builds a file, only while all its chunks are still cached,
    /// and its space is reserved in the disk cache before it is written; a file
    /// bigger than half the disk cache is not built (it would evict everything else).
    pub fn build_backing_file(&self, id: NodeId) -> Result<()> {
        let (Some(path), Some(disk)) = (self.backing_path(id), self.cache.disk()) else {
            return Ok(());
        };
        let size = self.index.node(id).map_or(0, |n| n.size);
        if !self.file_cached(id) || lock(&self.backing).contains(&id) || size > disk.limit() / 2 {
            return Ok(());
        }
        let all = self.index.all_chunks();
        let evicted = self
            .index
            .chunk_span(id)
            .any(|i| !all[i].zeros && !self.cache.contains(&self.key(&all[i])));
        if evicted || !lock(&self.building).insert(id) {
            return Ok(());
        }
        disk.track_file(&path, size);
        let r = self.write_backing_file(id, &path);
        match &r {
            Ok(()) => {
                lock(&self.backing).insert(id);
            }
            Err(_) => disk.untrack_file(&path),
        }
        lock(&self.building).remove(&id);
        r
    }

    fn write_backing_file(&self, id: NodeId, path: &std::path::Path) -> Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let write = || -> Result<()> {
            use std::io::Write;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::io(format!("{}: create", dir.display()), e))?;
            }
            let f = std::fs::File::create(&tmp)
                .map_err(|e| Error::io(format!("{}: create", tmp.display()), e))?;
            let mut w = std::io::BufWriter::new(f);
            for i in self.index.chunk_span(id) {
                let c = &self.index.all_chunks()[i];
                let data = if c.zeros {
                    Bytes::from(vec![0u8; c.size as usize])
                } else {
                    self.chunks(&[i], self.cfg.max_fetch_span)?
                        .pop()
                        .unwrap_or_default()
                };
                w.write_all(&data)
                    .map_err(|e| Error::io(format!("{}: write", tmp.display()), e))?;
            }
            w.flush()
                .map_err(|e| Error::io(format!("{}: write", tmp.display()), e))?;
            std::fs::rename(&tmp, path)
                .map_err(|e| Error::io(format!("{}: rename", path.display()), e))
        };
        write().inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// Fetches the chunks of file `id` that follow `offset`, up to `window` bytes,
    /// so that a sequential reader finds them cached (or in flight).
    pub fn readahead(&self, id: NodeId, offset: u64, window: u64) {
        let span = self.index.chunk_span(id);
        let all = self.index.all_chunks();
        let Some(first) = self.index.chunk_at(id, offset).map(|i| span.start + i) else {
            return;
        };
        let mut bytes = 0;
        let idxs: Vec<usize> = (first..span.end)
            .filter(|&i| !self.cached[i].load(Ordering::Relaxed))
            .take_while(|&i| {
                bytes += all[i].size;
                bytes <= window
            })
            .collect();
        if !idxs.is_empty()
            && let Err(e) = self.chunks(&idxs, self.cfg.max_fetch_span)
        {
            tracing::debug!(layer = self.name(), error = %e, "read-ahead failed");
        }
    }

    /// Reads compressed ranges: the parts within the tail held in memory from it,
    /// the rest from the registry (counted, one request).
    pub(crate) fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let (start, tail) = match &self.tail {
            Some((s, t)) => (*s, t),
            None => (u64::MAX, &Bytes::new()),
        };
        let remote: Vec<Range<u64>> = ranges
            .iter()
            .filter(|r| r.start < start)
            .map(|r| r.start..r.end.min(start))
            .collect();
        let mut got = if remote.is_empty() {
            Vec::new()
        } else {
            self.counters.fetch_requests.fetch_add(1, Ordering::Relaxed);
            let got = self.blob.read_ranges(&remote)?;
            let n: usize = got.iter().map(Bytes::len).sum();
            self.counters
                .fetched_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            got
        }
        .into_iter();
        ranges
            .iter()
            .map(|r| {
                let head = if r.start < start { got.next() } else { None };
                if r.end <= start {
                    return head.ok_or_else(|| self.short_read(r));
                }
                let from = (r.start.max(start) - start) as usize;
                let to = (r.end - start) as usize;
                let mem = tail
                    .get(from..to)
                    .map(|_| tail.slice(from..to))
                    .ok_or_else(|| self.short_read(r))?;
                Ok(match head {
                    Some(h) => [h, mem].concat().into(),
                    None => mem,
                })
            })
            .collect()
    }

    /// The error of a range the blob did not deliver.
    fn short_read(&self, r: &Range<u64>) -> Error {
        Error::Fetch {
            blob: self.name().to_string(),
            reason: format!("range {}..{} past the end", r.start, r.end),
        }
    }

    /// Gets chunks by global index: cache, or one fetch per run of adjacent
    /// chunks (runs of at most `max_span` bytes), shared with concurrent callers.
    fn chunks(&self, idxs: &[usize], max_span: u64) -> Result<Vec<Bytes>> {
        fetch::get(self, idxs, max_span, true)
    }

    /// Fetches everything before the `.prefetch.landmark` in one request, or the
    /// whole layer when it is small. Returns the bytes fetched.
    pub fn prefetch(&self) -> Result<u64> {
        let all = self.index.all_chunks();
        let limit = if self.blob.size() <= self.cfg.small_layer_bytes {
            u64::MAX
        } else if self.cfg.prefetch {
            match self.index.prefetch_end() {
                Some(e) if e > 0 => e,
                _ => return Ok(0),
            }
        } else {
            return Ok(0);
        };
        let mut idxs: Vec<usize> = (0..all.len())
            .filter(|&i| all[i].compressed_end <= limit && !all[i].zeros)
            .filter(|&i| !self.cached[i].load(Ordering::Relaxed))
            .collect();
        idxs.sort_by_key(|&i| all[i].compressed_offset);
        let before = self.counters.fetched_bytes.load(Ordering::Relaxed);
        self.chunks(&idxs, u64::MAX)?;
        Ok(self.counters.fetched_bytes.load(Ordering::Relaxed) - before)
    }

    /// Fetches every chunk not yet cached, a span at a time, pausing while on-demand
    /// reads wait. Stops early when `stop` is set.
    pub fn fetch_all(&self, stop: &AtomicBool, pause_on_demand: bool) -> Result<()> {
        let all = self.index.all_chunks();
        let mut order: Vec<usize> = (0..all.len()).filter(|&i| !all[i].zeros).collect();
        order.sort_by_key(|&i| all[i].compressed_offset);
        let mut batch: Vec<usize> = Vec::new();
        let mut start = 0u64;
        let flush = |batch: &mut Vec<usize>| -> Result<()> {
            if batch.is_empty() {
                return Ok(());
            }
            while pause_on_demand && (self.demand.load(Ordering::SeqCst) > 0 || !self.quiet()) {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            self.chunks(batch, u64::MAX)?;
            batch.clear();
            Ok(())
        };
        for i in order {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if self.cached[i].load(Ordering::Relaxed) {
                continue;
            }
            let c = &all[i];
            if batch.is_empty() {
                start = c.compressed_offset;
            } else if c.compressed_end - start > self.cfg.background_span {
                flush(&mut batch)?;
                start = c.compressed_offset;
            }
            batch.push(i);
        }
        flush(&mut batch)
    }

    /// Whether no read has needed the network for the background delay.
    fn quiet(&self) -> bool {
        let now = self.opened.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_demand.load(Ordering::Relaxed)) >= self.cfg.background_delay_ms
    }

    /// Compressed ranges of the chunks not yet cached (unlazy and `status` use it).
    pub fn missing_ranges(&self) -> Vec<Range<u64>> {
        let all = self.index.all_chunks();
        let mut v: Vec<Range<u64>> = (0..all.len())
            .filter(|&i| !all[i].zeros && !self.cached[i].load(Ordering::Relaxed))
            .map(|i| all[i].compressed_offset..all[i].compressed_end)
            .collect();
        v.sort_by_key(|r| r.start);
        v.dedup();
        v
    }

    /// Counters for status and metrics.
    pub fn stats(&self) -> LayerStats {
        let c = &self.counters;
        let cached = c.cached_bytes.load(Ordering::Relaxed);
        LayerStats {
            name: self.blob.name().to_string(),
            format: self.format.name(),
            toc_digest: self.toc_digest.to_string(),
            blob_size: self.blob.size(),
            fetched_bytes: c.fetched_bytes.load(Ordering::Relaxed),
            fetch_requests: c.fetch_requests.load(Ordering::Relaxed),
            served_bytes: c.served_bytes.load(Ordering::Relaxed),
            chunks_total: self.cached.len() as u64,
            chunks_cached: c.cached_chunks.load(Ordering::Relaxed),
            bytes_total: self.bytes_total,
            bytes_cached: cached,
            fraction_complete: if self.bytes_total == 0 {
                1.0
            } else {
                cached as f64 / self.bytes_total as f64
            },
            read_errors: c.errors.load(Ordering::Relaxed),
        }
    }
}
