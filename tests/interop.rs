//! Interoperability with the reference implementations:
//!
//! - blobs `lazysnap layer convert` writes must open, verify, list and read with
//!   `estargz-ref` (stargz-snapshotter v0.12's own reader; path from `ESTARGZ_REF`,
//!   default `/tmp/ref-bin/estargz-ref`);
//! - blobs `estargz-ref build` writes (gzip and eStargz-zstd) must verify, list and
//!   read with `lazysnap layer ...`;
//! - zstd:chunked layers written by `skopeo copy --dest-compress-format zstd:chunked`
//!   (containers/image + containers/storage) must verify, list and read with lazysnap;
//! - lazysnap's own zstd:chunked output reads back and carries c/storage's annotations.
//!
//! A missing tool skips a test with `skipped: <tool> missing`, or fails it when `CI=true`.

mod common;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CHUNK: u64 = 64 * 1024;
const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

// ---------------------------------------------------------------- helpers

/// Find a tool; when it is missing, fail under `CI=true`, else skip (None).
fn tool(name: &str, env_var: Option<&str>, default: Option<&str>) -> Option<PathBuf> {
    let found = if let Some(p) = env_var.and_then(std::env::var_os) {
        Some(PathBuf::from(p)).filter(|p| p.is_file())
    } else if let Some(d) = default {
        Some(PathBuf::from(d)).filter(|p| p.is_file())
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    };
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name} missing (CI=true requires it; see .ci/run)");
        }
        println!("skipped: {name} missing");
    }
    found
}

fn estargz_ref() -> Option<PathBuf> {
    tool(
        "estargz-ref",
        Some("ESTARGZ_REF"),
        Some("/tmp/ref-bin/estargz-ref"),
    )
}

fn describe(cmd: &Command, out: &Output) -> String {
    format!(
        "{cmd:?} exited with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(4000)]),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run a command that must succeed; returns its stdout.
fn ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{}", describe(cmd, &out));
    out.stdout
}

/// Run a command that must fail with exit status 1 and a message on stderr.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert_eq!(out.status.code(), Some(1), "{}", describe(cmd, &out));
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!msg.trim().is_empty(), "{cmd:?} failed without a message");
    msg
}

