//! Crash consistency: `kill -9` of `lazysnap serve` at seeded random points while it
//! works — Prepares (plain and remote), Commits, Removes over the gRPC API, lazy
//! reads filling the disk chunk cache, `lazysnap pull` into a real containerd, and
//! unlazy — then a restart and a check of the invariants:
//!
//! - the metadata (read from a copy of `metadata.db`) and `List` agree;
//! - every snapshot in the metadata has its directory (and `work/` if active), and
//!   every remote one is a live FUSE mount listed by `status` once it is used (the
//!   fd holder keeps the layers' connections across the kill, and the new daemon
//!   takes them over; a layer it did not keep is mounted again at first use);
//! - after `Cleanup`, no directory under `snapshots/` and no mount without a snapshot;
//! - files read through the remote mounts equal their source, also when a cached
//!   chunk file was damaged before the restart (a cached chunk that fails its
//!   digest is never served).
//!
//! and per case: after a pull, a second pull of the image completes and a container
//! runs from it; after an unlazy, every layer is remote (mounted) or a plain
//! directory holding exactly the layer's files, with no staging left.
//!
//! Each kind of work is a [`Case`], one entry in [`CASES`] (the pull case only where
//! containerd and runc are installed). `CRASH_ITERATIONS` (default 100, over all
//! cases) and `LAZYSNAP_SEED` set the run.

mod common;
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::process::{Command, Stdio};

use common::registry::{Layer, Registry};
use common::remote::{RemoteImage, push_random_images};
use containerd_client::services::v1::snapshots::{Info, Kind};
use lazysnap::format::toc::NO_PREFETCH_LANDMARK;
use lazysnap::snapshot::labels::{STARGZ_DIGEST, UNLAZY};
use lazysnap::snapshot::store::{Query, Store};
use support::readers::{self, Target};
use support::snapshots::{self as api, Client, REF, REMOTE};
use support::{Containerd, Daemon, Rng, require};

const CONFIG: &str = "[layer]\nprefetch = false\nbackground_fetch = false\nsmall_layer_bytes = 0\n\
[cache]\ndisk_limit = 2097152\nmemory_limit = 1048576\n\
[registry]\nrequest_timeout_ms = 5000\nmax_retries = 2\n";

/// Bounds on what accumulates over the iterations.
const MAX_SNAPSHOTS: usize = 30;
const MAX_REMOTE: usize = 6;

/// What every case sees.
struct World<'a> {
    socket: PathBuf,
    root: PathBuf,
    images: &'a [RemoteImage],
    iteration: usize,
    /// The running daemon's process id.
    daemon_pid: Option<u32>,
    /// What the pull case pulls (None without containerd).
    pull: Option<&'a PullEnv>,
}

impl World<'_> {
    /// Runs gRPC calls on a runtime of the calling thread.
    fn grpc<T>(&self, f: impl AsyncFnOnce(&mut Client) -> T) -> T {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut c = api::connect(&self.socket).await;
            f(&mut c).await
        })
    }

    fn list(&self) -> Vec<Info> {
        self.grpc(async |c| api::list(c, &[]).await.expect("List"))
    }

    /// The image a remote snapshot's labels name.
    fn image_of(&self, info: &Info) -> Option<&RemoteImage> {
        let digest = info
            .labels
            .get("containerd.io/snapshot/remote/stargz.digest")?;
        self.images.iter().find(|i| &i.digest == digest)
    }
}

/// Work that runs on its own thread until it is done or the daemon is killed.
type Work = Box<dyn FnOnce() + Send>;

