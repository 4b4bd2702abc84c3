//! A repository in a registry, with the client and the runtime that reach it; both
//! ends of a conversion may be one.

use lazysnap_registry::{Reference, RegistryClient};
use tokio::runtime::Handle;

/// A registry repository (and tag) to read from or write to.
pub(crate) struct Remote {
    pub client: RegistryClient,
    pub reference: Reference,
    pub rt: Handle,
}

impl Remote {
    /// Runs a client call to completion from a plain (non-runtime) thread.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}
