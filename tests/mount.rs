//! The oracle the anchors use: an image mounted lazily (`lazysnap mount`, FUSE per
//! layer, overlayfs on top) equals a plain extraction of the same layers stacked with
//! overlayfs — content, mode, ownership, mtime, symlinks, hard links, devices,
//! xattrs and whiteouts — for every format. A chunk corrupted in the registry fails
//! that read with EIO and nothing else.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::registry::{Layer, Registry, require, sha256_hex};
use lazysnap::format::Format;
use lazysnap::format::writer::{WriteOptions, write_layer};

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

fn is_mounted(dir: &Path) -> bool {
    let canon = dir.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| Path::new(mp) == canon)
}

/// `lazysnap mount` as a child process; stopped with SIGTERM on drop.
struct LazyMount {
    child: Option<Child>,
    dir: PathBuf,
    stats: PathBuf,
}

impl LazyMount {
    fn start(source: &str, dir: &Path, extra: &[&str]) -> LazyMount {
        let stats = dir.with_extension("stats.json");
        let child = Command::new(BIN)
            .arg("mount")
            .arg(source)
            .arg(dir)
            .arg("--stats")
            .args(extra)
            .stdout(Stdio::from(std::fs::File::create(&stats).unwrap()))
            .spawn()
            .expect("spawn lazysnap mount");
        let m = LazyMount {
            child: Some(child),
            dir: dir.to_path_buf(),
            stats,
        };
        let t = Instant::now();
        while !is_mounted(dir) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{source} not mounted in time"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    /// Stops the mount and returns the per-layer statistics it printed.
    fn stop(mut self) -> serde_json::Value {
        let mut c = self.child.take().unwrap();
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let status = c.wait().unwrap();
        assert!(status.success(), "lazysnap mount exited with {status}");
        assert!(!is_mounted(&self.dir), "still mounted after SIGTERM");
        serde_json::from_str(&std::fs::read_to_string(&self.stats).unwrap()).unwrap()
    }
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        if is_mounted(&self.dir) {
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Extracts a tar with GNU tar and turns whiteouts into overlayfs form.
fn extract_overlay_form(tar: &[u8], dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let tmp = dir.with_extension("tar");
    std::fs::write(&tmp, tar).unwrap();
    let st = Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
        .arg(&tmp)
        .arg("-C")
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "tar -x");
    let mut whiteouts = Vec::new();
    for e in walk(dir) {
        if let Some(name) = e.file_name().and_then(|n| n.to_str())
            && name.starts_with(".wh.")
        {
            whiteouts.push(e);
        }
    }
    for w in whiteouts {
        let parent = w.parent().unwrap().to_path_buf();
        let name = w.file_name().unwrap().to_str().unwrap().to_string();
        std::fs::remove_file(&w).unwrap();
        if name == ".wh..wh..opq" {
            let p = CString::new(parent.as_os_str().as_bytes()).unwrap();
            let k = CString::new("trusted.overlay.opaque").unwrap();
            let r = unsafe { libc::lsetxattr(p.as_ptr(), k.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
            assert_eq!(r, 0, "set opaque on {}", parent.display());
        } else {
            let target = parent.join(&name[4..]);
            let _ = std::fs::remove_dir_all(&target);
            let _ = std::fs::remove_file(&target);
            let c = CString::new(target.as_os_str().as_bytes()).unwrap();
            let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) };
            assert_eq!(r, 0, "mknod whiteout {}", target.display());
        }
    }
    std::fs::remove_file(&tmp).unwrap();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            // overlayfs lists a whiteout of the lowest layer but cannot stat it
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        let k = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        let m = unsafe { libc::lgetxattr(c.as_ptr(), k.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if m >= 0 {
            v.truncate(m as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), v);
        }
    }
    out
}

#[derive(Debug, PartialEq)]
struct Seen {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
    rdev: u64,
    link: Option<PathBuf>,
    content: Option<String>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// Every entry under `root` and the hard-link groups (paths sharing an inode).
fn snapshot(root: &Path) -> (BTreeMap<String, Seen>, Vec<Vec<String>>) {
    let mut map = BTreeMap::new();
    let mut inodes: HashMap<u64, Vec<String>> = HashMap::new();
    for p in walk(root) {
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let m = std::fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "reg"
        };
        if kind == "reg" {
            inodes.entry(m.ino()).or_default().push(rel.clone());
        }
        map.insert(
            rel,
            Seen {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime: if kind == "dir" { 0 } else { m.mtime() },
                size: if kind == "reg" { m.size() } else { 0 },
                rdev: m.rdev(),
                link: ft.is_symlink().then(|| std::fs::read_link(&p).unwrap()),
                content: (kind == "reg").then(|| sha256_hex(&std::fs::read(&p).unwrap())),
                xattrs: xattrs(&p),
            },
        );
    }
    let mut groups: Vec<Vec<String>> = inodes
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    groups.sort();
    (map, groups)
}

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

fn decompress(blob: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    if blob.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(blob)
            .read_to_end(&mut out)
            .unwrap();
    } else {
        zstd::stream::read::Decoder::new(blob)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
    }
    out
}

fn blob(tar: &[u8], format: Format) -> Layer {
    let mut out = Vec::new();
    let r = write_layer(
        &tar.to_vec(),
        &mut out,
        &WriteOptions {
            format,
            chunk_size: 4096,
            ..WriteOptions::default()
        },
    )
    .unwrap();
    Layer {
        blob: out,
        media_type: r.media_type.to_string(),
        annotations: r.annotations,
        diff_id: r.diff_id,
    }
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
            assert!(s["fetched_bytes"].as_u64().unwrap() <= layers[i].blob.len() as u64);
            assert!(reg.blob_gets(&digests[i]) >= 1);
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
