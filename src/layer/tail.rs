//! Opening a layer costs two reads (footer, then TOC). Reading a generous tail
//! once usually covers both, saving a round trip per layer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::blob::RemoteBlob;
use crate::format::ReadAt;

/// How much of a blob's end to read when opening it.
pub const TAIL_BYTES: u64 = 512 << 10;

/// A blob whose last bytes are held in memory.
pub struct TailCached {
    blob: Arc<dyn RemoteBlob>,
    tail_start: u64,
    tail: Bytes,
    fetched: AtomicU64,
    requests: AtomicU64,
}

impl TailCached {
    /// Reads the tail.
    pub fn new(blob: Arc<dyn RemoteBlob>) -> crate::error::Result<Self> {
        let size = blob.size();
        let start = size.saturating_sub(TAIL_BYTES);
        let tail = blob.read_range(start..size)?;
        Ok(TailCached {
            fetched: AtomicU64::new(tail.len() as u64),
            requests: AtomicU64::new(1),
            blob,
            tail_start: start,
            tail,
        })
    }

    /// The tail read at open: its blob offset and bytes.
    pub fn tail(&self) -> (u64, Bytes) {
        (self.tail_start, self.tail.clone())
    }

    /// Bytes and requests spent so far (the tail and any reads outside it).
    pub fn spent(&self) -> (u64, u64) {
        (
            self.fetched.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }
}

impl ReadAt for TailCached {
    fn size(&self) -> u64 {
        self.blob.size()
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset >= self.tail_start {
            let from = (offset - self.tail_start) as usize;
            if let Some(src) = self.tail.get(from..from + buf.len()) {
                buf.copy_from_slice(src);
                return Ok(());
            }
        }
        self.fetched.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        ReadAt::read_exact_at(&*self.blob, offset, buf)
    }
}
