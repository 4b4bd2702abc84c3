//! containerd's CRI pulls lazily: a private containerd 1.6 with the CRI plugin enabled,
//! `lazysnap` as its snapshotter and `disable_snapshot_annotations = false`, pulls an
//! eStargz busybox image through `runtime.v1.ImageService/PullImage` (a hand-written
//! CRI client: crictl is not packaged here). The layer must become a remote snapshot
//! carrying CRI's labels, the registry must serve only range requests of the layer
//! blob, the daemon must have fetched a small part of it, and the image must run with
//! runc.

mod common;
mod support;

use std::time::Duration;

use common::registry::{Layer, Registry, sha256_hex};
use lazysnap::format::Format;
use lazysnap::format::writer::WriteOptions;
use support::{Containerd, Daemon, require};

const MOTD: &str = "pulled lazily by containerd's CRI";

/// The few CRI (`runtime.v1`) messages this test needs, by field number from
/// `k8s.io/cri-api/pkg/apis/runtime/v1/api.proto`.
mod cri {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageSpec {
        #[prost(string, tag = "1")]
        pub image: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PullImageRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<ImageSpec>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PullImageResponse {
        #[prost(string, tag = "1")]
        pub image_ref: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageStatusRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<ImageSpec>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, repeated, tag = "2")]
        pub repo_tags: Vec<String>,
        #[prost(string, repeated, tag = "3")]
        pub repo_digests: Vec<String>,
        #[prost(uint64, tag = "4")]
        pub size: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub image: Option<Image>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VersionRequest {
        #[prost(string, tag = "1")]
        pub version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VersionResponse {
        #[prost(string, tag = "1")]
        pub version: String,
        #[prost(string, tag = "2")]
        pub runtime_name: String,
        #[prost(string, tag = "3")]
        pub runtime_version: String,
        #[prost(string, tag = "4")]
        pub runtime_api_version: String,
    }
}

/// One unary CRI call over containerd's socket, bounded in time.
async fn unary<Req, Resp>(
    ch: &tonic::transport::Channel,
    method: &'static str,
    msg: Req,
    limit: Duration,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    let call = async {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        grpc.unary(tonic::Request::new(msg), path, codec)
            .await
            .map(|r| r.into_inner())
    };
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(tonic::Status::deadline_exceeded(format!(
            "{method}: timeout"
        )))
    })
}

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

/// `ctr snapshot info` of one snapshot, as JSON.
fn snapshot_info(c: &Containerd, name: &str) -> serde_json::Value {
    let text = c.ctr_ok(&[
        "-n",
        "k8s.io",
        "snapshot",
        "--snapshotter",
        "lazysnap",
        "info",
        name,
    ]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("snapshot info {name}: {e}: {text}"))
}

