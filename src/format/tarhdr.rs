//! A small tar reader that keeps raw byte positions, because the eStargz and
//! zstd:chunked writers must copy headers byte-for-byte and cut frames at exact
//! offsets. Understands ustar, GNU (long names, base-256 numbers) and PAX headers.

use std::collections::BTreeMap;

use super::source::ReadAt;
use crate::error::{Error, Result};

pub const BLOCK: u64 = 512;

/// Entry kinds a layer may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

impl Kind {
    /// The TOC spelling.
    pub fn toc_name(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::Reg => "reg",
            Kind::Symlink => "symlink",
            Kind::Hardlink => "hardlink",
            Kind::Char => "char",
            Kind::Block => "block",
            Kind::Fifo => "fifo",
        }
    }

    /// Parses the TOC spelling.
    pub fn from_toc(s: &str) -> Option<Kind> {
        Some(match s {
            "dir" => Kind::Dir,
            "reg" => Kind::Reg,
            "symlink" => Kind::Symlink,
            "hardlink" => Kind::Hardlink,
            "char" => Kind::Char,
            "block" => Kind::Block,
            "fifo" => Kind::Fifo,
            _ => return None,
        })
    }

    fn from_flag(flag: u8) -> Option<Kind> {
        Some(match flag {
            b'0' | 0 | b'7' => Kind::Reg,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            _ => return None,
        })
    }
}

/// One parsed 512-byte header block (before PAX/GNU extensions are applied).
#[derive(Debug, Clone)]
pub struct Header {
    raw: [u8; 512],
    pub flag: u8,
    pub size: u64,
}

fn field(raw: &[u8; 512], start: usize, len: usize) -> &[u8] {
    let f = &raw[start..start + len];
    let end = f.iter().position(|&b| b == 0).unwrap_or(len);
    &f[..end]
}

/// Parses a numeric field: octal (space/NUL padded) or GNU base-256.
fn numeric(f: &[u8], what: &str) -> Result<i64> {
    if let Some(&first) = f.first()
        && first & 0x80 != 0
    {
        // base-256, two's complement; first byte's top bit is the marker
        let neg = first & 0x40 != 0;
        let mut v: i128 = (first & 0x3f) as i128;
        if neg {
            v -= 0x40;
        }
        for &b in &f[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(b as i128))
                .ok_or_else(|| Error::Tar(format!("{what}: base-256 number overflows")))?;
        }
        return i64::try_from(v).map_err(|_| Error::Tar(format!("{what}: number overflows")));
    }
    let s: Vec<u8> = f
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == 0)
        .take_while(|&b| b != b' ' && b != 0)
        .collect();
    if s.is_empty() {
        return Ok(0);
    }
    let s = std::str::from_utf8(&s).map_err(|_| Error::Tar(format!("{what}: not octal")))?;
    i64::from_str_radix(s, 8).map_err(|_| Error::Tar(format!("{what}: {s:?} is not octal")))
}

impl Header {
    /// Parses the block at the start of `buf`; `Ok(None)` for an all-zero block
    /// (end of archive).
    pub fn parse(buf: &[u8]) -> Result<Option<Header>> {
        let raw: [u8; 512] = buf
            .get(..512)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Error::Tar("truncated header block".into()))?;
        if raw.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let want = numeric(&raw[148..156], "checksum")?;
        let unsigned: i64 = raw
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    b as i64
                }
            })
            .sum();
        let signed: i64 = raw
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    b as i8 as i64
                }
            })
            .sum();
        if want != unsigned && want != signed {
            return Err(Error::Tar(format!(
                "header checksum mismatch (stored {want}, computed {unsigned})"
            )));
        }
        let size = numeric(&raw[124..136], "size")?;
        let size = u64::try_from(size).map_err(|_| Error::Tar("negative size".into()))?;
        Ok(Some(Header {
            flag: raw[156],
            size,
            raw,
        }))
    }

    /// The raw 512 bytes.
    pub fn as_bytes(&self) -> &[u8; 512] {
        &self.raw
    }

    fn is_ustar(&self) -> bool {
        &self.raw[257..263] == b"ustar\0"
    }

    fn is_gnu(&self) -> bool {
        &self.raw[257..265] == b"ustar  \0"
    }

    /// The name, joined with the ustar prefix.
    pub fn name_bytes(&self) -> Vec<u8> {
        let name = field(&self.raw, 0, 100);
        if self.is_ustar() {
            let prefix = field(&self.raw, 345, 155);
            if !prefix.is_empty() {
                let mut v = prefix.to_vec();
                v.push(b'/');
                v.extend_from_slice(name);
                return v;
            }
        }
        name.to_vec()
    }

    /// Whether the payload of this header occupies space in the archive.
    pub fn payload_blocks(&self) -> u64 {
        match self.flag {
            // links, devices, dirs and fifos carry no payload even if size is set
            b'1' | b'2' | b'3' | b'4' | b'5' | b'6' => 0,
            _ => self.size.div_ceil(BLOCK),
        }
    }
}

