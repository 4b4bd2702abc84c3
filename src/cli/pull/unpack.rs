//! A layer that cannot be lazy, unpacked by lazysnap itself: the blob is fetched in
//! ranges (several in flight, in order), each piece goes to containerd's content
//! store, to a running digest, and to the applier, which extracts it into the
//! active snapshot's upper directory in overlay form. The diff id (sha256 of the
//! uncompressed tar) is computed on the way and checked against the image config
//! before anything is committed.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use containerd_client::types::Mount;
use indicatif::ProgressBar;
use lazysnap::format::input::InputCompression;
use lazysnap::snapshot::ApplyStats;
use lazysnap::snapshot::apply::apply_stream;
use lazysnap_registry::{Blob, Descriptor, Digest};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::containerd::Containerd;
use super::content::{ContentWriter, ref_key};

/// Bytes per range request.
const PIECE: u64 = 4 << 20;
/// Range requests in flight.
const IN_FLIGHT: usize = 4;
/// Pieces fetched ahead of the applier.
const AHEAD: usize = 4;

/// The directory a snapshot's mounts write to: the `upperdir=` of an overlay, or
/// the source of a bind mount (the snapshotter runs on this host).
pub fn upper_dir(mounts: &[Mount]) -> anyhow::Result<PathBuf> {
    match mounts {
        [m] if m.r#type == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") => {
            Ok(PathBuf::from(&m.source))
        }
        [m] if m.r#type == "overlay" => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("overlay mount without an upperdir: {:?}", m.options)),
        _ => bail!(
            "the snapshotter returned mounts lazysnap cannot extract into: {:?}",
            mounts
                .iter()
                .map(|m| format!("{} {}", m.r#type, m.source))
                .collect::<Vec<_>>()
        ),
    }
}

/// Fetches, stores, extracts and verifies the layer `desc` into `upper`. On error
/// the content write is aborted; the caller removes the snapshot.
pub async fn unpack(
    cd: &Containerd,
    blob: Blob,
    desc: &Descriptor,
    diff_id: &Digest,
    upper: PathBuf,
    bar: &ProgressBar,
) -> anyhow::Result<ApplyStats> {
    let digest = desc.digest.to_string();
    let what = format!("layer {digest}");
    if diff_id.algorithm() != "sha256" {
        bail!("{what}: diff id {diff_id}: only sha256 is supported");
    }
    let mut writer =
        ContentWriter::open(cd, &ref_key("layer", &digest), &digest, desc.size).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(AHEAD);
    let applier = tokio::task::spawn_blocking(move || extract(rx, &upper));
    let fetched = fetch(blob, desc, &mut writer, tx, bar).await;
    let applied = applier
        .await
        .map_err(|e| anyhow!("{what}: the extraction thread failed: {e}"));
    let result = match (fetched, applied) {
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e),
        (Ok(_), Ok(Err(e))) => Err(e.context(format!("extracting {what}"))),
        (Ok(got), Ok(Ok(_))) if got != desc.digest.as_str() => Err(anyhow!(
            "{what}: the registry sent content with digest {got}"
        )),
        (Ok(_), Ok(Ok((_, diff)))) if diff != diff_id.as_str() => Err(anyhow!(
            "{what}: diff id mismatch: the image config says {diff_id}, the layer's tar is {diff}"
        )),
        (Ok(_), Ok(Ok((stats, _)))) => Ok(stats),
    };
    match (result, writer) {
        (Ok(stats), Some(w)) => {
            w.commit().await?;
            Ok(stats)
        }
        (Ok(stats), None) => Ok(stats),
        (Err(e), Some(w)) => {
            w.abort().await;
            Err(e)
        }
        (Err(e), None) => Err(e),
    }
}

