//! Lazy pulling end to end with real containerd, runc and docker-registry: an eStargz
//! image pulled with `ctr-remote image rpull --snapshotter lazysnap` runs while the
//! registry serves only range requests of its layer blob; after `kill -9` of the
//! daemon the remote snapshots are mounted again and the image runs again.

mod common;
mod support;

use common::registry::{Layer, Registry, sha256_hex};
use lazysnap::format::Format;
use lazysnap::format::writer::WriteOptions;
use support::{Containerd, Daemon, require};

const MOTD: &str = "served lazily by lazysnap";

fn estargz(tar: &[u8], prioritized: &[&str]) -> Layer {
    Layer::convert(
        tar,
        &WriteOptions {
            format: Format::Estargz,
            prioritized: prioritized.iter().map(|s| s.to_string()).collect(),
            ..WriteOptions::default()
        },
    )
}

fn run(c: &Containerd, image: &str, id: &str) -> String {
    let o = c.run_lazy(image, id, &["/bin/cat", "/etc/motd"]);
    assert!(
        o.status.success(),
        "ctr run: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn rpull_runs_lazily_and_survives_kill_9() {
    if !require(
        &[
            "/usr/bin/containerd",
            "/usr/sbin/runc",
            "/usr/bin/docker-registry",
            "/usr/bin/ctr-remote",
        ],
        "lazy rpull",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let layer = estargz(
        &common::busybox_tar(MOTD, 3),
        &["/bin/busybox", "/etc/motd"],
    );
    let digest = format!("sha256:{}", sha256_hex(&layer.blob));
    let blob_size = layer.blob.len();
    let image = reg.push_image("lazy/busybox", "esgz", &[layer]);

    let cache = work.path().join("cache");
    let mut daemon = Daemon::start(
        &work.path().join("lazysnap"),
        &format!(
            "[cache]\ndir = \"{}\"\n[layer]\nbackground_fetch = false\n",
            cache.display()
        ),
    );
    let c = Containerd::start(&work.path().join("containerd"), &daemon.socket);
    c.wait_snapshotter("lazysnap");

    c.rpull(&image, &daemon);
    assert_eq!(run(&c, &image, "lazy-1").trim(), MOTD, "{}", daemon.log());

    // the layer is a remote snapshot, and the registry never sent the whole blob
    let snaps = c.ctr_ok(&["snapshot", "--snapshotter", "lazysnap", "ls"]);
    assert!(snaps.contains("Committed"), "{snaps}");
    let statuses: Vec<u16> = reg.blob_gets(&digest).iter().map(|(s, _)| *s).collect();
    assert!(!statuses.is_empty(), "no blob reads logged:\n{}", reg.log());
    assert!(
        statuses.iter().all(|&s| s == 206),
        "layer blob GETs must all be ranges, got {statuses:?}"
    );
    let v = daemon.status();
    let layers = v["layers"].as_array().cloned().unwrap_or_default();
    assert_eq!(layers.len(), 1, "{v}");
    let fetched = layers[0]["fetched_bytes"].as_u64().unwrap();
    eprintln!("fetched {fetched} of {blob_size} blob bytes");
    assert!(
        (fetched as usize) < blob_size / 2,
        "the unread 24 MiB file must not be fetched: {fetched} of {blob_size}"
    );

    // a crash: the remote snapshot is mounted again at start and the image runs
    daemon.kill9();
    support::detach_mounts_under(&daemon.root);
    daemon.start_again();
    c.wait_snapshotter("lazysnap");
    assert_eq!(run(&c, &image, "lazy-2").trim(), MOTD, "{}", daemon.log());

    // removing the image releases the snapshots and their mounts
    c.ctr_ok(&["image", "rm", &image]);
    let _ = c.ctr(&["snapshot", "--snapshotter", "lazysnap", "ls"]);
}
