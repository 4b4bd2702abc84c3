//! TOC parse + index time and resident bytes per entry for a 100,000-entry TOC.
//!
//! Run: `cargo bench --bench toc_index`. The baseline in the same run is the time
//! serde_json alone takes to parse the same JSON into generic values, so the figure
//! reads as a ratio on noisy machines.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use lazysnap::format::index::Index;
use lazysnap::format::toc::{self, Toc, TocEntry};
use lazysnap::format::{Digest, time};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// A realistic tree: 100 top dirs × 10 subdirs, files of mixed sizes, some
/// symlinks, hard links and multi-chunk files, like a distribution root fs.
fn synthetic_toc(n: usize) -> Vec<u8> {
    let mut entries = Vec::with_capacity(n + n / 10);
    let mtime = time::format(1_700_000_000, 0);
    let mut offset = 512i64;
    let mut i = 0usize;
    'outer: for a in 0..100 {
        for b in 0..10 {
            let dir = format!("usr/share/pkg{a:03}/sub{b}/");
            entries.push(TocEntry {
                name: dir.clone(),
                kind: "dir".into(),
                mode: 0o40755,
                modtime: mtime.clone(),
                ..TocEntry::default()
            });
            i += 1;
            for f in 0..n / 1000 {
                if i >= n {
                    break 'outer;
                }
                i += 1;
                let name = format!("{dir}file-{f:04}.dat");
                if f % 17 == 5 {
                    entries.push(TocEntry {
                        name,
                        kind: "symlink".into(),
                        link_name: "file-0000.dat".into(),
                        mode: 0o120777,
                        modtime: mtime.clone(),
                        ..TocEntry::default()
                    });
                    continue;
                }
                if f % 23 == 7 {
                    entries.push(TocEntry {
                        name,
                        kind: "hardlink".into(),
                        link_name: format!("{dir}file-0000.dat"),
                        ..TocEntry::default()
                    });
                    continue;
                }
                let size: i64 = if f % 50 == 3 {
                    9 << 20
                } else {
                    100 + (f as i64 * 997) % 60_000
                };
                let chunks = (size + (4 << 20) - 1) / (4 << 20);
                let digest = Digest::of(name.as_bytes()).to_string();
                entries.push(TocEntry {
                    name: name.clone(),
                    kind: "reg".into(),
                    size,
                    mode: 0o100644,
                    modtime: mtime.clone(),
                    offset,
                    digest: digest.clone(),
                    chunk_size: if chunks > 1 { 4 << 20 } else { 0 },
                    chunk_digest: digest.clone(),
                    ..TocEntry::default()
                });
                offset += size / 3 + 100;
                for c in 1..chunks {
                    entries.push(TocEntry {
                        name: name.clone(),
                        kind: "chunk".into(),
                        offset,
                        chunk_offset: c * (4 << 20),
                        chunk_size: if c + 1 < chunks { 4 << 20 } else { 0 },
                        chunk_digest: digest.clone(),
                        ..TocEntry::default()
                    });
                    offset += (4 << 20) / 3;
                }
            }
        }
    }
    let toc = Toc {
        version: 1,
        entries,
        ..Toc::default()
    };
    serde_json::to_vec_pretty(&toc).expect("encode")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let n = 100_000;
    let json = synthetic_toc(n);
    let data_end = i64::MAX as u64;
    let runs = 7;
    let mut ours = Vec::new();
    let mut baseline = Vec::new();
    let mut per_entry = 0.0;
    let mut entries = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        baseline.push(t.elapsed().as_secs_f64());
        drop(v);

        let before = LIVE.load(Ordering::Relaxed);
        let t = Instant::now();
        let parsed = toc::parse_json(&json).expect("parse");
        let idx = Index::build(&parsed, data_end).expect("index");
        drop(parsed);
        ours.push(t.elapsed().as_secs_f64());
        let held = LIVE.load(Ordering::Relaxed) - before;
        entries = idx.entry_count();
        per_entry = held as f64 / entries as f64;
        drop(idx);
    }
    let (o, b) = (median(ours), median(baseline));
    println!("toc_json_bytes {}", json.len());
    println!("entries {entries}");
    println!("parse_and_index_seconds_median {o:.3}");
    println!("serde_json_value_parse_seconds_median {b:.3}");
    println!("ratio_vs_generic_json_parse {:.2}", o / b);
    println!("resident_bytes_per_entry {per_entry:.1}");
}
