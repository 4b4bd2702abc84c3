//! The compact in-memory index built from a TOC: path → node, hard links sharing a
//! node, implicit parent directories, and chunk lookup by file offset.
//!
//! Nodes, directory entries and chunks live in flat vectors and names in one string
//! arena, so a 100,000-entry layer costs well under 200 bytes per entry once the JSON
//! is dropped.

use std::collections::HashMap;

use base64::Engine as _;

use super::digest::Digest;
use super::tarhdr::Kind;
use super::time;
use super::toc::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, Toc, TocEntry};
use crate::error::{Error, Result};

/// Index of a node; the root is [`ROOT`].
pub type NodeId = u32;
/// The root directory's node.
pub const ROOT: NodeId = 0;
const NONE: u32 = u32::MAX;

/// A file, directory, link or device of the layer.
#[derive(Debug, Clone)]
pub struct Node {
    pub size: u64,
    pub mtime: i64,
    pub mtime_nanos: u32,
    /// Permission bits with setuid/setgid/sticky (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub kind: Kind,
    parent: NodeId,
    extra: u32,
    chunk_start: u32,
    chunk_count: u32,
    dirent_start: u32,
    dirent_count: u32,
}

/// A contiguous piece of a regular file, compressed as one frame (or part of one
/// when `inner_offset` is set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Compressed range `[compressed_offset, compressed_end)` of the frame(s).
    pub compressed_offset: u64,
    pub compressed_end: u64,
    /// Bytes to skip in the decompressed frame before the chunk starts.
    pub inner_offset: u64,
    /// Offset of the chunk in the file.
    pub file_offset: u64,
    pub size: u64,
    /// sha256 of the uncompressed chunk; `None` only for legacy layers.
    pub digest: Option<Digest>,
    /// A zstd:chunked run of zeros: its bytes need not be fetched.
    pub zeros: bool,
}

#[derive(Debug, Clone, Default)]
struct Extra {
    link: (u32, u32),
    rdev: (u32, u32),
    xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Clone, Copy)]
struct Dirent {
    name: (u32, u32),
    node: NodeId,
}

/// The index of one layer.
#[derive(Debug, Default)]
pub struct Index {
    nodes: Vec<Node>,
    dirents: Vec<Dirent>,
    chunks: Vec<Chunk>,
    extras: Vec<Extra>,
    names: String,
    prefetch_end: Option<u64>,
    no_prefetch: bool,
    entries: usize,
}

