//! Bad input: truncated and corrupted footers, wrong magic, TOC offsets past the end,
//! invalid JSON, escaping names, overlapping chunks, giant sizes and corrupted chunks.
//! Each must give a clear error — never a panic, never a wrong byte.

mod common;

use lazysnap::Error;
use lazysnap::format::footer;
use lazysnap::format::writer::{WriteOptions, write_layer};
use lazysnap::format::{Format, Layer, OpenOptions};

fn blob_of(tar: &[u8], format: Format) -> (Vec<u8>, String) {
    let (out, res) = common::convert(
        tar,
        &WriteOptions {
            format,
            chunk_size: 4096,
            ..WriteOptions::default()
        },
    );
    (out, res.toc_digest)
}

fn open(blob: Vec<u8>) -> Result<Layer<Vec<u8>>, Error> {
    Layer::open(blob, &OpenOptions::default())
}

fn err_text(r: Result<Layer<Vec<u8>>, Error>) -> String {
    match r {
        Ok(_) => panic!("bad input was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_blobs_and_footers() {
    let (blob, _) = blob_of(&common::corpus_tar(4096), Format::Estargz);
    for cut in [1usize, 10, 40, 51, 52, 200] {
        let b = blob[..blob.len() - cut].to_vec();
        let msg = err_text(open(b));
        assert!(
            msg.contains("footer") || msg.contains("table of contents"),
            "{msg}"
        );
    }
    assert!(err_text(open(Vec::new())).contains("footer"));
    assert!(err_text(open(vec![0u8; 10])).contains("footer"));
}

#[test]
fn corrupted_footer_bytes_and_magic() {
    for format in [Format::Estargz, Format::EstargzZstd, Format::ZstdChunked] {
        let (blob, _) = blob_of(&common::corpus_tar(4096), format);
        for i in 1..=8 {
            let mut b = blob.clone();
            let n = b.len();
            b[n - i] ^= 0x5a;
            // either recognised as no footer, or the TOC it points at fails
            let _ = err_text(open(b));
        }
    }
    // "STARGZ" replaced
    let mut f = footer::estargz_footer(10).to_vec();
    f[32] = b'X';
    let mut b = vec![0u8; 10];
    b.extend(f);
    assert!(err_text(open(b)).contains("footer"));
}

#[test]
fn toc_offsets_past_the_end() {
    let mut b = vec![0u8; 100];
    b.extend_from_slice(&footer::estargz_footer(5000));
    assert!(err_text(open(b)).contains("footer"));
    let mut b = vec![0u8; 100];
    b.extend_from_slice(&footer::zstd40_footer(50, 1 << 40, 100));
    assert!(err_text(open(b)).contains("past the footer"));
    let mut b = vec![0u8; 100];
    b.extend_from_slice(&footer::zstd40_footer(8, 10, u64::MAX));
    assert!(err_text(open(b)).contains("limit"));
}

#[test]
fn invalid_json_and_wrong_version() {
    assert!(err_text(open(common::estargz_with_toc(b"", "{not json"))).contains("invalid JSON"));
    assert!(
        err_text(open(common::estargz_with_toc(
            b"",
            r#"{"version":2,"entries":[]}"#
        )))
        .contains("version")
    );
    assert!(
        err_text(open(common::estargz_with_toc(
            b"",
            r#"{"version":1,"entries":[{"name":"a","type":"weird"}]}"#
        )))
        .contains("unknown type")
    );
}

#[test]
fn names_that_escape_are_rejected() {
    for name in ["../etc/passwd", "a/../../b", "/../x", "./.."] {
        let json = format!(r#"{{"version":1,"entries":[{{"name":"{name}","type":"dir"}}]}}"#);
        let msg = err_text(open(common::estargz_with_toc(b"", &json)));
        assert!(msg.contains("escapes"), "{name}: {msg}");
    }
    let json = r#"{"version":1,"entries":[{"name":"a","type":"reg"},{"name":"h","type":"hardlink","linkName":"../a"}]}"#;
    assert!(err_text(open(common::estargz_with_toc(b"", json))).contains("escapes"));
    // absolute names stay inside the root
    let json = r#"{"version":1,"entries":[{"name":"/abs/dir","type":"dir"}]}"#;
    let l = open(common::estargz_with_toc(b"", json)).unwrap();
    assert!(l.index().lookup_path("abs/dir").is_some());
}

#[test]
fn overlapping_and_oversized_chunks() {
    let data = common::gz(b"0123456789");
    let d = lazysnap::format::Digest::of(b"01234").to_string();
    // two chunks covering the same bytes
    let json = format!(
        r#"{{"version":1,"entries":[{{"name":"f","type":"reg","size":10,"offset":1,"chunkSize":5,"chunkDigest":"{d}"}},{{"name":"f","type":"chunk","offset":1,"chunkOffset":3,"chunkDigest":"{d}"}}]}}"#
    );
    let mut blob = vec![0u8];
    blob.extend_from_slice(&data);
    let msg = err_text(open(common::estargz_with_toc(&blob, &json)));
    assert!(msg.contains("overlap"), "{msg}");
    // a size near u64::MAX
    let json = r#"{"version":1,"entries":[{"name":"f","type":"reg","size":9223372036854775807,"offset":1}]}"#;
    let r = open(common::estargz_with_toc(&blob, json));
    if let Ok(l) = r {
        let id = l.index().lookup_path("f").unwrap();
        let mut buf = [0u8; 16];
        assert!(l.read_at(id, "f", 0, &mut buf).is_err());
    }
    let json = r#"{"version":1,"entries":[{"name":"f","type":"reg","size":-5,"offset":1}]}"#;
    assert!(err_text(open(common::estargz_with_toc(&blob, json))).contains("out of range"));
    // chunk offset beyond the data
    let json = r#"{"version":1,"entries":[{"name":"f","type":"reg","size":10,"offset":999999}]}"#;
    assert!(err_text(open(common::estargz_with_toc(&blob, json))).contains("past the data end"));
    // chunks that do not cover the file
    let json = format!(
        r#"{{"version":1,"entries":[{{"name":"f","type":"reg","size":10,"offset":1,"chunkSize":5,"chunkDigest":"{d}"}}]}}"#
    );
    assert!(err_text(open(common::estargz_with_toc(&blob, &json))).contains("cover"));
}

#[test]
fn corrupted_chunk_is_never_served() {
    let tar = common::corpus_tar(4096);
    for format in [Format::Estargz, Format::EstargzZstd, Format::ZstdChunked] {
        let (blob, toc_digest) = blob_of(&tar, format);
        let good = Layer::open(blob.clone(), &OpenOptions::default()).unwrap();
        let idx = good.index();
        let (path, id) = idx
            .walk()
            .into_iter()
            .find(|(_, id)| idx.node(*id).unwrap().size > 10_000)
            .unwrap();
        let c = idx.chunks(id)[1].clone();
        let mut content = Vec::new();
        good.copy_file(id, &path, &mut content).unwrap();
        // flip a byte in the middle of that chunk's compressed frame
        let mut bad = blob.clone();
        let pos = ((c.compressed_offset + c.compressed_end) / 2) as usize;
        bad[pos] ^= 0xff;
        let layer = Layer::open(
            bad,
            &OpenOptions {
                toc_digest: Some(toc_digest.parse().unwrap()),
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let mut buf = vec![0u8; c.size as usize];
        let err = layer
            .read_at(id, &path, c.file_offset, &mut buf)
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&path),
            "{format:?}: error names the file: {msg}"
        );
        // the other chunks of the file and other files still read correctly
        let mut first = vec![0u8; idx.chunks(id)[0].size as usize];
        let n = layer.read_at(id, &path, 0, &mut first).unwrap();
        assert_eq!(&first[..n], &content[..n]);
        assert!(layer.verify_all().is_err());
    }
}

#[test]
fn wrong_toc_digest_is_refused() {
    let (blob, _) = blob_of(&common::corpus_tar(4096), Format::Estargz);
    let r = Layer::open(
        blob,
        &OpenOptions {
            toc_digest: Some(lazysnap::format::Digest::of(b"other")),
            ..OpenOptions::default()
        },
    );
    assert!(matches!(r, Err(Error::TocDigest { .. })));
}

#[test]
fn hostile_tars_fail_conversion_cleanly() {
    // a tar entry named with ".."
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
    h.set_size(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut t = h.as_bytes().to_vec();
    t.extend_from_slice(&[0u8; 1024]);
    let err = write_layer(&t, &mut Vec::new(), &WriteOptions::default()).unwrap_err();
    assert!(err.to_string().contains("escapes"), "{err}");
    // a truncated payload
    let mut h = tar::Header::new_ustar();
    h.set_path("big").unwrap();
    h.set_size(1 << 20);
    h.set_cksum();
    let mut t = h.as_bytes().to_vec();
    t.extend_from_slice(&[1u8; 1000]);
    let err = write_layer(&t, &mut Vec::new(), &WriteOptions::default()).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    // garbage
    let err = write_layer(&vec![7u8; 4096], &mut Vec::new(), &WriteOptions::default()).unwrap_err();
    assert!(err.to_string().contains("tar"), "{err}");
}
