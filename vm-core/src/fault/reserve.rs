//! Superpage reservations and whole superpages on the fault path (FreeBSD
//! `vm_reserv`, in a lighter form; Linux's transparent huge pages for the
//! whole-superpage fault). Policy: [`SuperpagePolicy`] and the entry's
//! [`SuperpageAdvice`](crate::map::SuperpageAdvice) flags.
//!
//! The first zero-fill fault in an aligned 2 MiB of addresses that one map
//! entry covers whole, in an anonymous object, claims a wholly free,
//! aligned run of 512 frames for those 2 MiB (`Pages::claim_run`); the
//! object remembers it by the page index that starts the 2 MiB
//! (`ObjectState::reservations`). Every zero-fill of a page there then asks
//! for the frame at the page's own offset in the run, by its id
//! (`Pages::alloc_at`), and takes any frame if that one is gone. When all
//! 512 are in, the pages sit in physical order at superpage-aligned
//! addresses, and a pmap that promotes maps them with one entry.
//!
//! Where the policy asks for whole superpages, the write fault that claims
//! the run takes all 512 frames at once ([`populate`](FaultState::populate)):
//! the other 511 out of the run in one go (`Pages::alloc_run_rest`);
//! they are zeroed outside every lock, and `finish` inserts them into the
//! object and maps them, writable and dirty like the faulting page, under
//! one hold of the object's lock (so no pageout can take one between its
//! insertion and its mapping): all 512 with one 2 MiB entry where the pmap
//! makes one ([`Pmap::enter_superpage`], FreeBSD's `pmap_enter` with
//! `psind` 1), else one by one, and the last `enter` promotes. A
//! page made meanwhile by another fault wins over the zeroed frame; if
//! the object gained a pager meanwhile (pageout gave it swap, and may have
//! written a page of these 2 MiB there), none is inserted.
//!
//! As in FreeBSD, the claimed run's free frames leave the free lists and
//! the run holds them (`page_queues`' `RunBits`): a fault takes its frame
//! with one atomic operation on the run's own cache line. They still count
//! as free; an allocation of any frame that finds the lists empty releases
//! a held run (breaking its reservation if one is still filling it), and
//! a run taken in part just means those 2 MiB stay 4 KiB pages. The
//! reservation record is a hint, not an ownership: correctness rests on
//! the frame's bit (or its list), so a stale record costs only a miss. The
//! offset comes from the address, not the page index, so an object mapped
//! at an address whose 2 MiB alignment differs from its offset's still
//! lines up.

use super::FaultState;
use crate::map::{EntryFlags, MapEntry};
use crate::object::{ObjectFlags, ObjectState};
use crate::page::{PageFlags, PageId, VM_PAGE_BITS_ALL};
use crate::page_queues::{AllocClass, NO_RUN, RUN_PAGES};
use crate::pmap::{Mapping, PageInfo, Pmap};
use crate::prot::Prot;
use crate::vm::SuperpagePolicy;
use crate::{PAGE_SHIFT, PAGE_SIZE, Pfn, VirtAddr};
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

/// A run just claimed whose whole 2 MiB the fault fills.
#[derive(Clone, Copy, Debug)]
pub(super) struct Populate {
    /// The object's page index at the start of the 2 MiB.
    start: u64,
    /// The run's first page.
    first: PageId,
    /// The faulting page's offset in the 2 MiB.
    offset: u64,
}

