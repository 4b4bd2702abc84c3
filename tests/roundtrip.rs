//! Round trip of every writable format: the corpus tar is converted, opened again
//! through its footer and TOC, and every entry's bytes and metadata must equal the
//! input tar's.

mod common;

use std::collections::HashMap;
use std::io::Read;

use common::{ExpectedEntry, corpus_tar, corpus_without_parent_dirs, tar_entries};
use lazysnap::format::writer::{WriteOptions, write_layer};
use lazysnap::format::{Digest, Format, Kind, Layer, OpenOptions};

const FORMATS: [Format; 3] = [Format::Estargz, Format::EstargzZstd, Format::ZstdChunked];

fn convert(
    tar: &[u8],
    format: Format,
    chunk: u64,
    threads: usize,
) -> (Vec<u8>, lazysnap::format::writer::WriteResult) {
    common::convert(
        tar,
        &WriteOptions {
            format,
            chunk_size: chunk,
            threads: Some(threads),
            ..WriteOptions::default()
        },
    )
}

/// The last entry per path wins, as in extraction.
fn final_entries(entries: &[ExpectedEntry]) -> HashMap<String, ExpectedEntry> {
    entries
        .iter()
        .map(|e| (e.path.clone(), e.clone()))
        .collect()
}

fn check_layer(tar: &[u8], blob: Vec<u8>, toc_digest: &str, format: Format) {
    let layer = Layer::open(
        blob,
        &OpenOptions {
            toc_digest: Some(toc_digest.parse().unwrap()),
            ..OpenOptions::default()
        },
    )
    .expect("open");
    assert_eq!(layer.format(), format);
    let idx = layer.index();
    let expected = tar_entries(tar);
    let finals = final_entries(&expected);
    for (path, e) in &finals {
        let id = idx
            .lookup_path(path)
            .unwrap_or_else(|| panic!("{format:?}: {path} missing"));
        let n = idx.node(id).unwrap();
        if e.kind == "hardlink" {
            let target = idx.lookup_path(e.link.as_deref().unwrap()).unwrap();
            assert_eq!(id, target, "{path}: hard link shares the target's node");
            assert!(n.nlink >= 2, "{path}: nlink {}", n.nlink);
            continue;
        }
        let kind = match e.kind {
            "dir" => Kind::Dir,
            "reg" => Kind::Reg,
            "symlink" => Kind::Symlink,
            "char" => Kind::Char,
            "block" => Kind::Block,
            "fifo" => Kind::Fifo,
            k => panic!("{k}"),
        };
        assert_eq!(n.kind, kind, "{format:?} {path}: kind");
        if path == "/" {
            continue;
        }
        assert_eq!(n.mode, e.mode & 0o7777, "{format:?} {path}: mode");
        assert_eq!(n.uid as u64, e.uid, "{path}: uid");
        assert_eq!(n.gid as u64, e.gid, "{path}: gid");
        assert_eq!(n.mtime as u64, e.mtime, "{path}: mtime");
        let xattrs: Vec<(String, Vec<u8>)> = e.xattrs.clone().into_iter().collect();
        assert_eq!(idx.xattrs(id), xattrs.as_slice(), "{path}: xattrs");
        match kind {
            Kind::Reg => {
                assert_eq!(n.size, e.content.len() as u64, "{path}: size");
                let mut got = Vec::new();
                layer.copy_file(id, path, &mut got).expect("read");
                assert!(got == e.content, "{format:?} {path}: content differs");
                // a read in the middle, across a chunk boundary
                if got.len() > 3 {
                    let mut buf = vec![0u8; got.len() / 2];
                    let off = got.len() as u64 / 3;
                    let r = layer.read_at(id, path, off, &mut buf).unwrap();
                    assert_eq!(&buf[..r], &got[off as usize..off as usize + r]);
                }
            }
            Kind::Symlink => assert_eq!(idx.link_target(id), e.link.as_deref()),
            Kind::Char | Kind::Block => {
                assert_eq!(idx.rdev(id), (e.dev_major, e.dev_minor), "{path}: rdev")
            }
            _ => {}
        }
    }
    let report = layer.verify_all().expect("verify");
    assert!(report.chunks > 0);
}

fn decompress_all(format: Format, blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match format.compression() {
        lazysnap::format::Compression::Gzip => {
            flate2::read::MultiGzDecoder::new(blob)
                .read_to_end(&mut out)
                .unwrap();
        }
        lazysnap::format::Compression::Zstd => {
            zstd::stream::read::Decoder::new(blob)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
        }
    }
    out
}

#[test]
fn every_format_round_trips_the_corpus() {
    for chunk in [64u64, 4096, 1 << 20] {
        let tar = corpus_tar(chunk);
        for format in FORMATS {
            let (blob, res) = convert(&tar, format, chunk, 2);
            // the blob is a valid compressed tar whose digest is the diff id
            let plain = decompress_all(format, &blob);
            assert_eq!(
                Digest::of(&plain).to_string(),
                res.diff_id,
                "{format:?}: diff id"
            );
            assert_eq!(plain.len() as u64, res.uncompressed_size);
            assert_eq!(Digest::of(&blob).to_string(), res.blob_digest);
            let again = tar_entries(&plain);
            let input = tar_entries(&tar);
            for e in &input {
                assert!(
                    again.iter().any(|a| a == e),
                    "{format:?}: {} lost in the tar stream",
                    e.path
                );
            }
            check_layer(&tar, blob, &res.toc_digest, format);
        }
    }
}