fn lazysnap(args: &[&str]) -> Command {
    let mut c = Command::new(LAZYSNAP);
    c.args(args);
    c
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn sha256_hex(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn lines(b: &[u8]) -> Vec<String> {
    String::from_utf8(b.to_vec())
        .expect("utf-8 output")
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn is_landmark(line: &str) -> bool {
    let path = line.split('\t').next().unwrap_or("");
    LANDMARKS.contains(&path)
}

/// `key value` lines (estargz-ref build / diffid output) into a map.
fn kv(b: &[u8]) -> BTreeMap<String, String> {
    lines(b)
        .iter()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Compare two sorted line lists and name every difference.
fn assert_same_lines(what: &str, want: &[String], got: &[String]) {
    if want == got {
        return;
    }
    let missing: Vec<&String> = want.iter().filter(|l| !got.contains(l)).collect();
    let extra: Vec<&String> = got.iter().filter(|l| !want.contains(l)).collect();
    panic!(
        "{what}: listings differ\nexpected but missing ({}):\n  {}\nunexpected ({}):\n  {}",
        missing.len(),
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
        extra.len(),
        extra
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
    );
}

/// Every path whose content a reader must return: regular files and hard links.
fn readable_paths(es: &[ExpectedEntry]) -> Vec<(String, Vec<u8>)> {
    es.iter()
        .filter(|e| e.kind == "reg" || e.kind == "hardlink")
        .map(|e| (e.path.clone(), file_content(es, &e.path).unwrap().to_vec()))
        .collect()
}

fn check_cat(what: &str, es: &[ExpectedEntry], mut cat: impl FnMut(&str) -> Vec<u8>) {
    let files = readable_paths(es);
    assert!(!files.is_empty(), "{what}: nothing to read");
    for (path, want) in files {
        let got = cat(&path);
        assert!(
            got == want,
            "{what}: content of {path} differs: expected {} bytes {}, got {} bytes {}",
            want.len(),
            sha256_hex(&want),
            got.len(),
            sha256_hex(&got)
        );
    }
}

/// Write the corpus to `dir/corpus.tar`; returns (path, oracle entries).
fn write_corpus(dir: &Path, tar: Vec<u8>) -> (PathBuf, Vec<ExpectedEntry>) {
    let path = dir.join("corpus.tar");
    let es = tar_entries(&tar);
    std::fs::write(&path, tar).unwrap();
    (path, es)
}

/// `lazysnap layer convert --json`, with the output checked against the blob file.
fn convert(input: &Path, out: &Path, format: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "layer",
        "convert",
        p(input),
        p(out),
        "--format",
        format,
        "--json",
    ];
    args.extend_from_slice(extra);
    let stdout = ok(&mut lazysnap(&args));
    let v: Value = serde_json::from_slice(&stdout)
        .unwrap_or_else(|e| panic!("convert --json: {e}: {}", String::from_utf8_lossy(&stdout)));
    let blob = std::fs::read(out).unwrap();
    assert_eq!(v["format"], format, "convert --json: {v}");
    assert_eq!(v["blob_size"].as_u64(), Some(blob.len() as u64), "{v}");
    assert_eq!(
        v["blob_digest"].as_str(),
        Some(sha256_hex(&blob).as_str()),
        "{v}"
    );
    for k in ["toc_digest", "diff_id"] {
        let d = v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}"));
        assert!(d.starts_with("sha256:") && d.len() == 71, "{k} = {d}");
    }
    assert!(v["annotations"].is_object(), "{v}");
    v
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("no string {k} in {v}"))
}

/// The uncompressed tar stream inside a blob (all gzip members or zstd frames).
fn decompress(blob: &[u8], format: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if format == "estargz" {
        flate2::read::MultiGzDecoder::new(blob)
            .read_to_end(&mut out)
            .expect("gunzip blob");
    } else {
        out = zstd::stream::decode_all(blob).expect("zstd -d blob");
    }
    out
}

/// The blob, decompressed, is a valid tar with exactly the corpus entries (plus the
/// landmark and, for eStargz, the TOC entry `stargz.index.json`).
fn check_plain_tar_view(what: &str, tar: &[u8], es: &[ExpectedEntry]) {
    let mut got: Vec<ExpectedEntry> = tar_entries(tar)
        .into_iter()
        .filter(|e| e.path != "/stargz.index.json" && !LANDMARKS.contains(&e.path.as_str()))
        .collect();
    let mut want = es.to_vec();
    got.sort_by(|a, b| a.path.cmp(&b.path));
    want.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(
        got.iter().map(|e| &e.path).collect::<Vec<_>>(),
        want.iter().map(|e| &e.path).collect::<Vec<_>>(),
        "{what}: decompressed tar has other paths"
    );
    for (g, w) in got.iter().zip(&want) {
        if g != w {
            let mut g2 = g.clone();
            let mut w2 = w.clone();
            g2.content.clear();
            w2.content.clear();
            panic!(
                "{what}: tar entry {} differs (content equal: {})\nexpected {w2:?}\ngot      {g2:?}",
                w.path,
                g.content == w.content
            );
        }
    }
}

/// What `estargz-ref ls --long` prints for an oracle entry.
fn ref_long_line(e: &ExpectedEntry) -> String {
    let mtime = if e.mtime == 0 {
        "-".to_string()
    } else {
        rfc3339(e.mtime)
    };
    let digest = if e.kind == "reg" {
        sha256_hex(&e.content)
    } else {
        "-".into()
    };
    let xattrs: Vec<String> = e
        .xattrs
        .iter()
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect();
    let xattrs = if xattrs.is_empty() {
        "-".to_string()
    } else {
        xattrs.join(",")
    };
    format!(
        "{}\t{mtime}\t{}:{}\t{digest}\t{xattrs}",
        e.ls_line(),
        e.dev_major,
        e.dev_minor
    )
}

/// Owner names as a TOC reader resolves them (a missing name inherits the last
/// name seen for the same id).
fn check_owner_names(what: &str, toc: &Value, es: &[ExpectedEntry]) {
    let mut users: BTreeMap<u64, String> = BTreeMap::new();
    let mut groups: BTreeMap<u64, String> = BTreeMap::new();
    let mut checked = 0;
    for t in toc["entries"].as_array().expect("TOC entries") {
        if t["type"] == "chunk" {
            continue;
        }
        let uid = t["uid"].as_u64().unwrap_or(0);
        let gid = t["gid"].as_u64().unwrap_or(0);
        let resolve = |m: &mut BTreeMap<u64, String>, id: u64, key: &str| match t[key].as_str() {
            Some(n) if !n.is_empty() => {
                m.insert(id, n.to_string());
                n.to_string()
            }
            _ => m.get(&id).cloned().unwrap_or_default(),
        };
        let uname = resolve(&mut users, uid, "userName");
        let gname = resolve(&mut groups, gid, "groupName");
        let path = norm_path(t["name"].as_str().unwrap());
        if let Some(e) = es.iter().find(|e| e.path == path) {
            assert_eq!(
                (uname.as_str(), gname.as_str()),
                (e.uname.as_str(), e.gname.as_str()),
                "{what}: owner names of {path}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, es.len(), "{what}: TOC entries vs corpus");
}

// ---------------------------------------------------------------- lazysnap writes, stargz reads

fn lazysnap_writes_stargz_reads(format: &str) {
    let Some(eref) = estargz_ref() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (input, es) = write_corpus(dir.path(), corpus_tar(CHUNK));
    let blob_path = dir.path().join("out.blob");
    let chunk = CHUNK.to_string();
    let v = convert(&input, &blob_path, format, &["--chunk-size", &chunk]);
    let what = format!("lazysnap {format} -> estargz-ref");
    let blob = p(&blob_path);
    let eref_cmd = |args: &[&str]| {
        let mut c = Command::new(&eref);
        c.args(args);
        c
    };

    // The TOC digest verifies and every chunk matches its chunkDigest.
    let out = ok(&mut eref_cmd(&["verify", blob, s(&v, "toc_digest")]));
    assert!(
        lines(&out).iter().any(|l| l == "OK"),
        "{what}: verify printed {}",
        String::from_utf8_lossy(&out)
    );
    let out = kv(&out);
    assert_eq!(
        out.get("toc-digest").map(String::as_str),
        Some(s(&v, "toc_digest"))
    );
    let chunks: u64 = out["chunks"].parse().unwrap();
    assert!(
        chunks > 20,
        "{what}: only {chunks} chunks at chunk size {CHUNK}"
    );
    // A wrong TOC digest is refused by the reference reader.
    let wrong = sha256_hex(b"not the toc");
    assert!(
        !eref_cmd(&["verify", blob, &wrong])
            .output()
            .unwrap()
            .status
            .success()
    );

    // Same entries and attributes (mtime, devices, file digests, xattrs).
    let got: Vec<String> = lines(&ok(&mut eref_cmd(&["ls", blob, "--long"])));
    let landmarks: Vec<&String> = got.iter().filter(|l| is_landmark(l)).collect();
    assert_eq!(landmarks.len(), 1, "{what}: landmarks {landmarks:?}");
    assert!(
        landmarks[0].starts_with("/.no.prefetch.landmark\treg\t1\t"),
        "{what}: {landmarks:?}"
    );
    // Equivalent spellings: an empty file may carry the empty digest or none, and a
    // zero mtime may be written as the epoch or left out (stargz leaves it out).
    let canon = |l: String| {
        l.replace(
            "\tsha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\t",
            "\t-\t",
        )
        .replace("\t1970-01-01T00:00:00Z\t", "\t-\t")
    };
    let got: Vec<String> = got
        .into_iter()
        .filter(|l| !is_landmark(l))
        .map(canon)
        .collect();
    let mut want: Vec<String> = es.iter().map(ref_long_line).map(canon).collect();
    want.sort();
    assert_same_lines(&what, &want, &got);

    // Owner names survive (userName/groupName).
    let toc: Value = serde_json::from_slice(&ok(&mut eref_cmd(&["toc", blob]))).unwrap();
    check_owner_names(&what, &toc, &es);

    // File contents, through the reference reader.
    check_cat(&what, &es, |path| {
        ok(&mut eref_cmd(&["cat", blob, path.trim_start_matches('/')]))
    });
    assert_eq!(
        ok(&mut eref_cmd(&["cat", blob, ".no.prefetch.landmark"])),
        [0x0f]
    );

    // DiffID and uncompressed size agree with the reference's decompression.
    let d = kv(&ok(&mut eref_cmd(&["diffid", blob])));
    assert_eq!(d["diff-id"], s(&v, "diff_id"), "{what}: diff id");
    assert_eq!(
        d["uncompressed-size"].parse::<u64>().unwrap(),
        v["uncompressed_size"].as_u64().unwrap(),
        "{what}: uncompressed size"
    );

    // Layer annotations a snapshotter reads.
    let ann = &v["annotations"];
    assert_eq!(
        ann["containerd.io/snapshot/stargz/toc.digest"].as_str(),
        Some(s(&v, "toc_digest")),
        "{what}: annotations {ann}"
    );
    assert_eq!(
        ann["io.containers.estargz.uncompressed-size"].as_str(),
        Some(v["uncompressed_size"].to_string().as_str()),
        "{what}: annotations {ann}"
    );

    // An eStargz-agnostic runtime sees the corpus as a plain compressed tar.
    let raw = std::fs::read(&blob_path).unwrap();
    let tar = decompress(&raw, format);
    assert_eq!(
        sha256_hex(&tar),
        s(&v, "diff_id"),
        "{what}: diff id of the stream"
    );
    check_plain_tar_view(&what, &tar, &es);
}

#[test]
fn lazysnap_estargz_read_by_stargz() {
    lazysnap_writes_stargz_reads("estargz");
}

#[test]
fn lazysnap_estargz_zstd_read_by_stargz() {
    lazysnap_writes_stargz_reads("estargz-zstd");
}

/// `--prioritized`: the listed files (and their parents) come first, then
/// `.prefetch.landmark`, as stargz's reader expects for prefetch.
#[test]
fn lazysnap_prioritized_read_by_stargz() {
    let Some(eref) = estargz_ref() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (input, es) = write_corpus(dir.path(), corpus_tar(CHUNK));
    let list = dir.path().join("prioritized.txt");
    let prio = ["/etc/hostname", "/bin/busybox", "/data/multi"];
    std::fs::write(&list, prio.join("\n") + "\n").unwrap();
    for format in ["estargz", "estargz-zstd"] {
        let what = format!("lazysnap {format} --prioritized -> estargz-ref");
        let blob = dir.path().join(format!("{format}.blob"));
        let v = convert(&input, &blob, format, &["--prioritized", p(&list)]);
        let run = |args: &[&str]| ok(Command::new(&eref).args(args));
        run(&["verify", p(&blob), s(&v, "toc_digest")]);
        let toc: Value = serde_json::from_slice(&run(&["toc", p(&blob)])).unwrap();
        let names: Vec<String> = toc["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] != "chunk")
            .map(|e| norm_path(e["name"].as_str().unwrap()))
            .collect();
        let pos = |n: &str| {
            names
                .iter()
                .position(|x| x == n)
                .unwrap_or_else(|| panic!("{what}: {n} not in TOC {names:?}"))
        };
        let landmark = pos("/.prefetch.landmark");
        assert!(
            !names.contains(&"/.no.prefetch.landmark".to_string()),
            "{what}"
        );
        for w in prio.windows(2) {
            assert!(pos(w[0]) < pos(w[1]), "{what}: {} after {}", w[0], w[1]);
        }
        for f in prio.iter().chain(&["/etc", "/bin", "/data"]) {
            assert!(
                pos(f) < landmark,
                "{what}: {f} after the landmark in {names:?}"
            );
        }
        for f in [
            "/data/exact",
            "/dev/null",
            "/xattr/ping",
            "/whiteout/opaque/kept",
        ] {
            assert!(
                pos(f) > landmark,
                "{what}: {f} before the landmark in {names:?}"
            );
        }
        assert_eq!(run(&["cat", p(&blob), ".prefetch.landmark"]), [0x0f]);
        check_cat(&what, &es, |path| {
            run(&["cat", p(&blob), path.trim_start_matches('/')])
        });
    }
}

// ---------------------------------------------------------------- stargz writes, lazysnap reads

fn lazysnap_reads(what: &str, blob: &Path, toc_digest: &str, es: &[ExpectedEntry]) {
    ok(&mut lazysnap(&[
        "layer",
        "verify",
        p(blob),
        "--toc-digest",
        toc_digest,
    ]));
    fails(&mut lazysnap(&[
        "layer",
        "verify",
        p(blob),
        "--toc-digest",
        &sha256_hex(b"wrong"),
    ]));
    let got: Vec<String> = lines(&ok(&mut lazysnap(&["layer", "ls", p(blob)])))
        .into_iter()
        .filter(|l| !is_landmark(l))
        .collect();
    assert_same_lines(what, &ls_lines(es), &got);
    check_cat(what, es, |path| {
        ok(&mut lazysnap(&["layer", "cat", p(blob), path]))
    });
    // The raw TOC is JSON with an entries array.
    let toc: Value = serde_json::from_slice(&ok(&mut lazysnap(&["layer", "toc", p(blob)])))
        .expect("layer toc prints JSON");
    assert!(
        toc["entries"]
            .as_array()
            .is_some_and(|a| a.len() >= es.len()),
        "{what}"
    );
    check_corruption_detected(what, blob, &toc, toc_digest);
}

/// Flip one byte inside the compressed data of `/data/multi` (found through the raw
/// TOC): verification must fail, `cat` of that file must fail without serving bytes,
/// and other files stay readable.
fn check_corruption_detected(what: &str, blob: &Path, toc: &Value, toc_digest: &str) {
    let off = toc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "reg" && norm_path(e["name"].as_str().unwrap()) == "/data/multi")
        .and_then(|e| e["offset"].as_u64())
        .unwrap_or_else(|| panic!("{what}: no offset for /data/multi in the TOC"));
    let mut raw = std::fs::read(blob).unwrap();
    raw[off as usize + 1000] ^= 0x55;
    let bad = blob.with_extension("corrupt");
    std::fs::write(&bad, raw).unwrap();
    fails(&mut lazysnap(&[
        "layer",
        "verify",
        p(&bad),
        "--toc-digest",
        toc_digest,
    ]));
    let out = lazysnap(&["layer", "cat", p(&bad), "/data/multi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{what}: cat of a corrupt chunk");
    assert!(
        out.stdout.is_empty(),
        "{what}: cat served bytes of a corrupt chunk"
    );
    let exact = ok(&mut lazysnap(&["layer", "cat", p(&bad), "/data/exact"]));
    assert_eq!(
        exact.len() as u64,
        CHUNK,
        "{what}: an intact file of a corrupt blob"
    );
}

fn stargz_writes_lazysnap_reads(zstd: bool, prioritized: bool) {
    let Some(eref) = estargz_ref() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (input, es) = write_corpus(dir.path(), corpus_tar(CHUNK));
    let blob = dir.path().join("ref.blob");
    let chunk = CHUNK.to_string();
    let mut args = vec!["build", p(&input), p(&blob), "--chunk-size", &chunk];
    if zstd {
        args.push("--zstd");
    }
    if prioritized {
        args.extend(["--prioritized", "bin/busybox,data/multi,dev/null"]);
    }
    let built = kv(&ok(Command::new(&eref).env("GOMAXPROCS", "1").args(&args)));
    let what = format!("estargz-ref build {} -> lazysnap", args[4..].join(" "));
    lazysnap_reads(&what, &blob, &built["toc-digest"], &es);
}

#[test]
fn stargz_estargz_read_by_lazysnap() {
    stargz_writes_lazysnap_reads(false, false);
}

#[test]
fn stargz_estargz_prioritized_read_by_lazysnap() {
    stargz_writes_lazysnap_reads(false, true);
}

#[test]
fn stargz_estargz_zstd_read_by_lazysnap() {
    stargz_writes_lazysnap_reads(true, false);
}

#[test]
fn stargz_estargz_zstd_prioritized_read_by_lazysnap() {
    stargz_writes_lazysnap_reads(true, true);
}

// ---------------------------------------------------------------- skopeo zstd:chunked, lazysnap reads

/// An OCI image layout at `dir` with one uncompressed layer, tagged `t`.
fn oci_layout(dir: &Path, layer: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = sha256_hex(b);
        std::fs::write(blobs.join(&d[7..]), b).unwrap();
        serde_json::json!({"digest": d, "size": b.len()})
    };
    let l = put(layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [l["digest"]]},
    });
    let c = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": c["digest"], "size": c["size"]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": l["digest"], "size": l["size"]}],
    });
    let m = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": m["digest"], "size": m["size"],
                       "annotations": {"org.opencontainers.image.ref.name": "t"}}],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn read_blob(layout: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap()
}