impl<P: Pmap> FaultState<'_, P> {
    /// The frame of this page's reservation in the first object `st`
    /// (locked), claiming a run on the first fault of its 2 MiB; `None`
    /// when the policy says none, the 2 MiB are not all inside the entry,
    /// no run was whole, or the page's frame is taken. With it, whether
    /// the fault is to fill the whole 2 MiB.
    pub(super) fn reserved_frame(
        &self,
        st: &mut ObjectState,
    ) -> Option<(PageId, Option<Populate>)> {
        let policy = self.target.vm.config.superpages;
        if policy == SuperpagePolicy::Never {
            return None;
        }
        // The entry as the lookup found it: the map lock is held since.
        self.map.as_ref()?;
        if self.eflags.contains(EntryFlags::NOHUGEPAGE) {
            return None;
        }
        let offset = (self.va >> PAGE_SHIFT) & (RUN_PAGES - 1);
        let start = self.pindex.checked_sub(offset)?;
        let mut fresh = false;
        let run = match st.reservations.get(&start) {
            Some(&run) => run,
            None => {
                let va0 = self.va - offset * PAGE_SIZE;
                if va0 < self.entry_start || va0 + RUN_PAGES * PAGE_SIZE > self.entry_end {
                    return None;
                }
                let run = self.machine.pages.claim_run().unwrap_or(NO_RUN);
                st.reservations.insert(start, run);
                fresh = true;
                run
            }
        };
        let pages = &self.machine.pages;
        let first = pages.run_first(run)?;
        let Some(id) = pages.alloc_at(PageId(first.0 + offset as u32), AllocClass::Normal) else {
            if fresh {
                // Claimed for nothing (memory at the reserve, or the frame
                // taken): no other claim would get the run until some
                // frame of it came and went, and the next fault here is
                // to claim afresh (and fill the 2 MiB whole if it may).
                st.reservations.remove(&start);
                pages.disown(run);
            }
            return None;
        };
        let whole = match policy {
            SuperpagePolicy::Always => true,
            _ => self.eflags.contains(EntryFlags::HUGEPAGE),
        };
        let populate = (fresh && whole && self.fault_type.contains(Prot::WRITE) && !self.wired)
            .then_some(Populate {
                start,
                first,
                offset,
            });
        Some((id, populate))
    }

    /// Takes and zeroes the other 511 frames of a run just claimed, for
    /// `finish` to insert and map (`self.populated`); takes none if one
    /// is gone or memory is short (the fault then maps its page alone).
    pub(super) fn populate(&mut self, p: Populate) {
        let pages = &self.machine.pages;
        // The fault has its own frame already: 511 more.
        if !pages.free_at_least(pages.thresholds.severe + RUN_PAGES - 1)
            || !pages.alloc_run_rest(p.first, p.offset, AllocClass::Normal)
        {
            return;
        }
        let va0 = self.va - p.offset * PAGE_SIZE;
        self.populated.reserve_exact(RUN_PAGES as usize - 1);
        for i in (0..RUN_PAGES).filter(|&i| i != p.offset) {
            let id = PageId(p.first.0 + i as u32);
            self.populated.push((va0 + i * PAGE_SIZE, p.start + i, id));
        }
        let counters = self.machine.counters.local();
        for &(_, _, id) in &self.populated {
            let page = pages.get(id);
            if page.flags().contains(PageFlags::ZERO) {
                counters.v_ozfod.fetch_add(1, Ordering::Relaxed);
            } else {
                self.machine.phys.zero(pages.pfn(id));
            }
            page.clear_flags(PageFlags::ZERO);
            page.set_valid(VM_PAGE_BITS_ALL);
            page.dirty_all();
        }
    }

    /// Frees frames `populate` took that no object holds.
    pub(super) fn release_populated(&mut self) {
        let frames = core::mem::take(&mut self.populated);
        self.free_frames(frames);
    }

    fn free_frames(&self, frames: Vec<(u64, u64, PageId)>) {
        for (_, _, id) in frames {
            self.machine.pages.free(id);
        }
    }

    /// Inserts the pages `populate` zeroed into the first object and maps
    /// them as the faulting page is to be mapped (`like`), under one hold
    /// of the object's lock; each goes on the active queue. A page whose
    /// index is resident already (or past the object's end) is freed
    /// instead. When all went in, the pmap is asked to map the 2 MiB,
    /// the faulting page with them, by one entry
    /// ([`Pmap::enter_superpage`]); returns whether it did (the caller
    /// then does not enter the faulting page itself). Else each page is
    /// entered alone, and the last `enter` may promote.
    pub(super) fn map_populated(
        &self,
        mut populated: Vec<(u64, u64, PageId)>,
        entry: &MapEntry,
        like: Mapping,
    ) -> bool {
        if populated.is_empty() {
            return false;
        }
        let first = self.first.object();
        let mut st = first.lock();
        // The walk saw no pager; one now (pageout gave the object swap
        // while the frames were zeroed) may hold pages of these 2 MiB that
        // are no longer resident: a zero page there would hide them. The
        // neighbours then fault one by one, asking the pager.
        if st.flags.contains(ObjectFlags::DEAD) || st.pager.is_some() {
            drop(st);
            self.free_frames(populated);
            return false;
        }
        let (vm, pages) = (&self.target.vm, &self.machine.pages);
        // One growth of the page index for the lot, not several rehashes.
        st.pages.reserve(populated.len());
        populated.retain(|&(va, pindex, id)| {
            // The entry is the one the run was claimed in unless the map
            // lock was dropped meanwhile; then check it still maps here.
            let here = (entry.start..entry.end).contains(&va) && entry.pindex(va) == pindex;
            if !here || pindex >= st.size || st.pages.contains_key(&pindex) {
                pages.free(id);
                return false;
            }
            first.insert_page(&mut st, id, pages.get(id), pindex);
            true
        });
        let whole = populated.len() == RUN_PAGES as usize - 1 && self.enter_whole(&populated, like);
        for &(va, _, id) in &populated {
            if !whole {
                let page = PageInfo {
                    pfn: pages.pfn(id),
                    managed: true,
                    attr: pages.attr(id),
                };
                // A failure (no memory for a table) leaves the page
                // resident and unmapped: the next access faults it in.
                let entered =
                    vm.pmap
                        .enter(self.target.pmap, VirtAddr(va), Mapping { page, ..like });
                if let Ok(Some(d)) = entered {
                    vm.note_displaced(d);
                }
            }
            pages.activate(id);
        }
        drop(st);
        self.machine
            .counters
            .local()
            .v_zfod
            .fetch_add(populated.len() as u64, Ordering::Relaxed);
        whole
    }

    /// Maps the run `populated` (the 511 pages beside the faulting one,
    /// all in the object) and the faulting page, whose frame `like` maps,
    /// with one superpage entry; whether the pmap did.
    fn enter_whole(&self, populated: &[(u64, u64, PageId)], like: Mapping) -> bool {
        let pages = &self.machine.pages;
        let offset = (self.va >> PAGE_SHIFT) & (RUN_PAGES - 1);
        let Some(pfn0) = like.page.pfn.0.checked_sub(offset) else {
            return false;
        };
        // The frames of one run, in order, with the faulting page's
        // attribute: what one entry can map.
        let in_line = populated.iter().all(|&(va, _, id)| {
            let i = (va >> PAGE_SHIFT) & (RUN_PAGES - 1);
            pages.pfn(id).0 == pfn0 + i && pages.attr(id) == like.page.attr
        });
        let page = PageInfo {
            pfn: Pfn(pfn0),
            ..like.page
        };
        let va0 = VirtAddr(self.va - offset * PAGE_SIZE);
        in_line
            && matches!(
                self.target.vm.pmap.enter_superpage(
                    self.target.pmap,
                    va0,
                    Mapping { page, ..like }
                ),
                Ok(true)
            )
    }
}