#[test]
fn output_does_not_depend_on_thread_count() {
    let tar = corpus_tar(256);
    for format in FORMATS {
        let (a, ra) = convert(&tar, format, 256, 1);
        let (b, rb) = convert(&tar, format, 256, 3);
        assert!(a == b, "{format:?}: blobs differ between 1 and 3 threads");
        assert_eq!(ra.toc_digest, rb.toc_digest);
    }
}

#[test]
fn layers_without_parent_directories() {
    let tar = corpus_without_parent_dirs();
    for format in FORMATS {
        let (blob, res) = convert(&tar, format, 4096, 2);
        let layer = Layer::open(blob, &OpenOptions::default()).unwrap();
        for e in tar_entries(&tar) {
            let id = layer.index().lookup_path(&e.path).expect("entry present");
            // every ancestor exists as a directory
            let mut p = e.path.as_str();
            while let Some((parent, _)) = p.rsplit_once('/') {
                if parent.is_empty() {
                    break;
                }
                let pid = layer.index().lookup_path(parent).expect("implicit parent");
                assert_eq!(layer.index().node(pid).unwrap().kind, Kind::Dir);
                p = parent;
            }
            assert!(layer.index().node(id).is_some());
        }
        check_layer(&tar, layer.source().clone(), &res.toc_digest, format);
    }
}

#[test]
fn prioritized_files_come_first_with_a_landmark() {
    let tar = corpus_tar(4096);
    let entries = tar_entries(&tar);
    let regs: Vec<&ExpectedEntry> = entries
        .iter()
        .filter(|e| e.kind == "reg" && e.size > 0 && e.path.matches('/').count() > 1)
        .take(2)
        .collect();
    assert_eq!(regs.len(), 2);
    let prio: Vec<String> = regs.iter().rev().map(|e| e.path.clone()).collect();
    for format in FORMATS {
        let mut out = Vec::new();
        let res = write_layer(
            &tar,
            &mut out,
            &WriteOptions {
                format,
                chunk_size: 4096,
                prioritized: prio.iter().cloned().chain(["/nope".to_string()]).collect(),
                ..WriteOptions::default()
            },
        )
        .unwrap();
        assert_eq!(res.missing_prioritized, vec!["/nope".to_string()]);
        let layer = Layer::open(out, &OpenOptions::default()).unwrap();
        let toc = lazysnap::format::toc::parse_json(&layer.toc().json).unwrap();
        let names: Vec<String> = toc
            .entries
            .iter()
            .filter(|e| e.kind != "chunk")
            .map(|e| common::norm_path(&e.name))
            .collect();
        let landmark = names
            .iter()
            .position(|n| n == "/.prefetch.landmark")
            .unwrap();
        for p in &prio {
            let i = names.iter().position(|n| n == p).unwrap();
            assert!(i < landmark, "{format:?}: {p} after the landmark");
            // parents precede
            let parent = &p[..p.rfind('/').unwrap()];
            if let Some(j) = names.iter().position(|n| n == parent) {
                assert!(j < i);
            }
        }
        assert!(
            names.iter().position(|n| n == &prio[0]) < names.iter().position(|n| n == &prio[1])
        );
        let end = layer.index().prefetch_end().expect("prefetch end");
        assert!(end > 0);
        check_layer(&tar, layer.source().clone(), &res.toc_digest, format);
    }
}

#[test]
fn no_prefetch_landmark_without_priorities() {
    let tar = corpus_tar(4096);
    let (blob, _) = convert(&tar, Format::Estargz, 4096, 1);
    let layer = Layer::open(blob, &OpenOptions::default()).unwrap();
    assert!(layer.index().no_prefetch());
    assert!(layer.index().prefetch_end().is_none());
    let (blob, _) = convert(&tar, Format::ZstdChunked, 4096, 1);
    let layer = Layer::open(blob, &OpenOptions::default()).unwrap();
    assert!(
        !layer.index().no_prefetch(),
        "zstd:chunked gets no landmark file"
    );
    assert!(
        layer
            .index()
            .lookup_path("/.no.prefetch.landmark")
            .is_none()
    );
}

#[test]
fn converting_an_estargz_blob_again_is_stable() {
    // a converted layer is itself a tar.gz: converting it again drops the old TOC
    // and landmark and yields the same TOC
    let tar = corpus_tar(4096);
    let (blob, res) = convert(&tar, Format::Estargz, 4096, 2);
    let plain = decompress_all(Format::Estargz, &blob);
    let (blob2, res2) = convert(&plain, Format::Estargz, 4096, 2);
    assert_eq!(res.toc_digest, res2.toc_digest);
    assert_eq!(res.diff_id, res2.diff_id);
    assert!(blob == blob2);
}
