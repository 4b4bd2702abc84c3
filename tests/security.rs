//! Security properties of the real daemon (`lazysnap serve`):
//!
//! - its gRPC and status sockets are 0660 and root-owned;
//! - registry passwords, Basic credentials and bearer tokens never appear in its logs
//!   (every crate at trace level) or in the CLI's output and errors, against real docker-registry instances with htpasswd
//!   and with token auth (the registry crate's test token service);
//! - TLS verification cannot be switched off in the configuration, only per host in
//!   `hosts.toml`: a registry with an untrusted certificate is refused until its
//!   `hosts.toml` says `skip_verify` or names its CA;
//! - the FUSE layer never reaches outside the layer: symlinks are served as symlinks
//!   and never followed, mounts are read-only, nosuid and nodev, and a layer whose
//!   TOC names `..` is not mounted.

mod common;
#[path = "../registry/tests/support/mod.rs"]
mod regsupport;
mod support;

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::Command;

use base64::Engine as _;
use common::lazy::assert_symlink_not_followed;
use common::registry::{Layer, image_json, sha256_hex};
use common::remote::random_files_tar;
use containerd_client::tonic::Code;
use lazysnap::format::Format;
use lazysnap::format::writer::WriteOptions;
use regsupport::registry::{Auth, Pusher, Registry as AuthRegistry};
use support::snapshots::{self as api, code};
use support::{Daemon, require};

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

fn estargz(tar: &[u8]) -> Layer {
    Layer::convert(
        tar,
        &WriteOptions {
            format: Format::Estargz,
            chunk_size: 16 << 10,
            level: Some(1),
            ..WriteOptions::default()
        },
    )
}

/// Pushes a one-layer image with the registry API through `p`.
async fn push(p: &Pusher, repo: &str, layer: &Layer) {
    let (config, manifest) = image_json(std::slice::from_ref(layer));
    p.blob(repo, config.as_bytes()).await;
    p.blob(repo, &layer.blob).await;
    p.manifest(
        repo,
        "t",
        "application/vnd.oci.image.manifest.v1+json",
        manifest.as_bytes(),
    )
    .await;
}

/// The remote-snapshot labels for `layer` of `host/repo:t`, committing as `target`.
fn labels(host: &str, repo: &str, layer: &Layer, target: &str) -> HashMap<String, String> {
    let mut l: HashMap<String, String> = layer.annotations.clone().into_iter().collect();
    l.insert(api::REF.into(), target.into());
    l.insert(
        "containerd.io/snapshot/remote/stargz.reference".into(),
        format!("{host}/{repo}:t"),
    );
    l.insert(
        "containerd.io/snapshot/remote/stargz.digest".into(),
        format!("sha256:{}", sha256_hex(&layer.blob)),
    );
    l
}

/// One Prepare on the daemon's socket.
fn prepare(
    d: &Daemon,
    key: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<containerd_client::types::Mount>, containerd_client::tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = api::connect(&d.socket).await;
        api::prepare(&mut c, key, "", labels).await
    })
}

/// Where the daemon mounted the layer `layer`.
fn mount_of(d: &Daemon, layer: &Layer) -> std::path::PathBuf {
    let digest = format!("sha256:{}", sha256_hex(&layer.blob));
    d.remote_mounts()
        .into_iter()
        .find(|(dg, _)| *dg == digest)
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("{digest} not mounted:\n{}", d.log()))
}

/// A runtime for the registry support's async pushers and token service, and a
/// short work directory (unix socket paths are limited to 107 bytes).
fn setup() -> (tokio::runtime::Runtime, tempfile::TempDir) {
    regsupport::install_crypto();
    let work = tempfile::Builder::new()
        .prefix("lzsec")
        .tempdir_in("/tmp")
        .unwrap();
    (tokio::runtime::Runtime::new().unwrap(), work)
}

