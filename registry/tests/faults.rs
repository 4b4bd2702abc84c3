//! Reads against a fault-injecting server: every read returns the right bytes after
//! retries, or a clear error naming registry, repository and digest. Never wrong
//! bytes, never a hang past the configured timeout.

mod support;

use std::{sync::atomic::Ordering::SeqCst, time::Duration};

use lazysnap_registry::{
    Blob, Descriptor, Digest, ErrorKind, Reference, RegistryClient, RegistryConfig,
};
use support::fault::{Fault, FaultServer, MultiMode};

const REPO: &str = "fault/repo";
const SIZE: usize = 256 * 1024;

struct Fixture {
    server: FaultServer,
    client: RegistryClient,
    blob: Blob,
    data: Vec<u8>,
    _dir: tempfile::TempDir,
}

async fn fixture_with(f: impl FnOnce(&mut RegistryConfig)) -> Fixture {
    support::init_tracing();
    let data = support::pattern(SIZE, 7);
    let server = FaultServer::start(REPO, data.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = support::test_config(dir.path());
    cfg.request_timeout_ms = 500;
    f(&mut cfg);
    let client = RegistryClient::new(cfg);
    let reference =
        Reference::parse(&format!("{}/{REPO}:latest", server.host())).expect("reference");
    let desc = Descriptor {
        media_type: "application/octet-stream".into(),
        digest: Digest::parse(&server.state.digest).expect("digest"),
        size: data.len() as u64,
        annotations: Default::default(),
        urls: vec![],
        platform: None,
    };
    let blob = client.blob(&reference, &desc).expect("blob");
    Fixture {
        server,
        client,
        blob,
        data,
        _dir: dir,
    }
}

async fn fixture() -> Fixture {
    fixture_with(|_| {}).await
}

/// Guards against hangs: the read must finish long before this.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("read did not finish: hang")
}

impl Fixture {
    async fn check_read(&self, offset: u64, len: usize) {
        let got = bounded(self.blob.read_at(offset, len)).await.expect("read");
        assert_eq!(&got[..], &self.data[offset as usize..offset as usize + len]);
    }

    fn blob_gets(&self) -> usize {
        self.server.requests(&self.server.blob_path()).len()
    }

    fn assert_names_everything(&self, msg: &str) {
        assert!(
            msg.contains(&format!("registry {}", self.server.host())),
            "{msg}"
        );
        assert!(msg.contains(&format!("repository {REPO}")), "{msg}");
        assert!(msg.contains(&self.server.state.digest), "{msg}");
    }
}

#[tokio::test]
async fn plain_reads_are_exact_and_reuse_one_connection() {
    let f = fixture().await;
    for (off, len) in [
        (0u64, 1usize),
        (0, SIZE),
        (1000, 4096),
        (SIZE as u64 - 10, 10),
    ] {
        f.check_read(off, len).await;
    }
    assert_eq!(
        f.server.state.connections.load(SeqCst),
        1,
        "keep-alive connection reused"
    );
    let st = f.blob.stats();
    assert_eq!(st.requests, 4);
    assert_eq!(st.bytes, (1 + SIZE + 4096 + 10) as u64);
    assert_eq!(f.client.stats().requests, 4);
    // Out of bounds is refused locally, naming the blob.
    let e = f
        .blob
        .read_at(SIZE as u64 - 1, 2)
        .await
        .expect_err("past the end");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    f.assert_names_everything(&e.to_string());
    assert_eq!(f.blob_gets(), 4, "no request for an invalid range");
    assert!(f.blob.read_at(5, 0).await.expect("empty").is_empty());
}

#[tokio::test]
async fn connection_resets_are_retried() {
    let f = fixture().await;
    f.server.push_faults(&[Fault::Reset, Fault::Reset]);
    f.check_read(10, 5000).await;
    assert_eq!(f.blob_gets(), 3);
    assert_eq!(f.blob.stats().retries, 2);
}

