//! Writing lazy layers: a tar becomes eStargz (gzip), eStargz-zstd or zstd:chunked.
//!
//! The output is planned first as a list of frames (byte ranges of the input plus a
//! few bytes lazysnap adds). Frames are independent gzip members or zstd frames, so
//! they are compressed in parallel and written in order: the blob is byte-identical
//! for any thread count.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use base64::Engine as _;
use rayon::prelude::*;
use serde::Serialize;

use super::digest::{Digest, Hasher};
use super::footer::{self, Format, TarSplitLocation};
use super::index::clean_path;
use super::source::ReadAt;
use super::tarhdr::{self, Kind, Meta};
use super::time;
use super::toc::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, Toc, TocEntry};
use super::{
    ANNOTATION_TOC_DIGEST, ANNOTATION_UNCOMPRESSED_SIZE, ANNOTATION_ZSTD_CHECKSUM,
    ANNOTATION_ZSTD_CHECKSUM_OLD, ANNOTATION_ZSTD_POSITION, ANNOTATION_ZSTD_POSITION_OLD,
    ANNOTATION_ZSTD_TARSPLIT,
};
use crate::error::{Error, IoContext, Result};

/// Default chunk size: 4 MiB, as stargz writes.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Uncompressed bytes gathered before a parallel compression round.
const BATCH_BYTES: u64 = 32 << 20;
const LANDMARK_CONTENT: [u8; 1] = [0x0f];

/// How to write a layer.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Output format; [`Format::LegacyStargz`] is read-only and refused here.
    pub format: Format,
    /// Split regular files into chunks of this many bytes.
    pub chunk_size: u64,
    /// Compression level; `None` for the format's default (gzip 9, zstd 3).
    pub level: Option<i32>,
    /// Paths to put first, in this order, followed by `.prefetch.landmark`.
    pub prioritized: Vec<String>,
    /// Compression threads; `None` uses every core.
    pub threads: Option<usize>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            format: Format::Estargz,
            chunk_size: DEFAULT_CHUNK_SIZE,
            level: None,
            prioritized: Vec::new(),
            threads: None,
        }
    }
}

/// What a conversion produced.
#[derive(Debug, Clone, Serialize)]
pub struct WriteResult {
    pub format: &'static str,
    pub media_type: &'static str,
    pub blob_digest: String,
    pub blob_size: u64,
    pub toc_digest: String,
    pub diff_id: String,
    pub uncompressed_size: u64,
    pub entries: usize,
    pub annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_prioritized: Vec<String>,
}

/// One piece of a frame's uncompressed bytes.
#[derive(Debug, Clone)]
enum Piece {
    /// A range of the input tar.
    Src(u64, u64),
    /// Bytes lazysnap writes itself (landmarks, end of archive).
    Lit(Vec<u8>),
}

#[derive(Debug, Default)]
struct Frame {
    pieces: Vec<Piece>,
    len: u64,
    /// Length of the chunk payload at the frame start, when the frame starts one.
    chunk: Option<ChunkRef>,
}

#[derive(Debug, Clone, Copy)]
struct ChunkRef {
    item: usize,
    len: u64,
}

/// An entry of the output in order.
struct Item {
    meta: Meta,
    header: Piece,
    /// Frames holding this file's chunks, in order.
    chunk_frames: Vec<usize>,
    /// The tar padding after this entry's payload.
    pad: Piece,
    file_digest: Option<Hasher>,
    /// tar-split's CRC-64 state over the payload.
    crc: u64,
}

struct Plan {
    frames: Vec<Frame>,
    items: Vec<Item>,
}

impl Plan {
    fn push(&mut self, p: Piece) {
        let len = match &p {
            Piece::Src(a, b) => b - a,
            Piece::Lit(v) => v.len() as u64,
        };
        if len == 0 {
            return;
        }
        if self.frames.is_empty() {
            self.frames.push(Frame::default());
        }
        if let Some(f) = self.frames.last_mut() {
            f.len += len;
            f.pieces.push(p);
        }
    }

