//! The lazy layer over a blob: reads through the chunk cache, fetch sharing,
//! prefetch, background fetch and corrupted chunks.

mod common;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lazysnap::cache::{CacheConfig, ChunkCache};
use lazysnap::format::writer::WriteOptions;
use lazysnap::format::{Format, Kind, OpenOptions};
use lazysnap::layer::{LayerConfig, RemoteBlob, RemoteLayer};

/// An in-memory blob that counts requests and can corrupt a byte.
struct TestBlob {
    data: Mutex<Vec<u8>>,
    requests: AtomicU64,
    bytes: AtomicU64,
    delay_ms: u64,
    /// A blob offset whose byte the next read covering it gets flipped (in transit).
    flip_once: Mutex<Option<u64>>,
}

impl RemoteBlob for TestBlob {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn name(&self) -> &str {
        "test-registry/test-repo@sha256:test"
    }
    fn read_ranges(&self, ranges: &[Range<u64>]) -> lazysnap::Result<Vec<Bytes>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if self.delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.delay_ms));
        }
        let d = self.data.lock().unwrap();
        let mut flip = self.flip_once.lock().unwrap();
        Ok(ranges
            .iter()
            .map(|r| {
                self.bytes.fetch_add(r.end - r.start, Ordering::SeqCst);
                let mut v = d[r.start as usize..r.end as usize].to_vec();
                if let Some(at) = flip.filter(|at| r.contains(at)) {
                    v[(at - r.start) as usize] ^= 0x55;
                    *flip = None;
                }
                Bytes::from(v)
            })
            .collect())
    }
}

/// The corpus converted to `format` (4 KiB chunks): the tar, the blob, its TOC digest.
fn corpus_blob(format: Format, prioritized: Vec<String>) -> (Vec<u8>, Vec<u8>, String) {
    let tar = common::corpus_tar(4096);
    let (blob, res) = common::convert(
        &tar,
        &WriteOptions {
            format,
            chunk_size: 4096,
            prioritized,
            ..WriteOptions::default()
        },
    );
    (tar, blob, res.toc_digest)
}

/// Opens `blob` as a remote layer over a counting test blob and `cache`.
fn open_over(
    blob: &[u8],
    toc_digest: &str,
    delay_ms: u64,
    cache: Arc<ChunkCache>,
    cfg: LayerConfig,
) -> (Arc<TestBlob>, Arc<RemoteLayer>) {
    let b = Arc::new(TestBlob {
        data: Mutex::new(blob.to_vec()),
        requests: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        delay_ms,
        flip_once: Mutex::new(None),
    });
    let layer = RemoteLayer::open(
        b.clone(),
        &OpenOptions {
            toc_digest: Some(toc_digest.parse().unwrap()),
            ..OpenOptions::default()
        },
        cache,
        cfg,
    )
    .unwrap();
    (b, layer)
}

fn setup(
    format: Format,
    prioritized: Vec<String>,
    delay_ms: u64,
    cfg: LayerConfig,
) -> (Vec<u8>, Arc<TestBlob>, Arc<RemoteLayer>) {
    let (tar, blob, toc) = corpus_blob(format, prioritized);
    let cache = Arc::new(ChunkCache::in_memory(64 << 20));
    let (b, layer) = open_over(&blob, &toc, delay_ms, cache, cfg);
    (tar, b, layer)
}

fn no_small() -> LayerConfig {
    LayerConfig {
        small_layer_bytes: 0,
        ..LayerConfig::default()
    }
}

#[test]
fn open_costs_one_request_and_reads_match_the_tar() {
    for format in [Format::Estargz, Format::EstargzZstd, Format::ZstdChunked] {
        let (tar, blob, layer) = setup(format, vec![], 0, no_small());
        assert_eq!(
            blob.requests.load(Ordering::SeqCst),
            1,
            "footer and TOC in one read"
        );
        let expected = common::tar_entries(&tar);
        for (path, id) in layer.index().walk() {
            let n = layer.index().node(id).unwrap();
            if n.kind != Kind::Reg {
                continue;
            }
            let want = common::file_content(&expected, &path).unwrap_or(b"\x0f");
            let got = layer.read(id, 0, n.size as u32 + 10).unwrap();
            assert!(got == want, "{format:?} {path}");
            // now cached: the inline path answers without I/O
            let before = blob.requests.load(Ordering::SeqCst);
            assert_eq!(layer.read_cached(id, 0, n.size as u32).unwrap(), want);
            assert_eq!(blob.requests.load(Ordering::SeqCst), before);
        }
        let s = layer.stats();
        assert!((s.fraction_complete - 1.0).abs() < 1e-9, "{s:?}");
        assert!(s.fetched_bytes > 0 && s.served_bytes > 0);
    }
}

