//! Unlazy extraction throughput: the layers of one image extracted into plain
//! directories, in the same run and on the same disk, by
//!
//! - containerd 1.6's overlayfs unpack: `ctr image pull --snapshotter overlayfs` with
//!   every blob already in containerd's content store (so the pull is resolve +
//!   unpack + commit; containerd decompresses with `unpigz` when it is installed and
//!   checks each layer's diff id) — the baseline;
//! - `tar -xzf` of each gzip layer (GNU tar with gzip, xattrs, numeric owners);
//! - `apply_stream` of each gzip layer, one after the other, and all at once;
//! - `apply_layer` of the eStargz conversion of each layer from a loopback
//!   docker-registry: cold (footer, TOC and every chunk fetched, nothing cached)
//!   and warm (every chunk already in the chunk cache).
//!
//! `BENCH_LAYERS=a.tar:b.tar:... cargo bench --bench unlazy` (root; containerd, ctr,
//! docker-registry, tar), or `BENCH_SMALL_FILES=N` for one generated layer of N
//! small text files (100 a directory). `BENCH_ROUNDS` (3) rounds interleave the cases;
//! `BENCH_LABEL` names the image in the output; `BENCH_WORK` is where the trees go
//! (default /var/tmp); `BENCH_KEEP=1` leaves them there (bench/unlazy.sh works on a
//! scratch filesystem it throws away whole). Prints Markdown rows (medians) on stdout; bench/unlazy.sh
//! runs it and writes the BENCHMARKS.md section.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::registry::{Layer, Registry, sha256_hex};
use lazysnap::cache::ChunkCache;
use lazysnap::format::writer::WriteOptions;
use lazysnap::layer::{LayerConfig, RegistryBlob, RemoteLayer, image};
use lazysnap::snapshot::apply::{apply_layer, apply_stream};
use lazysnap_registry::{Reference, RegistryClient, RegistryConfig};
use support::Containerd;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sync() {
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn gzip_layer(tar: &[u8]) -> Layer {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(tar).expect("gzip");
    Layer {
        blob: e.finish().expect("gzip"),
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        annotations: Default::default(),
        diff_id: format!("sha256:{}", sha256_hex(tar)),
    }
}

/// Fresh empty directories for the layers of one case. Nothing is deleted before
/// the run ends: ext4 skips recently freed inodes when it allocates new ones, so a
/// deletion slows down whatever creates files in the next 30 s.
fn dirs(work: &Path, case: &str, round: usize, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let d = work.join(format!("{case}-{round}-{i}"));
            std::fs::create_dir_all(&d).expect("mkdir");
            d
        })
        .collect()
}

/// Opens the lazy layers of `reference` from the registry.
fn open_layers(
    client: &RegistryClient,
    rt: &tokio::runtime::Runtime,
    reference: &str,
    cache: &Arc<ChunkCache>,
) -> Vec<Arc<RemoteLayer>> {
    let r = Reference::parse(reference).expect("reference");
    let img = rt.block_on(client.resolve(&r)).expect("resolve");
    img.layers
        .iter()
        .map(|d| {
            let opts = image::open_options(&d.annotations)
                .expect("annotations")
                .expect("a lazy layer");
            let blob = client.blob(&img.reference, d).expect("blob");
            RemoteLayer::open(
                RegistryBlob::new(blob, rt.handle().clone()),
                &opts,
                cache.clone(),
                LayerConfig {
                    small_layer_bytes: 0,
                    ..LayerConfig::default()
                },
            )
            .expect("open layer")
        })
        .collect()
}

/// A layer of `n` text files of 200 B to 2 KiB, 100 a directory.
fn small_files(n: usize) -> Vec<u8> {
    let mut t = common::Corpus::new();
    for i in 0..n {
        if i % 100 == 0 {
            t.dir(&format!("d{:04}/", i / 100), 0o755, &common::ROOT);
        }
        let data = common::text_bytes(i as u64, 200 + (i * 7919) % 1800);
        t.file(
            &format!("d{:04}/f{i:06}.txt", i / 100),
            0o644,
            &common::ROOT,
            &data,
        );
    }
    t.finish()
}

