//! FUSE passthrough bookkeeping.
//!
//! The kernel puts an inode in one I/O mode at a time: while one open of it goes through
//! the page cache, a passthrough open fails with `ETXTBSY`, and the other way round; and
//! all passthrough opens of an inode must use the same backing file. So the mode is
//! decided at the first open of a node and kept, with one shared [`BackingId`], until its
//! last release. A file that becomes fully cached while open switches at the next first
//! open.
//!
//! The kernel's view outlives the process serving it (see `handover`), so every change
//! is also written to an [`OpenTable`] that a successor reads back: the count of opens
//! per node and the raw backing id. Opens are counted before the reply goes out and
//! releases after, so a crash in between leaves a count too high (the mode then sticks
//! for the life of the connection), never too low.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::FileExt,
    sync::{Arc, Mutex, MutexGuard},
};

use fuser::BackingId;
use tracing::warn;

/// How one node is currently open.
#[derive(Debug)]
struct OpenState {
    opens: u32,
    backing: Backing,
}

#[derive(Debug)]
enum Backing {
    /// Through the page cache.
    None,
    /// Passthrough with a backing id this process holds (and its number).
    Held(Arc<BackingId>, u32),
    /// Passthrough with a backing id a previous server registered and never closed.
    Inherited(u32),
}

/// Per node, one little-endian u64: open count in the low half, backing id (0: none)
/// in the high half. A memfd: nothing on disk, and it lives as long as some process
/// (the daemon, the fd holder) keeps it open.
#[derive(Debug)]
pub(crate) struct OpenTable(File);

impl OpenTable {
    /// A zeroed table for `nodes` nodes.
    pub(crate) fn create(nodes: usize) -> std::io::Result<OpenTable> {
        let fd = nix::sys::memfd::memfd_create(
            c"lazysnap-opens",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?;
        let file = File::from(fd);
        file.set_len(nodes as u64 * 8)?;
        Ok(OpenTable(file))
    }

    /// A table a previous server kept.
    pub(crate) fn from_file(file: File) -> OpenTable {
        OpenTable(file)
    }

    pub(crate) fn file(&self) -> &File {
        &self.0
    }

    fn write(&self, node: u32, opens: u32, backing: u32) -> std::io::Result<()> {
        let v = u64::from(opens) | (u64::from(backing) << 32);
        self.0.write_all_at(&v.to_le_bytes(), u64::from(node) * 8)
    }

    /// The non-empty entries: node, opens, backing id.
    fn entries(&self) -> std::io::Result<Vec<(u32, u32, u32)>> {
        let len = self.0.metadata()?.len();
        let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.0.read_exact_at(&mut bytes, 0)?;
        Ok(bytes
            .chunks_exact(8)
            .enumerate()
            .filter_map(|(i, c)| {
                let v = u64::from_le_bytes(c.try_into().ok()?);
                let node = u32::try_from(i).ok()?;
                (v as u32 != 0).then_some((node, v as u32, (v >> 32) as u32))
            })
            .collect())
    }
}

/// Open nodes and their I/O mode.
#[derive(Debug, Default)]
pub(crate) struct OpenFiles {
    by_node: Mutex<HashMap<u32, OpenState>>,
    table: Option<OpenTable>,
}

impl OpenFiles {
    /// Bookkeeping kept in `table` as well, starting from what it holds.
    pub(crate) fn with_table(table: OpenTable) -> std::io::Result<OpenFiles> {
        let mut by_node = HashMap::new();
        for (node, opens, id) in table.entries()? {
            let backing = if id == 0 {
                Backing::None
            } else {
                Backing::Inherited(id)
            };
            by_node.insert(node, OpenState { opens, backing });
        }
        Ok(OpenFiles {
            by_node: Mutex::new(by_node),
            table: Some(table),
        })
    }

    #[cfg(test)]
    fn table(&self) -> Option<&OpenTable> {
        self.table.as_ref()
    }

