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

// ---------------------------------------------------------------------------------
// Corpus replay and mutation fuzzing. Each target has committed seeds under
// `tests/fuzz-corpus/<target>/`: `ok-*` seeds must be accepted, `err-*` seeds must be
// rejected with an error, `any-*` seeds (hostile input) may go either way. Then
// seeded mutations of the seeds (bit flips, interesting bytes, dictionary tokens,
// deletions, duplications, splices) run for `FUZZ_SECONDS` (default 3) per target:
// no input may panic. A panicking input is written to the target's temp dir. The
// tar applier's binary seeds come from `tar_seeds` (see `write_tar_seed_corpus`).

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lazysnap::format::input::InputCompression;
use lazysnap::service::Config;
use lazysnap::snapshot::apply::apply_stream;
use lazysnap::snapshot::filter::Filter;

/// A parser under fuzzing: `Ok` accepted, `Err(message)` rejected.
struct FuzzTarget {
    name: &'static str,
    run: fn(&[u8]) -> Result<(), String>,
    dict: &'static [&'static [u8]],
}

fn footer_target(b: &[u8]) -> Result<(), String> {
    let tail = &b[b.len().saturating_sub(footer::MAX_FOOTER_SIZE as usize)..];
    let loc = footer::parse(tail, b.len() as u64).map_err(|e| e.to_string())?;
    let (start, end) = loc.range();
    let region = usize::try_from(start)
        .ok()
        .zip(usize::try_from(end).ok())
        .and_then(|(s, e)| b.get(s..e))
        .ok_or_else(|| format!("TOC range {start}..{end} outside the blob"))?;
    let t = toc::read_toc(&loc, region).map_err(|e| e.to_string())?;
    toc::parse_json(&t.json).map_err(|e| e.to_string())?;
    Ok(())
}

fn toc_target(b: &[u8]) -> Result<(), String> {
    let t = toc::parse_json(b).map_err(|e| e.to_string())?;
    let idx = Index::build(&t, 1 << 20).map_err(|e| e.to_string())?;
    for (_, id) in idx.walk() {
        let _ = idx.chunks(id);
        let _ = idx.chunk_at(id, 0);
    }
    // walks the whole tree: once is enough
    let _ = idx.path_of(idx.node_count().saturating_sub(1) as u32);
    // the inode tree a lazy mount serves
    lazysnap::layer::mount::build_tree(&idx).map_err(|e| e.to_string())?;
    Ok(())
}

fn filter_target(b: &[u8]) -> Result<(), String> {
    let s = std::str::from_utf8(b).map_err(|e| e.to_string())?;
    let f = Filter::parse(s).map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now();
    for (kind, labels) in [
        (lazysnap::snapshot::Kind::Active, vec![]),
        (
            lazysnap::snapshot::Kind::Committed,
            vec![("containerd.io/snapshot.ref", "sha256:abc"), ("foo", "")],
        ),
    ] {
        let _ = f.matches(&lazysnap::snapshot::Info {
            name: "default/1/extract-1 sha256:x".into(),
            parent: "sha256:def".into(),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created: now,
            updated: now,
        });
    }
    Ok(())
}

fn config_target(b: &[u8]) -> Result<(), String> {
    let s = std::str::from_utf8(b).map_err(|e| e.to_string())?;
    let c = Config::parse(s, "fuzz.toml").map_err(|e| {
        let m = e.to_string();
        assert!(m.contains("fuzz.toml"), "the error names the file: {m}");
        m
    })?;
    let _ = (c.cache_config(), c.status_socket(), c.fuse.mount_options());
    Ok(())
}

/// The sandbox's path as seeds spell it: [`tar_target`] puts the real one in its
/// place (the same length: `/tmp/lzfz` and six random characters), so that absolute
/// names and link targets in seeds aim at the sentinel.
const SANDBOX_MARK: &[u8] = b"/tmp/lzfz@@@@@@";

/// The sandbox [`tar_target`] extracts in, and the state of everything in it but
/// `dest/`; set by [`fuzz_tar_corpus`].
static SANDBOX: Mutex<Option<(PathBuf, BTreeMap<String, String>)>> = Mutex::new(None);

