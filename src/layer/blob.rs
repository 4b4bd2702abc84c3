//! Where a layer's compressed bytes come from: a registry blob or a local file.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::format::{FileSource, ReadAt};

/// A blob read by ranges. Reads block the calling thread (FUSE workers, prefetch
/// and background threads call them), so async clients adapt with a runtime handle.
pub trait RemoteBlob: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Names the blob in errors and logs (registry, repository, digest or path).
    fn name(&self) -> &str;
    /// Reads several ranges, in one request where the source supports it.
    fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>>;

    /// Reads one range.
    fn read_range(&self, range: Range<u64>) -> Result<Bytes> {
        let (start, end) = (range.start, range.end);
        self.read_ranges(std::slice::from_ref(&range))?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Fetch {
                blob: self.name().to_string(),
                reason: format!("range {start}..{end}: no data"),
            })
    }
}

impl ReadAt for dyn RemoteBlob {
    fn size(&self) -> u64 {
        RemoteBlob::size(self)
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        let got = self
            .read_range(offset..end)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if got.len() != buf.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "short read",
            ));
        }
        buf.copy_from_slice(&got);
        Ok(())
    }
}

/// A blob in a local file (`lazysnap mount FILE`, tests, benchmarks).
pub struct FileBlob {
    src: FileSource,
    name: String,
}

impl FileBlob {
    /// Opens a blob file.
    pub fn open(path: &std::path::Path) -> Result<Arc<Self>> {
        let f = std::fs::File::open(path)
            .map_err(|e| Error::io(format!("{}: cannot open", path.display()), e))?;
        Ok(Arc::new(FileBlob {
            src: FileSource::new(f)
                .map_err(|e| Error::io(format!("{}: cannot stat", path.display()), e))?,
            name: path.display().to_string(),
        }))
    }
}

impl RemoteBlob for FileBlob {
    fn size(&self) -> u64 {
        self.src.size()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        ranges
            .iter()
            .map(|r| {
                self.src
                    .read_vec_at(r.start, r.end.saturating_sub(r.start))
                    .map(Bytes::from)
                    .map_err(|e| Error::Fetch {
                        blob: self.name.clone(),
                        reason: format!("range {}..{}: {e}", r.start, r.end),
                    })
            })
            .collect()
    }
}

/// A blob in a registry, read through `lazysnap-registry` (retries, mirrors,
/// multi-range requests) from plain threads.
pub struct RegistryBlob {
    blob: lazysnap_registry::Blob,
    handle: tokio::runtime::Handle,
    name: String,
}

impl RegistryBlob {
    /// Wraps a registry blob; `handle` is the multi-thread runtime that drives its I/O.
    pub fn new(blob: lazysnap_registry::Blob, handle: tokio::runtime::Handle) -> Arc<Self> {
        let name = format!(
            "{}/{}@{}",
            blob.registry(),
            blob.repository(),
            blob.digest()
        );
        Arc::new(RegistryBlob { blob, handle, name })
    }

    /// The registry handle (counters).
    pub fn inner(&self) -> &lazysnap_registry::Blob {
        &self.blob
    }
}

impl RemoteBlob for RegistryBlob {
    fn size(&self) -> u64 {
        self.blob.size()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.blob
            .read_ranges_blocking(&self.handle, ranges)
            .map_err(|e| Error::Fetch {
                blob: self.name.clone(),
                reason: e.to_string(),
            })
    }
}
