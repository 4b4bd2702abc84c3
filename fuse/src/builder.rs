//! Building a [`Tree`] from entries in any order a TOC lists them.
//!
//! The builder keeps per-directory hash maps so adds are O(depth); `build` then lays the
//! reachable part out flat (breadth first, names sorted), counts links, and applies the
//! overlay form. Its maps are dropped with it, so only the compact tree stays resident.

use std::collections::{HashMap, VecDeque};

use crate::{
    Error, FileId,
    attr::{Attr, Kind, split_time},
    path,
    tree::{Dirent, NO_FILE, Node, NodeRef, Tree, XattrRec, span},
    whiteout,
};

type Xattrs = Vec<(Box<[u8]>, Box<[u8]>)>;

/// Collects entries, then [`build`](TreeBuilder::build)s an immutable [`Tree`].
#[derive(Debug)]
pub struct TreeBuilder {
    nodes: Vec<Node>,
    /// Directory node → its names → node.
    children: HashMap<u32, HashMap<Box<[u8]>, u32>>,
    symlinks: HashMap<u32, Box<[u8]>>,
    xattrs: HashMap<u32, Xattrs>,
    /// Bytes the arena will need, so that 32-bit offsets are checked before `build`.
    arena_bytes: u64,
}

impl TreeBuilder {
    /// Starts a tree whose root directory has `root`'s attributes (its kind is forced to
    /// a directory).
    pub fn new(root: Attr) -> Self {
        let mut root_node = node_from(root, 0);
        root_node.mode = libc::S_IFDIR | (root_node.mode & 0o7777);
        TreeBuilder {
            nodes: vec![root_node],
            children: HashMap::new(),
            symlinks: HashMap::new(),
            xattrs: HashMap::new(),
            arena_bytes: 0,
        }
    }

    /// Adds an entry at a slash-separated path relative to the root; no `..`. Parents must
    /// already exist. A later add of the same path replaces the entry; a directory
    /// replacing a directory keeps its children (as tar extraction does).
    pub fn add(&mut self, path: &str, attr: Attr) -> Result<NodeRef, Error> {
        let names = components(path)?;
        let Some((name, parents)) = names.split_last() else {
            if attr.kind != Kind::Dir {
                return Err(invalid(path, "the root must be a directory"));
            }
            self.replace_dir_attrs(0, attr);
            return Ok(NodeRef::ROOT);
        };
        let parent = self.resolve_dir(path, parents)?;
        if let Some(&old) = self.children.get(&parent).and_then(|c| c.get(*name))
            && attr.kind == Kind::Dir
            && self.nodes[old as usize].kind() == Kind::Dir
        {
            self.replace_dir_attrs(old, attr);
            return Ok(NodeRef(old));
        }
        let index = u32::try_from(self.nodes.len())
            .ok()
            .filter(|&i| i < u32::MAX)
            .ok_or_else(|| too_large(path, "nodes"))?;
        self.reserve_arena(path, name.len())?;
        self.nodes.push(node_from(attr, parent));
        self.children
            .entry(parent)
            .or_default()
            .insert((*name).into(), index);
        Ok(NodeRef(index))
    }

    /// Adds a hard link `path` to an existing non-directory node; both names share one
    /// inode, and the tree counts `nlink`.
    pub fn link(&mut self, path: &str, target: NodeRef) -> Result<(), Error> {
        let names = components(path)?;
        let Some((name, parents)) = names.split_last() else {
            return Err(invalid(path, "cannot replace the root with a link"));
        };
        match self.nodes.get(target.index()) {
            None => return Err(invalid(path, "the link target is not a node of this tree")),
            Some(n) if n.kind() == Kind::Dir => {
                return Err(Error::LinkToDirectory { path: path.into() });
            }
            Some(_) => {}
        }
        let parent = self.resolve_dir(path, parents)?;
        self.reserve_arena(path, name.len())?;
        self.children
            .entry(parent)
            .or_default()
            .insert((*name).into(), target.0);
        Ok(())
    }

    /// Sets the target of a symlink node (its size becomes the target's length).
    pub fn set_symlink_target(&mut self, node: NodeRef, target: &[u8]) {
        if self.check_node(node, "set_symlink_target") && self.fits(target.len()) {
            self.symlinks.insert(node.0, target.into());
        }
    }

    /// Sets (or replaces) an extended attribute of a node.
    pub fn set_xattr(&mut self, node: NodeRef, name: &[u8], value: &[u8]) {
        if !self.check_node(node, "set_xattr") || !self.fits(name.len() + value.len()) {
            return;
        }
        set_xattr(self.xattrs.entry(node.0).or_default(), name, value);
    }

    /// Says which bytes back a regular file. `FileId` `u64::MAX` is reserved.
    pub fn set_file(&mut self, node: NodeRef, file: FileId) {
        if self.check_node(node, "set_file") {
            self.nodes[node.index()].data = file;
        }
    }

