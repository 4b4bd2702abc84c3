//! Against a real registry process (Debian's docker-registry, distribution 2.8):
//! plain HTTP, TLS with a test CA plus htpasswd basic auth, and token auth.

mod support;

use std::sync::atomic::Ordering::SeqCst;

use lazysnap_registry::{Digest, ErrorKind, Platform, Reference, RegistryClient};
use support::registry::{self as reg, Auth, Pusher, Registry};

fn parse(s: &str) -> Reference {
    Reference::parse(s).expect("reference")
}

/// Resolves the pushed image by tag, by index, and reads its layers.
async fn check_image(client: &RegistryClient, host: &str, repo: &str, pushed: &reg::Pushed) {
    // By manifest tag.
    let img = client
        .resolve(&parse(&format!("{host}/{repo}:v1")))
        .await
        .expect("resolve tag");
    assert_eq!(img.manifest_digest.as_str(), pushed.manifest_digest);
    assert_eq!(img.index_digest, None);
    assert_eq!(&img.manifest[..], &pushed.manifest[..]);
    assert_eq!(&img.config[..], &pushed.config[..]);
    assert_eq!(
        img.annotations.get("org.example").map(String::as_str),
        Some("yes")
    );
    assert_eq!(img.layers.len(), pushed.layers.len());
    for (i, l) in img.layers.iter().enumerate() {
        assert_eq!(l.digest.as_str(), pushed.layer_digests[i]);
        assert_eq!(l.size, pushed.layers[i].len() as u64);
        assert_eq!(l.media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
        assert_eq!(
            l.annotations
                .get("containerd.io/snapshot/stargz/toc.digest")
                .cloned(),
            Some(format!("sha256:{:064x}", i + 1))
        );
    }
    // Through the index: the host platform's entry, not the first one.
    let img2 = client
        .resolve(&parse(&format!("{host}/{repo}:v1-index")))
        .await
        .expect("resolve index");
    assert_eq!(img2.manifest_digest.as_str(), pushed.manifest_digest);
    assert_eq!(
        img2.index_digest.as_ref().map(|d| d.as_str()),
        Some(pushed.index_digest.as_str())
    );
    assert_eq!(
        img2.reference.digest().map(|d| d.as_str()),
        Some(pushed.manifest_digest.as_str())
    );
    // By digest.
    let img3 = client
        .resolve(&parse(&format!("{host}/{repo}@{}", pushed.manifest_digest)))
        .await
        .expect("resolve digest");
    assert_eq!(img3.layers, img.layers);
    // A platform the index lacks.
    let e = client
        .resolve_for(
            &parse(&format!("{host}/{repo}:v1-index")),
            &Platform {
                architecture: "riscv64".into(),
                os: "linux".into(),
                variant: None,
                os_version: None,
            },
        )
        .await
        .expect_err("no such platform");
    assert!(e.to_string().contains("linux/riscv64"), "{e}");
    assert!(e.to_string().contains("linux/s390x"), "{e}");

    // Ranged reads of each layer.
    for (i, desc) in img.layers.iter().enumerate() {
        let data = &pushed.layers[i];
        let blob = client.blob(&img.reference, desc).expect("blob");
        assert_eq!(blob.size(), data.len() as u64);
        for (off, len) in [
            (0usize, 1usize),
            (0, data.len()),
            (4093, 8192),
            (data.len() - 7, 7),
        ] {
            let got = blob.read_at(off as u64, len).await.expect("read_at");
            assert_eq!(&got[..], &data[off..off + len], "layer {i} {off}+{len}");
        }
        let ranges = [3..17u64, 70_000..70_100, 1000..1001, 200_000..262_144];
        let got = blob.read_ranges(&ranges).await.expect("read_ranges");
        for (r, g) in ranges.iter().zip(&got) {
            assert_eq!(&g[..], &data[r.start as usize..r.end as usize]);
        }
        assert!(
            blob.uses_multi_range(),
            "docker-registry answers multipart/byteranges"
        );
    }
    assert!(client.stats().bytes > 0);
}

#[tokio::test]
async fn plain_http_registry() {
    if !reg::available("plain_http_registry") {
        return;
    }
    support::init_tracing();
    let registry = Registry::start(Auth::None, None);
    let pusher = Pusher::new(registry.base(), None, None);
    let layers = vec![support::pattern(300_000, 1), support::pattern(262_144, 2)];
    let pushed = reg::push_image(&pusher, "team/app", "v1", layers).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let client = RegistryClient::new(support::test_config(dir.path()));
    check_image(&client, &registry.host(), "team/app", &pushed).await;

    // A Docker schema 2 manifest list pointing at a Docker schema 2 manifest.
    let docker_manifest = String::from_utf8(pushed.manifest.clone())
        .expect("utf8")
        .replace(
            reg::OCI_MANIFEST,
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .replace(
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.docker.container.image.v1+json",
        )
        .replace(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        );
    let dm_digest = pusher
        .manifest(
            "team/app",
            "docker",
            "application/vnd.docker.distribution.manifest.v2+json",
            docker_manifest.as_bytes(),
        )
        .await;
    let list = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"{dm_digest}","size":{},"platform":{{"architecture":"{}","os":"linux"}}}}]}}"#,
        docker_manifest.len(),
        reg::host_arch()
    );
    let list_digest = pusher
        .manifest(
            "team/app",
            "docker-list",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            list.as_bytes(),
        )
        .await;
    let img = client
        .resolve(&parse(&format!("{}/team/app:docker-list", registry.host())))
        .await
        .expect("docker list");
    assert_eq!(img.manifest_digest.as_str(), dm_digest);
    assert_eq!(img.index_digest.map(|d| d.to_string()), Some(list_digest));
    assert_eq!(
        img.media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        img.layers[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    assert_eq!(img.layers[1].annotations.len(), 2);

    // open_blob learns the size from the registry.
    let r = parse(&format!("{}/team/app:v1", registry.host()));
    let b = client
        .open_blob(
            &r,
            &Digest::parse(&pushed.layer_digests[1]).expect("digest"),
        )
        .await
        .expect("open_blob");
    assert_eq!(b.size(), 262_144);

    // Errors name what was missing.
    let e = client
        .resolve(&parse(&format!("{}/team/app:nope", registry.host())))
        .await
        .expect_err("missing tag");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let msg = e.to_string();
    assert!(msg.contains("repository team/app manifest nope"), "{msg}");
    let missing = Digest::sha256_of(b"not pushed");
    let e = client
        .open_blob(&r, &missing)
        .await
        .expect_err("missing blob");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains(missing.as_str()), "{e}");
}