fn median(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

fn main() {
    let tools = [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/docker-registry",
        "/usr/bin/tar",
    ];
    if !support::require(&tools, "bench unlazy") {
        return;
    }
    let small = env("BENCH_SMALL_FILES", 0);
    let list = std::env::var("BENCH_LAYERS").unwrap_or_default();
    if list.is_empty() && small == 0 {
        eprintln!(
            "skipped: set BENCH_LAYERS=a.tar:b.tar:... or BENCH_SMALL_FILES=N (bench/unlazy.sh does)"
        );
        return;
    }
    let label = std::env::var("BENCH_LABEL").unwrap_or_else(|_| "image".into());
    let rounds = env("BENCH_ROUNDS", 3).max(1);
    let base = std::env::var("BENCH_WORK").unwrap_or_else(|_| "/var/tmp".into());
    let tmp = tempfile::Builder::new()
        .prefix("lazysnap-unlazy-")
        .tempdir_in(&base)
        .expect("work dir");
    let work = tmp.path();

    let mut gz = Vec::new();
    let mut esgz = Vec::new();
    let mut tar_bytes = 0u64;
    let mut files = Vec::new();
    let tars: Vec<Vec<u8>> = if small > 0 {
        vec![small_files(small)]
    } else {
        list.split(':')
            .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}")))
            .collect()
    };
    for (i, tar) in tars.iter().enumerate() {
        tar_bytes += tar.len() as u64;
        let l = gzip_layer(tar);
        let f = work.join(format!("layer-{i}.tar.gz"));
        std::fs::write(&f, &l.blob).expect("write layer");
        files.push(f);
        gz.push(l);
        esgz.push(Layer::convert(tar, &WriteOptions::default()));
    }
    let n = gz.len();
    let gz_bytes: usize = gz.iter().map(|l| l.blob.len()).sum();
    let esgz_bytes: usize = esgz.iter().map(|l| l.blob.len()).sum();

    let reg = Registry::start();
    let gz_ref = reg.push_image("bench/gzip", "1", &gz);
    let esgz_ref = reg.push_image("bench/esgz", "1", &esgz);
    let ctd = Containerd::start(&work.join("containerd"), &work.join("none.sock"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = RegistryClient::new(RegistryConfig::default());
    // warm: one cache holding every chunk (apply_layer reads it, never fills it)
    let warm_cache = Arc::new(ChunkCache::in_memory(4 << 30));
    let warm = open_layers(&client, &rt, &esgz_ref, &warm_cache);
    for l in &warm {
        l.fetch_all(&AtomicBool::new(false), false)
            .expect("fill the cache");
    }

    let cases = [
        "ctr image pull (overlayfs unpack)",
        "ctr image pull, already unpacked",
        "tar -xzf, layer by layer",
        "apply_stream (gzip), layer by layer",
        "apply_stream (gzip), all layers at once",
        "apply_layer (eStargz), cold, from the registry",
        "apply_layer (eStargz), warm chunk cache",
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        // a namespace per round: the blobs fetched first, then a pull that only unpacks
        let ns = format!("bench{round}");
        ctd.ctr_ok(&["-n", &ns, "content", "fetch", "--plain-http", &gz_ref]);
        let pull = [
            "-n",
            &ns,
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "overlayfs",
            &gz_ref,
        ];
        sync();
        let t = Instant::now();
        ctd.ctr_ok(&pull);
        times[0].push(t.elapsed());
        let t = Instant::now();
        ctd.ctr_ok(&pull);
        times[1].push(t.elapsed());

        let d = dirs(work, "tar", round, n);
        sync();
        let t = Instant::now();
        for (f, d) in files.iter().zip(&d) {
            let st = Command::new("/usr/bin/tar")
                .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpzf"])
                .arg(f)
                .arg("-C")
                .arg(d)
                .status()
                .expect("tar");
            assert!(st.success(), "tar -xzf {}", f.display());
        }
        times[2].push(t.elapsed());

        let d = dirs(work, "stream", round, n);
        sync();
        let t = Instant::now();
        for (f, d) in files.iter().zip(&d) {
            let blob = std::fs::File::open(f).expect("open layer");
            apply_stream(std::io::BufReader::with_capacity(1 << 20, blob), d)
                .expect("apply_stream");
        }
        times[3].push(t.elapsed());

        let d = dirs(work, "parallel", round, n);
        sync();
        let t = Instant::now();
        std::thread::scope(|s| {
            for (f, d) in files.iter().zip(&d) {
                s.spawn(move || {
                    let blob = std::fs::File::open(f).expect("open layer");
                    apply_stream(std::io::BufReader::with_capacity(1 << 20, blob), d)
                        .expect("apply_stream");
                });
            }
        });
        times[4].push(t.elapsed());

        let d = dirs(work, "cold", round, n);
        sync();
        let t = Instant::now();
        let cold_cache = Arc::new(ChunkCache::in_memory(64 << 20));
        let cold = open_layers(&client, &rt, &esgz_ref, &cold_cache);
        for (l, d) in cold.iter().zip(&d) {
            apply_layer(l, d).expect("apply_layer cold");
        }
        times[5].push(t.elapsed());

        let d = dirs(work, "warm", round, n);
        sync();
        let t = Instant::now();
        for (l, d) in warm.iter().zip(&d) {
            apply_layer(l, d).expect("apply_layer warm");
        }
        times[6].push(t.elapsed());
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let med: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
    let mb = tar_bytes as f64 / 1e6;
    println!(
        "{label}: {n} layers, {mb:.1} MB uncompressed ({:.1} MB gzip, {:.1} MB eStargz); {rounds} rounds, medians; load average before/after: {} / {}",
        gz_bytes as f64 / 1e6,
        esgz_bytes as f64 / 1e6,
        load_before.split(' ').next().unwrap_or("?"),
        load_after.split(' ').next().unwrap_or("?"),
    );
    println!();
    println!("| case | median s | MB/s | speed vs containerd | all rounds, s |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for (i, case) in cases.iter().enumerate() {
        let all: Vec<String> = times[i]
            .iter()
            .map(|t| format!("{:.2}", t.as_secs_f64()))
            .collect();
        let (rate, ratio) = if i == 1 {
            ("—".to_string(), "—".to_string())
        } else {
            (
                format!("{:.0}", mb / med[i]),
                format!("{:.2}×", med[0] / med[i]),
            )
        };
        println!(
            "| {case} | {:.2} | {rate} | {ratio} | {} |",
            med[i],
            all.join(", ")
        );
    }
    drop(ctd);
    drop(reg);
    if std::env::var("BENCH_KEEP").as_deref() == Ok("1") {
        let _ = tmp.keep();
    } else {
        eprintln!("removing {}", work.display());
    }
}
