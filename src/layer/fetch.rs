//! Fetching chunks: cache first, then one range per run of adjacent missing chunks.
//! A chunk being fetched by one reader is awaited by the others instead of being
//! fetched twice.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use rayon::prelude::*;

use super::RemoteLayer;
use crate::error::{Error, Result};
use crate::format::chunk;

/// One chunk fetch in progress; waiters block until it has a result.
#[derive(Default)]
pub(super) struct Inflight {
    result: Mutex<Option<std::result::Result<Bytes, String>>>,
    cv: Condvar,
}

impl Inflight {
    fn finish(&self, r: std::result::Result<Bytes, String>) {
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.cv.notify_all();
    }

    fn wait(&self) -> std::result::Result<Bytes, String> {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The fetches in progress of one layer, by global chunk index.
#[derive(Default)]
pub(super) struct Inflights(Mutex<HashMap<usize, Arc<Inflight>>>);

impl Inflights {
    /// Either the existing fetch to wait for, or a new one the caller owns.
    fn claim(&self, i: usize) -> (Arc<Inflight>, bool) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = m.get(&i) {
            return (f.clone(), false);
        }
        let f = Arc::new(Inflight::default());
        m.insert(i, f.clone());
        (f, true)
    }

    /// Whether chunk `i` is being fetched.
    pub(super) fn contains(&self, i: usize) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&i)
    }

    fn release(&self, i: usize) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&i);
    }
}

/// Finishes every owned fetch (with an error if none was set) and forgets it, even
/// when the fetching code returns early.
struct Owned<'a> {
    layer: &'a RemoteLayer,
    items: Vec<(usize, usize, Arc<Inflight>)>,
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        for (_, i, f) in &self.items {
            let pending = f.result.lock().map(|g| g.is_none()).unwrap_or(true);
            if pending {
                f.finish(Err("fetch abandoned".into()));
            }
            self.layer.inflight.release(*i);
        }
    }
}

/// The chunks `idxs`, from the cache, from a fetch in progress, or fetched now.
/// `keep` puts what is fetched into the cache; without it (unlazy: the layer is
/// being made local) only into its memory part, for readers racing the unlazy.
pub(super) fn get(
    layer: &RemoteLayer,
    idxs: &[usize],
    max_span: u64,
    keep: bool,
) -> Result<Vec<Bytes>> {
    let all = layer.index.all_chunks();
    let mut out: Vec<Option<Bytes>> = vec![None; idxs.len()];
    let mut owned = Owned {
        layer,
        items: Vec::new(),
    };
    let mut waits = Vec::new();
    for (k, &i) in idxs.iter().enumerate() {
        let c = &all[i];
        if c.zeros {
            out[k] = Some(Bytes::from(vec![0u8; c.size as usize]));
            continue;
        }
        if let Some(b) = layer.cache.get(&layer.key(c)) {
            layer.mark_cached(i);
            out[k] = Some(b);
            continue;
        }
        let (f, mine) = layer.inflight.claim(i);
        if mine {
            // it may have landed in the cache since we looked
            if let Some(b) = layer.cache.get(&layer.key(c)) {
                f.finish(Ok(b.clone()));
                layer.inflight.release(i);
                out[k] = Some(b);
                continue;
            }
            owned.items.push((k, i, f));
        } else {
            waits.push((k, f));
        }
    }
    if !owned.items.is_empty() {
        fetch_owned(layer, &owned.items, max_span, keep, &mut out)?;
    }
    for (k, f) in waits {
        let c = &all[idxs[k]];
        out[k] = Some(f.wait().map_err(|reason| Error::Chunk {
            path: String::new(),
            offset: c.file_offset,
            reason,
        })?);
    }
    Ok(out.into_iter().map(Option::unwrap_or_default).collect())
}

/// Fetches of a run whose chunks fail to verify, after the first.
const VERIFY_RETRIES: u32 = 2;