#[test]
fn concurrent_readers_share_one_fetch() {
    let (_, blob, layer) = setup(Format::Estargz, vec![], 100, no_small());
    let (path, id) = layer
        .index()
        .walk()
        .into_iter()
        .filter(|(_, id)| layer.index().node(*id).unwrap().size > 8192)
        .max_by_key(|(_, id)| layer.index().node(*id).unwrap().size)
        .unwrap();
    let size = layer.index().node(id).unwrap().size as u32;
    let before = blob.requests.load(Ordering::SeqCst);
    let results: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| layer.read(id, 0, size).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.windows(2).all(|w| w[0] == w[1]), "{path}");
    let n = blob.requests.load(Ordering::SeqCst) - before;
    assert!(n <= 2, "8 concurrent readers of {path} caused {n} requests");
}

#[test]
fn prefetch_fetches_prioritized_files_in_one_request() {
    let tar = common::corpus_tar(4096);
    let entries = common::tar_entries(&tar);
    let prio: Vec<String> = entries
        .iter()
        .filter(|e| e.kind == "reg" && e.size > 0)
        .take(3)
        .map(|e| e.path.clone())
        .collect();
    let (_, blob, layer) = setup(Format::Estargz, prio.clone(), 0, no_small());
    let before = blob.requests.load(Ordering::SeqCst);
    let fetched = layer.prefetch().unwrap();
    assert_eq!(blob.requests.load(Ordering::SeqCst) - before, 1);
    assert!(fetched > 0);
    for p in &prio {
        let id = layer.index().lookup_path(p).unwrap();
        assert!(layer.file_cached(id), "{p} prefetched");
    }
    assert!(
        layer.stats().fraction_complete < 1.0,
        "only the prioritized part"
    );
    // background fetch completes the layer
    layer.fetch_all(&AtomicBool::new(false), true).unwrap();
    assert!((layer.stats().fraction_complete - 1.0).abs() < 1e-9);
    assert!(layer.missing_ranges().is_empty());
}

#[test]
fn small_layers_are_fetched_whole_at_mount() {
    let (_, blob, layer) = setup(Format::Estargz, vec![], 0, LayerConfig::default());
    assert!(blob.size() < LayerConfig::default().small_layer_bytes);
    layer.prefetch().unwrap();
    assert!((layer.stats().fraction_complete - 1.0).abs() < 1e-9);
}

#[test]
fn a_corrupted_chunk_fails_that_read_only() {
    let (tar, blob, layer) = setup(Format::Estargz, vec![], 0, no_small());
    let expected = common::tar_entries(&tar);
    let files: Vec<(String, u32)> = layer
        .index()
        .walk()
        .into_iter()
        .filter(|(_, id)| layer.index().node(*id).unwrap().size > 10_000)
        .take(2)
        .collect();
    let (bad, bad_id) = &files[0];
    let c = layer.index().chunks(*bad_id)[0].clone();
    {
        let mut d = blob.data.lock().unwrap();
        let mid = ((c.compressed_offset + c.compressed_end) / 2) as usize;
        d[mid] ^= 0x55;
    }
    let before = blob.requests.load(Ordering::SeqCst);
    let err = layer.read(*bad_id, 0, 100).unwrap_err().to_string();
    assert!(err.contains(bad.as_str()), "error names the file: {err}");
    assert_eq!(layer.stats().read_errors, 1);
    assert_eq!(
        blob.requests.load(Ordering::SeqCst) - before,
        3,
        "fetched three times before failing"
    );
    let (good, good_id) = &files[1];
    let got = layer.read(*good_id, 0, 1 << 20).unwrap();
    assert_eq!(got, common::file_content(&expected, good).unwrap());
    // and the bad chunk was not cached
    assert!(layer.read_cached(*bad_id, 0, 100).is_none());
}

#[test]
fn a_chunk_damaged_in_transit_is_fetched_again() {
    let (tar, blob, layer) = setup(Format::Estargz, vec![], 0, no_small());
    let expected = common::tar_entries(&tar);
    let (path, id) = layer
        .index()
        .walk()
        .into_iter()
        .find(|(_, id)| layer.index().node(*id).unwrap().size > 10_000)
        .unwrap();
    let c = layer.index().chunks(id)[1].clone();
    *blob.flip_once.lock().unwrap() = Some((c.compressed_offset + c.compressed_end) / 2);
    let before = blob.requests.load(Ordering::SeqCst);
    let got = layer.read(id, 0, 1 << 20).unwrap();
    assert_eq!(got, common::file_content(&expected, &path).unwrap());
    assert_eq!(blob.requests.load(Ordering::SeqCst) - before, 2);
    assert_eq!(layer.stats().read_errors, 0);
}

