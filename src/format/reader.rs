//! Opening a lazy layer from any [`ReadAt`]: footer → TOC → digest check → index,
//! and reading verified file bytes through the chunks.

use std::io::Write;

use rayon::prelude::*;

use super::chunk;
use super::digest::Digest;
use super::footer::{self, Format, TocLocation};
use super::index::{Chunk, Index, NodeId};
use super::source::ReadAt;
use super::tarhdr::Kind;
use super::toc::{self, TocBytes};
use crate::error::{Error, IoContext, Result};

/// How to open a layer.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The TOC must hash to this (the `toc.digest` annotation or the zstd:chunked
    /// manifest checksum). Without it the TOC is trusted as found.
    pub toc_digest: Option<Digest>,
    /// Where the TOC is, if known from an annotation; saves reading the footer.
    pub toc_location: Option<TocLocation>,
    /// Serve chunks that have no digest at all (legacy stargz). Off by default.
    pub allow_unverified: bool,
}

/// An opened lazy layer.
pub struct Layer<R> {
    src: R,
    loc: TocLocation,
    toc: TocBytes,
    index: Index,
    allow_unverified: bool,
}

/// Result of checking every chunk of a layer.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    pub files: u64,
    pub chunks: u64,
    pub bytes: u64,
}

/// Finds the TOC location from the blob's footer.
pub fn locate(src: &dyn ReadAt) -> Result<TocLocation> {
    let size = src.size();
    let n = size.min(footer::MAX_FOOTER_SIZE);
    let tail = src
        .read_vec_at(size - n, n)
        .map_err(|e| Error::Footer(format!("reading the last {n} bytes: {e}")))?;
    footer::parse(&tail, size)
}

impl<R: ReadAt> Layer<R> {
    /// Reads and checks the footer and TOC, and builds the index.
    pub fn open(src: R, opts: &OpenOptions) -> Result<Self> {
        let loc = match opts.toc_location {
            Some(l) => l,
            None => locate(&src)?,
        };
        let (start, end) = loc.range();
        if end > src.size() || start >= end {
            return Err(Error::Toc(format!(
                "TOC range {start}..{end} does not fit a {}-byte blob",
                src.size()
            )));
        }
        let compressed = src
            .read_vec_at(start, end - start)
            .map_err(|e| Error::Toc(format!("reading TOC at {start}..{end}: {e}")))?;
        let toc = toc::read_toc(&loc, &compressed)?;
        if let Some(want) = &opts.toc_digest {
            toc.verify(want)?;
        }
        let parsed = toc::parse_json(&toc.json)?;
        let index = Index::build(&parsed, loc.data_end())?;
        Ok(Layer {
            src,
            loc,
            toc,
            index,
            allow_unverified: opts.allow_unverified,
        })
    }

    /// The blob's format.
    pub fn format(&self) -> Format {
        self.loc.format()
    }

    /// Where the TOC was found.
    pub fn toc_location(&self) -> &TocLocation {
        &self.loc
    }

    /// The TOC bytes and digests.
    pub fn toc(&self) -> &TocBytes {
        &self.toc
    }

    /// The index of files.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Takes the layer apart: blob, TOC location, TOC bytes and index.
    pub fn into_parts(self) -> (R, TocLocation, TocBytes, Index) {
        (self.src, self.loc, self.toc, self.index)
    }

    /// The underlying blob.
    pub fn source(&self) -> &R {
        &self.src
    }

    /// The digest a chunk must match (for a one-chunk file the index holds the
    /// file's digest there).
    fn expected(&self, c: &Chunk) -> Result<Option<Digest>> {
        if let Some(d) = c.digest {
            return Ok(Some(d));
        }
        if c.zeros || self.allow_unverified {
            return Ok(None);
        }
        Err(Error::Chunk {
            path: String::new(),
            offset: c.file_offset,
            reason: "chunk has no digest to verify against".into(),
        })
    }

    /// Fetches, decompresses and verifies chunk `i` of file `id`.
    pub fn read_chunk(&self, id: NodeId, i: usize, path: &str) -> Result<Vec<u8>> {
        let c = self
            .index
            .chunks(id)
            .get(i)
            .ok_or_else(|| Error::NotFound(format!("{path} chunk {i}")))?;
        let run = || -> Result<Vec<u8>> {
            let expected = self.expected(c)?;
            let compressed = if c.zeros {
                Vec::new()
            } else {
                self.src
                    .read_vec_at(c.compressed_offset, c.compressed_end - c.compressed_offset)
                    .ctx(|| {
                        format!(
                            "{path}: reading compressed bytes {}..{}",
                            c.compressed_offset, c.compressed_end
                        )
                    })?
            };
            let data = chunk::decompress(self.format().compression(), &compressed, c)?;
            if let Some(d) = expected {
                chunk::verify(&data, &d, c)?;
            }
            Ok(data)
        };
        run().map_err(|e| chunk::with_path(e, path))
    }

    /// Reads up to `buf.len()` bytes of file `id` at `offset`; returns bytes read.
    pub fn read_at(&self, id: NodeId, path: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = self.index.node(id).map_or(0, |n| n.size);
        let mut done = 0usize;
        let mut off = offset;
        while done < buf.len() && off < size {
            let i = self
                .index
                .chunk_at(id, off)
                .ok_or_else(|| Error::Toc(format!("{path}: no chunk covers offset {off}")))?;
            let c = &self.index.chunks(id)[i];
            let data = self.read_chunk(id, i, path)?;
            let skip = (off - c.file_offset) as usize;
            let n = (data.len() - skip).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[skip..skip + n]);
            done += n;
            off += n as u64;
        }
        Ok(done)
    }

    /// Writes the whole (verified) content of file `id` to `w`.
    pub fn copy_file(&self, id: NodeId, path: &str, w: &mut dyn Write) -> Result<()> {
        for i in 0..self.index.chunks(id).len() {
            let data = self.read_chunk(id, i, path)?;
            w.write_all(&data)
                .ctx(|| format!("{path}: writing output"))?;
        }
        Ok(())
    }

    /// Reads every chunk of every file, in parallel, and checks each digest.
    pub fn verify_all(&self) -> Result<VerifyReport>
    where
        R: Sync,
    {
        let files: Vec<(String, NodeId)> = self
            .index
            .walk()
            .into_iter()
            .filter(|(_, id)| self.index.node(*id).is_some_and(|n| n.kind == Kind::Reg))
            .collect();
        let mut seen = std::collections::HashSet::new();
        let work: Vec<(&str, NodeId, usize)> = files
            .iter()
            .filter(|(_, id)| seen.insert(*id))
            .flat_map(|(p, id)| {
                (0..self.index.chunks(*id).len()).map(move |i| (p.as_str(), *id, i))
            })
            .collect();
        let bytes: u64 = work
            .par_iter()
            .map(|&(p, id, i)| self.read_chunk(id, i, p).map(|d| d.len() as u64))
            .try_reduce(|| 0, |a, b| Ok(a + b))?;
        Ok(VerifyReport {
            files: seen.len() as u64,
            chunks: work.len() as u64,
            bytes,
        })
    }
}