#[tokio::test]
async fn server_errors_are_retried() {
    let f = fixture().await;
    f.server
        .push_faults(&[Fault::Status(503), Fault::Status(502), Fault::Status(500)]);
    f.check_read(0, 100).await;
    assert_eq!(f.blob_gets(), 4);
}

#[tokio::test]
async fn too_many_requests_honours_retry_after() {
    let f = fixture().await;
    f.server
        .push_faults(&[Fault::TooMany(1), Fault::TooMany(0)]);
    f.check_read(77, 777).await;
    assert_eq!(f.blob_gets(), 3);
}

#[tokio::test]
async fn persistent_503_fails_with_a_clear_error() {
    let f = fixture().await;
    f.server.set_persistent(Some(Fault::Status(503)));
    let e = bounded(f.blob.read_at(0, 100))
        .await
        .expect_err("must fail");
    let msg = e.to_string();
    f.assert_names_everything(&msg);
    assert!(msg.contains("range 0-99"), "{msg}");
    assert!(msg.contains("503 after 4 attempts"), "{msg}");
    assert_eq!(e.kind(), ErrorKind::Status);
    assert_eq!(f.blob_gets(), 4, "1 attempt + 3 retries");
    assert_eq!(f.blob.stats().failures, 1);
}

#[tokio::test]
async fn not_found_is_not_retried() {
    let f = fixture().await;
    f.server.set_persistent(Some(Fault::Status(404)));
    let e = bounded(f.blob.read_at(0, 100))
        .await
        .expect_err("must fail");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    f.assert_names_everything(&e.to_string());
    assert_eq!(f.blob_gets(), 1);
}

#[tokio::test]
async fn stalled_headers_are_cut_by_the_timeout_and_retried() {
    let f = fixture().await;
    f.server.push_faults(&[Fault::StallHeaders]);
    f.check_read(4096, 4096).await;
    assert_eq!(f.blob_gets(), 2);
}

#[tokio::test]
async fn stalled_body_is_cut_by_the_timeout_and_retried() {
    let f = fixture().await;
    f.server.push_faults(&[Fault::StallBody]);
    f.check_read(0, 64 * 1024).await;
    assert_eq!(f.blob_gets(), 2);
}

#[tokio::test]
async fn persistent_stall_fails_as_timeout() {
    let f = fixture_with(|c| c.max_retries = 1).await;
    f.server.set_persistent(Some(Fault::StallHeaders));
    let e = bounded(f.blob.read_at(0, 10))
        .await
        .expect_err("must time out");
    assert_eq!(e.kind(), ErrorKind::Timeout);
    let msg = e.to_string();
    assert!(msg.contains("timed out"), "{msg}");
    f.assert_names_everything(&msg);
}

#[tokio::test]
async fn truncated_bodies_are_never_data() {
    let f = fixture().await;
    f.server.push_faults(&[Fault::Truncate, Fault::ShortBody]);
    f.check_read(100, 20_000).await;
    assert_eq!(f.blob_gets(), 3);
    f.server.set_persistent(Some(Fault::ShortBody));
    let e = bounded(f.blob.read_at(100, 20_000))
        .await
        .expect_err("short body");
    f.assert_names_everything(&e.to_string());
    f.server.set_persistent(Some(Fault::Truncate));
    let e = bounded(f.blob.read_at(100, 20_000))
        .await
        .expect_err("truncated");
    f.assert_names_everything(&e.to_string());
}

#[tokio::test]
async fn wrong_content_range_is_never_data() {
    let f = fixture().await;
    f.server.push_faults(&[Fault::WrongContentRange]);
    f.check_read(500, 1000).await;
    assert_eq!(f.blob_gets(), 2);
    f.server.set_persistent(Some(Fault::WrongContentRange));
    let e = bounded(f.blob.read_at(500, 1000))
        .await
        .expect_err("wrong range");
    let msg = e.to_string();
    assert!(msg.contains("Content-Range"), "{msg}");
    assert_eq!(e.kind(), ErrorKind::Protocol);
    f.assert_names_everything(&msg);
}

