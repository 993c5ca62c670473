//! The pageout daemon (FreeBSD `vm_pageout.c`): frees memory by dropping
//! clean inactive pages and laundering dirty ones through their pager —
//! the file for vnode objects, swap for anonymous memory (which becomes
//! swap-backed on its first page-out).
//!
//! It can be stepped by hand ([`Vm::pageout`]), runs inline when a fault
//! finds no free page (direct reclaim, before the fault sleeps), and with
//! `std` can run as a thread ([`Vm::spawn_pageout_daemon`]).
//!
//! The scan walks the page array like a clock hand: referenced pages go
//! back to the active queue, unreferenced active pages are deactivated,
//! inactive ones are freed or laundered. Wired, held and busy pages are
//! never touched.
//!
//! A pass gives up early when memory cannot be had: a round of sweeps that
//! moved nothing ends it, and once a pager refused a page for want of room
//! (`ENOSPC`) the pass stops unmapping pages it cannot write: it asks a
//! pager whether it has room ([`Pager::has_room`]), and takes one that
//! cannot tell at its word, offering it only pages it already holds;
//! anonymous memory without a pager waits while swap has no room, or when
//! there is no swap (FreeBSD keeps `swap_pager_full` for the machine; here
//! the knowledge lasts one pass, and pagers other than the one that refused
//! keep their turn). A fault at full memory and full swap so fails after a
//! few sweeps, not after dozens of passes that each retry every dirty page.
//! A pass that freed nothing with memory short then unmaps the pages it
//! left alone, for the page tables that held only them.

use crate::object::VmObject;
use crate::object::busy::{BusyPage, Disposal};
use crate::page::{PageFlags, PageId, PageQueue};
use crate::pager::ObjectClass;
use crate::pager::{Pager, PagerError, SwapProvider};
use crate::pmap::Pmap;
use crate::vm::Vm;
use alloc::sync::Arc;
use core::sync::atomic::Ordering;
use smallvec::SmallVec;

/// What one [`Vm::pageout`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageoutReport {
    /// Pages examined.
    pub scanned: u64,
    /// Pages freed.
    pub freed: u64,
    /// Dirty pages written to their pager (and then freed).
    pub laundered: u64,
    /// Referenced pages put back on the active queue.
    pub reactivated: u64,
    /// Active pages moved to the inactive queue.
    pub deactivated: u64,
    /// Dirty pages that could not be written (no pager, swap full, I/O
    /// error): they stay, dirty, in memory.
    pub failed: u64,
}

/// Direct reclaims one operation may run before it only waits.
pub(crate) const MAX_RECLAIMS: u32 = 64;
/// Sweeps over the page array one call makes at most.
const SWEEPS: usize = 3;
/// Pages laundered in one pager call at most (FreeBSD
/// `vm_pageout_page_count`).
const CLUSTER: usize = 32;

impl<P: Pmap> Vm<P> {
    /// Installs the swap that anonymous memory is paged out to.
    pub fn set_swap(&self, swap: Arc<dyn crate::pager::SwapProvider>) {
        *self.swap.lock() = Some(swap);
    }

    /// Runs the pageout scan until `free_target` pages are free or
    /// `SWEEPS` sweeps found nothing more to do.
    pub fn pageout(&self, free_target: u64) -> PageoutReport {
        let pages = &self.machine.pages;
        let mut pass = Pass {
            swap: self.swap.lock().clone(),
            ..Pass::default()
        };
        for _ in 0..SWEEPS {
            if pages.free_at_least(free_target) {
                break;
            }
            let before = pass.moves();
            self.sweep(PageQueue::Inactive, free_target, &mut pass);
            if pages.free_at_least(free_target) {
                break;
            }
            self.sweep(PageQueue::Active, free_target, &mut pass);
            if pass.moves() == before {
                // Every page is where it was and no reference bit was
                // consumed: another round would find the same.
                break;
            }
        }
        if pass.r.freed == 0 && pass.skipped > 0 && !pages.free_at_least(pages.thresholds.severe) {
            self.unmap_unwritable(free_target);
        }
        let r = pass.r;
        let c = self.machine.counters.local();
        c.v_pdpages.fetch_add(r.scanned, Ordering::Relaxed);
        c.v_pdfreed.fetch_add(r.freed, Ordering::Relaxed);
        c.v_reactivated.fetch_add(r.reactivated, Ordering::Relaxed);
        c.v_pageout_failed.fetch_add(r.failed, Ordering::Relaxed);
        r
    }

