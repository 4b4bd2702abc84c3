//! The snapshots gRPC API of `lazysnap::service` with a fake remote filesystem, driven
//! by a tonic client from containerd-client: the remote-snapshot protocol as containerd
//! and BuildKit (stargz mode) use it, error codes, restart and restore, status and
//! metrics.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use containerd_client::services::v1::snapshots::{Kind, UsageRequest};
use containerd_client::tonic::Code;
use containerd_client::types::Mount;
use lazysnap::service::{self, Config};
use support::fake_remote::{FakeRemote, is_mounted};
use support::snapshots::{
    Client, REF, REMOTE, code, commit, list, mounts, prepare, remove, stat, update, view,
};

/// An in-process daemon; shut down (cleanly) by `stop`, or on drop.
struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<lazysnap::Result<()>>>,
    config: Config,
}

impl Server {
    async fn start(
        dir: &Path,
        fake: Arc<FakeRemote>,
        metrics: Option<std::net::SocketAddr>,
    ) -> Server {
        let config = Config {
            socket: dir.join("l.sock"),
            root: dir.join("root"),
            metrics_address: metrics,
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c = config.clone();
        let task = tokio::spawn(async move {
            service::serve(c, Some(fake), async {
                let _ = rx.await;
            })
            .await
        });
        let sock = config.socket.clone();
        for _ in 0..200 {
            if tokio::net::UnixStream::connect(&sock).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Server {
            stop: Some(tx),
            task: Some(task),
            config,
        }
    }

    async fn client(&self) -> Client {
        support::snapshots::connect(&self.config.socket).await
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("join").expect("serve");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        support::detach_mounts_under(&self.config.root);
    }
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn cri_labels(chain: &str, layer: &str) -> HashMap<String, String> {
    labels(&[
        (REF, chain),
        (
            "containerd.io/snapshot/cri.image-ref",
            "127.0.0.1:5000/app:1",
        ),
        ("containerd.io/snapshot/cri.layer-digest", layer),
        ("containerd.io/snapshot/cri.manifest-digest", "sha256:m"),
        ("containerd.io/snapshot/cri.image-layers", layer),
    ])
}

fn option<'a>(m: &'a Mount, prefix: &str) -> Option<&'a str> {
    m.options.iter().find_map(|o| o.strip_prefix(prefix))
}

/// Mounts `ms` (one mount) at `target` with mount(8), as containerd would.
fn mount_at(ms: &[Mount], target: &Path) {
    assert_eq!(ms.len(), 1);
    let m = &ms[0];
    let mut cmd = std::process::Command::new("mount");
    cmd.arg("-t")
        .arg(&m.r#type)
        .arg(&m.source)
        .arg(target)
        .arg("-o")
        .arg(m.options.join(","));
    let out = support::run_bounded(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "mount {m:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// BuildKit's overlay differ: the upper mount must be one overlay with `upperdir=`
/// and a `lowerdir=` equal to the lower mount's directories.
fn buildkit_upperdir(lower: &[Mount], upper: &[Mount]) -> PathBuf {
    assert_eq!(upper.len(), 1);
    assert_eq!(upper[0].r#type, "overlay");
    let upperdir = option(&upper[0], "upperdir=").expect("upperdir=");
    let upper_lowers = option(&upper[0], "lowerdir=").expect("lowerdir=");
    let lower_dirs = match lower[0].r#type.as_str() {
        "bind" => lower[0].source.clone(),
        "overlay" => option(&lower[0], "lowerdir=")
            .expect("lowerdir=")
            .to_string(),
        t => panic!("unexpected lower type {t}"),
    };
    assert_eq!(
        upper_lowers, lower_dirs,
        "upper's lowerdir must equal the lower's"
    );
    PathBuf::from(upperdir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_remote_snapshots() {
    if !support::require(&["/bin/mount"], "snapshotter_grpc") {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("lzgrpc")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path();
    let fake = Arc::new(FakeRemote::default());
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = Server::start(dir, fake.clone(), Some(metrics_addr)).await;
    let mut c = server.client().await;
    use std::os::unix::fs::PermissionsExt;
    for sock in [server.config.socket.clone(), server.config.status_socket()] {
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660, "{}", sock.display());
    }
    let fs_of = |id: u64| dir.join(format!("root/snapshots/{id}/fs"));

    // --- containerd's unpacker: two remote layers.
    let l1 = cri_labels("sha256:c1", "sha256:d1");
    assert_eq!(
        code(prepare(&mut c, "default/1/extract-1 sha256:c1", "", l1).await),
        Code::AlreadyExists
    );
    let found = list(
        &mut c,
        &[r#"labels."containerd.io/snapshot.ref"==sha256:c1,parent=="""#],
    )
    .await
    .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "sha256:c1");
    let info = stat(&mut c, "sha256:c1").await.unwrap();
    assert_eq!(info.kind, Kind::Committed as i32);
    assert_eq!(
        info.labels.get(REMOTE).map(String::as_str),
        Some("remote snapshot")
    );
    assert_eq!(info.labels.get(REF).map(String::as_str), Some("sha256:c1"));
    let l2 = cri_labels("sha256:c2", "sha256:d2");
    assert_eq!(
        code(prepare(&mut c, "default/2/extract-2 sha256:c2", "sha256:c1", l2).await),
        Code::AlreadyExists
    );
    let found = list(
        &mut c,
        &[r#"labels."containerd.io/snapshot.ref"==sha256:c2,parent=="sha256:c1""#],
    )
    .await
    .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(fake.mounts.load(Ordering::SeqCst), 2);
    assert_eq!(is_mounted(&fs_of(1)), 1);
    assert_eq!(is_mounted(&fs_of(2)), 1);

    // A view over the chain is a real overlay of both fake layers.
    let v = view(&mut c, "default/3/view", "sha256:c2").await.unwrap();
    assert_eq!(
        option(&v[0], "lowerdir="),
        Some(format!("{}:{}", fs_of(2).display(), fs_of(1).display()).as_str())
    );
    let target = dir.join("target");
    std::fs::create_dir(&target).unwrap();
    mount_at(&v, &target);
    let names: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert!(
        names.contains(&"layer-sha256-d1".to_string())
            && names.contains(&"layer-sha256-d2".to_string()),
        "{names:?}"
    );

    // Unhealthy lowers: Mounts answers Unavailable.
    fake.unhealthy.store(true, Ordering::SeqCst);
    assert_eq!(
        code(mounts(&mut c, "default/3/view").await),
        Code::Unavailable
    );
    fake.unhealthy.store(false, Ordering::SeqCst);
    assert_eq!(mounts(&mut c, "default/3/view").await.unwrap(), v);

    // --- error codes, as containerd's overlay snapshotter answers them.
    assert_eq!(code(stat(&mut c, "nope").await), Code::NotFound);
    assert_eq!(code(mounts(&mut c, "nope").await), Code::NotFound);
    assert_eq!(
        code(prepare(&mut c, "k", "missing", HashMap::new()).await),
        Code::NotFound
    );
    assert_eq!(
        code(remove(&mut c, "sha256:c1").await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(commit(&mut c, "x", "default/3/view").await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(view(&mut c, "default/3/view", "sha256:c2").await),
        Code::AlreadyExists
    );
    let big = labels(&[("k", &"v".repeat(4096))]);
    assert_eq!(
        code(prepare(&mut c, "k", "", big).await),
        Code::InvalidArgument
    );
    assert_eq!(code(list(&mut c, &["name=="]).await), Code::InvalidArgument);
    assert_eq!(
        code(list(&mut c, &["labels.\"unterminated"]).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(update(&mut c, "sha256:c1", HashMap::new(), &["parent".into()]).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(update(&mut c, "nope", HashMap::new(), &[]).await),
        Code::NotFound
    );
    assert_eq!(code(remove(&mut c, "nope").await), Code::NotFound);

    // --- BuildKit (stargz mode): Prepare tmp-<id> <chain> with session labels.
    let session = "containerd.io/snapshot/remote/stargz.session.0.x7k2";
    let mut bk = labels(&[
        (REF, "sha256:c3"),
        (
            "containerd.io/snapshot/remote/stargz.reference",
            "127.0.0.1:5000/app:1",
        ),
        ("containerd.io/snapshot/remote/stargz.digest", "sha256:d3"),
        ("containerd.io/snapshot/remote/stargz.layers", "sha256:d3"),
        (session, "1"),
    ]);
    bk.insert("containerd.io/snapshot/remote/urls".into(), String::new());
    assert_eq!(
        code(prepare(&mut c, "tmp-x7k2 sha256:c3", "sha256:c2", bk).await),
        Code::AlreadyExists
    );
    let info = stat(&mut c, "sha256:c3").await.unwrap();
    assert_eq!(info.parent, "sha256:c2");
    assert!(info.labels.contains_key(session));
    let session2 = "containerd.io/snapshot/remote/stargz.session.1.q9z";
    let got = update(
        &mut c,
        "sha256:c3",
        labels(&[(session2, "1")]),
        &[format!("labels.{session2}")],
    )
    .await
    .unwrap();
    assert!(got.labels.contains_key(session2) && got.labels.contains_key(session));
    let got = update(
        &mut c,
        "sha256:c3",
        HashMap::new(),
        &[format!("labels.{session}"), format!("labels.{session2}")],
    )
    .await
    .unwrap();
    assert!(
        !got.labels.contains_key(session) && !got.labels.contains_key(session2),
        "{:?}",
        got.labels
    );
    assert_eq!(
        got.labels.get(REMOTE).map(String::as_str),
        Some("remote snapshot")
    );
    let lower = view(&mut c, "bk-lower", "sha256:c3").await.unwrap();
    let upper = prepare(&mut c, "bk-upper", "sha256:c3", HashMap::new())
        .await
        .unwrap();
    assert_eq!(mounts(&mut c, "bk-upper").await.unwrap(), upper);
    let upperdir = buildkit_upperdir(&lower, &upper);
    std::fs::write(upperdir.join("built"), b"by buildkit").unwrap();
    commit(&mut c, "sha256:c4", "bk-upper").await.unwrap();
    let usage = c
        .usage(UsageRequest {
            snapshotter: "lazysnap".into(),
            key: "sha256:c4".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(usage.size > 0 && usage.inodes == 2, "{usage:?}");
    assert_eq!(fake.mounts.load(Ordering::SeqCst), 3);

    // --- 8 concurrent Prepares of one layer share one mount.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            prepare(
                &mut c,
                &format!("default/{}/extract sha256:c5", 10 + i),
                "sha256:c4",
                cri_labels("sha256:c5", "sha256:d5"),
            )
            .await
        }));
    }
    for t in tasks {
        assert_eq!(code(t.await.unwrap()), Code::AlreadyExists);
    }
    assert_eq!(fake.mounts.load(Ordering::SeqCst), 4);
    assert_eq!(list(&mut c, &["name==sha256:c5"]).await.unwrap().len(), 1);

    // --- status and metrics.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args(["status", "--json", "--socket"])
        .arg(server.config.status_socket())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["snapshots"]["remote"], 4);
    assert_eq!(status["layers"].as_array().unwrap().len(), 4);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args(["status", "--socket"])
        .arg(server.config.status_socket())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mounted remote layers: 4")
            && text.contains("25.0%")
            && text.contains("50.0% of file bytes cached"),
        "{text}"
    );
    let metrics = http_get(metrics_addr, "/metrics").await;
    assert!(
        metrics.contains("lazysnap_operation_duration_seconds_bucket{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("op=\"prepare\",code=\"AlreadyExists\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("lazysnap_snapshots{kind=\"remote\"} 4"),
        "{metrics}"
    );

    // --- Remove unmounts.
    remove(&mut c, "default/3/view").await.unwrap();
    remove(&mut c, "bk-lower").await.unwrap();
    remove(&mut c, "sha256:c5").await.unwrap();
    assert_eq!(fake.unmounts.load(Ordering::SeqCst), 1);
    assert_eq!(lazysnap::snapshot::RemoteFs::status(fake.as_ref()).len(), 3);

    // --- clean restart: unmount at stop, remount at start.
    drop(c);
    server.stop().await;
    assert_eq!(fake.unmounts.load(Ordering::SeqCst), 4);
    assert_eq!(is_mounted(&fs_of(1)), 0);
    // A stale mount as a crash would leave it.
    nix::mount::mount(
        Some("stale"),
        &fs_of(1),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    let server = Server::start(dir, fake.clone(), None).await;
    let mut c = server.client().await;
    assert_eq!(fake.mounts.load(Ordering::SeqCst), 7);
    assert_eq!(
        is_mounted(&fs_of(1)),
        1,
        "stale mount replaced by one fresh mount"
    );
    assert!(fs_of(1).join("layer-sha256-d1").exists());
    let v = view(&mut c, "after-restart", "sha256:c4").await.unwrap();
    assert_eq!(v[0].r#type, "overlay");
    remove(&mut c, "after-restart").await.unwrap();
    drop(c);
    server.stop().await;

    // --- registry down at start: local snapshots still served, remote ones unavailable.
    fake.fail.store(true, Ordering::SeqCst);
    let server = Server::start(dir, fake.clone(), None).await;
    let mut c = server.client().await;
    assert_eq!(
        code(view(&mut c, "v-down", "sha256:c3").await),
        Code::Unavailable
    );
    assert_eq!(
        code(stat(&mut c, "v-down").await),
        Code::NotFound,
        "a failed View leaves nothing"
    );
    assert_eq!(
        code(prepare(&mut c, "rootfs-down", "sha256:c3", HashMap::new()).await),
        Code::Unavailable
    );
    assert_eq!(code(stat(&mut c, "rootfs-down").await), Code::NotFound);
    let m = prepare(&mut c, "local", "", HashMap::new()).await.unwrap();
    assert_eq!(m[0].r#type, "bind");
    // Cleanup removes directories no snapshot owns, unmounting what is mounted there.
    let orphan = dir.join("root/snapshots/999/fs");
    std::fs::create_dir_all(&orphan).unwrap();
    nix::mount::mount(
        Some("orphan"),
        &orphan,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("root/snapshots/new-crashed/fs")).unwrap();
    c.cleanup(containerd_client::services::v1::snapshots::CleanupRequest {
        snapshotter: "lazysnap".into(),
    })
    .await
    .unwrap();
    assert_eq!(is_mounted(&orphan), 0);
    assert!(
        !dir.join("root/snapshots/999").exists()
            && !dir.join("root/snapshots/new-crashed").exists()
    );
    assert!(fs_of(1).exists(), "owned directories stay");
    // The layer prepared while the registry is down falls back to an ordinary Prepare.
    let m = prepare(
        &mut c,
        "default/20/extract sha256:c9",
        "",
        cri_labels("sha256:c9", "sha256:d9"),
    )
    .await
    .unwrap();
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(
        stat(&mut c, "default/20/extract sha256:c9")
            .await
            .unwrap()
            .kind,
        Kind::Active as i32
    );
    drop(c);
    server.stop().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
