//! A realistic image, lazily: the python image of `scripts/python-image.sh` (Debian
//! minbase, python3, and an app layer with a whiteout), converted to eStargz, pushed to
//! a real registry and mounted with `lazysnap mount`. python3 runs from the mount in a
//! chroot, the whiteout hides the lower file, and the bytes fetched stay far below the
//! image's compressed size.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::lazy::{LazyMount, Unmount, decompress, extract_overlay_form, snapshot};
use common::registry::{Layer, Registry, require};

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

/// Under `CI=true` a missing prerequisite fails the test; otherwise it is skipped.
fn skip_or_fail(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("python image mount: {why} (CI=true)");
    }
    eprintln!("skipped: python image mount: {why}");
}

/// Runs a command to completion, killing it if it runs longer than `limit` (a stuck
/// FUSE read must fail the test, not hang it).
fn run(cmd: &mut Command, what: &str, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `lazysnap layer convert TAR OUT --format estargz --json`, as a pushable layer.
fn convert(tar: &Path, out: &Path) -> Layer {
    let o = run(
        Command::new(BIN)
            .args(["layer", "convert"])
            .arg(tar)
            .arg(out)
            .args(["--format", "estargz", "--json"]),
        "lazysnap layer convert",
        Duration::from_secs(600),
    );
    assert!(
        o.status.success(),
        "convert {}: {}",
        tar.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let annotations = v["annotations"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    Layer {
        blob: std::fs::read(out).unwrap(),
        media_type: v["media_type"].as_str().unwrap().to_string(),
        annotations,
        diff_id: v["diff_id"].as_str().unwrap().to_string(),
    }
}

/// Bytes the registry's access log says it sent for GETs of blob `digest`.
fn registry_bytes_sent(log: &str, digest: &str) -> u64 {
    common::registry::blob_gets_in(log, digest)
        .iter()
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn python_image_runs_from_a_lazy_mount_and_fetches_little() {
    if !require("/usr/bin/docker-registry", "python image mount") {
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        return skip_or_fail("needs root (FUSE, overlayfs, chroot)");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/python-image.sh");
    // the first run debootstraps and installs python3: minutes
    let o = run(
        &mut Command::new(&script),
        "scripts/python-image.sh",
        Duration::from_secs(3600),
    );
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        let tail: Vec<&str> = err.lines().rev().take(10).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return skip_or_fail(&format!(
            "{} failed ({}): {}",
            script.display(),
            o.status,
            tail.join(" | ")
        ));
    }
    let tars: Vec<PathBuf> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(tars.len(), 3, "python-image.sh prints base, python, app");

    // the whiteout of the app layer and the lower file it must hide
    let app = common::tar_entries(&std::fs::read(&tars[2]).unwrap());
    let wh = app
        .iter()
        .find(|e| {
            let name = e.path.rsplit('/').next().unwrap();
            name.starts_with(".wh.") && name != ".wh..wh..opq"
        })
        .expect("app.tar has a whiteout");
    let (parent, name) = wh.path.rsplit_once('/').unwrap();
    let hidden = format!("{parent}/{}", &name[4..]);
    let python = common::tar_entries(&std::fs::read(&tars[1]).unwrap());
    let lower = python
        .iter()
        .find(|e| e.path == hidden)
        .unwrap_or_else(|| panic!("{hidden} is not in python.tar"));
    assert_eq!(lower.kind, "reg");

    let work = tempfile::tempdir().unwrap();
    let mut layers = Vec::new();
    for (i, t) in tars.iter().enumerate() {
        layers.push(convert(t, &work.path().join(format!("layer{i}.blob"))));
    }
    let digests: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", common::registry::sha256_hex(&l.blob)))
        .collect();
    let total: u64 = layers.iter().map(|l| l.blob.len() as u64).sum();
    let reg = Registry::start();
    let reference = reg.push_image("lazysnap/python", "3", &layers);
    let log_before = reg.log();
    let pushed: u64 = digests
        .iter()
        .map(|d| registry_bytes_sent(&log_before, d))
        .sum();
    assert_eq!(pushed, 0, "no blob was read before mounting");

    let dir = work.path().join("rootfs");
    std::fs::create_dir_all(&dir).unwrap();
    let m = LazyMount::start(&reference, &dir, &["--no-background-fetch"]);

    let chroot = |args: &[&str]| {
        let o = run(
            Command::new("/usr/sbin/chroot")
                .arg(&dir)
                .args(args)
                .env_clear()
                .env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                )
                .env("LANG", "C.UTF-8"),
            "chroot",
            Duration::from_secs(300),
        );
        assert!(
            o.status.success(),
            "chroot {args:?}: {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(chroot(&["/usr/bin/python3", "-c", "print(1)"]), "1\n");
    assert_eq!(chroot(&["/usr/bin/python3", "/app/hello.py"]), "hello\n");

    // the whiteout hides the python layer's file, and only that
    let rel = |p: &str| dir.join(p.trim_start_matches('/'));
    let err = std::fs::symlink_metadata(rel(&hidden)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{hidden}: {err}");
    let listed: Vec<String> = std::fs::read_dir(rel(parent))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!listed.contains(&name[4..].to_string()), "{hidden} listed");
    assert!(!listed.contains(&name.to_string()), "{name} listed");
    let sibling = python
        .iter()
        .find(|e| e.kind == "reg" && e.path.starts_with(&format!("{parent}/")) && e.path != hidden)
        .expect("another file next to the hidden one");
    assert_eq!(
        std::fs::read(rel(&sibling.path)).unwrap(),
        sibling.content,
        "{}",
        sibling.path
    );

    let stats = m.stop();
    let stats = stats.as_array().expect("stats is a list of layers");
    assert_eq!(stats.len(), 3);
    let mut fetched = 0;
    for (i, s) in stats.iter().enumerate() {
        assert_eq!(
            s["blob_size"].as_u64().unwrap(),
            layers[i].blob.len() as u64
        );
        assert_eq!(s["read_errors"].as_u64().unwrap(), 0, "layer {i}: {s}");
        fetched += s["fetched_bytes"].as_u64().unwrap();
    }
    // what left the registry, TOCs and footers included
    let log = reg.log();
    let sent: u64 = digests.iter().map(|d| registry_bytes_sent(&log, d)).sum();
    assert!(sent >= fetched, "registry sent {sent} < fetched {fetched}");
    let frac = fetched as f64 / total as f64;
    let sent_frac = sent as f64 / total as f64;
    println!(
        "python image: {total} compressed bytes in 3 eStargz layers; fetched {fetched} bytes of \
         chunks ({:.1} %), registry sent {sent} bytes in all ({:.1} %, footers and TOCs included)",
        frac * 100.0,
        sent_frac * 100.0
    );
    for (i, s) in stats.iter().enumerate() {
        println!(
            "  layer {i}: blob {} bytes, fetched {} bytes in {} requests, served {} bytes",
            s["blob_size"], s["fetched_bytes"], s["fetch_requests"], s["served_bytes"]
        );
    }
    assert!(fetched > 0, "python3 ran without fetching a byte");
    assert!(
        sent_frac < 0.5,
        "fetched {sent} of {total} compressed bytes ({:.1} %), expected < 50 %",
        sent_frac * 100.0
    );

    // the oracle: the same three blobs extracted plainly and stacked by overlayfs
    // equal the lazily mounted tree (read in full through FUSE this time)
    let mut lowers = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let d = work.path().join(format!("plain{i}"));
        extract_overlay_form(&decompress(&l.blob), &d);
        lowers.push(d.display().to_string());
    }
    lowers.reverse();
    let merged = work.path().join("plain-merged");
    std::fs::create_dir_all(&merged).unwrap();
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(format!("lowerdir={}", lowers.join(":")).as_str()),
    )
    .unwrap();
    let _u = Unmount(merged.clone());
    let (mut want, want_links) = snapshot(&merged);
    want.remove("stargz.index.json");
    let m = LazyMount::start(
        &reference,
        &dir,
        &["--no-prefetch", "--no-background-fetch"],
    );
    let (got, got_links) = snapshot(&dir);
    let stats = m.stop();
    for (path, w) in &want {
        let g = got
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from the lazy mount"));
        assert_eq!(g, w, "{path} differs");
    }
    for path in got.keys() {
        assert!(
            want.contains_key(path),
            "unexpected {path} in the lazy mount"
        );
    }
    assert_eq!(got_links, want_links, "hard links");
    println!(
        "differential: {} entries identical; whole image read through FUSE: {stats}",
        want.len()
    );
}
