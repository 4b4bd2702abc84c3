//! The disk half of the chunk cache: one file per chunk under `<dir>/<xx>/<hex>`,
//! written to a temporary name and renamed, so a crash leaves either the whole
//! chunk or nothing. A size limit evicts the least recently used chunks, and the
//! whole files assembled under `<dir>/files` for FUSE passthrough count against the
//! same limit and are evicted with them.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::{CacheKey, CacheStats};
use crate::error::{Error, IoContext, Result};
use crate::format::Digest;

struct Entry {
    size: u64,
    tick: u64,
}

struct State {
    entries: HashMap<CacheKey, Entry>,
    /// Passthrough files, by path.
    files: HashMap<PathBuf, Entry>,
    total: u64,
    tick: u64,
}

/// Something eviction removes.
enum Victim {
    Chunk(CacheKey),
    File(PathBuf),
}

/// Content-addressed chunk files with an LRU size limit.
pub struct DiskCache {
    dir: PathBuf,
    limit: u64,
    state: Mutex<State>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    corrupt: AtomicU64,
    tmp_seq: AtomicU64,
}

fn prefix(key: &CacheKey) -> &'static str {
    match key {
        CacheKey::Verified(_) => "v",
        CacheKey::Unverified(_) => "u",
    }
}

impl DiskCache {
    /// Opens (creating if needed) the cache at `dir`, indexing what is there and
    /// removing temporary files a crash left behind, and the passthrough files of an
    /// earlier process (never trusted, so only taking space).
    pub fn open(dir: &Path, limit: u64) -> Result<Self> {
        for sub in ["tmp", "files"] {
            let tmp = dir.join(sub);
            // chunks hold image files whatever their modes: for root's eyes only (so
            // are the directories created above the cache, the daemon's root say)
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&tmp)
                .ctx(|| format!("{}: cannot create cache", dir.display()))?;
            for e in fs::read_dir(&tmp).ctx(|| format!("{}: cannot list", tmp.display()))? {
                let e = e.ctx(|| format!("{}: cannot list", tmp.display()))?;
                let _ = fs::remove_file(e.path());
            }
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .ctx(|| format!("{}: cannot restrict the cache to its owner", dir.display()))?;
        let mut found: Vec<(CacheKey, u64, std::time::SystemTime)> = Vec::new();
        for kind in ["v", "u"] {
            let base = dir.join(kind);
            let Ok(subdirs) = fs::read_dir(&base) else {
                continue;
            };
            for sub in subdirs.flatten() {
                let Ok(files) = fs::read_dir(sub.path()) else {
                    continue;
                };
                for f in files.flatten() {
                    let name = f.file_name();
                    let Some(Ok(d)) = name.to_str().map(str::parse::<Digest>) else {
                        let _ = fs::remove_file(f.path());
                        continue;
                    };
                    let Ok(meta) = f.metadata() else { continue };
                    let key = if kind == "v" {
                        CacheKey::Verified(d)
                    } else {
                        CacheKey::Unverified(d)
                    };
                    found.push((
                        key,
                        meta.len(),
                        meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                    ));
                }
            }
        }
        found.sort_by_key(|(_, _, t)| *t);
        let mut state = State {
            entries: HashMap::with_capacity(found.len()),
            files: HashMap::new(),
            total: 0,
            tick: 0,
        };
        for (key, size, _) in found {
            state.tick += 1;
            state.total += size;
            state.entries.insert(
                key,
                Entry {
                    size,
                    tick: state.tick,
                },
            );
        }
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            limit,
            state: Mutex::new(state),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
        };
        cache.evict();
        Ok(cache)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, key: &CacheKey) -> PathBuf {
        let hex = key.digest().hex();
        self.dir.join(prefix(key)).join(&hex[..2]).join(hex)
    }

    pub(super) fn count_hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the chunk is on disk.
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.state().entries.contains_key(key)
    }

    /// Loads a chunk; a verified chunk whose bytes no longer match is deleted.
    pub fn get(&self, key: &CacheKey) -> Option<Bytes> {
        {
            let mut s = self.state();
            s.tick += 1;
            let tick = s.tick;
            match s.entries.get_mut(key) {
                Some(e) => e.tick = tick,
                None => {
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        let path = self.path(key);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(_) => {
                self.forget(key);
                self.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        if let CacheKey::Verified(d) = key
            && Digest::of(&data) != *d
        {
            tracing::warn!(path = %path.display(), "cached chunk fails its digest; dropped");
            self.corrupt.fetch_add(1, Ordering::Relaxed);
            let _ = fs::remove_file(&path);
            self.forget(key);
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(Bytes::from(data))
    }

    fn forget(&self, key: &CacheKey) {
        let mut s = self.state();
        if let Some(e) = s.entries.remove(key) {
            s.total -= e.size;
        }
    }

    /// Writes a chunk atomically (temporary file, fsync-free rename: a torn write
    /// is caught by the digest check on load).
    pub fn insert(&self, key: &CacheKey, data: &[u8]) -> Result<()> {
        if self.contains(key) {
            return Ok(());
        }
        let path = self.path(key);
        let tmp = self.dir.join("tmp").join(format!(
            "{}-{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            drop(f);
            fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(
                format!("{}: cannot write cached chunk", path.display()),
                e,
            ));
        }
        {
            let mut s = self.state();
            s.tick += 1;
            let tick = s.tick;
            s.total += data.len() as u64;
            if let Some(old) = s.entries.insert(
                *key,
                Entry {
                    size: data.len() as u64,
                    tick,
                },
            ) {
                s.total -= old.size;
            }
        }
        self.evict();
        Ok(())
    }

    /// Removes least recently used chunks and passthrough files until the cache is
    /// under 90% of its limit.
    fn evict(&self) {
        let victims: Vec<Victim> = {
            let mut s = self.state();
            if s.total <= self.limit {
                return;
            }
            let target = self.limit / 10 * 9;
            let mut all: Vec<(u64, Victim, u64)> = s
                .entries
                .iter()
                .map(|(k, e)| (e.tick, Victim::Chunk(*k), e.size))
                .chain(
                    s.files
                        .iter()
                        .map(|(p, e)| (e.tick, Victim::File(p.clone()), e.size)),
                )
                .collect();
            all.sort_unstable_by_key(|(t, _, _)| *t);
            let mut out = Vec::new();
            for (_, v, size) in all {
                if s.total <= target {
                    break;
                }
                s.total -= size;
                match &v {
                    Victim::Chunk(k) => {
                        s.entries.remove(k);
                    }
                    Victim::File(p) => {
                        s.files.remove(p);
                    }
                }
                out.push(v);
            }
            out
        };
        for v in victims {
            let path = match v {
                Victim::Chunk(k) => self.path(&k),
                Victim::File(p) => p,
            };
            let _ = fs::remove_file(path);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Where passthrough files live.
    pub fn files_dir(&self) -> PathBuf {
        self.dir.join("files")
    }

    /// Counts a passthrough file about to be written under [`DiskCache::files_dir`]
    /// against the limit, evicting older entries to stay under it.
    pub fn track_file(&self, path: &Path, size: u64) {
        {
            let mut s = self.state();
            s.tick += 1;
            let tick = s.tick;
            s.total += size;
            if let Some(old) = s.files.insert(path.to_path_buf(), Entry { size, tick }) {
                s.total -= old.size;
            }
        }
        self.evict();
    }

    /// Forgets a passthrough file that could not be written.
    pub fn untrack_file(&self, path: &Path) {
        let mut s = self.state();
        if let Some(e) = s.files.remove(path) {
            s.total -= e.size;
        }
    }

    /// Marks a passthrough file as just used; false when it has been evicted.
    pub fn touch_file(&self, path: &Path) -> bool {
        let mut s = self.state();
        s.tick += 1;
        let tick = s.tick;
        match s.files.get_mut(path) {
            Some(e) => {
                e.tick = tick;
                true
            }
            None => false,
        }
    }

    /// The size limit, in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes on disk.
    pub fn usage(&self) -> u64 {
        self.state().total
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn stats(&self) -> CacheStats {
        let s = self.state();
        CacheStats {
            disk_bytes: s.total,
            disk_chunks: s.entries.len() as u64,
            disk_limit: self.limit,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            corrupt_dropped: self.corrupt.load(Ordering::Relaxed),
            ..CacheStats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_verifies_evicts_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 10_000).unwrap();
        let mut keys = Vec::new();
        for i in 0..20u8 {
            let data = vec![i; 1000];
            let k = CacheKey::Verified(Digest::of(&data));
            c.insert(&k, &data).unwrap();
            keys.push((k, data));
        }
        assert!(c.usage() <= 10_000, "limit respected: {}", c.usage());
        assert!(c.stats().evictions > 0);
        let last = &keys[19];
        assert_eq!(c.get(&last.0).unwrap(), last.1);
        assert!(c.get(&keys[0].0).is_none(), "oldest evicted");
        // corrupt a file on disk: it is dropped, not served
        let path = c.path(&last.0);
        fs::write(&path, vec![0u8; 1000]).unwrap();
        assert!(c.get(&last.0).is_none());
        assert!(!path.exists());
        assert_eq!(c.stats().corrupt_dropped, 1);
        // reopen: the index is rebuilt from disk, temporary files are cleared
        fs::write(dir.path().join("tmp").join("junk"), b"x").unwrap();
        let k18 = keys[18].0;
        drop(c);
        let c = DiskCache::open(dir.path(), 10_000).unwrap();
        assert_eq!(c.get(&k18).unwrap(), keys[18].1);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn passthrough_files_count_against_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("files")).unwrap();
        fs::write(dir.path().join("files").join("stale"), b"earlier process").unwrap();
        let c = DiskCache::open(dir.path(), 10_000).unwrap();
        assert!(!c.files_dir().join("stale").exists(), "stale files removed");
        let chunk = vec![1u8; 3000];
        let k = CacheKey::Verified(Digest::of(&chunk));
        c.insert(&k, &chunk).unwrap();
        let f = c.files_dir().join("a");
        c.track_file(&f, 4000);
        fs::write(&f, vec![2u8; 4000]).unwrap();
        assert_eq!(c.usage(), 7000);
        assert!(c.touch_file(&f));
        // a second file pushes the total past the limit: the chunk (oldest) goes first
        let g = c.files_dir().join("b");
        c.track_file(&g, 4000);
        assert!(c.usage() <= 9000, "{}", c.usage());
        assert!(!c.contains(&k));
        assert!(c.touch_file(&f) && c.touch_file(&g));
        // then the least recently used file
        let h = c.files_dir().join("c");
        c.track_file(&h, 4000);
        assert!(!c.touch_file(&f), "evicted");
        assert!(!f.exists());
        c.untrack_file(&h);
        assert_eq!(c.usage(), 4000);
    }
}
