//! [`apply_stream`](super::apply_stream): one thread decompresses the blob into
//! recycled 1 MiB buffers, the caller's thread parses the tar from them and writes
//! the tree, so decompression and file creation overlap.

use std::io::{self, Read};
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};

use nix::sys::stat::SFlag;

use super::ApplyStats;
use super::finish::{Finishers, Job};
use super::names::{Name, classify, link_target};
use super::target::{At, Attrs, Target, finish_file, write_sparse};
use crate::error::{Error, Result};
use crate::format::input::InputCompression;
use crate::format::tarhdr::{BLOCK, Extensions, Header, Kind, Meta, at};

/// Size of one decompressed buffer handed to the writer.
const BUF: usize = 1 << 20;
/// Buffers decompressed ahead of the writer.
const AHEAD: usize = 4;
/// Files up to this size are finished on other threads.
const SMALL: u64 = 64 << 10;
/// Threads finishing small files: the cores left by this one (the decompressing
/// thread mostly waits on small-file layers), at most 3.
fn finishers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).clamp(1, 3))
}

type Chunk = io::Result<Vec<u8>>;

pub fn apply(blob: impl Read + Send, dest: &Path) -> Result<ApplyStats> {
    let mut target = Target::open(dest)?;
    target.root_dir(&Target::ROOT, "/")?;
    let (tx, rx) = sync_channel::<Chunk>(AHEAD);
    let (back_tx, back_rx) = channel::<Vec<u8>>();
    let stats = std::thread::scope(|s| {
        let producer = std::thread::Builder::new()
            .name("apply-decompress".into())
            .spawn_scoped(s, move || decompress(blob, tx, back_rx))
            .map_err(|e| Error::io("start the decompression thread", e))?;
        let feed = Feed {
            rx,
            back: back_tx,
            buf: Vec::new(),
            pos: 0,
            offset: 0,
        };
        let finishers = Finishers::start(s, finishers())?;
        // the feed is dropped on return, which stops the producer early on errors
        let r = extract(feed, &mut target, &finishers);
        let finished = finishers.finish();
        if producer.join().is_err() {
            return Err(Error::Tar("the decompression thread panicked".into()));
        }
        r.and_then(|stats| finished.map(|()| stats))
    })?;
    target.finish()?;
    Ok(stats)
}