/// Reads the blob in order, handing each piece to the content writer and the
/// applier; returns the digest of what was read. Stops early (without error) when
/// the applier hangs up; its own error says why.
async fn fetch(
    blob: Blob,
    desc: &Descriptor,
    writer: &mut Option<ContentWriter>,
    tx: mpsc::Sender<Bytes>,
    bar: &ProgressBar,
) -> anyhow::Result<String> {
    let size = desc.size;
    let mut hasher = Sha256::new();
    let mut inflight: VecDeque<JoinHandle<lazysnap_registry::Result<Bytes>>> = VecDeque::new();
    let mut next = 0u64;
    let result = async {
        loop {
            while inflight.len() < IN_FLIGHT && next < size {
                let (b, off) = (blob.clone(), next);
                let len = PIECE.min(size - off);
                inflight.push_back(tokio::spawn(
                    async move { b.read_at(off, len as usize).await },
                ));
                next += len;
            }
            let Some(h) = inflight.pop_front() else {
                break;
            };
            let data = h
                .await
                .map_err(|e| anyhow!("layer {}: fetch task failed: {e}", desc.digest))??;
            hasher.update(&data);
            if let Some(w) = writer.as_mut() {
                w.write(&data).await?;
            }
            bar.inc(data.len() as u64);
            if tx.send(data).await.is_err() {
                break;
            }
        }
        anyhow::Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
    }
    .await;
    for h in inflight {
        h.abort();
    }
    result
}

/// The applier's side: decompresses what the channel brings, hashes the tar, and
/// extracts it into `upper`. Returns the stats and the diff id.
fn extract(rx: mpsc::Receiver<Bytes>, upper: &Path) -> anyhow::Result<(ApplyStats, String)> {
    let mut src = ChannelReader {
        rx,
        cur: Bytes::new(),
    };
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < head.len() {
        match src.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    let input = io::Cursor::new(head[..got].to_vec()).chain(src);
    let tar: Box<dyn Read + Send> = match InputCompression::sniff(&head[..got]) {
        InputCompression::None => Box::new(input),
        InputCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
        InputCompression::Zstd => Box::new(zstd::stream::read::Decoder::new(input)?),
    };
    let mut tar = Hashing {
        inner: tar,
        hasher: Sha256::new(),
    };
    let stats = apply_stream(&mut tar, upper)?;
    // the applier stops at the end-of-archive blocks; the diff id covers all of it
    io::copy(&mut tar, &mut io::sink()).context("reading the layer past its end")?;
    Ok((
        stats,
        format!("sha256:{}", hex::encode(tar.hasher.finalize())),
    ))
}

/// A `Read` over the pieces the fetcher sends; EOF when it hangs up.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Hashes everything read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(t: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: t.into(),
            source: source.into(),
            target: String::new(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn finds_the_upper_directory() {
        let bind = mount("bind", "/r/snapshots/1/fs", &["rbind", "rw"]);
        assert_eq!(upper_dir(&[bind]).unwrap(), Path::new("/r/snapshots/1/fs"));
        let ov = mount(
            "overlay",
            "overlay",
            &[
                "workdir=/r/snapshots/2/work",
                "upperdir=/r/snapshots/2/fs",
                "lowerdir=/r/snapshots/1/fs",
            ],
        );
        assert_eq!(upper_dir(&[ov]).unwrap(), Path::new("/r/snapshots/2/fs"));
        let ro = mount("overlay", "overlay", &["lowerdir=/a:/b"]);
        assert!(upper_dir(&[ro]).is_err());
        assert!(upper_dir(&[]).is_err());
        assert!(upper_dir(&[mount("ext4", "/dev/dm-1", &[])]).is_err());
    }

    #[test]
    fn extracts_and_hashes_a_gzip_stream() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "etc/hello", &b"world"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let want = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel(64);
        for piece in gz.chunks(7) {
            tx.try_send(Bytes::copy_from_slice(piece)).unwrap();
        }
        drop(tx);
        let (stats, diff) = extract(rx, dir.path()).unwrap();
        assert_eq!(diff, want);
        assert_eq!(stats.files, 1);
        assert_eq!(
            std::fs::read(dir.path().join("etc/hello")).unwrap(),
            b"world"
        );
    }
}
