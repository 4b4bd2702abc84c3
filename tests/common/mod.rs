//! Shared helpers for the integration tests: a deterministic tar corpus that
//! exercises every corner of the layer formats, and an oracle that reads a tar
//! back into plain values (`ExpectedEntry`) to compare tool output against.
//!
//! Use from a test crate with `mod common;`.
#![allow(dead_code)]

pub mod lazy;
pub mod registry;
pub mod remote;

use lazysnap::format::writer::{WriteOptions, WriteResult, write_layer};

/// Converts an uncompressed `tar` with lazysnap's writer.
pub fn convert(tar: &[u8], opts: &WriteOptions) -> (Vec<u8>, WriteResult) {
    let mut out = Vec::new();
    let res = write_layer(&tar.to_vec(), &mut out, opts).expect("conversion");
    (out, res)
}

use std::collections::BTreeMap;
use std::io::Read;

/// Base modification time of the corpus (2020-09-13T12:26:40Z); entries add small offsets.
pub const MTIME: u64 = 1_600_000_000;

/// Landmark files that eStargz writers add on their own; they are not in any input tar.
pub const LANDMARKS: [&str; 2] = ["/.prefetch.landmark", "/.no.prefetch.landmark"];

/// One tar entry as the oracle sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedEntry {
    /// Normalised path: leading `/`, no `./`, no trailing `/`; the root is `/`.
    pub path: String,
    /// dir|reg|symlink|hardlink|char|block|fifo
    pub kind: &'static str,
    /// Content length for `reg`, 0 otherwise.
    pub size: u64,
    /// Tar mode field (permission, setuid/setgid/sticky bits).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub uname: String,
    pub gname: String,
    pub mtime: u64,
    /// Symlink target as stored; hardlink target normalised like `path`.
    pub link: Option<String>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// From PAX `SCHILY.xattr.<name>` records.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Payload bytes (empty for everything but `reg`).
    pub content: Vec<u8>,
}

impl ExpectedEntry {
    /// The line `lazysnap layer ls` (and `estargz-ref ls`) prints for this entry:
    /// `path<TAB>type<TAB>size<TAB>mode(octal)<TAB>uid<TAB>gid<TAB>link-or-dash`.
    pub fn ls_line(&self) -> String {
        format!(
            "{}\t{}\t{}\t{:o}\t{}\t{}\t{}",
            self.path,
            self.kind,
            self.size,
            self.mode,
            self.uid,
            self.gid,
            self.link.as_deref().unwrap_or("-")
        )
    }
}

/// Normalise a tar path the way the eStargz reader does, with a leading `/`.
pub fn norm_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Read a tar (uncompressed) into oracle entries, in archive order.
pub fn tar_entries(tar: &[u8]) -> Vec<ExpectedEntry> {
    let mut ar = tar::Archive::new(tar);
    let mut out = Vec::new();
    for e in ar.entries().expect("tar entries") {
        let mut e = e.expect("tar entry");
        let path = norm_path(std::str::from_utf8(&e.path_bytes()).expect("utf-8 path"));
        let h = e.header().clone();
        let et = h.entry_type();
        let kind = match et {
            tar::EntryType::Directory => "dir",
            tar::EntryType::Regular | tar::EntryType::Continuous => "reg",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            tar::EntryType::Char => "char",
            tar::EntryType::Block => "block",
            tar::EntryType::Fifo => "fifo",
            other => panic!("{path}: unexpected tar entry type {other:?}"),
        };
        let link = e
            .link_name_bytes()
            .map(|b| String::from_utf8(b.into_owned()).expect("utf-8 link"))
            .map(|l| if kind == "hardlink" { norm_path(&l) } else { l });
        let mut xattrs = BTreeMap::new();
        if let Some(pax) = e.pax_extensions().expect("pax") {
            for rec in pax {
                let rec = rec.expect("pax record");
                if let Some(name) = rec.key().expect("pax key").strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(name.to_string(), rec.value_bytes().to_vec());
                }
            }
        }
        let mut content = Vec::new();
        e.read_to_end(&mut content).expect("tar payload");
        let (dev_major, dev_minor) = if kind == "char" || kind == "block" {
            (
                h.device_major().unwrap().unwrap_or(0),
                h.device_minor().unwrap().unwrap_or(0),
            )
        } else {
            (0, 0)
        };
        out.push(ExpectedEntry {
            path,
            kind,
            size: if kind == "reg" {
                content.len() as u64
            } else {
                0
            },
            mode: h.mode().unwrap(),
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            uname: h.username().unwrap().unwrap_or("").to_string(),
            gname: h.groupname().unwrap().unwrap_or("").to_string(),
            mtime: h.mtime().unwrap(),
            link,
            dev_major,
            dev_minor,
            xattrs,
            content,
        });
    }
    out
}