/// Metadata of one logical tar entry with every extension applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meta {
    pub name: String,
    pub kind: Option<Kind>,
    /// The raw mode field (may carry file-type bits from some writers).
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub uname: String,
    pub gname: String,
    pub mtime: Time,
    pub atime: Option<Time>,
    pub ctime: Option<Time>,
    pub link_name: String,
    pub dev_major: i64,
    pub dev_minor: i64,
    pub size: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// A timestamp with nanoseconds (PAX allows fractions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

impl Time {
    fn parse_pax(v: &str) -> Result<Time> {
        let (int, frac) = v.split_once('.').unwrap_or((v, ""));
        let secs: i64 = int
            .parse()
            .map_err(|_| Error::Tar(format!("PAX time {v:?} is not a number")))?;
        let mut nanos = 0u32;
        for (i, c) in frac.chars().take(9).enumerate() {
            let d = c
                .to_digit(10)
                .ok_or_else(|| Error::Tar(format!("PAX time {v:?} is not a number")))?;
            nanos += d * 10u32.pow(8 - i as u32);
        }
        if secs < 0 && nanos > 0 {
            return Ok(Time {
                secs: secs - 1,
                nanos: 1_000_000_000 - nanos,
            });
        }
        Ok(Time { secs, nanos })
    }
}

/// One logical entry with its position in the uncompressed stream.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Offset of the first header block that belongs to this entry (PAX/GNU
    /// extension headers included).
    pub header_start: u64,
    /// Offset of the payload (just after the entry's own header).
    pub data_start: u64,
    /// Offset just after the payload's padding.
    pub end: u64,
    pub meta: Meta,
}

/// Where the archive's entries end and what trails them.
#[derive(Debug, Clone)]
pub struct Scan {
    pub entries: Vec<Entry>,
    /// Offset of the end-of-archive marker (or of the stream end if there is none).
    pub end: u64,
}

