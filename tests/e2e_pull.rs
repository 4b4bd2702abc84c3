//! `lazysnap pull` end to end with real containerd, runc, docker-registry and FUSE:
//! an eStargz image is pulled lazily (its blob only ever read in ranges), a gzip
//! image is unpacked by lazysnap (diff ids verified; the content labels and the
//! extracted layers are the ones `ctr image pull` produces), a mixed image gets both;
//! each runs with `ctr run`. A wrong diff id fails the pull and leaves no image,
//! snapshot, lease or content; bad references, unreachable registries, refused
//! credentials and a containerd that is not running each give one line; removing
//! the images releases every snapshot directory and mount.

mod common;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::Corpus;
use common::lazy::{containerd_comparable, mountpoints, snapshot_exact};
use common::registry::{Layer, Registry, sha256_hex};
use lazysnap::format::Format;
use lazysnap::format::writer::WriteOptions;
use support::{Containerd, Daemon, require, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

fn estargz(tar: &[u8]) -> Layer {
    Layer::convert(
        tar,
        &WriteOptions {
            format: Format::Estargz,
            prioritized: vec!["/bin/busybox".into(), "/etc/motd".into()],
            ..WriteOptions::default()
        },
    )
}

/// A small busybox root filesystem; `name` makes its bytes (and chain id) unique.
fn rootfs(name: &str) -> Vec<u8> {
    let mut t = Corpus::new();
    for d in ["bin/", "etc/", "tmp/", "proc/", "sys/", "dev/"] {
        t.dir(d, 0o755, &common::ROOT);
    }
    let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox");
    t.file("bin/busybox", 0o755, &common::ROOT, &busybox);
    for a in ["sh", "cat", "echo", "ls", "test"] {
        t.symlink(&format!("bin/{a}"), "busybox");
    }
    t.file("etc/image", 0o644, &common::ROOT, name.as_bytes());
    t.file("etc/motd", 0o644, &common::ROOT, b"base motd\n");
    t.finish()
}

/// A layer with `etc/motd`, optionally whiting out `bin/ls`.
fn motd_layer(motd: &str, whiteout_ls: bool) -> Vec<u8> {
    let mut t = Corpus::new();
    t.dir("etc/", 0o755, &common::ROOT);
    t.file(
        "etc/motd",
        0o644,
        &common::ROOT,
        format!("{motd}\n").as_bytes(),
    );
    if whiteout_ls {
        t.dir("bin/", 0o755, &common::ROOT);
        t.file("bin/.wh.ls", 0o644, &common::ROOT, b"");
    }
    t.finish()
}

fn digest_of(l: &Layer) -> String {
    format!("sha256:{}", sha256_hex(&l.blob))
}

struct Env {
    reg: Registry,
    daemon: Daemon,
    c: Containerd,
}

impl Env {
    /// Runs `lazysnap pull --json ARGS` against our containerd (bounded).
    fn pull(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("pull")
            .arg("--address")
            .arg(&self.c.address)
            .arg("--config")
            .arg(&self.daemon.config)
            .arg("--json")
            .args(args);
        support::run_bounded(cmd, Duration::from_secs(120))
    }

    /// A pull that must succeed; its JSON summary.
    fn pull_ok(&self, args: &[&str]) -> serde_json::Value {
        let out = self.pull(args);
        assert!(
            out.status.success(),
            "pull {args:?}: {}\n--- daemon:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.daemon.log()
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("summary: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    fn run(&self, image: &str, id: &str, script: &str) -> String {
        self.c.run_lazy_ok(image, id, &["/bin/sh", "-c", script])
    }

    /// Every layer-blob GET the registry served for `digest` was a range.
    fn only_ranges(&self, digest: &str) {
        let statuses: Vec<u16> = self.reg.blob_gets(digest).iter().map(|g| g.0).collect();
        assert!(!statuses.is_empty(), "{digest}: no reads logged");
        assert!(
            statuses.iter().all(|&s| s == 206),
            "{digest}: the blob must only be read in ranges, got {statuses:?}"
        );
    }
}

/// `ctr content ls` of a namespace: digest → labels.
fn content_labels(c: &Containerd, ns: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let out = c.ctr_ok(&["-n", ns, "content", "ls"]);
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let digest = cols.first()?.to_string();
            let last = cols.last()?;
            let mut labels: BTreeMap<String, String> = BTreeMap::new();
            let mut current: Option<String> = None;
            // `k=v,k=v`, where a value may itself hold commas (source repositories)
            for part in last.split(',').filter(|_| last.contains('=')) {
                match (part.split_once('='), &current) {
                    (Some((k, v)), _) if k.starts_with("containerd.io/") => {
                        labels.insert(k.to_string(), v.to_string());
                        current = Some(k.to_string());
                    }
                    (_, Some(k)) => {
                        let v = labels.entry(k.clone()).or_default();
                        v.push(',');
                        v.push_str(part);
                    }
                    _ => panic!("unparsed labels: {last}"),
                }
            }
            Some((digest, labels))
        })
        .collect()
}

/// The directory holding layer `chain` of namespace `ns` (through a view: a bind
/// of the layer itself, or an overlay whose first lower dir it is).
fn layer_dir(c: &Containerd, ns: &str, chain: &str) -> PathBuf {
    let key = format!("probe-{}", &chain[7..19]);
    let out = c.ctr_ok(&[
        "-n",
        ns,
        "snapshot",
        "--snapshotter",
        "lazysnap",
        "view",
        "--mounts",
        &key,
        chain,
    ]);
    // containerd may have collected the unreferenced view already
    let _ = c.ctr(&[
        "-n",
        ns,
        "snapshot",
        "--snapshotter",
        "lazysnap",
        "rm",
        &key,
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("mounts JSON");
    let m = &v[0];
    if m["Type"] == "bind" {
        return PathBuf::from(m["Source"].as_str().expect("bind source"));
    }
    let lower = m["Options"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.as_str()?.strip_prefix("lowerdir="))
        .next()
        .expect("lowerdir");
    PathBuf::from(lower.split(':').next().expect("first lower dir"))
}

/// Pushes an OCI index `repo:v1` whose entry for this platform is an image of
/// `layers`, after an entry for linux/s390x; returns its reference and the s390x
/// manifest's digest.
fn push_index(reg: &Registry, repo: &str, layers: &[Layer]) -> (String, String) {
    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    let mut entries = Vec::new();
    for (arch, layers) in [
        ("s390x", &[Layer::gzip(&rootfs("other platform"))][..]),
        (common::registry::go_arch(), layers),
    ] {
        let m = reg.image_manifest(repo, layers);
        let digest = format!("sha256:{}", sha256_hex(&m));
        reg.push_manifest(repo, &digest, MANIFEST, &m);
        entries.push(serde_json::json!({
            "mediaType": MANIFEST, "digest": digest, "size": m.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    })
    .to_string();
    reg.push_manifest(
        repo,
        "v1",
        "application/vnd.oci.image.index.v1+json",
        index.as_bytes(),
    );
    let other = entries[0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (format!("{}/{repo}:v1", reg.host()), other)
}

/// Asserts a failed command printed exactly one line; returns it.
fn one_line(out: &Output, what: &str) -> String {
    assert!(!out.status.success(), "{what}: must fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: one line expected, got:\n{err}");
    eprintln!("{what}: {}", lines[0]);
    assert!(lines[0].starts_with("lazysnap: "), "{what}: {err}");
    lines[0].to_string()
}

fn layer_states(summary: &serde_json::Value) -> Vec<String> {
    summary["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["state"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn chains(summary: &serde_json::Value) -> Vec<String> {
    summary["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["chain_id"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn pull_lazy_gzip_and_mixed_images_into_containerd() {
    if !require(
        &[
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/sbin/runc",
            "/usr/bin/docker-registry",
            "/usr/bin/script",
        ],
        "lazysnap pull",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let esgz = estargz(&common::busybox_tar("lazy motd", 21));
    let esgz_digest = digest_of(&esgz);
    let esgz_image = reg.push_image("pull/esgz", "v1", &[esgz]);
    let (gz_base, gz_top) = (
        Layer::gzip(&rootfs("gzip")),
        Layer::gzip(&motd_layer("gzip motd", true)),
    );
    let gz_digests = [digest_of(&gz_base), digest_of(&gz_top)];
    let gz_sizes = [gz_base.blob.len() as u64, gz_top.blob.len() as u64];
    let gz_image = reg.push_image("pull/gzip", "v1", &[gz_base, gz_top]);
    // the gzip image again, behind an index whose first entry is another platform's
    let (index_image, s390x_manifest) = push_index(
        &reg,
        "pull/index",
        &[
            Layer::gzip(&rootfs("gzip")),
            Layer::gzip(&motd_layer("gzip motd", true)),
        ],
    );
    let mid = estargz(&motd_layer("mixed motd", false));
    let mid_digest = digest_of(&mid);
    let mixed_image = reg.push_image(
        "pull/mixed",
        "v1",
        &[
            Layer::gzip(&rootfs("mixed")),
            mid,
            Layer::gzip(&motd_layer("mixed top", true)),
        ],
    );
    let mut bad = Layer::gzip(&rootfs("bad"));
    let bad_digest = digest_of(&bad);
    bad.diff_id = format!("sha256:{}", sha256_hex(b"not this layer"));
    let bad_image = reg.push_image("pull/bad", "v1", &[bad]);
    let again = reg.push_image(
        "pull/unlazy",
        "v1",
        &[estargz(&common::busybox_tar("unlazied motd", 22))],
    );

    let daemon = Daemon::start(
        &work.path().join("lazysnap"),
        "[layer]\nbackground_fetch = false\n",
    );
    let c = Containerd::start(&work.path().join("containerd"), &daemon.socket);
    c.wait_snapshotter("lazysnap");
    let env = Env { reg, daemon, c };

    // eStargz: lazy, and its blob is never downloaded whole
    let s = env.pull_ok(&[&esgz_image]);
    assert_eq!(layer_states(&s), ["lazy"], "{s}");
    assert_eq!(
        (s["lazy"].as_u64(), s["unpacked"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(s["layers"][0]["downloaded_bytes"], 0, "{s}");
    assert_eq!(
        env.run(&esgz_image, "esgz", "cat /etc/motd").trim(),
        "lazy motd"
    );
    env.only_ranges(&esgz_digest);
    // a second pull finds everything in place
    let s = env.pull_ok(&[&esgz_image]);
    assert_eq!(layer_states(&s), ["present"], "{s}");

    // gzip: both layers unpacked by lazysnap, whiteout honoured
    let s = env.pull_ok(&[&gz_image]);
    assert_eq!(layer_states(&s), ["unpacked", "unpacked"], "{s}");
    for (i, size) in gz_sizes.iter().enumerate() {
        let got = s["layers"][i]["downloaded_bytes"].as_u64().unwrap_or(0);
        assert!(got >= *size, "layer {i}: {got} of {size} bytes downloaded");
    }
    assert!(
        s["downloaded_bytes"].as_u64().unwrap_or(0) > gz_sizes.iter().sum::<u64>(),
        "{s}"
    );
    assert_eq!(
        env.run(
            &gz_image,
            "gz",
            "cat /etc/motd; test -e /bin/ls || echo ls gone"
        ),
        "gzip motd\nls gone\n"
    );
    // behind an index: the layers are there already; the image record names the index
    let s = env.pull_ok(&[&index_image]);
    assert_eq!(layer_states(&s), ["present", "present"], "{s}");
    let listed = env.c.ctr_ok(&["image", "ls"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&index_image) && l.contains("image.index.v1+json")),
        "{listed}"
    );
    assert_eq!(
        env.run(&index_image, "index", "cat /etc/motd"),
        "gzip motd\n"
    );
    // another platform's manifest of the same index (released through the index too)
    let other = env.pull_ok(&["--platform", "linux/s390x", &index_image]);
    assert_eq!(other["manifest"].as_str(), Some(s390x_manifest.as_str()));
    assert_eq!(layer_states(&other), ["unpacked"], "{other}");
    // the same images pulled by containerd itself: same labels, same layer trees
    for image in [&gz_image, &index_image] {
        env.c.ctr_ok(&[
            "-n",
            "ref",
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "lazysnap",
            image,
        ]);
    }
    let (ours, theirs) = (
        content_labels(&env.c, "default"),
        content_labels(&env.c, "ref"),
    );
    assert!(theirs.len() >= 5, "{theirs:?}");
    for (digest, want) in &theirs {
        assert_eq!(ours.get(digest), Some(want), "labels of {digest}");
    }
    for d in &gz_digests {
        assert!(ours[d].contains_key("containerd.io/uncompressed"), "{d}");
    }
    // the layers of both images (the index image's are the gzip image's)
    for chain in chains(&s) {
        let (a, b) = (
            layer_dir(&env.c, "default", &chain),
            layer_dir(&env.c, "ref", &chain),
        );
        assert_ne!(a, b);
        assert_eq!(
            containerd_comparable(snapshot_exact(&a)),
            containerd_comparable(snapshot_exact(&b)),
            "layer {chain}: lazysnap's extraction differs from containerd's"
        );
    }

    // mixed: gzip base, lazy eStargz middle, gzip top over a FUSE lower dir; pulled
    // on a terminal, with progress bars and the summary in words
    let mut cmd = Command::new("/usr/bin/script");
    cmd.args(["-q", "-e", "-c"])
        .arg(format!(
            "{BIN} pull --address {} --config {} {mixed_image}",
            env.c.address.display(),
            env.daemon.config.display()
        ))
        .arg("/dev/null");
    let out = support::run_bounded(cmd, Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", env.daemon.log());
    assert!(text.contains("3 layers: 1 lazy, 2 unpacked"), "{text}");
    assert!(
        text.contains(&mid_digest[7..19]),
        "no progress bar drawn: {text}"
    );
    assert_eq!(
        env.run(
            &mixed_image,
            "mixed",
            "cat /etc/image /etc/motd; test -e /bin/ls || echo ls gone"
        ),
        "mixedmixed top\nls gone\n"
    );
    env.only_ranges(&mid_digest);

    // --unlazy: the lazily mounted layer becomes a plain directory
    let s = env.pull_ok(&["--unlazy", &again]);
    assert_eq!(layer_states(&s), ["unlazied"], "{s}");
    assert_eq!(
        env.run(&again, "again", "cat /etc/motd").trim(),
        "unlazied motd"
    );

    // a wrong diff id: one line, and nothing of the image is left
    let out = env.pull(&[&bad_image]);
    let line = one_line(&out, "wrong diff id");
    assert!(
        line.contains("diff id mismatch") && line.contains(&bad_digest),
        "{line}"
    );
    let images = env.c.ctr_ok(&["image", "ls", "-q"]);
    assert!(!images.contains("pull/bad"), "{images}");
    let snaps = env
        .c
        .ctr_ok(&["snapshot", "--snapshotter", "lazysnap", "ls"]);
    assert!(!snaps.contains("Active"), "{snaps}");
    let leases = env.c.ctr_ok(&["leases", "ls"]);
    assert_eq!(leases.lines().count(), 1, "lease left: {leases}");
    assert!(
        !content_labels(&env.c, "default").contains_key(&bad_digest),
        "the failed layer's content is left"
    );

    // errors: one line each, naming what failed
    let line = one_line(&env.pull(&["Not A/Reference!"]), "bad reference");
    assert!(line.contains("invalid image reference"), "{line}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let unreachable = format!("127.0.0.1:{closed}/pull/none:v1");
    let line = one_line(&env.pull(&[&unreachable]), "unreachable registry");
    assert!(line.contains(&format!("127.0.0.1:{closed}")), "{line}");
    let mut cmd = Command::new(BIN);
    cmd.args([
        "pull",
        "--address",
        "/nonexistent/containerd.sock",
        &esgz_image,
    ]);
    let line = one_line(
        &support::run_bounded(cmd, Duration::from_secs(60)),
        "containerd not running",
    );
    assert!(
        line.contains("/nonexistent/containerd.sock") && line.contains("not reachable"),
        "{line}"
    );
    let locked = Registry::start_htpasswd("alice", "right");
    let docker = work.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        serde_json::json!({"auths": {locked.host(): {"auth": "YWxpY2U6d3Jvbmc="}}}).to_string(),
    )
    .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.env("DOCKER_CONFIG", &docker).args([
        "pull",
        "--address",
        &env.c.address.display().to_string(),
        &format!("{}/pull/locked:v1", locked.host()),
    ]);
    let line = one_line(
        &support::run_bounded(cmd, Duration::from_secs(60)),
        "wrong credentials",
    );
    assert!(
        line.contains(&locked.host()) && line.contains("credentials"),
        "{line}"
    );

    // removing the images releases every snapshot and mount
    for (ns, image) in [
        ("default", &esgz_image),
        ("default", &gz_image),
        ("default", &mixed_image),
        ("default", &again),
        ("default", &index_image),
        ("ref", &gz_image),
        ("ref", &index_image),
    ] {
        env.c.ctr_ok(&["-n", ns, "image", "rm", "--sync", image]);
    }
    let snapshots = env.daemon.root.join("snapshots");
    let clean = wait_until(Duration::from_secs(30), || {
        let _ = env.c.ctr(&["snapshot", "--snapshotter", "lazysnap", "ls"]);
        entries(&snapshots) == 0
            && !mountpoints()
                .iter()
                .any(|m| m.starts_with(&env.daemon.root))
    });
    assert!(
        clean,
        "left under {}: {} snapshot dirs, mounts {:?}",
        env.daemon.root.display(),
        entries(&snapshots),
        mountpoints()
            .iter()
            .filter(|m| m.starts_with(&env.daemon.root))
            .collect::<Vec<_>>()
    );
}
