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

use crate::object::VmObject;
use crate::object::busy::{BusyPage, Disposal};
use crate::page::{PageFlags, PageId, PageQueue};
use crate::pager::ObjectClass;
use crate::pager::Pager;
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
        let mut r = PageoutReport::default();
        for _ in 0..SWEEPS {
            if pages.free_at_least(free_target) {
                break;
            }
            self.sweep(PageQueue::Inactive, free_target, &mut r);
            if pages.free_at_least(free_target) {
                break;
            }
            self.sweep(PageQueue::Active, free_target, &mut r);
        }
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
    fn sweep(&self, queue: PageQueue, free_target: u64, r: &mut PageoutReport) {
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
            r.scanned += 1;
            // Both the page's flag and the mappings' A bits are consumed,
            // so a page not used since the last sweep reads unreferenced.
            let used = self.pmap.ts_referenced(pages.pfn(id)) > 0;
            let referenced = page.flags().contains(PageFlags::REFERENCED) || used;
            page.clear_flags(PageFlags::REFERENCED);
            match (queue, referenced) {
                (PageQueue::Active, false) => {
                    pages.deactivate(id);
                    r.deactivated += 1;
                }
                (PageQueue::Inactive, true) => {
                    pages.activate(id);
                    r.reactivated += 1;
                }
                (PageQueue::Inactive, false) => self.evict(id, r),
                _ => {}
            }
        }
    }

    /// Frees inactive page `id`, laundering it first if dirty — together
    /// with the dirty inactive pages that follow it in its object, in one
    /// pager call (clustered page-out). Every page taken is held busy by a
    /// guard, so a pager that fails or panics leaves nothing busy: the pages
    /// go back, dirty and intact, to the inactive queue.
    fn evict(&self, id: PageId, r: &mut PageoutReport) {
        let page = self.machine.pages.get(id);
        let Some(object) = self.machine.objects.get(page.object_raw()) else {
            return;
        };
        let pindex = page.pindex();
        let Some(first) = self.claim(&object, id, pindex) else {
            return;
        };
        let mut run: Run<'_> = SmallVec::new();
        run.push((first, pindex));
        if page.dirty() != 0 {
            self.gather(&object, &mut run);
            if self.launder(&object, &run).is_err() {
                run = self.launder_one_by_one(&object, run, r);
            }
            r.laundered += run.len() as u64;
        }
        for (mut busy, _) in run {
            // Out of the object and freed as the guard drops.
            busy.discard();
            r.freed += 1;
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
        r: &mut PageoutReport,
    ) -> Run<'m> {
        let mut written: Run<'m> = SmallVec::new();
        if run.len() == 1 {
            r.failed += 1;
            return written;
        }
        for page in run {
            let one: Run<'m> = smallvec::smallvec![page];
            if self.launder(object, &one).is_ok() {
                written.extend(one);
            } else {
                r.failed += 1;
            }
        }
        written
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
    /// page it found is often not the first of a dirty run.
    fn gather<'m>(&'m self, object: &Arc<VmObject>, run: &mut Run<'m>) {
        while run.len() < CLUSTER {
            let Some(prev) = run[0].1.checked_sub(1) else {
                break;
            };
            let Some(busy) = self.claim_dirty(object, prev) else {
                break;
            };
            run.insert(0, (busy, prev));
        }
        while run.len() < CLUSTER {
            let next = run[run.len() - 1].1 + 1;
            let Some(busy) = self.claim_dirty(object, next) else {
                return;
            };
            run.push((busy, next));
        }
    }

    /// [`claim`](Self::claim)s the page at `pindex` of `object` if it is
    /// there and dirty.
    fn claim_dirty<'m>(&'m self, object: &Arc<VmObject>, pindex: u64) -> Option<BusyPage<'m>> {
        let id = object.lock().pages.get(&pindex).copied()?;
        let busy = self.claim(object, id, pindex)?;
        (self.machine.pages.get(id).dirty() != 0).then_some(busy)
    }

    /// Writes the busy, unmapped pages of `run` (contiguous indexes) to
    /// their object's pager, giving an anonymous object swap backing first.
    /// The pages are marked clean only once the pager has them.
    fn launder(&self, object: &Arc<VmObject>, run: &Run<'_>) -> Result<(), ()> {
        let (pager, class) = {
            let mut st = object.lock();
            if st.pager.is_none() && st.kind.is_anonymous() {
                let swap = self.swap.lock().clone();
                if let Some(p) = swap.and_then(|s| s.pager_for(st.size)) {
                    st.kind = p.kind();
                    st.pager = Some(p);
                }
            }
            (st.pager.clone(), st.kind.class())
        };
        let pager: Arc<dyn Pager> = pager.ok_or(())?;
        let _pip = crate::object::busy::Pip::new(object.clone());
        crate::clean::write_clean(&self.machine, &*pager, run.iter().map(|(b, p)| (b, *p)))
            .map_err(|_| ())?;
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