#[tokio::test]
async fn full_body_200_is_verified_sliced_and_kept() {
    let f = fixture().await;
    f.server.push_faults(&[Fault::FullBody]);
    f.check_read(1234, 4321).await;
    assert_eq!(f.blob_gets(), 1);
    // The verified whole blob serves later reads without another download.
    f.check_read(0, 10).await;
    let got = bounded(f.blob.read_ranges(&[5..6, 100_000..100_010]))
        .await
        .expect("ranges");
    assert_eq!(&got[1][..], &f.data[100_000..100_010]);
    assert_eq!(f.blob_gets(), 1);
}

#[tokio::test]
async fn full_body_200_that_does_not_verify_is_never_data() {
    let f = fixture().await;
    f.server.set_persistent(Some(Fault::GarbageFullBody));
    let e = bounded(f.blob.read_at(1234, 4321))
        .await
        .expect_err("garbage");
    let msg = e.to_string();
    assert!(msg.contains("does not match the digest"), "{msg}");
    assert_eq!(e.kind(), ErrorKind::Protocol);
    f.assert_names_everything(&msg);
}

#[tokio::test]
async fn multi_range_uses_one_request() {
    let f = fixture().await;
    let ranges = [10..20u64, 5000..9000, 100_000..100_001, 15..30];
    let got = bounded(f.blob.read_ranges(&ranges))
        .await
        .expect("read_ranges");
    for (r, g) in ranges.iter().zip(&got) {
        assert_eq!(&g[..], &f.data[r.start as usize..r.end as usize]);
    }
    assert_eq!(f.blob_gets(), 1);
    let req = &f.server.requests(&f.server.blob_path())[0];
    assert_eq!(
        req.header("range"),
        Some("bytes=10-29,5000-8999,100000-100000")
    );
    assert!(f.blob.uses_multi_range());
}

async fn fallback_case(mode: MultiMode) {
    let f = fixture().await;
    f.server.set_multi(mode);
    let ranges = [0..10u64, 50_000..60_000, 200_000..200_100];
    let got = bounded(f.blob.read_ranges(&ranges))
        .await
        .expect("read_ranges");
    for (r, g) in ranges.iter().zip(&got) {
        assert_eq!(
            &g[..],
            &f.data[r.start as usize..r.end as usize],
            "{mode:?}"
        );
    }
    assert!(!f.blob.uses_multi_range(), "{mode:?}");
    assert_eq!(
        f.blob_gets(),
        4,
        "{mode:?}: one rejected multi-range + 3 single"
    );
    // Later batches go straight to single ranges.
    let got = bounded(f.blob.read_ranges(&[1..2, 3..4]))
        .await
        .expect("again");
    assert_eq!((got[0][0], got[1][0]), (f.data[1], f.data[3]));
    assert_eq!(f.blob_gets(), 6, "{mode:?}");
}

#[tokio::test]
async fn multi_range_falls_back_on_400() {
    fallback_case(MultiMode::Reject(400)).await;
}

#[tokio::test]
async fn multi_range_falls_back_on_501() {
    fallback_case(MultiMode::Reject(501)).await;
}

#[tokio::test]
async fn multi_range_falls_back_on_416() {
    fallback_case(MultiMode::Reject(416)).await;
}

#[tokio::test]
async fn multi_range_falls_back_on_whole_200() {
    fallback_case(MultiMode::Whole).await;
}

