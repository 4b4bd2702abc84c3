//! Handing a live mount to another process, so that a daemon can restart or upgrade
//! while containers keep using its mounts.
//!
//! A FUSE connection lives as long as some process holds its `/dev/fuse` descriptor;
//! requests that arrive while nobody reads wait in the kernel. [`Mount::connection`]
//! gives what a successor needs: the descriptor, the table of open files (the kernel
//! fixes each inode's I/O mode while it is open, so the successor must answer opens
//! the same way), and a [`ConnectionInfo`] with the INIT exchange (the kernel sends
//! INIT once per connection). [`resume`] serves such a connection again, and asks the
//! kernel to resend requests the previous server read but never answered.
//!
//! Node ids are tree indexes and file handles are node ids, so a tree built the same
//! way from the same layer means the same to the kernel; the tree's fingerprint is
//! recorded and checked to catch a builder that changed between versions.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
};

use fuser::{BackgroundSession, Config, SessionACL};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tracing::info;

use super::{FS_TYPE, Mount, MountOptions};
use crate::{
    Content, Error, Tree,
    fs::LayerFs,
    handshake::{self, Handshake, InitExchange},
    mountinfo,
    passthrough::{OpenFiles, OpenTable},
};

/// What identifies a live connection and how it was set up; plain data, for the
/// caller to store next to the descriptors.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnectionInfo {
    /// Where it is mounted (canonical path).
    pub mountpoint: PathBuf,
    /// mountinfo id and device of the mount, to tell it from a later mount there.
    pub mount_id: u64,
    /// `major:minor` of the mount.
    pub dev: String,
    /// The kernel's FUSE_INIT request, as read.
    pub init_request: Vec<u8>,
    /// The reply the first server sent.
    pub init_reply: Vec<u8>,
    /// Fingerprint of the tree served (see [`Tree::fingerprint`]).
    pub tree_fingerprint: u64,
}

/// A live connection, ready to be handed to another process (over `SCM_RIGHTS`).
#[derive(Debug)]
pub struct Connection {
    /// The `/dev/fuse` descriptor (a duplicate: the same open file).
    pub device: OwnedFd,
    /// The open-file table (a memfd).
    pub opens: OwnedFd,
    /// Where and how it is mounted.
    pub info: ConnectionInfo,
}

/// What a [`Mount`] keeps to describe itself to a successor.
#[derive(Debug)]
pub(crate) struct Kept {
    device: OwnedFd,
    opens: File,
    init: InitExchange,
    fingerprint: u64,
}

/// Serves `device` with a new filesystem over `tree`: after a fresh mount
/// (`previous` is `None`) or in place of the server that answered `previous`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn serve(
    tree: Arc<Tree>,
    content: Arc<dyn Content>,
    opts: &MountOptions,
    device: OwnedFd,
    opens: OpenTable,
    passthrough: Arc<AtomicBool>,
    previous: Option<&InitExchange>,
) -> io::Result<(BackgroundSession, Kept)> {
    let fingerprint = tree.fingerprint();
    let kept_opens = opens.file().try_clone()?;
    let fs = LayerFs::new(
        tree,
        content,
        opts.entry_timeout,
        opts.attr_timeout,
        opts.passthrough,
        passthrough,
        OpenFiles::with_table(opens)?,
    );
    let acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let mut config = Config::default();
    config.acl = acl;
    config.n_threads = Some(opts.threads.max(1));
    // All threads read the one open file that a holder process keeps a duplicate of:
    // requests read on a cloned descriptor would be aborted when this process dies,
    // while those read on the shared one wait for a successor to ask them resent.
    config.clone_fd = false;
    let handshake = match previous {
        Some(init) => Handshake::Replay(init),
        None => Handshake::Kernel,
    };
    let (session, init) = handshake::start(fs, &device, acl, config, handshake)?;
    let kept = Kept {
        device,
        opens: kept_opens,
        init,
        fingerprint,
    };
    Ok((session, kept))
}

impl Mount {
    /// Duplicates of what a successor needs to serve this mount: hand them to another
    /// process (or a holder) before this one exits or is killed.
    pub fn connection(&self) -> Result<Connection, Error> {
        let kept = &self.kept;
        let fail = |source| Error::Mount {
            mountpoint: self.mountpoint.clone(),
            source,
        };
        Ok(Connection {
            device: kept.device.try_clone().map_err(fail)?,
            opens: OwnedFd::from(kept.opens.try_clone().map_err(fail)?),
            info: ConnectionInfo {
                mountpoint: self.mountpoint.clone(),
                mount_id: self.mount_id,
                dev: self.dev.clone(),
                init_request: kept.init.request.clone(),
                init_reply: kept.init.reply.clone(),
                tree_fingerprint: kept.fingerprint,
            },
        })
    }

    /// Stops owning the mount without unmounting it: a successor serves it from a
    /// [`Connection`]. This process's threads keep answering until it exits; what they
    /// read and do not answer by then, the successor gets resent.
    pub fn leave(mut self) {
        if let Some(session) = self.session.take() {
            // Joining would wait for the unmount; the threads end with the process.
            std::mem::forget(session);
        }
        info!(mountpoint = %self.mountpoint.display(), "left mounted for a successor");
    }
}