    /// Lays the reachable tree out flat, counts links, and applies the overlay form:
    /// `.wh.<name>` becomes a 0:0 character device `<name>`, `.wh..wh..opq` becomes
    /// `trusted.overlay.opaque=y` on its directory, and `.wh.` names are hidden.
    pub fn build(mut self) -> Tree {
        let mut dirents: Vec<Dirent> = Vec::new();
        let mut arena: Vec<u8> = Vec::new();
        let mut total_size = 0u64;
        for n in &mut self.nodes {
            n.nlink = 0;
        }
        let mut queue = VecDeque::from([0u32]);
        self.nodes[0].parent = 0;
        while let Some(dir) = queue.pop_front() {
            let mut list: Vec<(Box<[u8]>, u32)> = self
                .children
                .remove(&dir)
                .map(|m| m.into_iter().collect())
                .unwrap_or_default();
            // Name order, not hash order: whiteout nodes are numbered as they are made,
            // and a tree built again from the same layer must number them alike (a
            // successor daemon serves the kernel's existing inode numbers).
            list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let nodes = &mut self.nodes;
            let opaque = whiteout::apply(&mut list, |old| {
                let whiteout = whiteout_node(&nodes[old as usize], dir);
                nodes.push(whiteout);
                (nodes.len() - 1) as u32
            });
            if opaque {
                set_xattr(
                    self.xattrs.entry(dir).or_default(),
                    whiteout::OPAQUE_XATTR,
                    b"y",
                );
            }
            list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let start = dirents.len() as u32;
            let mut subdirs = 0u32;
            for (name, child) in &list {
                dirents.push(Dirent {
                    name: arena.len() as u32,
                    node: *child,
                    name_len: name.len() as u16,
                });
                arena.extend_from_slice(name);
                let n = &mut self.nodes[*child as usize];
                if n.kind() == Kind::Dir {
                    subdirs += 1;
                    n.parent = dir;
                    queue.push_back(*child);
                } else {
                    if n.nlink == 0 && n.kind() == Kind::File {
                        total_size = total_size.saturating_add(n.size);
                    }
                    n.nlink = n.nlink.saturating_add(1);
                }
            }
            let d = &mut self.nodes[dir as usize];
            d.data = span(start, list.len() as u32);
            d.nlink = subdirs.saturating_add(2);
        }
        let mut symlinks: Vec<_> = self.symlinks.into_iter().collect();
        symlinks.sort_unstable_by_key(|(node, _)| *node);
        for (node, target) in symlinks {
            let n = &mut self.nodes[node as usize];
            if n.kind() == Kind::Symlink {
                n.size = target.len() as u64;
                n.data = span(arena.len() as u32, target.len() as u32);
                arena.extend_from_slice(&target);
            }
        }
        let mut xattrs = Vec::new();
        let mut by_node: Vec<_> = self.xattrs.into_iter().collect();
        by_node.sort_unstable_by_key(|(node, _)| *node);
        for (node, mut list) in by_node {
            list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let n = &mut self.nodes[node as usize];
            n.xattr_start = xattrs.len() as u32;
            n.xattr_len = list.len() as u32;
            for (name, value) in list {
                let name_at = arena.len() as u32;
                arena.extend_from_slice(&name);
                let value_at = arena.len() as u32;
                arena.extend_from_slice(&value);
                xattrs.push(XattrRec {
                    name: name_at,
                    name_len: name.len() as u32,
                    value: value_at,
                    value_len: value.len() as u32,
                });
            }
        }
        self.nodes.shrink_to_fit();
        dirents.shrink_to_fit();
        arena.shrink_to_fit();
        Tree {
            nodes: self.nodes,
            dirents,
            xattrs,
            arena,
            total_size,
        }
    }

    /// Walks `parents` from the root; each must exist and be a directory.
    fn resolve_dir(&self, path: &str, parents: &[&[u8]]) -> Result<u32, Error> {
        let mut dir = 0u32;
        for name in parents {
            let Some(&next) = self.children.get(&dir).and_then(|c| c.get(*name)) else {
                return Err(Error::MissingParent { path: path.into() });
            };
            if self.nodes[next as usize].kind() != Kind::Dir {
                return Err(Error::NotADirectory { path: path.into() });
            }
            dir = next;
        }
        Ok(dir)
    }

    fn replace_dir_attrs(&mut self, index: u32, attr: Attr) {
        let n = &mut self.nodes[index as usize];
        let fresh = node_from(attr, n.parent);
        *n = fresh;
        self.xattrs.remove(&index);
    }

    fn reserve_arena(&mut self, path: &str, len: usize) -> Result<(), Error> {
        if !self.fits(len) {
            return Err(too_large(path, "bytes of names"));
        }
        self.arena_bytes += len as u64;
        Ok(())
    }

