//! The bytes of eStargz and zstd:chunked: footers, TOCs, chunks, verification, and
//! a writer. Pure and synchronous; all input comes through [`ReadAt`] or `Read`.

pub mod chunk;
pub mod digest;
pub mod footer;
pub mod index;
pub mod input;
pub mod reader;
pub mod source;
pub mod tarhdr;
pub mod time;
pub mod toc;
pub mod writer;

pub use digest::Digest;
pub use footer::{Compression, Format, TocLocation};
pub use index::{Chunk, Index, NodeId, ROOT};
pub use reader::{Layer, OpenOptions};
pub use source::{FileSource, ReadAt};
pub use tarhdr::Kind;

/// Largest uncompressed TOC accepted (a 100,000-entry TOC is about 30 MiB).
pub const MAX_TOC_SIZE: u64 = 256 << 20;

/// Layer descriptor annotation holding the eStargz TOC digest.
pub const ANNOTATION_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer descriptor annotation with the uncompressed layer size.
pub const ANNOTATION_UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
/// zstd:chunked manifest checksum (sha256 of the compressed TOC).
pub const ANNOTATION_ZSTD_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
/// zstd:chunked TOC position, `offset:compressed:uncompressed:1`.
pub const ANNOTATION_ZSTD_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
/// zstd:chunked tar-split position, `offset:compressed:uncompressed`.
pub const ANNOTATION_ZSTD_TARSPLIT: &str = "io.github.containers.zstd-chunked.tarsplit-position";
/// The pre-2023 spellings, still written by stargz and older containers/storage.
pub const ANNOTATION_ZSTD_CHECKSUM_OLD: &str = "io.containers.zstd-chunked.manifest-checksum";
pub const ANNOTATION_ZSTD_POSITION_OLD: &str = "io.containers.zstd-chunked.manifest-position";