/// One kind of work to crash in: `setup` runs first (never interrupted) and returns
/// the work; the kill comes at a random point within the time the work took when
/// it last ran to the end (`window_ms` until it has).
struct Case {
    name: &'static str,
    window_ms: u64,
    setup: fn(&World, &mut Rng) -> Work,
    /// Checks of this case's own after the invariants (none: `None`).
    verify: Option<fn(&World, &mut Rng) -> Vec<String>>,
    /// Whether it needs containerd (and runc): skipped where they are missing.
    containerd: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "prepare",
        window_ms: 10,
        setup: prepare_case,
        verify: None,
        containerd: false,
    },
    Case {
        name: "remote-prepare",
        window_ms: 30,
        setup: remote_prepare_case,
        verify: None,
        containerd: false,
    },
    Case {
        name: "commit",
        window_ms: 10,
        setup: commit_case,
        verify: None,
        containerd: false,
    },
    Case {
        name: "remove",
        window_ms: 10,
        setup: remove_case,
        verify: None,
        containerd: false,
    },
    Case {
        name: "cache-write",
        window_ms: 400,
        setup: cache_write_case,
        verify: None,
        containerd: false,
    },
    Case {
        name: "pull",
        window_ms: 1500,
        setup: pull_case,
        verify: Some(pull_verify),
        containerd: true,
    },
    Case {
        name: "unlazy",
        window_ms: 400,
        setup: unlazy_case,
        verify: Some(unlazy_verify),
        containerd: false,
    },
];

fn is(info: &Info, kind: Kind) -> bool {
    info.kind == kind as i32
}

/// Runs `n` calls of `op` concurrently on one connection.
fn concurrently<F, Fut>(socket: PathBuf, n: usize, op: F) -> Work
where
    F: Fn(Client, usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    Box::new(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            // the daemon may already be gone: every error is expected here
            let Ok(ch) = containerd_client::connect(&socket).await else {
                return;
            };
            let c =
                containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient::new(
                    ch,
                );
            let mut set = tokio::task::JoinSet::new();
            for k in 0..n {
                set.spawn(op(c.clone(), k));
            }
            while set.join_next().await.is_some() {}
        })
    })
}

fn prepare_case(w: &World, rng: &mut Rng) -> Work {
    let parents: Vec<String> = w
        .list()
        .into_iter()
        .filter(|i| is(i, Kind::Committed))
        .map(|i| i.name)
        .collect();
    let jobs: Vec<(String, String)> = (0..6)
        .map(|k| {
            let parent = if parents.is_empty() || rng.chance(0.3) {
                String::new()
            } else {
                parents[rng.below(parents.len() as u64) as usize].clone()
            };
            (format!("crash/{}/p{k}", w.iteration), parent)
        })
        .collect();
    let jobs = Arc::new(jobs);
    concurrently(w.socket.clone(), jobs.len(), move |mut c, k| {
        let jobs = jobs.clone();
        async move {
            let (key, parent) = &jobs[k];
            let _ = api::prepare(&mut c, key, parent, HashMap::new()).await;
        }
    })
}

fn remote_prepare_case(w: &World, rng: &mut Rng) -> Work {
    // two targets, each asked for twice at once
    let jobs: Vec<(String, HashMap<String, String>)> = (0..2)
        .flat_map(|t| {
            let img = &w.images[rng.below(w.images.len() as u64) as usize];
            let mut labels = img.labels();
            labels.insert(
                REF.to_string(),
                format!("{}-{}-{t}", img.chain_id, w.iteration),
            );
            (0..2).map(move |k| (format!("crash/{}/r{t}-{k}", w.iteration), labels.clone()))
        })
        .collect();
    let jobs = Arc::new(jobs);
    concurrently(w.socket.clone(), jobs.len(), move |mut c, k| {
        let jobs = jobs.clone();
        async move {
            let (key, labels) = &jobs[k];
            let _ = api::prepare(&mut c, key, "", labels.clone()).await;
        }
    })
}

/// The upper directory of an active snapshot's mounts.
fn upper_dir(m: &[containerd_client::types::Mount]) -> Option<PathBuf> {
    let m = m.first()?;
    match m.r#type.as_str() {
        "bind" => Some(PathBuf::from(&m.source)),
        _ => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from),
    }
}

