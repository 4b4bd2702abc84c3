//! Small regular files are finished on other threads: once the stream's thread has
//! created a file (so that names, replacements and hard links stay in archive
//! order), writing its bytes, owner, xattrs, mode and mtime and closing it touch
//! only that open file, and overlap with creating the next ones.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

use super::stream::attrs;
use super::target::{finish_file, write_sparse};
use crate::error::{Error, Result};
use crate::format::tarhdr::Meta;

/// Files queued ahead of the finishing threads.
const QUEUE: usize = 256;

/// A created file, its bytes and its metadata.
pub struct Job {
    pub file: File,
    pub data: Vec<u8>,
    pub meta: Meta,
}

fn run(job: Job) -> Result<()> {
    let name = &job.meta.name;
    let end = write_sparse(&job.file, 0, &job.data, name)?;
    finish_file(&job.file, job.meta.size, end, &attrs(&job.meta)?, name)
}

#[derive(Default)]
struct Failure {
    failed: AtomicBool,
    first: Mutex<Option<Error>>,
}

/// The finishing threads.
pub struct Finishers<'scope> {
    tx: Option<SyncSender<Job>>,
    failure: Arc<Failure>,
    threads: Vec<ScopedJoinHandle<'scope, ()>>,
}

impl<'scope> Finishers<'scope> {
    /// Starts `n` threads in `s`.
    pub fn start<'env>(s: &'scope Scope<'scope, 'env>, n: usize) -> Result<Self> {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let rx: Arc<Mutex<Receiver<Job>>> = Arc::new(Mutex::new(rx));
        let failure = Arc::new(Failure::default());
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let (rx, failure) = (rx.clone(), failure.clone());
            let t = std::thread::Builder::new()
                .name(format!("apply-finish-{i}"))
                .spawn_scoped(s, move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(job) = job else { return };
                        if failure.failed.load(Ordering::Relaxed) {
                            continue;
                        }
                        if let Err(e) = run(job) {
                            failure.failed.store(true, Ordering::Relaxed);
                            let mut first = failure.first.lock().unwrap_or_else(|p| p.into_inner());
                            first.get_or_insert(e);
                        }
                    }
                })
                .map_err(|e| Error::io("start a file-finishing thread", e))?;
            threads.push(t);
        }
        Ok(Finishers {
            tx: Some(tx),
            failure,
            threads,
        })
    }

    /// Fails with a finishing thread's error, if one failed.
    pub fn check(&self) -> Result<()> {
        if !self.failure.failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let first = self
            .failure
            .first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        Err(first.unwrap_or_else(|| Error::Tar("a file-finishing thread failed".into())))
    }

    /// Queues a file; runs it here if the threads are gone.
    pub fn send(&self, job: Job) -> Result<()> {
        self.check()?;
        match &self.tx {
            Some(tx) => match tx.send(job) {
                Ok(()) => Ok(()),
                Err(e) => run(e.0),
            },
            None => run(job),
        }
    }

    /// Waits for every queued file; the first error of any thread.
    pub fn finish(mut self) -> Result<()> {
        self.tx = None;
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                return Err(Error::Tar("a file-finishing thread panicked".into()));
            }
        }
        self.check()
    }
}