    /// Frees some memory for a fault that found none (direct reclaim).
    /// Returns whether anything was freed: pages the scan freed, or
    /// memory freed beside them (page tables a pmap let go when the scan
    /// unmapped the last pages they held, frees by other threads).
    pub(crate) fn reclaim(&self) -> bool {
        let pages = &self.machine.pages;
        let before = pages.free_count();
        let target = pages.thresholds.target.max(before + 32);
        self.pageout(target).freed > 0 || pages.free_count() > before
    }

    /// Runs `f` until it stops failing for want of memory (`short` says
    /// which errors are that): between tries, reclaim as a fault does, then
    /// wait for memory a bounded number of times. Map operations that
    /// allocate (fork's copies and page tables) use it, so they fail for
    /// want of memory only when a fault would.
    pub(crate) fn retry_for_memory<T, E>(
        &self,
        mut f: impl FnMut() -> Result<T, E>,
        short: impl Fn(&E) -> bool,
    ) -> Result<T, E> {
        let (mut reclaims, mut waits) = (0, 0);
        loop {
            match f() {
                Err(e) if short(&e) => {
                    if reclaims < MAX_RECLAIMS && self.reclaim() {
                        reclaims += 1;
                        continue;
                    }
                    if waits >= self.config.memory_retries {
                        return Err(e);
                    }
                    waits += 1;
                    self.machine
                        .pages
                        .wait_for_memory(self.config.memory_wait_ms);
                }
                done => return done,
            }
        }
    }

    /// One pass of the clock hand over every page, acting on those of
    /// `queue`.
    fn sweep(&self, queue: PageQueue, free_target: u64, pass: &mut Pass) {
        let pages = &self.machine.pages;
        let total = pages.len();
        for _ in 0..total {
            if queue == PageQueue::Inactive && pages.free_at_least(free_target) {
                return;
            }
            let id = PageId(self.hand.fetch_add(1, Ordering::Relaxed) % total);
            let page = pages.get(id);
            if page.queue() != queue
                || page.is_busy()
                || page.hold_count() != 0
                || page.wire_count() != 0
            {
                continue;
            }
            pass.r.scanned += 1;
            // Both the page's flag and the mappings' A bits are consumed,
            // so a page not used since the last sweep reads unreferenced.
            let used = self.pmap.ts_referenced(pages.pfn(id)) > 0;
            let referenced = page.flags().contains(PageFlags::REFERENCED) || used;
            page.clear_flags(PageFlags::REFERENCED);
            match (queue, referenced) {
                (PageQueue::Active, false) => {
                    pages.deactivate(id);
                    pass.r.deactivated += 1;
                }
                (PageQueue::Inactive, true) => {
                    pages.activate(id);
                    pass.r.reactivated += 1;
                }
                (PageQueue::Inactive, false) => self.evict(id, pass),
                _ => pass.kept_active += 1,
            }
        }
    }

    /// The last resort of a pass that freed nothing with memory short:
    /// unmaps the dirty inactive pages it could not write, so that the
    /// page tables that held only them are freed (FreeBSD's
    /// `reclaim_pv_chunk` takes mappings away to the same end). The pages
    /// stay, dirty, on the inactive queue.
    fn unmap_unwritable(&self, free_target: u64) {
        let pages = &self.machine.pages;
        let total = pages.len();
        for _ in 0..total {
            if pages.free_at_least(free_target) {
                return;
            }
            let id = PageId(self.hand.fetch_add(1, Ordering::Relaxed) % total);
            let page = pages.get(id);
            if page.queue() != PageQueue::Inactive || page.dirty() == 0 || page.is_busy() {
                continue;
            }
            let Some(object) = self.machine.objects.get(page.object_raw()) else {
                continue;
            };
            // Unmapped while busy, released as the guard drops.
            drop(self.claim(&object, id, page.pindex()));
        }
    }

    /// Frees inactive page `id`, laundering it first if dirty — together
    /// with the dirty inactive pages that follow it in its object, in one
    /// pager call (clustered page-out). Every page taken is held busy by a
    /// guard, so a pager that fails or panics leaves nothing busy: the pages
    /// go back, dirty and intact, to the inactive queue.
    fn evict(&self, id: PageId, pass: &mut Pass) {
        let page = self.machine.pages.get(id);
        let Some(object) = self.machine.objects.get(page.object_raw()) else {
            return;
        };
        let pindex = page.pindex();
        if page.dirty() != 0 && pass.refusals() && !self.may_take(&object, pindex, pass) {
            // Leave it mapped and where it is (unless the pass ends with
            // nothing freed: `unmap_unwritable`).
            pass.r.failed += 1;
            pass.skipped += 1;
            return;
        }
        let Some(first) = self.claim(&object, id, pindex) else {
            return;
        };
        let mut run: Run<'_> = SmallVec::new();
        run.push((first, pindex));
        if page.dirty() != 0 {
            self.gather(&object, &mut run, pass);
            if self.launder(&object, &run, pass).is_err() {
                run = self.launder_one_by_one(&object, run, pass);
            }
            pass.r.laundered += run.len() as u64;
        }
        for (mut busy, _) in run {
            // Out of the object and freed as the guard drops.
            busy.discard();
            pass.r.freed += 1;
        }
    }