fn commit_case(w: &World, rng: &mut Rng) -> Work {
    let mut actives: Vec<String> = w
        .list()
        .into_iter()
        .filter(|i| is(i, Kind::Active) && !i.labels.contains_key(REF))
        .map(|i| i.name)
        .collect();
    if actives.len() < 3 {
        for k in 0..3 {
            let key = format!("crash/{}/a{k}", w.iteration);
            w.grpc(async |c| api::prepare(c, &key, "", HashMap::new()).await)
                .expect("prepare before commit");
            actives.push(key);
        }
    }
    // a container's writes: files in the upper directory, measured at commit
    for key in &actives {
        let m = w.grpc(async |c| api::mounts(c, key).await);
        if let Some(up) = m.ok().as_deref().and_then(upper_dir) {
            let data = common::prng_bytes(rng.next(), 1000 + rng.below(50_000) as usize);
            let _ = std::fs::write(up.join(format!("written-{}", w.iteration)), data);
        }
    }
    let it = w.iteration;
    let actives = Arc::new(actives);
    concurrently(w.socket.clone(), actives.len(), move |mut c, k| {
        let actives = actives.clone();
        async move {
            let _ = api::commit(&mut c, &format!("crash/{it}/c{k}"), &actives[k]).await;
        }
    })
}

/// Snapshots that have no children, in a seeded order.
fn leaves(infos: &[Info], rng: &mut Rng) -> Vec<String> {
    let parents: BTreeSet<&str> = infos.iter().map(|i| i.parent.as_str()).collect();
    let mut out: Vec<String> = infos
        .iter()
        .filter(|i| !parents.contains(i.name.as_str()))
        .map(|i| i.name.clone())
        .collect();
    for i in (1..out.len()).rev() {
        out.swap(i, rng.below(i as u64 + 1) as usize);
    }
    out
}

fn remove_case(w: &World, rng: &mut Rng) -> Work {
    let victims = Arc::new(
        leaves(&w.list(), rng)
            .into_iter()
            .take(4)
            .collect::<Vec<_>>(),
    );
    concurrently(w.socket.clone(), victims.len(), move |mut c, k| {
        let victims = victims.clone();
        async move {
            let _ = api::remove(&mut c, &victims[k]).await;
        }
    })
}

/// Every file of every remote snapshot, as read targets.
fn remote_targets(w: &World) -> Vec<Target> {
    let mut out = Vec::new();
    let mounts = remote_dirs(w);
    for info in w.list().iter().filter(|i| i.labels.contains_key(REMOTE)) {
        let (Some(img), Some(dir)) = (w.image_of(info), mounts.get(&info.name)) else {
            continue;
        };
        for (path, content) in &img.files {
            out.push(Target {
                path: dir.join(path),
                content: Arc::new(content.clone()),
            });
        }
    }
    out
}

fn cache_write_case(w: &World, rng: &mut Rng) -> Work {
    let mut targets = remote_targets(w);
    if targets.is_empty() {
        let img = &w.images[rng.below(w.images.len() as u64) as usize];
        let key = format!("crash/{}/setup-remote", w.iteration);
        let _ = w.grpc(async |c| api::prepare(c, &key, "", img.labels()).await);
        targets = remote_targets(w);
    }
    let seed = rng.next();
    Box::new(move || {
        if targets.is_empty() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        // stops by itself after a while; the kill usually comes first
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            s.store(true, Ordering::Relaxed);
        });
        let st = readers::run(Arc::new(targets), 8, seed, 96 << 10, stop);
        assert_eq!(
            st.wrong, 0,
            "wrong bytes before the crash: {:?}",
            st.wrong_messages
        );
    })
}

/// The image the pull case pulls, and the containerd it pulls into (started for
/// the case only: containerd's garbage collection removes every lazysnap snapshot
/// it does not know, so it must not run while other cases work or the invariants
/// are checked).
struct PullEnv {
    /// containerd's directory, kept from one start to the next.
    dir: PathBuf,
    /// The daemon's config, whose registry settings `lazysnap pull` reads.
    config: PathBuf,
    reference: String,
    /// What [`PULL_READ`] prints in a container of the image.
    expected: Vec<u8>,
}

/// Files of the pulled image's three layers (gzip, eStargz, gzip over it).
const PULL_READ: [&str; 4] = ["/etc/motd", "/data/base.txt", "/lazy/f3.txt", "/top.txt"];

