//! Pushing to a real registry (Debian's docker-registry, distribution 2.8): blob
//! uploads in one PUT and in PATCH chunks, existence checks, cross-repository mounts,
//! manifests and indexes; token auth with push scopes; a read-only registry and a
//! wrong digest refused with the registry's own words.

mod support;

use std::sync::atomic::Ordering::SeqCst;

use bytes::Bytes;
use lazysnap_registry::{BlobSource, Digest, ErrorKind, PushOutcome, Reference, RegistryClient};
use support::registry::{self as reg, Auth, Registry};

fn parse(s: &str) -> Reference {
    Reference::parse(s).expect("reference")
}

/// Pushes a one-layer image whose layer is `layer`, by way of `client`: the layer from
/// a file (chunked), the config from memory, the manifest by tag.
async fn push_small_image(
    client: &RegistryClient,
    image: &Reference,
    layer_file: &std::path::Path,
    layer: &[u8],
) -> (Digest, Vec<u8>) {
    let layer_digest = Digest::sha256_of(layer);
    let out = client
        .push_blob(
            image,
            &layer_digest,
            layer.len() as u64,
            &BlobSource::File(layer_file.to_path_buf()),
            None,
        )
        .await
        .expect("push layer");
    assert_eq!(out, PushOutcome::Uploaded);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = Digest::sha256_of(config);
    client
        .push_blob(
            image,
            &config_digest,
            config.len() as u64,
            &BlobSource::Bytes(Bytes::from_static(config)),
            None,
        )
        .await
        .expect("push config");
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{}}}]}}"#,
        reg::OCI_MANIFEST,
        config.len(),
        layer.len()
    )
    .into_bytes();
    let digest = client
        .push_manifest(image, reg::OCI_MANIFEST, Bytes::from(manifest.clone()))
        .await
        .expect("push manifest");
    assert_eq!(digest, Digest::sha256_of(&manifest));
    (digest, manifest)
}

#[tokio::test]
async fn push_to_plain_registry() {
    if !reg::available("push_to_plain_registry") {
        return;
    }
    support::init_tracing();
    let registry = Registry::start(Auth::None, None);
    let host = registry.host();
    let dir = tempfile::tempdir().expect("tempdir");
    let client = RegistryClient::new(support::test_config(dir.path()));

    // a 3.5 MiB layer: one PUT, and again in 1 MiB PATCH chunks into another repository
    let layer = support::pattern(3 << 20 | 512 << 10, 7);
    let layer_file = dir.path().join("layer");
    std::fs::write(&layer_file, &layer).expect("write layer");
    let image = parse(&format!("{host}/push/app:v1"));
    let (manifest_digest, manifest) = push_small_image(&client, &image, &layer_file, &layer).await;
    let layer_digest = Digest::sha256_of(&layer);
    let chunked = parse(&format!("{host}/push/chunked:v1"));
    client
        .upload_blob(
            &chunked,
            &layer_digest,
            layer.len() as u64,
            &BlobSource::File(layer_file.clone()),
            Some(1 << 20),
        )
        .await
        .expect("chunked upload");
    assert_eq!(
        client
            .blob_exists(&chunked, &layer_digest)
            .await
            .expect("HEAD"),
        Some(layer.len() as u64)
    );
    // what was pushed reads back the same, by ranges too
    let img = client.resolve(&image).await.expect("resolve pushed image");
    assert_eq!(img.manifest_digest, manifest_digest);
    assert_eq!(&img.manifest[..], &manifest[..]);
    let blob = client.blob(&img.reference, &img.layers[0]).expect("blob");
    let got = blob.read_at(0, layer.len()).await.expect("read layer");
    assert_eq!(&got[..], &layer[..]);
    let doc = client.fetch_manifest(&image).await.expect("fetch manifest");
    assert_eq!(doc.media_type, reg::OCI_MANIFEST);
    assert_eq!(doc.digest, manifest_digest);

    // pushing again finds the blob; another repository mounts it
    let again = client
        .push_blob(
            &image,
            &layer_digest,
            layer.len() as u64,
            &BlobSource::File(layer_file.clone()),
            None,
        )
        .await
        .expect("push again");
    assert_eq!(again, PushOutcome::Exists);
    let other = parse(&format!("{host}/other/app:v1"));
    let mounted = client
        .push_blob(
            &other,
            &layer_digest,
            layer.len() as u64,
            &BlobSource::File(dir.path().join("absent")),
            Some(&image),
        )
        .await
        .expect("mount");
    assert_eq!(mounted, PushOutcome::Mounted);
    // a mount from a repository without the blob is declined, and nothing is mounted
    let unknown = Digest::sha256_of(b"nowhere");
    assert!(
        !client
            .mount_blob(&other, &unknown, "push/app")
            .await
            .expect("mount of an unknown blob")
    );
    assert_eq!(
        client.blob_exists(&other, &unknown).await.expect("HEAD"),
        None
    );

    // an index by tag over the pushed manifest
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{manifest_digest}","size":{},"platform":{{"architecture":"{}","os":"linux"}}}}]}}"#,
        reg::OCI_INDEX,
        reg::OCI_MANIFEST,
        manifest.len(),
        reg::host_arch()
    );
    let index_ref = parse(&format!("{host}/push/app:v1-index"));
    let index_digest = client
        .push_manifest(&index_ref, reg::OCI_INDEX, Bytes::from(index.clone()))
        .await
        .expect("push index");
    let img = client.resolve(&index_ref).await.expect("resolve index");
    assert_eq!(img.index_digest, Some(index_digest));
    assert_eq!(img.manifest_digest, manifest_digest);

    // a wrong digest is refused with the registry's reason, and nothing is stored
    let wrong = Digest::sha256_of(b"something else");
    let e = client
        .upload_blob(
            &image,
            &wrong,
            layer.len() as u64,
            &BlobSource::File(layer_file.clone()),
            None,
        )
        .await
        .expect_err("digest mismatch");
    assert!(e.to_string().contains("DIGEST_INVALID"), "{e}");
    assert!(e.to_string().contains(wrong.as_str()), "{e}");
    assert_eq!(
        client.blob_exists(&image, &wrong).await.expect("HEAD"),
        None
    );
    // a manifest naming a blob the repository lacks is refused too
    let bad = manifest
        .iter()
        .map(|&b| b as char)
        .collect::<String>()
        .replace(layer_digest.as_str(), unknown.as_str());
    let e = client
        .push_manifest(
            &parse(&format!("{host}/push/app:bad")),
            reg::OCI_MANIFEST,
            Bytes::from(bad),
        )
        .await
        .expect_err("manifest with an unknown blob");
    assert!(e.to_string().contains("MANIFEST_BLOB_UNKNOWN"), "{e}");
    let e = client
        .fetch_manifest(&parse(&format!("{host}/push/app:bad")))
        .await
        .expect_err("no tag");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[tokio::test]