#[test]
fn sockets_are_0660_and_root_owned() {
    if !require(&["/bin/mount"], "socket permissions") {
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("lzsec")
        .tempdir_in("/tmp")
        .unwrap();
    let d = Daemon::start(&work.path().join("d"), "");
    for s in [d.socket.clone(), d.socket.with_extension("status.sock")] {
        let md = std::fs::symlink_metadata(&s).unwrap();
        assert!(md.file_type().is_socket(), "{}", s.display());
        assert_eq!(md.permissions().mode() & 0o7777, 0o660, "{}", s.display());
        assert_eq!((md.uid(), md.gid()), (0, 0), "{}", s.display());
    }
    // the chunk cache holds image files whatever their modes: root only
    for dir in [d.root.clone(), d.root.join("cache")] {
        let md = std::fs::metadata(&dir).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o700, "{}", dir.display());
    }
}

#[test]
fn registry_secrets_never_reach_logs_or_errors() {
    if !require(&["/usr/bin/docker-registry"], "secrets in logs") {
        return;
    }
    let (rt, work) = setup();
    let (user, password) = ("alice", "Pa55-word-7f3a9c1e");
    let (tuser, tpassword) = ("bob", "t0ken-Pa55-d41c8e2b");
    let b64 =
        |u: &str, p: &str| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
    let layer = estargz(&random_files_tar(31, 4, 100 << 10).0);
    let files = random_files_tar(31, 4, 100 << 10).1;

    // htpasswd, Basic auth
    let basic = AuthRegistry::start(
        Auth::Htpasswd {
            user: user.into(),
            password: password.into(),
        },
        None,
    );
    let p = Pusher::new(
        basic.base(),
        None,
        Some(format!("Basic {}", b64(user, password))),
    );
    rt.block_on(push(&p, "sec/basic", &layer));
    // token auth
    let tokens = rt.block_on(regsupport::token::TokenServer::start(tuser, tpassword));
    let token = AuthRegistry::start(
        Auth::Token {
            realm: tokens.realm(),
            service: regsupport::token::SERVICE.into(),
            issuer: regsupport::token::ISSUER.into(),
            root_cert_pem: tokens.cert_pem.clone(),
        },
        None,
    );
    let push_token = tokens.mint("repository:sec/token:pull,push");
    let p = Pusher::new(token.base(), None, Some(format!("Bearer {push_token}")));
    rt.block_on(push(&p, "sec/token", &layer));

    let docker = |name: &str, pw: &str, tpw: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = serde_json::json!({"auths": {
            basic.host(): {"auth": b64(user, pw)},
            token.host(): {"auth": b64(tuser, tpw)},
        }});
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        dir
    };
    let good = docker("good", password, tpassword);
    let bad = docker("bad", "wrong-Pa55-0b5e", "wrong-t0ken-6a2f");
    let secrets = [
        password.to_string(),
        b64(user, password),
        tpassword.to_string(),
        b64(tuser, tpassword),
        "wrong-Pa55-0b5e".into(),
        "wrong-t0ken-6a2f".into(),
        b64(user, "wrong-Pa55-0b5e"),
        b64(tuser, "wrong-t0ken-6a2f"),
        push_token.clone(),
        // every JWT starts with the base64 of `{"`
        "eyJ".into(),
    ];
    let mut texts: Vec<(String, String)> = Vec::new();

    // the daemon with trace logs of every crate: lazy mounts from both registries
    let d = Daemon::start_logging(
        &work.path().join("d"),
        &format!(
            "[layer]\nprefetch = false\nbackground_fetch = false\nsmall_layer_bytes = 0\n\
             [registry]\ndocker_config = \"{}\"\n",
            good.join("config.json").display()
        ),
        "trace",
    );
    for (i, (reg, repo)) in [(&basic, "sec/basic"), (&token, "sec/token")]
        .iter()
        .enumerate()
    {
        let r = prepare(
            &d,
            &format!("k{i}"),
            labels(&reg.host(), repo, &layer, &format!("t{i}")),
        );
        assert_eq!(code(r), Code::AlreadyExists, "{repo}: lazy\n{}", d.log());
    }
    let mp = d.remote_mounts();
    assert_eq!(mp.len(), 2);
    for (_, dir) in &mp {
        for (path, want) in &files {
            assert_eq!(std::fs::read(dir.join(path)).unwrap(), *want, "{path}");
        }
    }
    // a layer the registry does not have: an error path
    let mut missing = labels(&basic.host(), "sec/basic", &layer, "t9");
    missing.insert(
        "containerd.io/snapshot/remote/stargz.digest".into(),
        format!("sha256:{}", "0".repeat(64)),
    );
    assert!(
        prepare(&d, "k9", missing).is_ok(),
        "falls back to an ordinary Prepare"
    );

    // the CLI, with the right and the wrong credentials, trace logs on
    for (dir, ok) in [(&good, true), (&bad, false)] {
        for reg in [&basic, &token] {
            let repo = if reg.port == basic.port {
                "sec/basic"
            } else {
                "sec/token"
            };
            let out = Command::new(BIN)
                .args([
                    "layer",
                    "ls",
                    &format!("{}/{repo}:t", reg.host()),
                    "--layer",
                    "0",
                ])
                .env("DOCKER_CONFIG", dir)
                .env("RUST_LOG", "trace")
                .output()
                .unwrap();
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(out.status.success(), ok, "{repo} ok={ok}: {all}");
            if !ok {
                assert!(all.contains("401") || all.contains("credentials"), "{all}");
            }
            texts.push((format!("layer ls {repo} ok={ok}"), all));
        }
    }
    let log = d.log();
    assert!(log.contains("remote-snapshot-prepared=true"), "{log}");
    assert!(log.contains("TRACE"), "trace logs are on");
    texts.push(("daemon log".into(), log));
    for (what, text) in &texts {
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "{what} contains the secret {s:?}:\n{text}"
            );
        }
    }
}

