//! `lazysnap convert` against a real docker-registry on 127.0.0.1 and OCI layouts: a
//! multi-arch image with Docker media types, gzip and uncompressed layers and a layer
//! without parent-directory entries, converted to every format and checked document
//! by document (media types, annotations, diff ids = the new layers' uncompressed
//! digests), layer by layer (lazysnap's reader, stargz's `estargz-ref`, the same files
//! as the source), for reproducibility and pass-through; bad sources and refusing
//! destinations; `--optimize` and `--prefetch-list`.

mod common;
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::lazy::decompress;
use common::registry::{Registry, go_arch, sha256_hex};
use common::{LANDMARKS, corpus_without_parent_dirs, tar_entries};
use lazysnap::format::{Layer, OpenOptions};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const FORMATS: [&str; 3] = ["estargz", "estargz-zstd", "zstd-chunked"];

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(b))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// A small busybox root filesystem whose `/etc/motd` says `motd`.
fn small_rootfs(motd: &str) -> Vec<u8> {
    common::busybox_rootfs(motd, &[("etc/unused.txt", common::text_bytes(9, 300_000))])
}

/// An uncompressed layer with a whiteout of a lower file.
fn extra_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in [
        ("etc/", &b""[..]),
        ("etc/extra.conf", &b"extra = true\n"[..]),
        ("etc/.wh.unused.txt", &b""[..]),
        ("usr/", &b""[..]),
        ("usr/share/", &b""[..]),
        ("usr/share/extra.bin", &common::prng_bytes(5, 200_000)[..]),
    ] {
        let mut h = tar::Header::new_ustar();
        if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
        }
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_100);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, path, data).unwrap();
    }
    b.into_inner().unwrap()
}

struct SrcLayer {
    tar: Vec<u8>,
    blob: Vec<u8>,
    media_type: &'static str,
}

impl SrcLayer {
    fn gzip(tar: Vec<u8>) -> SrcLayer {
        SrcLayer {
            blob: gzip(&tar),
            tar,
            media_type: DOCKER_GZIP,
        }
    }
    fn plain(tar: Vec<u8>) -> SrcLayer {
        SrcLayer {
            blob: tar.clone(),
            tar,
            media_type: DOCKER_TAR,
        }
    }
}

struct Platform {
    arch: &'static str,
    layers: Vec<SrcLayer>,
    config: Vec<u8>,
    manifest: Vec<u8>,
}

/// A source image: one platform per `(arch, layers)`, Docker media types, in a
/// manifest list (or a lone manifest).
struct SrcImage {
    platforms: Vec<Platform>,
    list: Option<Vec<u8>>,
}

impl SrcImage {
    fn new(platforms: Vec<(&'static str, Vec<SrcLayer>)>, list: bool) -> SrcImage {
        let platforms: Vec<Platform> = platforms
            .into_iter()
            .map(|(arch, layers)| {
                let diff_ids: Vec<String> = layers.iter().map(|l| sha(&l.tar)).collect();
                let config = serde_json::json!({
                    "architecture": arch, "os": "linux",
                    "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
                    "rootfs": {"type": "layers", "diff_ids": diff_ids},
                })
                .to_string()
                .into_bytes();
                let descs: Vec<Value> = layers
                    .iter()
                    .map(|l| {
                        serde_json::json!({"mediaType": l.media_type, "digest": sha(&l.blob), "size": l.blob.len()})
                    })
                    .collect();
                let manifest = serde_json::json!({
                    "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                    "config": {"mediaType": DOCKER_CONFIG, "digest": sha(&config), "size": config.len()},
                    "layers": descs,
                })
                .to_string()
                .into_bytes();
                Platform {
                    arch,
                    layers,
                    config,
                    manifest,
                }
            })
            .collect();
        let list = list.then(|| {
            let entries: Vec<Value> = platforms
                .iter()
                .map(|p| {
                    serde_json::json!({"mediaType": DOCKER_MANIFEST, "digest": sha(&p.manifest),
                        "size": p.manifest.len(), "platform": {"architecture": p.arch, "os": "linux"}})
                })
                .collect();
            serde_json::json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries})
                .to_string()
                .into_bytes()
        });
        SrcImage { platforms, list }
    }

    fn push(&self, reg: &Registry, repo: &str, tag: &str) -> String {
        for p in &self.platforms {
            for l in &p.layers {
                reg.push_blob(repo, &l.blob);
            }
            reg.push_blob(repo, &p.config);
            let d = sha(&p.manifest);
            let at = if self.list.is_some() { d.as_str() } else { tag };
            reg.push_manifest(repo, at, DOCKER_MANIFEST, &p.manifest);
        }
        if let Some(list) = &self.list {
            reg.push_manifest(repo, tag, DOCKER_LIST, list);
        }
        format!("{}/{repo}:{tag}", reg.host())
    }

    fn write_layout(&self, dir: &Path, tag: &str) -> String {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |b: &[u8]| std::fs::write(blobs.join(sha256_hex(b)), b).unwrap();
        for p in &self.platforms {
            p.layers.iter().for_each(|l| put(&l.blob));
            put(&p.config);
            put(&p.manifest);
        }
        let (top, mt) = match &self.list {
            Some(l) => (l.clone(), DOCKER_LIST),
            None => (self.platforms[0].manifest.clone(), DOCKER_MANIFEST),
        };
        put(&top);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": mt,
            "digest": sha(&top), "size": top.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}}]});
        std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        format!("oci:{}:{tag}", dir.display())
    }
}

