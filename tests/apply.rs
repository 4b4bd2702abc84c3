//! The layer applier: every layer format extracts to the same overlay-form tree as
//! the FUSE view of the layer shows, and as containerd 1.6's overlayfs snapshotter
//! unpacks it; hostile layers fail with errors naming the path and touch nothing
//! outside the destination.

mod common;
mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::lazy::{Seen, containerd_comparable, snapshot_exact};
use common::registry::{Layer, Registry};
use common::{ALICE, Corpus, NOBODY, ROOT, raw_archive, raw_entry};
use lazysnap::cache::ChunkCache;
use lazysnap::format::writer::WriteOptions;
use lazysnap::format::{Format, OpenOptions};
use lazysnap::layer::mount::mount_layer;
use lazysnap::layer::workers::Workers;
use lazysnap::layer::{FileBlob, LayerConfig, RemoteLayer};
use lazysnap::snapshot::apply::{ApplyStats, apply_layer, apply_stream};
use lazysnap_fuse::MountOptions;
use support::Containerd;

type Tree = (BTreeMap<String, Seen>, Vec<Vec<String>>);

/// Names a lazy-format writer adds to the tar stream itself.
const ADDED: [&str; 3] = [
    ".prefetch.landmark",
    ".no.prefetch.landmark",
    "stargz.index.json",
];

fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(tar).unwrap();
    e.finish().unwrap()
}

fn zstd(tar: &[u8]) -> Vec<u8> {
    zstd::encode_all(tar, 3).unwrap()
}

const LAZY: [Format; 3] = [Format::Estargz, Format::EstargzZstd, Format::ZstdChunked];

/// A converted layer: its blob and TOC digest.
struct Lazy {
    format: Format,
    blob: Vec<u8>,
    toc_digest: String,
}

fn lazy(tar: &[u8], format: Format) -> Lazy {
    let (blob, res) = common::convert(
        tar,
        &WriteOptions {
            format,
            chunk_size: 4096,
            ..WriteOptions::default()
        },
    );
    Lazy {
        format,
        blob,
        toc_digest: res.toc_digest,
    }
}

/// Every stream form of `tar`: plain, gzip, zstd and the three lazy formats.
fn streams(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut v = vec![
        ("tar".to_string(), tar.to_vec()),
        ("tar.gz".to_string(), gzip(tar)),
        ("tar.zst".to_string(), zstd(tar)),
    ];
    for f in LAZY {
        let l = lazy(tar, f);
        v.push((format!("{f:?}"), l.blob));
    }
    v
}

fn tree(dir: &Path) -> Tree {
    let (mut map, mut links) = snapshot_exact(dir);
    map.retain(|k, _| !ADDED.contains(&k.as_str()));
    links.retain(|g| !g.iter().any(|p| ADDED.contains(&p.as_str())));
    (map, links)
}

/// The tree with sub-second times dropped.
fn seconds(mut t: Tree) -> Tree {
    for v in t.0.values_mut() {
        v.drop_nanos();
    }
    t
}

fn apply_file(blob: &[u8], dest: &Path) -> lazysnap::Result<ApplyStats> {
    std::fs::create_dir_all(dest).unwrap();
    apply_stream(blob, dest)
}

/// Opens `l` as a remote layer over its blob written to `work`.
fn remote(l: &Lazy, work: &Path) -> Arc<RemoteLayer> {
    let path = work.join(format!("{:?}.blob", l.format));
    std::fs::write(&path, &l.blob).unwrap();
    RemoteLayer::open(
        FileBlob::open(&path).unwrap(),
        &OpenOptions {
            toc_digest: Some(l.toc_digest.parse().unwrap()),
            ..OpenOptions::default()
        },
        Arc::new(ChunkCache::in_memory(64 << 20)),
        // read chunks from the blob, not from a copy taken at open
        LayerConfig {
            small_layer_bytes: 0,
            ..LayerConfig::default()
        },
    )
    .unwrap()
}

/// The tree the FUSE view of `l` shows.
fn fuse_tree(l: &Lazy, work: &Path) -> Tree {
    let layer = remote(l, work);
    let dir = work.join(format!("{:?}.fuse", l.format));
    std::fs::create_dir_all(&dir).unwrap();
    let m = mount_layer(
        layer,
        &dir,
        &MountOptions::default(),
        Workers::new(2, "apply-test"),
    )
    .unwrap();
    let t = tree(&dir);
    drop(m);
    t
}

