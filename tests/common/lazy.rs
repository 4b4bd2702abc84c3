//! Helpers for tests of lazily mounted trees: `lazysnap mount` as a guarded child
//! process, plain extraction of layers in overlayfs form, and a full snapshot of a tree
//! (metadata, content digests, xattrs, hard-link groups) to compare two trees with.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::registry::sha256_hex;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

pub fn mountpoints() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|mp| PathBuf::from(mp.replace("\\040", " ")))
        .collect()
}

pub fn is_mounted(dir: &Path) -> bool {
    let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    mountpoints().contains(&canon)
}

/// `lazysnap mount` as a child process. On drop (a failed assertion included) it is
/// stopped with SIGTERM, and whatever it left mounted (the overlay at `dir`, its
/// per-layer FUSE mounts) is detached.
pub struct LazyMount {
    child: Option<Child>,
    pid: u32,
    dir: PathBuf,
    stats: PathBuf,
}

impl LazyMount {
    pub fn start(source: &str, dir: &Path, extra: &[&str]) -> LazyMount {
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
        let mut m = LazyMount {
            pid: child.id(),
            child: Some(child),
            dir: dir.to_path_buf(),
            stats,
        };
        let t = Instant::now();
        while !is_mounted(dir) {
            if let Some(st) = m.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("lazysnap mount {source} exited with {st} before mounting");
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "{source} not mounted after 120 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    /// Stops the mount with SIGTERM and returns the per-layer statistics it printed.
    pub fn stop(mut self) -> serde_json::Value {
        let mut c = self.child.take().unwrap();
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let status = c.wait().unwrap();
        assert!(status.success(), "lazysnap mount exited with {status}");
        assert!(!is_mounted(&self.dir), "still mounted after SIGTERM");
        let text = std::fs::read_to_string(&self.stats).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("stats {text:?}: {e}"))
    }
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        // the per-layer FUSE mounts of a multi-layer image live in a private directory
        let private = std::env::temp_dir().join(format!("lazysnap-mount-{}", self.pid));
        for mp in mountpoints().iter().rev() {
            if mp.starts_with(&private) {
                let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// `p` is a symlink to `target` that the mounted layer does not follow: opening the
/// link itself with `O_NOFOLLOW` is refused with ELOOP.
pub fn assert_symlink_not_followed(p: &Path, target: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let md = std::fs::symlink_metadata(p).unwrap();
    assert!(md.file_type().is_symlink(), "{}", p.display());
    assert_eq!(std::fs::read_link(p).unwrap(), Path::new(target));
    let e = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
        .expect_err("O_NOFOLLOW on a symlink");
    assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{}: {e}", p.display());
}

/// Detaches a mount on drop.
pub struct Unmount(pub PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Extracts a tar with GNU tar and turns whiteouts into overlayfs form.
pub fn extract_overlay_form(tar: &[u8], dir: &Path) {
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

pub fn walk(dir: &Path) -> Vec<PathBuf> {
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

pub fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
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

#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: i64,
    size: u64,
    rdev: u64,
    link: Option<PathBuf>,
    content: Option<String>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

impl Seen {
    /// Forgets the sub-second part of the mtime (TOCs keep whole seconds).
    pub fn drop_nanos(&mut self) {
        self.mtime_nsec = 0;
    }

    /// For a whiteout (a 0:0 character device), keeps only what identifies it:
    /// type, device number and owner.
    pub fn whiteout_identity(&mut self) {
        if self.kind == "char" && self.rdev == 0 {
            self.mode = 0;
            self.mtime = 0;
            self.mtime_nsec = 0;
        }
    }
}

/// A tree as it compares with containerd's unpack of the same layer: the root (the
/// snapshotter made it) is dropped, and whiteouts are compared by type, device
/// number and owner only (containerd makes them with mode 0 and the current time).
pub fn containerd_comparable(
    mut t: (BTreeMap<String, Seen>, Vec<Vec<String>>),
) -> (BTreeMap<String, Seen>, Vec<Vec<String>>) {
    t.0.remove("");
    for v in t.0.values_mut() {
        v.whiteout_identity();
    }
    t
}

/// Every entry under `root` and the hard-link groups (paths sharing an inode).
/// Directory mtimes and sub-second times are left out: overlayfs and FUSE views
/// differ there from an extraction.
pub fn snapshot(root: &Path) -> (BTreeMap<String, Seen>, Vec<Vec<String>>) {
    snapshot_with(root, false)
}

/// Like [`snapshot`], with directory mtimes, nanoseconds and the root itself (as
/// `""`): for comparing extractions with each other.
pub fn snapshot_exact(root: &Path) -> (BTreeMap<String, Seen>, Vec<Vec<String>>) {
    snapshot_with(root, true)
}

fn snapshot_with(root: &Path, exact: bool) -> (BTreeMap<String, Seen>, Vec<Vec<String>>) {
    let mut map = BTreeMap::new();
    let mut inodes: HashMap<u64, Vec<String>> = HashMap::new();
    let mut paths = walk(root);
    if exact {
        paths.push(root.to_path_buf());
    }
    for p in paths {
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
                mtime: if kind == "dir" && !exact {
                    0
                } else {
                    m.mtime()
                },
                mtime_nsec: if exact { m.mtime_nsec() } else { 0 },
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

/// The uncompressed tar stream of a gzip or zstd layer blob.
pub fn decompress(blob: &[u8]) -> Vec<u8> {
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
