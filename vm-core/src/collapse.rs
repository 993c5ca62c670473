//! Shadow-chain collapse (FreeBSD `vm_object_collapse`): a backing object
//! that only its one shadow references is merged into that shadow, so
//! repeated fork and exit do not grow chains without bound; and a backing
//! object whose every page the shadow covers is bypassed (the shadow backs
//! onto the object below it) even while other shadows keep it, so repeated
//! fork with children alive does not either.

use crate::object::{Backing, ObjectFlags, ObjectState, VmObject};
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
    /// reference). Returns how many objects were merged or bypassed.
    ///
    /// A backing object other shadows still share is bypassed instead
    /// (FreeBSD's `object_bypasses`) when nothing of it shows through
    /// `object`: each of its pages is one `object` has its own copy of. Only
    /// where it cannot gain pages `object` would have to see: it is
    /// anonymous, nameless, held by no handle, referenced by shadows only
    /// and has no swap copies, and `object` is nameless.
    ///
    /// Nothing is merged while a fault or a pager works on either object
    /// (paging in progress), while a page of the backing object is busy,
    /// held or wired, when the backing object has a handle (a named object
    /// keeps its pages), or when it has a pager that the shadow cannot take
    /// over (a swap pager, at offset 0, by a shadow without one) or take
    /// the copies of into its own ([`Pager::absorb`](crate::Pager::absorb): two swap pagers of
    /// one device).
    pub fn collapse(&self, object: &Arc<VmObject>) -> usize {
        // The caller's `object` may be a user's handle: it is counted as one.
        self.collapse_chain(object, 0)
    }

    /// [`collapse`](Self::collapse) for the VM's own callers, which hold
    /// `clones` `Arc`s of `object` besides its references (a fault's
    /// first object: one).
    pub(crate) fn collapse_chain(&self, object: &Arc<VmObject>, clones: usize) -> usize {
        let mut merged = 0;
        let mut cur = object.clone();
        // `cur`'s own clone, and the caller's on the first object.
        let mut held = clones + 1;
        loop {
            let counters = self.machine.counters.local();
            match self.collapse_link(&cur, held) {
                Link::Merged(dead) => {
                    // The merged object dies here, outside the locks.
                    drop(dead);
                    counters.v_collapses.fetch_add(1, Ordering::Relaxed);
                }
                Link::Bypassed(left) => {
                    // Others still hold it: only our reference goes.
                    drop(left);
                    counters.v_bypasses.fetch_add(1, Ordering::Relaxed);
                }
                Link::Kept(Some(next)) => {
                    cur = next;
                    held = 1;
                    continue;
                }
                Link::Kept(None) => return merged,
            }
            merged += 1;
        }
    }

    /// Looks at `object` and its backing object under one hold of both
    /// locks: merges the backing object into it, or bypasses it, or hands
    /// back the next object down. `held`: the `Arc`s of `object` the
    /// caller holds besides its references.
    fn collapse_link(&self, object: &Arc<VmObject>, held: usize) -> Link {
        let mut st = object.lock();
        let Some(b) = st.backing.clone() else {
            return Link::Kept(None);
        };
        let mut bst = b.object.lock();
        if self.merge_locked(object, &mut st, &b, &mut bst) {
            drop(bst);
            drop(st);
            return Link::Merged(b);
        }
        if let Some(left) = Self::bypass_locked(object, held, &mut st, &b, &mut bst) {
            return Link::Bypassed(left);
        }
        drop(bst);
        drop(st);
        Link::Kept(Some(b.object))
    }

    /// Makes `object` back onto its backing object's backing object when
    /// nothing of the backing object shows through `object`: each of its
    /// pages is outside `object`'s range or at an index where `object` has
    /// its own page (resident or on its pager). Returns the backing link
    /// `object` gave up, for the caller to drop outside the locks.
    ///
    /// Only where the backing object cannot gain a page `object` would
    /// have to see, and `object` cannot lose one it covers: `object` is
    /// nameless and held by no handle (none to resize or map it through:
    /// unmapping its last mapping frees its pages); the backing object is
    /// anonymous, nameless and held by no handle (none to map or write it
    /// through), every reference to it is a shadow's (no map
    /// entry zero-fills into it or writes it), it has no pager (swap
    /// copies not resident would have to be counted too), and no fault or
    /// pager works on either object (a fault in `object`'s chain may be
    /// between the two).
    /// As in FreeBSD, a page `object` later gives up (its last mapping of
    /// the index unmapped, or the object shrunk through a handle taken
    /// after the bypass) then shows what lies below the bypassed object.
    ///
    /// `clones`: the `Arc`s of `object` the caller holds besides its
    /// references (see [`VmObject::unexposed`]).
    fn bypass_locked(
        object: &Arc<VmObject>,
        clones: usize,
        st: &mut ObjectState,
        b: &Backing,
        bst: &mut ObjectState,
    ) -> Option<Backing> {
        if !object.unexposed(clones) {
            return None; // a handle could take pages it covers away
        }
        let eligible = !st.flags.contains(ObjectFlags::NAMED)
            && b.object.ref_count() == bst.shadow_count
            && b.object.unexposed(1)
            && !bst.flags.contains(ObjectFlags::NAMED)
            && bst.kind.is_anonymous()
            && bst.pager.is_none()
            && b.object.paging_in_progress() == 0
            && object.paging_in_progress() == 0;
        let covered = |bp: u64| {
            bp.checked_sub(b.offset).is_none_or(|p| {
                p >= st.size
                    || st.pages.contains_key(&p)
                    || st.pager.as_ref().is_some_and(|pg| pg.has_page(p).is_some())
            })
        };
        // A fault's collapse tries this after every copy-on-write: a
        // shadow without a pager that sees the whole backing object and
        // has fewer pages than it cannot cover it, and is told so without
        // a scan.
        let too_few = st.pager.is_none()
            && b.offset == 0
            && st.size >= bst.size
            && st.pages.len() < bst.pages.len();
        if !eligible || too_few || !bst.pages.keys().all(|&bp| covered(bp)) {
            return None;
        }
        let below = bst.backing.clone().map(|bb| {
            bb.object.lock().shadow_count += 1;
            bb.object.add_ref();
            Backing {
                offset: bb.offset + b.offset,
                object: bb.object,
            }
        });
        bst.shadow_count -= 1;
        b.object.drop_ref();
        core::mem::replace(&mut st.backing, below)
    }

    /// One merge step, `object` (locked: `st`) taking in its backing
    /// object `b` (locked: `bst`); returns whether it merged (the caller
    /// drops the merged-away object outside the locks).
    fn merge_locked(
        &self,
        object: &VmObject,
        st: &mut ObjectState,
        b: &Backing,
        bst: &mut ObjectState,
    ) -> bool {
        let pages = &self.machine.pages;
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
            && b.object.unexposed(1)
            && bst.shadow_count == 1
            && !bst.flags.contains(ObjectFlags::NAMED)
            && bst.kind.is_anonymous()
            && (bst.pager.is_none() || adopt || merge)
            && b.object.paging_in_progress() == 0
            && object.paging_in_progress() == 0;
        if !private {
            return false;
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
            return false;
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
                return false;
            };
            if !mine.absorb(&*theirs, offset, &mut wanted) {
                return false;
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
                Some(p) => object.insert_page(st, id, pages.get(id), p),
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
        true
    }
}

/// What one look at a link of a shadow chain did.
enum Link {
    /// The backing object was merged into the shadow; its link, to be
    /// dropped outside the locks.
    Merged(Backing),
    /// The shadow now backs onto what lay below; the link it gave up.
    Bypassed(Backing),
    /// Neither: the next object down, `None` at the chain's end.
    Kept(Option<Arc<VmObject>>),
}