#[tokio::test]
async fn expired_token_is_refreshed_and_read_retried() {
    let f = fixture().await;
    f.server.state.require_token.store(true, SeqCst);
    f.check_read(0, 1000).await;
    assert_eq!(f.server.state.token_requests.load(SeqCst), 1);
    f.check_read(1000, 1000).await;
    assert_eq!(
        f.server.state.token_requests.load(SeqCst),
        1,
        "token reused"
    );
    // The server forgets the token mid-read: 401, new token, same read retried.
    f.server.state.token_gen.fetch_add(1, SeqCst);
    f.check_read(2000, 1000).await;
    assert_eq!(f.server.state.token_requests.load(SeqCst), 2);
    let token_req = &f.server.requests("/token")[0];
    let q = token_req.query();
    assert_eq!(
        q.get("scope").map(String::as_str),
        Some("repository:fault/repo:pull")
    );
    assert_eq!(q.get("service").map(String::as_str), Some("fault"));
    let last = f.server.requests(&f.server.blob_path());
    assert_eq!(
        last.last().and_then(|r| r.header("authorization")),
        Some("Bearer tok-2")
    );
}

#[tokio::test]
async fn redirect_target_is_cached_and_re_resolved_on_403() {
    let f = fixture().await;
    f.server.state.redirect.store(true, SeqCst);
    f.server.state.require_token.store(true, SeqCst);
    f.check_read(0, 100).await;
    f.check_read(100, 100).await;
    assert_eq!(
        f.blob_gets(),
        2,
        "401 + authorized request, then the cached target"
    );
    assert_eq!(f.server.requests("/storage/").len(), 2);
    for r in f.server.requests("/storage/") {
        assert_eq!(
            r.header("authorization"),
            None,
            "credentials must not go to storage"
        );
    }
    // The signed URL expires: 403 from storage, ask the registry again.
    f.server.state.sig.fetch_add(1, SeqCst);
    f.check_read(200, 100).await;
    assert_eq!(f.blob_gets(), 3);
    assert_eq!(f.server.requests("/storage/").len(), 4);
}

#[tokio::test]
async fn concurrency_per_host_is_bounded() {
    let f = fixture_with(|c| c.max_concurrent_requests_per_host = 2).await;
    f.server.state.delay_ms.store(30, SeqCst);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..10u64 {
        let b = f.blob.clone();
        set.spawn(async move { (i, b.read_at(i * 1000, 1000).await) });
    }
    while let Some(j) = set.join_next().await {
        let (i, r) = j.expect("join");
        let got = r.expect("read");
        assert_eq!(
            &got[..],
            &f.data[(i * 1000) as usize..(i * 1000 + 1000) as usize]
        );
    }
    let max = f.server.state.max_inflight.load(SeqCst);
    assert!(max <= 2, "max in flight {max}");
    assert!(f.server.state.connections.load(SeqCst) <= 2);
}

#[test]
fn blocking_reads_from_plain_threads() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let f = rt.block_on(fixture());
    let handle = rt.handle().clone();
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let b = f.blob.clone();
            let h = handle.clone();
            std::thread::spawn(move || b.read_at_blocking(&h, i * 100, 100))
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let got = t.join().expect("thread").expect("read");
        assert_eq!(&got[..], &f.data[i * 100..i * 100 + 100]);
    }
    let got = f
        .blob
        .read_ranges_blocking(&handle, &[0..1, 9..10])
        .expect("ranges");
    assert_eq!((got[0][0], got[1][0]), (f.data[0], f.data[9]));
    // From inside the runtime it is refused instead of deadlocking.
    let b = f.blob.clone();
    let r =
        rt.block_on(async move { b.read_at_blocking(&tokio::runtime::Handle::current(), 0, 1) });
    assert!(matches!(r, Err(lazysnap_registry::Error::Usage(_))));
}

