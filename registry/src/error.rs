//! The crate's single error type.
//!
//! Remote failures carry the registry, repository and object so that a message that
//! reaches a user (or a FUSE `EIO` log line) says exactly which read failed.

use std::path::PathBuf;

/// Coarse classification of a failure, so callers can map errors (to gRPC codes,
/// errno values, metrics) without parsing message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The registry says the manifest, blob or repository does not exist.
    NotFound,
    /// Credentials are missing or were refused.
    Unauthorized,
    /// A request did not finish within the configured timeout.
    Timeout,
    /// The connection failed or was reset.
    Network,
    /// The server answered something that breaks the protocol (wrong length, wrong
    /// `Content-Range`, bad digest, malformed JSON).
    Protocol,
    /// The server kept answering an error status (5xx, 429, ...).
    Status,
    /// The registry or image uses something this crate does not support.
    Unsupported,
    /// The caller asked for something impossible (e.g. a range past the end).
    InvalidInput,
}

/// Errors of `lazysnap-registry`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An image reference that cannot be parsed.
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference {
        /// The text as given.
        input: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A digest that cannot be parsed.
    #[error("invalid digest {input:?}: {reason}")]
    InvalidDigest {
        /// The text as given.
        input: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A configuration file (hosts.toml, docker config, CA file) that cannot be used.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Credentials could not be obtained (helper failed, malformed `auth` field).
    /// Never contains the secret itself.
    #[error("registry {registry}: credentials: {message}")]
    Credentials {
        /// The registry host the credentials were for.
        registry: String,
        /// What went wrong.
        message: String,
    },
    /// A request to a registry failed.
    #[error("registry {registry} repository {repository} {object}: {message}")]
    Remote {
        /// Registry host as the user named it (e.g. `docker.io`, `127.0.0.1:5000`).
        registry: String,
        /// Repository path (e.g. `library/ubuntu`).
        repository: String,
        /// What was being fetched: `manifest 22.04`, `blob sha256:…`.
        object: String,
        /// Classification.
        kind: ErrorKind,
        /// Details, e.g. `range 0-99: server answered 503 after 5 attempts`.
        message: String,
    },
    /// The API was used in a way that cannot work (e.g. a blocking read from inside
    /// the async runtime).
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidReference { .. } | Error::InvalidDigest { .. } | Error::Usage(_) => {
                ErrorKind::InvalidInput
            }
            Error::Config { .. } => ErrorKind::InvalidInput,
            Error::Credentials { .. } => ErrorKind::Unauthorized,
            Error::Remote { kind, .. } => *kind,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Names the object a request is about, to build [`Error::Remote`] values.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) registry: String,
    pub(crate) repository: String,
    pub(crate) object: String,
}

impl Target {
    pub(crate) fn error(&self, kind: ErrorKind, message: impl Into<String>) -> Error {
        Error::Remote {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            object: self.object.clone(),
            kind,
            message: message.into(),
        }
    }
}
