//! The immutable inode tree the filesystem answers from.
//!
//! Layers hold 100,000+ entries and every mounted layer keeps its tree for its whole life,
//! so the tree is three flat vectors and one byte arena: a node is 64 bytes, a directory
//! entry 12, and names, link targets and xattrs live in the arena. A node's index is its
//! inode number minus one, so inode numbers are stable for the life of the tree and hard
//! links (several entries pointing at one node) share one inode.

use crate::{
    FileId,
    attr::{Attr, Kind, join_time},
    path,
};

/// A node of a tree: a file, directory or other entry. Hard links share one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeRef(pub(crate) u32);

impl NodeRef {
    /// The root directory.
    pub const ROOT: NodeRef = NodeRef(0);

    /// The inode number the kernel sees for this node (index + 1; the root is 1).
    pub fn ino(self) -> u64 {
        u64::from(self.0) + 1
    }

    /// The node with kernel inode number `ino`, if `ino` can name a node at all.
    pub(crate) fn from_ino(ino: u64) -> Option<NodeRef> {
        ino.checked_sub(1)
            .and_then(|i| u32::try_from(i).ok())
            .map(NodeRef)
    }

    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }
}

/// Marks a regular file that has no bytes behind it (no `set_file` call).
pub(crate) const NO_FILE: u64 = u64::MAX;

/// Packs a (start, len) range into a node's `data` word.
pub(crate) fn span(start: u32, len: u32) -> u64 {
    u64::from(start) | (u64::from(len) << 32)
}

fn unspan(data: u64) -> (usize, usize) {
    ((data & 0xffff_ffff) as usize, (data >> 32) as usize)
}

/// One inode, 64 bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Node {
    pub(crate) size: u64,
    /// Regular file: the caller's [`FileId`] or [`NO_FILE`]. Symlink: target span in the
    /// arena. Directory: span of its entries in `dirents`.
    pub(crate) data: u64,
    pub(crate) mtime_secs: i64,
    pub(crate) mtime_nanos: u32,
    /// `S_IFMT` type bits and permission bits.
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) rdev: u32,
    pub(crate) nlink: u32,
    /// The parent directory (directories only; they have exactly one).
    pub(crate) parent: u32,
    pub(crate) xattr_start: u32,
    pub(crate) xattr_len: u32,
}

impl Node {
    pub(crate) fn kind(&self) -> Kind {
        Kind::from_mode(self.mode)
    }
}

/// One name in a directory, 12 bytes. A directory's entries are contiguous and sorted by
/// name, so lookup is a binary search.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dirent {
    pub(crate) name: u32,
    pub(crate) node: u32,
    pub(crate) name_len: u16,
}

/// One extended attribute; name and value live in the arena.
#[derive(Clone, Copy, Debug)]
pub(crate) struct XattrRec {
    pub(crate) name: u32,
    pub(crate) name_len: u32,
    pub(crate) value: u32,
    pub(crate) value_len: u32,
}

/// An immutable inode tree, built by [`crate::TreeBuilder`]. Lookups, attributes and
/// directory listings are answered from memory with no I/O.
#[derive(Debug)]
pub struct Tree {
    pub(crate) nodes: Vec<Node>,
    pub(crate) dirents: Vec<Dirent>,
    pub(crate) xattrs: Vec<XattrRec>,
    pub(crate) arena: Vec<u8>,
    pub(crate) total_size: u64,
}

impl Tree {
    /// The root directory.
    pub fn root(&self) -> NodeRef {
        NodeRef::ROOT
    }

    /// How many nodes (inodes) the tree holds, including the root.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The sum of the sizes of all regular files, each hard-linked file counted once.
    pub fn total_size(&self) -> u64 {
        self.total_size
    }

    /// Approximate heap bytes held by the tree, for status reports.
    pub fn memory_bytes(&self) -> usize {
        self.nodes.capacity() * size_of::<Node>()
            + self.dirents.capacity() * size_of::<Dirent>()
            + self.xattrs.capacity() * size_of::<XattrRec>()
            + self.arena.capacity()
    }

    /// The node at a slash-separated path relative to the root (`""` is the root).
    /// Whiteouts appear here as they do in the mount: under their real names.
    pub fn lookup_path(&self, path: &str) -> Option<NodeRef> {
        let names = path::components(path).ok()?;
        names
            .into_iter()
            .try_fold(NodeRef::ROOT, |dir, name| self.lookup(dir, name))
    }