#[test]
fn tls_verification_is_only_ever_disabled_per_host() {
    // no global switch: every spelling is an unknown key
    for bad in [
        "insecure_skip_verify = true",
        "skip_verify = true",
        "tls_verify = false",
        "insecure = true",
        "[registry]\ninsecure_skip_verify = true",
        "[registry]\nskip_verify = true",
        "[registry]\ntls_verify = false",
        "[registry]\ninsecure = true",
        "[registry]\nplain_http = true",
    ] {
        let e = lazysnap::service::Config::parse(bad, "config.toml").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{bad}: {e}");
    }
    let keys = toml::to_string(&lazysnap_registry::RegistryConfig::default()).unwrap();
    for k in ["verify", "insecure", "tls", "skip", "plain"] {
        assert!(
            !keys.contains(k),
            "the registry settings have a {k} key:\n{keys}"
        );
    }
    if !require(&["/usr/bin/docker-registry"], "TLS per host") {
        return;
    }
    let (rt, work) = setup();
    let (ca_pem, tls) = regsupport::registry::ca_and_server_cert();
    let reg = AuthRegistry::start(Auth::None, Some(tls));
    let layer = estargz(&random_files_tar(32, 2, 50 << 10).0);
    rt.block_on(push(
        &Pusher::new(reg.base(), Some(&ca_pem), None),
        "tls/app",
        &layer,
    ));
    let host = reg.host();
    let certs = work.path().join("certs.d");
    let hosts = |extra: &str| {
        regsupport::registry::write_hosts_toml(
            &certs,
            &host,
            &format!("server = \"https://{host}\"\n{extra}"),
        );
    };
    hosts("");
    let mut d = Daemon::start(
        &work.path().join("d"),
        &format!(
            "[layer]\nprefetch = false\nbackground_fetch = false\n[registry]\ncerts_dir = \"{}\"\n",
            certs.display()
        ),
    );
    // verification on: an ordinary Prepare, the certificate named as the reason
    let r = prepare(&d, "k1", labels(&host, "tls/app", &layer, "t1"));
    assert!(r.is_ok(), "not lazy without trust: {r:?}");
    let log = d.log();
    assert!(
        log.contains("remote-snapshot-prepared=false") && log.contains("certificate"),
        "{log}"
    );
    // skip_verify for this host only
    hosts("skip_verify = true\n");
    d.restart();
    let r = prepare(&d, "k2", labels(&host, "tls/app", &layer, "t2"));
    assert_eq!(code(r), Code::AlreadyExists, "{}", d.log());
    // or its CA
    std::fs::write(certs.join(&host).join("ca.pem"), &ca_pem).unwrap();
    hosts("ca = \"ca.pem\"\n");
    d.restart();
    let r = prepare(&d, "k3", labels(&host, "tls/app", &layer, "t3"));
    assert_eq!(code(r), Code::AlreadyExists, "{}", d.log());
    assert_eq!(d.remote_mounts().len(), 2);
}