    fn new_frame(&mut self) -> usize {
        if self
            .frames
            .last()
            .is_some_and(|f| f.len == 0 && f.chunk.is_none())
        {
            return self.frames.len() - 1;
        }
        self.frames.push(Frame::default());
        self.frames.len() - 1
    }
}

fn landmark(name: &str) -> Result<(Meta, Piece, Piece)> {
    let h = tarhdr::ustar_header(name, 0o644, 1)?;
    let mut pad = vec![0u8; 511];
    pad.shrink_to_fit();
    Ok((
        Meta {
            name: name.to_string(),
            kind: Some(Kind::Reg),
            mode: 0o644,
            size: 1,
            ..Meta::default()
        },
        Piece::Lit(h.to_vec()),
        Piece::Lit(pad),
    ))
}

/// Orders entries: prioritized files (with their parents and hard-link targets)
/// first, then the rest in tar order. Returns the order and the missing paths.
fn order(entries: &[tarhdr::Entry], prioritized: &[String]) -> Result<(Vec<usize>, Vec<String>)> {
    let mut by_path: HashMap<String, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        by_path.insert(clean_path(&e.meta.name)?.join("/"), i);
    }
    let mut moved = vec![false; entries.len()];
    let mut out = Vec::with_capacity(entries.len());
    let mut missing = Vec::new();
    fn move_rec(
        i: usize,
        entries: &[tarhdr::Entry],
        by_path: &HashMap<String, usize>,
        moved: &mut [bool],
        out: &mut Vec<usize>,
        depth: usize,
    ) -> Result<()> {
        if moved[i] || depth > 64 {
            return Ok(());
        }
        moved[i] = true;
        let comps = clean_path(&entries[i].meta.name)?;
        for n in 1..comps.len() {
            if let Some(&p) = by_path.get(&comps[..n].join("/")) {
                move_rec(p, entries, by_path, moved, out, depth + 1)?;
            }
        }
        if entries[i].meta.kind == Some(Kind::Hardlink)
            && let Some(&t) = by_path.get(&clean_path(&entries[i].meta.link_name)?.join("/"))
        {
            move_rec(t, entries, by_path, moved, out, depth + 1)?;
        }
        out.push(i);
        Ok(())
    }
    for p in prioritized {
        let key = clean_path(p)?.join("/");
        match by_path.get(&key) {
            Some(&i) => move_rec(i, entries, &by_path, &mut moved, &mut out, 0)?,
            None => missing.push(p.clone()),
        }
    }
    let prio = out.len();
    out.extend((0..entries.len()).filter(|&i| !moved[i]));
    out.truncate(entries.len());
    // usize::MAX marks where the landmark goes
    out.insert(prio, usize::MAX);
    Ok((out, missing))
}