#[test]
fn disk_cache_is_shared_and_survives_a_new_layer_object() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CacheConfig {
        dir: Some(dir.path().to_path_buf()),
        ..CacheConfig::default()
    };
    let (_, data, toc) = corpus_blob(Format::Estargz, vec![]);
    let open = |cache: Arc<ChunkCache>| open_over(&data, &toc, 0, cache, no_small());
    let (_, l1) = open(Arc::new(ChunkCache::new(&cfg).unwrap()));
    l1.fetch_all(&AtomicBool::new(false), false).unwrap();
    drop(l1);
    // a fresh cache object over the same directory: everything is already there
    let (b2, l2) = open(Arc::new(ChunkCache::new(&cfg).unwrap()));
    assert!((l2.stats().fraction_complete - 1.0).abs() < 1e-9);
    for (_, id) in l2.index().walk() {
        let size = l2.index().node(id).unwrap().size as u32;
        l2.read(id, 0, size).unwrap();
    }
    assert_eq!(
        b2.requests.load(Ordering::SeqCst),
        1,
        "only the TOC was read"
    );
}

#[test]
fn passthrough_files_are_built_from_verified_chunks_by_this_process_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CacheConfig {
        dir: Some(dir.path().to_path_buf()),
        ..CacheConfig::default()
    };
    let (tar, data, toc) = corpus_blob(Format::Estargz, vec![]);
    let open = || {
        open_over(
            &data,
            &toc,
            0,
            Arc::new(ChunkCache::new(&cfg).unwrap()),
            no_small(),
        )
        .1
    };
    let l = open();
    let (path, id) = l
        .index()
        .walk()
        .into_iter()
        .find(|(_, id)| l.index().chunks(*id).len() > 2)
        .unwrap();
    assert!(l.backing_file(id).is_none(), "nothing cached yet");
    assert!(!l.wants_backing_file(id));
    l.fetch_all(&AtomicBool::new(false), false).unwrap();
    assert!(l.wants_backing_file(id));
    l.build_backing_file(id).unwrap();
    let mut f = l.backing_file(id).expect("built");
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut got).unwrap();
    let expected = common::tar_entries(&tar);
    assert_eq!(got, common::file_content(&expected, &path).unwrap());
    // a file left on disk by an earlier process is not trusted, even if tampered with
    let file = std::fs::read_dir(dir.path().join("files"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&file, vec![0u8; got.len()]).unwrap();
    drop(l);
    let l2 = open();
    assert!(l2.backing_file(id).is_none());
    l2.build_backing_file(id).unwrap();
    let mut got2 = Vec::new();
    std::io::Read::read_to_end(&mut l2.backing_file(id).unwrap(), &mut got2).unwrap();
    assert_eq!(got2, got, "rebuilt from verified chunks");
}

#[test]
fn small_layer_prefetch_reuses_the_tail_read_at_open() {
    // an incompressible file makes the blob larger than the tail read at open
    let mut t = common::Corpus::new();
    let data = common::prng_bytes(7, 700 << 10);
    t.file("bin/big", 0o755, &common::ROOT, &data);
    let tar = t.finish();
    let (blob, res) = common::convert(
        &tar,
        &WriteOptions {
            format: Format::Estargz,
            chunk_size: 64 << 10,
            ..WriteOptions::default()
        },
    );
    let tail = lazysnap::layer::tail::TAIL_BYTES;
    assert!(blob.len() as u64 > tail && (blob.len() as u64) < 2 * tail);
    let cache = Arc::new(ChunkCache::in_memory(64 << 20));
    let (b, layer) = open_over(&blob, &res.toc_digest, 0, cache, LayerConfig::default());
    let opened = b.bytes.load(Ordering::SeqCst);
    layer.prefetch().unwrap();
    assert_eq!(b.requests.load(Ordering::SeqCst), 2, "open + one prefetch");
    let total = b.bytes.load(Ordering::SeqCst);
    assert!(
        total <= blob.len() as u64,
        "no blob byte is fetched twice: {total} of {} ({opened} at open)",
        blob.len()
    );
    assert!((layer.stats().fraction_complete - 1.0).abs() < 1e-9);
    let id = layer.index().lookup_path("bin/big").unwrap();
    assert_eq!(layer.read(id, 0, data.len() as u32).unwrap(), data);
    assert_eq!(
        b.requests.load(Ordering::SeqCst),
        2,
        "reads come from the cache"
    );
}