/// The bytes a reader must return for `path`: its content, following hardlinks.
pub fn file_content<'a>(entries: &'a [ExpectedEntry], path: &str) -> Option<&'a [u8]> {
    let e = entries.iter().rev().find(|e| e.path == path)?;
    match e.kind {
        "reg" => Some(&e.content),
        "hardlink" => file_content(entries, e.link.as_deref()?),
        _ => None,
    }
}

/// Sorted `ls` lines of the oracle (what `layer ls` must print).
pub fn ls_lines(entries: &[ExpectedEntry]) -> Vec<String> {
    let mut v: Vec<String> = entries.iter().map(ExpectedEntry::ls_line).collect();
    v.sort();
    v
}

/// Deterministic pseudo-random bytes (xorshift64*, fixed seed).
pub fn prng_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible text, different per seed.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("line {i} of file {seed}: the quick brown fox\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// A pax extended header (`x`) payload for the given records.
fn pax_payload(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3; // ' ' '=' '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

/// A tar writer for test layers: every entry type, owners, PAX records; mtimes
/// grow by 7 s per entry from [`MTIME`].
pub struct Corpus {
    pub b: tar::Builder<Vec<u8>>,
    n: u64,
}

pub struct Owner {
    uid: u64,
    gid: u64,
    uname: &'static str,
    gname: &'static str,
}

pub const ROOT: Owner = Owner {
    uid: 0,
    gid: 0,
    uname: "root",
    gname: "root",
};
pub const ALICE: Owner = Owner {
    uid: 1000,
    gid: 1000,
    uname: "alice",
    gname: "staff",
};
pub const NOBODY: Owner = Owner {
    uid: 65534,
    gid: 65534,
    uname: "nobody",
    gname: "nogroup",
};

impl Corpus {
    pub fn new() -> Self {
        Corpus {
            b: tar::Builder::new(Vec::new()),
            n: 0,
        }
    }

    pub fn header(
        &mut self,
        ty: tar::EntryType,
        mode: u32,
        o: &Owner,
        size: u64,
        ustar: bool,
    ) -> tar::Header {
        let mut h = if ustar {
            tar::Header::new_ustar()
        } else {
            tar::Header::new_gnu()
        };
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_uid(o.uid);
        h.set_gid(o.gid);
        h.set_username(o.uname).unwrap();
        h.set_groupname(o.gname).unwrap();
        h.set_size(size);
        self.n += 1;
        h.set_mtime(MTIME + self.n * 7);
        h
    }

    pub fn pax(&mut self, records: &[(&str, &[u8])]) {
        let data = pax_payload(records);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_path(format!("PaxHeaders/{}", self.n)).unwrap();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(MTIME);
        h.set_cksum();
        self.b.append(&h, &data[..]).unwrap();
    }

    pub fn dir(&mut self, path: &str, mode: u32, o: &Owner) {
        let mut h = self.header(tar::EntryType::Directory, mode, o, 0, false);
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
    }

    pub fn file(&mut self, path: &str, mode: u32, o: &Owner, data: &[u8]) {
        let mut h = self.header(tar::EntryType::Regular, mode, o, data.len() as u64, false);
        self.b.append_data(&mut h, path, data).unwrap();
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.link(tar::EntryType::Symlink, path, target, 0o777, &ROOT);
    }

    /// Hard links carry the target's mode and owner, as GNU tar writes them.
    pub fn hardlink(&mut self, path: &str, target: &str, mode: u32, o: &Owner) {
        self.link(tar::EntryType::Link, path, target, mode, o);
    }

    pub fn link(&mut self, ty: tar::EntryType, path: &str, target: &str, mode: u32, o: &Owner) {
        let mut h = self.header(ty, mode, o, 0, false);
        self.b.append_link(&mut h, path, target).unwrap();
    }

    pub fn dev(&mut self, ty: tar::EntryType, path: &str, mode: u32, major: u32, minor: u32) {
        let mut h = self.header(ty, mode, &ROOT, 0, false);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
    }

    /// An entry whose path (and xattrs) travel in a PAX header.
    pub fn pax_entry(
        &mut self,
        path: &str,
        ty: tar::EntryType,
        mode: u32,
        o: &Owner,
        data: &[u8],
        xattrs: &[(&str, &[u8])],
    ) {
        let mut recs: Vec<(String, Vec<u8>)> = vec![("path".into(), path.as_bytes().to_vec())];
        for (k, v) in xattrs {
            recs.push((format!("SCHILY.xattr.{k}"), v.to_vec()));
        }
        let recs_ref: Vec<(&str, &[u8])> = recs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        self.pax(&recs_ref);
        let mut h = self.header(ty, mode, o, data.len() as u64, true);
        // The ustar name field only gets a stand-in; readers take the PAX path.
        let short: String = path
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap()
            .chars()
            .take(90)
            .collect();
        h.set_path(short).unwrap();
        h.set_cksum();
        self.b.append(&h, data).unwrap();
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// gzip of `data` (one member).
pub fn gz(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A tar entry written byte by byte, so names `tar::Builder` refuses (`..`, absolute)
/// can be made; `size` overrides the header's size field.
pub fn raw_entry(
    name: &str,
    kind: tar::EntryType,
    link: &str,
    data: &[u8],
    size: Option<u64>,
) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_mtime(1_600_000_000);
    h.set_size(size.unwrap_or(data.len() as u64));
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// `entries` (from [`raw_entry`]) and the end-of-archive marker.
pub fn raw_archive(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut t: Vec<u8> = entries.concat();
    t.extend_from_slice(&[0u8; 1024]);
    t
}

/// An eStargz blob with `data` before a TOC member holding `json` (hand-made TOCs
/// for bad and hostile input).
pub fn estargz_with_toc(data: &[u8], json: &str) -> Vec<u8> {
    use lazysnap::format::footer;
    let mut member =
        lazysnap::format::tarhdr::ustar_header("stargz.index.json", 0o644, json.len() as u64)
            .unwrap()
            .to_vec();
    member.extend_from_slice(json.as_bytes());
    member.resize(member.len().div_ceil(512) * 512 + 1024, 0);
    let z = gz(&member);
    let mut blob = data.to_vec();
    let off = blob.len() as u64;
    blob.extend_from_slice(&z);
    blob.extend_from_slice(&footer::estargz_footer(off));
    blob
}

/// Name of the 200-byte file in `long/`.
pub fn long_name() -> String {
    let mut s = String::from("long-name-");
    while s.len() < 200 {
        s.push(char::from(b'a' + (s.len() % 26) as u8));
    }
    s
}

/// Directories of the deep path (each a path prefix), and the file at its end (> 200 bytes).
pub fn deep_path() -> (Vec<String>, String) {
    let mut dirs = Vec::new();
    let mut p = String::from("deep");
    dirs.push(format!("{p}/"));
    for i in 0..5 {
        p.push_str(&format!("/level{i}-{}", "d".repeat(40)));
        dirs.push(format!("{p}/"));
    }
    (dirs, format!("{p}/file-at-the-bottom.txt"))
}

/// The corpus: every entry type and the awkward cases, with regular-file sizes around
/// `chunk_size` (which must be at least 16).
pub fn corpus_tar(chunk_size: u64) -> Vec<u8> {
    assert!(chunk_size >= 16, "chunk_size too small");
    let c = chunk_size as usize;
    let mut t = Corpus::new();
    t.dir("./", 0o755, &ROOT);

    t.dir("bin/", 0o755, &ROOT);
    t.file("bin/busybox", 0o755, &ROOT, &prng_bytes(1, c * 3 + c / 2));
    t.symlink("bin/sh", "busybox");

    t.dir("data/", 0o750, &ALICE);
    t.file("data/empty", 0o644, &ALICE, b"");
    t.file("data/exact", 0o644, &ALICE, &prng_bytes(2, c));
    t.file("data/exact-minus-1", 0o600, &ALICE, &text_bytes(3, c - 1));
    t.file("data/exact-plus-1", 0o444, &ALICE, &prng_bytes(4, c + 1));
    t.file("data/multi", 0o640, &ALICE, &prng_bytes(5, c * 3 + c / 2));
    t.file("data/text", 0o644, &ALICE, &text_bytes(6, 2 * c + 17));
    t.file("data/zeros", 0o644, &ALICE, &vec![0u8; 2 * c + 5]);
    let mut mixed = prng_bytes(7, c / 2);
    mixed.extend(std::iter::repeat_n(0u8, c + 4096));
    mixed.extend(prng_bytes(8, c / 2 + 3));
    t.file("data/mixed-zeros", 0o644, &ALICE, &mixed);
    t.file("data/one-byte", 0o644, &ALICE, b"x");
    t.file("data/setuid", 0o4755, &ROOT, b"#!/bin/sh\necho setuid\n");
    t.file("data/setgid", 0o2711, &ROOT, b"setgid\n");
    t.hardlink("data/hardlink-to-multi", "data/multi", 0o640, &ALICE);
    t.hardlink("data/hardlink-to-empty", "data/empty", 0o644, &ALICE);
    t.dir("data/sticky/", 0o1777, &ROOT);
    t.file(
        "data/sticky/owned-by-nobody",
        0o644,
        &NOBODY,
        b"nobody's file\n",
    );
    // A file with mtime 0 (reproducible builds write these).
    let mut h = t.header(tar::EntryType::Regular, 0o644, &ROOT, 6, false);
    h.set_mtime(0);
    t.b.append_data(&mut h, "data/epoch0", &b"epoch\n"[..])
        .unwrap();

    t.dir("dev/", 0o755, &ROOT);
    t.dev(tar::EntryType::Char, "dev/null", 0o666, 1, 3);
    t.dev(tar::EntryType::Block, "dev/loop0", 0o660, 7, 0);
    t.dev(tar::EntryType::Block, "dev/bigdev", 0o600, 259, 65537);
    t.dev(tar::EntryType::Fifo, "dev/fifo", 0o644, 0, 0);

    t.dir("etc/", 0o755, &ROOT);
    t.file("etc/hostname", 0o644, &ROOT, b"lazysnap\n");
    t.symlink("etc/absolute-link", "/etc/hostname");
    t.symlink("etc/dangling", "../nowhere/at/all");

    t.dir("unicode/", 0o755, &ROOT);
    t.file(
        "unicode/héllo wörld ☃.txt",
        0o644,
        &ROOT,
        "grüße ☃\n".as_bytes(),
    );
    t.dir("unicode/日本語/", 0o755, &ROOT);
    t.file(
        "unicode/日本語/ファイル.txt",
        0o644,
        &ROOT,
        &text_bytes(9, 1000),
    );

    let long = long_name();
    t.dir("long/", 0o755, &ROOT);
    t.file(
        &format!("long/{long}"),
        0o644,
        &ROOT,
        &prng_bytes(10, c + 1),
    );
    t.hardlink(
        "long/hardlink-to-long-name",
        &format!("long/{long}"),
        0o644,
        &ROOT,
    );
    let (deep_dirs, deep_file) = deep_path();
    t.symlink("long/symlink-to-deep", &format!("../{deep_file}"));
    for d in &deep_dirs {
        t.dir(d, 0o755, &ROOT);
    }
    t.pax_entry(
        &deep_file,
        tar::EntryType::Regular,
        0o644,
        &ALICE,
        &text_bytes(11, c * 2 + 1),
        &[],
    );

    t.dir("xattr/", 0o755, &ROOT);
    let cap: &[u8] = &[1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    t.pax_entry(
        "xattr/ping",
        tar::EntryType::Regular,
        0o755,
        &ROOT,
        &prng_bytes(12, 3000),
        &[
            ("user.foo", b"bar"),
            ("security.capability", cap),
            ("user.binary", &[0xff, 0x00, 0x80, b'A']),
        ],
    );
    t.pax_entry(
        "xattr/dir-with-xattr/",
        tar::EntryType::Directory,
        0o755,
        &ROOT,
        b"",
        &[("user.dirattr", b"on a directory")],
    );

    t.dir("whiteout/", 0o755, &ROOT);
    t.file("whiteout/.wh.gone", 0o644, &ROOT, b"");
    t.dir("whiteout/opaque/", 0o755, &ROOT);
    t.file("whiteout/opaque/.wh..wh..opq", 0o644, &ROOT, b"");
    t.file("whiteout/opaque/kept", 0o644, &ROOT, b"kept\n");

    t.finish()
}

/// Entries whose parent directories have no entries of their own.
pub fn corpus_without_parent_dirs() -> Vec<u8> {
    let mut t = Corpus::new();
    t.file("a/b/c.txt", 0o644, &ROOT, b"c\n");
    t.file("a/b/d/e.txt", 0o600, &ALICE, &text_bytes(20, 5000));
    t.file("x/y.bin", 0o644, &ROOT, &prng_bytes(21, 70_000));
    t.symlink("x/z", "../a/b/c.txt");
    t.hardlink("q/hard", "x/y.bin", 0o644, &ROOT);
    t.file("top.txt", 0o644, &ROOT, b"top\n");
    t.finish()
}

/// RFC 3339 UTC (seconds) of a Unix time, as Go's `time.RFC3339` prints it.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Go's `%q` of a byte string (strconv.Quote), for the ASCII/UTF-8 values the corpus uses.
pub fn go_quote(b: &[u8]) -> String {
    let mut s = String::from("\"");
    let mut i = 0;
    while i < b.len() {
        let width = match b[i] {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 0,
        };
        let ch = if width > 0 && i + width <= b.len() {
            std::str::from_utf8(&b[i..i + width])
                .ok()
                .and_then(|t| t.chars().next())
        } else {
            None
        };
        match ch {
            None => {
                s.push_str(&format!("\\x{:02x}", b[i]));
                i += 1;
                continue;
            }
            Some(c) => {
                match c {
                    '\x07' => s.push_str("\\a"),
                    '\x08' => s.push_str("\\b"),
                    '\x0c' => s.push_str("\\f"),
                    '\n' => s.push_str("\\n"),
                    '\r' => s.push_str("\\r"),
                    '\t' => s.push_str("\\t"),
                    '\x0b' => s.push_str("\\v"),
                    '"' => s.push_str("\\\""),
                    '\\' => s.push_str("\\\\"),
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                        s.push_str(&format!("\\x{:02x}", c as u32))
                    }
                    c if (0x80..0xa0).contains(&(c as u32)) => {
                        s.push_str(&format!("\\u{:04x}", c as u32))
                    }
                    c => s.push(c),
                }
                i += width;
            }
        }
    }
    s.push('"');
    s
}

/// A busybox root filesystem (as a tar) whose `/etc/motd` says `motd`, with a
/// 24 MiB file the container never reads: the bytes a lazy pull must not fetch.
pub fn busybox_tar(motd: &str, seed: u64) -> Vec<u8> {
    busybox_rootfs(
        motd,
        &[
            ("data/", Vec::new()),
            ("data/unread.bin", prng_bytes(seed, 24 << 20)),
        ],
    )
}

/// A busybox root filesystem (as a tar): `/bin/busybox` with applet links,
/// `/etc/motd` saying `motd`, and `files` (a path ending in `/` is a directory).
pub fn busybox_rootfs(motd: &str, files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, mode: u32, data: &[u8], kind: tar::EntryType, link: Option<&str>| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match link {
            Some(l) => b.append_link(&mut h, path, l).unwrap(),
            None => b.append_data(&mut h, path, data).unwrap(),
        }
    };
    for d in ["bin/", "etc/", "tmp/", "proc/", "sys/", "dev/"] {
        add(d, 0o755, b"", tar::EntryType::Directory, None);
    }
    add(
        "bin/busybox",
        0o755,
        &std::fs::read("/bin/busybox").unwrap(),
        tar::EntryType::Regular,
        None,
    );
    for a in ["sh", "cat", "echo", "ls", "sleep"] {
        add(
            &format!("bin/{a}"),
            0o777,
            b"",
            tar::EntryType::Symlink,
            Some("busybox"),
        );
    }
    add(
        "etc/motd",
        0o644,
        format!("{motd}\n").as_bytes(),
        tar::EntryType::Regular,
        None,
    );
    for (path, data) in files {
        if path.ends_with('/') {
            add(path, 0o755, b"", tar::EntryType::Directory, None);
        } else {
            add(path, 0o644, data, tar::EntryType::Regular, None);
        }
    }
    b.into_inner().unwrap()
}