fn plan(src: &dyn ReadAt, opts: &WriteOptions) -> Result<(Plan, Vec<String>, u64)> {
    let scan = tarhdr::scan(src)?;
    let is_ours = |m: &Meta| -> Result<bool> {
        let c = clean_path(&m.name)?;
        Ok(c.len() == 1 && [TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK].contains(&c[0]))
    };
    let mut entries = Vec::with_capacity(scan.entries.len());
    for e in scan.entries {
        if !is_ours(&e.meta)? {
            if e.meta.kind == Some(Kind::Hardlink) {
                clean_path(&e.meta.link_name)?;
            }
            entries.push(e);
        }
    }
    let (ord, missing) = order(&entries, &opts.prioritized)?;
    let zstd_chunked = opts.format == Format::ZstdChunked;
    let has_prio = ord.first() != Some(&usize::MAX);
    let mut plan = Plan {
        frames: vec![Frame::default()],
        items: Vec::with_capacity(entries.len() + 1),
    };
    let mut pending_pad: Option<Piece> = None;
    for i in ord {
        let (meta, header, data, pad) = if i == usize::MAX {
            // zstd:chunked gets a landmark only when files were prioritized: its
            // consumers (podman, CRI-O) would otherwise see a stray file.
            if zstd_chunked && !has_prio {
                continue;
            }
            let name = if has_prio {
                PREFETCH_LANDMARK
            } else {
                NO_PREFETCH_LANDMARK
            };
            let (m, h, pad) = landmark(name)?;
            (m, h, Some(Piece::Lit(LANDMARK_CONTENT.to_vec())), pad)
        } else {
            let e = &entries[i];
            let data_end = e.data_start + e.meta.size;
            let data = (e.meta.kind == Some(Kind::Reg) && e.meta.size > 0)
                .then_some(Piece::Src(e.data_start, data_end));
            let pad = Piece::Src(if data.is_some() { data_end } else { e.end }, e.end);
            (
                e.meta.clone(),
                Piece::Src(e.header_start, e.data_start),
                data,
                pad,
            )
        };
        if let Some(p) = pending_pad.take() {
            plan.push(p);
        }
        let item = plan.items.len();
        plan.push(header.clone());
        let mut chunk_frames = Vec::new();
        if let Some(data) = data {
            let pieces: Vec<Piece> = match data {
                Piece::Src(a, b) => {
                    let step = opts.chunk_size.max(1);
                    (0..(b - a).div_ceil(step))
                        .map(|k| Piece::Src(a + k * step, (a + (k + 1) * step).min(b)))
                        .collect()
                }
                lit => vec![lit],
            };
            for p in pieces {
                let len = match &p {
                    Piece::Src(a, b) => b - a,
                    Piece::Lit(v) => v.len() as u64,
                };
                let f = plan.new_frame();
                plan.frames[f].chunk = Some(ChunkRef { item, len });
                plan.push(p);
                chunk_frames.push(f);
            }
            if zstd_chunked {
                plan.new_frame();
            }
        }
        pending_pad = Some(pad.clone());
        plan.items.push(Item {
            // a one-chunk file's digest is its chunk's, computed in parallel
            file_digest: (chunk_frames.len() > 1).then(Hasher::new),
            meta,
            header,
            chunk_frames,
            pad,
            crc: !0,
        });
    }
    if let Some(p) = pending_pad.take() {
        plan.push(p);
    }
    Ok((plan, missing, scan.end))
}

thread_local! {
    /// One compressor per thread and level: creating a zstd context or a libdeflate
    /// compressor per frame costs more than compressing a small file.
    static GZ: std::cell::RefCell<Option<(i32, libdeflater::Compressor)>> = const { std::cell::RefCell::new(None) };
    static ZS: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
}

fn compress(format: Format, level: i32, data: &[u8]) -> Result<Vec<u8>> {
    match format.compression() {
        super::Compression::Gzip => GZ.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                let lvl = libdeflater::CompressionLvl::new(level).map_err(|_| {
                    Error::InvalidArgument(format!("gzip level {level} (expected 1..=12)"))
                })?;
                *slot = Some((level, libdeflater::Compressor::new(lvl)));
            }
            let Some((_, c)) = slot.as_mut() else {
                return Err(Error::InvalidArgument("gzip compressor".into()));
            };
            let mut out = vec![0u8; c.gzip_compress_bound(data.len())];
            let n = c
                .gzip_compress(data, &mut out)
                .map_err(|e| Error::InvalidArgument(format!("gzip: {e:?}")))?;
            out.truncate(n);
            Ok(out)
        }),
        super::Compression::Zstd => ZS.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                let c = zstd::bulk::Compressor::new(level)
                    .map_err(|e| Error::InvalidArgument(format!("zstd level {level}: {e}")))?;
                *slot = Some((level, c));
            }
            let Some((_, c)) = slot.as_mut() else {
                return Err(Error::InvalidArgument("zstd compressor".into()));
            };
            c.compress(data)
                .map_err(|e| Error::InvalidArgument(format!("zstd level {level}: {e}")))
        }),
    }
}

/// Counts and hashes what goes to the output.
struct Out<'a> {
    w: &'a mut dyn Write,
    n: u64,
    hash: Hasher,
}

impl Out<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.w
            .write_all(b)
            .ctx(|| "writing the output blob".into())?;
        self.hash.update(b);
        self.n += b.len() as u64;
        Ok(())
    }
}