/// Groups owned chunks into runs of adjacent compressed ranges and fetches them.
fn fetch_owned(
    layer: &RemoteLayer,
    items: &[(usize, usize, Arc<Inflight>)],
    max_span: u64,
    keep: bool,
    out: &mut [Option<Bytes>],
) -> Result<()> {
    let all = layer.index.all_chunks();
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&j| all[items[j].1].compressed_offset);
    let mut runs: Vec<(Range<u64>, Vec<usize>)> = Vec::new();
    for j in order {
        let c = &all[items[j].1];
        match runs.last_mut() {
            Some((r, members))
                if c.compressed_offset <= r.end
                    && c.compressed_end.max(r.end) - r.start <= max_span =>
            {
                r.end = r.end.max(c.compressed_end);
                members.push(j);
            }
            _ => runs.push((c.compressed_offset..c.compressed_end, vec![j])),
        }
    }
    // A run whose bytes fail to decompress or verify is fetched again: a body
    // damaged on the way is a registry fault like any other, retried before the read
    // fails. Nothing is cached or handed out until it verifies.
    let mut pending: Vec<usize> = (0..runs.len()).collect();
    let mut first_err = None;
    for attempt in 0..=VERIFY_RETRIES {
        let ranges: Vec<Range<u64>> = pending.iter().map(|&r| runs[r].0.clone()).collect();
        let started = std::time::Instant::now();
        let fetched = layer.read_ranges(&ranges);
        tracing::debug!(
            layer = layer.name(),
            ranges = ranges.len(),
            bytes = ranges.iter().map(|r| r.end - r.start).sum::<u64>(),
            first = ranges.first().map_or(0, |r| r.start),
            ms = started.elapsed().as_millis() as u64,
            attempt,
            "fetched"
        );
        let fetched = match fetched {
            Ok(f) if f.len() == ranges.len() => f,
            Ok(_) => {
                let e = "registry returned the wrong number of ranges".to_string();
                fail(items, &e);
                return Err(Error::Fetch {
                    blob: layer.name().to_string(),
                    reason: e,
                });
            }
            Err(e) => {
                fail(items, &e.to_string());
                return Err(e);
            }
        };
        let last = attempt == VERIFY_RETRIES;
        let mut again = Vec::new();
        for (&r, bytes) in pending.iter().zip(fetched) {
            let (range, members) = &runs[r];
            // chunks are independent: decompress and verify them on all cores
            let decoded: Vec<(usize, Result<Bytes>)> = members
                .par_iter()
                .map(|&j| {
                    let c = &all[items[j].1];
                    let from = (c.compressed_offset - range.start) as usize;
                    let to = (c.compressed_end - range.start) as usize;
                    let r = bytes
                        .get(from..to)
                        .ok_or_else(|| Error::Fetch {
                            blob: layer.name().to_string(),
                            reason: format!("short range {}..{}", range.start, range.end),
                        })
                        .and_then(|z| decode(layer, c, z));
                    (j, r)
                })
                .collect();
            if !last && let Some((_, Err(e))) = decoded.iter().find(|(_, r)| r.is_err()) {
                tracing::warn!(layer = layer.name(), error = %e, attempt, "chunk rejected; fetching it again");
                again.push(r);
                continue;
            }
            for (j, r) in decoded {
                let (k, i, f) = &items[j];
                let c = &all[*i];
                match r {
                    Ok(data) => {
                        if keep {
                            layer.cache.insert(layer.key(c), data.clone());
                            layer.mark_cached(*i);
                        } else {
                            layer.cache.insert_memory(layer.key(c), data.clone());
                        }
                        f.finish(Ok(data.clone()));
                        out[*k] = Some(data);
                    }
                    Err(e) => {
                        tracing::error!(layer = layer.name(), error = %e, "chunk rejected");
                        f.finish(Err(e.to_string()));
                        first_err.get_or_insert_with(|| layer.name_chunk(e, *i));
                    }
                }
            }
        }
        if again.is_empty() {
            break;
        }
        pending = again;
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub(super) fn decode(layer: &RemoteLayer, c: &crate::format::Chunk, z: &[u8]) -> Result<Bytes> {
    let data = chunk::decompress(layer.format.compression(), z, c)?;
    match c.digest {
        Some(d) => chunk::verify(&data, &d, c)?,
        None if layer.cfg.allow_unverified => {}
        None => {
            return Err(Error::Chunk {
                path: String::new(),
                offset: c.file_offset,
                reason: "chunk has no digest to verify against".into(),
            });
        }
    }
    Ok(Bytes::from(data))
}

fn fail(items: &[(usize, usize, Arc<Inflight>)], reason: &str) {
    for (_, _, f) in items {
        f.finish(Err(reason.to_string()));
    }
}
