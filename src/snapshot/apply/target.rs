//! The destination directory, written only through directory file descriptors.
//!
//! Every parent directory is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
//! | RESOLVE_NO_MAGICLINKS)` from the destination, so a symlink (or `..`) in a parent
//! is an error, never a way out; every entry is created with `O_EXCL` semantics in the
//! directory so opened, after whatever held its name before is removed, so no write
//! ever goes through an existing file, device or symlink.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat};
use nix::sys::stat::{futimens, mkdirat, mknodat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};

use super::names::OPAQUE_XATTR;
use crate::error::{Error, Result};

/// Block size below which holes are not worth making.
const HOLE: u64 = 4096;

/// Metadata applied to an entry once it exists.
#[derive(Debug, Clone, Default)]
pub struct Attrs<'a> {
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    pub xattrs: Vec<(&'a str, &'a [u8])>,
}

/// Where an entry goes: `base` in the open directory `dir`, which is `parents` below
/// the root; `entry` is the layer's own name for messages.
pub struct At<'a> {
    pub dir: &'a OwnedFd,
    pub parents: &'a [&'a str],
    pub base: &'a str,
    pub entry: &'a str,
}

impl At<'_> {
    fn rel(&self) -> String {
        join(self.parents, self.base)
    }
}

fn join(parents: &[&str], base: &str) -> String {
    let mut s = String::new();
    for p in parents {
        s.push_str(p);
        s.push('/');
    }
    s.push_str(base);
    s
}

fn fail(entry: &str, what: &str, e: Errno) -> Error {
    Error::io(format!("{entry}: {what}"), e.into())
}

fn beneath(flags: OFlag) -> OpenHow {
    OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS,
    )
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW
}

fn ids(a: &Attrs) -> (Option<Uid>, Option<Gid>) {
    (Some(Uid::from_raw(a.uid)), Some(Gid::from_raw(a.gid)))
}

fn mode(a: &Attrs) -> Mode {
    Mode::from_bits_truncate(a.mode & 0o7777)
}

fn times(a: &Attrs) -> (TimeSpec, TimeSpec) {
    let t = TimeSpec::new(a.mtime.0, a.mtime.1 as i64);
    (t, t)
}

/// Sets the xattrs of an open file or directory (after chown, which clears
/// `security.capability`).
fn set_xattrs(fd: &impl AsRawFd, a: &Attrs, entry: &str) -> Result<()> {
    for (k, v) in &a.xattrs {
        let name =
            CString::new(*k).map_err(|_| Error::Tar(format!("{entry}: xattr name {k:?}")))?;
        // SAFETY: valid fd, NUL-terminated name, and a value slice with its length.
        let r = unsafe {
            libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0)
        };
        if r != 0 {
            xattr_failed(entry, k, Errno::last())?;
        }
    }
    Ok(())
}

/// A filesystem without a namespace of xattrs (`ENOTSUP`) loses them with a
/// warning, as containerd does; any other failure is an error.
fn xattr_failed(entry: &str, name: &str, e: Errno) -> Result<()> {
    if e == Errno::ENOTSUP {
        tracing::warn!(
            entry,
            xattr = name,
            "the filesystem does not support this xattr; dropped"
        );
        return Ok(());
    }
    Err(fail(entry, &format!("set xattr {name}"), e))
}

/// The path of `base` inside an open directory, for the calls that have no
/// fd-relative form (xattrs of symlinks and devices). The final name is never
/// followed by the `l*xattr` calls.
fn proc_path(dir: &OwnedFd, base: &str) -> Result<CString> {
    CString::new(format!("/proc/self/fd/{}/{base}", dir.as_raw_fd()))
        .map_err(|_| Error::Tar(format!("{base:?}: name holds a NUL byte")))
}

fn set_xattrs_nofollow(at: &At, a: &Attrs) -> Result<()> {
    if a.xattrs.is_empty() {
        return Ok(());
    }
    let path = proc_path(at.dir, at.base)?;
    for (k, v) in &a.xattrs {
        let name =
            CString::new(*k).map_err(|_| Error::Tar(format!("{}: xattr name {k:?}", at.entry)))?;
        // SAFETY: NUL-terminated path and name, a value slice with its length.
        let r =
            unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        if r != 0 {
            xattr_failed(at.entry, k, Errno::last())?;
        }
    }
    Ok(())
}

