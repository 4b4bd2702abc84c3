//! The FUSE operations over a [`Tree`] and a [`Content`].
//!
//! Each operation has a plain helper returning `Result<_, Errno>` and the trait method is
//! a thin match onto the reply (the idiom of fuser's own examples). Everything but `read`
//! is answered from memory on the FUSE thread; `read` hands its reply to [`Content`].

use std::{
    ffi::OsStr,
    os::unix::ffi::OsStrExt,
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, error, info, warn};

use crate::{
    Content, ReadReply,
    attr::{Kind, join_time},
    passthrough::OpenFiles,
    tree::{Node, NodeRef, Tree},
};

/// Block size reported by `stat` and `statfs`.
const BLOCK: u32 = 4096;

/// Capabilities worth having when the kernel offers them: readdirplus saves a lookup per
/// listed name, parallel dirops lets lookups in one directory run concurrently (overlayfs
/// looks every name up in every layer), and symlink caching saves readlinks.
const WANTED: [InitFlags; 4] = [
    InitFlags::FUSE_DO_READDIRPLUS,
    InitFlags::FUSE_READDIRPLUS_AUTO,
    InitFlags::FUSE_PARALLEL_DIROPS,
    InitFlags::FUSE_CACHE_SYMLINKS,
];

/// What the kernel's init message said about passthrough: 0 not seen yet, 1 offered,
/// 2 not offered. Process-wide because it is a property of the running kernel.
static PASSTHROUGH_OFFERED: AtomicU8 = AtomicU8::new(0);

/// Whether a kernel init message offered passthrough, if one has been seen.
pub(crate) fn passthrough_offered() -> Option<bool> {
    match PASSTHROUGH_OFFERED.load(Ordering::Relaxed) {
        1 => Some(true),
        2 => Some(false),
        _ => None,
    }
}

/// The filesystem a [`crate::Mount`] serves.
pub(crate) struct LayerFs {
    tree: Arc<Tree>,
    content: Arc<dyn Content>,
    entry_ttl: Duration,
    attr_ttl: Duration,
    want_passthrough: bool,
    /// Set in `init` when the kernel accepted passthrough; shared with the `Mount`.
    passthrough: Arc<AtomicBool>,
    open_files: OpenFiles,
}

impl LayerFs {
    pub(crate) fn new(
        tree: Arc<Tree>,
        content: Arc<dyn Content>,
        entry_ttl: Duration,
        attr_ttl: Duration,
        want_passthrough: bool,
        passthrough: Arc<AtomicBool>,
        open_files: OpenFiles,
    ) -> Self {
        LayerFs {
            tree,
            content,
            entry_ttl,
            attr_ttl,
            want_passthrough,
            passthrough,
            open_files,
        }
    }

    fn node(&self, ino: INodeNo) -> Result<(NodeRef, &Node), Errno> {
        let node = NodeRef::from_ino(ino.0).ok_or(Errno::ENOENT)?;
        let n = self.tree.node(node).ok_or(Errno::ENOENT)?;
        Ok((node, n))
    }

    fn file_attr(&self, node: NodeRef, n: &Node) -> FileAttr {
        let mtime = join_time(n.mtime_secs, n.mtime_nanos);
        FileAttr {
            ino: INodeNo(node.ino()),
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: n.kind().file_type(),
            perm: (n.mode & 0o7777) as u16,
            nlink: n.nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: n.rdev,
            blksize: BLOCK,
            flags: 0,
        }
    }

    fn attr_of(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let (node, n) = self.node(ino)?;
        Ok(self.file_attr(node, n))
    }

    fn lookup_name(&self, parent: INodeNo, name: &OsStr) -> Result<Option<FileAttr>, Errno> {
        let (dir, n) = self.node(parent)?;
        if n.kind() != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        Ok(self
            .tree
            .lookup(dir, name.as_bytes())
            .and_then(|child| Some(self.file_attr(child, self.tree.node(child)?))))
    }

    /// The `index`-th entry of a directory listing: `.`, `..`, then the names in order.
    fn dir_entry(&self, dir: NodeRef, index: u64) -> Option<(NodeRef, &[u8])> {
        match index {
            0 => Some((dir, b".")),
            1 => Some((self.tree.parent(dir)?, b"..")),
            i => {
                let entries = self.tree.dir_entries(dir)?;
                let d = entries.get(usize::try_from(i - 2).ok()?)?;
                Some((NodeRef(d.node), self.tree.name(d)))
            }
        }
    }

