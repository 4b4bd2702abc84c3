//! Footers: the fixed-size tail of a blob that says where its table of contents is.
//!
//! Four dialects exist in the wild (see FORMATS.md): eStargz (51-byte gzip member),
//! legacy stargz (47 bytes), the 40-byte zstd skippable-frame footer written by
//! stargz's eStargz-zstd and by containers/storage before 2023-09 (magic `GnUlInUx`),
//! and the current zstd:chunked 64-byte footer (magic `GNUlInUx`).

use std::io::Read;

use crate::error::{Error, Result};

/// eStargz gzip footer size.
pub const ESTARGZ_FOOTER_SIZE: u64 = 51;
/// Legacy (google/crfs) stargz footer size.
pub const LEGACY_FOOTER_SIZE: u64 = 47;
/// Blob tail taken by the 40-byte-payload zstd footer (8-byte frame header + payload).
pub const ZSTD40_FOOTER_SIZE: u64 = 48;
/// Blob tail taken by the 64-byte-payload zstd:chunked footer.
pub const ZSTD64_FOOTER_SIZE: u64 = 72;
/// How many tail bytes suffice to recognise any footer.
pub const MAX_FOOTER_SIZE: u64 = ZSTD64_FOOTER_SIZE;

/// Magic of a zstd skippable frame (`0x184D2A50`, little endian).
pub const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
const MAGIC_40: &[u8; 8] = b"GnUlInUx";
const MAGIC_64: &[u8; 8] = b"GNUlInUx";
const MANIFEST_TYPE_CRFS: u64 = 1;

/// The lazy-layer format a blob is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// eStargz with gzip members (stargz-snapshotter's default).
    Estargz,
    /// The original google/crfs stargz: gzip, 47-byte footer, often no chunk digests.
    LegacyStargz,
    /// zstd frames with a 40-byte footer payload: stargz's eStargz-zstd, and
    /// containers/storage zstd:chunked as written before 2023-09.
    EstargzZstd,
    /// containers/storage zstd:chunked with the 64-byte footer and tar-split.
    ZstdChunked,
}

impl Format {
    /// Which compression the blob's frames use.
    pub fn compression(self) -> Compression {
        match self {
            Format::Estargz | Format::LegacyStargz => Compression::Gzip,
            Format::EstargzZstd | Format::ZstdChunked => Compression::Zstd,
        }
    }

    /// The name the CLI and JSON output use.
    pub fn name(self) -> &'static str {
        match self {
            Format::Estargz => "estargz",
            Format::LegacyStargz => "stargz",
            Format::EstargzZstd => "estargz-zstd",
            Format::ZstdChunked => "zstd-chunked",
        }
    }
}

/// Compression of the independent frames (gzip members or zstd frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    Gzip,
    Zstd,
}

/// Where the table of contents lives, as read from a footer or an annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TocLocation {
    /// A gzip member holding a tar entry `stargz.index.json`, from `offset` up to `end`
    /// (the footer's start). Chunk data ends at `offset`.
    Gzip {
        format: Format,
        offset: u64,
        end: u64,
    },
    /// A zstd-compressed JSON TOC in a skippable frame: payload at `offset`, `compressed`
    /// bytes long, `uncompressed` bytes once decompressed. Chunk data ends at the frame
    /// header, 8 bytes before `offset`.
    Zstd {
        format: Format,
        offset: u64,
        compressed: u64,
        uncompressed: u64,
        tar_split: Option<TarSplitLocation>,
    },
}

/// The tar-split skippable frame of a zstd:chunked blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TarSplitLocation {
    pub offset: u64,
    pub compressed: u64,
    pub uncompressed: u64,
}

impl TocLocation {
    /// The blob's format.
    pub fn format(&self) -> Format {
        match *self {
            TocLocation::Gzip { format, .. } | TocLocation::Zstd { format, .. } => format,
        }
    }

    /// The compressed byte range `[start, end)` to fetch to read the TOC.
    pub fn range(&self) -> (u64, u64) {
        match *self {
            TocLocation::Gzip { offset, end, .. } => (offset, end),
            TocLocation::Zstd {
                offset, compressed, ..
            } => (offset, offset + compressed),
        }
    }

