//! Recording which files a workload opens, in order, for `convert --optimize`: the
//! files come first in the rewritten layers so that one prefetch request at mount
//! brings them all. Off unless a mount asks for it; when on, an open costs one lock
//! and one hash-set insert.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::format::NodeId;

/// The first opens of regular files across the layers of one root filesystem.
#[derive(Debug, Default)]
pub struct AccessRecorder {
    inner: Mutex<Recorded>,
}

#[derive(Debug, Default)]
struct Recorded {
    seen: HashSet<(usize, NodeId)>,
    order: Vec<(usize, NodeId)>,
}

impl AccessRecorder {
    /// A recorder shared by the layers of one mount.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Notes that file `id` of layer `layer` was opened (only the first open counts).
    pub fn record(&self, layer: usize, id: NodeId) {
        let mut r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if r.seen.insert((layer, id)) {
            r.order.push((layer, id));
        }
    }

    /// The opened files, `(layer, file)`, in the order of their first open.
    pub fn opened(&self) -> Vec<(usize, NodeId)> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .order
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_first_open_order_per_layer() {
        let r = AccessRecorder::new();
        for (l, id) in [(1, 5), (0, 5), (1, 5), (0, 2), (1, 3), (0, 5)] {
            r.record(l, id);
        }
        assert_eq!(r.opened(), vec![(1, 5), (0, 5), (0, 2), (1, 3)]);
    }
}
