//! Shadow-chain collapse (FreeBSD `vm_object_collapse`): a backing object
//! that only its one shadow references is merged into that shadow, so
//! repeated fork and exit do not grow chains without bound.

use crate::object::{Backing, ObjectType, VmObject};
use crate::page::PageId;
use crate::pmap::Pmap;
use crate::vm::Vm;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

impl<P: Pmap> Vm<P> {
    /// Merges into `object` each backing object that only it references:
    /// pages `object` lacks move up, the rest are freed, and `object`
    /// adopts the backing object's own backing. Returns how many objects
    /// were merged.
    ///
    /// Nothing is merged while a fault or pager holds either object
    /// (paging in progress), while a page of the backing object is busy,
    /// held or wired, or when the backing object has a pager (its pages
    /// live elsewhere too).
    pub fn collapse(&self, object: &Arc<VmObject>) -> usize {
        let mut merged = 0;
        while let Some(dead) = self.collapse_once(object) {
            // The merged object dies here, outside the locks.
            drop(dead);
            merged += 1;
            self.machine
                .counters
                .v_collapses
                .fetch_add(1, Ordering::Relaxed);
        }
        merged
    }

    /// One merge step; returns the merged-away object on success.
    fn collapse_once(&self, object: &Arc<VmObject>) -> Option<Backing> {
        let pages = &self.machine.pages;
        let mut st = object.lock();
        let b = st.backing.clone()?;
        if object.paging_in_progress() != 0 {
            return None;
        }
        let mut bst = b.object.lock();
        let private = b.object.ref_count() == 1
            && bst.shadow_count == 1
            && bst.otype == ObjectType::Default
            && bst.pager.is_none()
            && b.object.paging_in_progress() == 0;
        let pinned = |id: PageId| {
            let p = pages.get(id);
            p.is_busy() || p.hold_count() != 0 || p.wire_count() != 0
        };
        if !private || bst.pages.values().any(|&id| pinned(id)) {
            return None;
        }
        let moved: Vec<(u64, PageId)> = bst.pages.drain().collect();
        for (bp, id) in moved {
            let target = bp
                .checked_sub(b.offset)
                .filter(|&p| p < st.size && !st.pages.contains_key(&p));
            match target {
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