impl PullEnv {
    fn available() -> bool {
        ["/usr/bin/containerd", "/usr/bin/ctr", "/usr/sbin/runc"]
            .iter()
            .all(|p| Path::new(p).exists())
    }

    /// Pushes a busybox image whose base and top layers `lazysnap pull` unpacks
    /// itself and whose middle layer is lazy.
    fn push(reg: &Registry, dir: PathBuf, config: PathBuf) -> PullEnv {
        let base_txt = common::text_bytes(1, 200 << 10);
        let base = common::busybox_rootfs(
            "base motd",
            &[("data/", Vec::new()), ("data/base.txt", base_txt.clone())],
        );
        let mut lazy = common::Corpus::new();
        lazy.dir("lazy/", 0o755, &common::ROOT);
        let lazy_files: Vec<Vec<u8>> = (0..6)
            .map(|i| common::text_bytes(10 + i, 60 << 10))
            .collect();
        for (i, f) in lazy_files.iter().enumerate() {
            lazy.file(&format!("lazy/f{i}.txt"), 0o644, &common::ROOT, f);
        }
        let top_txt = common::text_bytes(2, 500 << 10);
        let mut top = common::Corpus::new();
        top.dir("etc/", 0o755, &common::ROOT);
        top.file("etc/motd", 0o644, &common::ROOT, b"top motd\n");
        top.file("top.txt", 0o644, &common::ROOT, &top_txt);
        let estargz = lazysnap::format::writer::WriteOptions {
            format: lazysnap::format::Format::Estargz,
            ..Default::default()
        };
        let reference = reg.push_image(
            "crash/pull",
            "v1",
            &[
                Layer::gzip(&base),
                Layer::convert(&lazy.finish(), &estargz),
                Layer::gzip(&top.finish()),
            ],
        );
        let expected = [
            b"top motd\n".as_slice(),
            &base_txt,
            &lazy_files[3],
            &top_txt,
        ]
        .concat();
        PullEnv {
            dir,
            config,
            reference,
            expected,
        }
    }

    /// Starts containerd with lazysnap at `socket` as its proxy snapshotter.
    fn containerd(&self, socket: &Path) -> Containerd {
        let c = Containerd::start(&self.dir, socket);
        c.wait_snapshotter("lazysnap");
        c
    }

    /// `lazysnap pull` of the image into `c`.
    fn command(&self, c: &Containerd) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lazysnap"));
        cmd.arg("pull")
            .arg("--address")
            .arg(&c.address)
            .arg("--config")
            .arg(&self.config)
            .arg(&self.reference);
        cmd
    }
}