    /// Whether `len` more arena bytes keep every offset within 32 bits. The arena also
    /// holds the xattrs of whiteout-made opaque dirs, hence the slack.
    fn fits(&self, len: usize) -> bool {
        let fits = self.arena_bytes + len as u64 + (1 << 20) < u64::from(u32::MAX);
        if !fits {
            tracing::warn!("tree arena full; dropping {len} bytes");
        }
        fits
    }

    fn check_node(&self, node: NodeRef, what: &str) -> bool {
        let ok = node.index() < self.nodes.len();
        if !ok {
            tracing::warn!("{what}: node {node:?} is not in this tree; ignored");
        }
        ok
    }
}

fn set_xattr(list: &mut Xattrs, name: &[u8], value: &[u8]) {
    match list.iter_mut().find(|(n, _)| &**n == name) {
        Some(slot) => slot.1 = value.into(),
        None => list.push((name.into(), value.into())),
    }
}

fn node_from(attr: Attr, parent: u32) -> Node {
    let (mtime_secs, mtime_nanos) = split_time(attr.mtime);
    Node {
        size: if attr.kind == Kind::File {
            attr.size
        } else {
            0
        },
        data: if attr.kind == Kind::File { NO_FILE } else { 0 },
        mtime_secs,
        mtime_nanos,
        mode: attr.kind.mode_bits() | u32::from(attr.perm & 0o7777),
        uid: attr.uid,
        gid: attr.gid,
        rdev: if matches!(attr.kind, Kind::CharDev | Kind::BlockDev) {
            attr.rdev
        } else {
            0
        },
        nlink: 0,
        parent,
        xattr_start: 0,
        xattr_len: 0,
    }
}

/// The 0:0 character device that stands for a whiteout file: same permission bits and
/// time as the whiteout, owned by root.
fn whiteout_node(from: &Node, parent: u32) -> Node {
    Node {
        size: 0,
        data: 0,
        mode: libc::S_IFCHR | (from.mode & 0o7777),
        uid: 0,
        gid: 0,
        rdev: 0,
        nlink: 0,
        parent,
        xattr_start: 0,
        xattr_len: 0,
        ..*from
    }
}

fn components(path: &str) -> Result<Vec<&[u8]>, Error> {
    path::components(path).map_err(|reason| invalid(path, reason))
}

fn invalid(path: &str, reason: &'static str) -> Error {
    Error::InvalidPath {
        path: path.into(),
        reason,
    }
}