#[test]
fn fuse_never_reaches_outside_the_layer() {
    if !require(&["/usr/bin/docker-registry"], "FUSE confinement") {
        return;
    }
    let reg = common::registry::Registry::start();
    let work = tempfile::Builder::new()
        .prefix("lzsec")
        .tempdir_in("/tmp")
        .unwrap();
    // symlinks pointing out of the layer
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(5);
    b.append_data(&mut h, "f", &b"layer"[..]).unwrap();
    for (name, target) in [
        ("up", "../../../../../../../etc/passwd"),
        ("abs", "/etc/passwd"),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, name, target).unwrap();
    }
    let links = estargz(&b.into_inner().unwrap());
    let links_ref = reg.push_image("sec/links", "t", std::slice::from_ref(&links));
    // a TOC naming ../escape
    let json = r#"{"version":1,"entries":[{"name":"../escape","type":"dir"}]}"#;
    let blob = common::estargz_with_toc(b"", json);
    let dotdot = Layer {
        annotations: [(
            lazysnap::format::ANNOTATION_TOC_DIGEST.to_string(),
            lazysnap::format::Digest::of(json.as_bytes()).to_string(),
        )]
        .into(),
        diff_id: format!("sha256:{}", sha256_hex(b"")),
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        blob,
    };
    reg.push_image("sec/dotdot", "t", std::slice::from_ref(&dotdot));
    let host = reg.host();
    assert!(links_ref.starts_with(&host));
    let d = Daemon::start(
        &work.path().join("d"),
        "[layer]\nbackground_fetch = false\n",
    );

    let r = prepare(&d, "k1", labels(&host, "sec/links", &links, "t1"));
    assert_eq!(code(r), Code::AlreadyExists, "{}", d.log());
    let mp = mount_of(&d, &links);
    let mut names: Vec<String> = std::fs::read_dir(&mp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !common::LANDMARKS.contains(&format!("/{n}").as_str()))
        .collect();
    names.sort();
    assert_eq!(names, ["abs", "f", "up"], "only the layer's entries");
    assert_symlink_not_followed(&mp.join("up"), "../../../../../../../etc/passwd");
    assert_symlink_not_followed(&mp.join("abs"), "/etc/passwd");
    assert_eq!(std::fs::read(mp.join("f")).unwrap(), b"layer");
    // read-only, nosuid, nodev
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == mp.to_str())
        .expect("mountinfo line");
    let opts: Vec<&str> = line.split(' ').nth(5).unwrap().split(',').collect();
    for o in ["ro", "nosuid", "nodev"] {
        assert!(opts.contains(&o), "{o} missing: {line}");
    }
    let e = std::fs::write(mp.join("new"), b"x").expect_err("read-only");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

    // `..` in the TOC: never mounted, an ordinary Prepare, the reason logged
    let r = prepare(&d, "k2", labels(&host, "sec/dotdot", &dotdot, "t2"));
    assert!(r.is_ok(), "{r:?}");
    let digest = format!("sha256:{}", sha256_hex(&dotdot.blob));
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("remote-snapshot-prepared=false")
                && l.contains(&digest)
                && l.contains("escapes")),
        "{log}"
    );
    assert_eq!(d.remote_mounts().len(), 1);
}