fn other_arch() -> &'static str {
    if go_arch() == "amd64" {
        "arm64"
    } else {
        "amd64"
    }
}

/// Two platforms; the uncompressed layer is shared by both.
fn multi_arch_image() -> SrcImage {
    SrcImage::new(
        vec![
            (
                go_arch(),
                vec![
                    SrcLayer::gzip(small_rootfs("host")),
                    SrcLayer::plain(extra_layer()),
                    SrcLayer::gzip(corpus_without_parent_dirs()),
                ],
            ),
            (
                other_arch(),
                vec![
                    SrcLayer::gzip(small_rootfs("other")),
                    SrcLayer::plain(extra_layer()),
                ],
            ),
        ],
        true,
    )
}

fn run(args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args);
    support::run_bounded(c, Duration::from_secs(600))
}

/// `lazysnap convert SRC DST ARGS --json`, which must succeed.
fn convert_ok(src: &str, dst: &str, extra: &[&str]) -> Value {
    let mut args = vec!["convert", src, dst, "--json"];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(
        o.status.success(),
        "convert {src} {dst} {extra:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&o.stdout));
    })
}

/// `lazysnap convert SRC DST ARGS`, which must fail with one line on stderr.
fn convert_err(src: &str, dst: &str, extra: &[&str]) -> String {
    let mut args = vec!["convert", src, dst];
    args.extend_from_slice(extra);
    let o = run(&args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "convert {src} {dst}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("lazysnap: "), "{err}");
    eprint!("as expected: {err}");
    err
}

/// Reads images back: from a registry (through lazysnap's client) or a layout.
enum Store {
    Registry {
        rt: tokio::runtime::Runtime,
        client: lazysnap_registry::RegistryClient,
        image: lazysnap_registry::Reference,
    },
    Layout(PathBuf, String),
}

impl Store {
    fn registry(image: &str) -> Store {
        let cfg = lazysnap_registry::RegistryConfig {
            certs_dir: "/nonexistent".into(),
            ..Default::default()
        };
        Store::Registry {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
            client: lazysnap_registry::RegistryClient::new(cfg),
            image: lazysnap_registry::Reference::parse(image).unwrap(),
        }
    }

    /// The tagged document: media type and bytes, or `None` if the tag does not exist.
    fn top(&self) -> Option<(String, Vec<u8>)> {
        match self {
            Store::Registry { rt, client, image } => {
                match rt.block_on(client.fetch_manifest(image)) {
                    Ok(d) => Some((d.media_type, d.bytes.to_vec())),
                    Err(e) if e.kind() == lazysnap_registry::ErrorKind::NotFound => None,
                    Err(e) => panic!("{e}"),
                }
            }
            Store::Layout(dir, tag) => {
                let index: Value =
                    serde_json::from_slice(&std::fs::read(dir.join("index.json")).ok()?).unwrap();
                let e = index["manifests"].as_array()?.iter().find(|e| {
                    e["annotations"]["org.opencontainers.image.ref.name"] == tag.as_str()
                })?;
                let d = e["digest"].as_str().unwrap();
                Some((e["mediaType"].as_str().unwrap().to_string(), self.blob(d)))
            }
        }
    }

    fn blob(&self, digest: &str) -> Vec<u8> {
        let data = match self {
            Store::Registry { rt, client, image } => {
                let d = lazysnap_registry::Digest::parse(digest).unwrap();
                let blob = rt.block_on(client.open_blob(image, &d)).unwrap();
                let size = blob.size() as usize;
                rt.block_on(blob.read_at(0, size)).unwrap().to_vec()
            }
            Store::Layout(dir, _) => std::fs::read(
                dir.join("blobs/sha256")
                    .join(digest.trim_start_matches("sha256:")),
            )
            .unwrap(),
        };
        assert_eq!(sha(&data), digest, "content of {digest}");
        data
    }

    fn manifest(&self, digest: &str) -> Vec<u8> {
        match self {
            Store::Registry { rt, client, image } => {
                let r = image.with_digest(lazysnap_registry::Digest::parse(digest).unwrap());
                rt.block_on(client.fetch_manifest(&r))
                    .unwrap()
                    .bytes
                    .to_vec()
            }
            Store::Layout(..) => self.blob(digest),
        }
    }
}

fn annotation<'a>(l: &'a Value, key: &str) -> Option<&'a str> {
    l["annotations"][key].as_str()
}