/// `lazysnap pull` (the daemon prepares, commits and mounts; the CLI fetches and
/// unpacks the gzip layers into the daemon's snapshot directories); half the time
/// the pull process is killed together with the daemon.
fn pull_case(w: &World, rng: &mut Rng) -> Work {
    let env = w.pull.expect("the pull case runs with containerd");
    let c = env.containerd(&w.socket);
    let kill_pull = rng.chance(0.5);
    let mut cmd = env.command(&c);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let daemon = w.daemon_pid.map(|p| PathBuf::from(format!("/proc/{p}")));
    Box::new(move || {
        let mut child = cmd.spawn().expect("spawn lazysnap pull");
        let started = Instant::now();
        while matches!(child.try_wait(), Ok(None)) {
            let daemon_gone = daemon.as_ref().is_none_or(|d| !d.exists());
            if (kill_pull && daemon_gone) || started.elapsed() > Duration::from_secs(50) {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.wait();
        drop(c);
    })
}

/// A second pull of the image completes, and a container runs from it and reads
/// every layer; then the images and leases go, collected at once (which removes
/// the other cases' snapshots too: containerd does not know them).
fn pull_verify(w: &World, _rng: &mut Rng) -> Vec<String> {
    let Some(env) = w.pull else {
        return Vec::new();
    };
    let c = env.containerd(&w.socket);
    let mut bad = Vec::new();
    let out = support::run_bounded(env.command(&c), Duration::from_secs(120));
    if !out.status.success() {
        bad.push(format!(
            "a second pull of {} failed: {}",
            env.reference,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    } else {
        let mut cmd = vec!["/bin/cat"];
        cmd.extend(PULL_READ);
        let run = c.run_lazy(&env.reference, &format!("crash-{}", w.iteration), &cmd);
        if !run.status.success() {
            bad.push(format!(
                "a container of the pulled image failed: {}",
                String::from_utf8_lossy(&run.stderr).trim()
            ));
        } else if run.stdout != env.expected {
            bad.push(format!(
                "a container of the pulled image read wrong bytes from {PULL_READ:?}"
            ));
        }
    }
    let _ = c.ctr(&["image", "rm", "--sync", &env.reference]);
    let leases = c.ctr(&["leases", "ls", "-q"]);
    for id in String::from_utf8_lossy(&leases.stdout).split_whitespace() {
        let _ = c.ctr(&["leases", "rm", "--sync", id]);
    }
    bad
}

/// Unlazy (the Update label) of two committed remote snapshots at once.
fn unlazy_case(w: &World, rng: &mut Rng) -> Work {
    let remote = |w: &World| -> Vec<String> {
        w.list()
            .into_iter()
            .filter(|i| is(i, Kind::Committed) && i.labels.contains_key(REMOTE))
            .map(|i| i.name)
            .collect()
    };
    let mut names = remote(w);
    if names.is_empty() {
        let img = &w.images[rng.below(w.images.len() as u64) as usize];
        let mut labels = img.labels();
        let target = format!("{}-{}-u", img.chain_id, w.iteration);
        labels.insert(REF.to_string(), target);
        let key = format!("crash/{}/setup-unlazy", w.iteration);
        let _ = w.grpc(async |c| api::prepare(c, &key, "", labels).await);
        names = remote(w);
    }
    for i in (1..names.len()).rev() {
        names.swap(i, rng.below(i as u64 + 1) as usize);
    }
    names.truncate(2);
    let names = Arc::new(names);
    concurrently(w.socket.clone(), names.len(), move |mut c, k| {
        let names = names.clone();
        async move {
            let labels = HashMap::from([(UNLAZY.to_string(), "true".to_string())]);
            let _ = api::update(&mut c, &names[k], labels, &[format!("labels.{UNLAZY}")]).await;
        }
    })
}

/// Remote or local, never in between: no staging directory is left, and a layer
/// that is no longer remote is a plain directory holding exactly its files.
fn unlazy_verify(w: &World, _rng: &mut Rng) -> Vec<String> {
    let mut bad = Vec::new();
    let copy = tempfile::NamedTempFile::new().expect("temp");
    std::fs::copy(w.root.join("metadata.db"), copy.path()).expect("copy metadata.db");
    let records = Store::open(copy.path())
        .and_then(|s| s.read(|tx| tx.records()))
        .expect("metadata readable");
    let mounted = mounts_under(&w.root.join("snapshots"));
    for (key, rec) in &records {
        let dir = w.root.join("snapshots").join(rec.id.0.to_string());
        for left in ["fs.unlazy", "fs.remote"] {
            if dir.join(left).exists() {
                bad.push(format!("{key}: {left} left after the restart"));
            }
        }
        let digest = rec.labels.get(STARGZ_DIGEST);
        let Some(img) = w.images.iter().find(|i| Some(&i.digest) == digest) else {
            continue;
        };
        // (an active one is a remote Prepare's fallback: an empty local snapshot)
        if rec.labels.contains_key(REMOTE) || rec.kind != lazysnap::snapshot::Kind::Committed {
            continue;
        }
        let fs = dir.join("fs");
        if mounted.contains_key(&fs) {
            bad.push(format!("{key}: unlazied, yet {} is a mount", fs.display()));
            continue;
        }
        let mut want: BTreeMap<String, Vec<u8>> = img.files.iter().cloned().collect();
        // the member eStargz writers add to a layer without prioritized files
        want.insert(NO_PREFETCH_LANDMARK.to_string(), vec![0x0f]);
        let (dirs, files, other) = local_tree(&fs);
        if files != want || dirs != ["a", "b"] || !other.is_empty() {
            bad.push(format!(
                "{key}: unlazied tree differs from the layer: dirs {dirs:?}, other {other:?}, \
                 files {:?} (want {:?}), same content: {}",
                files.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                files == want
            ));
        }
    }
    bad
}

/// A plain directory tree: its directories, its regular files and content, and
/// anything else.
fn local_tree(root: &Path) -> (Vec<String>, BTreeMap<String, Vec<u8>>, Vec<String>) {
    let (mut dirs, mut files, mut other) = (Vec::new(), BTreeMap::new(), Vec::new());
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {
                    dirs.push(rel);
                    todo.push(p);
                }
                Ok(m) if m.is_file() => {
                    files.insert(rel, std::fs::read(&p).unwrap_or_default());
                }
                _ => other.push(rel),
            }
        }
    }
    dirs.sort();
    (dirs, files, other)
}

/// Snapshot name → directory of each remote snapshot, through a `View` on it
/// (whose read-only bind mount names the directory), removed again.
fn remote_dirs(w: &World) -> HashMap<String, PathBuf> {
    let infos = w.list();
    let mut out = HashMap::new();
    for info in infos.iter().filter(|i| i.labels.contains_key(REMOTE)) {
        let key = format!("probe/{}/{}", w.iteration, info.name);
        let m = w.grpc(async |c| {
            let m = api::view(c, &key, &info.name).await;
            let _ = api::remove(c, &key).await;
            m
        });
        if let Ok(m) = m
            && let Some(first) = m.first()
        {
            out.insert(info.name.clone(), PathBuf::from(&first.source));
        }
    }
    out
}

/// Mount points under `dir` and their filesystem types.
fn mounts_under(dir: &Path) -> BTreeMap<PathBuf, String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let mp = PathBuf::from(f.get(4)?);
            let fstype = f.get(sep + 1)?.to_string();
            (mp.starts_with(dir) && mp != dir).then_some((mp, fstype))
        })
        .collect()
}