/// Whether `info`'s mount is still there: the same mount (id and device) on its
/// mountpoint, seen from this process.
pub fn is_live(info: &ConnectionInfo) -> bool {
    mountinfo::read()
        .ok()
        .and_then(|m| mountinfo::find(&m, &info.mountpoint))
        .is_some_and(|m| m.id == info.mount_id && m.dev == info.dev && m.fs_type == FS_TYPE)
}

impl Connection {
    /// Whether the kernel still has this connection: it ends once its filesystem is
    /// unmounted and unused, or when it is aborted.
    pub fn is_open(&self) -> bool {
        let mut fds = [PollFd::new(self.device.as_fd(), PollFlags::empty())];
        // No events asked: a FUSE device reports POLLERR once its connection ended.
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => fds[0].revents().is_none_or(|r| r.is_empty()),
            Err(_) => false,
        }
    }
}

/// Serves a connection another process served before, with `tree` (which must be
/// built as that process built it) and `content`. Requests that waited meanwhile are
/// answered, and so are those the previous server read but never answered (the kernel
/// resends them, Linux 6.9+).
pub fn resume(
    tree: Arc<Tree>,
    content: Arc<dyn Content>,
    conn: Connection,
    opts: &MountOptions,
) -> Result<Mount, Error> {
    resume_with(tree, content, conn, opts, true)
}

/// [`resume`] for a connection whose mount was detached while something still used
/// it (an overlay over it, an open file): it is served until its last user lets go.
pub fn resume_detached(
    tree: Arc<Tree>,
    content: Arc<dyn Content>,
    conn: Connection,
    opts: &MountOptions,
) -> Result<Mount, Error> {
    resume_with(tree, content, conn, opts, false)
}

fn resume_with(
    tree: Arc<Tree>,
    content: Arc<dyn Content>,
    conn: Connection,
    opts: &MountOptions,
    mounted: bool,
) -> Result<Mount, Error> {
    let refuse = |reason: String| Error::Resume {
        mountpoint: conn.info.mountpoint.clone(),
        reason,
    };
    if mounted && !is_live(&conn.info) {
        return Err(refuse("the mount is gone".into()));
    }
    if !conn.is_open() {
        return Err(refuse("the connection has ended".into()));
    }
    let info = conn.info;
    let refuse = |reason: String| Error::Resume {
        mountpoint: info.mountpoint.clone(),
        reason,
    };
    let fingerprint = tree.fingerprint();
    if fingerprint != info.tree_fingerprint {
        return Err(refuse(format!(
            "the tree differs from the one served before (fingerprint {fingerprint:#x}, \
             was {:#x}): inode numbers would not match",
            info.tree_fingerprint
        )));
    }
    let init = InitExchange {
        request: info.init_request.clone(),
        reply: info.init_reply.clone(),
    };
    let passthrough = Arc::new(AtomicBool::new(false));
    let (session, kept) = serve(
        tree,
        content,
        opts,
        conn.device,
        OpenTable::from_file(File::from(conn.opens)),
        passthrough.clone(),
        Some(&init),
    )
    .map_err(|e| refuse(e.to_string()))?;
    info!(mountpoint = %info.mountpoint.display(), mounted, "resumed serving a live connection");
    Ok(Mount {
        mountpoint: info.mountpoint,
        mount_id: info.mount_id,
        dev: info.dev,
        session: Some(session),
        passthrough,
        kept,
    })
}

impl Tree {
    /// A hash of the tree's shape: node order, kinds, sizes, file ids, parents and
    /// directory entries. Two builds of one layer by the same builder agree.
    pub fn fingerprint(&self) -> u64 {
        let mut h = Fnv::default();
        h.word(self.nodes.len() as u64);
        for n in &self.nodes {
            h.word(u64::from(n.mode) | (u64::from(n.nlink) << 32));
            h.word(n.size);
            h.word(n.data);
            h.word(u64::from(n.parent));
        }
        for d in &self.dirents {
            h.word(u64::from(d.node) | (u64::from(d.name_len) << 32));
            h.word(u64::from(d.name));
        }
        h.word(self.arena.len() as u64);
        h.0
    }
}

/// FNV-1a over 64-bit words: stable across builds and Rust versions, unlike the
/// standard hasher.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn word(&mut self, w: u64) {
        for b in w.to_le_bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Attr, Kind, TreeBuilder};

    fn tree(names: &[&str]) -> crate::Tree {
        let mut b = TreeBuilder::new(Attr {
            kind: Kind::Dir,
            perm: 0o755,
            ..Attr::default()
        });
        for (i, n) in names.iter().enumerate() {
            let f = b
                .add(
                    n,
                    Attr {
                        kind: Kind::File,
                        perm: 0o644,
                        size: 10,
                        ..Attr::default()
                    },
                )
                .unwrap();
            b.set_file(f, i as u64);
        }
        b.build()
    }

    #[test]
    fn fingerprints_agree_for_equal_builds_and_differ_otherwise() {
        assert_eq!(
            tree(&["a", "b"]).fingerprint(),
            tree(&["a", "b"]).fingerprint()
        );
        assert_ne!(
            tree(&["a", "b"]).fingerprint(),
            tree(&["b", "a"]).fingerprint()
        );
        assert_ne!(tree(&["a"]).fingerprint(), tree(&["a", "b"]).fingerprint());
    }
}