/// The files of a tar as the oracle sees them, without the entries lazy formats add.
fn files(tar: &[u8]) -> Vec<common::ExpectedEntry> {
    let mut v: Vec<_> = tar_entries(tar)
        .into_iter()
        .filter(|e| !LANDMARKS.contains(&e.path.as_str()) && e.path != "/stargz.index.json")
        .collect();
    v.sort_by(|a, b| a.path.cmp(&b.path));
    v
}

fn estargz_ref() -> Option<PathBuf> {
    let p = std::env::var_os("ESTARGZ_REF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/ref-bin/estargz-ref"));
    if p.is_file() {
        return Some(p);
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "{} missing",
        p.display()
    );
    eprintln!("skipped estargz-ref checks: {} missing", p.display());
    None
}

/// Checks one converted layer against its source tar; returns its TOC digest.
fn check_layer(l: &Value, blob: &[u8], src_tar: &[u8], diff_id: &str, format: &str) -> String {
    let what = format!("{format} layer {}", l["digest"]);
    let mt = l["mediaType"].as_str().unwrap();
    let toc = match format {
        "estargz" => {
            assert_eq!(mt, "application/vnd.oci.image.layer.v1.tar+gzip", "{what}");
            assert!(annotation(l, "io.github.containers.zstd-chunked.manifest-checksum").is_none());
            annotation(l, "containerd.io/snapshot/stargz/toc.digest")
        }
        "estargz-zstd" => {
            assert_eq!(mt, "application/vnd.oci.image.layer.v1.tar+zstd", "{what}");
            assert!(annotation(l, "io.containers.zstd-chunked.manifest-position").is_some());
            annotation(l, "containerd.io/snapshot/stargz/toc.digest")
        }
        _ => {
            assert_eq!(mt, "application/vnd.oci.image.layer.v1.tar+zstd", "{what}");
            assert!(
                annotation(l, "containerd.io/snapshot/stargz/toc.digest").is_none(),
                "{what}"
            );
            assert!(annotation(l, "io.github.containers.zstd-chunked.manifest-position").is_some());
            assert!(annotation(l, "io.github.containers.zstd-chunked.tarsplit-position").is_some());
            annotation(l, "io.github.containers.zstd-chunked.manifest-checksum")
        }
    }
    .unwrap_or_else(|| panic!("{what}: no TOC digest annotation: {l}"))
    .to_string();
    assert_eq!(l["size"].as_u64(), Some(blob.len() as u64), "{what}");
    let tar = decompress(blob);
    assert_eq!(
        sha(&tar),
        diff_id,
        "{what}: diff id is the uncompressed layer's digest"
    );
    assert_eq!(
        annotation(l, "io.containers.estargz.uncompressed-size"),
        Some(tar.len().to_string().as_str()),
        "{what}"
    );
    assert_eq!(
        files(&tar),
        files(src_tar),
        "{what}: same files as the source"
    );
    let layer = Layer::open(
        blob.to_vec(),
        &OpenOptions {
            toc_digest: Some(toc.parse().unwrap()),
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let report = layer.verify_all().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(report.files > 0, "{what}");
    if format != "zstd-chunked"
        && let Some(eref) = estargz_ref()
    {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        std::fs::write(&p, blob).unwrap();
        let o = Command::new(eref)
            .arg("verify")
            .arg(&p)
            .arg(&toc)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{what}: estargz-ref verify: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    toc
}

/// Checks a converted copy of `img` in `store`; returns the layer digests per platform.
fn check_image(store: &Store, img: &SrcImage, format: &str) -> Vec<Vec<String>> {
    let (mt, top) = store.top().expect("the destination tag exists");
    let manifests: Vec<(Value, Vec<u8>, Option<&Platform>)> = match &img.list {
        Some(_) => {
            assert_eq!(mt, OCI_INDEX);
            let index: Value = serde_json::from_slice(&top).unwrap();
            assert_eq!(index["mediaType"], OCI_INDEX);
            assert_eq!(index["schemaVersion"], 2);
            let entries = index["manifests"].as_array().unwrap();
            assert_eq!(entries.len(), img.platforms.len());
            entries
                .iter()
                .zip(&img.platforms)
                .map(|(e, p)| {
                    assert_eq!(e["mediaType"], OCI_MANIFEST);
                    assert_eq!(e["platform"]["architecture"], p.arch);
                    assert_eq!(e["platform"]["os"], "linux");
                    let bytes = store.manifest(e["digest"].as_str().unwrap());
                    assert_eq!(e["size"].as_u64(), Some(bytes.len() as u64));
                    (e.clone(), bytes, Some(p))
                })
                .collect()
        }
        None => {
            assert_eq!(mt, OCI_MANIFEST);
            vec![(Value::Null, top, img.platforms.first())]
        }
    };
    let mut out = Vec::new();
    for (_, bytes, p) in manifests {
        let p = p.unwrap();
        let m: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(m["mediaType"], OCI_MANIFEST);
        assert_eq!(m["config"]["mediaType"], OCI_CONFIG);
        let config: Value =
            serde_json::from_slice(&store.blob(m["config"]["digest"].as_str().unwrap())).unwrap();
        assert_eq!(config["architecture"], p.arch);
        assert_eq!(
            config["config"]["Cmd"][0], "/bin/sh",
            "the rest of the config is kept"
        );
        let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
        let layers = m["layers"].as_array().unwrap();
        assert_eq!(layers.len(), p.layers.len());
        assert_eq!(diff_ids.len(), p.layers.len());
        let mut digests = Vec::new();
        for ((l, src), id) in layers.iter().zip(&p.layers).zip(diff_ids) {
            let d = l["digest"].as_str().unwrap();
            let blob = store.blob(d);
            check_layer(l, &blob, &src.tar, id.as_str().unwrap(), format);
            digests.push(d.to_string());
        }
        out.push(digests);
    }
    out
}

#[test]
fn converts_a_multi_arch_docker_image_to_every_format() {
    if !common::registry::require("/usr/bin/docker-registry", "convert formats") {
        return;
    }
    let reg = Registry::start();
    let host = reg.host();
    let img = multi_arch_image();
    let src = img.push(&reg, "src/app", "v1");
    let work = tempfile::tempdir().unwrap();
    let src_layout = img.write_layout(&work.path().join("src-layout"), "v1");

    for format in FORMATS {
        let dst = format!("{host}/conv/app:{format}");
        let v = convert_ok(&src, &dst, &["--format", format]);
        let layers = check_image(&Store::registry(&dst), &img, format);
        assert_eq!(v["format"], format);
        assert_eq!(v["media_type"], OCI_INDEX);
        assert_eq!(v["converted"], 4, "four distinct layers: {v}");
        assert_eq!(v["passed_through"], 0);
        assert_eq!(v["images"].as_array().unwrap().len(), 2);
        assert_eq!(
            layers[0][1], layers[1][1],
            "the shared layer is converted once"
        );
        let before: u64 = img
            .platforms
            .iter()
            .flat_map(|p| &p.layers)
            .map(|l| l.blob.len() as u64)
            .sum::<u64>()
            - img.platforms[1].layers[1].blob.len() as u64;
        assert_eq!(v["size_before"].as_u64(), Some(before));

        // reproducible: again, and from the same image in an OCI layout
        let again = convert_ok(
            &src,
            &format!("{host}/conv/app:{format}-again"),
            &["--format", format],
        );
        assert_eq!(
            again["digest"], v["digest"],
            "{format}: same input, same digest"
        );
        let from_layout = convert_ok(
            &src_layout,
            &format!("{host}/conv/layout:{format}"),
            &["--format", format, "--jobs", "1", "--threads", "1"],
        );
        assert_eq!(
            from_layout["digest"], v["digest"],
            "{format}: layout source"
        );

        // an image already in the format passes through, mounted across repositories
        let pass = convert_ok(
            &dst,
            &format!("{host}/conv/copy:{format}"),
            &["--format", format],
        );
        assert_eq!(pass["passed_through"], 4, "{pass}");
        assert_eq!(pass["converted"], 0);
        assert_eq!(
            pass["digest"], v["digest"],
            "{format}: pass-through changes nothing"
        );
        for l in pass["layers"].as_array().unwrap() {
            assert_eq!(l["stored"], "mounted", "{l}");
        }
    }

    // registry -> OCI layout: the same image, tagged in index.json
    let out = work.path().join("out");
    let dst = format!("oci:{}:esgz", out.display());
    let v = convert_ok(&src, &dst, &["--format", "estargz"]);
    let reg_digest = convert_ok(&src, &format!("{host}/conv/app:estargz"), &[])["digest"].clone();
    assert_eq!(v["digest"], reg_digest);
    check_image(&Store::Layout(out.clone(), "esgz".into()), &img, "estargz");
    assert!(out.join("oci-layout").is_file());
    // a second tag in the same layout keeps the first
    convert_ok(
        &src_layout,
        &format!("oci:{}:zstd", out.display()),
        &["--format", "zstd-chunked"],
    );
    check_image(&Store::Layout(out.clone(), "esgz".into()), &img, "estargz");
    check_image(&Store::Layout(out, "zstd".into()), &img, "zstd-chunked");
}

#[test]
fn bad_sources_and_refusing_destinations_fail_cleanly() {
    if !common::registry::require("/usr/bin/docker-registry", "convert errors") {
        return;
    }
    let reg = Registry::start();
    let host = reg.host();
    let work = tempfile::tempdir().unwrap();
    let dst = format!("{host}/out/app:v1");

    // sources that are not images
    let e = convert_err(&format!("{host}/src/app:missing"), &dst, &[]);
    assert!(e.contains("src/app") && e.contains("not found"), "{e}");
    let e = convert_err(&format!("oci:{}:v1", work.path().display()), &dst, &[]);
    assert!(
        e.contains("not a container image") && e.contains("index.json"),
        "{e}"
    );
    let e = convert_err("/etc/passwd", &dst, &[]);
    assert!(e.contains("/etc/passwd"), "{e}");
    let config = b"{}";
    reg.push_blob("src/artifact", config);
    let artifact = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.thing",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(config), "size": 2},
        "layers": []});
    reg.push_manifest(
        "src/artifact",
        "v1",
        OCI_MANIFEST,
        artifact.to_string().as_bytes(),
    );
    let e = convert_err(&format!("{host}/src/artifact:v1"), &dst, &[]);
    assert!(
        e.contains("not a container image") && e.contains("artifact"),
        "{e}"
    );

    // a destination that refuses the push: one line, and no tag
    let img = SrcImage::new(
        vec![(go_arch(), vec![SrcLayer::gzip(small_rootfs("x"))])],
        false,
    );
    let src = img.push(&reg, "src/app", "v1");
    let ro = Registry::start_read_only();
    let ro_dst = format!("{}/out/app:v1", ro.host());
    let e = convert_err(&src, &ro_dst, &[]);
    assert!(e.contains("405") && e.contains("out/app"), "{e}");
    assert!(Store::registry(&ro_dst).top().is_none());
    let e = convert_err(&src, &format!("{host}/out/app@{}", sha(b"x")), &[]);
    assert!(e.contains("must be a tag"), "{e}");

    // a source layer that fails verification after other layers were pushed: the
    // blobs may stay, the tag must not appear
    let img = multi_arch_image();
    let src = img.push(&reg, "src/multi", "v1");
    let bad = sha(&img.platforms[1].layers[0].blob);
    let path = reg.blob_path(&bad);
    let mut data = std::fs::read(&path).unwrap();
    let n = data.len();
    data[n / 2] ^= 0xff;
    std::fs::write(&path, data).unwrap();
    let partial = format!("{host}/out/partial:v1");
    let e = convert_err(&src, &partial, &["--jobs", "1"]);
    assert!(e.contains(&bad) && e.contains("does not match"), "{e}");
    assert!(Store::registry(&partial).top().is_none(), "no partial tag");
    let pushed = common::registry::blob_gets_in(&reg.log(), &sha(&img.platforms[0].layers[0].blob));
    assert!(
        !pushed.is_empty(),
        "the first layers were read before the failure"
    );
    // the same for a layout destination: no index.json entry
    let out = work.path().join("partial");
    convert_err(&src, &format!("oci:{}:v1", out.display()), &["--jobs", "1"]);
    assert!(Store::Layout(out, "v1".into()).top().is_none());
}

/// The order of entries in a converted eStargz layer's tar.
fn entry_order(blob: &[u8]) -> Vec<String> {
    tar_entries(&decompress(blob))
        .into_iter()
        .map(|e| e.path)
        .collect()
}

#[test]
fn optimize_puts_the_files_a_workload_opens_first() {
    if !support::require(&["/usr/bin/docker-registry"], "convert --optimize") {
        return;
    }
    let reg = Registry::start();
    let host = reg.host();
    let img = SrcImage::new(
        vec![(
            go_arch(),
            vec![
                SrcLayer::gzip(small_rootfs("optimized")),
                SrcLayer::plain(extra_layer()),
            ],
        )],
        false,
    );
    let src = img.push(&reg, "src/app", "v1");
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("workload.out");
    let dst = format!("{host}/opt/app:v1");
    let v = convert_ok(
        &src,
        &dst,
        &[
            "--optimize",
            "--workload-output",
            output.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/motd /etc/extra.conf /proc/net/dev",
        ],
    );
    let o = &v["optimize"];
    assert_eq!(o["outcome"], "exit 0", "{v}");
    let opened: Vec<&str> = o["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for f in ["/bin/busybox", "/etc/motd", "/etc/extra.conf"] {
        assert!(opened.contains(&f), "{f} not recorded: {opened:?}");
    }
    assert!(!opened.contains(&"/etc/unused.txt"), "{opened:?}");
    // it ran in the image, without network: its /proc/net/dev lists only lo
    let text = std::fs::read_to_string(&output).unwrap();
    assert!(
        text.contains("optimized\n") && text.contains("extra = true"),
        "{text}"
    );
    let ifaces: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(':') && !l.contains('|'))
        .collect();
    assert_eq!(ifaces.len(), 1, "{text}");
    assert!(ifaces[0].trim_start().starts_with("lo:"), "{text}");

    // each layer starts with its opened files, then the landmark
    let store = Store::registry(&dst);
    let layers = check_image(&store, &img, "estargz");
    let order = entry_order(&store.blob(&layers[0][0]));
    let landmark = order
        .iter()
        .position(|p| p == "/.prefetch.landmark")
        .expect("landmark");
    for f in ["/bin/busybox", "/etc/motd"] {
        let i = order.iter().position(|p| p == f).unwrap();
        assert!(i < landmark, "{f} after the landmark: {order:?}");
    }
    let unused = order.iter().position(|p| p == "/etc/unused.txt").unwrap();
    assert!(unused > landmark, "{order:?}");
    let order = entry_order(&store.blob(&layers[0][1]));
    let landmark = order
        .iter()
        .position(|p| p == "/.prefetch.landmark")
        .expect("landmark");
    assert!(order.iter().position(|p| p == "/etc/extra.conf").unwrap() < landmark);
    assert_eq!(v["layers"][1]["prioritized"], 1, "{v}");

    // a workload that does not end is stopped; what it opened still counts
    let v = convert_ok(
        &src,
        &format!("{host}/opt/app:sleepy"),
        &[
            "--optimize",
            "--timeout",
            "1",
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/motd >/dev/null; sleep 30",
        ],
    );
    assert_eq!(
        v["optimize"]["outcome"], "timed out after 1 s, stopped",
        "{v}"
    );
    assert!(v["layers"][0]["prioritized"].as_u64().unwrap() >= 2, "{v}");

    // interrupted while the workload runs: it is stopped, everything unmounted and
    // removed, and the tag never written
    let tmp = work.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let interrupted = format!("{host}/opt/app:interrupted");
    let child = Command::new(BIN)
        .args(["convert", &src, &interrupted, "--optimize", "--tmp-dir"])
        .arg(&tmp)
        .args(["--", "/bin/sleep", "60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mounted = || {
        common::lazy::mountpoints()
            .iter()
            .any(|m| m.starts_with(&tmp))
    };
    assert!(
        support::wait_until(Duration::from_secs(120), mounted),
        "no recording mount"
    );
    // the workload runs: lazysnap convert handles SIGINT from then on
    let workload = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"/bin/sleep\x0060\x00")
            })
    };
    assert!(
        support::wait_until(Duration::from_secs(60), workload),
        "the workload did not start"
    );
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(!mounted(), "mounts left behind");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "temporary files left"
    );
    assert!(Store::registry(&interrupted).top().is_none());

    // --prefetch-list: the same order, from a file
    let list = work.path().join("list");
    std::fs::write(
        &list,
        "# from a file\n/etc/motd\n/etc/extra.conf\n/not/there\n",
    )
    .unwrap();
    let v = convert_ok(
        &src,
        &format!("{host}/opt/app:listed"),
        &[
            "--prefetch-list",
            list.to_str().unwrap(),
            "--format",
            "zstd-chunked",
        ],
    );
    assert_eq!(v["layers"][0]["prioritized"], 1, "{v}");
    assert_eq!(v["layers"][1]["prioritized"], 1, "{v}");
    let store = Store::registry(&format!("{host}/opt/app:listed"));
    let layers = check_image(&store, &img, "zstd-chunked");
    let order = entry_order(&store.blob(&layers[0][0]));
    assert_eq!(
        order[..3],
        ["/etc", "/etc/motd", "/.prefetch.landmark"],
        "{order:?}"
    );
}