    /// Records an open of `node` and returns the backing id to open it with, or `None`
    /// for an ordinary open. `make_backing` runs (outside the lock) only when the node is
    /// not open yet; `adopt` wraps a backing id inherited from a previous server.
    pub(crate) fn open(
        &self,
        node: u32,
        make_backing: impl FnOnce() -> Option<(BackingId, u32)>,
        adopt: impl FnOnce(u32) -> BackingId,
    ) -> Option<Arc<BackingId>> {
        {
            let mut map = self.lock();
            if let Some(state) = map.get_mut(&node) {
                state.opens = state.opens.saturating_add(1);
                if let Backing::Inherited(id) = state.backing {
                    state.backing = Backing::Held(Arc::new(adopt(id)), id);
                }
                self.record(node, state);
                return state.backing.held();
            }
        }
        let candidate = make_backing();
        let mut map = self.lock();
        // Another thread may have opened the node meanwhile; its mode wins.
        let state = map.entry(node).or_insert(OpenState {
            opens: 0,
            backing: candidate.map_or(Backing::None, |(b, raw)| Backing::Held(Arc::new(b), raw)),
        });
        state.opens = state.opens.saturating_add(1);
        self.record(node, state);
        state.backing.held()
    }

    /// Records a release; the last one drops the backing id. Call it after replying.
    pub(crate) fn release(&self, node: u32) {
        let mut map = self.lock();
        if let Some(state) = map.get_mut(&node) {
            state.opens = state.opens.saturating_sub(1);
            // The table forgets the id before the kernel does (when the removed state
            // drops it), so a successor never adopts a closed id.
            self.record(node, state);
            if state.opens == 0 {
                // An inherited id never adopted stays registered until the
                // connection ends: closing it needs the channel only a reply has.
                map.remove(&node);
            }
        }
    }

    fn record(&self, node: u32, state: &OpenState) {
        let Some(table) = &self.table else { return };
        let id = match (state.opens, &state.backing) {
            (0, _) | (_, Backing::None) => 0,
            (_, Backing::Held(_, id) | Backing::Inherited(id)) => *id,
        };
        if let Err(e) = table.write(node, state.opens, id) {
            warn!(node, "cannot record open state for a successor: {e}");
        }
    }

    /// How many nodes are open in passthrough mode.
    #[cfg(test)]
    fn passthrough_nodes(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| !matches!(s.backing, Backing::None))
            .count()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, OpenState>> {
        // The map stays consistent even if a holder panicked: every update is one step.
        self.by_node.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backing {
    fn held(&self) -> Option<Arc<BackingId>> {
        match self {
            Backing::Held(b, _) => Some(b.clone()),
            Backing::None | Backing::Inherited(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_is_decided_at_first_open_and_kept() {
        let open = OpenFiles::default();
        let no_adopt = |_| panic!("nothing to adopt");
        assert!(open.open(1, || None, no_adopt).is_none());
        // Still open in cached mode: no backing is even asked for.
        assert!(
            open.open(1, || panic!("must not be asked while open"), no_adopt)
                .is_none()
        );
        open.release(1);
        open.release(1);
        open.release(1); // an extra release is harmless
        assert_eq!(open.passthrough_nodes(), 0);
    }

    #[test]
    fn the_table_carries_counts_to_a_successor() {
        let table = OpenTable::create(8).unwrap();
        let copy = table.file().try_clone().unwrap();
        let open = OpenFiles::with_table(table).unwrap();
        let no_adopt = |_| panic!("nothing to adopt");
        open.open(3, || None, no_adopt);
        open.open(3, || None, no_adopt);
        open.open(5, || None, no_adopt);
        open.release(5);
        let next = OpenTable::from_file(copy);
        assert_eq!(next.entries().unwrap(), vec![(3, 2, 0)]);
        // the successor keeps node 3 in cached mode while its old opens last
        let succ = OpenFiles::with_table(next).unwrap();
        assert!(
            succ.open(3, || panic!("mode is inherited"), no_adopt)
                .is_none()
        );
        succ.release(3);
        succ.release(3);
        succ.release(3);
        assert!(succ.table().unwrap().entries().unwrap().is_empty());
    }
}