/// `off:compressedLen:uncompressedLen[:type]`
fn position(v: &str) -> Vec<u64> {
    v.split(':')
        .map(|x| x.parse().unwrap_or_else(|_| panic!("bad position {v}")))
        .collect()
}

#[test]
fn skopeo_zstd_chunked_read_by_lazysnap() {
    let Some(skopeo) = tool("skopeo", None, None) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tar = corpus_tar(CHUNK);
    let es = tar_entries(&tar);
    let (a, b) = (dir.path().join("A"), dir.path().join("B"));
    oci_layout(&a, &tar);
    ok(Command::new(&skopeo).args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-compress",
        "--dest-compress-format",
        "zstd:chunked",
        &format!("oci:{}:t", p(&a)),
        &format!("oci:{}:t", p(&b)),
    ]));
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("index.json")).unwrap()).unwrap();
    let manifest: Value =
        serde_json::from_slice(&read_blob(&b, s(&index["manifests"][0], "digest"))).unwrap();
    let layer = &manifest["layers"][0];
    assert_eq!(
        s(layer, "mediaType"),
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let ann = &layer["annotations"];
    // skopeo 1.9 (c/storage 1.43) writes the io.containers.* keys; later ones the
    // io.github.containers.* keys.
    let get = |k: &str| {
        ann[format!("io.github.containers.zstd-chunked.{k}")]
            .as_str()
            .or(ann[format!("io.containers.zstd-chunked.{k}")].as_str())
            .unwrap_or_else(|| panic!("no zstd-chunked {k} annotation in {ann}"))
    };
    let checksum = get("manifest-checksum");
    let pos = position(get("manifest-position"));
    let blob = read_blob(&b, s(layer, "digest"));
    let (off, len) = (pos[0] as usize, pos[1] as usize);
    assert_eq!(
        sha256_hex(&blob[off..off + len]),
        checksum,
        "skopeo's own annotation"
    );
    let blob_path = dir.path().join("skopeo.blob");
    std::fs::write(&blob_path, &blob).unwrap();
    lazysnap_reads("skopeo zstd:chunked -> lazysnap", &blob_path, checksum, &es);
}