/// Sniffs the compression, then sends decompressed buffers until the end of the
/// stream, an error (sent on), or the writer hanging up.
fn decompress(blob: impl Read, tx: SyncSender<Chunk>, back: Receiver<Vec<u8>>) {
    let mut blob = blob;
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < head.len() {
        match blob.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
    let compression = InputCompression::sniff(&head[..got]);
    let input = io::Cursor::new(head[..got].to_vec()).chain(blob);
    let mut dec = match compression.decoder(Box::new(input)) {
        Ok(d) => d,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    loop {
        let mut buf = back.try_recv().unwrap_or_default();
        buf.resize(BUF, 0);
        let mut n = 0;
        while n < BUF {
            match dec.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if n > 0 {
                        buf.truncate(n);
                        let _ = tx.send(Ok(buf));
                    }
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        if n == 0 {
            return;
        }
        buf.truncate(n);
        if tx.send(Ok(buf)).is_err() || n < BUF {
            return;
        }
    }
}

/// The writer's view of the decompressed stream.
struct Feed {
    rx: Receiver<Chunk>,
    back: Sender<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    /// Offset of `buf[pos]` in the uncompressed stream.
    offset: u64,
}

impl Feed {
    /// Makes bytes available at `pos`; `false` at the end of the stream.
    fn fill(&mut self) -> Result<bool> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    let old = std::mem::replace(&mut self.buf, b);
                    if old.capacity() > 0 {
                        let _ = self.back.send(old);
                    }
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    return Err(Error::io(
                        format!(
                            "layer stream: decompressing at uncompressed offset {}",
                            self.offset
                        ),
                        e,
                    ));
                }
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Hands the next `n` bytes to `f` in pieces; the stream must hold them.
    fn take(&mut self, n: u64, entry: &str, mut f: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let mut left = n;
        while left > 0 {
            if !self.fill()? {
                return Err(Error::Tar(format!(
                    "{entry}: the stream ends {left} bytes short of the entry's {n} bytes (truncated layer or a size field larger than the data)"
                )));
            }
            let k = (self.buf.len() - self.pos).min(usize::try_from(left).unwrap_or(usize::MAX));
            f(&self.buf[self.pos..self.pos + k])?;
            self.pos += k;
            self.offset += k as u64;
            left -= k as u64;
        }
        Ok(())
    }

    fn skip(&mut self, n: u64, entry: &str) -> Result<()> {
        self.take(n, entry, |_| Ok(()))
    }

    /// Reads one header block; `false` when the stream ends exactly here.
    fn block(&mut self, out: &mut [u8; 512]) -> Result<bool> {
        if !self.fill()? {
            return Ok(false);
        }
        let mut got = 0;
        self.take(BLOCK, "header block", |b| {
            out[got..got + b.len()].copy_from_slice(b);
            got += b.len();
            Ok(())
        })?;
        Ok(true)
    }

    /// Reads what follows the end-of-archive marker, so that a corrupt compressed
    /// tail (bad checksum, truncated member) is an error too.
    fn drain(&mut self) -> Result<()> {
        while self.fill()? {
            self.offset += (self.buf.len() - self.pos) as u64;
            self.pos = self.buf.len();
        }
        Ok(())
    }
}

fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

fn extract(mut feed: Feed, t: &mut Target, fin: &Finishers) -> Result<ApplyStats> {
    let mut stats = ApplyStats::default();
    let mut ext = Extensions::default();
    let mut pending = false;
    let mut block = [0u8; 512];
    loop {
        let pos = feed.offset;
        if !feed.block(&mut block)? {
            return Err(Error::Tar(format!(
                "the stream ends at offset {pos} without an end-of-archive marker (truncated layer)"
            )));
        }
        let Some(h) = Header::parse(&block).map_err(|e| at(pos, e))? else {
            if pending {
                return Err(Error::Tar(format!(
                    "offset {pos}: archive ends between an extension header and its entry"
                )));
            }
            feed.drain()?;
            return Ok(stats);
        };
        if let Some(len) = Extensions::payload_len(&h).map_err(|e| at(pos, e))? {
            let mut data = Vec::with_capacity(len);
            feed.take(padded(len as u64), "extension header", |b| {
                let room = len - data.len().min(len);
                data.extend_from_slice(&b[..b.len().min(room)]);
                Ok(())
            })?;
            ext.absorb(&h, data).map_err(|e| at(pos, e))?;
            pending = true;
            continue;
        }
        let (meta, payload) = ext.entry(&h).map_err(|e| at(pos, e))?;
        pending = false;
        stats.entries += 1;
        let name = meta.name.clone();
        let used = entry(t, &mut feed, fin, meta, payload, &mut stats)?;
        feed.skip(padded(payload) - used, &name)?;
    }
}

pub(super) fn attrs(m: &Meta) -> Result<Attrs<'_>> {
    let id = |v: i64, what: &str| {
        u32::try_from(v)
            .map_err(|_| Error::Tar(format!("{:?}: {what} {v} is out of range", m.name)))
    };
    Ok(Attrs {
        mode: (m.mode & 0o7777) as u32,
        uid: id(m.uid, "uid")?,
        gid: id(m.gid, "gid")?,
        mtime: (m.mtime.secs, m.mtime.nanos),
        xattrs: m
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect(),
    })
}

/// Applies one entry; returns how many payload bytes it consumed.
fn entry(
    t: &mut Target,
    feed: &mut Feed,
    fin: &Finishers,
    meta: Meta,
    payload: u64,
    stats: &mut ApplyStats,
) -> Result<u64> {
    let m = &meta;
    let name = m.name.as_str();
    let (class, implicit) = classify(name)?;
    let (kind, a) = match implicit {
        true => (Kind::Dir, Target::ROOT),
        false => (m.kind.unwrap_or(Kind::Reg), attrs(m)?),
    };
    match class {
        Name::Hidden => {}
        Name::Root => {
            if kind != Kind::Dir {
                return Err(Error::Tar(format!(
                    "{name:?}: the root must be a directory"
                )));
            }
            t.root_dir(&a, name)?;
        }
        Name::Opaque { parents } => {
            let dir = t.parent(&parents, name)?;
            t.opaque(&dir, name)?;
            stats.whiteouts += 1;
        }
        Name::Whiteout { parents, target } => {
            let dir = t.parent(&parents, name)?;
            let at = At {
                dir: &dir,
                parents: &parents,
                base: target,
                entry: name,
            };
            if t.whiteout(&at, &a)? {
                stats.whiteouts += 1;
            }
        }
        Name::Entry { parents, base } => {
            let dir = t.parent(&parents, name)?;
            let at = At {
                dir: &dir,
                parents: &parents,
                base,
                entry: name,
            };
            match kind {
                Kind::Dir => t.dir(&at, &a)?,
                Kind::Reg if payload <= SMALL => {
                    let file = t.file(&at)?;
                    let mut data = Vec::with_capacity(payload as usize);
                    feed.take(payload, name, |b| {
                        data.extend_from_slice(b);
                        Ok(())
                    })?;
                    stats.files += 1;
                    stats.bytes += m.size;
                    fin.send(Job { file, data, meta })?;
                    return Ok(payload);
                }
                Kind::Reg => {
                    let f = t.file(&at)?;
                    let (mut off, mut end) = (0u64, 0u64);
                    feed.take(payload, name, |b| {
                        end = end.max(write_sparse(&f, off, b, name)?);
                        off += b.len() as u64;
                        Ok(())
                    })?;
                    finish_file(&f, m.size, end, &a, name)?;
                    stats.files += 1;
                    stats.bytes += m.size;
                    return Ok(payload);
                }
                Kind::Symlink => t.symlink(&at, &m.link_name, &a)?,
                Kind::Hardlink => {
                    let mut target = link_target(name, &m.link_name)?;
                    let Some(tbase) = target.pop() else {
                        return Err(Error::Tar(format!("{name:?}: hard link to the root")));
                    };
                    let via = format!("{name} (hard link to {})", m.link_name);
                    let tdir = t.resolve(&target, &via)?;
                    t.link(&at, &tdir, tbase, &m.link_name)?;
                }
                Kind::Char | Kind::Block | Kind::Fifo => {
                    let dev = |v: i64, what: &str| {
                        u32::try_from(v).map_err(|_| {
                            Error::Tar(format!("{name:?}: device {what} {v} is out of range"))
                        })
                    };
                    let (flag, rdev) = match kind {
                        Kind::Char => (SFlag::S_IFCHR, true),
                        Kind::Block => (SFlag::S_IFBLK, true),
                        _ => (SFlag::S_IFIFO, false),
                    };
                    let rdev = if rdev {
                        libc::makedev(dev(m.dev_major, "major")?, dev(m.dev_minor, "minor")?)
                    } else {
                        0
                    };
                    t.node(&at, flag, rdev, &a)?;
                }
            }
        }
    }
    Ok(0)
}
