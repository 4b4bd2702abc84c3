//! Load on the real daemon (`lazysnap serve`) with a real `docker-registry`:
//!
//! - 64 concurrent remote Prepares over 16 eStargz layers share work: the registry's
//!   access log shows exactly one blob GET (the footer + TOC read) per layer, and
//!   exactly 16 FUSE mounts exist afterwards;
//! - 200 concurrent readers over 20 lazily mounted layers for a bounded time: every
//!   read returns the right bytes, none fails; the p99 read latency and the daemon's
//!   peak RSS are reported (and the RSS is bounded), and the disk chunk cache never
//!   grows past its size limit while the readers churn through 3x its size. The same
//!   readers over a plain local copy of the files give the baseline.
//!
//! `LOAD_SECONDS` (default 12) sets how long the lazy readers run.

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::registry::Registry;
use common::remote::{RemoteImage, push_random_images};
use containerd_client::tonic::Code;
use support::readers::{self, ReadStats, Target};
use support::{Daemon, require};

const LAYERS: usize = 20;
const PREPARED_FIRST: usize = 16;
const CONCURRENT_PREPARES: usize = 64;
const READERS: usize = 200;
const DISK_LIMIT: u64 = 8 << 20;
const MEMORY_LIMIT: u64 = 4 << 20;
/// What the disk cache may hold past its limit for a moment: chunks being written
/// are on disk before they are counted and older ones evicted (16 chunks of 64 KiB).
const DISK_SLACK: u64 = 1 << 20;
/// The daemon's resident memory must stay below this while it serves the load.
const RSS_LIMIT_KB: u64 = 512 << 10;

fn config() -> String {
    format!(
        "[layer]\nprefetch = false\nbackground_fetch = false\nsmall_layer_bytes = 0\n\
         [cache]\ndisk_limit = {DISK_LIMIT}\nmemory_limit = {MEMORY_LIMIT}\n"
    )
}

/// Bytes of all files under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn fuse_mounts_under(dir: &Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-").unwrap_or(0);
            f.get(4).is_some_and(|mp| Path::new(mp).starts_with(dir))
                && f.get(sep + 1).is_some_and(|t| t.starts_with("fuse"))
        })
        .count()
}

/// Every file of every mounted image as a read target.
fn targets(mounts: &[(String, PathBuf)], images: &[RemoteImage]) -> Vec<Target> {
    let mut out = Vec::new();
    for (digest, mp) in mounts {
        let img = images
            .iter()
            .find(|i| &i.digest == digest)
            .unwrap_or_else(|| panic!("unknown layer {digest} mounted"));
        for (path, content) in &img.files {
            out.push(Target {
                path: mp.join(path),
                content: Arc::new(content.clone()),
            });
        }
    }
    out
}