/// Flips a byte of a random chunk file in the disk cache (a torn write or bit rot);
/// returns whether there was one.
fn damage_cache(root: &Path, rng: &mut Rng) -> bool {
    let mut files = Vec::new();
    for sub in std::fs::read_dir(root.join("cache/v"))
        .into_iter()
        .flatten()
        .flatten()
    {
        files.extend(
            std::fs::read_dir(sub.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path()),
        );
    }
    if files.is_empty() {
        return false;
    }
    let f = &files[rng.below(files.len() as u64) as usize];
    let Ok(mut data) = std::fs::read(f) else {
        return false;
    };
    if data.is_empty() {
        return false;
    }
    let i = rng.below(data.len() as u64) as usize;
    data[i] ^= 0x20;
    std::fs::write(f, data).is_ok()
}

/// Checks the invariants on the restarted daemon; returns the violations.
fn check(w: &World, daemon: &Daemon, rng: &mut Rng) -> Vec<String> {
    let mut bad = Vec::new();
    let infos = w.list();
    // the metadata itself, from a copy of the database (the daemon holds the file)
    let copy = tempfile::NamedTempFile::new().expect("temp");
    std::fs::copy(w.root.join("metadata.db"), copy.path()).expect("copy metadata.db");
    let records = Store::open(copy.path())
        .and_then(|s| s.read(|tx| tx.records()))
        .expect("metadata readable");
    let names: BTreeSet<&str> = infos.iter().map(|i| i.name.as_str()).collect();
    let keys: BTreeSet<&str> = records.iter().map(|(k, _)| k.as_str()).collect();
    if names != keys {
        bad.push(format!("List {names:?} differs from the metadata {keys:?}"));
    }
    // First use: a remote snapshot whose connection the fd holder did not keep is
    // mounted again when a client uses it (lazy restore); a View over each is one.
    remote_dirs(w);
    let snapshots = w.root.join("snapshots");
    let live = mounts_under(&snapshots);
    let status: BTreeSet<PathBuf> = daemon.remote_mounts().into_iter().map(|(_, p)| p).collect();
    let mut owned_dirs = BTreeSet::new();
    let mut remote_fs = BTreeSet::new();
    for (key, rec) in &records {
        let dir = snapshots.join(rec.id.0.to_string());
        owned_dirs.insert(dir.clone());
        if !dir.join("fs").is_dir() {
            bad.push(format!("{key}: {} has no fs directory", dir.display()));
        }
        if rec.kind == lazysnap::snapshot::Kind::Active && !dir.join("work").is_dir() {
            bad.push(format!("{key}: active without work directory"));
        }
        if rec.labels.contains_key(REMOTE) {
            let fs = dir.join("fs");
            if !live.get(&fs).is_some_and(|t| t.starts_with("fuse")) {
                bad.push(format!(
                    "{key}: remote snapshot {} is not mounted",
                    fs.display()
                ));
            }
            if !status.contains(&fs) {
                bad.push(format!("{key}: status does not list {}", fs.display()));
            }
            remote_fs.insert(fs.clone());
            // content through the mount: two random files of the layer
            let digest = rec
                .labels
                .get("containerd.io/snapshot/remote/stargz.digest");
            if let Some(img) = w.images.iter().find(|i| Some(&i.digest) == digest) {
                for _ in 0..2 {
                    let (path, want) = &img.files[rng.below(img.files.len() as u64) as usize];
                    match std::fs::read(fs.join(path)) {
                        Ok(got) if got == *want => {}
                        Ok(_) => bad.push(format!("{key}: {path}: WRONG BYTES served")),
                        Err(e) => bad.push(format!("{key}: {path}: {e}")),
                    }
                }
            }
        }
    }
    // after Cleanup nothing is left that no snapshot owns
    if let Err(e) = w.grpc(async |c| api::cleanup(c).await) {
        bad.push(format!("Cleanup: {e}"));
    }
    for e in std::fs::read_dir(&snapshots)
        .expect("snapshots dir")
        .flatten()
    {
        if !owned_dirs.contains(&e.path()) {
            bad.push(format!(
                "{} is owned by no snapshot after Cleanup",
                e.path().display()
            ));
        }
    }
    for mp in mounts_under(&snapshots).keys() {
        if !remote_fs.contains(mp) {
            bad.push(format!(
                "{} is mounted but no remote snapshot owns it",
                mp.display()
            ));
        }
    }
    bad
}