fn too_large(path: &str, what: &'static str) -> Error {
    Error::TooLarge {
        path: path.into(),
        what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> Attr {
        Attr {
            kind: Kind::Dir,
            perm: 0o755,
            ..Attr::default()
        }
    }

    fn file(size: u64) -> Attr {
        Attr {
            size,
            ..Attr::default()
        }
    }

    #[test]
    fn links_share_a_node_and_count_names() {
        let mut b = TreeBuilder::new(dir());
        b.add("d", dir()).unwrap();
        b.add("d/e", dir()).unwrap();
        let f = b.add("d/f", file(10)).unwrap();
        b.link("g", f).unwrap();
        b.set_file(f, 7);
        let t = b.build();
        let g = t.lookup_path("g").unwrap();
        assert_eq!(g, f);
        assert_eq!(t.attr(g).nlink, 2);
        assert_eq!(t.attr(NodeRef::ROOT).nlink, 3);
        assert_eq!(t.attr(t.lookup_path("d").unwrap()).nlink, 3);
        assert_eq!(t.file(g), Some(7));
        assert_eq!(t.total_size(), 10);
        assert_eq!(t.parent(t.lookup_path("d/e").unwrap()), t.lookup_path("d"));
    }

    #[test]
    fn refuses_bad_paths_and_missing_parents() {
        let mut b = TreeBuilder::new(dir());
        let f = b.add("f", file(0)).unwrap();
        assert!(matches!(
            b.add("a/b", file(0)),
            Err(Error::MissingParent { .. })
        ));
        assert!(matches!(
            b.add("f/x", file(0)),
            Err(Error::NotADirectory { .. })
        ));
        assert!(matches!(
            b.add("../x", file(0)),
            Err(Error::InvalidPath { .. })
        ));
        assert!(matches!(b.add("", file(0)), Err(Error::InvalidPath { .. })));
        let d = b.add("d", dir()).unwrap();
        assert!(matches!(b.link("l", d), Err(Error::LinkToDirectory { .. })));
        let err = b.add("a/b", file(0)).unwrap_err().to_string();
        assert!(err.contains("a/b"), "{err}");
        b.link("l", f).unwrap();
    }

    #[test]
    fn later_adds_replace_and_dirs_keep_children() {
        let mut b = TreeBuilder::new(dir());
        let d1 = b.add("d", dir()).unwrap();
        b.add("d/x", file(1)).unwrap();
        let d2 = b
            .add(
                "./d/",
                Attr {
                    perm: 0o700,
                    ..dir()
                },
            )
            .unwrap();
        assert_eq!(d1, d2);
        b.add("f", file(1)).unwrap();
        b.add("f", file(5)).unwrap();
        let t = b.build();
        assert_eq!(t.attr(d1).perm, 0o700);
        assert!(t.lookup_path("d/x").is_some());
        assert_eq!(t.attr(t.lookup_path("f").unwrap()).size, 5);
        assert_eq!(t.children(NodeRef::ROOT).count(), 2);
    }

    #[test]
    fn build_applies_overlay_form() {
        let mut b = TreeBuilder::new(dir());
        b.add("d", dir()).unwrap();
        b.add("d/.wh..wh..opq", file(0)).unwrap();
        b.add(
            "d/.wh.gone",
            Attr {
                uid: 5,
                perm: 0,
                ..file(0)
            },
        )
        .unwrap();
        b.add("d/.wh.kept", file(0)).unwrap();
        b.add("d/kept", file(3)).unwrap();
        let t = b.build();
        let d = t.lookup_path("d").unwrap();
        assert_eq!(t.xattr(d, b"trusted.overlay.opaque"), Some(&b"y"[..]));
        let names: Vec<_> = t.children(d).map(|(n, _)| n.to_vec()).collect();
        assert_eq!(names, vec![b"gone".to_vec(), b"kept".to_vec()]);
        let gone = t.attr(t.lookup_path("d/gone").unwrap());
        assert_eq!(
            (gone.kind, gone.rdev, gone.uid, gone.perm),
            (Kind::CharDev, 0, 0, 0)
        );
        assert_eq!(t.attr(t.lookup_path("d/kept").unwrap()).size, 3);
    }

    #[test]
    fn a_hundred_thousand_entries_stay_compact() {
        let mut b = TreeBuilder::new(dir());
        for d in 0..100 {
            b.add(&format!("dir{d:03}"), dir()).unwrap();
            for f in 0..1000 {
                let n = b.add(&format!("dir{d:03}/file{f:04}"), file(f)).unwrap();
                b.set_file(n, u64::from(n.0));
            }
        }
        let t = b.build();
        let entries = t.node_count() - 1;
        assert_eq!(entries, 100_100);
        let per_entry = (t.memory_bytes() - t.arena.len()) / entries;
        assert!(per_entry < 120, "{per_entry} bytes per entry without names");
        let f = t.lookup_path("dir042/file0999").unwrap();
        assert_eq!(t.attr(f).size, 999);
        assert_eq!(t.file(f), Some(u64::from(f.0)));
    }

    #[test]
    fn equal_inputs_build_equal_trees() {
        let build = || {
            let mut b = TreeBuilder::new(dir());
            for d in 0..20 {
                b.add(&format!("d{d}"), dir()).unwrap();
                for f in 0..20 {
                    let name = format!("d{d}/.wh.f{f}");
                    b.add(&name, file(0)).unwrap();
                    let l = b
                        .add(
                            &format!("d{d}/l{f}"),
                            Attr {
                                kind: Kind::Symlink,
                                ..Attr::default()
                            },
                        )
                        .unwrap();
                    b.set_symlink_target(l, format!("t{f}").as_bytes());
                    b.set_xattr(l, b"user.x", format!("{d}.{f}").as_bytes());
                }
            }
            b.build()
        };
        let (a, b) = (build(), build());
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.arena, b.arena);
        assert_eq!(a.lookup_path("d7/f3"), b.lookup_path("d7/f3"));
    }

    #[test]
    fn symlinks_and_xattrs_land_in_the_arena() {
        let mut b = TreeBuilder::new(dir());
        let l = b
            .add(
                "l",
                Attr {
                    kind: Kind::Symlink,
                    ..Attr::default()
                },
            )
            .unwrap();
        b.set_symlink_target(l, b"../target");
        b.set_xattr(l, b"user.b", b"2");
        b.set_xattr(l, b"user.a", b"1");
        b.set_xattr(l, b"user.a", b"3");
        b.set_xattr(NodeRef(999), b"user.x", b"ignored");
        let t = b.build();
        assert_eq!(t.symlink_target(l), Some(&b"../target"[..]));
        assert_eq!(t.attr(l).size, 9);
        let names: Vec<_> = t.xattr_names(l).collect();
        assert_eq!(names, vec![&b"user.a"[..], &b"user.b"[..]]);
        assert_eq!(t.xattr(l, b"user.a"), Some(&b"3"[..]));
        assert_eq!(t.xattr(l, b"user.c"), None);
    }
}
