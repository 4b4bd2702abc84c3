//! [`apply_layer`](super::apply_layer): the tree comes from the TOC index (already
//! final: later duplicates won, hard links share a node), so directories, links,
//! devices and empty files are made first; file bytes then arrive chunk by chunk
//! from [`RemoteLayer::read_chunks`] on many threads, each file created at its
//! first chunk and finished (owner, xattrs, mode, mtime) at its last; hard links
//! and directory mtimes come last.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::stat::SFlag;

use super::ApplyStats;
use super::names::{Name, classify, link_target};
use super::target::{At, Attrs, Target, create_file, finish_file, write_sparse};
use crate::error::{Error, Result};
use crate::format::index::Index;
use crate::format::{Kind, NodeId, ROOT};
use crate::layer::RemoteLayer;

fn attrs(idx: &Index, id: NodeId) -> Attrs<'_> {
    let Some(n) = idx.node(id) else {
        return Target::ROOT;
    };
    Attrs {
        mode: n.mode,
        uid: n.uid,
        gid: n.gid,
        mtime: (n.mtime, n.mtime_nanos),
        xattrs: idx
            .xattrs(id)
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect(),
    }
}

/// A regular file whose bytes are still to come.
struct Pending {
    id: NodeId,
    path: String,
    /// Chunks not yet written.
    left: AtomicU32,
    /// End of the last byte written (holes after it come from the final size).
    end: AtomicU64,
    file: Mutex<Option<Arc<File>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn apply(layer: &RemoteLayer, dest: &Path) -> Result<ApplyStats> {
    let idx = layer.index();
    let mut t = Target::open(dest)?;
    t.root_dir(&attrs(idx, ROOT), "/")?;
    let mut stats = ApplyStats::default();
    // the path each file node is made at; its other names become hard links
    let mut first: HashMap<NodeId, String> = HashMap::new();
    let mut links: Vec<(String, NodeId)> = Vec::new();
    let mut pending: Vec<Pending> = Vec::new();
    for (path, id) in idx.walk() {
        let Some(n) = idx.node(id) else { continue };
        stats.entries += 1;
        let (class, implicit) = classify(&path)?;
        let (kind, a) = match implicit {
            true => (Kind::Dir, Target::ROOT),
            false => (n.kind, attrs(idx, id)),
        };
        match class {
            Name::Hidden => {}
            Name::Root => t.root_dir(&a, &path)?,
            Name::Opaque { parents } => {
                let dir = t.parent(&parents, &path)?;
                t.opaque(&dir, &path)?;
                stats.whiteouts += 1;
            }
            Name::Whiteout { parents, target } => {
                let dir = t.parent(&parents, &path)?;
                let at = At {
                    dir: &dir,
                    parents: &parents,
                    base: target,
                    entry: &path,
                };
                if t.whiteout(&at, &a)? {
                    stats.whiteouts += 1;
                }
            }
            Name::Entry { parents, base } => {
                if kind != Kind::Dir {
                    if first.contains_key(&id) {
                        links.push((path, id));
                        continue;
                    }
                    first.insert(id, path.clone());
                }
                let dir = t.parent(&parents, &path)?;
                let at = At {
                    dir: &dir,
                    parents: &parents,
                    base,
                    entry: &path,
                };
                match kind {
                    Kind::Dir => t.dir(&at, &a)?,
                    Kind::Reg => {
                        stats.files += 1;
                        stats.bytes += n.size;
                        let chunks = idx.chunks(id).iter().filter(|c| !c.zeros).count();
                        if chunks == 0 {
                            let f = t.file(&at)?;
                            finish_file(&f, n.size, 0, &a, &path)?;
                        } else {
                            pending.push(Pending {
                                id,
                                path: path.clone(),
                                left: AtomicU32::new(chunks as u32),
                                end: AtomicU64::new(0),
                                file: Mutex::new(None),
                            });
                        }
                    }
                    Kind::Symlink => t.symlink(&at, idx.link_target(id).unwrap_or(""), &a)?,
                    Kind::Char | Kind::Block | Kind::Fifo => {
                        let (flag, (major, minor)) = match kind {
                            Kind::Char => (SFlag::S_IFCHR, idx.rdev(id)),
                            Kind::Block => (SFlag::S_IFBLK, idx.rdev(id)),
                            _ => (SFlag::S_IFIFO, (0, 0)),
                        };
                        t.node(&at, flag, libc::makedev(major, minor), &a)?;
                    }
                    Kind::Hardlink => {
                        return Err(Error::Toc(format!("{path}: unresolved hard link")));
                    }
                }
            }
        }
    }
    write_contents(layer, &t, &pending)?;
    for (path, id) in links {
        let Some(target) = first.get(&id) else {
            continue;
        };
        let (Name::Entry { parents, base }, false) = classify(&path)? else {
            continue;
        };
        let mut tcomps = link_target(&path, target)?;
        let Some(tbase) = tcomps.pop() else { continue };
        let dir = t.parent(&parents, &path)?;
        let tdir = t.resolve(&tcomps, &path)?;
        let at = At {
            dir: &dir,
            parents: &parents,
            base,
            entry: &path,
        };
        t.link(&at, &tdir, tbase, target)?;
    }
    t.finish()?;
    Ok(stats)
}

/// Writes every pending file from its chunks, as they arrive on any thread.
fn write_contents(layer: &RemoteLayer, t: &Target, pending: &[Pending]) -> Result<()> {
    let idx = layer.index();
    let all = idx.all_chunks();
    let mut owner: Vec<u32> = vec![u32::MAX; all.len()];
    let mut wanted = Vec::new();
    for (k, p) in pending.iter().enumerate() {
        for i in idx.chunk_span(p.id) {
            owner[i] = k as u32;
            wanted.push(i);
        }
    }
    let sink = |i: usize, data: &[u8]| -> Result<()> {
        let Some(p) = owner.get(i).and_then(|&k| pending.get(k as usize)) else {
            return Ok(());
        };
        let f = {
            let mut slot = lock(&p.file);
            match &*slot {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(open_pending(t, &p.path)?);
                    *slot = Some(f.clone());
                    f
                }
            }
        };
        let c = &all[i];
        let end = write_sparse(&f, c.file_offset, data, &p.path)?;
        p.end.fetch_max(end, Ordering::AcqRel);
        if p.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let size = idx.node(p.id).map_or(0, |n| n.size);
            finish_file(
                &f,
                size,
                p.end.load(Ordering::Acquire),
                &attrs(idx, p.id),
                &p.path,
            )?;
            lock(&p.file).take();
        }
        Ok(())
    };
    layer.read_chunks(&wanted, &sink)?;
    match pending.iter().find(|p| p.left.load(Ordering::Acquire) != 0) {
        Some(p) => Err(Error::Toc(format!("{}: not every chunk arrived", p.path))),
        None => Ok(()),
    }
}

fn open_pending(t: &Target, path: &str) -> Result<File> {
    let (Name::Entry { parents, base }, _) = classify(path)? else {
        return Err(Error::Toc(format!("{path}: not a file name")));
    };
    let dir = t.resolve(&parents, path)?;
    create_file(&At {
        dir: &dir,
        parents: &parents,
        base,
        entry: path,
    })
}
