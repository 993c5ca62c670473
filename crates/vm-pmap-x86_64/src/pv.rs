//! pv lists: for each managed frame, the (space, va) of every mapping of
//! it, so per-page operations reach every space (FreeBSD `pv_entry`).
//! Sharded by frame; a shard lock is always taken after a space's lock.

use hashbrown::HashMap;
use smallvec::SmallVec;
use vm_core::Pfn;
use vm_core::sync::Mutex;

/// One mapping of a frame.
pub(crate) type PvEntry = (u64, u64);
type List = SmallVec<[PvEntry; 2]>;

const SHARDS: usize = 16;

pub(crate) struct PvTable {
    shards: [Mutex<HashMap<u64, List>>; SHARDS],
}

impl Default for PvTable {
    fn default() -> Self {
        PvTable {
            shards: core::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

impl PvTable {
    fn shard(&self, pfn: Pfn) -> &Mutex<HashMap<u64, List>> {
        &self.shards[(pfn.0 as usize) % SHARDS]
    }

    pub(crate) fn add(&self, pfn: Pfn, space: u64, va: u64) {
        self.shard(pfn)
            .lock()
            .entry(pfn.0)
            .or_default()
            .push((space, va));
    }

    pub(crate) fn remove(&self, pfn: Pfn, space: u64, va: u64) {
        let mut s = self.shard(pfn).lock();
        if let Some(l) = s.get_mut(&pfn.0) {
            l.retain(|e| *e != (space, va));
            if l.is_empty() {
                s.remove(&pfn.0);
            }
        }
    }

    pub(crate) fn list(&self, pfn: Pfn) -> List {
        self.shard(pfn)
            .lock()
            .get(&pfn.0)
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn count(&self, pfn: Pfn) -> usize {
        self.shard(pfn).lock().get(&pfn.0).map_or(0, SmallVec::len)
    }
}
