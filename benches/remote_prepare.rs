//! Remote Prepare latency: how long `Prepare` of an eStargz layer with the
//! remote-snapshot labels takes to answer AlreadyExists (footer + TOC fetched from a
//! local docker-registry, verified, FUSE-mounted, committed), against what a client
//! would otherwise do with the same layers in the same run:
//!
//! - containerd's own `overlayfs`: an empty Prepare+Commit through containerd (the
//!   snapshot bookkeeping alone, no content);
//! - the whole blob fetched with `curl` (what any non-lazy pull must at least do);
//! - `ctr image pull --snapshotter overlayfs` of the one-layer image (fetch, unpack,
//!   commit: what a lazy Prepare replaces).
//!
//! `cargo bench --bench remote_prepare` (root; needs containerd, docker-registry,
//! curl). `BENCH_LAYERS` (20), `BENCH_FILES` per layer (300), `BENCH_BIG_MIB` (8, one
//! incompressible file per layer so the blob is not "small") and `BENCH_ROUNDS` (3,
//! each with a fresh daemon and a cold cache) change the load; `BENCH_DAEMON_LOG=1`
//! prints the daemon's debug log and the registry's access log of each round to stderr;
//! `BENCH_DAEMON_CONFIG` is added to the daemon's config (not its `[layer]` table).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::registry::{Registry, sha256_hex};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::tonic::{Code, Request};
use lazysnap::format::Format;
use lazysnap::format::writer::WriteOptions;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One pushed layer (each in its own one-layer image).
struct Pushed {
    reference: String,
    repo: String,
    digest: String,
    size: usize,
    chain_id: String,
    annotations: HashMap<String, String>,
}

/// A layer of `files` text files of 0.5–32 KiB in 16 directories plus one
/// incompressible file of `big` bytes; `seed` makes every layer distinct.
fn layer_tar(seed: u64, files: usize, big: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, path, data).expect("tar entry");
    };
    add("usr/", tar::EntryType::Directory, b"");
    for d in 0..16 {
        add(&format!("usr/d{d}/"), tar::EntryType::Directory, b"");
    }
    for f in 0..files {
        let len = 512 + (next() % (32 << 10)) as usize;
        let data = common::text_bytes(seed * 100_000 + f as u64, len);
        add(
            &format!("usr/d{}/f{f}-{seed}.txt", f % 16),
            tar::EntryType::Regular,
            &data,
        );
    }
    add(
        "usr/big.bin",
        tar::EntryType::Regular,
        &common::prng_bytes(seed, big),
    );
    b.into_inner().expect("tar")
}

fn ns<T>(msg: T, namespace: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(n) = namespace {
        r.metadata_mut()
            .insert("containerd-namespace", n.parse().expect("namespace"));
    }
    r
}

/// One lazy Prepare per layer, directly on the lazysnap socket; each must answer
/// AlreadyExists. Returns the latencies.
async fn remote_round(socket: &std::path::Path, layers: &[Pushed]) -> Vec<Duration> {
    let ch = containerd_client::connect(socket)
        .await
        .expect("connect lazysnap");
    let mut c = SnapshotsClient::new(ch);
    let mut lat = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let mut labels = l.annotations.clone();
        labels.insert("containerd.io/snapshot.ref".into(), l.chain_id.clone());
        labels.insert(
            "containerd.io/snapshot/remote/stargz.reference".into(),
            l.reference.clone(),
        );
        labels.insert(
            "containerd.io/snapshot/remote/stargz.digest".into(),
            l.digest.clone(),
        );
        let t = Instant::now();
        let r = c
            .prepare(ns(
                PrepareSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    key: format!("bench/{i}"),
                    parent: String::new(),
                    labels,
                },
                None,
            ))
            .await;
        lat.push(t.elapsed());
        match r {
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => panic!("remote Prepare of {}: {s}", l.digest),
            Ok(_) => panic!(
                "remote Prepare of {} was an ordinary Prepare (not lazy)",
                l.digest
            ),
        }
    }
    // Every layer is a committed remote snapshot now.
    for l in layers {
        let info = c
            .stat(ns(
                StatSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    key: l.chain_id.clone(),
                },
                None,
            ))
            .await
            .unwrap_or_else(|e| panic!("stat {}: {e}", l.chain_id))
            .into_inner()
            .info
            .expect("info");
        assert!(
            info.labels.contains_key("containerd.io/snapshot/remote"),
            "{} is not a remote snapshot: {:?}",
            l.chain_id,
            info.labels
        );
    }
    lat
}