/// Go's `hash/crc64` with the ISO table, as tar-split checksums payloads. Start
/// with `!0`, feed every piece, and invert the result. Slicing-by-8 keeps it off the
/// conversion's critical path.
fn crc64_update(mut crc: u64, data: &[u8]) -> u64 {
    static TABLES: std::sync::OnceLock<[[u64; 256]; 8]> = std::sync::OnceLock::new();
    let t = TABLES.get_or_init(|| {
        let mut t = [[0u64; 256]; 8];
        for (i, v) in t[0].iter_mut().enumerate() {
            let mut crc = i as u64;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xD800_0000_0000_0000
                } else {
                    crc >> 1
                };
            }
            *v = crc;
        }
        for k in 1..8 {
            let (done, rest) = t.split_at_mut(k);
            for (i, v) in rest[0].iter_mut().enumerate() {
                let prev = done[k - 1][i];
                *v = done[0][(prev & 0xff) as usize] ^ (prev >> 8);
            }
        }
        t
    });
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = crc ^ u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        crc = t[7][(v & 0xff) as usize]
            ^ t[6][((v >> 8) & 0xff) as usize]
            ^ t[5][((v >> 16) & 0xff) as usize]
            ^ t[4][((v >> 24) & 0xff) as usize]
            ^ t[3][((v >> 32) & 0xff) as usize]
            ^ t[2][((v >> 40) & 0xff) as usize]
            ^ t[1][((v >> 48) & 0xff) as usize]
            ^ t[0][(v >> 56) as usize];
    }
    for &b in chunks.remainder() {
        crc = t[0][((crc as u8) ^ b) as usize] ^ (crc >> 8);
    }
    crc
}

#[derive(Serialize)]
struct TarSplitEntry<'a> {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    payload: Option<String>,
    position: usize,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Builds containers/storage's tar-split: the raw header bytes and each file's
/// size and CRC-64, so the exact tar stream can be rebuilt from the TOC's files.
struct TarSplit {
    lines: Vec<u8>,
    pos: usize,
    pending: Vec<u8>,
}

impl TarSplit {
    fn segment(&mut self, bytes: &[u8]) -> Result<()> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        self.line(&TarSplitEntry {
            kind: 2,
            name: "",
            size: 0,
            payload: Some(b64),
            position: self.pos,
        })
    }
    fn line(&mut self, e: &TarSplitEntry<'_>) -> Result<()> {
        serde_json::to_writer(&mut self.lines, e)
            .map_err(|e| Error::InvalidArgument(format!("tar-split: {e}")))?;
        self.lines.push(b'\n');
        self.pos += 1;
        Ok(())
    }
}

fn read_piece(src: &dyn ReadAt, p: &Piece, out: &mut Vec<u8>) -> Result<()> {
    match p {
        Piece::Src(a, b) => {
            let start = out.len();
            out.resize(start + (b - a) as usize, 0);
            src.read_exact_at(*a, &mut out[start..])
                .map_err(|e| Error::Tar(format!("reading input at {a}..{b}: {e}")))
        }
        Piece::Lit(v) => {
            out.extend_from_slice(v);
            Ok(())
        }
    }
}

