//! The layer applier: extracts a layer into a plain directory in overlayfs form, the
//! form overlayfs reads from a lower dir: `.wh.<name>` becomes a 0:0 character device
//! `<name>`, `.wh..wh..opq` becomes `trusted.overlay.opaque=y` on its directory, other
//! `.wh..wh.` names are dropped. Metadata (owner, mode with setuid/sticky, xattrs with
//! `security.capability`, nanosecond mtimes) is kept, holes stay holes, and nothing
//! outside the destination is created, changed or followed: every parent directory is
//! opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` and every entry is
//! created fresh (`O_EXCL`, no following) after any older entry of that name is gone.
//!
//! Two front-ends feed the same [`target::Target`]: [`apply_stream`] reads a blob
//! sequentially (decompression on its own thread), [`apply_layer`] takes metadata from
//! a lazy layer's TOC index and file bytes from its chunks, fetched in parallel.
//!
//! The result is what the FUSE view of the layer shows, and what containerd's
//! overlayfs unpack makes, except where they differ from each other: the root takes
//! the layer's `./` entry (or 0755 root, mtime 0), implicit parents are 0755 root
//! with mtime 0, a whiteout device keeps its entry's mode and mtime (containerd
//! makes it 0000 at the current time), and a hard link's own header metadata is
//! ignored (as GNU tar does). A leading `/` is dropped; `..`, a symlink among the
//! parents and a hard link whose target is missing or behind a symlink fail the
//! layer. An eStargz blob's `stargz.index.json` is a tar member and
//! [`apply_stream`] extracts it, as containerd does; GNU sparse entries are refused.

mod finish;
mod indexed;
mod names;
mod stream;
mod target;

use std::path::Path;

use crate::error::Result;
use crate::layer::RemoteLayer;

/// What an extraction did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ApplyStats {
    /// Entries read (tar entries or TOC names; PAX and GNU extension headers not
    /// counted).
    pub entries: u64,
    /// Regular files written (hard links not counted).
    pub files: u64,
    /// Bytes of regular-file content.
    pub bytes: u64,
    /// Whiteout devices and opaque markers made.
    pub whiteouts: u64,
}

/// Extracts a layer blob read sequentially — tar, tar+gzip (all members), tar+zstd
/// (all frames, skippable frames ignored), eStargz, eStargz-zstd, zstd:chunked (they are
/// all valid compressed tar streams) — into `dest`, an existing empty directory. On
/// error `dest` holds a partial tree the caller removes; nothing outside `dest` is ever
/// created, changed or followed.
pub fn apply_stream(blob: impl std::io::Read + Send, dest: &Path) -> Result<ApplyStats> {
    stream::apply(blob, dest)
}

/// Extracts a lazily readable layer from its TOC index: metadata from the index, file
/// contents through the [`RemoteLayer`] (chunks already cached are reused, missing ones
/// fetched in parallel ranges and decompressed on all cores). Same overlay form and
/// safety as [`apply_stream`].
pub fn apply_layer(layer: &RemoteLayer, dest: &Path) -> Result<ApplyStats> {
    indexed::apply(layer, dest)
}