    /// Where chunk data ends: nothing past this offset is file content.
    pub fn data_end(&self) -> u64 {
        match *self {
            TocLocation::Gzip { offset, .. } => offset,
            TocLocation::Zstd { offset, .. } => offset.saturating_sub(8),
        }
    }
}

/// Parses the footer at the end of a blob of `blob_size` bytes. `tail` holds the
/// blob's last bytes (at least [`MAX_FOOTER_SIZE`], or the whole blob if smaller).
pub fn parse(tail: &[u8], blob_size: u64) -> Result<TocLocation> {
    if (tail.len() as u64) > blob_size {
        return Err(Error::Footer(format!(
            "tail of {} bytes is longer than the blob ({blob_size} bytes)",
            tail.len()
        )));
    }
    if let Some(loc) = parse_zstd(tail, blob_size)? {
        return Ok(loc);
    }
    if let Some(loc) = parse_gzip(tail, blob_size)? {
        return Ok(loc);
    }
    Err(Error::Footer(format!(
        "no eStargz, stargz or zstd:chunked footer in the last {} bytes of a {blob_size}-byte blob",
        tail.len().min(MAX_FOOTER_SIZE as usize)
    )))
}

fn le64(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i * 8..i * 8 + 8]);
    u64::from_le_bytes(a)
}

fn parse_zstd(tail: &[u8], blob_size: u64) -> Result<Option<TocLocation>> {
    for (size, magic) in [
        (ZSTD64_FOOTER_SIZE, MAGIC_64),
        (ZSTD40_FOOTER_SIZE, MAGIC_40),
    ] {
        if (tail.len() as u64) < size {
            continue;
        }
        let f = &tail[tail.len() - size as usize..];
        if f[..4] != SKIPPABLE_MAGIC || &f[f.len() - 8..] != magic {
            continue;
        }
        let payload = &f[8..];
        if u32::from_le_bytes([f[4], f[5], f[6], f[7]]) as usize != payload.len() {
            return Err(Error::Footer(format!(
                "zstd footer frame announces {} bytes, expected {}",
                u32::from_le_bytes([f[4], f[5], f[6], f[7]]),
                payload.len()
            )));
        }
        let (offset, compressed, uncompressed, kind) = (
            le64(payload, 0),
            le64(payload, 1),
            le64(payload, 2),
            le64(payload, 3),
        );
        if kind != MANIFEST_TYPE_CRFS {
            return Err(Error::Footer(format!(
                "zstd footer manifest type {kind}, only 1 (CRFS) is supported"
            )));
        }
        let footer_start = blob_size - size;
        let tar_split = if size == ZSTD64_FOOTER_SIZE {
            let ts = TarSplitLocation {
                offset: le64(payload, 4),
                compressed: le64(payload, 5),
                uncompressed: le64(payload, 6),
            };
            check_range("tar-split", ts.offset, ts.compressed, footer_start)?;
            Some(ts)
        } else {
            None
        };
        let format = if size == ZSTD64_FOOTER_SIZE {
            Format::ZstdChunked
        } else {
            Format::EstargzZstd
        };
        let loc = zstd_location(format, offset, compressed, uncompressed, tar_split)?;
        check_range("table of contents", offset, compressed, footer_start)?;
        return Ok(Some(loc));
    }
    Ok(None)
}

/// Builds and checks a zstd TOC location (from a footer or from the
/// `…zstd-chunked.manifest-position` annotation).
pub fn zstd_location(
    format: Format,
    offset: u64,
    compressed: u64,
    uncompressed: u64,
    tar_split: Option<TarSplitLocation>,
) -> Result<TocLocation> {
    if offset < 8 {
        return Err(Error::Footer(format!(
            "table of contents offset {offset} leaves no room for its frame header"
        )));
    }
    if compressed == 0 || uncompressed == 0 {
        return Err(Error::Footer("empty table of contents".into()));
    }
    if uncompressed > crate::format::MAX_TOC_SIZE {
        return Err(Error::Footer(format!(
            "table of contents of {uncompressed} bytes exceeds the limit of {} bytes",
            crate::format::MAX_TOC_SIZE
        )));
    }
    Ok(TocLocation::Zstd {
        format,
        offset,
        compressed,
        uncompressed,
        tar_split,
    })
}

