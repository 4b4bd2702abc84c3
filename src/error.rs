//! The crate's one error type. Every variant says what failed and on which object,
//! because these messages reach users through the CLI and, later, containerd.

use std::io;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the lazysnap crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a named object failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The blob's footer is missing, truncated or malformed: the blob is not a lazy layer.
    #[error("footer: {0}")]
    Footer(String),
    /// The table of contents is malformed or inconsistent with the blob.
    #[error("table of contents: {0}")]
    Toc(String),
    /// The TOC does not hash to the digest it must have.
    #[error("table of contents digest mismatch: expected {expected}, got {actual}")]
    TocDigest { expected: String, actual: String },
    /// A chunk's bytes do not hash to the digest the TOC gives; they are never served.
    #[error(
        "{path}: chunk at file offset {offset} fails verification: expected {expected}, got {actual}"
    )]
    ChunkDigest {
        path: String,
        offset: u64,
        expected: String,
        actual: String,
    },
    /// A chunk could not be decompressed.
    #[error("{path}: chunk at file offset {offset}: {reason}")]
    Chunk {
        path: String,
        offset: u64,
        reason: String,
    },
    /// A path in a TOC or tar would land outside the layer root.
    #[error("{path:?}: path escapes the layer root")]
    UnsafePath { path: String },
    /// The tar stream is malformed.
    #[error("tar: {0}")]
    Tar(String),
    /// A named entry does not exist in the layer.
    #[error("{0}: no such file in layer")]
    NotFound(String),
    /// Fetching bytes of a blob failed (after the registry client's retries).
    #[error("{blob}: {reason}")]
    Fetch { blob: String, reason: String },
    /// A caller passed a value that cannot be used.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A snapshot (or the parent it names) does not exist.
    #[error("snapshot {0}: not found")]
    SnapshotNotFound(String),
    /// The object already exists; for a remote Prepare this is the success answer.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The object is in the wrong state for the operation (e.g. removing a parent).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A needed resource is not available now (e.g. an unhealthy remote layer).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Store(String),
    /// A registry request failed (the message names registry, repository and object).
    #[error(transparent)]
    Registry(#[from] lazysnap_registry::Error),
    /// What a reference or directory names is not a container image.
    #[error("{image}: not a container image: {reason}")]
    NotAnImage { image: String, reason: String },
}

impl Error {
    /// Wraps an I/O error with the object it happened on.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds the object name to I/O results.
pub trait IoContext<T> {
    /// Attaches `context` (what was being done to which object) to an I/O error.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
