//! The oracle the anchors use: an image mounted lazily (`lazysnap mount`, FUSE per
//! layer, overlayfs on top) equals a plain extraction of the same layers stacked with
//! overlayfs — content, mode, ownership, mtime, symlinks, hard links, devices,
//! xattrs and whiteouts — for every format. A chunk corrupted in the registry fails
//! that read with EIO and nothing else.

mod common;

use std::process::Command;

use common::lazy::{LazyMount, Unmount, decompress, extract_overlay_form, snapshot};
use common::registry::{Layer, Registry, require, sha256_hex};
use lazysnap::format::Format;
use lazysnap::format::writer::WriteOptions;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

/// A second layer that deletes, replaces and hides parts of the first.
fn upper_layer(lower: &[u8]) -> Vec<u8> {
    let entries = common::tar_entries(lower);
    let victim = entries
        .iter()
        .find(|e| e.kind == "reg" && e.path.matches('/').count() >= 2 && e.size > 0)
        .unwrap();
    let opaque = entries
        .iter()
        .find(|e| {
            e.kind == "dir"
                && e.path != "/"
                && entries
                    .iter()
                    .filter(|c| c.path.starts_with(&format!("{}/", e.path)))
                    .count()
                    > 1
                && !victim.path.starts_with(&format!("{}/", e.path))
        })
        .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o640);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path.trim_start_matches('/'), data)
            .unwrap();
    };
    let (dir, name) = victim.path.rsplit_once('/').unwrap();
    add(&format!("{dir}/.wh.{name}"), b"");
    add(&format!("{}/.wh..wh..opq", opaque.path), b"");
    add(
        &format!("{}/fresh.txt", opaque.path),
        b"only in the upper layer\n",
    );
    add("/new-top-file", &common::prng_bytes(7, 100_000));
    b.into_inner().unwrap()
}

fn blob(tar: &[u8], format: Format) -> Layer {
    Layer::convert(
        tar,
        &WriteOptions {
            format,
            chunk_size: 4096,
            ..WriteOptions::default()
        },
    )
}

#[test]
fn lazily_mounted_image_equals_plain_extraction() {
    if !require("/usr/bin/docker-registry", "mount differential") {
        return;
    }
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let lower = common::corpus_tar(4096);
    let upper = upper_layer(&lower);

    for format in [Format::Estargz, Format::EstargzZstd, Format::ZstdChunked] {
        let name = format.name();
        let layers = [blob(&lower, format), blob(&upper, format)];
        // reference: plain extraction of the same two blobs (as containerd's
        // overlayfs snapshotter unpacks them), stacked by overlayfs
        let l1 = work.path().join(format!("ref-{name}-l1"));
        let l2 = work.path().join(format!("ref-{name}-l2"));
        extract_overlay_form(&decompress(&layers[0].blob), &l1);
        extract_overlay_form(&decompress(&layers[1].blob), &l2);
        let merged = work.path().join(format!("ref-{name}-merged"));
        std::fs::create_dir_all(&merged).unwrap();
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(format!("lowerdir={}:{}", l2.display(), l1.display()).as_str()),
        )
        .unwrap();
        let _u = Unmount(merged.clone());
        let (mut want, want_links) = snapshot(&merged);
        // the eStargz TOC is a tar entry too; the lazy view, like stargz's, shows the
        // files the TOC lists and not the TOC itself
        want.remove("stargz.index.json");
        assert!(want.len() > 20);
        assert!(!want_links.is_empty(), "the corpus has hard links");

        let digests: Vec<String> = layers
            .iter()
            .map(|l| format!("sha256:{}", sha256_hex(&l.blob)))
            .collect();
        let reference = reg.push_image(&format!("diff/{name}"), "t", &layers);
        let dir = work.path().join(format!("lazy-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        // the layer commands read straight from the registry too
        let v = Command::new(BIN)
            .args(["layer", "verify", &reference, "--layer", "0"])
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "{name}: verify --layer 0: {}",
            String::from_utf8_lossy(&v.stderr)
        );
        let ls = Command::new(BIN)
            .args(["layer", "ls", &reference, "--layer", &digests[1]])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&ls.stdout).contains("/new-top-file"),
            "{name}: ls --layer"
        );
        let m = LazyMount::start(
            &reference,
            &dir,
            &["--no-prefetch", "--no-background-fetch"],
        );
        let (got, got_links) = snapshot(&dir);
        for (path, w) in &want {
            let g = got
                .get(path)
                .unwrap_or_else(|| panic!("{name}: {path} missing"));
            assert_eq!(g, w, "{name}: {path} differs");
        }
        for path in got.keys() {
            assert!(want.contains_key(path), "{name}: unexpected {path}");
        }
        assert_eq!(got_links, want_links, "{name}: hard links");
        let stats = m.stop();
        assert_eq!(stats.as_array().unwrap().len(), 2);
        // the registry served only ranges of the layer blobs, never a whole GET
        // is not provable from the access log sizes alone, so check the bytes
        for (i, s) in stats.as_array().unwrap().iter().enumerate() {
            assert!(s["fetched_bytes"].as_u64().unwrap() > 0);
            let gets = reg.blob_gets(&digests[i]);
            assert!(
                !gets.is_empty() && gets.iter().all(|(s, _)| *s == 206),
                "{gets:?}"
            );
        }
    }
}

#[test]
fn corrupted_chunk_in_the_registry_is_eio_for_that_file_only() {
    if !require("/usr/bin/docker-registry", "corrupted chunk") {
        return;
    }
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let tar = common::corpus_tar(4096);
    let layer = blob(&tar, Format::Estargz);
    let digest = format!("sha256:{}", sha256_hex(&layer.blob));
    // find a big file and a chunk of it, through the same reader the daemon uses
    let l = lazysnap::format::Layer::open(layer.blob.clone(), &Default::default()).unwrap();
    let (victim, vid) = l
        .index()
        .walk()
        .into_iter()
        .find(|(_, id)| l.index().chunks(*id).len() > 1)
        .unwrap();
    let (other, _) = l
        .index()
        .walk()
        .into_iter()
        .find(|(p, id)| {
            *p != victim
                && *id != vid
                && l.index().node(*id).unwrap().kind == lazysnap::format::Kind::Reg
                && l.index().node(*id).unwrap().size > 10
        })
        .unwrap();
    let c = l.index().chunks(vid)[1].clone();
    let reference = reg.push_image("corrupt/estargz", "t", &[layer]);
    let path = reg.blob_path(&digest);
    let mut data = std::fs::read(&path).unwrap();
    data[((c.compressed_offset + c.compressed_end) / 2) as usize] ^= 0xff;
    std::fs::write(&path, data).unwrap();

    let v = Command::new(BIN)
        .args(["layer", "verify", &reference, "--layer", "0"])
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&v.stderr);
    assert!(
        !v.status.success() && msg.contains(victim.as_str()),
        "verify names the file: {msg}"
    );
    let dir = work.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let m = LazyMount::start(
        &reference,
        &dir,
        &["--no-prefetch", "--no-background-fetch"],
    );
    let err = std::fs::read(dir.join(victim.trim_start_matches('/'))).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{victim}: {err}");
    // the mount stays up and other files read correctly
    let expected = common::tar_entries(&tar);
    let got = std::fs::read(dir.join(other.trim_start_matches('/'))).unwrap();
    assert_eq!(got, common::file_content(&expected, &other).unwrap());
    let stats = m.stop();
    assert!(stats[0]["read_errors"].as_u64().unwrap() >= 1);
}