/// Under `CI=true` a missing prerequisite fails the test; otherwise it is skipped.
fn skip_or_fail(test: &str, why: &str) {
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "{test}: {why} (CI=true)"
    );
    eprintln!("skipped: {test}: {why}");
}

/// The python image of `scripts/python-image.sh`, gzip layers, in `reg` as `repo:src`.
fn push_python_image(reg: &Registry, repo: &str) -> Option<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/python-image.sh");
    // the first run debootstraps and installs python3: minutes
    let o = support::run_bounded(Command::new(&script), Duration::from_secs(3600));
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        skip_or_fail(
            "python image",
            &format!("{} failed: {tail:?}", script.display()),
        );
        return None;
    }
    let layers: Vec<SrcLayer> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|p| {
            let tar = std::fs::read(p).unwrap();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).unwrap();
            SrcLayer {
                blob: gz.finish().unwrap(),
                tar,
                media_type: DOCKER_GZIP,
            }
        })
        .collect();
    assert_eq!(layers.len(), 3, "python-image.sh prints base, python, app");
    Some(SrcImage::new(vec![(go_arch(), layers)], false).push(reg, repo, "src"))
}

/// What a lazy mount of `image` (no background fetch) fetched for
/// `python3 -c 'print(1)'`: bytes while the command ran (from the registry's access
/// log after the mount was ready), bytes in all (TOCs and prefetch included), and
/// range requests in all.
fn python_fetches(reg: &Registry, image: &str, dir: &Path) -> (u64, u64, u64) {
    std::fs::create_dir_all(dir).unwrap();
    let m = common::lazy::LazyMount::start(image, dir, &["--no-background-fetch"]);
    // the mount appears after its prefetch; let the registry log that request
    std::thread::sleep(Duration::from_millis(500));
    let mark = reg.log().len();
    let o = support::run_bounded(
        {
            let mut c = Command::new("/usr/sbin/chroot");
            c.arg(dir)
                .args(["/usr/bin/python3", "-c", "print(1)"])
                .env_clear()
                .env("PATH", "/usr/bin:/bin");
            c
        },
        Duration::from_secs(300),
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "1\n",
        "{image}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stats = m.stop();
    let log = reg.log();
    let during: u64 = log[mark..]
        .lines()
        .filter(|l| l.contains("/blobs/sha256:") && l.contains("\"GET "))
        .filter_map(|l| {
            l.split("HTTP/1.1\" ")
                .nth(1)?
                .split(' ')
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum();
    let layers = stats.as_array().unwrap();
    let total = layers
        .iter()
        .map(|l| l["fetched_bytes"].as_u64().unwrap())
        .sum();
    let requests = layers
        .iter()
        .map(|l| l["fetch_requests"].as_u64().unwrap())
        .sum();
    (during, total, requests)
}

#[test]
fn optimized_python_image_is_fetched_before_python_runs() {
    if !support::require(
        &["/usr/bin/docker-registry", "/usr/sbin/chroot"],
        "optimize python",
    ) {
        return;
    }
    let reg = Registry::start();
    let Some(src) = push_python_image(&reg, "py/app") else {
        return;
    };
    let host = reg.host();
    let plain = format!("{host}/py/app:esgz");
    let optimized = format!("{host}/py/app:opt");
    let work = tempfile::tempdir().unwrap();
    convert_ok(&src, &plain, &[]);
    let output = work.path().join("workload.out");
    let v = convert_ok(
        &src,
        &optimized,
        &[
            "--optimize",
            "--workload-output",
            output.to_str().unwrap(),
            "--",
            "/usr/bin/python3",
            "-c",
            "print(1)",
        ],
    );
    assert_eq!(v["optimize"]["outcome"], "exit 0", "{v}");
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "1\n");
    let files: Vec<&str> = v["optimize"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        files.iter().any(|f| f.starts_with("/usr/bin/python3")),
        "{files:?}"
    );
    assert!(files.len() >= 10, "{files:?}");

    let (plain_during, plain_total, plain_requests) =
        python_fetches(&reg, &plain, &work.path().join("plain"));
    let (opt_during, opt_total, opt_requests) =
        python_fetches(&reg, &optimized, &work.path().join("opt"));
    println!(
        "python3 -c 'print(1)' from a lazy mount (no background fetch): unoptimized fetched \
         {plain_during} bytes while it ran, {plain_total} in all, {plain_requests} requests; \
         optimized ({} files first) {opt_during} while it ran, {opt_total} in all, \
         {opt_requests} requests",
        files.len()
    );
    assert!(
        plain_during > 1 << 20,
        "the unoptimized image is read on demand"
    );
    assert!(
        opt_during * 10 <= plain_during,
        "the optimized image's files come with the prefetch at mount: {opt_during} bytes \
         fetched while python3 ran, {plain_during} unoptimized"
    );
    assert!(opt_requests < plain_requests);
    // the prefetch is the files python3 needs, not more
    assert!(
        opt_total <= plain_total + (256 << 10),
        "{opt_total} bytes in all, {plain_total} unoptimized"
    );
}

/// stargz-snapshotter's daemon, built by .ci/run next to `estargz-ref`.
fn stargz_grpc() -> PathBuf {
    let dir = std::env::var_os("ESTARGZ_REF")
        .map(PathBuf::from)
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/tmp/ref-bin"));
    dir.join("containerd-stargz-grpc")
}
const CTR_REMOTE: &str = "/usr/bin/ctr-remote";
const MOTD: &str = "converted by lazysnap convert";

/// stargz-snapshotter's daemon (the peer build), stopped with SIGINT on drop (it
/// unmounts its layers then), its leftover mounts detached.
struct StargzDaemon {
    child: Option<std::process::Child>,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl StargzDaemon {
    fn start(dir: &Path) -> StargzDaemon {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("config.toml");
        // loopback registries are reached over plain HTTP without configuration
        std::fs::write(&config, "[blob]\nchunk_size = 65536\n").unwrap();
        let log = dir.join("stargz.log");
        let mut d = StargzDaemon {
            root: dir.join("root"),
            socket: dir.join("stargz.sock"),
            child: None,
            log: log.clone(),
        };
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(stargz_grpc())
            .arg("-root")
            .arg(&d.root)
            .arg("-address")
            .arg(&d.socket)
            .arg("-config")
            .arg(&config)
            .args(["-log-level", "debug"])
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn containerd-stargz-grpc");
        d.child = Some(child);
        let sock = d.socket.clone();
        let up = support::wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        assert!(up, "containerd-stargz-grpc did not start:\n{}", d.log());
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for StargzDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            if !support::wait_until(Duration::from_secs(15), || {
                matches!(c.try_wait(), Ok(Some(_)))
            }) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        support::detach_mounts_under(&self.root);
    }
}

/// The blob GETs of `digest` the registry logged after byte `mark` of its log.
fn gets_after(reg: &Registry, mark: usize, digest: &str) -> Vec<(u16, u64)> {
    common::registry::blob_gets_in(&reg.log()[mark..], digest)
}

/// The first layer of an image in the registry: digest and size.
fn first_layer(image: &str) -> (String, u64) {
    let store = Store::registry(image);
    let (_, m) = store.top().expect("image");
    let m: Value = serde_json::from_slice(&m).unwrap();
    let l = &m["layers"][0];
    (
        l["digest"].as_str().unwrap().to_string(),
        l["size"].as_u64().unwrap(),
    )
}

/// `ctr-remote image rpull` with `snapshotter`, then `ctr run` of `cat /etc/motd`;
/// the layer blob is read only by ranges, and less than half of it.
fn rpull_and_run(
    c: &support::Containerd,
    reg: &Registry,
    snapshotter: &str,
    image: &str,
    id: &str,
) {
    let (digest, size) = first_layer(image);
    let mark = reg.log().len();
    let mut cmd = Command::new(CTR_REMOTE);
    cmd.arg("--address").arg(&c.address).args([
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        snapshotter,
        image,
    ]);
    let o = support::run_bounded(cmd, Duration::from_secs(180));
    assert!(
        o.status.success(),
        "rpull {image} with {snapshotter}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        snapshotter,
        "--net-host",
        image,
        id,
        "/bin/cat",
        "/etc/motd",
    ]);
    assert_eq!(out.trim(), MOTD, "{snapshotter} ran {image}");
    let gets = gets_after(reg, mark, &digest);
    assert!(!gets.is_empty(), "{snapshotter}: no reads of {digest}");
    assert!(
        gets.iter().all(|(s, _)| *s == 206),
        "{snapshotter} must read {image} lazily (range requests only): {gets:?}"
    );
    let fetched: u64 = gets.iter().map(|(_, n)| n).sum();
    println!(
        "{snapshotter} ran {image}: {} range reads, {fetched} of {size} layer bytes",
        gets.len()
    );
    assert!(
        fetched < size / 2,
        "{snapshotter}: {fetched} of {size} bytes of {image}'s layer fetched"
    );
    c.ctr_ok(&["image", "rm", image]);
}

#[test]
fn converted_images_run_lazily_under_lazysnap_and_stargz() {
    let stargz = stargz_grpc();
    if !support::require(
        &[
            "/usr/bin/containerd",
            "/usr/sbin/runc",
            "/usr/bin/docker-registry",
            CTR_REMOTE,
            stargz.to_str().unwrap_or(""),
        ],
        "converted images run lazily",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let host = reg.host();
    // a Docker-media-type gzip image with a 24 MiB file nobody reads
    let img = SrcImage::new(
        vec![(
            go_arch(),
            vec![SrcLayer::gzip(common::busybox_tar(MOTD, 11))],
        )],
        false,
    );
    let src = img.push(&reg, "e2e/app", "src");
    let ours = format!("{host}/e2e/app:lazysnap");
    convert_ok(&src, &ours, &[]);

    let daemon = support::Daemon::start(
        &work.path().join("lazysnap"),
        "[layer]\nbackground_fetch = false\n",
    );
    let c = support::Containerd::start(&work.path().join("containerd"), &daemon.socket);
    c.wait_snapshotter("lazysnap");
    // stargz's own converter on the same source, pushed next to ours
    let theirs = format!("{host}/e2e/app:ctr-remote");
    for args in [
        vec!["image", "pull", "--plain-http", src.as_str()],
        vec![
            "image",
            "convert",
            "--estargz",
            "--oci",
            src.as_str(),
            theirs.as_str(),
        ],
        vec![
            "image",
            "push",
            "--plain-http",
            theirs.as_str(),
            theirs.as_str(),
        ],
    ] {
        let mut cmd = Command::new(CTR_REMOTE);
        cmd.arg("--address").arg(&c.address).args(&args);
        let o = support::run_bounded(cmd, Duration::from_secs(300));
        assert!(
            o.status.success(),
            "ctr-remote {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    c.ctr_ok(&["image", "rm", &theirs, &src]);
    // lazysnap runs both conversions lazily
    rpull_and_run(&c, &reg, "lazysnap", &ours, "ours-lazysnap");
    rpull_and_run(&c, &reg, "lazysnap", &theirs, "theirs-lazysnap");
    let snaps = c.ctr_ok(&["snapshot", "--snapshotter", "lazysnap", "ls"]);
    drop(c);
    drop(daemon);
    assert!(!snaps.is_empty());

    // stargz-snapshotter runs lazysnap's conversion lazily
    let sgz = StargzDaemon::start(&work.path().join("stargz"));
    let c = support::Containerd::start_with_plugin(
        &work.path().join("containerd2"),
        "stargz",
        &sgz.socket,
    );
    c.wait_snapshotter("stargz");
    let mark = reg.log().len();
    rpull_and_run(&c, &reg, "stargz", &ours, "ours-stargz");
    let log = sgz.log();
    assert!(
        !gets_after(&reg, mark, &first_layer(&ours).0).is_empty(),
        "stargz read nothing:\n{log}"
    );
    drop(c);
}
