//! The chunk cache shared by every layer: a memory LRU of hot chunks in front of a
//! content-addressed disk cache of verified chunks that survives restarts.
//!
//! Keys are chunk digests, so identical chunks of different layers are stored once.
//! A chunk read back from disk is hashed again before it is served: a damaged cache
//! file is dropped and fetched anew, never returned.

mod disk;

use std::path::PathBuf;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use serde::Deserialize;

use crate::error::Result;
use crate::format::Digest;
pub use disk::DiskCache;

/// What a cached chunk is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CacheKey {
    /// A chunk with a digest: the key is the digest, and it is re-verified on load.
    Verified(Digest),
    /// A chunk of a legacy layer without digests: keyed by blob digest and offset.
    Unverified(Digest),
}

impl CacheKey {
    /// Key for a chunk without a digest of its own.
    pub fn unverified(blob: &str, compressed_offset: u64, inner_offset: u64) -> Self {
        let mut h = crate::format::digest::Hasher::new();
        h.update(blob.as_bytes());
        h.update(&compressed_offset.to_le_bytes());
        h.update(&inner_offset.to_le_bytes());
        CacheKey::Unverified(h.finish())
    }

    fn digest(&self) -> &Digest {
        match self {
            CacheKey::Verified(d) | CacheKey::Unverified(d) => d,
        }
    }
}

/// Cache configuration (`[cache]` in the daemon's config file).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Directory of the disk cache; `None` keeps chunks in memory only.
    pub dir: Option<PathBuf>,
    /// Disk cache limit in bytes; least recently used chunks are evicted past it.
    pub disk_limit: u64,
    /// Memory LRU limit in bytes.
    pub memory_limit: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: None,
            disk_limit: 10 << 30,
            memory_limit: 256 << 20,
        }
    }
}

struct Mem {
    lru: LruCache<CacheKey, Bytes>,
    bytes: u64,
}

/// The shared chunk cache.
pub struct ChunkCache {
    mem: Mutex<Mem>,
    mem_limit: u64,
    disk: Option<Arc<DiskCache>>,
    /// Chunks waiting to be written to disk by the writer thread, so that a read that
    /// fetched a chunk does not also wait for the disk.
    writer: Option<Writer>,
}

struct Writer {
    tx: Option<SyncSender<(CacheKey, Bytes)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Chunks queued for the disk at most; past it a write happens on the caller's thread.
const WRITE_QUEUE: usize = 64;

fn write_chunk(disk: &DiskCache, key: &CacheKey, data: &[u8]) {
    if let Err(e) = disk.insert(key, data) {
        tracing::warn!(chunk = %key.digest(), error = %e, "disk cache write failed");
    }
}

fn start_writer(disk: Arc<DiskCache>) -> Option<Writer> {
    let (tx, rx) = sync_channel::<(CacheKey, Bytes)>(WRITE_QUEUE);
    let thread = std::thread::Builder::new()
        .name("lazysnap-cache".into())
        .spawn(move || {
            for (key, data) in rx {
                write_chunk(&disk, &key, &data);
            }
        })
        .ok()?;
    Some(Writer {
        tx: Some(tx),
        thread: Some(thread),
    })
}

impl Drop for ChunkCache {
    /// Writes every queued chunk before the cache goes away.
    fn drop(&mut self) {
        if let Some(w) = &mut self.writer {
            w.tx.take();
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Cache counters for status and metrics.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CacheStats {
    pub memory_bytes: u64,
    pub memory_chunks: u64,
    pub disk_bytes: u64,
    pub disk_chunks: u64,
    pub disk_limit: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub corrupt_dropped: u64,
}

impl ChunkCache {
    /// Opens the cache, scanning the disk directory if there is one.
    pub fn new(cfg: &CacheConfig) -> Result<Self> {
        let disk = match &cfg.dir {
            Some(d) => Some(Arc::new(DiskCache::open(d, cfg.disk_limit)?)),
            None => None,
        };
        let writer = disk.clone().and_then(start_writer);
        Ok(ChunkCache {
            mem: Mutex::new(Mem {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            mem_limit: cfg.memory_limit,
            disk,
            writer,
        })
    }

    /// A memory-only cache (tests, `layer cat`).
    pub fn in_memory(limit: u64) -> Self {
        ChunkCache {
            mem: Mutex::new(Mem {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            mem_limit: limit,
            disk: None,
            writer: None,
        }
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chunk, from memory or disk.
    pub fn get(&self, key: &CacheKey) -> Option<Bytes> {
        if let Some(b) = self.mem().lru.get(key) {
            if let Some(d) = &self.disk {
                d.count_hit();
            }
            return Some(b.clone());
        }
        let disk = self.disk.as_ref()?;
        let data = disk.get(key)?;
        self.put_mem(*key, data.clone());
        Some(data)
    }

    /// Whether the chunk is cached, without loading it.
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.mem().lru.contains(key) || self.disk.as_ref().is_some_and(|d| d.contains(key))
    }

    /// Stores a chunk the caller has verified: in memory at once, on disk from the
    /// writer thread (or right here when its queue is full).
    pub fn insert(&self, key: CacheKey, data: Bytes) {
        if let Some(d) = &self.disk {
            let queued = self.writer.as_ref().and_then(|w| w.tx.as_ref()).map(|tx| {
                match tx.try_send((key, data.clone())) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
                }
            });
            if queued != Some(true) {
                write_chunk(d, &key, &data);
            }
        }
        self.put_mem(key, data);
    }

    /// Stores a verified chunk in memory only: unlazy's chunks, which readers of
    /// the layer may still want while the layer is being written out, but which
    /// need no second copy on disk.
    pub fn insert_memory(&self, key: CacheKey, data: Bytes) {
        self.put_mem(key, data);
    }

    fn put_mem(&self, key: CacheKey, data: Bytes) {
        if data.len() as u64 > self.mem_limit {
            return;
        }
        let mut m = self.mem();
        m.bytes += data.len() as u64;
        if let Some(old) = m.lru.put(key, data) {
            m.bytes -= old.len() as u64;
        }
        while m.bytes > self.mem_limit {
            match m.lru.pop_lru() {
                Some((_, v)) => m.bytes -= v.len() as u64,
                None => break,
            }
        }
    }

    /// Directory of the disk cache, if any.
    pub fn disk(&self) -> Option<&DiskCache> {
        self.disk.as_deref()
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        let m = self.mem();
        let mut s = self.disk.as_ref().map(|d| d.stats()).unwrap_or_default();
        s.memory_bytes = m.bytes;
        s.memory_chunks = m.lru.len() as u64;
        s
    }
}