/// Converts the uncompressed tar `src` into a lazy layer written to `out`.
pub fn write_layer(
    src: &dyn ReadAt,
    out: &mut dyn Write,
    opts: &WriteOptions,
) -> Result<WriteResult> {
    if opts.format == Format::LegacyStargz {
        return Err(Error::InvalidArgument(
            "legacy stargz is read-only; write estargz instead".into(),
        ));
    }
    if opts.chunk_size == 0 {
        return Err(Error::InvalidArgument("chunk size must be positive".into()));
    }
    let gzip = opts.format.compression() == super::Compression::Gzip;
    let level = opts.level.unwrap_or(if gzip { 9 } else { 3 });
    compress(opts.format, level, b"")?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::InvalidArgument(format!("threads: {e}")))?;

    let (mut plan, missing, tar_end) = plan(src, opts)?;
    // End of archive: for gzip it follows the TOC entry in the TOC member; for zstd
    // it closes the data frames, with whatever trailed the input's entries.
    let mut trailer = vec![Piece::Src(tar_end, src.size())];
    if src.size() - tar_end < 1024 {
        trailer.push(Piece::Lit(vec![
            0u8;
            1024 - (src.size() - tar_end) as usize
        ]));
    }
    if !gzip {
        plan.new_frame();
        for p in &trailer {
            plan.push(p.clone());
        }
    }

    let mut out = Out {
        w: out,
        n: 0,
        hash: Hasher::new(),
    };
    let mut diff = Hasher::new();
    let mut offsets = Vec::with_capacity(plan.frames.len() + 1);
    let mut chunk_digests: HashMap<usize, Digest> = HashMap::new();
    let mut uncompressed = 0u64;

    let mut i = 0;
    while i < plan.frames.len() {
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        while i < plan.frames.len() && (batch.is_empty() || bytes < BATCH_BYTES) {
            let f = &plan.frames[i];
            let mut data = Vec::with_capacity(f.len as usize);
            for p in &f.pieces {
                read_piece(src, p, &mut data)?;
            }
            if let Some(c) = f.chunk {
                let item = &mut plan.items[c.item];
                if let Some(h) = item.file_digest.as_mut() {
                    h.update(&data[..c.len as usize]);
                }
                if opts.format == Format::ZstdChunked {
                    item.crc = crc64_update(item.crc, &data[..c.len as usize]);
                }
            }
            diff.update(&data);
            bytes += f.len;
            batch.push((i, data));
            i += 1;
        }
        let frames = &plan.frames;
        let done: Vec<(usize, Vec<u8>, Option<Digest>)> = pool.install(|| {
            batch
                .into_par_iter()
                .map(|(i, data)| {
                    let d = frames[i].chunk.map(|c| Digest::of(&data[..c.len as usize]));
                    compress(opts.format, level, &data).map(|z| (i, z, d))
                })
                .collect::<Result<_>>()
        })?;
        for (i, z, d) in done {
            offsets.push(out.n);
            if let Some(d) = d {
                chunk_digests.insert(i, d);
            }
            uncompressed += plan.frames[i].len;
            if plan.frames[i].len > 0 {
                out.put(&z)?;
            }
        }
    }
    offsets.push(out.n);
    let data_end = out.n;

    // The TOC, in the writer's order.
    let mut toc = Toc {
        version: 1,
        ..Toc::default()
    };
    let mut last_user: HashMap<i64, String> = HashMap::new();
    let mut last_group: HashMap<i64, String> = HashMap::new();
    let mut split = TarSplit {
        lines: Vec::new(),
        pos: 0,
        pending: Vec::new(),
    };
    for item in &mut plan.items {
        let m = &item.meta;
        let kind = m.kind.unwrap_or(Kind::Reg);
        let mut e = TocEntry {
            name: m.name.clone(),
            kind: kind.toc_name().to_string(),
            size: if kind == Kind::Reg { m.size as i64 } else { 0 },
            modtime: time::format(m.mtime.secs, if gzip { 0 } else { m.mtime.nanos }),
            link_name: if matches!(kind, Kind::Symlink | Kind::Hardlink) {
                m.link_name.clone()
            } else {
                String::new()
            },
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            dev_major: m.dev_major,
            dev_minor: m.dev_minor,
            xattrs: m
                .xattrs
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        base64::engine::general_purpose::STANDARD.encode(v),
                    )
                })
                .collect(),
            ..TocEntry::default()
        };
        // a zero mtime is left out, as stargz's writer does, in every format
        if m.mtime.secs == 0 && m.mtime.nanos == 0 {
            e.modtime.clear();
        }
        if opts.format == Format::ZstdChunked {
            e.access_time = m
                .atime
                .map_or(String::new(), |t| time::format(t.secs, t.nanos));
            e.change_time = m
                .ctime
                .map_or(String::new(), |t| time::format(t.secs, t.nanos));
        } else {
            if last_user.get(&m.uid) != Some(&m.uname) {
                e.user_name = m.uname.clone();
                last_user.insert(m.uid, m.uname.clone());
            }
            if last_group.get(&m.gid) != Some(&m.gname) {
                e.group_name = m.gname.clone();
                last_group.insert(m.gid, m.gname.clone());
            }
        }
        match (item.file_digest.take(), item.chunk_frames.as_slice()) {
            (Some(h), _) => e.digest = h.finish().to_string(),
            (None, [f]) => {
                e.digest = chunk_digests
                    .get(f)
                    .map(|d| d.to_string())
                    .unwrap_or_default()
            }
            _ => {}
        }
        // tar-split: the raw header (after the previous entry's padding), then the file
        if opts.format == Format::ZstdChunked {
            let mut seg = std::mem::take(&mut split.pending);
            read_piece(src, &item.header, &mut seg)?;
            split.segment(&seg)?;
            let crc = (kind == Kind::Reg && m.size > 0).then(|| {
                base64::engine::general_purpose::STANDARD.encode((!item.crc).to_be_bytes())
            });
            let pos = split.pos;
            split.line(&TarSplitEntry {
                kind: 1,
                name: &m.name,
                size: if kind == Kind::Reg { m.size } else { 0 },
                payload: crc,
                position: pos,
            })?;
            read_piece(src, &item.pad, &mut split.pending)?;
        }
        let n = item.chunk_frames.len();
        let chunk_entry = |k: usize, e: &mut TocEntry| {
            let f = item.chunk_frames[k];
            let c = plan.frames[f].chunk.map_or(0, |c| c.len);
            e.offset = offsets[f] as i64;
            e.chunk_offset = (k as u64 * opts.chunk_size) as i64;
            let d = chunk_digests
                .get(&f)
                .map(|d| d.to_string())
                .unwrap_or_default();
            match opts.format {
                Format::ZstdChunked => {
                    if n > 1 {
                        e.chunk_size = c as i64;
                        e.chunk_digest = d;
                    }
                }
                _ => {
                    if k + 1 < n {
                        e.chunk_size = c as i64;
                    }
                    e.chunk_digest = d;
                }
            }
        };
        if n > 0 {
            chunk_entry(0, &mut e);
            if opts.format == Format::ZstdChunked {
                e.end_offset = offsets[item.chunk_frames[n - 1] + 1] as i64;
            }
        }
        toc.entries.push(e);
        for k in 1..n {
            let mut c = TocEntry {
                name: m.name.clone(),
                kind: "chunk".into(),
                ..TocEntry::default()
            };
            chunk_entry(k, &mut c);
            toc.entries.push(c);
        }
    }

    let mut annotations = BTreeMap::new();
    let toc_digest;
    let mut total_uncompressed = uncompressed;
    if gzip {
        let mut json = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
        let mut ser = serde_json::Serializer::with_formatter(&mut json, fmt);
        toc.serialize(&mut ser)
            .map_err(|e| Error::Toc(format!("encoding: {e}")))?;
        toc_digest = Digest::of(&json);
        let mut member = tarhdr::ustar_header(TOC_TAR_NAME, 0o644, json.len() as u64)?.to_vec();
        member.extend_from_slice(&json);
        member.resize(member.len().div_ceil(512) * 512 + 1024, 0);
        diff.update(&member);
        total_uncompressed += member.len() as u64;
        let z = compress(opts.format, level, &member)?;
        out.put(&z)?;
        out.put(&footer::estargz_footer(data_end))?;
        annotations.insert(ANNOTATION_TOC_DIGEST.to_string(), toc_digest.to_string());
    } else {
        if opts.format == Format::ZstdChunked {
            // the input's trailing padding and end-of-archive close the tar-split
            let mut seg = std::mem::take(&mut split.pending);
            for p in &trailer {
                read_piece(src, p, &mut seg)?;
            }
            split.segment(&seg)?;
            split.segment(&[])?;
            let zs = zstd::bulk::compress(&split.lines, level)
                .map_err(|e| Error::InvalidArgument(format!("zstd: {e}")))?;
            toc.tar_split_digest = Digest::of(&zs).to_string();
            let json =
                serde_json::to_vec(&toc).map_err(|e| Error::Toc(format!("encoding: {e}")))?;
            let ztoc = zstd::bulk::compress(&json, level)
                .map_err(|e| Error::InvalidArgument(format!("zstd: {e}")))?;
            // for zstd:chunked the TOC digest is the manifest checksum: the sha256 of
            // the compressed TOC, what containers/storage verifies
            toc_digest = Digest::of(&ztoc);
            let toc_off = out.n + 8;
            out.put(&footer::skippable_frame(&ztoc))?;
            let ts = TarSplitLocation {
                offset: out.n + 8,
                compressed: zs.len() as u64,
                uncompressed: split.lines.len() as u64,
            };
            out.put(&footer::skippable_frame(&zs))?;
            out.put(&footer::zstd64_footer(
                toc_off,
                ztoc.len() as u64,
                json.len() as u64,
                ts,
            ))?;
            annotations.insert(
                ANNOTATION_ZSTD_CHECKSUM.to_string(),
                Digest::of(&ztoc).to_string(),
            );
            annotations.insert(
                ANNOTATION_ZSTD_POSITION.to_string(),
                format!("{toc_off}:{}:{}:1", ztoc.len(), json.len()),
            );
            annotations.insert(
                ANNOTATION_ZSTD_TARSPLIT.to_string(),
                format!("{}:{}:{}", ts.offset, ts.compressed, ts.uncompressed),
            );
        } else {
            let mut json = Vec::new();
            let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
            let mut ser = serde_json::Serializer::with_formatter(&mut json, fmt);
            toc.serialize(&mut ser)
                .map_err(|e| Error::Toc(format!("encoding: {e}")))?;
            toc_digest = Digest::of(&json);
            let ztoc = zstd::bulk::compress(&json, level)
                .map_err(|e| Error::InvalidArgument(format!("zstd: {e}")))?;
            let toc_off = out.n + 8;
            out.put(&footer::skippable_frame(&ztoc))?;
            out.put(&footer::zstd40_footer(
                toc_off,
                ztoc.len() as u64,
                json.len() as u64,
            ))?;
            annotations.insert(ANNOTATION_TOC_DIGEST.to_string(), toc_digest.to_string());
            annotations.insert(
                ANNOTATION_ZSTD_CHECKSUM_OLD.to_string(),
                Digest::of(&ztoc).to_string(),
            );
            annotations.insert(
                ANNOTATION_ZSTD_POSITION_OLD.to_string(),
                format!("{toc_off}:{}:{}:1", ztoc.len(), json.len()),
            );
        }
    }
    annotations.insert(
        ANNOTATION_UNCOMPRESSED_SIZE.to_string(),
        total_uncompressed.to_string(),
    );
    out.w.flush().ctx(|| "flushing the output blob".into())?;
    Ok(WriteResult {
        format: opts.format.name(),
        media_type: if gzip {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        },
        blob_digest: out.hash.finish().to_string(),
        blob_size: out.n,
        toc_digest: toc_digest.to_string(),
        diff_id: diff.finish().to_string(),
        uncompressed_size: total_uncompressed,
        entries: plan.items.len(),
        annotations,
        missing_prioritized: missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_matches_go() {
        // Go: crc64.Checksum([]byte("hello"), crc64.MakeTable(crc64.ISO))
        assert_eq!(!crc64_update(!0, b""), 0);
        assert_eq!(!crc64_update(!0, b"123456789"), 0xB909_56C7_75A4_1001);
        assert_eq!(
            !crc64_update(crc64_update(!0, b"1234"), b"56789"),
            0xB909_56C7_75A4_1001
        );
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut bytewise = !0u64;
        for &b in &long {
            bytewise = crc64_update(bytewise, &[b]);
        }
        assert_eq!(crc64_update(!0, &long), bytewise);
    }
}