    /// The entry `name` in directory `dir`.
    pub fn lookup(&self, dir: NodeRef, name: &[u8]) -> Option<NodeRef> {
        let entries = self.dir_entries(dir)?;
        entries
            .binary_search_by(|d| self.name(d).cmp(name))
            .ok()
            .map(|i| NodeRef(entries[i].node))
    }

    /// The attributes of `node`, with the link count the tree computed.
    ///
    /// # Panics
    /// If `node` does not belong to this tree.
    pub fn attr(&self, node: NodeRef) -> Attr {
        let n = &self.nodes[node.index()];
        Attr {
            kind: n.kind(),
            perm: (n.mode & 0o7777) as u16,
            uid: n.uid,
            gid: n.gid,
            size: n.size,
            mtime: join_time(n.mtime_secs, n.mtime_nanos),
            rdev: n.rdev,
            nlink: n.nlink,
        }
    }

    /// The bytes behind a regular file, if `set_file` was called for it.
    pub fn file(&self, node: NodeRef) -> Option<FileId> {
        let n = self.nodes.get(node.index())?;
        (n.kind() == Kind::File && n.data != NO_FILE).then_some(n.data)
    }

    /// The target of a symlink.
    pub fn symlink_target(&self, node: NodeRef) -> Option<&[u8]> {
        let n = self.nodes.get(node.index())?;
        if n.kind() != Kind::Symlink {
            return None;
        }
        let (start, len) = unspan(n.data);
        self.arena.get(start..start + len)
    }

    /// The parent directory of a directory (the root is its own parent).
    pub fn parent(&self, dir: NodeRef) -> Option<NodeRef> {
        let n = self.nodes.get(dir.index())?;
        (n.kind() == Kind::Dir).then_some(NodeRef(n.parent))
    }

    /// The entries of a directory, sorted by name, without `.` and `..`.
    pub fn children(&self, dir: NodeRef) -> impl Iterator<Item = (&[u8], NodeRef)> + '_ {
        self.dir_entries(dir)
            .unwrap_or(&[])
            .iter()
            .map(|d| (self.name(d), NodeRef(d.node)))
    }

    /// The value of extended attribute `name` on `node`.
    pub fn xattr(&self, node: NodeRef, name: &[u8]) -> Option<&[u8]> {
        self.xattr_recs(node)
            .iter()
            .find(|x| self.slice(x.name, x.name_len) == name)
            .map(|x| self.slice(x.value, x.value_len))
    }

    /// The names of the extended attributes of `node`, sorted.
    pub fn xattr_names(&self, node: NodeRef) -> impl Iterator<Item = &[u8]> + '_ {
        self.xattr_recs(node)
            .iter()
            .map(|x| self.slice(x.name, x.name_len))
    }

    pub(crate) fn node(&self, node: NodeRef) -> Option<&Node> {
        self.nodes.get(node.index())
    }

    pub(crate) fn dir_entries(&self, dir: NodeRef) -> Option<&[Dirent]> {
        let n = self.nodes.get(dir.index())?;
        if n.kind() != Kind::Dir {
            return None;
        }
        let (start, len) = unspan(n.data);
        self.dirents.get(start..start + len)
    }

    pub(crate) fn name(&self, d: &Dirent) -> &[u8] {
        self.slice(d.name, u32::from(d.name_len))
    }

    fn xattr_recs(&self, node: NodeRef) -> &[XattrRec] {
        let Some(n) = self.nodes.get(node.index()) else {
            return &[];
        };
        let start = n.xattr_start as usize;
        self.xattrs
            .get(start..start + n.xattr_len as usize)
            .unwrap_or(&[])
    }

    fn slice(&self, start: u32, len: u32) -> &[u8] {
        let start = start as usize;
        self.arena
            .get(start..start + len as usize)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stay_compact() {
        // The brief: well under 120 bytes per entry, names excluded.
        assert_eq!(size_of::<Node>(), 64);
        assert_eq!(size_of::<Dirent>(), 12);
    }

    #[test]
    fn inode_numbers_are_index_plus_one() {
        assert_eq!(NodeRef::ROOT.ino(), 1);
        assert_eq!(NodeRef::from_ino(1), Some(NodeRef::ROOT));
        assert_eq!(NodeRef::from_ino(0), None);
        assert_eq!(NodeRef::from_ino(u64::MAX), None);
    }
}
