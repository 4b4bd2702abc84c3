//! Ranged-read throughput and latency of `lazysnap-registry` against a real
//! docker-registry on loopback, next to `curl` fetching the same ranges from the same
//! registry in the same run.
//!
//! Run: `cargo bench -p lazysnap-registry --bench ranged_reads`
//! (env `BENCH_MIB` = blob size in MiB, default 64; `BENCH_TOTAL_MIB` = bytes read
//! per case, default 256).

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lazysnap_registry::{Blob, Descriptor, Digest, Reference, RegistryClient, RegistryConfig};
use support::registry::{Auth, Pusher, Registry};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `count` offsets of `size`-byte reads, aligned to `size`, spread pseudo-randomly.
fn offsets(blob_len: usize, size: usize, count: usize, seed: u64) -> Vec<u64> {
    let slots = (blob_len / size) as u64;
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count)
        .map(|_| rng.u64(0..slots) * size as u64)
        .collect()
}

fn curl_config(url: &str, size: usize, offs: &[u64]) -> String {
    let mut s = String::new();
    for (i, o) in offs.iter().enumerate() {
        if i > 0 {
            s.push_str("next\n");
        }
        s.push_str(&format!(
            "url = \"{url}\"\nrange = \"{}-{}\"\noutput = \"/dev/null\"\nwrite-out = \"%{{http_code}} %{{size_download}} %{{time_total}}\\n\"\nsilent\n",
            o,
            *o + size as u64 - 1
        ));
    }
    s
}

/// Runs one curl process per slice of offsets, all at once; returns the elapsed time
/// and every transfer's time. Panics unless every answer was a 206 of the right size.
fn run_curl(
    dir: &std::path::Path,
    url: &str,
    size: usize,
    slices: &[Vec<u64>],
) -> (Duration, Vec<f64>) {
    let mut cfgs = Vec::new();
    for (i, offs) in slices.iter().enumerate() {
        let p = dir.join(format!("curl-{i}.cfg"));
        std::fs::write(&p, curl_config(url, size, offs)).expect("curl config");
        cfgs.push(p);
    }
    let start = Instant::now();
    let children: Vec<_> = cfgs
        .iter()
        .map(|c| {
            Command::new("curl")
                .arg("-K")
                .arg(c)
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn curl")
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("curl"))
        .collect();
    let elapsed = start.elapsed();
    let mut times = Vec::new();
    for o in outs {
        assert!(o.status.success(), "curl failed");
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f[0], "206", "curl got {line}");
            assert_eq!(f[1], size.to_string(), "curl size {line}");
            times.push(f[2].parse::<f64>().expect("time"));
        }
    }
    let n: usize = slices.iter().map(Vec::len).sum();
    assert_eq!(times.len(), n);
    (elapsed, times)
}

async fn run_lazysnap(blob: &Blob, size: usize, slices: &[Vec<u64>]) -> (Duration, Vec<f64>) {
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for offs in slices {
        let b = blob.clone();
        let offs = offs.clone();
        set.spawn(async move {
            let mut times = Vec::with_capacity(offs.len());
            for o in offs {
                let t = Instant::now();
                let got = b.read_at(o, size).await.expect("read");
                assert_eq!(got.len(), size);
                times.push(t.elapsed().as_secs_f64());
            }
            times
        });
    }
    let mut times = Vec::new();
    while let Some(t) = set.join_next().await {
        times.extend(t.expect("task"));
    }
    (start.elapsed(), times)
}

fn split(offs: &[u64], n: usize) -> Vec<Vec<u64>> {
    let mut out = vec![Vec::new(); n];
    for (i, o) in offs.iter().enumerate() {
        out[i % n].push(*o);
    }
    out
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx.min(v.len() - 1)]
}

