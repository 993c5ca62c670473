//! Shadow-chain collapse (FreeBSD `vm_object_collapse`): a backing object
//! that only its one shadow references is merged into that shadow, so
//! repeated fork and exit do not grow chains without bound.

use crate::object::{Backing, ObjectFlags, VmObject};
use crate::page::PageId;
use crate::pmap::Pmap;
use crate::vm::Vm;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

impl<P: Pmap> Vm<P> {
    /// Merges into `object` each backing object that only it references:
    /// pages `object` lacks move up, the rest are freed, and `object`
    /// adopts the backing object's own backing; then does the same for
    /// each object further down the chain, so that a backing object only
    /// one shadow still references is merged into it even when `object`
    /// itself is shared (FreeBSD reaches those from `vm_object_deallocate`,
    /// which collapses the last shadow of an object down to one
    /// reference). Returns how many objects were merged.
    ///
    /// Nothing is merged while a fault or a pager works on either object
    /// (paging in progress), while a page of the backing object is busy,
    /// held or wired, when the backing object has a handle (a named object
    /// keeps its pages), or when it has a pager that the shadow cannot take
    /// over (a swap pager, at offset 0, by a shadow without one) or take
    /// the copies of into its own ([`Pager::absorb`](crate::Pager::absorb): two swap pagers of
    /// one device).
    pub fn collapse(&self, object: &Arc<VmObject>) -> usize {
        let mut merged = 0;
        let mut cur = object.clone();
        loop {
            while let Some(dead) = self.collapse_once(&cur) {
                // The merged object dies here, outside the locks.
                drop(dead);
                merged += 1;
                self.machine
                    .counters
                    .local()
                    .v_collapses
                    .fetch_add(1, Ordering::Relaxed);
            }
            let next = cur.lock().backing.as_ref().map(|b| b.object.clone());
            match next {
                Some(next) => cur = next,
                None => return merged,
            }
        }
    }

    /// One merge step; returns the merged-away object on success.
    fn collapse_once(&self, object: &Arc<VmObject>) -> Option<Backing> {
        let pages = &self.machine.pages;
        let mut st = object.lock();
        let b = st.backing.clone()?;
        let mut bst = b.object.lock();
        // A swap-backed backing object can hand its pager to a shadow that
        // has none and sees it at the same page indexes, or have its copies
        // moved into the shadow's own pager (when that pager can take them:
        // checked below, before anything changes).
        let swapped = bst.kind.is_anonymous() && bst.pager.is_some();
        let adopt = swapped && st.pager.is_none() && b.offset == 0;
        let merge = swapped && st.pager.is_some();
        // The backing object must be private to this chain and nameless
        // (seed-era `vm_object_collapse`: `handle == NULL`), and no fault
        // or pager may be working in either object: a fault holds
        // paging-in-progress on its first object for its whole life, and
        // may be between the shadow and the backing object at any index
        // (its placeholder in the shadow is not a page to keep).
        let private = b.object.ref_count() == 1
            && bst.shadow_count == 1
            && !bst.flags.contains(ObjectFlags::NAMED)
            && bst.kind.is_anonymous()
            && (bst.pager.is_none() || adopt || merge)
            && b.object.paging_in_progress() == 0
            && object.paging_in_progress() == 0;
        if !private {
            return None;
        }
        // Where each backing page would go: into the shadow, if the shadow
        // has nothing there (resident or on its pager), else nowhere.
        let target = |bp: u64| {
            bp.checked_sub(b.offset).filter(|&p| {
                p < st.size
                    && !st.pages.contains_key(&p)
                    && st.pager.as_ref().is_none_or(|pg| pg.has_page(p).is_none())
            })
        };
        let pinned = |id: PageId| {
            let p = pages.get(id);
            p.is_busy() || p.hold_count() != 0 || p.wire_count() != 0
        };
        // A busy, held or wired page of the backing object stays where
        // its user expects it.
        if bst.pages.values().any(|&id| pinned(id)) {
            return None;
        }
        let plan: Vec<(PageId, Option<u64>)> = bst
            .pages
            .iter()
            .map(|(&bp, &id)| (id, target(bp)))
            .collect();
        if merge {
            // The backing object's swap copies go where its pages would: to
            // the shadow's indexes the shadow has nothing at.
            let (size, offset) = (st.size, b.offset);
            let mut wanted = |p: u64| p < size && !st.pages.contains_key(&p);
            let (Some(mine), Some(theirs)) = (st.pager.clone(), bst.pager.clone()) else {
                return None;
            };
            if !mine.absorb(&*theirs, offset, &mut wanted) {
                return None;
            }
        }
        bst.pages.clear();
        if adopt {
            // The shadow's own pages supersede the swap copies at their
            // indexes, and nothing past the shadow's end is reachable.
            let pager = bst.pager.take().expect("adopt needs a pager");
            for &p in st.pages.keys() {
                pager.discard(p, p + 1);
            }
            pager.discard(st.size, u64::MAX);
            st.kind = bst.kind;
            st.pager = Some(pager);
        }
        for (id, to) in plan {
            match to {
                Some(p) => object.insert_page(&mut st, id, pages.get(id), p),
                None => {
                    // Shadowed or outside the shadow: no one can see it.
                    if self.pmap.remove_all(pages.pfn(id)).referenced {
                        pages.get(id).set_flags(crate::page::PageFlags::REFERENCED);
                    }
                    pages.free(id);
                }
            }
        }
        st.backing = bst.backing.take().map(|bb| Backing {
            offset: bb.offset + b.offset,
            object: bb.object,
        });
        drop(bst);
        drop(st);
        Some(b)
    }
}