/// Empty Prepare+Commit of `n` snapshots through containerd with its overlayfs.
async fn overlay_round(addr: &std::path::Path, round: usize, n: usize) -> Vec<Duration> {
    let ch = containerd_client::connect(addr)
        .await
        .expect("connect containerd");
    let mut c = SnapshotsClient::new(ch);
    let gc = || -> HashMap<String, String> {
        [("containerd.io/gc.root".to_string(), "bench".to_string())].into()
    };
    let mut lat = Vec::new();
    for i in 0..n {
        let key = format!("bench/{round}/{i}");
        let name = format!("layer-{round}-{i}");
        let t = Instant::now();
        c.prepare(ns(
            PrepareSnapshotRequest {
                snapshotter: "overlayfs".into(),
                key: key.clone(),
                parent: String::new(),
                labels: gc(),
            },
            Some("bench"),
        ))
        .await
        .unwrap_or_else(|e| panic!("overlayfs prepare {key}: {e}"));
        c.commit(ns(
            CommitSnapshotRequest {
                snapshotter: "overlayfs".into(),
                name: name.clone(),
                key: key.clone(),
                labels: gc(),
            },
            Some("bench"),
        ))
        .await
        .unwrap_or_else(|e| panic!("overlayfs commit {key}: {e}"));
        lat.push(t.elapsed());
    }
    for i in 0..n {
        let _ = c
            .remove(ns(
                RemoveSnapshotRequest {
                    snapshotter: "overlayfs".into(),
                    key: format!("layer-{round}-{i}"),
                },
                Some("bench"),
            ))
            .await;
    }
    lat
}

/// `curl` of the whole blob: wall time of the process and curl's own `time_total`.
fn curl_blob(reg: &Registry, l: &Pushed) -> (Duration, Duration) {
    let t = Instant::now();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-f",
            "-o",
            "/dev/null",
            "-w",
            "%{time_total} %{size_download}",
        ])
        .arg(format!(
            "http://{}/v2/{}/blobs/{}",
            reg.host(),
            l.repo,
            l.digest
        ))
        .output()
        .expect("curl");
    let wall = t.elapsed();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let total: f64 = it.next().and_then(|v| v.parse().ok()).expect("time_total");
    let size: usize = it.next().and_then(|v| v.parse().ok()).expect("size");
    assert_eq!(size, l.size, "curl fetched the whole blob");
    (wall, Duration::from_secs_f64(total))
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn row(name: &str, mut lat: Vec<Duration>, what: &str) {
    lat.sort();
    let mean = lat.iter().map(|d| d.as_secs_f64()).sum::<f64>() / lat.len() as f64;
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {what} |",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        mean * 1000.0,
        lat[lat.len() - 1].as_secs_f64() * 1000.0,
    );
}