fn check_range(what: &str, offset: u64, len: u64, limit: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= limit => Ok(()),
        _ => Err(Error::Footer(format!(
            "{what} at {offset}+{len} lies past the footer start {limit}"
        ))),
    }
}

/// Parses `offset:compressed:uncompressed:1`, the zstd:chunked manifest-position
/// annotation, so the TOC can be fetched without reading the footer first.
pub fn parse_manifest_position(value: &str, format: Format) -> Result<TocLocation> {
    let parts: Vec<&str> = value.split(':').collect();
    let nums: Vec<u64> = parts
        .iter()
        .map(|p| p.parse::<u64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Footer(format!("manifest position {value:?}: not numbers")))?;
    match nums.as_slice() {
        [off, comp, raw, 1] => zstd_location(format, *off, *comp, *raw, None),
        _ => Err(Error::Footer(format!(
            "manifest position {value:?}: expected offset:length:uncompressed:1"
        ))),
    }
}

fn parse_gzip(tail: &[u8], blob_size: u64) -> Result<Option<TocLocation>> {
    for size in [ESTARGZ_FOOTER_SIZE, LEGACY_FOOTER_SIZE] {
        if (tail.len() as u64) < size {
            continue;
        }
        let f = &tail[tail.len() - size as usize..];
        if f[0] != 0x1f || f[1] != 0x8b {
            continue;
        }
        let mut dec = flate2::read::GzDecoder::new(f);
        let mut rest = Vec::new();
        if dec.read_to_end(&mut rest).is_err() || !rest.is_empty() {
            continue;
        }
        let Some(extra) = dec.header().and_then(|h| h.extra()) else {
            continue;
        };
        let (payload, format) = if size == ESTARGZ_FOOTER_SIZE {
            if extra.len() != 26 || extra[0] != b'S' || extra[1] != b'G' || extra[2..4] != [22, 0] {
                continue;
            }
            (&extra[4..], Format::Estargz)
        } else {
            if extra.len() != 22 {
                continue;
            }
            (extra, Format::LegacyStargz)
        };
        if &payload[16..] != b"STARGZ" {
            continue;
        }
        let hex = std::str::from_utf8(&payload[..16])
            .ok()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| {
                Error::Footer(format!("{} footer: TOC offset is not hex", format.name()))
            })?;
        let end = blob_size - size;
        if hex >= end {
            return Err(Error::Footer(format!(
                "{} footer: TOC offset {hex} is not before the footer at {end}",
                format.name()
            )));
        }
        return Ok(Some(TocLocation::Gzip {
            format,
            offset: hex,
            end,
        }));
    }
    Ok(None)
}

/// The 51-byte eStargz footer pointing at `toc_offset`, written by hand because the
/// bytes must be exact (a gzip library at another level writes a different size).
pub fn estargz_footer(toc_offset: u64) -> [u8; 51] {
    let mut f = [0u8; 51];
    f[..10].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
    f[10..12].copy_from_slice(&26u16.to_le_bytes());
    f[12..14].copy_from_slice(b"SG");
    f[14..16].copy_from_slice(&22u16.to_le_bytes());
    f[16..38].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    f[38..43].copy_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    f
}

/// A zstd skippable frame holding `payload`.
pub fn skippable_frame(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 8);
    v.extend_from_slice(&SKIPPABLE_MAGIC);
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// The 40-byte eStargz-zstd footer frame (48 bytes with its header).
pub fn zstd40_footer(offset: u64, compressed: u64, uncompressed: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    for v in [offset, compressed, uncompressed, MANIFEST_TYPE_CRFS] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p.extend_from_slice(MAGIC_40);
    skippable_frame(&p)
}

