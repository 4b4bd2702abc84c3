//! lazysnap: a containerd snapshotter that mounts eStargz and zstd:chunked layers
//! lazily through FUSE and fetches each chunk from the registry when it is first read.

pub mod error;
pub mod format;

pub use error::{Error, Result};
pub mod cache;
pub mod convert;
pub mod layer;
pub mod service;
pub mod snapshot;