    /// A run the pager refused whole (a swap device with less room than
    /// the run, a bad block) goes page by page, as FreeBSD's pagers answer
    /// per page: returns the pages written; the others go back, dirty, to
    /// the inactive queue.
    fn launder_one_by_one<'m>(
        &self,
        object: &Arc<VmObject>,
        run: Run<'m>,
        pass: &mut Pass,
    ) -> Run<'m> {
        let mut written: Run<'m> = SmallVec::new();
        let total = run.len() as u64;
        if total > 1 {
            for page in run {
                let one: Run<'m> = smallvec::smallvec![page];
                if self.launder(object, &one, pass).is_ok() {
                    written.extend(one);
                }
            }
        }
        pass.r.failed += total - written.len() as u64;
        written
    }

    /// Whether page `pindex` of `object` may still be written in a pass
    /// that met a refusal for want of room (or has no swap): its pager says
    /// it has room for it ([`Pager::has_room`]), or cannot tell and has not
    /// refused a page this pass, or holds the page already; for an
    /// anonymous object without a pager yet, swap has room.
    fn may_take(&self, object: &VmObject, pindex: u64, pass: &Pass) -> bool {
        let (anonymous, pager) = {
            let st = object.lock();
            (st.kind.is_anonymous(), st.pager.clone())
        };
        match pager {
            None if anonymous => pass.swap_room(),
            None => true,
            // No pager refused this pass (it has no swap): nothing to ask.
            Some(_) if pass.refused.is_empty() => true,
            Some(p) => match p.has_room(pindex) {
                Some(room) => room,
                None => !pass.refused.contains(&address(&p)) || p.has_page(pindex).is_some(),
            },
        }
    }

    /// Busies inactive page `id` of `object` at `pindex` and removes every
    /// mapping of it, so nobody writes it while it is decided and written.
    /// `None` (and nothing held) if it is not ours to take.
    fn claim<'m>(
        &'m self,
        object: &Arc<VmObject>,
        id: PageId,
        pindex: u64,
    ) -> Option<BusyPage<'m>> {
        let pages = &self.machine.pages;
        let page = pages.get(id);
        {
            let st = object.lock();
            let usable = page.queue() == PageQueue::Inactive
                && page.hold_count() == 0
                && page.wire_count() == 0;
            if st.pages.get(&pindex) != Some(&id) || !usable || !page.try_busy() {
                return None;
            }
        }
        let busy = BusyPage::new(&self.machine, object.clone(), id, Disposal::Release);
        if self.pmap.remove_all(pages.pfn(id)).modified {
            page.dirty_all();
        }
        // A hold (or wiring) that came in before the mappings went keeps
        // the page.
        if page.hold_count() != 0 || page.wire_count() != 0 {
            return None;
        }
        Some(busy)
    }

    /// Extends `run` with the dirty inactive pages around it in its object,
    /// those before it first (FreeBSD's `vm_pageout_cluster`): the scan
    /// meets an object's pages in frame order, not index order, so the
    /// page it found is often not the first of a dirty run. Pages the pass
    /// knows cannot be written end the run.
    fn gather<'m>(&'m self, object: &Arc<VmObject>, run: &mut Run<'m>, pass: &Pass) {
        while run.len() < CLUSTER {
            let Some(prev) = run[0].1.checked_sub(1) else {
                break;
            };
            let Some(busy) = self.claim_dirty(object, prev, pass) else {
                break;
            };
            run.insert(0, (busy, prev));
        }
        while run.len() < CLUSTER {
            let next = run[run.len() - 1].1 + 1;
            let Some(busy) = self.claim_dirty(object, next, pass) else {
                return;
            };
            run.push((busy, next));
        }
    }

    /// [`claim`](Self::claim)s the page at `pindex` of `object` if it is
    /// there, dirty, and may be written this pass.
    fn claim_dirty<'m>(
        &'m self,
        object: &Arc<VmObject>,
        pindex: u64,
        pass: &Pass,
    ) -> Option<BusyPage<'m>> {
        if pass.refusals() && !self.may_take(object, pindex, pass) {
            return None;
        }
        let id = object.lock().pages.get(&pindex).copied()?;
        let busy = self.claim(object, id, pindex)?;
        (self.machine.pages.get(id).dirty() != 0).then_some(busy)
    }

    /// Writes the busy, unmapped pages of `run` (contiguous indexes) to
    /// their object's pager, giving an anonymous object swap backing first.
    /// The pages are marked clean only once the pager has them. A single
    /// page refused for want of room is remembered for the pass (see
    /// [`may_take`](Self::may_take)).
    fn launder(&self, object: &Arc<VmObject>, run: &Run<'_>, pass: &mut Pass) -> Result<(), ()> {
        if pass.refusals() && !run.iter().all(|&(_, p)| self.may_take(object, p, pass)) {
            return Err(());
        }
        let (pager, class, given) = {
            let mut st = object.lock();
            let mut given = false;
            if st.pager.is_none() && st.kind.is_anonymous() {
                let swap = self.swap.lock().clone();
                if let Some(p) = swap.and_then(|s| s.pager_for(st.size)) {
                    st.kind = p.kind();
                    st.pager = Some(p);
                    given = true;
                }
            }
            (st.pager.clone(), st.kind.class(), given)
        };
        // (A provider that declined this object may take others.)
        let pager: Arc<dyn Pager> = pager.ok_or(())?;
        let _pip = crate::object::busy::Pip::new(object.clone());
        crate::clean::write_clean(&self.machine, &*pager, run.iter().map(|(b, p)| (b, *p)))
            .map_err(|e| {
                // A run may not fit where its pages one by one would.
                if run.len() == 1 && matches!(e, PagerError::Error(io) if io.is_no_space()) {
                    let a = address(&pager);
                    if !pass.refused.contains(&a) {
                        pass.refused.push(a);
                    }
                    pass.swap_refused |= given;
                }
            })?;
        let c = match class {
            ObjectClass::File => &self.machine.counters.local().v_vnodepgsout,
            ObjectClass::Anonymous | ObjectClass::Device => {
                &self.machine.counters.local().v_swappgsout
            }
        };
        c.fetch_add(run.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Busy pages of one page-out, with their indexes in the object.
type Run<'m> = SmallVec<[(BusyPage<'m>, u64); CLUSTER]>;