fn assert_same(name: &str, got: &Tree, want: &Tree) {
    for (k, v) in &want.0 {
        assert_eq!(got.0.get(k), Some(v), "{name}: {k:?}");
    }
    for k in got.0.keys() {
        assert!(want.0.contains_key(k), "{name}: unexpected {k:?}");
    }
    assert_eq!(got.1, want.1, "{name}: hard-link groups");
}

/// Duplicates, replacements, whiteouts next to real names, implicit parents,
/// holes, nanosecond times and hard-link chains.
fn quirks_tar() -> Vec<u8> {
    use tar::EntryType::{Char, Fifo};
    let mut t = common::Corpus::new();
    t.dir("./", 0o750, &ALICE);
    t.dir("dup/", 0o755, &ROOT);
    t.file("dup/file", 0o600, &ROOT, b"one");
    t.file("dup/file", 0o644, &NOBODY, b"two, longer");
    t.dir("dup/d2f/", 0o755, &ROOT);
    t.file("dup/d2f/child", 0o644, &ROOT, b"child");
    t.file("dup/d2f", 0o640, &ALICE, b"now a file");
    t.file("dup/f2d", 0o644, &ROOT, b"a file first");
    t.dir("dup/f2d/", 0o711, &ALICE);
    t.file("dup/f2d/inner", 0o644, &ROOT, b"inner");
    t.dir("dup/dir/", 0o700, &NOBODY);
    t.file("dup/dir/kept", 0o644, &ROOT, b"kept");
    t.dir("dup/dir/", 0o755, &ALICE);
    t.symlink("dup/sym", "kept-target");
    t.file("dup/sym", 0o644, &ROOT, b"real file over a symlink");
    t.dev(Char, "dup/dev", 0o666, 1, 3);
    t.file("dup/dev", 0o644, &ROOT, b"not a device");
    t.dev(Fifo, "dup/fifo", 0o644, 0, 0);
    t.dir("wh/", 0o755, &ROOT);
    t.file("wh/x", 0o644, &ROOT, b"x wins");
    t.file("wh/.wh.x", 0o644, &ROOT, b"");
    t.file("wh/.wh.y", 0o600, &ROOT, b"");
    t.dir("wh/y/", 0o755, &ROOT);
    t.file("wh/.wh.z", 0o640, &ROOT, b"");
    t.file("wh/.wh.gone/child", 0o644, &ROOT, b"hidden");
    t.file("wh/.wh..wh.plnk", 0o644, &ROOT, b"");
    t.file("implicit/a/b/c.txt", 0o644, &ROOT, b"no parents");
    let mut sparse = vec![0u8; 1 << 20];
    sparse[..4096].copy_from_slice(&common::prng_bytes(3, 4096));
    sparse[600 << 10..(600 << 10) + 100].copy_from_slice(&common::prng_bytes(4, 100));
    t.file("sparse.bin", 0o644, &ROOT, &sparse);
    t.dir("hl/", 0o755, &ROOT);
    t.file("hl/a", 0o4755, &ROOT, b"chain");
    t.hardlink("hl/b", "hl/a", 0o4755, &ROOT);
    t.hardlink("hl/c", "hl/b", 0o4755, &ROOT);
    t.file("hl/t", 0o644, &ROOT, b"old");
    t.hardlink("hl/u", "hl/t", 0o644, &ROOT);
    t.file("hl/t", 0o644, &ROOT, b"new");
    t.pax(&[("mtime", b"1600000000.123456789")]);
    t.file("nanos", 0o644, &ROOT, b"nanos");
    t.finish()
}

#[test]
fn every_format_gives_the_fuse_view() {
    let work = tempfile::tempdir().unwrap();
    for (name, tar) in [
        ("corpus", common::corpus_tar(4096)),
        ("no-parent-dirs", common::corpus_without_parent_dirs()),
        ("quirks", quirks_tar()),
    ] {
        // TOCs keep whole seconds only
        let fuse = seconds(fuse_tree(&lazy(&tar, Format::Estargz), work.path()));
        let mut first: Option<Tree> = None;
        for (form, blob) in streams(&tar) {
            let dest = work.path().join(format!("{name}-{form}"));
            let stats = apply_file(&blob, &dest).unwrap_or_else(|e| panic!("{name} {form}: {e}"));
            assert!(stats.files > 0 && stats.entries > stats.files, "{stats:?}");
            let got = tree(&dest);
            assert_same(&format!("{name} as {form}"), &seconds(got.clone()), &fuse);
            match &first {
                None => first = Some(got),
                Some(want) => assert_same(&format!("{name} as {form}, exactly"), &got, want),
            }
        }
        for f in LAZY {
            let l = lazy(&tar, f);
            let dest = work.path().join(format!("{name}-{f:?}-toc"));
            std::fs::create_dir_all(&dest).unwrap();
            let stats = apply_layer(&remote(&l, work.path()), &dest)
                .unwrap_or_else(|e| panic!("{name} {f:?}: {e}"));
            assert!(stats.files > 0, "{stats:?}");
            assert_same(
                &format!("{name} from the {f:?} TOC"),
                &seconds(tree(&dest)),
                &fuse,
            );
        }
    }
}

