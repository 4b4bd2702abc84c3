//! The crate's one error type. Every variant names the path or mountpoint it is about,
//! because these errors end up in front of a user who has to find the bad entry.

use std::{io, path::PathBuf};

/// Why building a tree or mounting it failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path is not a clean relative path (`..`, a NUL byte, an over-long name).
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A parent directory of the path was never added.
    #[error("parent directory of {path:?} does not exist")]
    MissingParent {
        /// The path as given.
        path: String,
    },
    /// A component leading to the path is not a directory.
    #[error("a parent of {path:?} is not a directory")]
    NotADirectory {
        /// The path as given.
        path: String,
    },
    /// Hard links to directories are not allowed.
    #[error("cannot hard link {path:?} to a directory")]
    LinkToDirectory {
        /// The path of the link.
        path: String,
    },
    /// The tree outgrew its compact 32-bit indexes.
    #[error("tree too large at {path:?}: more than 2^32 {what}")]
    TooLarge {
        /// The path being added when it happened.
        path: String,
        /// Which table overflowed.
        what: &'static str,
    },
    /// Mounting failed.
    #[error("mount FUSE at {}: {source}", mountpoint.display())]
    Mount {
        /// Where the mount was attempted.
        mountpoint: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// Unmounting failed.
    #[error("unmount FUSE at {}: {source}", mountpoint.display())]
    Unmount {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// A live connection could not be served again.
    #[error("resume FUSE at {}: {reason}", mountpoint.display())]
    Resume {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// Why not.
        reason: String,
    },
}
