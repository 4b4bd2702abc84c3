//! Prepare+Commit latency of local snapshots under 32 concurrent clients, through one
//! real containerd: `lazysnap` (proxy plugin) against containerd's own `overlayfs`.
//!
//! `cargo bench --bench snapshotter` (root; needs containerd). `BENCH_CLIENTS` and
//! `BENCH_OPS` (per client) change the load; `BENCH_ROUNDS` the interleaved rounds.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::tonic::Request;
use containerd_client::tonic::transport::Channel;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("containerd-namespace", "bench".parse().expect("namespace"));
    r
}

async fn prepare(c: &mut SnapshotsClient<Channel>, sn: &str, key: &str, parent: &str) {
    c.prepare(req(PrepareSnapshotRequest {
        snapshotter: sn.into(),
        key: key.into(),
        parent: parent.into(),
        // Keeps containerd's garbage collector away from the active snapshot.
        labels: [("containerd.io/gc.root".to_string(), "bench".to_string())].into(),
    }))
    .await
    .unwrap_or_else(|e| panic!("{sn} prepare {key}: {e}"));
}

async fn commit(c: &mut SnapshotsClient<Channel>, sn: &str, name: &str, key: &str) {
    c.commit(req(CommitSnapshotRequest {
        snapshotter: sn.into(),
        name: name.into(),
        key: key.into(),
        labels: [("containerd.io/gc.root".to_string(), "bench".to_string())].into(),
    }))
    .await
    .unwrap_or_else(|e| panic!("{sn} commit {key}: {e}"));
}

async fn remove(c: &mut SnapshotsClient<Channel>, sn: &str, key: &str) {
    let _ = c
        .remove(req(RemoveSnapshotRequest {
            snapshotter: sn.into(),
            key: key.into(),
        }))
        .await;
}

/// One round: every client does `ops` Prepare(parent = base)+Commit pairs. Returns
/// the pair latencies and the wall time of the concurrent phase.
async fn round(
    addr: &std::path::Path,
    sn: &str,
    round: usize,
    clients: usize,
    ops: usize,
) -> (Vec<Duration>, Duration) {
    let ch = containerd_client::connect(addr)
        .await
        .expect("connect containerd");
    let mut c = SnapshotsClient::new(ch.clone());
    let base = format!("base-{round}");
    prepare(&mut c, sn, "base-active", "").await;
    commit(&mut c, sn, &base, "base-active").await;
    let mut tasks = Vec::new();
    let start = Instant::now();
    for client in 0..clients {
        let mut c = SnapshotsClient::new(ch.clone());
        let (sn, base) = (sn.to_string(), base.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(ops);
            for i in 0..ops {
                let key = format!("a-{round}-{client}-{i}");
                let name = format!("c-{round}-{client}-{i}");
                let t = Instant::now();
                prepare(&mut c, &sn, &key, &base).await;
                commit(&mut c, &sn, &name, &key).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    let wall = start.elapsed();
    for client in 0..clients {
        for i in 0..ops {
            remove(&mut c, sn, &format!("c-{round}-{client}-{i}")).await;
        }
    }
    remove(&mut c, sn, &base).await;
    (all, wall)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !support::require(
        &["/usr/bin/containerd", "/usr/bin/ctr"],
        "bench snapshotter",
    ) {
        return;
    }
    let clients = env("BENCH_CLIENTS", 32);
    let ops = env("BENCH_OPS", 40);
    let rounds = env("BENCH_ROUNDS", 3);
    let tmp = tempfile::Builder::new()
        .prefix("lzbench")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let daemon = support::Daemon::start(&tmp.path().join("d"), "");
    let ctd = support::Containerd::start(&tmp.path().join("c"), &daemon.socket);
    ctd.wait_snapshotter("lazysnap");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let names = ["overlayfs", "lazysnap"];
    let mut lat: [Vec<Duration>; 2] = [vec![], vec![]];
    let mut wall = [Duration::ZERO; 2];
    let mut per_round = Vec::new();
    // Warm-up, then interleaved rounds (the order alternates so neither side always
    // runs second).
    for sn in names {
        rt.block_on(round(&ctd.address, sn, 0, clients, 2));
    }
    for r in 1..=rounds {
        let order = if r % 2 == 1 { [0, 1] } else { [1, 0] };
        let mut p50 = [0.0; 2];
        for i in order {
            let (mut l, w) = rt.block_on(round(&ctd.address, names[i], r, clients, ops));
            wall[i] += w;
            l.sort();
            p50[i] = pct(&l, 0.5);
            lat[i].extend(l);
        }
        per_round.push(p50);
    }
    println!(
        "{clients} clients x {ops} Prepare+Commit x {rounds} rounds per snapshotter, one containerd 1.6"
    );
    println!("| snapshotter | pairs | p50 ms | p90 ms | p99 ms | pairs/s |");
    println!("|---|---|---|---|---|---|");
    for i in 0..2 {
        lat[i].sort();
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.0} |",
            names[i],
            lat[i].len(),
            pct(&lat[i], 0.5),
            pct(&lat[i], 0.9),
            pct(&lat[i], 0.99),
            lat[i].len() as f64 / wall[i].as_secs_f64()
        );
    }
    let rounds_text: Vec<String> = per_round
        .iter()
        .map(|p| format!("{:.1}/{:.1}", p[0], p[1]))
        .collect();
    println!(
        "per-round p50 ms (overlayfs/lazysnap): {}",
        rounds_text.join(", ")
    );
    drop(ctd);
    drop(daemon);
}