/// Writes `data` at file offset `off`, leaving all-zero blocks as holes; returns the
/// end of the last byte written (0 when all of it was zeros).
pub fn write_sparse(f: &File, off: u64, data: &[u8], entry: &str) -> Result<u64> {
    let mut pos = 0usize;
    let mut run: Option<usize> = None;
    let mut written = 0;
    while pos < data.len() {
        let abs = off + pos as u64;
        let step = (HOLE - abs % HOLE) as usize;
        let end = (pos + step).min(data.len());
        let zero = is_zero(&data[pos..end]);
        match (zero, run) {
            (false, None) => run = Some(pos),
            (true, Some(s)) => {
                write_at(f, off + s as u64, &data[s..pos], entry)?;
                written = off + pos as u64;
                run = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(s) = run {
        write_at(f, off + s as u64, &data[s..], entry)?;
        written = off + data.len() as u64;
    }
    Ok(written)
}

fn write_at(f: &File, off: u64, data: &[u8], entry: &str) -> Result<()> {
    f.write_all_at(data, off)
        .map_err(|e| Error::io(format!("{entry}: write"), e))
}

fn is_zero(b: &[u8]) -> bool {
    let chunks = b.chunks_exact(64);
    let rest = chunks.remainder();
    chunks
        .into_iter()
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && rest.iter().all(|&x| x == 0)
}

/// Sets owner, xattrs, mode and mtime of a written regular file, in the order that
/// keeps them all (chown clears setuid and `security.capability`).
pub fn finish_file(f: &File, size: u64, written_end: u64, a: &Attrs, entry: &str) -> Result<()> {
    if written_end < size {
        f.set_len(size)
            .map_err(|e| Error::io(format!("{entry}: set size"), e))?;
    }
    let (u, g) = ids(a);
    fchown(f, u, g).map_err(|e| fail(entry, "chown", e))?;
    set_xattrs(f, a, entry)?;
    fchmod(f, mode(a)).map_err(|e| fail(entry, "chmod", e))?;
    let (at, mt) = times(a);
    futimens(f, &at, &mt).map_err(|e| fail(entry, "set times", e))
}

/// The destination and what must be done to it at the end.
pub struct Target {
    root: Arc<OwnedFd>,
    /// The last parent directory opened, reused by the entries that follow it.
    last: Option<(String, Arc<OwnedFd>)>,
    /// Directory mtimes, set at the end (deepest first) once nothing more is
    /// created in them; keyed by path below the root (`""` is the root).
    dir_times: HashMap<String, (i64, u32)>,
}

impl Target {
    /// Opens `dest`, an existing directory.
    pub fn open(dest: &Path) -> Result<Target> {
        let fd = nix::fcntl::open(
            dest,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail(&dest.display().to_string(), "open destination", e))?;
        Ok(Target {
            root: Arc::new(fd),
            last: None,
            dir_times: HashMap::new(),
        })
    }

    /// What the layer root has when the layer does not name it (the FUSE view's
    /// implicit root).
    pub const ROOT: Attrs<'static> = Attrs {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: (0, 0),
        xattrs: Vec::new(),
    };

    /// Opens the directory `parents`, creating missing ones (0755, root, mtime 0, as
    /// the FUSE view shows implicit directories). A symlink or non-directory on the
    /// way is an error naming `entry`.
    pub fn parent(&mut self, parents: &[&str], entry: &str) -> Result<Arc<OwnedFd>> {
        if parents.is_empty() {
            return Ok(self.root.clone());
        }
        if let Some((key, fd)) = &self.last
            && same_path(key, parents)
        {
            return Ok(fd.clone());
        }
        let key = parents.join("/");
        let fd = match openat2(self.root.as_fd(), key.as_str(), beneath(dir_flags())) {
            Ok(fd) => fd,
            Err(_) => self.walk(parents, entry, true)?,
        };
        let fd = Arc::new(fd);
        self.last = Some((key, fd.clone()));
        Ok(fd)
    }

    /// Opens the existing directory `parents` without creating anything.
    pub fn resolve(&self, parents: &[&str], entry: &str) -> Result<OwnedFd> {
        if parents.is_empty() {
            return self
                .root
                .try_clone()
                .map_err(|e| Error::io(format!("{entry}: dup"), e));
        }
        match openat2(
            self.root.as_fd(),
            parents.join("/").as_str(),
            beneath(dir_flags()),
        ) {
            Ok(fd) => Ok(fd),
            Err(_) => walk_from(&self.root, parents, entry, &mut |_, _| Ok(None)),
        }
    }

    /// Opens `parents` one component at a time, to create what is missing and to
    /// say exactly what is wrong.
    fn walk(&mut self, parents: &[&str], entry: &str, create: bool) -> Result<OwnedFd> {
        let root = self.root.clone();
        let times = &mut self.dir_times;
        walk_from(&root, parents, entry, &mut |dir, i| {
            if !create {
                return Ok(None);
            }
            let name = parents[i];
            match mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(fail(entry, &format!("create parent {name}"), e)),
            }
            let fd = openat2(dir.as_fd(), name, beneath(dir_flags()))
                .map_err(|e| fail(entry, &format!("open parent {name}"), e))?;
            let a = Attrs {
                mode: 0o755,
                ..Attrs::default()
            };
            fchown(&fd, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))
                .map_err(|e| fail(entry, "chown parent", e))?;
            fchmod(&fd, mode(&a)).map_err(|e| fail(entry, "chmod parent", e))?;
            times.entry(parents[..=i].join("/")).or_insert((0, 0));
            Ok(Some(fd))
        })
    }

    /// Makes the directory `at`; over an existing directory it updates owner, mode
    /// and mtime and adds the xattrs, as tar and containerd do.
    pub fn dir(&mut self, at: &At, a: &Attrs) -> Result<()> {
        let rel = at.rel();
        loop {
            match mkdirat(at.dir.as_fd(), at.base, Mode::from_bits_truncate(0o700)) {
                Ok(()) => break,
                Err(Errno::EEXIST) => {
                    if self.is_dir(at)? {
                        break;
                    }
                    self.remove(at)?;
                }
                Err(e) => return Err(fail(at.entry, "create directory", e)),
            }
        }
        let fd = openat2(at.dir.as_fd(), at.base, beneath(dir_flags()))
            .map_err(|e| fail(at.entry, "open directory", e))?;
        self.dir_attrs(&fd, &rel, a, at.entry)
    }

    /// Applies the root entry (`./`) of a layer to the destination itself.
    pub fn root_dir(&mut self, a: &Attrs, entry: &str) -> Result<()> {
        let fd = self
            .root
            .try_clone()
            .map_err(|e| Error::io(format!("{entry}: dup"), e))?;
        self.dir_attrs(&fd, "", a, entry)
    }

    fn dir_attrs(&mut self, fd: &OwnedFd, rel: &str, a: &Attrs, entry: &str) -> Result<()> {
        let (u, g) = ids(a);
        fchown(fd, u, g).map_err(|e| fail(entry, "chown", e))?;
        set_xattrs(fd, a, entry)?;
        fchmod(fd, mode(a)).map_err(|e| fail(entry, "chmod", e))?;
        self.dir_times.insert(rel.to_string(), a.mtime);
        Ok(())
    }

    /// Marks an open directory opaque.
    pub fn opaque(&mut self, dir: &OwnedFd, entry: &str) -> Result<()> {
        set_xattrs(
            dir,
            &Attrs {
                xattrs: vec![(OPAQUE_XATTR, b"y")],
                ..Attrs::default()
            },
            entry,
        )
    }

    /// Creates the regular file `at` for writing, replacing what held the name.
    pub fn file(&mut self, at: &At) -> Result<File> {
        loop {
            match create(at) {
                Ok(fd) => return Ok(File::from(fd)),
                Err(Errno::EEXIST) => self.remove(at)?,
                Err(e) => return Err(fail(at.entry, "create", e)),
            }
        }
    }

    /// Creates the symlink `at` pointing to `target` (never followed).
    pub fn symlink(&mut self, at: &At, target: &str, a: &Attrs) -> Result<()> {
        loop {
            match symlinkat(target, at.dir.as_fd(), at.base) {
                Ok(()) => break,
                Err(Errno::EEXIST) => self.remove(at)?,
                Err(e) => return Err(fail(at.entry, "create symlink", e)),
            }
        }
        let (u, g) = ids(a);
        fchownat(at.dir.as_fd(), at.base, u, g, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| fail(at.entry, "chown", e))?;
        set_xattrs_nofollow(at, a)?;
        self.node_times(at, a)
    }

    /// Creates the device or fifo `at`.
    pub fn node(&mut self, at: &At, kind: SFlag, rdev: u64, a: &Attrs) -> Result<()> {
        loop {
            match mknodat(at.dir.as_fd(), at.base, kind, Mode::empty(), rdev) {
                Ok(()) => break,
                Err(Errno::EEXIST) => self.remove(at)?,
                Err(e) => return Err(fail(at.entry, "create device", e)),
            }
        }
        self.node_attrs(at, a)
    }

    fn node_attrs(&mut self, at: &At, a: &Attrs) -> Result<()> {
        let (u, g) = ids(a);
        fchownat(at.dir.as_fd(), at.base, u, g, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| fail(at.entry, "chown", e))?;
        set_xattrs_nofollow(at, a)?;
        fchmodat(
            at.dir.as_fd(),
            at.base,
            mode(a),
            FchmodatFlags::NoFollowSymlink,
        )
        .or_else(|e| match e {
            // older kernels cannot chmod without following; the node was just made
            Errno::EOPNOTSUPP | Errno::ENOSYS => fchmodat(
                at.dir.as_fd(),
                at.base,
                mode(a),
                FchmodatFlags::FollowSymlink,
            ),
            e => Err(e),
        })
        .map_err(|e| fail(at.entry, "chmod", e))?;
        self.node_times(at, a)
    }

    fn node_times(&self, at: &At, a: &Attrs) -> Result<()> {
        let (t0, t1) = times(a);
        utimensat(
            at.dir.as_fd(),
            at.base,
            &t0,
            &t1,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| fail(at.entry, "set times", e))
    }

    /// Makes the whiteout `at` (a 0:0 character device owned by root) unless an
    /// entry of that name exists, which wins, as in the FUSE view. Says whether it
    /// was made.
    pub fn whiteout(&mut self, at: &At, a: &Attrs) -> Result<bool> {
        match mknodat(at.dir.as_fd(), at.base, SFlag::S_IFCHR, Mode::empty(), 0) {
            Ok(()) => {}
            Err(Errno::EEXIST) => return Ok(false),
            Err(e) => return Err(fail(at.entry, "create whiteout", e)),
        }
        let a = Attrs {
            uid: 0,
            gid: 0,
            xattrs: Vec::new(),
            ..a.clone()
        };
        self.node_attrs(at, &a)?;
        Ok(true)
    }

    /// Hard-links `at` to `target` (`base` in the open directory `dir`). The target
    /// must exist and not be a directory; a symlink target is linked itself.
    pub fn link(&mut self, at: &At, dir: &OwnedFd, base: &str, target: &str) -> Result<()> {
        let missing = || {
            Error::Tar(format!(
                "{}: hard link target {target:?} does not exist in the layer",
                at.entry
            ))
        };
        match fstatat(dir.as_fd(), base, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
                return Err(Error::Tar(format!(
                    "{}: hard link to directory {target:?}",
                    at.entry
                )));
            }
            Ok(_) => {}
            Err(Errno::ENOENT) => return Err(missing()),
            Err(e) => return Err(fail(at.entry, &format!("stat link target {target}"), e)),
        }
        loop {
            match linkat(dir.as_fd(), base, at.dir.as_fd(), at.base, AtFlags::empty()) {
                Ok(()) => return Ok(()),
                Err(Errno::EEXIST) => {
                    // linking a name to itself leaves it as it is
                    let same = match (
                        fstatat(dir.as_fd(), base, AtFlags::AT_SYMLINK_NOFOLLOW),
                        fstatat(at.dir.as_fd(), at.base, AtFlags::AT_SYMLINK_NOFOLLOW),
                    ) {
                        (Ok(a), Ok(b)) => a.st_ino == b.st_ino && a.st_dev == b.st_dev,
                        _ => false,
                    };
                    if same {
                        return Ok(());
                    }
                    self.remove(at)?;
                }
                Err(Errno::ENOENT) => return Err(missing()),
                Err(e) => return Err(fail(at.entry, &format!("hard link to {target}"), e)),
            }
        }
    }

    fn is_dir(&self, at: &At) -> Result<bool> {
        let st = fstatat(at.dir.as_fd(), at.base, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| fail(at.entry, "stat", e))?;
        Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
    }

    /// Removes whatever holds the name `at` (a directory with all it contains), so
    /// that a later entry of the same name replaces it.
    fn remove(&mut self, at: &At) -> Result<()> {
        if self.is_dir(at)? {
            remove_tree(at.dir, at.base, at.entry)?;
            let rel = at.rel();
            let under = format!("{rel}/");
            self.dir_times
                .retain(|k, _| k != &rel && !k.starts_with(&under));
            self.last = None;
            return Ok(());
        }
        unlinkat(at.dir.as_fd(), at.base, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| fail(at.entry, "remove the older entry", e))
    }

    /// Sets the directories' mtimes, deepest first, now that nothing more is
    /// created in them.
    pub fn finish(self) -> Result<()> {
        let mut dirs: Vec<(String, (i64, u32))> = self.dir_times.into_iter().collect();
        dirs.sort_by_key(|(k, _)| {
            std::cmp::Reverse(k.matches('/').count() + usize::from(!k.is_empty()))
        });
        for (rel, (s, ns)) in dirs {
            let t = TimeSpec::new(s, ns as i64);
            let fd = if rel.is_empty() {
                None
            } else {
                Some(
                    openat2(self.root.as_fd(), rel.as_str(), beneath(dir_flags()))
                        .map_err(|e| fail(&rel, "open directory", e))?,
                )
            };
            let fd = fd.as_ref().unwrap_or(&self.root);
            futimens(fd, &t, &t).map_err(|e| fail(&rel, "set times", e))?;
        }
        Ok(())
    }
}