/// VmRSS of the `lazysnap serve` process started with `config`, in KiB.
fn daemon_rss_kib(config: &std::path::Path) -> u64 {
    let needle = config.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("serve") && cmd.contains(&needle) {
            if std::env::var_os("BENCH_DAEMON_LOG").is_some() {
                eprintln!("--- lazysnap smaps (mappings with Rss >= 1 MiB)");
                let smaps = std::fs::read_to_string(e.path().join("smaps")).unwrap_or_default();
                let mut head = "";
                for l in smaps.lines() {
                    if l.contains('-') && !l.contains(':') || l.split_whitespace().count() >= 5 {
                        head = l;
                    }
                    if let Some(v) = l.strip_prefix("Rss:")
                        && let Ok(k) = v.trim().trim_end_matches("kB").trim().parse::<u64>()
                        && k >= 1024
                    {
                        eprintln!("{k:>8} kB  {head}");
                    }
                }
                let threads = std::fs::read_dir(e.path().join("task")).map(|d| d.count());
                eprintln!("threads: {threads:?}");
            }
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            return status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !support::require(
        &[
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/bin/docker-registry",
            "/usr/bin/curl",
        ],
        "bench remote_prepare",
    ) {
        return;
    }
    let n = env("BENCH_LAYERS", 20);
    let files = env("BENCH_FILES", 300);
    let big = env("BENCH_BIG_MIB", 8) << 20;
    let rounds = env("BENCH_ROUNDS", 3);
    // e.g. "[fuse]\nthreads = 1" (must not name [layer])
    let extra_config = std::env::var("BENCH_DAEMON_CONFIG").unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix("lzremote")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let reg = Registry::start();

    let mut layers = Vec::new();
    for i in 0..n {
        let tar = layer_tar(i as u64 + 1, files, big);
        let layer = common::registry::Layer::convert(
            &tar,
            &WriteOptions {
                format: Format::Estargz,
                ..WriteOptions::default()
            },
        );
        let digest = format!("sha256:{}", sha256_hex(&layer.blob));
        let size = layer.blob.len();
        let repo = format!("bench/l{i}");
        let annotations: HashMap<String, String> = layer.annotations.clone().into_iter().collect();
        assert!(
            annotations.contains_key("containerd.io/snapshot/stargz/toc.digest"),
            "{annotations:?}"
        );
        // one layer: the chain id is the diff id
        let chain_id = layer.diff_id.clone();
        let reference = reg.push_image(&repo, "esgz", &[layer]);
        layers.push(Pushed {
            reference,
            repo,
            digest,
            size,
            chain_id,
            annotations,
        });
    }
    let sizes: Vec<usize> = layers.iter().map(|l| l.size).collect();
    let mean_size = sizes.iter().sum::<usize>() as f64 / n as f64;

    // containerd for the baselines; its lazysnap proxy plugin is not used.
    let ctd = support::Containerd::start(&tmp.path().join("c"), &tmp.path().join("none.sock"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut remote = Vec::new();
    let mut overlay = Vec::new();
    let mut curl_wall = Vec::new();
    let mut curl_total = Vec::new();
    let mut pull = Vec::new();
    let mut gets = 0usize;
    let mut served = 0u64;
    let mut requests = 0usize;
    let mut rss_kib = Vec::new();
    for r in 0..rounds {
        // lazysnap: a fresh daemon, root and cache per round (cold TOCs)
        let d = support::Daemon::start(
            &tmp.path().join(format!("d{r}")),
            &format!("{extra_config}\n[layer]\nbackground_fetch = false\n"),
        );
        let log_start = reg.log().len();
        remote.extend(rt.block_on(remote_round(&d.socket, &layers)));
        // the registry logs a request after its response: wait for the last lines
        let mut log = reg.log();
        support::wait_until(Duration::from_secs(5), || {
            log = reg.log();
            layers
                .iter()
                .all(|l| !common::registry::blob_gets_in(&log[log_start..], &l.digest).is_empty())
        });
        let log = &log[log_start..];
        requests += log.lines().filter(|l| l.contains(" /v2/")).count();
        if std::env::var_os("BENCH_DAEMON_LOG").is_some() {
            eprintln!("--- registry log, round {r}\n{log}");
        }
        for l in &layers {
            let st = common::registry::blob_gets_in(log, &l.digest);
            assert!(
                !st.is_empty() && st.iter().all(|&(s, _)| s == 206),
                "lazy Prepare of {} must only read ranges: {st:?}",
                l.digest
            );
            gets += st.len();
            served += st.iter().map(|&(_, b)| b).sum::<u64>();
        }
        let status = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
            .args(["status", "--json", "--config"])
            .arg(&d.config)
            .output()
            .expect("lazysnap status");
        let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
        let ls = v["layers"].as_array().cloned().unwrap_or_default();
        assert_eq!(ls.len(), n, "every layer mounted: {v}");
        if std::env::var_os("BENCH_DAEMON_LOG").is_some() {
            eprintln!("--- lazysnap log, round {r}\n{}", d.log());
        }
        rss_kib.push(daemon_rss_kib(&d.config));
        drop(d);

        overlay.extend(rt.block_on(overlay_round(&ctd.address, r, n)));

        for l in &layers {
            let (w, t) = curl_blob(&reg, l);
            curl_wall.push(w);
            curl_total.push(t);
        }

        let mut refs = Vec::new();
        for l in &layers {
            let t = Instant::now();
            ctd.ctr_ok(&[
                "-n",
                "bench",
                "image",
                "pull",
                "--plain-http",
                "--snapshotter",
                "overlayfs",
                &l.reference,
            ]);
            pull.push(t.elapsed());
            refs.push(l.reference.as_str());
        }
        let mut rm = vec!["-n", "bench", "image", "rm", "--sync"];
        rm.extend(refs);
        ctd.ctr_ok(&rm);
    }

    println!(
        "{n} eStargz layers x {rounds} rounds ({files} files + one {} MiB incompressible file each; blobs {:.1} MiB mean), docker-registry on loopback, one containerd 1.6",
        big >> 20,
        mean_size / (1 << 20) as f64
    );
    println!(
        "lazysnap: {:.1} registry requests, {:.1} of them range GETs of the blob, and {:.0} KiB served per remote Prepare (footer + TOC; access log), background fetch off",
        requests as f64 / remote.len() as f64,
        gets as f64 / remote.len() as f64,
        served as f64 / remote.len() as f64 / 1024.0
    );
    println!(
        "lazysnap serve VmRSS with {n} layers mounted, per round: {} MiB",
        rss_kib
            .iter()
            .map(|k| format!("{:.0}", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("| operation | samples | p50 ms | p99 ms | mean ms | max ms | what it covers |");
    println!("|---|---|---|---|---|---|---|");
    row(
        "lazysnap remote Prepare",
        remote,
        "direct on the lazysnap socket; answers AlreadyExists",
    );
    row(
        "overlayfs Prepare+Commit",
        overlay,
        "empty snapshot through containerd's snapshots service",
    );
    row(
        "curl whole blob (time_total)",
        curl_total,
        "download only, curl's own timer",
    );
    row(
        "curl whole blob (process)",
        curl_wall,
        "download incl. curl process start",
    );
    row(
        "ctr image pull, overlayfs",
        pull,
        "resolve + fetch + unpack + commit, incl. ctr process start",
    );
    drop(ctd);
    drop(reg);
}