async fn push_with_token_auth_asks_for_push_scopes() {
    if !reg::available("push_with_token_auth_asks_for_push_scopes") {
        return;
    }
    support::init_tracing();
    let (tokens, registry) = support::token::TokenServer::with_registry("bob", "builder").await;
    let host = registry.host();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::test_config(dir.path());
    reg::write_docker_config(
        cfg.docker_config.as_deref().expect("path"),
        &host,
        "bob",
        "builder",
    );
    let client = RegistryClient::new(cfg);
    let layer = support::pattern(300_000, 3);
    let layer_file = dir.path().join("layer");
    std::fs::write(&layer_file, &layer).expect("write layer");
    let image = parse(&format!("{host}/tok/app:v1"));
    push_small_image(&client, &image, &layer_file, &layer).await;
    let other = parse(&format!("{host}/tok/copy:v1"));
    let out = client
        .push_blob(
            &other,
            &Digest::sha256_of(&layer),
            layer.len() as u64,
            &BlobSource::File(layer_file),
            Some(&image),
        )
        .await
        .expect("mount with token");
    assert_eq!(out, PushOutcome::Mounted);
    let scopes = tokens.scopes.lock().expect("lock").clone();
    assert!(
        scopes.contains(&"repository:tok/app:pull,push".to_string()),
        "{scopes:?}"
    );
    assert!(
        scopes.contains(&"repository:tok/copy:pull,push repository:tok/app:pull".to_string()),
        "{scopes:?}"
    );
    // one token per scope, not one per request
    assert!(tokens.requests.load(SeqCst) <= 3, "{scopes:?}");
}

#[tokio::test]
async fn read_only_registry_refuses_with_a_clear_error() {
    if !reg::available("read_only_registry_refuses_with_a_clear_error") {
        return;
    }
    support::init_tracing();
    let registry = Registry::start_read_only();
    let dir = tempfile::tempdir().expect("tempdir");
    let client = RegistryClient::new(support::test_config(dir.path()));
    let image = parse(&format!("{}/ro/app:v1", registry.host()));
    let data = Bytes::from_static(b"some layer");
    let e = client
        .push_blob(
            &image,
            &Digest::sha256_of(&data),
            data.len() as u64,
            &BlobSource::Bytes(data),
            None,
        )
        .await
        .expect_err("read-only");
    let msg = e.to_string();
    assert!(msg.contains("405"), "{msg}");
    assert!(msg.contains("ro/app"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    let e = client
        .push_manifest(&image, reg::OCI_MANIFEST, Bytes::from_static(b"{}"))
        .await
        .expect_err("read-only manifest");
    assert!(e.to_string().contains("manifest v1"), "{e}");
}