fn parse_pax_records(data: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| Error::Tar("PAX record without length".into()))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Tar("PAX record length is not a number".into()))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(Error::Tar("malformed PAX record".into()));
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| Error::Tar("PAX record without '='".into()))?;
        let key = String::from_utf8(rec[..eq].to_vec())
            .map_err(|_| Error::Tar("PAX key is not UTF-8".into()))?;
        out.push((key, rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

fn utf8(v: Vec<u8>, what: &str) -> Result<String> {
    String::from_utf8(v).map_err(|e| {
        Error::Tar(format!(
            "{what} {:?} is not UTF-8",
            String::from_utf8_lossy(e.as_bytes())
        ))
    })
}

/// Largest extension payload (PAX, GNU long name) accepted, so a hostile header
/// cannot make us allocate gigabytes.
const MAX_EXTENSION: u64 = 1 << 20;

/// Extension headers (PAX records, GNU long names) waiting for the entry they
/// describe; both the random-access [`scan`] and streaming readers feed them.
#[derive(Debug, Default)]
pub struct Extensions {
    global: Vec<(String, Vec<u8>)>,
    pax: Vec<(String, Vec<u8>)>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

impl Extensions {
    /// The payload length of an extension header, or `None` when `h` is an entry.
    pub fn payload_len(h: &Header) -> Result<Option<usize>> {
        if !matches!(h.flag, b'x' | b'g' | b'L' | b'K') {
            return Ok(None);
        }
        if h.size > MAX_EXTENSION {
            return Err(Error::Tar(format!(
                "extension header of {} bytes is too large",
                h.size
            )));
        }
        Ok(Some(h.size as usize))
    }

    /// Takes the payload of extension header `h`.
    pub fn absorb(&mut self, h: &Header, mut data: Vec<u8>) -> Result<()> {
        match h.flag {
            b'x' => self.pax.extend(parse_pax_records(&data)?),
            b'g' => self.global.extend(parse_pax_records(&data)?),
            flag => {
                let n = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                data.truncate(n);
                if flag == b'L' {
                    self.long_name = Some(data);
                } else {
                    self.long_link = Some(data);
                }
            }
        }
        Ok(())
    }

    /// The entry header `h` describes, with every pending extension applied, and
    /// the length of the payload that follows the header (before padding).
    pub fn entry(&mut self, h: &Header) -> Result<(Meta, u64)> {
        let kind = Kind::from_flag(h.flag)
            .ok_or_else(|| Error::Tar(format!("unsupported entry type {:?}", h.flag as char)))?;
        let raw = h.as_bytes();
        let mut m = Meta {
            name: utf8(
                self.long_name.take().unwrap_or_else(|| h.name_bytes()),
                "name",
            )?,
            kind: Some(kind),
            mode: numeric(&raw[100..108], "mode")?,
            uid: numeric(&raw[108..116], "uid")?,
            gid: numeric(&raw[116..124], "gid")?,
            size: h.size,
            mtime: Time {
                secs: numeric(&raw[136..148], "mtime")?,
                nanos: 0,
            },
            link_name: utf8(
                self.long_link
                    .take()
                    .unwrap_or_else(|| field(raw, 157, 100).to_vec()),
                "link name",
            )?,
            uname: String::from_utf8_lossy(field(raw, 265, 32)).into_owned(),
            gname: String::from_utf8_lossy(field(raw, 297, 32)).into_owned(),
            ..Meta::default()
        };
        if h.is_ustar() || h.is_gnu() {
            m.dev_major = numeric(&raw[329..337], "devmajor")?;
            m.dev_minor = numeric(&raw[337..345], "devminor")?;
        }
        if h.is_gnu() {
            let at = numeric(&raw[345..357], "atime")?;
            let ct = numeric(&raw[357..369], "ctime")?;
            if at != 0 {
                m.atime = Some(Time { secs: at, nanos: 0 });
            }
            if ct != 0 {
                m.ctime = Some(Time { secs: ct, nanos: 0 });
            }
        }
        let mut size_override = None;
        let mut sparse = false;
        for (k, v) in self.global.iter().chain(self.pax.iter()) {
            let text = || utf8(v.clone(), k);
            match k.as_str() {
                "path" => m.name = text()?,
                "linkpath" => m.link_name = text()?,
                "uname" => m.uname = text()?,
                "gname" => m.gname = text()?,
                "uid" => m.uid = text()?.parse().map_err(|_| Error::Tar("PAX uid".into()))?,
                "gid" => m.gid = text()?.parse().map_err(|_| Error::Tar("PAX gid".into()))?,
                "size" => {
                    size_override = Some(
                        text()?
                            .parse::<u64>()
                            .map_err(|_| Error::Tar("PAX size".into()))?,
                    )
                }
                "mtime" => m.mtime = Time::parse_pax(&text()?)?,
                "atime" => m.atime = Some(Time::parse_pax(&text()?)?),
                "ctime" => m.ctime = Some(Time::parse_pax(&text()?)?),
                _ => {
                    if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                        m.xattrs.insert(name.to_string(), v.clone());
                    }
                    sparse |= k.starts_with("GNU.sparse.");
                }
            }
        }
        self.pax.clear();
        if sparse {
            // the payload is a sparse map plus data, not the file: refuse rather than
            // extract it as the file's bytes
            return Err(Error::Tar(format!(
                "{:?}: GNU sparse files (PAX GNU.sparse.*) are not supported",
                m.name
            )));
        }
        let mut payload = h.payload_blocks() * BLOCK;
        if payload > 0 {
            payload = h.size;
        }
        if let Some(s) = size_override {
            m.size = s;
            if h.payload_blocks() > 0 || (h.size == 0 && kind == Kind::Reg) {
                payload = s;
            }
        }
        if kind != Kind::Reg {
            m.size = 0;
        }
        Ok((m, payload))
    }
}

/// Names the archive offset in a tar error.
pub fn at(pos: u64, e: Error) -> Error {
    match e {
        Error::Tar(s) => Error::Tar(format!("offset {pos}: {s}")),
        e => e,
    }
}

/// Reads every entry of an uncompressed tar without touching file payloads.
pub fn scan(src: &dyn ReadAt) -> Result<Scan> {
    let size = src.size();
    let mut pos = 0u64;
    let mut entries = Vec::new();
    let mut ext = Extensions::default();
    let mut header_start: Option<u64> = None;
    let mut block = [0u8; 512];
    loop {
        if pos + BLOCK > size {
            if pos == size && header_start.is_none() {
                // stream ends without an end-of-archive marker; accept it
                return Ok(Scan { entries, end: pos });
            }
            return Err(Error::Tar(format!("truncated archive at offset {pos}")));
        }
        src.read_exact_at(pos, &mut block)
            .map_err(|e| Error::Tar(format!("reading header at offset {pos}: {e}")))?;
        let Some(h) = Header::parse(&block).map_err(|e| at(pos, e))? else {
            if header_start.is_some() {
                return Err(Error::Tar(format!(
                    "offset {pos}: archive ends between an extension header and its entry"
                )));
            }
            return Ok(Scan { entries, end: pos });
        };
        let start = *header_start.get_or_insert(pos);
        let data_start = pos + BLOCK;
        let end = h
            .payload_blocks()
            .checked_mul(BLOCK)
            .and_then(|n| n.checked_add(data_start))
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                Error::Tar(format!(
                    "offset {pos}: entry of {} bytes runs past the end of the archive",
                    h.size
                ))
            })?;
        if let Some(len) = Extensions::payload_len(&h).map_err(|e| at(pos, e))? {
            let mut data = vec![0u8; len];
            src.read_exact_at(data_start, &mut data)
                .map_err(|e| Error::Tar(format!("offset {data_start}: {e}")))?;
            ext.absorb(&h, data)?;
            pos = end;
            continue;
        }
        let (meta, payload) = ext.entry(&h).map_err(|e| at(pos, e))?;
        let end = payload
            .div_ceil(BLOCK)
            .checked_mul(BLOCK)
            .and_then(|n| n.checked_add(data_start))
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                Error::Tar(format!(
                    "offset {pos}: entry of {payload} bytes runs past the end"
                ))
            })?;
        entries.push(Entry {
            header_start: start,
            data_start,
            end,
            meta,
        });
        header_start = None;
        pos = end;
    }
}