#[test]
fn cri_pull_is_lazy_and_runs() {
    if !require(
        &[
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/sbin/runc",
            "/usr/bin/docker-registry",
            "/usr/bin/curl",
        ],
        "CRI lazy pull",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let layer = estargz(&common::busybox_tar(MOTD, 5));
    let digest = format!("sha256:{}", sha256_hex(&layer.blob));
    let diff_id = layer.diff_id.clone();
    let blob_size = layer.blob.len();
    let image = reg.push_image("cri/busybox", "esgz", &[layer]);

    // The snapshotter first: containerd's CRI plugin dials it at start.
    let cache = work.path().join("cache");
    let daemon = Daemon::start(
        &work.path().join("lazysnap"),
        &format!(
            "[cache]\ndir = \"{}\"\n[layer]\nbackground_fetch = false\n",
            cache.display()
        ),
    );
    let c = Containerd::start_with_cri(&work.path().join("containerd"), &daemon.socket);
    c.plain_http(&reg.host());
    c.wait_snapshotter("lazysnap");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let image_ref = rt.block_on(async {
        let ch = containerd_client::connect(&c.address)
            .await
            .expect("connect to containerd");
        // CRI answers once its service is initialized.
        let mut version = None;
        let start = std::time::Instant::now();
        while version.is_none() && start.elapsed() < Duration::from_secs(60) {
            match unary::<_, cri::VersionResponse>(
                &ch,
                "/runtime.v1.RuntimeService/Version",
                cri::VersionRequest {
                    version: "v1".into(),
                },
                Duration::from_secs(5),
            )
            .await
            {
                Ok(v) => version = Some(v),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let version = version.unwrap_or_else(|| panic!("CRI never answered:\n{}", c.log()));
        assert_eq!(version.runtime_name, "containerd", "{version:?}");

        let pulled = unary::<_, cri::PullImageResponse>(
            &ch,
            "/runtime.v1.ImageService/PullImage",
            cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.clone(),
                }),
            },
            Duration::from_secs(180),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PullImage {image}: {e}\ncontainerd:\n{}\nlazysnap:\n{}",
                c.log(),
                daemon.log()
            )
        });
        assert!(
            pulled.image_ref.starts_with("sha256:"),
            "image ref {:?}",
            pulled.image_ref
        );
        let status = unary::<_, cri::ImageStatusResponse>(
            &ch,
            "/runtime.v1.ImageService/ImageStatus",
            cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: image.clone(),
                }),
            },
            Duration::from_secs(30),
        )
        .await
        .expect("ImageStatus");
        let img = status.image.expect("CRI knows the pulled image");
        assert_eq!(img.id, pulled.image_ref);
        assert!(img.repo_tags.contains(&image), "{img:?}");
        pulled.image_ref
    });
    eprintln!("CRI pulled {image} as {image_ref}");

    // The layer is a committed remote snapshot named by its chain id (one layer: the
    // diff id), with the remote label and CRI's labels.
    let snaps = c.ctr_ok(&[
        "-n",
        "k8s.io",
        "snapshot",
        "--snapshotter",
        "lazysnap",
        "ls",
    ]);
    let line = snaps
        .lines()
        .find(|l| l.starts_with(&diff_id))
        .unwrap_or_else(|| panic!("no snapshot {diff_id}:\n{snaps}"));
    assert!(line.contains("Committed"), "{snaps}");
    let info = snapshot_info(&c, &diff_id);
    eprintln!("snapshot info: {info}");
    let labels = info["Labels"].as_object().cloned().unwrap_or_default();
    let label = |k: &str| labels.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    assert!(
        labels.contains_key("containerd.io/snapshot/remote"),
        "not a remote snapshot: {info:#}"
    );
    assert_eq!(
        label("containerd.io/snapshot/cri.layer-digest"),
        digest,
        "{info:#}"
    );
    assert_eq!(
        label("containerd.io/snapshot/cri.image-ref"),
        image,
        "{info:#}"
    );
    assert!(
        label("containerd.io/snapshot/cri.manifest-digest").starts_with("sha256:"),
        "{info:#}"
    );
    assert!(
        label("containerd.io/snapshot/cri.image-layers").contains(&digest),
        "{info:#}"
    );

    // The registry never sent the whole layer blob, and the daemon fetched little.
    let gets = reg.blob_gets(&digest);
    assert!(!gets.is_empty(), "no blob reads logged:\n{}", reg.log());
    assert!(
        gets.iter().all(|&(s, _)| s == 206),
        "layer blob GETs must all be ranges, got {gets:?}"
    );
    let served: u64 = gets.iter().map(|&(_, n)| n).sum();
    eprintln!(
        "registry served {served} of {blob_size} blob bytes in {} ranges",
        gets.len()
    );
    assert!(
        (served as usize) < blob_size / 4,
        "the registry served {served} of {blob_size} blob bytes for the pull"
    );
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args(["status", "--json", "--config"])
        .arg(&daemon.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "status: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let layers = v["layers"].as_array().cloned().unwrap_or_default();
    let ours: Vec<_> = layers.iter().filter(|l| l["digest"] == digest).collect();
    assert_eq!(ours.len(), 1, "one mount of {digest}: {text}");
    let fetched = ours[0]["fetched_bytes"].as_u64().unwrap();
    eprintln!("fetched {fetched} of {blob_size} blob bytes after the pull");
    assert!(
        (fetched as usize) < blob_size / 4,
        "the pull must fetch footer, TOC and prefetch only: {fetched} of {blob_size}"
    );

    // The CRI-pulled image runs with runc from the remote snapshot.
    let out = c.ctr_ok(&[
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--snapshotter",
        "lazysnap",
        "--net-host",
        &image,
        "cri-lazy-1",
        "/bin/cat",
        "/etc/motd",
    ]);
    assert_eq!(out.trim(), MOTD, "{}", daemon.log());
    let gets = reg.blob_gets(&digest);
    assert!(
        gets.iter().all(|&(s, _)| s == 206),
        "layer blob GETs must all be ranges after the run, got {gets:?}"
    );
    let served: u64 = gets.iter().map(|&(_, n)| n).sum();
    assert!(
        (served as usize) < blob_size / 2,
        "the unread 24 MiB file must not be served: {served} of {blob_size}"
    );
    let after: serde_json::Value = serde_json::from_slice(
        &std::process::Command::new(env!("CARGO_BIN_EXE_lazysnap"))
            .args(["status", "--json", "--config"])
            .arg(&daemon.config)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let fetched_after = after["layers"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["digest"] == digest))
        .and_then(|l| l["fetched_bytes"].as_u64())
        .expect("layer still mounted");
    eprintln!("fetched {fetched_after} of {blob_size} blob bytes after the run");
    assert!(
        (fetched_after as usize) < blob_size / 2,
        "the unread 24 MiB file must not be fetched: {fetched_after} of {blob_size}"
    );

    // Removing the image releases the snapshots.
    c.ctr_ok(&["-n", "k8s.io", "image", "rm", "--sync", &image]);
    drop(c);
    drop(daemon);
    drop(reg);
}
