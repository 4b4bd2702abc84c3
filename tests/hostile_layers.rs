//! A hostile corpus for the lazy path: hand-made eStargz layers whose TOC lies —
//! entries and chunks pointing past the blob or into the TOC, chunk offsets running
//! backwards, hard-link loops and escapes, symlinks out of the layer, `..` and NUL
//! in names, giant sizes, thousands of implicit deep directories, a directory of
//! 100,000 entries, whiteouts of `..`. Each is mounted with `lazysnap mount` (the
//! same remote layer and FUSE code the daemon uses) and must either be refused with
//! an error naming the blob and the reason, or mount and serve safely: every read
//! correct or EIO, nothing outside the layer, no hang. (tests/bad_input.rs covers
//! the format parser on its own.)

mod common;
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::lazy::{LazyMount, assert_symlink_not_followed};
use lazysnap::format::Digest;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

/// A file entry of `content` stored as one gzip member at `offset` (blob data
/// starts with one padding byte: offset 0 means "no data" in a TOC).
fn reg(name: &str, content: &[u8], offset: usize) -> Value {
    let d = Digest::of(content).to_string();
    json!({"name": name, "type": "reg", "size": content.len(), "offset": offset,
           "digest": d, "chunkDigest": d, "chunkSize": content.len()})
}

