//! Opening a layer costs two reads (footer, then TOC). Reading a generous tail
//! once usually covers both, saving a round trip per layer.

use std::sync::Arc;

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
}

impl TailCached {
    /// Reads the tail.
    pub fn new(blob: Arc<dyn RemoteBlob>) -> crate::error::Result<Self> {
        let size = blob.size();
        let start = size.saturating_sub(TAIL_BYTES);
        let tail = blob.read_range(start..size)?;
        Ok(TailCached {
            blob,
            tail_start: start,
            tail,
        })
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
        ReadAt::read_exact_at(&*self.blob, offset, buf)
    }
}