/// The 64-byte zstd:chunked footer frame (72 bytes with its header).
pub fn zstd64_footer(
    offset: u64,
    compressed: u64,
    uncompressed: u64,
    tar_split: TarSplitLocation,
) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    for v in [
        offset,
        compressed,
        uncompressed,
        MANIFEST_TYPE_CRFS,
        tar_split.offset,
        tar_split.compressed,
        tar_split.uncompressed,
    ] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p.extend_from_slice(MAGIC_64);
    skippable_frame(&p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estargz_footer_round_trip() {
        let f = estargz_footer(0x1234);
        let mut blob = vec![0u8; 0x2000];
        blob.extend_from_slice(&f);
        let loc = parse(&blob[blob.len() - 72..], blob.len() as u64).unwrap();
        assert_eq!(
            loc,
            TocLocation::Gzip {
                format: Format::Estargz,
                offset: 0x1234,
                end: 0x2000
            }
        );
    }

    #[test]
    fn legacy_footer_generic_gzip_header() {
        // A Go-style gzip header with MTIME and OS set, 22-byte extra without subfield.
        let mut f = vec![0x1f, 0x8b, 8, 4, 1, 2, 3, 4, 0, 3, 22, 0];
        f.extend_from_slice(format!("{:016x}STARGZ", 100u64).as_bytes());
        f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.len(), 47);
        let mut blob = vec![0u8; 200];
        blob.extend_from_slice(&f);
        let loc = parse(&blob[blob.len() - 72..], blob.len() as u64).unwrap();
        assert_eq!(loc.format(), Format::LegacyStargz);
        assert_eq!(loc.range(), (100, 200));
    }

    #[test]
    fn zstd_footers_round_trip() {
        let mut blob = vec![0u8; 1000];
        blob.extend_from_slice(&zstd40_footer(508, 400, 9000));
        let loc = parse(&blob[blob.len() - 72..], blob.len() as u64).unwrap();
        assert_eq!(loc.format(), Format::EstargzZstd);
        assert_eq!(loc.range(), (508, 908));
        assert_eq!(loc.data_end(), 500);

        let ts = TarSplitLocation {
            offset: 916,
            compressed: 50,
            uncompressed: 70,
        };
        let mut blob = vec![0u8; 1000];
        blob.extend_from_slice(&zstd64_footer(508, 400, 9000, ts));
        let loc = parse(&blob[blob.len() - 72..], blob.len() as u64).unwrap();
        assert_eq!(loc.format(), Format::ZstdChunked);
        match loc {
            TocLocation::Zstd { tar_split, .. } => assert_eq!(tar_split, Some(ts)),
            _ => panic!("not zstd"),
        }
    }

    #[test]
    fn bad_footers_are_errors() {
        // wrong magic, truncated, offsets past the end, garbage
        let mut bad = vec![0u8; 100];
        bad.extend_from_slice(&estargz_footer(5000));
        assert!(parse(&bad[bad.len() - 72..], bad.len() as u64).is_err());
        let mut z = vec![0u8; 100];
        z.extend_from_slice(&zstd40_footer(u64::MAX - 2, 10, 10));
        assert!(parse(&z[z.len() - 72..], z.len() as u64).is_err());
        let mut z = vec![0u8; 100];
        z.extend_from_slice(&zstd40_footer(50, 10, u64::MAX));
        assert!(parse(&z[z.len() - 72..], z.len() as u64).is_err());
        assert!(parse(&[0u8; 72], 72).is_err());
        assert!(parse(&[], 0).is_err());
        let f = estargz_footer(1);
        assert!(parse(&f[1..], 50).is_err());
        let mut wrong = f;
        wrong[36] = b'X';
        assert!(parse(&wrong, 51).is_err());
    }

    #[test]
    fn manifest_position() {
        let loc = parse_manifest_position("100:20:300:1", Format::ZstdChunked).unwrap();
        assert_eq!(loc.range(), (100, 120));
        assert!(parse_manifest_position("100:20:300:2", Format::ZstdChunked).is_err());
        assert!(parse_manifest_position("a:b", Format::ZstdChunked).is_err());
    }
}