fn run_readers(targets: Vec<Target>, seconds: u64, seed: u64) -> ReadStats {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let timer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds));
        s.store(true, Ordering::Relaxed);
    });
    let st = readers::run(Arc::new(targets), READERS, seed, 128 << 10, stop);
    timer.join().expect("timer");
    st
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn concurrent_prepares_share_and_readers_are_served() {
    if !require(&["/usr/bin/docker-registry"], "load") {
        return;
    }
    let seed = support::seed("load", 7);
    let seconds = std::env::var("LOAD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12u64);
    let reg = Registry::start();
    let images = push_random_images(&reg, "load", LAYERS, 6, 512 << 10, 64 << 10);
    let work = tempfile::Builder::new()
        .prefix("lzload")
        .tempdir_in("/tmp")
        .unwrap();
    let daemon = Daemon::start(&work.path().join("d"), &config());
    let rt = tokio::runtime::Runtime::new().unwrap();

    // 64 concurrent Prepares, four per layer, of the first 16 layers
    let answers = rt.block_on(async {
        let c = support::snapshots::connect(&daemon.socket).await;
        let mut set = tokio::task::JoinSet::new();
        for k in 0..CONCURRENT_PREPARES {
            let mut c = c.clone();
            let labels = images[k % PREPARED_FIRST].labels();
            set.spawn(async move {
                let key = format!("default/{k}/extract-{k}");
                (
                    k,
                    support::snapshots::prepare(&mut c, &key, "", labels).await,
                )
            });
        }
        let mut out = Vec::new();
        while let Some(j) = set.join_next().await {
            out.push(j.expect("prepare task"));
        }
        out
    });
    assert_eq!(answers.len(), CONCURRENT_PREPARES);
    for (k, r) in &answers {
        match r {
            Err(s) if s.code() == Code::AlreadyExists => {}
            other => panic!(
                "Prepare {k}: want AlreadyExists (lazy), got {other:?}\n{}",
                daemon.log()
            ),
        }
    }
    // exactly one footer+TOC fetch per layer, whatever the concurrency
    let mut toc_fetches = 0;
    for (i, img) in images.iter().enumerate() {
        let gets = reg.blob_gets(&img.digest);
        let want = usize::from(i < PREPARED_FIRST);
        assert_eq!(gets.len(), want, "layer {i}: blob GETs {gets:?}");
        toc_fetches += gets.len();
    }
    assert_eq!(toc_fetches, PREPARED_FIRST);
    let mounts = daemon.remote_mounts();
    assert_eq!(mounts.len(), PREPARED_FIRST, "{mounts:?}");
    assert_eq!(fuse_mounts_under(&daemon.root), PREPARED_FIRST);

    // the rest, then 200 readers over all 20
    rt.block_on(async {
        let mut c = support::snapshots::connect(&daemon.socket).await;
        for (i, img) in images.iter().enumerate().skip(PREPARED_FIRST) {
            let key = format!("more/{i}");
            let r = support::snapshots::prepare(&mut c, &key, "", img.labels()).await;
            assert_eq!(support::snapshots::code(r), Code::AlreadyExists);
        }
    });
    let mounts = daemon.remote_mounts();
    assert_eq!(mounts.len(), LAYERS);
    let total_bytes: usize = images
        .iter()
        .flat_map(|i| i.files.iter().map(|f| f.1.len()))
        .sum();
    let pid = daemon.pid().expect("daemon pid");
    let cache_dir = daemon.root.join("cache");
    let (rss_max, cache_max) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (r, c, on, dir) = (
            rss_max.clone(),
            cache_max.clone(),
            sampling.clone(),
            cache_dir.clone(),
        );
        std::thread::spawn(move || {
            while on.load(Ordering::Relaxed) {
                r.fetch_max(
                    support::proc_kb(pid, "VmRSS").unwrap_or(0),
                    Ordering::Relaxed,
                );
                c.fetch_max(du(&dir), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let lazy = run_readers(targets(&mounts, &images), seconds, seed);
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let hwm = support::proc_kb(pid, "VmHWM").unwrap_or(0);
    let mut daemon = daemon;
    assert!(daemon.alive(), "the daemon died:\n{}", daemon.log());

    // the same readers over a plain local copy of the same files
    let local = work.path().join("local");
    let mut local_targets = Vec::new();
    for (i, img) in images.iter().enumerate() {
        for (path, content) in &img.files {
            let p = local.join(i.to_string()).join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
            local_targets.push(Target {
                path: p,
                content: Arc::new(content.clone()),
            });
        }
    }
    let base = run_readers(local_targets, seconds.min(4), seed);

    let cache_peak = cache_max.load(Ordering::Relaxed);
    let rss_peak = rss_max.load(Ordering::Relaxed).max(hwm);
    let line = serde_json::json!({
        "readers": READERS,
        "layers": LAYERS,
        "file_mib": total_bytes >> 20,
        "seconds": seconds,
        "reads": lazy.attempted,
        "correct": lazy.correct,
        "errors": lazy.eio + lazy.other,
        "wrong": lazy.wrong,
        "read_mib": lazy.bytes >> 20,
        "p50_ms": ms(lazy.latency(0.5)),
        "p99_ms": ms(lazy.latency(0.99)),
        "max_ms": ms(lazy.latency(1.0)),
        "local_reads": base.attempted,
        "local_p50_ms": ms(base.latency(0.5)),
        "local_p99_ms": ms(base.latency(0.99)),
        "daemon_rss_peak_mib": rss_peak >> 10,
        "cache_peak_mib": cache_peak as f64 / (1 << 20) as f64,
        "cache_limit_mib": DISK_LIMIT >> 20,
        "toc_fetches": toc_fetches,
    });
    eprintln!("LOAD-FIGURES {line}");

    assert!(lazy.attempted > READERS as u64, "readers made no progress");
    assert_eq!(lazy.wrong, 0, "wrong bytes: {:?}", lazy.wrong_messages);
    assert_eq!(
        lazy.eio + lazy.other,
        0,
        "read errors: {} EIO, others {:?}\n{}",
        lazy.eio,
        lazy.other_messages,
        daemon.log()
    );
    assert_eq!(base.wrong + base.eio + base.other, 0);
    assert!(
        cache_peak <= DISK_LIMIT + DISK_SLACK,
        "disk cache grew to {cache_peak} bytes, past its limit of {DISK_LIMIT}"
    );
    assert!(
        rss_peak < RSS_LIMIT_KB,
        "daemon RSS peaked at {rss_peak} kB (limit {RSS_LIMIT_KB} kB)"
    );
}