/// Every entry of `sandbox` but `dest/`, with what a write, chmod, chown, new hard
/// link or replacement changes: inode, link count, mode, owner, size, times
/// (ctime included), content, link target.
fn sandbox_state(sandbox: &Path) -> BTreeMap<String, String> {
    fn visit(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).expect("read the sandbox").flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel == "dest" {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).expect("stat in the sandbox");
            let data = if m.is_file() {
                format!("{:?}", std::fs::read(&p).ok())
            } else {
                format!("{:?}", std::fs::read_link(&p).ok())
            };
            out.insert(
                rel,
                format!(
                    "ino {} nlink {} mode {:o} owner {}:{} size {} mtime {}.{} ctime {}.{} {data}",
                    m.ino(),
                    m.nlink(),
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec()
                ),
            );
            if m.is_dir() {
                visit(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    visit(sandbox, sandbox, &mut out);
    out
}

/// Recomputes the checksum of every header along the archive's chain of headers,
/// so that mutations reach the fields behind the checksum.
fn fix_checksums(t: &mut [u8]) {
    let mut pos = 0usize;
    while let Some(h) = t.get_mut(pos..pos + 512) {
        if h.iter().all(|&b| b == 0) {
            pos += 512;
            continue;
        }
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let size = std::str::from_utf8(&h[124..136])
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim_matches(|c| c == '\0' || c == ' '), 8).ok())
            .unwrap_or(0);
        let Some(next) = usize::try_from(size.div_ceil(512) * 512)
            .ok()
            .and_then(|n| (pos + 512).checked_add(n))
        else {
            return;
        };
        pos = next;
    }
}

/// Whether an error message says what failed and about what (`subject: problem`,
/// with a subject past the variant's own prefix when there is one).
fn names_something(m: &str) -> bool {
    let rest = m.strip_prefix("tar: ").unwrap_or(m);
    rest.split_once(": ")
        .is_some_and(|(a, b)| !a.trim().is_empty() && !b.trim().is_empty())
        || rest.contains("offset")
}

/// The tar applier: extracts into a fresh `dest/` next to the sentinel; nothing
/// else in the sandbox may change, whatever the input (no escaping name, symlink
/// or hard link is ever followed or made to point out), and errors say what failed.
fn tar_target(b: &[u8]) -> Result<(), String> {
    let (sandbox, before) = SANDBOX
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .expect("fuzz_tar_corpus sets the sandbox up");
    let real = sandbox.as_os_str().as_encoded_bytes();
    let mut input = b.to_vec();
    let mut i = 0;
    while let Some(k) = input[i..]
        .windows(SANDBOX_MARK.len())
        .position(|w| w == SANDBOX_MARK)
    {
        input[i + k..i + k + real.len()].copy_from_slice(real);
        i += k + real.len();
    }
    if matches!(InputCompression::sniff(&input), InputCompression::None) {
        fix_checksums(&mut input);
    }
    let dest = sandbox.join("dest");
    std::fs::create_dir(&dest).expect("create dest");
    let r = apply_stream(input.as_slice(), &dest);
    std::fs::remove_dir_all(&dest).expect("remove dest");
    let after = sandbox_state(&sandbox);
    if after != before {
        let changed: Vec<_> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(v))
            .map(|(k, _)| k)
            .chain(before.keys().filter(|k| !after.contains_key(*k)))
            .collect();
        panic!("the extraction changed the sandbox outside dest/: {changed:?}");
    }
    r.map(|_| ()).map_err(|e| {
        let m = e.to_string();
        assert!(names_something(&m), "unclear error: {m:?}");
        m
    })
}

const TARGETS: &[FuzzTarget] = &[
    FuzzTarget {
        name: "footer",
        run: footer_target,
        dict: &[
            b"\x1f\x8b\x08",
            b"STARGZ",
            b"\x50\x2a\x4d\x18",
            b"\0\0\0\0",
            b"\xff\xff\xff\xff",
        ],
    },
    FuzzTarget {
        name: "toc",
        run: toc_target,
        dict: &[
            b"\"name\":\"",
            b"\"type\":\"reg\"",
            b"\"type\":\"hardlink\"",
            b"\"type\":\"chunk\"",
            b"\"type\":\"symlink\"",
            b"\"linkName\":\"",
            b"\"offset\":",
            b"\"chunkOffset\":",
            b"\"chunkSize\":",
            b"\"size\":",
            b"../",
            b"/",
            b"9223372036854775807",
            b"-1",
            b"\"xattrs\":{\"a\":\"",
            b"{",
            b"}",
            b",",
            b"\"",
        ],
    },
    FuzzTarget {
        name: "filter",
        run: filter_target,
        dict: &[
            b"==", b"!=", b"~=", b"|", b",", b".", b"\"", b"\\", b"labels.", b"kind", b"name",
            b"parent", b" ",
        ],
    },
    FuzzTarget {
        name: "tar",
        run: tar_target,
        dict: &[
            b"../",
            b"/",
            SANDBOX_MARK,
            b"sentinel/etc/",
            b".wh.",
            b".wh..wh..opq",
            b"ustar\0",
            b"ustar  \0",
            b"0000644\0",
            b"00000001000\0",
            b"77777777777\0",
            b"\x80\0\0\0\0\0\0\0\0\0\x10\0",
            b"path=",
            b"linkpath=",
            b"size=",
            b"SCHILY.xattr.trusted.overlay.opaque=y",
            b"GNU.sparse.",
            b"\0",
            b"1",
            b"2",
            b"5",
            b"x",
            b"L",
        ],
    },
    FuzzTarget {
        name: "config",
        run: config_target,
        dict: &[
            b"[layer]\n",
            b"[cache]\n",
            b"[registry]\n",
            b"[fuse]\n",
            b" = ",
            b"true",
            b"\"",
            b"\n",
            b"-1",
            b"18446744073709551615",
            b"socket",
            b"threads",
            b"disk_limit",
            b"\"127.0.0.1:1\"",
            b"[[x]]",
            b"{}",
        ],
    },
];