fn main() {
    if !support::registry::available("ranged_reads bench") {
        return;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIP: curl not installed");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench());
}

async fn bench() {
    let blob_mib = env_usize("BENCH_MIB", 64);
    let total = env_usize("BENCH_TOTAL_MIB", 256) * MIB;
    let registry = Registry::start(Auth::None, None);
    let data = support::pattern(blob_mib * MIB, 42);
    let pusher = Pusher::new(registry.base(), None, None);
    let digest = pusher.blob("bench/blob", &data).await;
    let url = format!("{}/v2/bench/blob/blobs/{digest}", registry.base());
    let work = tempfile::tempdir().expect("tempdir");

    let cfg = RegistryConfig {
        certs_dir: work.path().join("certs.d"),
        docker_config: Some(work.path().join("none.json")),
        ..RegistryConfig::default()
    };
    let client = RegistryClient::new(cfg);
    let reference =
        Reference::parse(&format!("{}/bench/blob:latest", registry.host())).expect("ref");
    let desc = Descriptor {
        media_type: "application/octet-stream".into(),
        digest: Digest::parse(&digest).expect("digest"),
        size: data.len() as u64,
        annotations: Default::default(),
        urls: vec![],
        platform: None,
    };
    let blob = client.blob(&reference, &desc).expect("blob");

    // Correctness and warm-up (page cache, connections), untimed.
    for (i, o) in offsets(data.len(), 1 << 20, 64, 1).into_iter().enumerate() {
        let got = blob.read_at(o, MIB).await.expect("warm-up read");
        assert_eq!(&got[..], &data[o as usize..o as usize + MIB], "warm-up {i}");
    }
    run_curl(work.path(), &url, MIB, &[offsets(data.len(), MIB, 16, 2)]);

    let mut out = String::new();
    out.push_str(&format!(
        "blob {blob_mib} MiB, {} MiB read per case, docker-registry 2.8 on 127.0.0.1 (plain HTTP), {} CPUs\n\n",
        total / MIB,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    ));
    out.push_str("| read size | mode | lazysnap-registry MB/s | curl MB/s | ratio |\n|---|---|---|---|---|\n");
    for size in [64 * KIB, MIB, 4 * MIB] {
        let count = (total / size).max(8);
        let offs = offsets(data.len(), size, count, size as u64);
        for conc in [1usize, 8] {
            let slices = split(&offs, conc);
            // Best of 3 for each, interleaved, to damp noise from the shared machine.
            let mut best_l = f64::MAX;
            let mut best_c = f64::MAX;
            for _ in 0..3 {
                let (l, _) = run_lazysnap(&blob, size, &slices).await;
                let (c, _) = run_curl(work.path(), &url, size, &slices);
                best_l = best_l.min(l.as_secs_f64());
                best_c = best_c.min(c.as_secs_f64());
            }
            let bytes = (count * size) as f64 / 1e6;
            let (l_rate, c_rate) = (bytes / best_l, bytes / best_c);
            let mode = if conc == 1 {
                "sequential".to_string()
            } else {
                format!("{conc} concurrent")
            };
            out.push_str(&format!(
                "| {} | {mode} | {l_rate:.0} | {c_rate:.0} | {:.2}x |\n",
                if size >= MIB {
                    format!("{} MiB", size / MIB)
                } else {
                    format!("{} KiB", size / KIB)
                },
                l_rate / c_rate
            ));
            eprintln!("{size} x{conc}: lazysnap {l_rate:.0} MB/s, curl {c_rate:.0} MB/s");
        }
    }
    // Latency of single 4 KiB reads, sequential.
    let offs = offsets(data.len(), 4 * KIB, 2000, 99);
    let (_, mut lt) = run_lazysnap(&blob, 4 * KIB, std::slice::from_ref(&offs)).await;
    let (_, mut ct) = run_curl(work.path(), &url, 4 * KIB, &[offs]);
    out.push_str(&format!(
        "\n| 4 KiB read latency (2000 sequential reads) | p50 | p99 |\n|---|---|---|\n| lazysnap-registry | {:.0} µs | {:.0} µs |\n| curl (same connection, `time_total`) | {:.0} µs | {:.0} µs |\n",
        percentile(&mut lt, 0.5) * 1e6,
        percentile(&mut lt, 0.99) * 1e6,
        percentile(&mut ct, 0.5) * 1e6,
        percentile(&mut ct, 0.99) * 1e6,
    ));
    let st = blob.stats();
    out.push_str(&format!(
        "\nlazysnap-registry counters for the run: {} requests, {} MB, {} retries\n",
        st.requests,
        st.bytes / 1_000_000,
        st.retries
    ));
    let _ = std::io::stdout().write_all(out.as_bytes());
}