/// Keeps the number of snapshots and remote mounts bounded (not interrupted).
fn trim(w: &World, rng: &mut Rng) {
    for _ in 0..10 {
        let infos = w.list();
        let remote = infos
            .iter()
            .filter(|i| i.labels.contains_key(REMOTE))
            .count();
        if infos.len() <= MAX_SNAPSHOTS && remote <= MAX_REMOTE {
            return;
        }
        let only_remote = infos.len() <= MAX_SNAPSHOTS;
        for name in leaves(&infos, rng).into_iter().take(8) {
            let remote_leaf = infos
                .iter()
                .any(|i| i.name == name && i.labels.contains_key(REMOTE));
            if !only_remote || remote_leaf {
                let _ = w.grpc(async |c| api::remove(c, &name).await);
            }
        }
    }
}

#[test]
fn kill_9_at_random_points_keeps_the_invariants() {
    if !require(&["/usr/bin/docker-registry"], "crash consistency") {
        return;
    }
    let seed = support::seed("crash consistency", 5);
    let iterations: usize = std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let reg = Registry::start();
    let images = push_random_images(&reg, "crash", 4, 6, 256 << 10, 32 << 10);
    let work = tempfile::Builder::new()
        .prefix("lzcrash")
        .tempdir_in("/tmp")
        .unwrap();
    let mut daemon = Daemon::start(&work.path().join("d"), CONFIG);
    let pull = PullEnv::available()
        .then(|| PullEnv::push(&reg, work.path().join("containerd"), daemon.config.clone()));
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| !c.containerd || pull.is_some())
        .collect();
    let mut rng = Rng::new(seed);
    let mut violations: Vec<String> = Vec::new();
    let mut per_case: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut damaged = 0;
    // how long each case's work took when it last finished, in microseconds
    let mut windows: HashMap<&str, u64> = HashMap::new();
    let started = Instant::now();
    for iteration in 0..iterations {
        let w = World {
            socket: daemon.socket.clone(),
            root: daemon.root.clone(),
            images: &images,
            iteration,
            daemon_pid: daemon.pid(),
            pull: pull.as_ref(),
        };
        trim(&w, &mut rng);
        let case = cases[rng.below(cases.len() as u64) as usize];
        let work_fn = (case.setup)(&w, &mut rng);
        let took = Arc::new(std::sync::Mutex::new(None));
        let t = {
            let took = took.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                work_fn();
                *took.lock().unwrap() = Some(start.elapsed());
            })
        };
        let window = windows
            .get(case.name)
            .copied()
            .unwrap_or(case.window_ms * 1000);
        let delay = rng.below(window.max(1));
        std::thread::sleep(Duration::from_micros(delay));
        let finished = *took.lock().unwrap();
        daemon.kill9();
        let in_flight = finished.is_none();
        if let Some(d) = finished {
            windows.insert(case.name, d.as_micros() as u64);
        }
        let e = per_case.entry(case.name).or_default();
        e.0 += 1;
        e.1 += u64::from(in_flight);
        if rng.chance(0.3) && damage_cache(&daemon.root, &mut rng) {
            damaged += 1;
        }
        daemon.start_again();
        // The work ends: its gRPC calls failed with the daemon gone, and reads that
        // were waiting on a layer the fd holder kept connected are answered by the
        // new daemon (from the damaged cache too, which must not serve wrong bytes).
        let limit = Instant::now();
        while !t.is_finished() {
            assert!(
                limit.elapsed() < Duration::from_secs(60),
                "iteration {iteration} ({}): work still running after the restart",
                case.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(p) = t.join() {
            std::panic::resume_unwind(p);
        }
        let mut found = check(&w, &daemon, &mut rng);
        if let Some(verify) = case.verify {
            found.extend(verify(&w, &mut rng));
        }
        for v in found {
            violations.push(format!("iteration {iteration} ({}): {v}", case.name));
        }
    }
    let log = daemon.log();
    let panics = log.matches("panicked").count();
    let figures = serde_json::json!({
        "seed": seed,
        "iterations": iterations,
        "kills_by_case": per_case.iter().map(|(k, (n, f))| (k.to_string(), serde_json::json!({"kills": n, "in_flight": f}))).collect::<BTreeMap<_, _>>(),
        "cache_files_damaged": damaged,
        // the recovery paths the kills made the daemon take
        "corrupt_cached_chunks_dropped": log.matches("cached chunk fails its digest; dropped").count(),
        "orphan_dirs_removed": log.matches("removing unowned snapshot directory").count(),
        "stale_mounts_detached": log.matches("detaching stale mount").count(),
        "remote_snapshots_remounted": log.matches("remote snapshot mounted again").count(),
        "live_mounts_taken_over": log.matches("taking over a live mount").count(),
        "mounted_at_first_use": log.matches("mounted at first use").count(),
        "unlazies_completed": log.matches(" unlazied ").count(),
        "unfinished_unlazies_removed": log.matches("removing an unfinished unlazy").count(),
        "unlazies_finished_at_restore": log.matches("finishing an unlazy").count(),
        "invariant_violations": violations.len(),
        "daemon_panics": panics,
        "seconds": started.elapsed().as_secs(),
    });
    eprintln!("CRASH-FIGURES {figures}");
    assert!(
        violations.is_empty(),
        "invariant violations:\n{}",
        violations.join("\n")
    );
    assert_eq!(panics, 0, "the daemon panicked:\n{log}");
    let in_flight: u64 = per_case.values().map(|v| v.1).sum();
    assert!(
        in_flight > iterations as u64 / 2,
        "most kills must land while work is in flight: {per_case:?}"
    );
}
