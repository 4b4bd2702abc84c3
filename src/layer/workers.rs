//! A small pool of threads for reads that must wait on the network, so FUSE
//! threads never block on a fetch.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Worker threads fed through a queue; dropped, they finish queued jobs and exit.
pub struct Workers {
    tx: Mutex<Option<Sender<Job>>>,
}

impl Workers {
    /// Starts `n` workers.
    pub fn new(n: usize, name: &str) -> Arc<Self> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n.max(1) {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    loop {
                        let job = {
                            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
                            guard.recv()
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a read worker");
            }
        }
        Arc::new(Workers {
            tx: Mutex::new(Some(tx)),
        })
    }

    /// Queues a job; if the pool is shut down the job runs on the caller's thread.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match tx {
            Some(tx) => {
                if let Err(e) = tx.send(Box::new(job)) {
                    (e.0)();
                }
            }
            None => job(),
        }
    }
}