fn corpus_of(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

fn mutate(rng: &mut support::Rng, seeds: &[(String, Vec<u8>)], dict: &[&[u8]]) -> Vec<u8> {
    let mut b = seeds[rng.below(seeds.len() as u64) as usize].1.clone();
    for _ in 0..1 + rng.below(4) {
        let at = |rng: &mut support::Rng, b: &Vec<u8>| rng.below(b.len() as u64 + 1) as usize;
        match rng.below(8) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len() as u64) as usize;
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'\\', b'\n', b'0'][rng.below(8) as usize];
            }
            2 => {
                let i = at(rng, &b);
                let tok = dict[rng.below(dict.len() as u64) as usize];
                b.splice(i..i, tok.iter().copied());
            }
            3 if !b.is_empty() => {
                let i = rng.below(b.len() as u64) as usize;
                let n = 1 + rng.below((b.len() - i).min(64) as u64) as usize;
                b.drain(i..i + n);
            }
            4 if !b.is_empty() => {
                let i = rng.below(b.len() as u64) as usize;
                let n = 1 + rng.below((b.len() - i).min(64) as u64) as usize;
                let piece: Vec<u8> = b[i..i + n].to_vec();
                let j = at(rng, &b);
                b.splice(j..j, piece);
            }
            5 => {
                let other = &seeds[rng.below(seeds.len() as u64) as usize].1;
                let i = at(rng, &b);
                let j = rng.below(other.len() as u64 + 1) as usize;
                b.truncate(i);
                b.extend_from_slice(&other[j..]);
            }
            6 => {
                let i = at(rng, &b);
                b.truncate(i);
            }
            _ => {
                let i = at(rng, &b);
                let n = rng.below(8) as usize;
                let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(i..i, junk);
            }
        }
    }
    b
}

