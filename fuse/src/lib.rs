//! `lazysnap-fuse`: a read-only FUSE filesystem over an in-memory inode tree.
//!
//! A caller describes a layer as a [`Tree`] (built with [`TreeBuilder`]) and supplies the
//! bytes of its regular files through [`Content`]. [`mount`] serves the tree with several
//! kernel threads: lookups, attributes, listings, link targets and xattrs come from memory;
//! reads go to [`Content`], which may answer later from its own worker so that a read
//! that has to fetch never holds up a FUSE thread. The mount is in overlayfs lower-dir
//! form (whiteouts as 0:0 character devices, opaque directories as
//! `trusted.overlay.opaque=y`), and where the kernel has FUSE passthrough, files that are
//! fully local are read by the kernel directly.
//!
//! This crate knows nothing of registries or image formats.

#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod attr;
mod builder;
mod error;
mod fs;
mod handshake;
mod mount;
mod mountinfo;
mod passthrough;
mod path;
mod tree;
mod whiteout;

use std::fmt;

pub use attr::{Attr, Kind};
pub use builder::TreeBuilder;
pub use error::Error;
pub use mount::handover::{Connection, ConnectionInfo, is_live, resume, resume_detached};
pub use mount::{Mount, MountOptions, kernel_supports_passthrough, mount};
pub use tree::{NodeRef, Tree};

/// Whether something is mounted on `path` (absolute; canonicalised when it exists),
/// from `/proc/self/mountinfo`, without touching the filesystem at `path`.
pub fn is_mountpoint(path: &std::path::Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mountinfo::read()
        .map(|entries| mountinfo::find(&entries, &path).is_some())
        .unwrap_or(false)
}

/// The caller's handle for a regular file's bytes (`u64::MAX` is reserved).
pub type FileId = u64;

/// What supplies file bytes. Implemented by the lazy layer.
pub trait Content: Send + Sync + 'static {
    /// Answers with exactly the bytes of `[offset, offset + size)` of `file` (the range is
    /// already clipped to the file size) by calling [`ReadReply::data`] or
    /// [`ReadReply::error`], from any thread, now or later. This is called on a FUSE
    /// thread, so an implementation that must fetch hands the reply to its own worker.
    fn read(&self, file: FileId, offset: u64, size: u32, reply: ReadReply);

    /// Called at every open of `file`, before anything else (an access recorder notes
    /// which files a workload opens, in order). Must be cheap; does nothing by default.
    fn opened(&self, file: FileId) {
        let _ = file;
    }

    /// Called at open: a local file holding the whole content, if the file is fully
    /// cached, so that the kernel can read it directly (FUSE passthrough).
    fn backing_file(&self, file: FileId) -> Option<std::fs::File> {
        let _ = file;
        None
    }
}

/// The pending answer to one read. It is `Send + 'static`: move it to a worker and answer
/// there. Dropping it unanswered answers `EIO`.
pub struct ReadReply(fuser::ReplyData);

impl ReadReply {
    /// Answers with these bytes (fewer than asked means end of file).
    pub fn data(self, bytes: &[u8]) {
        self.0.data(bytes);
    }

    /// Answers with an errno such as `libc::EIO`. Zero or negative values answer `EIO`.
    pub fn error(self, errno: i32) {
        let errno = if errno > 0 { errno } else { libc::EIO };
        self.0.error(fuser::Errno::from_i32(errno));
    }

    /// Answers with the errno of an I/O error, `EIO` when it has none.
    pub fn io_error(self, err: &std::io::Error) {
        self.error(err.raw_os_error().unwrap_or(libc::EIO));
    }
}

impl fmt::Debug for ReadReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReadReply")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shared_types_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send + 'static>() {}
        send_sync::<super::Tree>();
        send_sync::<super::Mount>();
        send::<super::ReadReply>();
    }
}