/// One [`Vm::pageout`] call's running state.
#[derive(Default)]
struct Pass {
    r: PageoutReport,
    /// Active pages found referenced (their bits consumed: the next sweep
    /// may deactivate them).
    kept_active: u64,
    /// The swap provider as the pass began (`None`: anonymous objects
    /// without a pager have nowhere to go).
    swap: Option<Arc<dyn SwapProvider>>,
    /// The pagers (by address) that refused a single page for want of
    /// room.
    refused: SmallVec<[usize; 4]>,
    /// One of them was given by the swap provider in this pass.
    swap_refused: bool,
    /// Dirty pages left mapped because they could not be written.
    skipped: u64,
}

/// A pager's identity for the length of a pass (the objects keep it alive).
fn address(pager: &Arc<dyn Pager>) -> usize {
    Arc::as_ptr(pager).cast::<()>() as usize
}

impl Pass {
    /// Whether anything is known to be unwritable this pass.
    fn refusals(&self) -> bool {
        self.swap.is_none() || !self.refused.is_empty()
    }

    /// Whether swap may take a page of an anonymous object that has no
    /// pager yet: the provider says so ([`SwapProvider::has_room`]), or
    /// cannot tell and no pager it gave this pass refused a page.
    fn swap_room(&self) -> bool {
        self.swap
            .as_ref()
            .is_some_and(|s| s.has_room().unwrap_or(!self.swap_refused))
    }

    /// What a sweep can change: a round that changes none of it is the
    /// last one worth running.
    fn moves(&self) -> (u64, u64, u64, u64) {
        let r = &self.r;
        (r.freed, r.deactivated, r.reactivated, self.kept_active)
    }
}

/// A pageout daemon thread; stopped and joined on drop.
#[cfg(feature = "std")]
#[derive(Debug)]
pub struct PageoutDaemon {
    _thread: crate::daemon::Daemon,
}

#[cfg(feature = "std")]
impl<P: Pmap> Vm<P> {
    /// Starts a thread that runs the scan whenever free memory falls below
    /// the target threshold (checked every `period`).
    ///
    /// # Panics
    ///
    /// If the thread cannot be started (as `std::thread::spawn`).
    pub fn spawn_pageout_daemon(self: &Arc<Self>, period: std::time::Duration) -> PageoutDaemon {
        let vm = self.clone();
        PageoutDaemon {
            _thread: crate::daemon::Daemon::spawn("vm-pageout", move || {
                let target = vm.machine.pages.thresholds.target;
                if vm.free_pages() < target {
                    vm.pageout(target);
                }
                std::thread::sleep(period);
            }),
        }
    }
}