fn create(at: &At) -> nix::Result<OwnedFd> {
    openat(
        at.dir.as_fd(),
        at.base,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
}

/// Creates the regular file `at` for writing from any thread; a non-directory
/// holding the name (a whiteout device made earlier) is replaced.
pub fn create_file(at: &At) -> Result<File> {
    loop {
        match create(at) {
            Ok(fd) => return Ok(File::from(fd)),
            Err(Errno::EEXIST) => unlinkat(at.dir.as_fd(), at.base, UnlinkatFlags::NoRemoveDir)
                .map_err(|e| fail(at.entry, "remove the older entry", e))?,
            Err(e) => return Err(fail(at.entry, "create", e)),
        }
    }
}

fn same_path(key: &str, parents: &[&str]) -> bool {
    let mut rest = key;
    for (i, p) in parents.iter().enumerate() {
        let Some(r) = rest.strip_prefix(p) else {
            return false;
        };
        rest = if i + 1 < parents.len() {
            match r.strip_prefix('/') {
                Some(r) => r,
                None => return false,
            }
        } else {
            r
        };
    }
    rest.is_empty()
}

/// Opens `parents` below `root` component by component. A missing component goes
/// to `missing(dir, i)`, which may create and open it; a symlink is refused with
/// [`Error::UnsafePath`] naming the entry and the link.
fn walk_from(
    root: &OwnedFd,
    parents: &[&str],
    entry: &str,
    missing: &mut dyn FnMut(&OwnedFd, usize) -> Result<Option<OwnedFd>>,
) -> Result<OwnedFd> {
    let mut cur: Option<OwnedFd> = None;
    for (i, name) in parents.iter().enumerate() {
        let dir = cur.as_ref().unwrap_or(root);
        let next = match openat2(dir.as_fd(), *name, beneath(dir_flags())) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => match missing(dir, i)? {
                Some(fd) => fd,
                None => {
                    return Err(Error::Tar(format!(
                        "{entry}: parent directory {} does not exist",
                        parents[..=i].join("/")
                    )));
                }
            },
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                let path = parents[..=i].join("/");
                return Err(match nix::fcntl::readlinkat(dir.as_fd(), *name) {
                    Ok(target) => Error::UnsafePath {
                        path: format!(
                            "{entry} (its parent {path} is a symbolic link to {})",
                            target.to_string_lossy()
                        ),
                    },
                    Err(_) => Error::Tar(format!("{entry}: parent {path} is not a directory")),
                });
            }
            Err(e) => return Err(fail(entry, &format!("open parent {name}"), e)),
        };
        cur = Some(next);
    }
    match cur {
        Some(fd) => Ok(fd),
        None => root
            .try_clone()
            .map_err(|e| Error::io(format!("{entry}: dup"), e)),
    }
}

