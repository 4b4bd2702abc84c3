//! FUSE passthrough bookkeeping.
//!
//! The kernel puts an inode in one I/O mode at a time: while one open of it goes through
//! the page cache, a passthrough open fails with `ETXTBSY`, and the other way round; and
//! all passthrough opens of an inode must use the same backing file. So the mode is
//! decided at the first open of a node and kept, with one shared [`BackingId`], until its
//! last release. A file that becomes fully cached while open switches at the next first
//! open.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use fuser::BackingId;

/// How one node is currently open.
#[derive(Debug)]
struct OpenState {
    opens: u32,
    backing: Option<Arc<BackingId>>,
}

/// Open nodes and their I/O mode.
#[derive(Debug, Default)]
pub(crate) struct OpenFiles {
    by_node: Mutex<HashMap<u32, OpenState>>,
}

impl OpenFiles {
    /// Records an open of `node` and returns the backing id to open it with, or `None`
    /// for an ordinary open. `make_backing` runs (outside the lock) only when the node is
    /// not open yet.
    pub(crate) fn open(
        &self,
        node: u32,
        make_backing: impl FnOnce() -> Option<BackingId>,
    ) -> Option<Arc<BackingId>> {
        if let Some(state) = self.lock().get_mut(&node) {
            state.opens += 1;
            return state.backing.clone();
        }
        let candidate = make_backing().map(Arc::new);
        let mut map = self.lock();
        // Another thread may have opened the node meanwhile; its mode wins.
        let state = map.entry(node).or_insert(OpenState {
            opens: 0,
            backing: candidate,
        });
        state.opens += 1;
        state.backing.clone()
    }

    /// Records a release; the last one drops the backing id.
    pub(crate) fn release(&self, node: u32) {
        let mut map = self.lock();
        if let Some(state) = map.get_mut(&node) {
            state.opens = state.opens.saturating_sub(1);
            if state.opens == 0 {
                map.remove(&node);
            }
        }
    }

    /// How many nodes are open in passthrough mode.
    #[cfg(test)]
    fn passthrough_nodes(&self) -> usize {
        self.lock().values().filter(|s| s.backing.is_some()).count()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, OpenState>> {
        // The map stays consistent even if a holder panicked: every update is one step.
        self.by_node.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_is_decided_at_first_open_and_kept() {
        let open = OpenFiles::default();
        assert!(open.open(1, || None).is_none());
        // Still open in cached mode: no backing is even asked for.
        assert!(
            open.open(1, || panic!("must not be asked while open"))
                .is_none()
        );
        open.release(1);
        open.release(1);
        open.release(1); // an extra release is harmless
        assert_eq!(open.passthrough_nodes(), 0);
    }
}
