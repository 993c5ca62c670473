//! pv lists: for each managed frame, the (space, va) of every mapping of
//! it, so per-page operations reach every space (FreeBSD `pv_entry`).
//!
//! One list head per frame of the machine's memory, indexed by frame
//! number (FreeBSD keeps it in the page's `md_page`): finding a frame's
//! list is an index, not a hash lookup, and two faults contend only when
//! they map the same frame. A head holds one mapping inline, the common
//! case; a frame mapped more widely spills to the heap. A list lock is
//! always taken last, after a space's table locks (see the `pmap` module's
//! locking protocol).

use alloc::boxed::Box;
use smallvec::SmallVec;
use vm_core::Pfn;
use vm_core::sync::Mutex;

/// One mapping of a frame: the space's id and the virtual address.
pub(crate) type PvEntry = (u64, u64);
type List = SmallVec<[PvEntry; 1]>;

/// Bytes of pv metadata the pmap keeps per frame of memory (the list
/// head, with room for one mapping inline).
pub const PV_HEAD_BYTES: usize = core::mem::size_of::<Mutex<List>>();

/// The pv lists of every frame of one machine. See the [module docs](self).
#[derive(Default)]
pub(crate) struct PvTable {
    base: u64,
    heads: Box<[Mutex<List>]>,
}

impl PvTable {
    /// Lists for the `frames` frames from `base`.
    pub(crate) fn new(base: u64, frames: u64) -> PvTable {
        PvTable {
            base,
            heads: (0..frames).map(|_| Mutex::new(List::new())).collect(),
        }
    }

    /// The head of `pfn`'s list; a frame outside the machine's memory
    /// (device memory) is never managed and has none.
    fn head(&self, pfn: Pfn) -> Option<&Mutex<List>> {
        let i = pfn.0.checked_sub(self.base)?;
        self.heads.get(usize::try_from(i).ok()?)
    }

    /// Whether the `n` frames from `pfn` all have lists (are frames of
    /// the machine's memory).
    pub(crate) fn covers(&self, pfn: Pfn, n: u64) -> bool {
        n == 0
            || pfn
                .0
                .checked_add(n - 1)
                .is_some_and(|last| self.head(pfn).is_some() && self.head(Pfn(last)).is_some())
    }

    pub(crate) fn add(&self, pfn: Pfn, space: u64, va: u64) {
        if let Some(h) = self.head(pfn) {
            h.lock().push((space, va));
        }
    }

    pub(crate) fn remove(&self, pfn: Pfn, space: u64, va: u64) {
        if let Some(h) = self.head(pfn) {
            let mut l = h.lock();
            if let Some(i) = l.iter().position(|e| *e == (space, va)) {
                l.swap_remove(i);
            }
            if l.is_empty() && l.spilled() {
                // Give a widely shared frame's heap storage back.
                *l = List::new();
            }
        }
    }

    pub(crate) fn list(&self, pfn: Pfn) -> List {
        self.head(pfn).map(|h| h.lock().clone()).unwrap_or_default()
    }

    pub(crate) fn count(&self, pfn: Pfn) -> usize {
        self.head(pfn).map_or(0, |h| h.lock().len())
    }
}
