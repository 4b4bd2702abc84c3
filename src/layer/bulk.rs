//! Whole-layer reads for unlazy: each wanted chunk exactly once, cached chunks from
//! the cache, missing ones fetched in runs of adjacent ranges several requests at a
//! time, decompressed and verified on all cores, and handed to a sink as they come.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rayon::prelude::*;

use super::{RemoteLayer, fetch};
use crate::error::{Error, Result};
use crate::format::chunk;

/// Range requests in flight at once.
const REQUESTS: usize = 4;
/// Compressed bytes per run of chunks (one request, or a few when holes split it).
const RUN_BYTES: u64 = 8 << 20;

impl RemoteLayer {
    /// Hands each chunk of `idxs` (global chunk indices) to `sink` once, from many
    /// threads and in no particular order. Zero chunks are skipped (they have no
    /// bytes). Fetched chunks are not put into the cache: the caller is making the
    /// layer local, and the cache keeps what readers already asked for.
    pub fn read_chunks(
        &self,
        idxs: &[usize],
        sink: &(dyn Fn(usize, &[u8]) -> Result<()> + Sync),
    ) -> Result<()> {
        let all = self.index.all_chunks();
        let mut order: Vec<usize> = idxs
            .iter()
            .copied()
            .filter(|&i| all.get(i).is_some_and(|c| !c.zeros))
            .collect();
        order.sort_by_key(|&i| (all[i].compressed_offset, all[i].inner_offset));
        order.dedup();
        let mut runs: Vec<Vec<usize>> = Vec::new();
        let mut start = 0;
        for i in order {
            let c = &all[i];
            match runs.last_mut() {
                Some(run) if c.compressed_end.saturating_sub(start) <= RUN_BYTES => run.push(i),
                _ => {
                    start = c.compressed_offset;
                    runs.push(vec![i]);
                }
            }
        }
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let first_err: Mutex<Option<Error>> = Mutex::new(None);
        let worker = || {
            while !stop.load(Ordering::Relaxed) {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(run) = runs.get(k) else { return };
                if let Err(e) = self.read_run(run, sink) {
                    stop.store(true, Ordering::Relaxed);
                    super::lock(&first_err).get_or_insert(e);
                    return;
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 1..REQUESTS.min(runs.len()) {
                s.spawn(worker);
            }
            worker();
        });
        match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// One run: cached chunks straight to the sink, the others in one fetch.
    fn read_run(
        &self,
        run: &[usize],
        sink: &(dyn Fn(usize, &[u8]) -> Result<()> + Sync),
    ) -> Result<()> {
        let all = self.index.all_chunks();
        let missing: Vec<usize> = run
            .par_iter()
            .map(|&i| match self.cache.get(&self.key(&all[i])) {
                Some(b) => sink(i, &b).map(|()| None),
                None => Ok(Some(i)),
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        // through the shared fetch path, so that a reader wanting one of these
        // chunks meanwhile waits for this fetch instead of fetching it again
        let data = fetch::get(self, &missing, RUN_BYTES, false)?;
        missing
            .par_iter()
            .zip(data.par_iter())
            .try_for_each(|(&i, d)| sink(i, d))
    }

    /// Names the file of global chunk `i` in a chunk error (walks the index; errors
    /// only).
    pub(super) fn name_chunk(&self, e: Error, i: usize) -> Error {
        let owner =
            (0..self.index.node_count() as u32).find(|&id| self.index.chunk_span(id).contains(&i));
        match owner.and_then(|id| self.index.path_of(id)) {
            Some(path) => chunk::with_path(e, &path),
            None => e,
        }
    }
}
