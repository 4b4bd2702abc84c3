//! Sanity checks of the test corpus generator itself (tests/common).

mod common;

use common::*;
use std::collections::BTreeSet;

const C: u64 = 4096;

#[test]
fn corpus_is_deterministic() {
    assert_eq!(corpus_tar(C), corpus_tar(C));
    assert_eq!(corpus_without_parent_dirs(), corpus_without_parent_dirs());
    assert_ne!(
        corpus_tar(C),
        corpus_tar(C * 2),
        "chunk size must change the corpus"
    );
}

#[test]
fn corpus_has_every_entry_type_and_edge_case() {
    let es = tar_entries(&corpus_tar(C));
    assert_eq!(
        es.len(),
        53,
        "entry count changed: {:#?}",
        es.iter().map(|e| &e.path).collect::<Vec<_>>()
    );
    let kinds: BTreeSet<&str> = es.iter().map(|e| e.kind).collect();
    let want: BTreeSet<&str> =
        ["dir", "reg", "symlink", "hardlink", "char", "block", "fifo"].into();
    assert_eq!(kinds, want);

    let paths: BTreeSet<&str> = es.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths.len(), es.len(), "duplicate paths");
    // Every parent directory has its own entry.
    for p in &paths {
        if let Some((parent, _)) = p.rsplit_once('/') {
            let parent = if parent.is_empty() { "/" } else { parent };
            assert!(paths.contains(parent), "{p}: parent {parent} missing");
        }
    }

    let sizes: BTreeSet<u64> = es
        .iter()
        .filter(|e| e.kind == "reg")
        .map(|e| e.size)
        .collect();
    for s in [0, C - 1, C, C + 1, C * 3 + C / 2] {
        assert!(sizes.contains(&s), "no regular file of size {s}");
    }
    assert!(es.iter().all(|e| e.kind == "reg" || e.content.is_empty()));

    let long = format!("/long/{}", long_name());
    assert_eq!(long_name().len(), 200);
    assert!(paths.contains(long.as_str()));
    let (_, deep) = deep_path();
    assert!(deep.len() > 200);
    assert!(paths.contains(norm_path(&deep).as_str()));
    assert!(paths.contains("/unicode/héllo wörld ☃.txt"));
    assert!(paths.contains("/whiteout/.wh.gone"));
    assert!(paths.contains("/whiteout/opaque/.wh..wh..opq"));

    let get = |p: &str| {
        es.iter()
            .find(|e| e.path == p)
            .unwrap_or_else(|| panic!("{p} missing"))
    };
    let ping = get("/xattr/ping");
    assert_eq!(ping.xattrs["user.foo"], b"bar");
    assert_eq!(ping.xattrs["security.capability"].len(), 20);
    assert_eq!(ping.xattrs["user.binary"], [0xff, 0, 0x80, b'A']);
    assert_eq!(get("/xattr/dir-with-xattr").kind, "dir");
    assert_eq!(get("/data/setuid").mode, 0o4755);
    assert_eq!(get("/data/sticky").mode, 0o1777);
    let null = get("/dev/null");
    assert_eq!((null.kind, null.dev_major, null.dev_minor), ("char", 1, 3));
    assert_eq!(get("/dev/bigdev").dev_minor, 65537);
    let multi = get("/data/multi");
    assert_eq!(
        (
            multi.uid,
            multi.gid,
            multi.uname.as_str(),
            multi.gname.as_str()
        ),
        (1000, 1000, "alice", "staff")
    );
    let hl = get("/long/hardlink-to-long-name");
    assert_eq!(hl.link.as_deref(), Some(long.as_str()));
    assert_eq!(file_content(&es, &hl.path).unwrap().len() as u64, C + 1);
    assert_eq!(get("/bin/sh").link.as_deref(), Some("busybox"));
    assert_eq!(get("/data/epoch0").mtime, 0);
    assert_eq!(get("/").kind, "dir");
    // Chunks of a multi-chunk file differ from each other.
    let c = C as usize;
    assert_ne!(multi.content[..c], multi.content[c..2 * c]);
}

#[test]
fn corpus_without_parents_has_no_dirs() {
    let es = tar_entries(&corpus_without_parent_dirs());
    assert_eq!(es.len(), 6);
    assert!(es.iter().all(|e| e.kind != "dir"));
    assert!(es.iter().any(|e| e.path == "/a/b/d/e.txt"));
}

#[test]
fn helpers_match_go_formatting() {
    assert_eq!(rfc3339(MTIME), "2020-09-13T12:26:40Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(go_quote(b"bar"), "\"bar\"");
    assert_eq!(
        go_quote(&[1, 0, 0x20, 0xff, b'"', 0xc3, 0xa9]),
        "\"\\x01\\x00 \\xff\\\"é\""
    );
    assert_eq!(norm_path("./a//b/./c/"), "/a/b/c");
    assert_eq!(norm_path("./"), "/");
    let e = tar_entries(&corpus_tar(C))
        .into_iter()
        .find(|e| e.path == "/bin/sh")
        .unwrap();
    assert_eq!(e.ls_line(), "/bin/sh\tsymlink\t0\t777\t0\t0\tbusybox");
}
