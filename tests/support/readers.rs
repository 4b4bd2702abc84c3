//! Concurrent readers of lazily mounted files: each read opens a file, reads a random
//! range, compares it with the file's known content, and drops the range from the
//! page cache again (`POSIX_FADV_DONTNEED`) so that the next read of it reaches the
//! daemon instead of the kernel's cache. Outcomes and latencies are counted.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Rng;

/// A file to read and what it must contain.
pub struct Target {
    pub path: PathBuf,
    pub content: Arc<Vec<u8>>,
}

/// What the readers saw.
#[derive(Debug, Default, Clone)]
pub struct ReadStats {
    /// Reads started.
    pub attempted: u64,
    /// Reads that returned exactly the expected bytes.
    pub correct: u64,
    /// Reads that failed with EIO (possibly after a correct prefix).
    pub eio: u64,
    /// Reads that failed otherwise (message, for the first few).
    pub other: u64,
    pub other_messages: Vec<String>,
    /// Reads that returned bytes differing from the file's content.
    pub wrong: u64,
    pub wrong_messages: Vec<String>,
    /// Bytes read and checked.
    pub bytes: u64,
    /// Per-read latency, in microseconds.
    pub latencies_us: Vec<u32>,
}

impl ReadStats {
    fn merge(&mut self, o: ReadStats) {
        self.attempted += o.attempted;
        self.correct += o.correct;
        self.eio += o.eio;
        self.other += o.other;
        self.wrong += o.wrong;
        self.bytes += o.bytes;
        self.latencies_us.extend(o.latencies_us);
        for (to, from) in [
            (&mut self.other_messages, o.other_messages),
            (&mut self.wrong_messages, o.wrong_messages),
        ] {
            to.extend(from);
            to.truncate(10);
        }
    }

    /// The `q` quantile (0..=1) of the latencies.
    pub fn latency(&self, q: f64) -> Duration {
        let mut v = self.latencies_us.clone();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v.sort_unstable();
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        Duration::from_micros(v[i] as u64)
    }
}

fn drop_cached(f: &std::fs::File) {
    // SAFETY: a plain advice call on an open descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// One read of `len` bytes at `offset`; the outcome is added to `st`.
pub fn read_once(t: &Target, offset: u64, len: usize, st: &mut ReadStats) {
    st.attempted += 1;
    let start = Instant::now();
    let f = match std::fs::File::open(&t.path) {
        Ok(f) => f,
        Err(e) => {
            classify(t, &e, st);
            return;
        }
    };
    let mut buf = vec![0u8; len];
    let mut got = 0;
    let mut err = None;
    while got < len {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    drop_cached(&f);
    st.latencies_us
        .push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
    let want = &t.content[offset as usize..offset as usize + len];
    if buf[..got] != want[..got] {
        st.wrong += 1;
        let first = buf[..got]
            .iter()
            .zip(&want[..got])
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        let last = (0..got).rev().find(|&i| buf[i] != want[i]).unwrap_or(0);
        st.wrong_messages.push(
            format!(
                "{}: {len} bytes at {offset}: wrong bytes from {} to {} of {got}",
                t.path.display(),
                offset + first as u64,
                offset + last as u64,
            ) + &debug_wrong(t, &buf[first..got]),
        );
        return;
    }
    st.bytes += got as u64;
    match err {
        Some(e) => classify(t, &e, st),
        None if got < len => {
            st.wrong += 1;
            st.wrong_messages.push(format!(
                "{}: {len} bytes at {offset}: short read of {got}",
                t.path.display()
            ));
        }
        None => st.correct += 1,
    }
}

fn debug_wrong(t: &Target, got: &[u8]) -> String {
    let probe = &got[..got.len().min(32)];
    let zeros = got.iter().all(|&b| b == 0);
    let at = t.content.windows(probe.len()).position(|w| w == probe);
    format!(" zeros={zeros} found_at={at:?}")
}

fn classify(t: &Target, e: &std::io::Error, st: &mut ReadStats) {
    if e.raw_os_error() == Some(libc::EIO) {
        st.eio += 1;
    } else {
        st.other += 1;
        if st.other_messages.len() < 10 {
            st.other_messages.push(format!("{}: {e}", t.path.display()));
        }
    }
}

/// Runs `threads` readers over `targets` until `stop` is set; each read is up to
/// `max_len` bytes at a random offset. Thread `i` uses seed `seed + i`.
pub fn run(
    targets: Arc<Vec<Target>>,
    threads: usize,
    seed: u64,
    max_len: usize,
    stop: Arc<AtomicBool>,
) -> ReadStats {
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (targets, stop) = (targets.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("reader-{i}"))
                .stack_size(256 << 10)
                .spawn(move || {
                    let mut rng = Rng::new(seed + i as u64);
                    let mut st = ReadStats::default();
                    while !stop.load(Ordering::Relaxed) {
                        let t = &targets[rng.below(targets.len() as u64) as usize];
                        let size = t.content.len() as u64;
                        if size == 0 {
                            continue;
                        }
                        let len = 1 + rng.below(max_len.min(size as usize) as u64);
                        let offset = rng.below(size - len + 1);
                        read_once(t, offset, len as usize, &mut st);
                    }
                    st
                })
                .expect("spawn reader")
        })
        .collect();
    let mut all = ReadStats::default();
    for h in handles {
        all.merge(h.join().expect("reader thread"));
    }
    all
}