    fn dir(&self, ino: INodeNo) -> Result<NodeRef, Errno> {
        let (dir, n) = self.node(ino)?;
        if n.kind() != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        Ok(dir)
    }

    fn readlink_of(&self, ino: INodeNo) -> Result<&[u8], Errno> {
        let (node, _) = self.node(ino)?;
        self.tree.symlink_target(node).ok_or(Errno::EINVAL)
    }

    fn xattr_list(&self, ino: INodeNo) -> Result<Vec<u8>, Errno> {
        let (node, _) = self.node(ino)?;
        let mut list = Vec::new();
        for name in self.tree.xattr_names(node) {
            list.extend_from_slice(name);
            list.push(0);
        }
        Ok(list)
    }

    /// Opens a regular file, in passthrough mode when its content is local.
    fn open_file(&self, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (node, n) = match self.node(ino) {
            Ok(found) => found,
            Err(e) => return reply.error(e),
        };
        if n.kind() != Kind::File {
            return reply.error(if n.kind() == Kind::Dir {
                Errno::EISDIR
            } else {
                Errno::EINVAL
            });
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        if let Some(file) = self.tree.file(node) {
            self.content.opened(file);
        }
        let fh = FileHandle(node.ino());
        // Every open is counted, passthrough or not: the kernel's mode of an inode
        // outlives this process, and a successor must know it (see `passthrough`).
        let passthrough = self.passthrough.load(Ordering::Relaxed);
        let backing = self.open_files.open(
            node.0,
            || {
                passthrough
                    .then(|| self.backing_id(node, n, &reply))
                    .flatten()
            },
            // SAFETY: the id was registered on this connection by the previous server
            // and, as its open table says, not closed; we take over closing it.
            |id| unsafe { reply.wrap_backing(id) },
        );
        // NOFLUSH: a read-only layer has nothing to flush, and a close must never wait
        // for this process (a process that forks while the daemon restarts closes its
        // inherited descriptors at exec).
        match backing {
            Some(id) => reply.opened_passthrough(fh, FopenFlags::FOPEN_NOFLUSH, &id),
            None => reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH),
        }
    }

    /// Registers the node's local backing file with the kernel, if the content has one
    /// of the right size; returns it with the kernel's number for it.
    fn backing_id(&self, node: NodeRef, n: &Node, reply: &ReplyOpen) -> Option<(BackingId, u32)> {
        let file = self.content.backing_file(self.tree.file(node)?)?;
        match file.metadata() {
            Ok(meta) if meta.len() == n.size => {}
            Ok(meta) => {
                warn!(
                    ino = node.ino(),
                    "backing file has {} bytes, the entry {}; not using passthrough",
                    meta.len(),
                    n.size
                );
                return None;
            }
            Err(e) => {
                warn!(ino = node.ino(), "backing file unusable: {e}");
                return None;
            }
        }
        match reply.open_backing(&file) {
            Ok(id) => {
                let raw = id.into_raw();
                // SAFETY: `raw` was just registered and its only owner gave it up.
                Some((unsafe { reply.wrap_backing(raw) }, raw))
            }
            Err(e) => {
                warn!(ino = node.ino(), "kernel refused the backing file: {e}");
                None
            }
        }
    }

    fn read_file(&self, ino: INodeNo, offset: u64, size: u32, reply: ReplyData) {
        let (node, n) = match self.node(ino) {
            Ok(found) => found,
            Err(e) => return reply.error(e),
        };
        if n.kind() != Kind::File {
            return reply.error(Errno::EISDIR);
        }
        if offset >= n.size || size == 0 {
            return reply.data(&[]);
        }
        let size = u32::try_from(u64::from(size).min(n.size - offset)).unwrap_or(size);
        let Some(file) = self.tree.file(node) else {
            warn!(ino = node.ino(), "regular file has no content; EIO");
            return reply.error(Errno::EIO);
        };
        let content = &self.content;
        // A panicking `Content` must not take a FUSE thread down; the reply it held
        // answers EIO when dropped during unwinding.
        if catch_unwind(AssertUnwindSafe(|| {
            content.read(file, offset, size, ReadReply(reply))
        }))
        .is_err()
        {
            error!(
                ino = node.ino(),
                file, offset, size, "Content::read panicked"
            );
        }
    }

