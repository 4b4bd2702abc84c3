//! Decompressing and verifying one chunk. A chunk whose bytes do not hash to the
//! TOC's digest is an error, never data.

use std::io::Read;

use super::digest::Digest;
use super::footer::Compression;
use super::index::Chunk;
use crate::error::{Error, Result};

/// Largest chunk we will hold in memory; a TOC claiming more is refused rather
/// than allowed to exhaust memory.
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;

/// Decompresses `compressed` (the bytes of `chunk.compressed_offset..compressed_end`)
/// and returns exactly the chunk's bytes, not yet verified.
pub fn decompress(compression: Compression, compressed: &[u8], chunk: &Chunk) -> Result<Vec<u8>> {
    let fail = |reason: String| Error::Chunk {
        path: String::new(),
        offset: chunk.file_offset,
        reason,
    };
    if chunk.size > MAX_CHUNK_SIZE {
        return Err(fail(format!(
            "chunk of {} bytes exceeds the limit of {MAX_CHUNK_SIZE}",
            chunk.size
        )));
    }
    if chunk.zeros {
        return Ok(vec![0u8; chunk.size as usize]);
    }
    let want = chunk
        .inner_offset
        .checked_add(chunk.size)
        .ok_or_else(|| fail("chunk range overflows".into()))?;
    let mut out = match compression {
        Compression::Gzip => gunzip(compressed, want).map_err(fail)?,
        Compression::Zstd => {
            let mut out = Vec::with_capacity(want as usize);
            zstd::stream::read::Decoder::with_buffer(compressed)
                .map_err(|e| fail(format!("zstd: {e}")))?
                .take(want)
                .read_to_end(&mut out)
                .map_err(|e| fail(format!("zstd frame does not decompress: {e}")))?;
            out
        }
    };
    if (out.len() as u64) < want {
        return Err(fail(format!(
            "frame holds {} bytes, the chunk needs {want}",
            out.len()
        )));
    }
    out.truncate(want as usize);
    out.drain(..chunk.inner_offset as usize);
    Ok(out)
}

/// Inflates a gzip member. When the member's ISIZE trailer shows it is little more
/// than the chunk, libdeflate decodes it in one call (about 1.6x zlib-rs); otherwise
/// a stream decoder stops after the bytes needed.
fn gunzip(compressed: &[u8], want: u64) -> std::result::Result<Vec<u8>, String> {
    if compressed.len() >= 18 {
        let t = &compressed[compressed.len() - 4..];
        let isize = u32::from_le_bytes([t[0], t[1], t[2], t[3]]) as u64;
        if isize >= want && isize <= want + (1 << 20) {
            let mut out = vec![0u8; isize as usize];
            let mut d = libdeflater::Decompressor::new();
            if let Ok(n) = d.gzip_decompress(compressed, &mut out)
                && n as u64 == isize
            {
                return Ok(out);
            }
        }
    }
    let mut out = Vec::with_capacity(want.min(MAX_CHUNK_SIZE) as usize);
    flate2::read::MultiGzDecoder::new(compressed)
        .take(want)
        .read_to_end(&mut out)
        .map_err(|e| format!("gzip member does not decompress: {e}"))?;
    Ok(out)
}

/// Checks chunk bytes against `expected`.
pub fn verify(data: &[u8], expected: &Digest, chunk: &Chunk) -> Result<()> {
    let actual = Digest::of(data);
    if actual != *expected {
        return Err(Error::ChunkDigest {
            path: String::new(),
            offset: chunk.file_offset,
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// Names the file in a chunk error.
pub fn with_path(e: Error, path: &str) -> Error {
    match e {
        Error::Chunk { offset, reason, .. } => Error::Chunk {
            path: path.to_string(),
            offset,
            reason,
        },
        Error::ChunkDigest {
            offset,
            expected,
            actual,
            ..
        } => Error::ChunkDigest {
            path: path.to_string(),
            offset,
            expected,
            actual,
        },
        e => e,
    }
}