/// Splits a TOC or tar name into clean components; `..` is refused because a name
/// must never address anything outside the layer root.
pub fn clean_path(name: &str) -> Result<Vec<&str>> {
    let mut out = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(Error::UnsafePath {
                    path: name.to_string(),
                });
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// How many bytes the paths of implicitly created parent directories may add up to.
/// Each name of a deep entry becomes a directory whose whole path the tree holds, so
/// without a bound a few megabytes of deep names become gigabytes of paths.
const MAX_IMPLICIT_PATH_BYTES: u64 = 64 << 20;

struct Builder<'a> {
    idx: Index,
    /// Where each (directory, name) sits in `children`: lookups cost one hash of
    /// the name, never of a whole path, so deep and wide trees build in linear time.
    slots: HashMap<(NodeId, &'a str), usize>,
    children: Vec<Vec<(&'a str, NodeId)>>,
    implicit_path_bytes: u64,
    ends: Vec<Option<u64>>,
    data_end: u64,
}

fn int<T: TryFrom<i64>>(v: i64, what: &str, name: &str) -> Result<T> {
    T::try_from(v).map_err(|_| Error::Toc(format!("{name:?}: {what} {v} is out of range")))
}

impl<'a> Builder<'a> {
    fn new_node(&mut self, kind: Kind, parent: NodeId) -> Result<NodeId> {
        let id = u32::try_from(self.idx.nodes.len())
            .ok()
            .filter(|&i| i != NONE)
            .ok_or_else(|| Error::Toc("too many entries".into()))?;
        self.idx.nodes.push(Node {
            size: 0,
            mtime: 0,
            mtime_nanos: 0,
            mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            nlink: 1,
            kind,
            parent,
            extra: NONE,
            chunk_start: 0,
            chunk_count: 0,
            dirent_start: 0,
            dirent_count: 0,
        });
        self.children.push(Vec::new());
        Ok(id)
    }

    fn child(&self, dir: NodeId, name: &str) -> Option<NodeId> {
        self.slots
            .get(&(dir, name))
            .map(|&i| self.children[dir as usize][i].1)
    }

    /// The node at `comps`, if there is one.
    fn find(&self, comps: &[&str]) -> Option<NodeId> {
        let mut cur = ROOT;
        for c in comps {
            if self.idx.nodes[cur as usize].kind != Kind::Dir {
                return None;
            }
            cur = self.child(cur, c)?;
        }
        Some(cur)
    }

    /// The directory at `comps`, created (implicitly) if missing.
    fn dir(&mut self, comps: &[&'a str], name: &str) -> Result<NodeId> {
        let mut cur = ROOT;
        let mut path_len = 0u64;
        for (i, c) in comps.iter().enumerate() {
            path_len += c.len() as u64 + 1;
            match self.child(cur, c) {
                Some(id) if self.idx.nodes[id as usize].kind == Kind::Dir => cur = id,
                Some(_) => {
                    return Err(Error::Toc(format!(
                        "{name:?}: parent {:?} is not a directory",
                        comps[..=i].join("/")
                    )));
                }
                None => {
                    self.implicit_path_bytes += path_len;
                    if self.implicit_path_bytes > MAX_IMPLICIT_PATH_BYTES {
                        let short: String = name.chars().take(80).collect();
                        return Err(Error::Toc(format!(
                            "{short:?}...: the parent directories the TOC leaves out have \
                             paths of more than {} MiB in all",
                            MAX_IMPLICIT_PATH_BYTES >> 20
                        )));
                    }
                    let id = self.new_node(Kind::Dir, cur)?;
                    self.replace(cur, c, id);
                    cur = id;
                }
            }
        }
        Ok(cur)
    }

    fn set_attrs(&mut self, id: NodeId, e: &TocEntry) -> Result<()> {
        let n = &mut self.idx.nodes[id as usize];
        n.mode = (e.mode & 0o7777) as u32;
        n.uid = int(e.uid, "uid", &e.name)?;
        n.gid = int(e.gid, "gid", &e.name)?;
        if !e.modtime.is_empty() {
            let (s, ns) = time::parse(&e.modtime)
                .ok_or_else(|| Error::Toc(format!("{:?}: bad modtime {:?}", e.name, e.modtime)))?;
            n.mtime = s;
            n.mtime_nanos = ns;
        }
        let mut extra = Extra::default();
        let mut needed = false;
        if !e.xattrs.is_empty() {
            for (k, v) in &e.xattrs {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|_| Error::Toc(format!("{:?}: xattr {k} is not base64", e.name)))?;
                extra.xattrs.push((k.clone(), bytes));
            }
            needed = true;
        }
        if matches!(n.kind, Kind::Char | Kind::Block) {
            extra.rdev = (
                int(e.dev_major, "devMajor", &e.name)?,
                int(e.dev_minor, "devMinor", &e.name)?,
            );
            needed = true;
        }
        if n.kind == Kind::Symlink {
            let off = u32::try_from(self.idx.names.len())
                .map_err(|_| Error::Toc("names exceed 4 GiB".into()))?;
            self.idx.names.push_str(&e.link_name);
            extra.link = (off, e.link_name.len() as u32);
            needed = true;
        }
        if needed {
            n.extra = self.idx.extras.len() as u32;
            self.idx.extras.push(extra);
        }
        Ok(())
    }

    fn add_chunk(&mut self, id: NodeId, e: &TocEntry, file_size: u64) -> Result<()> {
        let chunk_offset: u64 = int(e.chunk_offset, "chunkOffset", &e.name)?;
        let offset: u64 = int(e.offset, "offset", &e.name)?;
        let inner: u64 = int(e.inner_offset, "innerOffset", &e.name)?;
        let size = if e.chunk_size > 0 {
            e.chunk_size as u64
        } else {
            file_size.checked_sub(chunk_offset).ok_or_else(|| {
                Error::Toc(format!(
                    "{:?}: chunk offset {chunk_offset} is past the file size {file_size}",
                    e.name
                ))
            })?
        };
        if size == 0 {
            return Err(Error::Toc(format!(
                "{:?}: empty chunk at {chunk_offset}",
                e.name
            )));
        }
        let zeros = match e.chunk_type.as_str() {
            "" => false,
            "zeros" => true,
            t => {
                return Err(Error::Toc(format!(
                    "{:?}: unknown chunk type {t:?}",
                    e.name
                )));
            }
        };
        if offset == 0 && !zeros {
            return Err(Error::Toc(format!(
                "{:?}: chunk at {chunk_offset} has no data offset",
                e.name
            )));
        }
        if offset >= self.data_end {
            return Err(Error::Toc(format!(
                "{:?}: chunk offset {offset} points past the data end {}",
                e.name, self.data_end
            )));
        }
        let digest = if e.chunk_digest.is_empty() {
            // a one-chunk file is verified by the whole-file digest (zstd:chunked
            // writes chunk digests only for files of several chunks)
            if e.kind == "reg" && chunk_offset == 0 && size == file_size && !e.digest.is_empty() {
                Some(
                    e.digest.parse().map_err(|_| {
                        Error::Toc(format!("{:?}: bad digest {:?}", e.name, e.digest))
                    })?,
                )
            } else {
                None
            }
        } else {
            Some(e.chunk_digest.parse().map_err(|_| {
                Error::Toc(format!(
                    "{:?}: bad chunk digest {:?}",
                    e.name, e.chunk_digest
                ))
            })?)
        };
        let n = &mut self.idx.nodes[id as usize];
        if n.chunk_count == 0 {
            n.chunk_start = self.idx.chunks.len() as u32;
        } else if n.chunk_start as usize + n.chunk_count as usize != self.idx.chunks.len() {
            return Err(Error::Toc(format!(
                "{:?}: chunk entries are not contiguous with their file",
                e.name
            )));
        }
        n.chunk_count += 1;
        self.idx.chunks.push(Chunk {
            compressed_offset: offset,
            compressed_end: 0,
            inner_offset: inner,
            file_offset: chunk_offset,
            size,
            digest,
            zeros,
        });
        let end = if e.end_offset > 0 {
            Some(int::<u64>(e.end_offset, "endOffset", &e.name)?)
        } else {
            None
        };
        self.ends.push(end);
        Ok(())
    }

    fn replace(&mut self, parent: NodeId, name: &'a str, id: NodeId) {
        let kids = &mut self.children[parent as usize];
        match self.slots.get(&(parent, name)) {
            Some(&i) => kids[i].1 = id,
            None => {
                self.slots.insert((parent, name), kids.len());
                kids.push((name, id));
            }
        }
    }
}

impl Index {
    /// Builds the index of a TOC whose chunk data ends at `data_end` (the TOC offset).
    pub fn build(toc: &Toc, data_end: u64) -> Result<Index> {
        let mut b = Builder {
            idx: Index::default(),
            slots: HashMap::with_capacity(toc.entries.len()),
            children: Vec::with_capacity(toc.entries.len()),
            implicit_path_bytes: 0,
            ends: Vec::new(),
            data_end,
        };
        b.new_node(Kind::Dir, ROOT)?;
        let mut last_reg: Option<(&str, NodeId, u64)> = None;
        for e in &toc.entries {
            if e.kind == "chunk" {
                let Some((name, id, size)) = last_reg.filter(|(n, _, _)| *n == e.name) else {
                    return Err(Error::Toc(format!(
                        "{:?}: chunk entry does not follow its regular file",
                        e.name
                    )));
                };
                b.add_chunk(id, e, size)?;
                last_reg = Some((name, id, size));
                continue;
            }
            last_reg = None;
            let kind = Kind::from_toc(&e.kind)
                .ok_or_else(|| Error::Toc(format!("{:?}: unknown type {:?}", e.name, e.kind)))?;
            let comps = clean_path(&e.name)?;
            let Some((&base, parents)) = comps.split_last() else {
                if kind == Kind::Dir {
                    b.set_attrs(ROOT, e)?;
                    continue;
                }
                return Err(Error::Toc(format!(
                    "{:?}: the root must be a directory",
                    e.name
                )));
            };
            let parent = b.dir(parents, &e.name)?;
            if kind == Kind::Hardlink {
                let target = clean_path(&e.link_name)?;
                let tid = b.find(&target).ok_or_else(|| {
                    Error::Toc(format!(
                        "{:?}: hard link to missing {:?}",
                        e.name, e.link_name
                    ))
                })?;
                if b.idx.nodes[tid as usize].kind == Kind::Dir {
                    return Err(Error::Toc(format!(
                        "{:?}: hard link to directory {:?}",
                        e.name, e.link_name
                    )));
                }
                b.replace(parent, base, tid);
                b.idx.entries += 1;
                continue;
            }
            let existing = b.child(parent, base);
            let id = match existing {
                Some(id) if kind == Kind::Dir && b.idx.nodes[id as usize].kind == Kind::Dir => id,
                _ => {
                    let id = b.new_node(kind, parent)?;
                    b.replace(parent, base, id);
                    id
                }
            };
            b.set_attrs(id, e)?;
            b.idx.entries += 1;
            if kind == Kind::Reg {
                let size: u64 = int(e.size, "size", &e.name)?;
                b.idx.nodes[id as usize].size = size;
                if size > 0 {
                    b.add_chunk(id, e, size)?;
                }
                last_reg = Some((e.name.as_str(), id, size));
                if parents.is_empty() && base == PREFETCH_LANDMARK {
                    b.idx.prefetch_end = Some(int(e.offset, "offset", &e.name)?);
                }
                if parents.is_empty() && base == NO_PREFETCH_LANDMARK {
                    b.idx.no_prefetch = true;
                }
            }
        }
        let Builder {
            mut idx,
            children,
            ends,
            ..
        } = b;
        idx.finish_chunks(&ends, data_end)?;
        idx.flatten(children)?;
        Ok(idx)
    }

    fn finish_chunks(&mut self, ends: &[Option<u64>], data_end: u64) -> Result<()> {
        let mut starts: Vec<u64> = self
            .chunks
            .iter()
            .filter(|c| c.inner_offset == 0 && c.compressed_offset > 0)
            .map(|c| c.compressed_offset)
            .collect();
        starts.sort_unstable();
        starts.dedup();
        for n in &self.nodes {
            if n.kind != Kind::Reg || n.chunk_count == 0 {
                if n.kind == Kind::Reg && n.size > 0 {
                    return Err(Error::Toc("regular file without chunks".into()));
                }
                continue;
            }
            let range = n.chunk_start as usize..(n.chunk_start + n.chunk_count) as usize;
            let file_end = range.clone().rev().find_map(|i| ends[i]);
            let mut expect = 0u64;
            for i in range.clone() {
                let next_in_file =
                    (i + 1 < range.end).then(|| self.chunks[i + 1].compressed_offset);
                let c = &mut self.chunks[i];
                if c.file_offset != expect {
                    return Err(Error::Toc(format!(
                        "chunks overlap or leave a gap at file offset {} (expected {expect})",
                        c.file_offset
                    )));
                }
                expect = c
                    .file_offset
                    .checked_add(c.size)
                    .ok_or_else(|| Error::Toc("chunk size overflows".into()))?;
                let end = match (file_end, next_in_file) {
                    (Some(_), Some(next)) if next > c.compressed_offset => next,
                    (Some(fe), None) => fe,
                    _ => {
                        let p = starts.partition_point(|&s| s <= c.compressed_offset);
                        starts.get(p).copied().unwrap_or(data_end)
                    }
                };
                if c.zeros {
                    c.compressed_end = end.max(c.compressed_offset);
                    continue;
                }
                if end <= c.compressed_offset || end > data_end {
                    return Err(Error::Toc(format!(
                        "chunk at compressed offset {} has an invalid end {end} (data ends at {data_end})",
                        c.compressed_offset
                    )));
                }
                c.compressed_end = end;
            }
            if expect != n.size {
                return Err(Error::Toc(format!(
                    "chunks cover {expect} bytes of a {}-byte file",
                    n.size
                )));
            }
        }
        Ok(())
    }

    fn flatten(&mut self, children: Vec<Vec<(&str, NodeId)>>) -> Result<()> {
        for (dir, mut kids) in children.into_iter().enumerate() {
            if kids.is_empty() {
                continue;
            }
            kids.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            let start = self.dirents.len() as u32;
            let mut subdirs = 0;
            for (name, node) in &kids {
                let off = u32::try_from(self.names.len())
                    .map_err(|_| Error::Toc("names exceed 4 GiB".into()))?;
                self.names.push_str(name);
                self.dirents.push(Dirent {
                    name: (off, name.len() as u32),
                    node: *node,
                });
                let k = &mut self.nodes[*node as usize];
                if k.kind == Kind::Dir {
                    subdirs += 1;
                    k.parent = dir as u32;
                }
            }
            let n = &mut self.nodes[dir];
            n.dirent_start = start;
            n.dirent_count = kids.len() as u32;
            n.nlink = 2 + subdirs;
        }
        // hard links: count how many directory entries name each non-directory
        let mut counts: HashMap<NodeId, u32> = HashMap::new();
        for d in &self.dirents {
            if self.nodes[d.node as usize].kind != Kind::Dir {
                *counts.entry(d.node).or_default() += 1;
            }
        }
        for (id, c) in counts {
            self.nodes[id as usize].nlink = c;
        }
        if let Some(n) = self.nodes.first_mut()
            && n.dirent_count == 0
        {
            n.nlink = 2;
        }
        self.nodes.shrink_to_fit();
        self.dirents.shrink_to_fit();
        self.chunks.shrink_to_fit();
        self.extras.shrink_to_fit();
        self.names.shrink_to_fit();
        Ok(())
    }

    /// The node with this id.
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id as usize)
    }

    /// Number of nodes (inodes), the root included.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Number of TOC entries that became names in the tree (chunk entries excluded).
    pub fn entry_count(&self) -> usize {
        self.entries
    }

    /// Parent directory of a directory (the root is its own parent).
    pub fn parent(&self, id: NodeId) -> NodeId {
        self.nodes.get(id as usize).map_or(ROOT, |n| n.parent)
    }

    fn name(&self, r: (u32, u32)) -> &str {
        &self.names[r.0 as usize..(r.0 + r.1) as usize]
    }

    fn dirents(&self, dir: NodeId) -> &[Dirent] {
        match self.nodes.get(dir as usize) {
            Some(n) if n.kind == Kind::Dir => {
                &self.dirents[n.dirent_start as usize..(n.dirent_start + n.dirent_count) as usize]
            }
            _ => &[],
        }
    }

    /// Looks a name up in a directory.
    pub fn lookup(&self, dir: NodeId, name: &str) -> Option<NodeId> {
        let d = self.dirents(dir);
        d.binary_search_by(|e| self.name(e.name).as_bytes().cmp(name.as_bytes()))
            .ok()
            .map(|i| d[i].node)
    }

    /// Looks a slash-separated path up from the root.
    pub fn lookup_path(&self, path: &str) -> Option<NodeId> {
        let comps = clean_path(path).ok()?;
        comps
            .into_iter()
            .try_fold(ROOT, |dir, c| self.lookup(dir, c))
    }

    /// The entries of a directory, sorted by name.
    pub fn read_dir(&self, dir: NodeId) -> impl Iterator<Item = (&str, NodeId)> + '_ {
        self.dirents(dir)
            .iter()
            .map(|d| (self.name(d.name), d.node))
    }

    fn extra(&self, id: NodeId) -> Option<&Extra> {
        let n = self.nodes.get(id as usize)?;
        (n.extra != NONE).then(|| &self.extras[n.extra as usize])
    }

    /// A symlink's target.
    pub fn link_target(&self, id: NodeId) -> Option<&str> {
        let n = self.nodes.get(id as usize)?;
        (n.kind == Kind::Symlink).then(|| self.extra(id).map_or("", |e| self.name(e.link)))
    }

    /// A device's (major, minor).
    pub fn rdev(&self, id: NodeId) -> (u32, u32) {
        self.extra(id).map_or((0, 0), |e| e.rdev)
    }

    /// Extended attributes, name → value.
    pub fn xattrs(&self, id: NodeId) -> &[(String, Vec<u8>)] {
        self.extra(id).map_or(&[], |e| &e.xattrs)
    }

    /// A regular file's chunks, in file order.
    pub fn chunks(&self, id: NodeId) -> &[Chunk] {
        match self.nodes.get(id as usize) {
            Some(n) => {
                &self.chunks[n.chunk_start as usize..(n.chunk_start + n.chunk_count) as usize]
            }
            None => &[],
        }
    }

    /// Positions of a file's chunks within [`Index::all_chunks`].
    pub fn chunk_span(&self, id: NodeId) -> std::ops::Range<usize> {
        match self.nodes.get(id as usize) {
            Some(n) => n.chunk_start as usize..(n.chunk_start + n.chunk_count) as usize,
            None => 0..0,
        }
    }

    /// The index (within [`Index::chunks`]) of the chunk holding file offset `off`.
    pub fn chunk_at(&self, id: NodeId, off: u64) -> Option<usize> {
        let cs = self.chunks(id);
        let i = cs.partition_point(|c| c.file_offset <= off);
        let i = i.checked_sub(1)?;
        (off < cs[i].file_offset + cs[i].size).then_some(i)
    }

    /// Every chunk of the layer, for whole-layer work (prefetch, background fetch).
    pub fn all_chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// The compressed offset where the prioritized files end (the
    /// `.prefetch.landmark` entry), if the layer has one.
    pub fn prefetch_end(&self) -> Option<u64> {
        if self.no_prefetch {
            None
        } else {
            self.prefetch_end
        }
    }

    /// Whether the layer asks for no prefetch (`.no.prefetch.landmark`).
    pub fn no_prefetch(&self) -> bool {
        self.no_prefetch
    }

    /// Every path (with a leading `/`) and its node, depth first, sorted by name.
    pub fn walk(&self) -> Vec<(String, NodeId)> {
        let mut out = Vec::with_capacity(self.dirents.len());
        let mut stack: Vec<(String, NodeId)> = vec![(String::new(), ROOT)];
        while let Some((path, dir)) = stack.pop() {
            let mut subdirs = Vec::new();
            for (name, id) in self.read_dir(dir) {
                let p = format!("{path}/{name}");
                out.push((p.clone(), id));
                if self.nodes[id as usize].kind == Kind::Dir && id != dir {
                    subdirs.push((p, id));
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A path naming node `id` (for error messages; walks the tree).
    pub fn path_of(&self, id: NodeId) -> Option<String> {
        self.walk()
            .into_iter()
            .find(|(_, n)| *n == id)
            .map(|(p, _)| p)
    }

    /// Heap bytes held by the index (for the resident-size benchmark).
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.nodes.capacity() * size_of::<Node>()
            + self.dirents.capacity() * size_of::<Dirent>()
            + self.chunks.capacity() * size_of::<Chunk>()
            + self.extras.capacity() * size_of::<Extra>()
            + self
                .extras
                .iter()
                .map(|e| {
                    e.xattrs.capacity() * size_of::<(String, Vec<u8>)>()
                        + e.xattrs
                            .iter()
                            .map(|(k, v)| k.capacity() + v.capacity())
                            .sum::<usize>()
                })
                .sum::<usize>()
            + self.names.capacity()
    }
}