/// Builds a plain ustar header (used for the entries lazysnap adds itself:
/// landmarks and the TOC).
pub fn ustar_header(name: &str, mode: u32, size: u64) -> Result<[u8; 512]> {
    if name.len() > 100 {
        return Err(Error::InvalidArgument(format!("{name}: name too long")));
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let oct = |h: &mut [u8; 512], start: usize, len: usize, v: u64| {
        let s = format!("{:0width$o}", v, width = len - 1);
        h[start..start + len - 1].copy_from_slice(s.as_bytes());
    };
    oct(&mut h, 100, 8, mode as u64);
    oct(&mut h, 108, 8, 0);
    oct(&mut h, 116, 8, 0);
    oct(&mut h, 124, 12, size);
    oct(&mut h, 136, 12, 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    oct(&mut h, 329, 8, 0);
    oct(&mut h, 337, 8, 0);
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| b as u64).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_forms() {
        assert_eq!(numeric(b"0000644\0", "m").unwrap(), 0o644);
        assert_eq!(numeric(b"   755 ", "m").unwrap(), 0o755);
        assert_eq!(numeric(b"\0\0\0", "m").unwrap(), 0);
        assert_eq!(numeric(&[0x80, 0, 0, 0, 0, 0, 1, 0], "s").unwrap(), 256);
        assert!(numeric(b"99x", "m").is_err());
        assert!(
            numeric(
                &[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                "s"
            )
            .is_err()
        );
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            Time::parse_pax("12.5").unwrap(),
            Time {
                secs: 12,
                nanos: 500_000_000
            }
        );
        assert!(Time::parse_pax("x").is_err());
    }

    #[test]
    fn own_header_parses() {
        let h = ustar_header("a.txt", 0o644, 3).unwrap();
        let mut tar = h.to_vec();
        tar.extend_from_slice(b"abc");
        tar.resize(1024, 0);
        tar.extend_from_slice(&[0u8; 1024]);
        let s = scan(&tar).unwrap();
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.entries[0].meta.name, "a.txt");
        assert_eq!(s.entries[0].meta.size, 3);
        assert_eq!(s.entries[0].end, 1024);
        assert_eq!(s.end, 1024);
    }

    #[test]
    fn gnu_sparse_files_are_refused() {
        let rec = b"22 GNU.sparse.major=1\n22 GNU.sparse.minor=0\n";
        let mut pax = ustar_header("PaxHeaders/f", 0o644, rec.len() as u64).unwrap();
        pax[156] = b'x';
        pax[148..156].fill(b' ');
        let sum: u64 = pax.iter().map(|&b| b as u64).sum();
        pax[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let mut tar = pax.to_vec();
        tar.extend_from_slice(rec);
        tar.resize(1024, 0);
        tar.extend_from_slice(&ustar_header("f", 0o644, 0).unwrap());
        tar.extend_from_slice(&[0u8; 1024]);
        let e = scan(&tar).unwrap_err().to_string();
        assert!(e.contains("\"f\"") && e.contains("sparse"), "{e}");
    }

    #[test]
    fn truncated_and_corrupt() {
        let h = ustar_header("a.txt", 0o644, 3000).unwrap();
        let mut tar = h.to_vec();
        tar.extend_from_slice(&[1u8; 100]);
        assert!(scan(&tar).is_err());
        let mut bad = ustar_header("b", 0o644, 0).unwrap();
        bad[0] = b'c';
        assert!(scan(&bad.to_vec()).is_err());
    }
}