#[tokio::test]
async fn tls_registry_with_basic_auth() {
    if !reg::available("tls_registry_with_basic_auth") {
        return;
    }
    support::init_tracing();
    let (ca_pem, tls) = reg::ca_and_server_cert();
    let registry = Registry::start(
        Auth::Htpasswd {
            user: "alice".into(),
            password: "wonderland".into(),
        },
        Some(tls),
    );
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "alice:wonderland"
        )
    );
    let pusher = Pusher::new(registry.base(), Some(&ca_pem), Some(basic));
    let pushed = reg::push_image(
        &pusher,
        "secure/app",
        "v1",
        vec![support::pattern(270_000, 3)],
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::test_config(dir.path());
    let host = registry.host();

    // Loopback defaults to plain HTTP, so without hosts.toml the TLS registry fails.
    let client = RegistryClient::new(cfg.clone());
    let e = client
        .resolve(&parse(&format!("{host}/secure/app:v1")))
        .await
        .expect_err("http to https");
    eprintln!("expected error: {e}");
    assert!(e.to_string().contains(&host), "{e}");

    // https server but CA not trusted: verification on by default.
    reg::write_hosts_toml(
        &cfg.certs_dir,
        &host,
        &format!("server = \"https://{host}\"\n"),
    );
    let client = RegistryClient::new(cfg.clone());
    let e = client
        .resolve(&parse(&format!("{host}/secure/app:v1")))
        .await
        .expect_err("untrusted CA");
    eprintln!("expected error: {e}");
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");

    // CA configured, no credentials: 401 becomes a clear error.
    std::fs::write(cfg.certs_dir.join(&host).join("ca.pem"), &ca_pem).expect("ca");
    reg::write_hosts_toml(
        &cfg.certs_dir,
        &host,
        &format!("server = \"https://{host}\"\nca = \"ca.pem\"\n"),
    );
    let client = RegistryClient::new(cfg.clone());
    let e = client
        .resolve(&parse(&format!("{host}/secure/app:v1")))
        .await
        .expect_err("no creds");
    eprintln!("expected error: {e}");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");

    // Wrong password: refused, and the password is not in the message.
    let docker_config = cfg.docker_config.clone().expect("docker config path");
    reg::write_docker_config(&docker_config, &host, "alice", "wrong-password");
    let client = RegistryClient::new(cfg.clone());
    let e = client
        .resolve(&parse(&format!("{host}/secure/app:v1")))
        .await
        .expect_err("bad creds");
    eprintln!("expected error: {e}");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(!e.to_string().contains("wrong-password"));

    // Right credentials.
    reg::write_docker_config(&docker_config, &host, "alice", "wonderland");
    let client = RegistryClient::new(cfg.clone());
    check_image(&client, &host, "secure/app", &pushed).await;

    // skip_verify accepts the certificate without the CA.
    reg::write_hosts_toml(
        &cfg.certs_dir,
        &host,
        &format!("server = \"https://{host}\"\nskip_verify = true\n"),
    );
    std::fs::remove_file(cfg.certs_dir.join(&host).join("ca.pem")).expect("rm ca");
    let client = RegistryClient::new(cfg);
    let img = client
        .resolve(&parse(&format!("{host}/secure/app:v1")))
        .await
        .expect("skip_verify");
    assert_eq!(img.manifest_digest.as_str(), pushed.manifest_digest);
}

#[tokio::test]
async fn token_auth_registry() {
    if !reg::available("token_auth_registry") {
        return;
    }
    support::init_tracing();
    let (tokens, registry) = support::token::TokenServer::with_registry("bob", "builder").await;
    let push_token = tokens.mint("repository:tok/app:pull,push");
    let pusher = Pusher::new(registry.base(), None, Some(format!("Bearer {push_token}")));
    let pushed =
        reg::push_image(&pusher, "tok/app", "v1", vec![support::pattern(280_000, 4)]).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::test_config(dir.path());
    let host = registry.host();
    // Anonymous: the token service refuses, the error says so.
    let client = RegistryClient::new(cfg.clone());
    let e = client
        .resolve(&parse(&format!("{host}/tok/app:v1")))
        .await
        .expect_err("anonymous");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(e.to_string().contains("token service"), "{e}");

    reg::write_docker_config(
        cfg.docker_config.as_deref().expect("path"),
        &host,
        "bob",
        "builder",
    );
    let before = tokens.requests.load(SeqCst);
    let client = RegistryClient::new(cfg);
    check_image(&client, &host, "tok/app", &pushed).await;
    let used = tokens.requests.load(SeqCst) - before;
    assert_eq!(
        used, 1,
        "one token serves manifests and blobs of the repository"
    );
    let scopes = tokens.scopes.lock().expect("lock").clone();
    assert!(
        scopes.iter().all(|s| s == "repository:tok/app:pull"),
        "{scopes:?}"
    );
}