fn fuzz_seconds() -> Duration {
    Duration::from_secs_f64(
        std::env::var("FUZZ_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3.0),
    )
}

fn fuzz(name: &str) {
    let t = TARGETS.iter().find(|t| t.name == name).unwrap();
    let seeds = corpus_of(name);
    assert!(!seeds.is_empty(), "{name}: empty corpus");
    for (file, data) in &seeds {
        let r = catch_unwind(AssertUnwindSafe(|| (t.run)(data)))
            .unwrap_or_else(|_| panic!("{name}/{file}: panicked"));
        match (file.split('-').next(), r) {
            (Some("ok"), Err(e)) => panic!("{name}/{file} must be accepted: {e}"),
            (Some("err"), Ok(())) => panic!("{name}/{file} must be rejected"),
            (Some("err"), Err(e)) => assert!(!e.is_empty(), "{name}/{file}: empty error"),
            _ => {}
        }
    }
    let mut rng = support::Rng::new(support::seed(&format!("fuzz {name}"), 1));
    let (start, limit) = (Instant::now(), fuzz_seconds());
    let (mut runs, mut accepted) = (0u64, 0u64);
    while start.elapsed() < limit {
        let input = mutate(&mut rng, &seeds, t.dict);
        runs += 1;
        match catch_unwind(AssertUnwindSafe(|| (t.run)(&input))) {
            Ok(Ok(())) => accepted += 1,
            Ok(Err(_)) => {}
            Err(_) => {
                let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                    .join(format!("fuzz-crash-{name}-{runs}"));
                let _ = std::fs::write(&path, &input);
                panic!("{name}: input {runs} panicked; saved to {}", path.display());
            }
        }
    }
    eprintln!(
        "fuzz {name}: {} seeds replayed, {runs} mutated inputs in {:?}, {accepted} accepted",
        seeds.len(),
        start.elapsed()
    );
    assert!(runs > 0);
}

#[test]
fn fuzz_footer_corpus() {
    fuzz("footer");
}

#[test]
fn fuzz_toc_corpus() {
    fuzz("toc");
}

#[test]
fn fuzz_filter_corpus() {
    fuzz("filter");
}

#[test]
fn fuzz_config_corpus() {
    fuzz("config");
}

#[test]
fn fuzz_tar_corpus() {
    let sandbox = tempfile::Builder::new()
        .prefix("lzfz")
        .rand_bytes(6)
        .tempdir_in("/tmp")
        .expect("sandbox");
    let root = sandbox.path();
    assert_eq!(root.as_os_str().len(), SANDBOX_MARK.len(), "{root:?}");
    let sentinel = root.join("sentinel");
    std::fs::create_dir_all(sentinel.join("etc")).unwrap();
    std::fs::write(sentinel.join("etc/passwd"), b"decoy\n").unwrap();
    std::fs::write(sentinel.join("x"), b"outside\n").unwrap();
    std::os::unix::fs::symlink("etc", sentinel.join("etc-link")).unwrap();
    std::fs::write(root.join("beside-dest"), b"also outside\n").unwrap();
    *SANDBOX.lock().unwrap() = Some((root.to_path_buf(), sandbox_state(root)));
    fuzz("tar");
}

/// The tar applier's seeds: every entry type and overlay marker, every packing the
/// applier reads, and the hostile cases — `..`, absolute names, symlinked parents,
/// hard links pointing out, PAX names, truncations. [`SANDBOX_MARK`] stands for
/// the sandbox, whose `sentinel/` holds `etc/passwd` and `x`.
fn tar_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use common::{ALICE, Corpus, ROOT, raw_archive, raw_entry};
    use tar::EntryType::{Char, Directory, Fifo, Link, Regular, Symlink};
    let abs = |p: &str| format!("{}/{p}", String::from_utf8_lossy(SANDBOX_MARK));
    let entry = |name: &str, kind, link: &str, data: &[u8]| raw_entry(name, kind, link, data, None);
    // a symlink `link` to `target`, then `then` (an entry under `link/`)
    let via_link =
        |target: &str, then: Vec<u8>| raw_archive(&[entry("link", Symlink, target, b""), then]);
    // a PAX header block, without an end-of-archive marker
    let pax = |records: &[(&str, &[u8])]| {
        let mut c = Corpus::new();
        c.pax(records);
        let mut v = c.finish();
        v.truncate(v.len() - 1024);
        v
    };
    let mut t = Corpus::new();
    t.dir("etc/", 0o755, &ROOT);
    t.file("etc/motd", 0o644, &ROOT, b"hello\n");
    t.hardlink("etc/motd.link", "etc/motd", 0o644, &ROOT);
    t.symlink("etc/rel", "motd");
    t.dir("opaque/", 0o755, &ALICE);
    t.file("opaque/.wh..wh..opq", 0o644, &ROOT, b"");
    t.file("opaque/kept", 0o600, &ALICE, &[7u8; 700]);
    t.file(".wh.gone", 0o644, &ROOT, b"");
    t.dev(Char, "null", 0o666, 1, 3);
    t.dev(Fifo, "pipe", 0o644, 0, 0);
    t.pax_entry(
        &format!("pax/{}", common::long_name()),
        Regular,
        0o4755,
        &ALICE,
        b"pax named\n",
        &[("user.note", b"v")],
    );
    t.pax(&[("mtime", b"1600000000.123456789")]);
    t.file("nanos", 0o644, &ROOT, b"");
    let plain = t.finish();
    let lazy = |format| {
        common::convert(
            &plain,
            &WriteOptions {
                format,
                chunk_size: 512,
                ..Default::default()
            },
        )
        .0
    };
    let gz = common::gz(&plain);
    let zst = zstd::encode_all(plain.as_slice(), 3).unwrap();
    let end = plain.len() - 1024;
    vec![
        ("ok-plain.tar", plain.clone()),
        ("ok-plain.tar.gz", gz.clone()),
        ("ok-plain.tar.zst", zst.clone()),
        ("ok-estargz.blob", lazy(Format::Estargz)),
        ("ok-zstd-chunked.blob", lazy(Format::ZstdChunked)),
        (
            "ok-absolute.tar",
            raw_archive(&[
                entry("/etc/abs", Regular, "", b"inside\n"),
                entry(&abs("sentinel/x"), Regular, "", b"inside too\n"),
            ]),
        ),
        (
            "ok-links-out.tar",
            raw_archive(&[
                entry("up", Symlink, "../sentinel/etc", b""),
                entry("abs", Symlink, &abs("sentinel/etc"), b""),
                entry("root", Symlink, "/", b""),
                entry("up", Regular, "", b"replaces the symlink\n"),
                entry("h", Link, "abs", b""),
            ]),
        ),
        (
            "ok-whiteouts.tar",
            raw_archive(&[
                entry(".wh.x", Regular, "", b""),
                entry("d/.wh..wh..opq", Regular, "", b""),
                entry("d/.wh.y", Regular, "", b""),
                entry(".wh..wh.plnk.1", Regular, "", b""),
            ]),
        ),
        (
            "err-dotdot.tar",
            raw_archive(&[entry("../sentinel/x", Regular, "", b"pwned\n")]),
        ),
        (
            "err-dotdot-inner.tar",
            raw_archive(&[entry(
                "a/../../sentinel/etc/passwd",
                Regular,
                "",
                b"pwned\n",
            )]),
        ),
        (
            "err-symlinked-parent.tar",
            via_link(
                "../sentinel/etc",
                entry("link/passwd", Regular, "", b"pwned\n"),
            ),
        ),
        (
            "err-symlinked-parent-abs.tar",
            via_link(
                &abs("sentinel/etc"),
                entry("link/passwd", Regular, "", b"pwned\n"),
            ),
        ),
        (
            "err-symlinked-parent-dir.tar",
            via_link("../sentinel", entry("link/new/", Directory, "", b"")),
        ),
        (
            "err-whiteout-through-symlink.tar",
            via_link("../sentinel", entry("link/.wh.x", Regular, "", b"")),
        ),
        (
            "err-opaque-through-symlink.tar",
            via_link(
                "../sentinel/etc",
                entry("link/.wh..wh..opq", Regular, "", b""),
            ),
        ),
        (
            "err-hardlink-out.tar",
            raw_archive(&[entry("h", Link, "../sentinel/x", b"")]),
        ),
        (
            "err-hardlink-abs.tar",
            raw_archive(&[entry("h", Link, &abs("sentinel/x"), b"")]),
        ),
        (
            "err-hardlink-through-symlink.tar",
            raw_archive(&[
                entry("out", Symlink, &abs("sentinel/etc"), b""),
                entry("h", Link, "out/passwd", b""),
            ]),
        ),
        (
            "err-pax-dotdot.tar",
            raw_archive(&[
                pax(&[("path", b"../sentinel/pax")]),
                entry("innocent", Regular, "", b"pwned\n"),
            ]),
        ),
        (
            "err-pax-linkpath-out.tar",
            raw_archive(&[
                pax(&[("linkpath", b"../../sentinel/x")]),
                entry("h", Link, "innocent", b""),
            ]),
        ),
        (
            "err-pax-dangling.tar",
            raw_archive(&[pax(&[("path", b"never")])]),
        ),
        (
            "err-file-as-parent.tar",
            raw_archive(&[
                entry("a", Regular, "", b"file"),
                entry("a/b", Regular, "", b"under a file"),
            ]),
        ),
        (
            "err-giant-size.tar",
            raw_archive(&[raw_entry("big", Regular, "", &[7u8; 100], Some(1 << 40))]),
        ),
        ("err-truncated-data.tar", plain[..512 * 4 + 3].to_vec()),
        ("err-truncated-header.tar", plain[..512 + 100].to_vec()),
        ("err-no-end-marker.tar", plain[..end].to_vec()),
        ("err-truncated.tar.gz", gz[..gz.len() / 2].to_vec()),
        ("err-truncated.tar.zst", zst[..zst.len() - 5].to_vec()),
        ("err-empty.tar", Vec::new()),
    ]
}

/// Writes the tar applier's seed corpus:
/// `cargo test --release --test fuzz -- --ignored write_tar_seed_corpus`.
#[test]
#[ignore = "writes tests/fuzz-corpus/tar"]
fn write_tar_seed_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus/tar");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in tar_seeds() {
        std::fs::write(dir.join(name), data).unwrap();
    }
}