enum Expect {
    /// Mounting fails, naming the blob and saying this.
    Refused(&'static str),
    /// Mounts; the check runs on the mounted directory.
    Served(fn(&Path)),
}

struct Case {
    name: &'static str,
    data: Vec<u8>,
    entries: Vec<Value>,
    expect: Expect,
}

fn eio(p: &Path) {
    let e = std::fs::read(p).expect_err("must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{}: {e}", p.display());
}

fn cases() -> Vec<Case> {
    let a = common::gz(b"0123456789");
    let b = common::gz(b"abcdefghij");
    let ab = [a.clone(), b.clone()].concat();
    let deep: Vec<Value> = (0..200)
        .map(|i| json!({"name": format!("b{i}/{}x", "a/".repeat(2000)), "type": "dir"}))
        .collect();
    let mut wide = vec![json!({"name": "w", "type": "dir"})];
    wide.extend((0..100_000).map(|i| json!({"name": format!("w/f{i}"), "type": "reg", "size": 0})));
    vec![
        Case {
            name: "symlinks-out-of-the-layer",
            data: a.clone(),
            entries: vec![
                reg("f", b"0123456789", 1),
                json!({"name": "up", "type": "symlink", "linkName": "../../../../../../etc/passwd"}),
                json!({"name": "abs", "type": "symlink", "linkName": "/etc/passwd"}),
            ],
            expect: Expect::Served(|d| {
                assert_symlink_not_followed(&d.join("up"), "../../../../../../etc/passwd");
                assert_symlink_not_followed(&d.join("abs"), "/etc/passwd");
                assert_eq!(std::fs::read(d.join("f")).unwrap(), b"0123456789");
            }),
        },
        Case {
            name: "dotdot-name",
            data: a.clone(),
            entries: vec![reg("a/../../x", b"0123456789", 1)],
            expect: Expect::Refused("escapes"),
        },
        Case {
            name: "hardlink-out-of-the-layer",
            data: a.clone(),
            entries: vec![
                reg("f", b"0123456789", 1),
                json!({"name": "h", "type": "hardlink", "linkName": "../../etc/passwd"}),
            ],
            expect: Expect::Refused("escapes"),
        },
        Case {
            name: "hardlink-loop",
            data: Vec::new(),
            entries: vec![
                json!({"name": "x", "type": "hardlink", "linkName": "y"}),
                json!({"name": "y", "type": "hardlink", "linkName": "x"}),
            ],
            expect: Expect::Refused("hard link to missing"),
        },
        Case {
            name: "hardlink-to-itself",
            data: Vec::new(),
            entries: vec![json!({"name": "x", "type": "hardlink", "linkName": "x"})],
            expect: Expect::Refused("hard link to missing"),
        },
        Case {
            name: "hardlink-to-a-directory",
            data: Vec::new(),
            entries: vec![
                json!({"name": "d", "type": "dir"}),
                json!({"name": "h", "type": "hardlink", "linkName": "d"}),
            ],
            expect: Expect::Refused("hard link to directory"),
        },
        Case {
            name: "entry-past-the-blob",
            data: a.clone(),
            entries: vec![reg("f", b"0123456789", 1 << 30)],
            expect: Expect::Refused("past the data end"),
        },
        Case {
            name: "chunk-reaching-into-the-toc",
            data: ab.clone(),
            entries: vec![
                reg("good", b"0123456789", 1),
                reg("bad", b"abcdefghij", ab.len() - 2),
            ],
            expect: Expect::Served(|d| {
                eio(&d.join("bad"));
                assert_eq!(std::fs::read(d.join("good")).unwrap(), b"0123456789");
            }),
        },
        Case {
            name: "chunks-running-backwards",
            data: ab.clone(),
            entries: vec![
                json!({"name": "f", "type": "reg", "size": 20, "offset": a.len() + 1, "chunkSize": 10,
                       "chunkDigest": Digest::of(b"0123456789").to_string()}),
                json!({"name": "f", "type": "chunk", "offset": 1, "chunkOffset": 10, "chunkSize": 10,
                       "chunkDigest": Digest::of(b"abcdefghij").to_string()}),
            ],
            // each chunk's bytes are the other's: neither verifies
            expect: Expect::Served(|d| eio(&d.join("f"))),
        },
        Case {
            name: "two-files-sharing-a-chunk",
            data: a.clone(),
            entries: vec![reg("x", b"0123456789", 1), reg("y", b"0123456789", 1)],
            expect: Expect::Served(|d| {
                for f in ["x", "y"] {
                    assert_eq!(std::fs::read(d.join(f)).unwrap(), b"0123456789");
                }
            }),
        },
        Case {
            name: "giant-size",
            data: a.clone(),
            entries: vec![
                json!({"name": "f", "type": "reg", "size": 1u64 << 40, "offset": 1,
                                 "chunkDigest": Digest::of(b"0123456789").to_string()}),
            ],
            expect: Expect::Served(|d| {
                let p = d.join("f");
                assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 40);
                let f = std::fs::File::open(&p).unwrap();
                let mut buf = [0u8; 4096];
                for off in [0u64, (1 << 40) - 4096] {
                    let e = std::os::unix::fs::FileExt::read_at(&f, &mut buf, off)
                        .expect_err("a chunk past the size limit");
                    assert_eq!(e.raw_os_error(), Some(libc::EIO));
                }
            }),
        },
        Case {
            name: "thousands-of-deep-implicit-directories",
            data: Vec::new(),
            entries: deep,
            expect: Expect::Refused("leaves out"),
        },
        Case {
            name: "a-directory-of-100000-entries",
            data: Vec::new(),
            entries: wide,
            expect: Expect::Served(|d| {
                assert_eq!(std::fs::read_dir(d.join("w")).unwrap().count(), 100_000);
            }),
        },
        Case {
            name: "whiteouts-of-dot-and-dotdot",
            data: a.clone(),
            entries: vec![
                json!({"name": "d", "type": "dir"}),
                json!({"name": "d/.wh..", "type": "reg", "size": 0}),
                json!({"name": "d/.wh.", "type": "reg", "size": 0}),
                json!({"name": ".wh..", "type": "reg", "size": 0}),
                reg("d/f", b"0123456789", 1),
            ],
            expect: Expect::Served(|d| {
                let names: Vec<String> = std::fs::read_dir(d.join("d"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                assert_eq!(names, vec!["f".to_string()]);
                assert_eq!(std::fs::read(d.join("d/f")).unwrap(), b"0123456789");
            }),
        },
        Case {
            name: "nul-in-a-name",
            data: Vec::new(),
            entries: vec![json!({"name": "a\u{0}b", "type": "dir"})],
            expect: Expect::Refused("NUL"),
        },
        Case {
            name: "name-longer-than-255",
            data: Vec::new(),
            entries: vec![json!({"name": "n".repeat(300), "type": "dir"})],
            expect: Expect::Refused("longer than 255"),
        },
        Case {
            name: "chunk-without-its-file",
            data: a.clone(),
            entries: vec![json!({"name": "f", "type": "chunk", "offset": 1, "chunkOffset": 0})],
            expect: Expect::Refused("does not follow"),
        },
        Case {
            name: "root-as-a-file",
            data: a.clone(),
            entries: vec![reg(".", b"0123456789", 1)],
            expect: Expect::Refused("root must be a directory"),
        },
        Case {
            name: "file-with-a-child",
            data: a,
            entries: vec![
                reg("f", b"0123456789", 1),
                json!({"name": "f/g", "type": "dir"}),
            ],
            expect: Expect::Refused("not a directory"),
        },
    ]
}

#[test]
fn hostile_layers_are_refused_or_served_safely() {
    if !support::require(&["/bin/mount"], "hostile layers") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    for case in cases() {
        let json = json!({"version": 1, "entries": case.entries}).to_string();
        let toc = Digest::of(json.as_bytes()).to_string();
        let blob = work.path().join(format!("{}.blob", case.name));
        let data = [&[0u8][..], &case.data].concat();
        std::fs::write(&blob, common::estargz_with_toc(&data, &json)).unwrap();
        let dir = work.path().join(case.name);
        std::fs::create_dir_all(&dir).unwrap();
        let src = blob.to_str().unwrap();
        let opts = [
            "--toc-digest",
            &toc,
            "--no-prefetch",
            "--no-background-fetch",
        ];
        let start = Instant::now();
        match case.expect {
            Expect::Refused(why) => {
                let mut cmd = Command::new(BIN);
                cmd.arg("mount").arg(src).arg(&dir).args(opts);
                let out = support::run_bounded(cmd, Duration::from_secs(60));
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success(), "{}: mounted", case.name);
                assert!(
                    err.contains(src) && err.contains(why),
                    "{}: the error must name the blob and say {why:?}: {err}",
                    case.name
                );
            }
            Expect::Served(check) => {
                let m = LazyMount::start(src, &dir, &opts);
                check(&dir);
                m.stop();
            }
        }
        eprintln!("{}: as expected in {:?}", case.name, start.elapsed());
    }
}