#[tokio::test]
async fn mirror_is_tried_first_then_origin() {
    let f = fixture().await;
    let mirror = FaultServer::start(REPO, f.data.clone()).await;
    mirror.state.not_found.store(true, SeqCst);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::test_config(dir.path());
    support::registry::write_hosts_toml(
        &cfg.certs_dir,
        &f.server.host(),
        &format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  [host.\"http://{}\".header]\n    x-mirror-key = \"k1\"\n",
            f.server.host(),
            mirror.host(),
            mirror.host()
        ),
    );
    let client = RegistryClient::new(cfg);
    let reference =
        Reference::parse(&format!("{}/{REPO}:latest", f.server.host())).expect("reference");
    let blob = client
        .open_blob(
            &reference,
            &Digest::parse(&f.server.state.digest).expect("digest"),
        )
        .await
        .expect("open_blob falls back to origin");
    assert_eq!(blob.size(), SIZE as u64);
    let got = blob.read_at(10, 10).await.expect("read");
    assert_eq!(&got[..], &f.data[10..20]);
    let m = mirror.requests("/v2/");
    assert!(m.len() >= 2, "mirror asked first for HEAD and GET");
    assert_eq!(m[0].query().get("ns"), Some(&f.server.host()));
    assert_eq!(m[0].header("x-mirror-key"), Some("k1"));
    // Now the mirror works: it serves, the origin sees nothing new.
    mirror.state.not_found.store(false, SeqCst);
    let before = f.blob_gets();
    let got = blob.read_at(20, 10).await.expect("read via mirror");
    assert_eq!(&got[..], &f.data[20..30]);
    assert_eq!(f.blob_gets(), before);
}

#[tokio::test]
async fn identity_token_uses_the_oauth2_refresh_grant() {
    let f = fixture().await;
    f.server.state.require_token.store(true, SeqCst);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::test_config(dir.path());
    std::fs::write(
        cfg.docker_config.as_deref().expect("path"),
        format!(
            r#"{{"auths":{{"{}":{{"identitytoken":"my-refresh-token"}}}}}}"#,
            f.server.host()
        ),
    )
    .expect("docker config");
    let client = RegistryClient::new(cfg);
    let reference =
        Reference::parse(&format!("{}/{REPO}:latest", f.server.host())).expect("reference");
    let blob = client
        .open_blob(
            &reference,
            &Digest::parse(&f.server.state.digest).expect("digest"),
        )
        .await
        .expect("open");
    let got = blob.read_at(3, 3).await.expect("read");
    assert_eq!(&got[..], &f.data[3..6]);
    let t = &f.server.requests("/token")[0];
    assert_eq!(t.method, "POST");
    let body = String::from_utf8_lossy(&t.body).into_owned();
    assert!(body.contains("grant_type=refresh_token"), "{body}");
    assert!(body.contains("refresh_token=my-refresh-token"), "{body}");
    assert!(
        body.contains("scope=repository%3Afault%2Frepo%3Apull"),
        "{body}"
    );
}

#[tokio::test]
async fn failing_mirror_is_skipped_for_a_while() {
    let f = fixture().await;
    let mirror = FaultServer::start(REPO, f.data.clone()).await;
    mirror.set_persistent(Some(Fault::Status(503)));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::test_config(dir.path());
    support::registry::write_hosts_toml(
        &cfg.certs_dir,
        &f.server.host(),
        &format!("[host.\"http://{}\"]\n", mirror.host()),
    );
    let client = RegistryClient::new(cfg);
    let reference =
        Reference::parse(&format!("{}/{REPO}:latest", f.server.host())).expect("reference");
    let desc = Descriptor {
        media_type: String::new(),
        digest: Digest::parse(&f.server.state.digest).expect("digest"),
        size: f.data.len() as u64,
        annotations: Default::default(),
        urls: vec![],
        platform: None,
    };
    let blob = client.blob(&reference, &desc).expect("blob");
    let got = bounded(blob.read_at(0, 10)).await.expect("origin serves");
    assert_eq!(&got[..], &f.data[..10]);
    let mirror_gets = mirror.requests(&mirror.blob_path()).len();
    assert_eq!(mirror_gets, 4, "1 attempt + 3 retries at the mirror");
    let got = bounded(blob.read_at(10, 10)).await.expect("origin again");
    assert_eq!(&got[..], &f.data[10..20]);
    assert_eq!(
        mirror.requests(&mirror.blob_path()).len(),
        mirror_gets,
        "mirror skipped"
    );
}
