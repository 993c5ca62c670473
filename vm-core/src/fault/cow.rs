//! Copy-on-write: seed L701-787, plus the stale-mapping fix FreeBSD made
//! later (FreeBSD-SA-21:08.vm).

use super::{FaultKind, FaultState};
use crate::object::{ObjectFlags, VmObject};
use crate::page::{PageFlags, VM_PAGE_BITS_ALL};
use crate::pmap::Pmap;
use alloc::sync::Arc;
use core::sync::atomic::Ordering;

impl<P: Pmap> FaultState<'_, P> {
    /// A write found its page in a backing object: give the first object
    /// its own page, by moving the page up when the backing object is
    /// private to this chain (`v_cow_optim`), else by copying it.
    pub(super) fn cow(&mut self) {
        let first = self.first.object().clone();
        let backing = self.current().clone();
        let mut m = self.m.take().expect("page found");
        let mut first_m = self
            .first_m
            .take()
            .expect("placeholder in the first object");
        let counters = self.machine.counters.local();
        if self.try_rename(&first, &backing, &m) {
            // The placeholder was displaced by the move; free it.
            drop(first_m);
            m.keep();
            m.set_object(first);
            self.m = Some(m);
            self.kind = FaultKind::CowMoved;
            counters.v_cow_optim.fetch_add(1, Ordering::Relaxed);
        } else {
            // The walk leaves only wholly valid pages, so every byte
            // copied is the source's (never what the frame held before).
            debug_assert_eq!(m.page().valid(), VM_PAGE_BITS_ALL);
            self.machine.phys.copy(m.pfn(), first_m.pfn());
            let page = first_m.page();
            page.clear_flags(PageFlags::ZERO);
            page.set_valid(VM_PAGE_BITS_ALL);
            // The copy exists nowhere else: it must be laundered, never
            // dropped, even if nobody writes it (a copy fault).
            page.dirty_all();
            first_m.keep();
            // If other spaces can map the first object, their read-only
            // mappings of the source page would go on showing the old data
            // after this write: remove them while the source is still busy,
            // so no new ones appear (FreeBSD-SA-21:08.vm; the seed lacks
            // this). In a private object pmap_enter replaces our own.
            if !first.lock().flags.contains(ObjectFlags::ONEMAPPING) {
                let refmod = self.target.vm.pmap.remove_all(m.pfn());
                if refmod.modified {
                    m.page().dirty_all();
                }
                counters.v_cow_unmapped.fetch_add(1, Ordering::Relaxed);
            }
            drop(m);
            self.m = Some(first_m);
            self.kind = FaultKind::CowCopy;
        }
        self.object = None;
        self.pindex = self.first_pindex;
        counters.v_cow_faults.fetch_add(1, Ordering::Relaxed);
    }

    /// Seed L717-755: moves `m` from `backing` into `first` if `backing` has
    /// one shadow and one reference, is anonymous with no handle (nobody
    /// can look it up: a named object, or one a user holds, keeps its
    /// pages), and is directly
    /// behind `first`. Unlike the seed, a held or wired page is never
    /// moved: its holder would be left looking at another object's page.
    fn try_rename(
        &self,
        first: &Arc<VmObject>,
        backing: &Arc<VmObject>,
        m: &crate::object::busy::BusyPage<'_>,
    ) -> bool {
        let page = m.page();
        if backing.ref_count() != 1 || page.hold_count() != 0 || page.wire_count() != 0 {
            return false;
        }
        // Lock order: shadow before backing.
        let mut fst = first.lock();
        let direct = fst
            .backing
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(&b.object, backing));
        if !direct {
            return false;
        }
        let mut bst = backing.lock();
        // Held here three times: `backing`, the walk's paging-in-progress
        // and the busy page `m`; a fourth `Arc` is a user's handle.
        if bst.shadow_count != 1
            || !bst.kind.is_anonymous()
            || bst.flags.contains(ObjectFlags::NAMED)
            || backing.ref_count() != 1
            || !backing.unexposed(3)
        {
            return false;
        }
        let old_pindex = page.pindex();
        if bst.pages.get(&old_pindex) != Some(&m.id) {
            return false;
        }
        bst.pages.remove(&old_pindex);
        if let Some(p) = &bst.pager {
            // The backing store copy belongs to the old identity.
            p.page_unswapped(old_pindex);
        }
        drop(bst);
        fst.pages.remove(&self.first_pindex);
        first.insert_page(&mut fst, m.id, page, self.first_pindex);
        // The moved page exists nowhere else now: it is dirty (seed L748).
        page.dirty_all();
        true
    }
}