    fn statfs_reply(&self, reply: ReplyStatfs) {
        let blocks = self.tree.total_size().div_ceil(u64::from(BLOCK));
        let files = self.tree.node_count() as u64;
        reply.statfs(blocks, 0, 0, files, 0, BLOCK, 255, BLOCK);
    }
}

/// Answers a getxattr/listxattr: the size for a probe, ERANGE if the buffer is short.
fn xattr_reply(value: &[u8], size: u32, reply: ReplyXattr) {
    let Ok(len) = u32::try_from(value.len()) else {
        return reply.error(Errno::E2BIG);
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// An entry reply with no inode: the kernel caches the name as absent for the entry
/// timeout, which saves a round trip for every layer overlayfs probes.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: fuser::FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK,
        flags: 0,
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in WANTED {
            if config.add_capabilities(flag).is_err() {
                debug!("kernel does not offer {flag:?}");
            }
        }
        let offered = config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH);
        PASSTHROUGH_OFFERED.store(if offered { 1 } else { 2 }, Ordering::Relaxed);
        if self.want_passthrough {
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                // Depth 1 lets overlayfs stack on this mount; 2 would refuse it.
                Ok(()) => match config.set_max_stack_depth(1) {
                    Ok(_) => self.passthrough.store(true, Ordering::Relaxed),
                    Err(max) => warn!("kernel refused stack depth 1 (max {max}); no passthrough"),
                },
                Err(_) => {
                    info!("kernel does not offer FUSE passthrough; reads go through the daemon")
                }
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_name(parent, name) {
            Ok(Some(attr)) => {
                reply.entry_with_ttls(&self.attr_ttl, &self.entry_ttl, &attr, Generation(0))
            }
            Ok(None) if !self.entry_ttl.is_zero() => reply.entry_with_ttls(
                &self.entry_ttl,
                &self.entry_ttl,
                &negative_entry(),
                Generation(0),
            ),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino) {
            Ok(attr) => reply.attr(&self.attr_ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.readlink_of(ino) {
            Ok(target) => reply.data(target),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.open_file(ino, flags, reply);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.read_file(ino, offset, size, reply);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Kernels before 5.16 ignore FOPEN_NOFLUSH; ENOSYS makes them stop sending
        // FLUSH on this connection.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Replied first, counted after: a crash in between leaves the count too high,
        // which a successor survives, rather than too low, which it would not.
        reply.ok();
        if let Some(node) = NodeRef::from_ino(ino.0) {
            self.open_files.release(node.0);
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.dir(ino) {
            // The tree never changes, so the kernel may cache listings across opens.
            Ok(_) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = match self.dir(ino) {
            Ok(dir) => dir,
            Err(e) => return reply.error(e),
        };
        let mut index = offset;
        while let Some((node, name)) = self.dir_entry(dir, index) {
            let kind = self
                .tree
                .node(node)
                .map_or(Kind::File, Node::kind)
                .file_type();
            index += 1;
            // The offset of an entry is where to resume after it.
            if reply.add(INodeNo(node.ino()), index, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dir = match self.dir(ino) {
            Ok(dir) => dir,
            Err(e) => return reply.error(e),
        };
        let mut index = offset;
        while let Some((node, name)) = self.dir_entry(dir, index) {
            let Some(n) = self.tree.node(node) else { break };
            let attr = self.file_attr(node, n);
            index += 1;
            if reply.add(
                INodeNo(node.ino()),
                index,
                OsStr::from_bytes(name),
                &self.entry_ttl,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.statfs_reply(reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let node = match self.node(ino) {
            Ok((node, _)) => node,
            Err(e) => return reply.error(e),
        };
        match self.tree.xattr(node, name.as_bytes()) {
            Some(value) => xattr_reply(value, size, reply),
            // Even for a size probe: answering "0 bytes" would claim an empty attribute,
            // and overlayfs then fails every stat on a `trusted.overlay.*` it finds.
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.xattr_list(ino) {
            Ok(list) => xattr_reply(&list, size, reply),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.node(ino) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    // Everything that would change the tree answers EROFS (fuser's defaults say ENOSYS,
    // which tools read as "try another way").

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}