#[test]
fn the_tree_has_overlay_form_and_keeps_everything() {
    let work = tempfile::tempdir().unwrap();
    let d = work.path().join("corpus");
    let stats = apply_file(&gzip(&common::corpus_tar(4096)), &d).unwrap();
    assert_eq!(stats.whiteouts, 2, "{stats:?}");
    let m = std::fs::symlink_metadata(d.join("whiteout/gone")).unwrap();
    assert!(m.file_type().is_char_device() && m.rdev() == 0 && m.uid() == 0);
    assert!(!d.join("whiteout/.wh.gone").exists());
    let x = common::lazy::xattrs(&d.join("whiteout/opaque"));
    assert_eq!(
        x.get("trusted.overlay.opaque").map(Vec::as_slice),
        Some(&b"y"[..])
    );
    assert!(!d.join("whiteout/opaque/.wh..wh..opq").exists());
    let ping = common::lazy::xattrs(&d.join("xattr/ping"));
    assert_eq!(ping["security.capability"].len(), 20, "{ping:?}");
    assert_eq!(ping["user.foo"], b"bar");
    let m = std::fs::metadata(d.join("data/setuid")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o4755);
    let m = std::fs::metadata(d.join("data/sticky")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o1777);
    let multi = std::fs::metadata(d.join("data/multi")).unwrap();
    let link = std::fs::metadata(d.join("data/hardlink-to-multi")).unwrap();
    assert_eq!((multi.ino(), multi.nlink()), (link.ino(), 2));
    let dev = std::fs::symlink_metadata(d.join("dev/bigdev")).unwrap();
    assert!(dev.file_type().is_block_device());
    assert_eq!(dev.rdev(), libc::makedev(259, 65537));

    let q = work.path().join("quirks");
    apply_file(&quirks_tar(), &q).unwrap();
    let read = |p: &str| std::fs::read(q.join(p)).unwrap();
    assert_eq!(read("dup/file"), b"two, longer");
    assert_eq!(read("dup/d2f"), b"now a file");
    assert_eq!(read("dup/f2d/inner"), b"inner");
    assert_eq!(read("dup/dir/kept"), b"kept");
    assert_eq!(read("dup/sym"), b"real file over a symlink");
    assert!(
        std::fs::symlink_metadata(q.join("dup/dev"))
            .unwrap()
            .is_file()
    );
    assert_eq!(read("wh/x"), b"x wins");
    assert!(std::fs::symlink_metadata(q.join("wh/y")).unwrap().is_dir());
    assert!(
        std::fs::symlink_metadata(q.join("wh/z"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    // a name below `.wh.gone/` stands for the whiteout of `gone`, as in the FUSE view
    assert!(
        std::fs::symlink_metadata(q.join("wh/gone"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert!(!q.join("wh/.wh.gone").exists() && !q.join("wh/.wh..wh.plnk").exists());
    assert_eq!(read("hl/u"), b"old");
    assert_eq!(read("hl/t"), b"new");
    let (a, c) = (
        std::fs::metadata(q.join("hl/a")).unwrap(),
        std::fs::metadata(q.join("hl/c")).unwrap(),
    );
    assert_eq!(
        (a.ino(), a.nlink(), a.mode() & 0o7777),
        (c.ino(), 3, 0o4755)
    );
    let dir = std::fs::metadata(q.join("dup/dir")).unwrap();
    assert_eq!((dir.uid(), dir.mode() & 0o7777), (1000, 0o755));
    let implicit = std::fs::metadata(q.join("implicit/a")).unwrap();
    assert_eq!(
        (implicit.uid(), implicit.mode() & 0o7777, implicit.mtime()),
        (0, 0o755, 0)
    );
    let root = std::fs::metadata(&q).unwrap();
    assert_eq!((root.uid(), root.mode() & 0o7777), (1000, 0o750));
    let sparse = std::fs::metadata(q.join("sparse.bin")).unwrap();
    assert_eq!(sparse.len(), 1 << 20);
    assert!(
        sparse.blocks() * 512 <= 64 << 10,
        "not sparse: {} blocks",
        sparse.blocks()
    );
    let nanos = std::fs::metadata(q.join("nanos")).unwrap();
    assert_eq!(
        (nanos.mtime(), nanos.mtime_nsec()),
        (1_600_000_000, 123_456_789)
    );
}

#[test]
fn cached_chunks_are_reused_and_bad_chunks_refused() {
    let work = tempfile::tempdir().unwrap();
    let tar = common::corpus_tar(4096);
    for f in LAZY {
        let l = lazy(&tar, f);
        let cold_dir = work.path().join(format!("{f:?}-cold"));
        std::fs::create_dir_all(&cold_dir).unwrap();
        let layer = remote(&l, work.path());
        let before = layer.stats().fetched_bytes;
        apply_layer(&layer, &cold_dir).unwrap();
        let cold = layer.stats().fetched_bytes - before;
        assert!(cold > 0, "{f:?}: nothing fetched");

        // warm: every chunk in the cache, nothing fetched again
        let layer = remote(&l, work.path());
        layer
            .fetch_all(&std::sync::atomic::AtomicBool::new(false), false)
            .unwrap();
        let before = layer.stats().fetched_bytes;
        let warm_dir = work.path().join(format!("{f:?}-warm"));
        std::fs::create_dir_all(&warm_dir).unwrap();
        apply_layer(&layer, &warm_dir).unwrap();
        assert_eq!(
            layer.stats().fetched_bytes,
            before,
            "{f:?}: warm apply fetched"
        );
        assert_same(&format!("{f:?} warm"), &tree(&warm_dir), &tree(&cold_dir));

        // a corrupted chunk fails the extraction, naming the file
        let victim = "data/multi";
        let idx = layer.index();
        let id = idx.lookup_path(victim).unwrap();
        let c = &idx.chunks(id)[1];
        let mut bad = l.blob.clone();
        bad[((c.compressed_offset + c.compressed_end) / 2) as usize] ^= 0xff;
        let bad = Lazy { blob: bad, ..l };
        let dest = work.path().join(format!("{f:?}-bad"));
        std::fs::create_dir_all(&dest).unwrap();
        let e = apply_layer(&remote(&bad, work.path()), &dest).unwrap_err();
        // named by one of its two names (the other is a hard link)
        let e = e.to_string();
        assert!(
            e.contains("multi") && e.contains("verification"),
            "{f:?}: {e}"
        );
    }
}

// ---- against containerd ----

/// The lowest layer: a small system with every entry type.
fn base() -> Vec<u8> {
    use tar::EntryType::{Char, Fifo, Regular};
    let mut t = Corpus::new();
    t.dir("etc/", 0o755, &ROOT);
    t.file("etc/passwd", 0o644, &ROOT, b"root:x:0:0::/root:/bin/sh\n");
    t.dir("etc/config.d/", 0o755, &ROOT);
    t.file("etc/config.d/a.conf", 0o644, &ROOT, b"a=1\n");
    t.file("etc/config.d/b.conf", 0o600, &ALICE, b"b=1\n");
    t.dir("usr/", 0o755, &ROOT);
    t.dir("usr/bin/", 0o755, &ROOT);
    // a hard link's header carries its inode's metadata, as docker and buildkit
    // write it (containerd applies it to the inode; GNU tar and lazysnap keep the
    // first header's)
    let data = common::prng_bytes(1, 200_000);
    let mut h = t.header(Regular, 0o4755, &ROOT, data.len() as u64, false);
    t.b.append_data(&mut h.clone(), "usr/bin/tool", &data[..])
        .unwrap();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    t.b.append_link(&mut h, "usr/bin/tool-again", "usr/bin/tool")
        .unwrap();
    t.symlink("usr/bin/sh", "tool");
    let cap: &[u8] = &[1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    t.pax_entry(
        "usr/bin/ping",
        Regular,
        0o755,
        &ROOT,
        &common::prng_bytes(2, 30_000),
        &[("security.capability", cap), ("user.origin", b"test")],
    );
    t.dir("var/", 0o755, &ROOT);
    t.dir("var/lib/", 0o755, &ROOT);
    t.dir("var/lib/data/", 0o750, &NOBODY);
    t.dir("var/lib/data/deep/", 0o755, &NOBODY);
    t.file(
        "var/lib/data/deep/x.db",
        0o640,
        &NOBODY,
        &common::text_bytes(3, 50_000),
    );
    t.file("var/lib/data/y.db", 0o640, &NOBODY, &vec![0u8; 300_000]);
    t.dir("opt/", 0o755, &ROOT);
    t.dir("opt/app/", 0o755, &ALICE);
    t.file("opt/app/old.txt", 0o644, &ALICE, b"old app\n");
    t.dir("opt/app/lib/", 0o755, &ALICE);
    t.file(
        "opt/app/lib/old.so",
        0o755,
        &ALICE,
        &common::prng_bytes(4, 10_000),
    );
    t.dir("dev/", 0o755, &ROOT);
    t.dev(Char, "dev/null", 0o666, 1, 3);
    t.dev(Fifo, "dev/initctl", 0o600, 0, 0);
    t.dir("home/", 0o755, &ROOT);
    t.dir("home/alice/", 0o700, &ALICE);
    t.file("home/alice/.profile", 0o644, &ALICE, b"export PS1='$ '\n");
    t.finish()
}

/// Deletes a file and a whole directory, re-creates `opt/app` opaquely, changes files.
fn middle() -> Vec<u8> {
    let mut t = Corpus::new();
    t.dir("etc/", 0o755, &ROOT);
    t.file("etc/.wh.passwd", 0o644, &ROOT, b"");
    t.dir("etc/config.d/", 0o755, &ROOT);
    t.file("etc/config.d/b.conf", 0o600, &ALICE, b"b=2\n");
    t.file("etc/config.d/c.conf", 0o644, &ROOT, b"c=1\n");
    t.dir("var/", 0o755, &ROOT);
    t.dir("var/lib/", 0o755, &ROOT);
    t.file("var/lib/.wh.data", 0o644, &ROOT, b"");
    t.dir("opt/", 0o755, &ROOT);
    t.dir("opt/app/", 0o755, &ALICE);
    t.file("opt/app/.wh..wh..opq", 0o644, &ROOT, b"");
    t.file("opt/app/new.txt", 0o644, &ALICE, b"new app\n");
    t.dir("usr/", 0o755, &ROOT);
    t.dir("usr/bin/", 0o755, &ROOT);
    t.file(
        "usr/bin/tool",
        0o755,
        &ROOT,
        &common::prng_bytes(5, 150_000),
    );
    t.finish()
}

/// Re-creates the deleted directory, deletes more, hides a home directory's content.
fn top() -> Vec<u8> {
    let mut t = Corpus::new();
    t.dir("var/", 0o755, &ROOT);
    t.dir("var/lib/", 0o755, &ROOT);
    t.dir("var/lib/data/", 0o755, &ROOT);
    t.file("var/lib/data/fresh.db", 0o644, &ROOT, b"fresh\n");
    t.dir("etc/", 0o755, &ROOT);
    t.dir("etc/config.d/", 0o755, &ROOT);
    t.file("etc/config.d/.wh.a.conf", 0o644, &ROOT, b"");
    t.dir("home/", 0o755, &ROOT);
    t.dir("home/alice/", 0o700, &ALICE);
    t.file("home/alice/.wh..wh..opq", 0o644, &ROOT, b"");
    t.file("usr/bin/.wh.sh", 0o644, &ROOT, b"");
    t.dir("usr/", 0o755, &ROOT);
    t.dir("usr/bin/", 0o755, &ROOT);
    t.finish()
}

/// The snapshot directories of `reference`'s layers, lowest first, from the mounts
/// of a view of its top snapshot.
fn layer_dirs(ctd: &Containerd, layers: usize) -> Vec<PathBuf> {
    let ls = ctd.ctr_ok(&["snapshot", "--snapshotter", "overlayfs", "ls"]);
    // KEY PARENT KIND; the top is the committed snapshot no other names as parent (the
    // view made here is leased by ctr and collected once it is done)
    let rows: Vec<Vec<&str>> = ls
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let top = rows
        .iter()
        .filter(|r| r.len() == 3 && r[2] == "Committed")
        .find(|r| !rows.iter().any(|o| o.len() == 3 && o[1] == r[0]))
        .unwrap_or_else(|| panic!("no top snapshot in {ls}"))[0];
    // the view's mounts in the same call: ctr's lease on the view ends with the
    // command, and containerd may collect the view right after
    let m = ctd.ctr_ok(&[
        "snapshot",
        "--snapshotter",
        "overlayfs",
        "view",
        "--mounts",
        "apply-view",
        top,
    ]);
    let lower = m
        .split("lowerdir=")
        .nth(1)
        .unwrap_or_else(|| panic!("no lowerdir in {m}"))
        .split([',', ' ', '\n', '"'])
        .next()
        .unwrap_or("");
    let mut dirs: Vec<PathBuf> = lower.split(':').map(PathBuf::from).collect();
    dirs.reverse();
    assert_eq!(dirs.len(), layers, "{m}");
    dirs
}

/// A directory's tree with what containerd leaves unset normalized: the root (the
/// snapshotter made it) is dropped, and whiteouts are compared by type, device
/// number and owner only (containerd makes them with mode 0 and the current time).
fn compared(dir: &Path) -> Tree {
    containerd_comparable(tree(dir))
}

#[test]
fn applied_layers_equal_containerd_overlayfs_snapshots() {
    let tools = [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/docker-registry",
    ];
    if !support::require(
        &tools,
        "applied_layers_equal_containerd_overlayfs_snapshots",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let tars = [base(), middle(), top()];
    let layers: Vec<Layer> = tars.iter().map(|t| Layer::gzip(t)).collect();
    let image = registry.push_image("apply/diff", "1", &layers);
    let ctd = Containerd::start(
        &tmp.path().join("containerd"),
        &tmp.path().join("none.sock"),
    );
    ctd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        &image,
    ]);
    let dirs = layer_dirs(&ctd, layers.len());
    for (i, (layer, theirs)) in layers.iter().zip(&dirs).enumerate() {
        let ours = tmp.path().join(format!("ours-{i}"));
        std::fs::create_dir(&ours).unwrap();
        let stats = apply_stream(&layer.blob[..], &ours).unwrap();
        let want = compared(theirs);
        assert_same(&format!("layer {i}, stream"), &compared(&ours), &want);
        // the same layer as eStargz: from its TOC, and as the FUSE view shows it
        let l = lazy(&tars[i], Format::Estargz);
        let from_toc = tmp.path().join(format!("toc-{i}"));
        std::fs::create_dir(&from_toc).unwrap();
        apply_layer(&remote(&l, tmp.path()), &from_toc).unwrap();
        assert_same(&format!("layer {i}, TOC"), &compared(&from_toc), &want);
        let fuse = fuse_tree(&l, tmp.path());
        assert_same(
            &format!("layer {i}, FUSE"),
            &containerd_comparable(fuse),
            &want,
        );
        eprintln!("layer {i}: {} entries identical, {stats:?}", want.0.len());
    }
    // the deletions and the opaque directory really are in overlay form
    let x = common::lazy::xattrs(&dirs[1].join("opt/app"));
    assert_eq!(
        x.get("trusted.overlay.opaque").map(Vec::as_slice),
        Some(&b"y"[..])
    );
    let wh = std::fs::symlink_metadata(dirs[1].join("var/lib/data")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &wh.file_type()
    ));
    ctd.ctr_ok(&["image", "rm", &image]);
}

// ---- hostile layers ----

/// A directory holding a decoy file and the destination; everything in it but the
/// destination must be left as it was.
struct Sentinel {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dest: PathBuf,
    decoy: PathBuf,
}

impl Sentinel {
    fn new() -> Sentinel {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("sentinel");
        let dest = root.join("dest");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let decoy = root.join("etc/passwd");
        std::fs::write(&decoy, b"decoy\n").unwrap();
        std::fs::write(root.join("x"), b"outside\n").unwrap();
        Sentinel {
            _tmp: tmp,
            root,
            dest,
            decoy,
        }
    }

    fn outside(&self) -> Tree {
        let (mut map, mut links) = snapshot_exact(&self.root);
        let inside = |k: &String| k == "dest" || k.starts_with("dest/") || k.is_empty();
        map.retain(|k, _| !inside(k));
        links.retain(|g| !g.iter().any(inside));
        (map, links)
    }

    /// Applies `blob` and checks nothing outside changed; returns the result.
    fn apply(&self, blob: &[u8]) -> lazysnap::Result<ApplyStats> {
        let before = self.outside();
        let r = apply_stream(blob, &self.dest);
        assert_same("outside the destination", &self.outside(), &before);
        assert_eq!(std::fs::read(&self.decoy).unwrap(), b"decoy\n");
        r
    }
}

fn err_of(r: lazysnap::Result<ApplyStats>) -> String {
    match r {
        Ok(s) => panic!("applied a hostile layer: {s:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn names_with_dot_dot_are_refused() {
    use tar::EntryType::{Char, Directory, Regular};
    for (name, kind) in [
        ("../x", Regular),
        ("a/../../x", Regular),
        ("a/../b", Regular),
        ("../../../../../../../../tmp/escaped", Regular),
        ("../etc/", Directory),
        ("../dev-null", Char),
    ] {
        let s = Sentinel::new();
        let e = err_of(s.apply(&raw_archive(&[raw_entry(name, kind, "", b"pwned\n", None)])));
        assert!(e.contains(name) && e.contains("escapes"), "{name}: {e}");
    }
}

#[test]
fn absolute_names_land_inside() {
    let s = Sentinel::new();
    let abs = format!("{}", s.root.join("x").display());
    let blob = raw_archive(&[
        raw_entry(
            "/etc/passwd",
            tar::EntryType::Regular,
            "",
            b"inside\n",
            None,
        ),
        raw_entry(&abs, tar::EntryType::Regular, "", b"also inside\n", None),
    ]);
    s.apply(&blob).unwrap();
    assert_eq!(
        std::fs::read(s.dest.join("etc/passwd")).unwrap(),
        b"inside\n"
    );
    let rel = abs.trim_start_matches('/');
    assert_eq!(std::fs::read(s.dest.join(rel)).unwrap(), b"also inside\n");
}

#[test]
fn symlinked_parents_are_refused() {
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    let s0 = Sentinel::new();
    let etc = s0.root.join("etc").display().to_string();
    drop(s0);
    for (link_target, victim) in [
        (etc.as_str(), "passwd"),
        ("../..", "x"),
        ("../../etc", "passwd"),
        ("/etc", "passwd"),
        (".", "innocent"),
    ] {
        let s = Sentinel::new();
        let link_target = link_target.replace(&etc, &s.root.join("etc").display().to_string());
        let name = format!("link/{victim}");
        for entry in [
            raw_entry(&name, Regular, "", b"pwned\n", None),
            raw_entry(&format!("{name}/"), Directory, "", b"", None),
            raw_entry("hard", Link, &name, b"", None),
        ] {
            let blob = raw_archive(&[raw_entry("link", Symlink, &link_target, b"", None), entry]);
            let e = err_of(s.apply(&blob));
            assert!(
                e.contains(&name) && e.contains("parent link is a symbolic link"),
                "{link_target}: {e}"
            );
        }
    }
}

#[test]
fn hard_links_cannot_point_out() {
    use tar::EntryType::{Link, Regular, Symlink};
    let s = Sentinel::new();
    let decoy = s.decoy.display().to_string();
    let nlink = std::fs::metadata(&s.decoy).unwrap().nlink();
    for (target, want) in [
        ("../x", "escapes"),
        ("a/../../x", "escapes"),
        (decoy.as_str(), "does not exist"),
        ("/etc/passwd", "does not exist"),
        ("missing", "does not exist"),
    ] {
        let e = err_of(s.apply(&raw_archive(&[raw_entry("h", Link, target, b"", None)])));
        assert!(e.contains("h") && e.contains(want), "{target}: {e}");
    }
    // through a symlink, to a file that does exist outside
    let blob = raw_archive(&[
        raw_entry(
            "out",
            Symlink,
            &s.root.join("etc").display().to_string(),
            b"",
            None,
        ),
        raw_entry("h", Link, "out/passwd", b"", None),
    ]);
    let e = err_of(s.apply(&blob));
    assert!(
        e.contains("out/passwd") && e.contains("symbolic link"),
        "{e}"
    );
    // a hard link to a symlink links the symlink itself, never what it points to
    let blob = raw_archive(&[
        raw_entry("sym", Symlink, &decoy, b"", None),
        raw_entry("h2", Link, "sym", b"", None),
        raw_entry("dir/", tar::EntryType::Directory, "", b"", None),
        raw_entry("dir/f", Regular, "", b"ok", None),
    ]);
    s.apply(&blob).unwrap();
    assert!(
        std::fs::symlink_metadata(s.dest.join("h2"))
            .unwrap()
            .is_symlink()
    );
    assert_eq!(std::fs::metadata(&s.decoy).unwrap().nlink(), nlink);
}

#[test]
fn existing_names_are_replaced_never_written_through() {
    use tar::EntryType::{Char, Fifo, Link, Regular, Symlink};
    let s = Sentinel::new();
    let decoy = s.decoy.display().to_string();
    let blob = raw_archive(&[
        raw_entry("via-symlink", Symlink, &decoy, b"", None),
        raw_entry("via-symlink", Regular, "", b"replaced symlink\n", None),
        raw_entry("null", Char, "", b"", None),
        raw_entry("null", Regular, "", b"replaced device\n", None),
        raw_entry("pipe", Fifo, "", b"", None),
        raw_entry("pipe", Regular, "", b"replaced fifo\n", None),
        raw_entry("a", Regular, "", b"shared inode\n", None),
        raw_entry("b", Link, "a", b"", None),
        raw_entry("b", Regular, "", b"b only\n", None),
    ]);
    s.apply(&blob).unwrap();
    let read = |p: &str| std::fs::read(s.dest.join(p)).unwrap();
    assert_eq!(read("via-symlink"), b"replaced symlink\n");
    assert_eq!(read("null"), b"replaced device\n");
    assert_eq!(read("pipe"), b"replaced fifo\n");
    assert_eq!(read("a"), b"shared inode\n");
    assert_eq!(read("b"), b"b only\n");
    for p in ["via-symlink", "null", "pipe"] {
        assert!(
            std::fs::symlink_metadata(s.dest.join(p)).unwrap().is_file(),
            "{p}"
        );
    }
}

#[test]
fn truncated_and_oversized_streams_fail() {
    use tar::EntryType::Regular;
    let s = Sentinel::new();
    let e = err_of(s.apply(&raw_archive(&[raw_entry(
        "big",
        Regular,
        "",
        &[7u8; 100],
        Some(1 << 30),
    )])));
    assert!(e.contains("big") && e.contains("short"), "{e}");
    let e = err_of(s.apply(&raw_entry("big", Regular, "", &[7u8; 100], Some(1 << 40))));
    assert!(e.contains("big") && e.contains("short"), "{e}");

    let tar = common::corpus_tar(4096);
    let cuts = [tar.len() / 3, 512 * 7, tar.len() - 1024];
    for cut in cuts {
        let e = err_of(s.apply(&tar[..cut]));
        assert!(e.contains("truncated"), "tar cut at {cut}: {e}");
    }
    for (form, blob) in [("gzip", gzip(&tar)), ("zstd", zstd(&tar))] {
        let e = err_of(s.apply(&blob[..blob.len() / 2]));
        assert!(!e.is_empty(), "{form}: {e}");
        let e = err_of(s.apply(&blob[..blob.len() - 3]));
        assert!(!e.is_empty(), "{form}: {e}");
    }
    // an eStargz blob cut between two gzip members decompresses cleanly, but the
    // tar inside has no end-of-archive marker
    let l = lazy(&tar, Format::Estargz);
    let toc = lazysnap::format::reader::locate(&l.blob).unwrap();
    let e = err_of(s.apply(&l.blob[..toc.data_end() as usize]));
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn garbage_fails() {
    let s = Sentinel::new();
    let noise = common::prng_bytes(9, 10_000);
    let e = err_of(s.apply(&noise));
    assert!(e.contains("checksum"), "{e}");
    let e = err_of(s.apply(&gzip(&noise)));
    assert!(e.contains("checksum"), "{e}");
    let mut bad = gzip(&common::corpus_tar(4096));
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    err_of(s.apply(&bad));
    let e = err_of(s.apply(&[0x1f, 0x8b, 8, 0, 0]));
    assert!(!e.is_empty());
    let e = err_of(s.apply(b""));
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn out_of_range_owners_fail_naming_the_file() {
    let s = Sentinel::new();
    for (name, data) in [("small", vec![1u8; 10]), ("large", vec![2u8; 1 << 20])] {
        let mut t = Corpus::new();
        t.file("first", 0o644, &ROOT, b"fine");
        t.pax(&[("uid", b"4294967296")]);
        t.file(name, 0o644, &ROOT, &data);
        let e = err_of(s.apply(&t.finish()));
        assert!(e.contains(name) && e.contains("out of range"), "{e}");
    }
}

#[test]
fn a_file_as_parent_is_an_error() {
    use tar::EntryType::Regular;
    let s = Sentinel::new();
    let blob = raw_archive(&[
        raw_entry("a", Regular, "", b"file", None),
        raw_entry("a/b", Regular, "", b"under a file", None),
    ]);
    let e = err_of(s.apply(&blob));
    assert!(e.contains("a/b") && e.contains("not a directory"), "{e}");
}
