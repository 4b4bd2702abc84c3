//! Shared pieces of the mount tests: tree helpers, in-memory content, xattr and mountinfo
//! probes, and an overlay mount guard.

#![allow(dead_code)] // each test binary uses a different subset

use std::{
    collections::HashMap,
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lazysnap_fuse::{Attr, Content, FileId, Kind, ReadReply};

pub fn dir(perm: u16) -> Attr {
    Attr {
        kind: Kind::Dir,
        perm,
        ..Attr::default()
    }
}

pub fn file(size: usize) -> Attr {
    Attr {
        kind: Kind::File,
        perm: 0o644,
        size: size as u64,
        ..Attr::default()
    }
}

pub fn time(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

/// Deterministic bytes that differ at every offset a test might look at.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Content over in-memory byte vectors, answering on the FUSE thread, counting reads.
#[derive(Default)]
pub struct MemContent {
    pub files: HashMap<FileId, Vec<u8>>,
    pub backing: HashMap<FileId, PathBuf>,
    pub reads: AtomicUsize,
    pub reads_of: HashMap<FileId, AtomicUsize>,
}

impl MemContent {
    pub fn add(&mut self, id: FileId, bytes: Vec<u8>) {
        self.files.insert(id, bytes);
        self.reads_of.insert(id, AtomicUsize::new(0));
    }

    pub fn reads_of(&self, id: FileId) -> usize {
        self.reads_of
            .get(&id)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

impl Content for MemContent {
    fn read(&self, file: FileId, offset: u64, size: u32, reply: ReadReply) {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if let Some(c) = self.reads_of.get(&file) {
            c.fetch_add(1, Ordering::SeqCst);
        }
        match self.files.get(&file) {
            Some(bytes) => {
                let start = (offset as usize).min(bytes.len());
                let end = (start + size as usize).min(bytes.len());
                reply.data(&bytes[start..end]);
            }
            None => reply.error(libc::EIO),
        }
    }

    fn backing_file(&self, file: FileId) -> Option<std::fs::File> {
        std::fs::File::open(self.backing.get(&file)?).ok()
    }
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("test paths have no NUL")
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `lgetxattr` with a buffer of `cap` bytes (`cap` 0 is the size probe): the value (or
/// its size as a 0-filled vec for a probe) or the errno.
pub fn getxattr_cap(path: &Path, name: &str, cap: usize) -> Result<Vec<u8>, i32> {
    let p = cpath(path);
    let n = CString::new(name).expect("xattr name");
    let mut buf = vec![0u8; cap];
    // SAFETY: valid C strings and a buffer of `cap` bytes.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(errno());
    }
    if cap == 0 {
        return Ok(vec![0; r as usize]);
    }
    buf.truncate(r as usize);
    Ok(buf)
}

pub fn getxattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    getxattr_cap(path, name, 65536)
}

/// `llistxattr`: the attribute names.
pub fn listxattr(path: &Path) -> Result<Vec<String>, i32> {
    let p = cpath(path);
    let mut buf = vec![0u8; 65536];
    // SAFETY: a valid C string and a buffer of its stated length.
    let r = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(errno());
    }
    buf.truncate(r as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

/// `lsetxattr`: Ok or the errno.
pub fn setxattr(path: &Path, name: &str, value: &[u8]) -> Result<(), i32> {
    let p = cpath(path);
    let n = CString::new(name).expect("xattr name");
    // SAFETY: valid C strings and a value slice.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

/// The raw names `readdir(3)` returns, `.` and `..` included.
pub fn raw_readdir(path: &Path) -> Vec<Vec<u8>> {
    let p = cpath(path);
    let mut names = Vec::new();
    // SAFETY: opendir/readdir/closedir on a valid C string; entries are copied out
    // before the next readdir.
    unsafe {
        let d = libc::opendir(p.as_ptr());
        assert!(
            !d.is_null(),
            "opendir {}: errno {}",
            path.display(),
            errno()
        );
        loop {
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            names.push(
                std::ffi::CStr::from_ptr((*e).d_name.as_ptr())
                    .to_bytes()
                    .to_vec(),
            );
        }
        libc::closedir(d);
    }
    names
}

/// The mountinfo line for `path`, if something is mounted exactly there.
pub fn mountinfo_line(path: &Path) -> Option<String> {
    let want = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let want = want.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .map(str::to_string)
}

pub fn is_mounted(path: &Path) -> bool {
    mountinfo_line(path).is_some()
}

/// An overlay mount, detached on drop (even when the test fails).
pub struct Overlay {
    pub target: PathBuf,
}

impl Overlay {
    /// Mounts overlayfs at `target` with `options` (`lowerdir=...` and friends).
    pub fn mount(target: &Path, options: &str, read_only: bool) -> Result<Overlay, nix::Error> {
        let flags = if read_only {
            nix::mount::MsFlags::MS_RDONLY
        } else {
            nix::mount::MsFlags::empty()
        };
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            flags,
            Some(options),
        )?;
        Ok(Overlay {
            target: target.to_path_buf(),
        })
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Shared handle type the mount takes.
pub fn shared<C: Content>(c: C) -> (Arc<C>, Arc<dyn Content>) {
    let c = Arc::new(c);
    let d: Arc<dyn Content> = c.clone();
    (c, d)
}