// ---------------------------------------------------------------- lazysnap zstd:chunked round trip

#[test]
fn lazysnap_zstd_chunked_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let tar = corpus_tar(CHUNK);
    let (input, es) = write_corpus(dir.path(), tar.clone());
    let blob_path = dir.path().join("out.blob");
    let v = convert(&input, &blob_path, "zstd-chunked", &[]);
    let what = "lazysnap zstd-chunked round trip";
    let blob = std::fs::read(&blob_path).unwrap();
    let ann = &v["annotations"];
    let key = |k: &str| {
        ann[format!("io.github.containers.zstd-chunked.{k}")]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no io.github.containers.zstd-chunked.{k} in {ann}"))
    };
    let checksum = key("manifest-checksum");
    let mpos = position(key("manifest-position"));
    let tpos = position(key("tarsplit-position"));
    assert_eq!(mpos.len(), 4, "manifest-position {mpos:?}");
    assert_eq!(mpos[3], 1, "manifest type");
    assert_eq!(tpos.len(), 3, "tarsplit-position {tpos:?}");
    // The annotations point at the TOC and the tar-split inside the blob.
    let (off, len) = (mpos[0] as usize, mpos[1] as usize);
    assert_eq!(
        sha256_hex(&blob[off..off + len]),
        checksum,
        "{what}: manifest checksum"
    );
    let toc = zstd::stream::decode_all(&blob[off..off + len]).expect("TOC is zstd");
    assert_eq!(toc.len() as u64, mpos[2], "{what}: TOC uncompressed length");
    // for zstd:chunked `toc_digest` is the manifest checksum (sha256 of the compressed
    // TOC, what c/storage checks); `layer verify` accepts the JSON's digest too
    assert_eq!(s(&v, "toc_digest"), checksum, "{what}: toc_digest");
    let json_digest = sha256_hex(&toc);
    let by_toc = [
        "layer",
        "verify",
        p(&blob_path),
        "--toc-digest",
        json_digest.as_str(),
    ];
    ok(&mut lazysnap(&by_toc));
    let toc: Value = serde_json::from_slice(&toc).expect("TOC is JSON");
    let (toff, tlen) = (tpos[0] as usize, tpos[1] as usize);
    assert!(
        toff >= off + len && toff + tlen <= blob.len(),
        "{what}: tar-split range"
    );
    let split = zstd::stream::decode_all(&blob[toff..toff + tlen]).expect("tar-split is zstd");
    assert_eq!(
        split.len() as u64,
        tpos[2],
        "{what}: tar-split uncompressed length"
    );
    assert_eq!(
        toc["tarSplitDigest"].as_str(),
        Some(sha256_hex(&blob[toff..toff + tlen]).as_str()),
        "{what}: tarSplitDigest"
    );
    // Footer: 64-byte payload in a skippable frame, magic "GNUlInUx".
    let footer = &blob[blob.len() - 72..];
    assert_eq!(
        &footer[..4],
        &[0x50, 0x2a, 0x4d, 0x18],
        "{what}: footer frame"
    );
    assert_eq!(&footer[64..], b"GNUlInUx", "{what}: footer magic");
    let le = |i: usize| u64::from_le_bytes(footer[8 + i * 8..16 + i * 8].try_into().unwrap());
    assert_eq!(
        [le(0), le(1), le(2), le(3)],
        [mpos[0], mpos[1], mpos[2], 1],
        "{what}: footer"
    );
    assert_eq!(
        [le(4), le(5), le(6)],
        [tpos[0], tpos[1], tpos[2]],
        "{what}: footer"
    );

    // The stream is the input tar, byte for byte (c/storage keeps DiffIDs stable).
    let stream = decompress(&blob, "zstd-chunked");
    assert_eq!(sha256_hex(&stream), s(&v, "diff_id"), "{what}: diff id");
    assert_eq!(
        v["uncompressed_size"].as_u64(),
        Some(stream.len() as u64),
        "{what}: uncompressed size"
    );
    check_plain_tar_view(what, &stream, &es);
    assert!(
        stream == tar,
        "{what}: decompressed stream differs from the input tar"
    );

    lazysnap_reads(what, &blob_path, checksum, &es);
}

