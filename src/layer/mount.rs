//! Presenting a remote layer through `lazysnap-fuse`: the index becomes the inode
//! tree, and reads are answered from the cache inline or from a worker that fetches.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use lazysnap_fuse::{
    Attr, Content, FileId, Kind as FKind, MountOptions, ReadReply, Tree, TreeBuilder,
};

use super::RemoteLayer;
use super::access::AccessRecorder;
use super::workers::Workers;
use crate::error::{Error, Result};
use crate::format::index::{Index, Node};
use crate::format::{Kind, NodeId, ROOT};

fn attr(index: &Index, id: NodeId, n: &Node) -> Attr {
    let kind = match n.kind {
        Kind::Dir => FKind::Dir,
        Kind::Reg | Kind::Hardlink => FKind::File,
        Kind::Symlink => FKind::Symlink,
        Kind::Char => FKind::CharDev,
        Kind::Block => FKind::BlockDev,
        Kind::Fifo => FKind::Fifo,
    };
    let (major, minor) = index.rdev(id);
    let mtime = if n.mtime >= 0 {
        UNIX_EPOCH + Duration::new(n.mtime as u64, n.mtime_nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(n.mtime.unsigned_abs())
            + Duration::from_nanos(n.mtime_nanos as u64)
    };
    let size = match n.kind {
        Kind::Symlink => index.link_target(id).map_or(0, |t| t.len() as u64),
        Kind::Reg => n.size,
        _ => 0,
    };
    Attr {
        kind,
        perm: (n.mode & 0o7777) as u16,
        uid: n.uid,
        gid: n.gid,
        size,
        mtime,
        rdev: libc::makedev(major, minor) as u32,
        nlink: n.nlink,
    }
}

/// Builds the FUSE inode tree of a layer; hard links share one inode.
pub fn build_tree(index: &Index) -> Result<Tree> {
    let root = index
        .node(ROOT)
        .ok_or_else(|| Error::Toc("layer has no root".into()))?;
    let mut b = TreeBuilder::new(attr(index, ROOT, root));
    let mut seen: HashMap<NodeId, lazysnap_fuse::NodeRef> = HashMap::new();
    for (path, id) in index.walk() {
        let Some(n) = index.node(id) else { continue };
        if let Some(&r) = seen.get(&id) {
            b.link(&path, r).map_err(|e| Error::Toc(e.to_string()))?;
            continue;
        }
        let r = b
            .add(&path, attr(index, id, n))
            .map_err(|e| Error::Toc(e.to_string()))?;
        if n.kind != Kind::Dir {
            seen.insert(id, r);
        }
        for (k, v) in index.xattrs(id) {
            b.set_xattr(r, k.as_bytes(), v);
        }
        match n.kind {
            Kind::Symlink => {
                b.set_symlink_target(r, index.link_target(id).unwrap_or("").as_bytes())
            }
            Kind::Reg => b.set_file(r, id as FileId),
            _ => {}
        }
    }
    Ok(b.build())
}

/// The bytes of a mounted layer's files.
pub struct LayerContent {
    layer: Arc<RemoteLayer>,
    workers: Arc<Workers>,
    /// Where opens are recorded, with this layer's number in the stack.
    recorder: Option<(Arc<AccessRecorder>, usize)>,
}

impl LayerContent {
    /// Serves `layer`, fetching on `workers`.
    pub fn new(layer: Arc<RemoteLayer>, workers: Arc<Workers>) -> Arc<Self> {
        Arc::new(LayerContent {
            layer,
            workers,
            recorder: None,
        })
    }

    /// Serves `layer` and records every first open of its files in `recorder` as
    /// layer number `layer_no`.
    pub fn recording(
        layer: Arc<RemoteLayer>,
        workers: Arc<Workers>,
        recorder: Arc<AccessRecorder>,
        layer_no: usize,
    ) -> Arc<Self> {
        Arc::new(LayerContent {
            layer,
            workers,
            recorder: Some((recorder, layer_no)),
        })
    }

    /// The layer served.
    pub fn layer(&self) -> &Arc<RemoteLayer> {
        &self.layer
    }
}

impl Content for LayerContent {
    fn opened(&self, file: FileId) {
        if let (Some((r, no)), Ok(id)) = (&self.recorder, NodeId::try_from(file)) {
            r.record(*no, id);
        }
    }

    fn read(&self, file: FileId, offset: u64, size: u32, reply: ReadReply) {
        let Ok(id) = NodeId::try_from(file) else {
            reply.error(libc::EIO);
            return;
        };
        let window = self.layer.readahead_window();
        if let Some(data) = self.layer.read_cached(id, offset, size) {
            reply.data(&data);
            let next = offset.saturating_add(size as u64);
            if window > 0 && self.layer.readahead_due(id, next, window) {
                let layer = self.layer.clone();
                self.workers
                    .spawn(move || layer.readahead(id, next, window));
            }
            return;
        }
        let layer = self.layer.clone();
        self.workers
            .spawn(move || match layer.read(id, offset, size) {
                Ok(data) => reply.data(&data),
                Err(_) => reply.error(libc::EIO),
            });
    }

    fn backing_file(&self, file: FileId) -> Option<std::fs::File> {
        let id = NodeId::try_from(file).ok()?;
        if let Some(f) = self.layer.backing_file(id) {
            return Some(f);
        }
        // The kernel fixes an inode's I/O mode at its first open, so the file is
        // assembled now (streamed from the verified cache) for this open to be a
        // passthrough one; only this FUSE thread waits.
        if self.layer.wants_backing_file(id) {
            if let Err(e) = self.layer.build_backing_file(id) {
                tracing::warn!(layer = self.layer.name(), error = %e, "passthrough file not built");
                return None;
            }
            return self.layer.backing_file(id);
        }
        None
    }
}

/// Mounts a layer read-only at `mountpoint`.
pub fn mount_layer(
    layer: Arc<RemoteLayer>,
    mountpoint: &Path,
    opts: &MountOptions,
    workers: Arc<Workers>,
) -> Result<lazysnap_fuse::Mount> {
    mount_content(LayerContent::new(layer, workers), mountpoint, opts)
}

/// Mounts the layer `content` serves read-only at `mountpoint`.
pub fn mount_content(
    content: Arc<LayerContent>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<lazysnap_fuse::Mount> {
    let layer = content.layer.clone();
    // a TOC name the tree refuses (NUL, too long) is the layer's fault: name it
    let tree = Arc::new(build_tree(layer.index()).map_err(|e| Error::Fetch {
        blob: layer.name().to_string(),
        reason: e.to_string(),
    })?);
    lazysnap_fuse::mount(tree, content, mountpoint, opts).map_err(|e| {
        Error::io(
            format!(
                "{}: cannot mount layer {}",
                mountpoint.display(),
                layer.name()
            ),
            std::io::Error::other(e.to_string()),
        )
    })
}
