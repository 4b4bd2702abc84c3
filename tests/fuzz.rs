//! Property-based fuzzing of everything that parses outside input: footers, TOCs,
//! tar headers, whole blobs. cargo-fuzz needs a nightly toolchain, which these
//! machines lack, so proptest drives the same targets; `PROPTEST_CASES` bounds the
//! run time in CI.

mod common;

use std::sync::OnceLock;

use lazysnap::format::footer;
use lazysnap::format::index::Index;
use lazysnap::format::tarhdr;
use lazysnap::format::toc::{self, Toc, TocEntry};
use lazysnap::format::writer::{WriteOptions, write_layer};
use lazysnap::format::{Format, Layer, OpenOptions};
use proptest::prelude::*;

/// The corpus tar and, per format, its blob and TOC digest.
type Sample = (Vec<u8>, Vec<(Format, Vec<u8>, String)>);

fn sample() -> &'static Sample {
    static S: OnceLock<Sample> = OnceLock::new();
    S.get_or_init(|| {
        let tar = common::corpus_tar(512);
        let blobs = [Format::Estargz, Format::EstargzZstd, Format::ZstdChunked]
            .into_iter()
            .map(|f| {
                let mut out = Vec::new();
                let r = write_layer(
                    &tar,
                    &mut out,
                    &WriteOptions {
                        format: f,
                        chunk_size: 512,
                        ..WriteOptions::default()
                    },
                )
                .unwrap();
                (f, out, r.toc_digest)
            })
            .collect();
        (tar, blobs)
    })
}

fn entry_strategy() -> impl Strategy<Value = TocEntry> {
    let names = prop::sample::select(vec![
        "", ".", "..", "a", "a/b", "a/../b", "/x/y", "./c", "a/b/c", "d/", "e", "..a",
    ]);
    let kinds = prop::sample::select(vec![
        "dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "bogus",
    ]);
    let nums = prop_oneof![
        Just(0i64),
        Just(1i64),
        Just(-1i64),
        Just(i64::MAX),
        0i64..5000
    ];
    (
        names.clone(),
        kinds,
        nums.clone(),
        nums.clone(),
        nums.clone(),
        nums.clone(),
        names,
        any::<bool>(),
        nums,
    )
        .prop_map(
            |(name, kind, size, offset, chunk_offset, chunk_size, link, digest, end)| TocEntry {
                name: name.to_string(),
                kind: kind.to_string(),
                size,
                offset,
                chunk_offset,
                chunk_size,
                end_offset: end,
                link_name: link.to_string(),
                chunk_digest: if digest {
                    lazysnap::format::Digest::of(b"x").to_string()
                } else {
                    String::new()
                },
                modtime: "2020-01-01T00:00:00Z".into(),
                ..TocEntry::default()
            },
        )
}

proptest! {
    #[test]
    fn footer_parse_never_panics(tail in prop::collection::vec(any::<u8>(), 0..100), extra in 0u64..1_000_000) {
        let _ = footer::parse(&tail, tail.len() as u64 + extra);
    }

    #[test]
    fn footer_parse_of_mutated_footers(which in 0usize..3, pos in 0usize..72, val in any::<u8>()) {
        let (_, blobs) = sample();
        let blob = &blobs[which].1;
        let mut tail = blob[blob.len() - 72..].to_vec();
        tail[pos] = val;
        let _ = footer::parse(&tail, blob.len() as u64);
    }

    #[test]
    fn toc_json_never_panics(json in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(t) = toc::parse_json(&json) {
            let _ = Index::build(&t, 1000);
        }
    }

    #[test]
    fn index_build_never_panics(entries in prop::collection::vec(entry_strategy(), 0..24), data_end in 0u64..10_000) {
        let t = Toc { version: 1, entries, ..Toc::default() };
        if let Ok(idx) = Index::build(&t, data_end) {
            for (_, id) in idx.walk() {
                let _ = idx.chunks(id);
                let _ = idx.chunk_at(id, 3);
            }
        }
    }

    #[test]
    fn tar_scan_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = tarhdr::scan(&bytes);
    }

    #[test]
    fn mutated_tars_convert_or_fail_cleanly(pos in 0usize..4096, val in any::<u8>(), cut in 0usize..64) {
        let (tar, _) = sample();
        let mut t = tar.clone();
        let p = pos % t.len();
        t[p] = val;
        t.truncate(t.len() - cut * 7);
        let _ = write_layer(&t, &mut Vec::new(), &WriteOptions { chunk_size: 512, ..WriteOptions::default() });
    }

    /// A blob damaged anywhere either fails to open or serves only correct bytes.
    #[test]
    fn mutated_blobs_never_serve_wrong_bytes(which in 0usize..3, pos in any::<prop::sample::Index>(), val in 1u8..=255) {
        let (tar, blobs) = sample();
        let (format, blob, digest) = &blobs[which];
        let mut b = blob.clone();
        let p = pos.index(b.len());
        b[p] ^= val;
        let opts = OpenOptions { toc_digest: Some(digest.parse().unwrap()), ..OpenOptions::default() };
        if let Ok(layer) = Layer::open(b, &opts) {
            let expected = common::tar_entries(tar);
            for (path, id) in layer.index().walk() {
                let Some(want) = common::file_content(&expected, &path) else { continue };
                let mut got = Vec::new();
                if layer.copy_file(id, &path, &mut got).is_ok() {
                    prop_assert!(got == want, "{:?}: {} served wrong bytes", format, path);
                }
            }
        }
    }
}