// ---------------------------------------------------------------- implicit parent directories

#[test]
fn missing_parent_dirs_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (input, es) = write_corpus(dir.path(), corpus_without_parent_dirs());
    let eref = estargz_ref();
    for format in ["estargz", "estargz-zstd", "zstd-chunked"] {
        let what = format!("{format} without parent dir entries");
        let blob = dir.path().join(format!("{format}.blob"));
        let v = convert(&input, &blob, format, &[]);
        ok(&mut lazysnap(&[
            "layer",
            "verify",
            p(&blob),
            "--toc-digest",
            s(&v, "toc_digest"),
        ]));
        let got: Vec<String> = lines(&ok(&mut lazysnap(&["layer", "ls", p(&blob)])))
            .into_iter()
            .filter(|l| !is_landmark(l))
            .collect();
        // Every entry is listed; anything else is a directory on the way to one.
        for want in ls_lines(&es) {
            assert!(
                got.contains(&want),
                "{what}: {want:?} missing from {got:#?}"
            );
        }
        for l in got.iter().filter(|l| !ls_lines(&es).contains(l)) {
            let f: Vec<&str> = l.split('\t').collect();
            let prefix = format!("{}/", f[0].trim_end_matches('/'));
            assert!(
                f[1] == "dir" && es.iter().any(|e| e.path.starts_with(&prefix)),
                "{what}: unexpected entry {l:?}"
            );
        }
        check_cat(&what, &es, |path| {
            ok(&mut lazysnap(&["layer", "cat", p(&blob), path]))
        });
        if let (Some(eref), true) = (&eref, format != "zstd-chunked") {
            ok(Command::new(eref).args(["verify", p(&blob), s(&v, "toc_digest")]));
            check_cat(&what, &es, |path| {
                ok(Command::new(eref).args(["cat", p(&blob), path.trim_start_matches('/')]))
            });
        }
    }
}