/// Removes `base` (a directory) in `dir` with everything below it, never following
/// a symlink.
fn remove_tree(dir: &OwnedFd, base: &str, entry: &str) -> Result<()> {
    let fd = openat2(dir.as_fd(), base, beneath(dir_flags()))
        .map_err(|e| fail(entry, "open the older directory", e))?;
    let listing = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| Error::io(format!("{entry}: list the older directory"), e))?;
    for e in listing {
        let e = e.map_err(|e| Error::io(format!("{entry}: list the older directory"), e))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            // names this applier never creates; remove them by their bytes
            unlinkat(fd.as_fd(), name.as_os_str(), UnlinkatFlags::NoRemoveDir)
                .map_err(|e| fail(entry, "remove", e))?;
            continue;
        };
        let is_dir = e
            .file_type()
            .map_err(|e| Error::io(format!("{entry}: stat"), e))?
            .is_dir();
        if is_dir {
            remove_tree(&fd, name, entry)?;
        } else {
            unlinkat(fd.as_fd(), name, UnlinkatFlags::NoRemoveDir)
                .map_err(|e| fail(entry, &format!("remove {name}"), e))?;
        }
    }
    unlinkat(dir.as_fd(), base, UnlinkatFlags::RemoveDir)
        .map_err(|e| fail(entry, "remove the older directory", e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn target() -> (tempfile::TempDir, Target) {
        let tmp = tempfile::tempdir().unwrap();
        let t = Target::open(tmp.path()).unwrap();
        (tmp, t)
    }

    #[test]
    fn missing_parents_are_made_as_implicit_directories() {
        let (tmp, mut t) = target();
        let fd = t.parent(&["a", "b"], "a/b/c").unwrap();
        // the same parent again is the cached descriptor
        assert!(Arc::ptr_eq(&fd, &t.parent(&["a", "b"], "a/b/d").unwrap()));
        t.finish().unwrap();
        let m = std::fs::metadata(tmp.path().join("a/b")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.mtime()), (0o755, 0, 0));
    }

    #[test]
    fn symlinks_and_files_on_the_way_are_refused() {
        let (tmp, mut t) = target();
        std::os::unix::fs::symlink("/etc", tmp.path().join("link")).unwrap();
        std::os::unix::fs::symlink(".", tmp.path().join("dot")).unwrap();
        std::fs::write(tmp.path().join("file"), b"").unwrap();
        for parents in [&["link"][..], &["link", "x"], &["dot", "y"]] {
            let e = t.parent(parents, "entry").unwrap_err();
            assert!(
                matches!(&e, Error::UnsafePath { path } if path.contains("symbolic link")),
                "{parents:?}: {e}"
            );
            let e = t.resolve(parents, "entry").unwrap_err();
            assert!(matches!(e, Error::UnsafePath { .. }), "{e}");
        }
        let e = t.parent(&["file", "x"], "file/x/y").unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        assert!(!Path::new("/etc/x").exists());
        assert!(!tmp.path().join("y").exists());
        let e = t.resolve(&["nowhere"], "h").unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn zero_blocks_become_holes() {
        let tmp = tempfile::tempdir().unwrap();
        let f = File::create(tmp.path().join("f")).unwrap();
        let mut data = vec![0u8; 1 << 20];
        data[5000] = 1;
        let end = write_sparse(&f, 0, &data, "f").unwrap();
        assert_eq!(end, 8192);
        assert_eq!(write_sparse(&f, 1 << 20, &[0u8; 100], "f").unwrap(), 0);
        finish_file(&f, (1 << 20) + 100, end, &Target::ROOT, "f").unwrap();
        let m = f.metadata().unwrap();
        assert_eq!(m.len(), (1 << 20) + 100);
        assert!(m.blocks() <= 16, "{} blocks", m.blocks());
        let back = std::fs::read(tmp.path().join("f")).unwrap();
        assert_eq!(&back[..1 << 20], &data[..]);
    }

    #[test]
    fn cached_parent_keys_compare_by_component() {
        assert!(same_path("a/b", &["a", "b"]));
        assert!(!same_path("a/b", &["a/b"][..0]));
        assert!(!same_path("a/bc", &["a", "b"]));
        assert!(!same_path("ab", &["a", "b"]));
        assert!(!same_path("a/b/c", &["a", "b"]));
    }
}
