//! Asking the pager, with read-ahead/behind clustering: seed L465-634 and
//! `vm_fault_additional_pages` (L1203-1343).

use super::FaultState;
use crate::addr::PhysAddr;
use crate::map::Behavior;
use crate::object::VmObject;
use crate::object::busy::{BusyPage, Disposal, Pip};
use crate::page::{PageFlags, PageId, VM_PAGE_BITS_ALL};
use crate::page_queues::AllocClass;
use crate::pager::ObjectClass;
use crate::pager::{Contiguity, PageSlot, Pager, PagerError};
use crate::pmap::Pmap;
use alloc::boxed::Box;
use alloc::sync::Arc;
use core::sync::atomic::Ordering;
use smallvec::SmallVec;

/// Pages read ahead of a fault (`VM_FAULT_READ_AHEAD`).
pub const READ_AHEAD: u64 = 8;
/// Pages read behind a fault (`VM_FAULT_READ_BEHIND`).
pub const READ_BEHIND: u64 = 7;
/// Read-around misses after which a mapping is taken as randomly accessed
/// and a miss reads only its page (Linux's `MMAP_LOTSAMISS`).
const MISS_LIMIT: u32 = 100;
/// The seed's cluster (`VM_FAULT_READ`): the width of the window in
/// which a fault counts as sequential, and the first sequential window.
pub const READ_MAX: u64 = READ_AHEAD + READ_BEHIND + 1;
/// Pages ahead a cluster holds on the stack (the default
/// [`read_ahead_max`](crate::VmConfig::read_ahead_max)); a larger window
/// spills to the heap.
const INLINE_AHEAD: usize = 63;
/// Pages of a cluster held on the stack.
const INLINE: usize = INLINE_AHEAD + 1 + READ_BEHIND as usize;

/// The pages of one pager call, in index order, with the requested one.
struct Cluster<'m> {
    behind: SmallVec<[BusyPage<'m>; READ_BEHIND as usize]>,
    ahead: SmallVec<[BusyPage<'m>; INLINE_AHEAD]>,
}

impl<P: Pmap> FaultState<'_, P> {
    /// Reads the busy page `self.m` of `object` — and the neighbours the
    /// clustering rules allow — through its pager, with the map lock
    /// dropped and the object kept alive by paging-in-progress. On success
    /// the page is left busy and kept in the object; the neighbours are
    /// left on the inactive queue.
    pub(super) fn page_in(&mut self, object: &Arc<VmObject>) -> Result<(), PagerError> {
        let Some(pager) = object.lock().pager.clone() else {
            return Err(PagerError::Fail);
        };
        let Some(contig) = pager.has_page(self.pindex) else {
            return Err(PagerError::Fail);
        };
        let (behind, ahead) = self.cluster_window();
        // Filled in place: the cluster's inline arrays are kilobytes, and
        // moving them costs a copy per fault.
        let mut cluster = Cluster {
            behind: SmallVec::new(),
            ahead: SmallVec::new(),
        };
        self.additional_pages(object, contig, (behind, ahead), &mut cluster);
        // A window read ahead only (a sequential one) gets a marker for
        // the next window's background read.
        let mark = behind == 0 && cluster.ahead.len() >= 2 && self.background_reads();
        let count = cluster.behind.len() + 1 + cluster.ahead.len();
        let lo = self.va - cluster.behind.len() as u64 * crate::PAGE_SIZE;
        self.read_around = Some(lo..lo + count as u64 * crate::PAGE_SIZE);
        // lastr, "imperfectly" as the seed does (L551-558); written under
        // the read lock, hence atomic.
        if let Some(e) = self
            .map
            .as_ref()
            .and_then(|g| g.entries.get(&self.entry_start))
        {
            e.lastr.store(
                (self.pindex + count as u64).saturating_sub(behind),
                Ordering::Relaxed,
            );
        }
        // Unlock the map for the I/O (L565).
        self.map = None;
        self.read_cluster(&*pager, &mut cluster, mark)?;
        Ok(())
    }

    /// Whether read-ahead may go to the background: configured so, and an
    /// executor is there.
    fn background_reads(&self) -> bool {
        let vm = self.target.vm;
        vm.config.async_read_ahead && vm.io_executor().is_some()
    }

    /// Seed L469-528 with modern FreeBSD's adaptive window
    /// (`vm_fault_readahead`): how far behind and ahead to read. A fault
    /// in the window after the last read (`lastr`) is sequential: it reads
    /// ahead only, drops the pages behind the scan (cache-behind), and
    /// doubles the entry's window, from the seed's 15 pages up to
    /// [`read_ahead_max`](crate::VmConfig::read_ahead_max). Any other fault
    /// reads the seed's cluster around the page and halves the window, so
    /// one stray fault does not undo a long scan; after [`MISS_LIMIT`] such
    /// misses that later faults did not take back by finding pages
    /// resident (Linux's `mmap_miss`), a miss reads only its page.
    /// `MADV_SEQUENTIAL` reads the largest window at once; `MADV_RANDOM`
    /// reads one page.
    fn cluster_window(&self) -> (u64, u64) {
        let Some(entry) = self
            .map
            .as_ref()
            .and_then(|g| g.entries.get(&self.entry_start))
        else {
            return (0, 0);
        };
        let behavior = entry.behavior;
        if behavior == Behavior::Random {
            return (0, 0);
        }
        let max = u64::from(self.target.vm.config.read_ahead_max);
        let room_behind = (self.va - entry.start) >> crate::PAGE_SHIFT;
        let room_ahead = ((entry.end - self.va) >> crate::PAGE_SHIFT) - 1;
        let era = u64::from(entry.read_ahead.load(Ordering::Relaxed));
        let lastr = entry.lastr.load(Ordering::Relaxed);
        let in_window = self.pindex >= lastr && self.pindex < lastr + READ_MAX;
        let clusters = self.first.object().kind().clusters();
        let misses = entry.read_misses.load(Ordering::Relaxed);
        let (nera, window) = if behavior == Behavior::Sequential && clusters {
            (max, (0, max))
        } else if in_window && clusters {
            if misses != 0 {
                entry.read_misses.store(0, Ordering::Relaxed);
            }
            let grown = if era == 0 { READ_MAX - 1 } else { 2 * era + 1 };
            (grown.min(max), (0, grown.min(max)))
        } else if misses >= MISS_LIMIT {
            // Random access: what was read around went unused.
            (era / 2, (0, 0))
        } else {
            entry.read_misses.store(misses + 1, Ordering::Relaxed);
            (era / 2, (READ_BEHIND, READ_AHEAD))
        };
        if nera != era {
            // Under the map's read lock, as `lastr`: a racing fault's
            // store may win, which only changes the next window's size.
            entry.read_ahead.store(nera as u32, Ordering::Relaxed);
        }
        if window.0 == 0 && clusters {
            self.cache_behind(era);
        }
        (window.0.min(room_behind), window.1.min(room_ahead))
    }

    /// Seed L493-525: on a sequential scan, the pages behind it in the
    /// first object are unmapped and deactivated, so a large scan does not
    /// push out everything else; a later fault on one is still soft. The
    /// seed looked back two clusters; here two windows of the scan's size
    /// `era` (the window read before this fault), so a window of any size
    /// is covered.
    fn cache_behind(&self, era: u64) {
        let first = self.first.object();
        let pages = &self.machine.pages;
        let vm = &self.target.vm;
        let lowest = self
            .first_pindex
            .saturating_sub(2 * (era + 1).max(READ_MAX));
        let st = first.lock();
        for p in (lowest..self.first_pindex).rev() {
            let Some(&id) = st.pages.get(&p) else { break };
            let page = pages.get(id);
            if page.valid() != VM_PAGE_BITS_ALL {
                break;
            }
            if page.is_busy()
                || page
                    .flags()
                    .intersects(PageFlags::FICTITIOUS | PageFlags::UNMANAGED)
                || page.hold_count() != 0
                || page.wire_count() != 0
            {
                continue;
            }
            if vm.pmap.remove_all(pages.pfn(id)).modified {
                page.dirty_all();
            }
            // The seed caches the clean ones (still findable, L522) and
            // deactivates the dirty ones; both stay resident here, at the
            // inactive queue's tail, first in line for the pageout scan
            // (modern FreeBSD's `vm_page_deactivate_noreuse`).
            pages.deactivate(id);
            self.machine
                .counters
                .local()
                .v_cache_behind
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Cuts the entry's read-ahead window to at most `pages`.
    fn shrink_window(&self, pages: u64) {
        if let Some(e) = self
            .map
            .as_ref()
            .and_then(|g| g.entries.get(&self.entry_start))
        {
            let cut = u32::try_from(pages).unwrap_or(u32::MAX);
            e.read_ahead.fetch_min(cut, Ordering::Relaxed);
        }
    }

    /// Seed `vm_fault_additional_pages`: allocates busy neighbours of the
    /// requested page that the pager can read in the same operation,
    /// bounded by what it reports contiguous, by resident pages, by the
    /// object's end and by free memory, into `cluster` (empty).
    fn additional_pages<'m>(
        &self,
        object: &Arc<VmObject>,
        contig: Contiguity,
        (behind, ahead): (u64, u64),
        cluster: &mut Cluster<'m>,
    ) where
        Self: 'm,
    {
        let pages = &self.machine.pages;
        let mut st = object.lock();
        if !st.kind.clusters() || (contig.behind == 0 && contig.ahead == 0) {
            return;
        }
        let mut rahead = ahead.min(u64::from(contig.ahead));
        let mut rbehind = behind.min(u64::from(contig.behind)).min(self.pindex);
        let spare = pages.free_count().saturating_sub(pages.thresholds.reserved);
        if rahead + rbehind > spare {
            self.machine
                .counters
                .local()
                .v_cluster_short
                .fetch_add(1, Ordering::Relaxed);
            // Short of memory: the seed read one page; a window larger
            // than what is spare is cut to it instead, and the entry's
            // window with it, so that a large window on a small machine
            // does not turn a scan into single-page reads for good.
            self.shrink_window(spare);
            if spare == 0 {
                return;
            }
            rbehind = rbehind.min(spare / 2);
            rahead = rahead.min(spare - rbehind);
        }
        // Behind: stop above the nearest resident page.
        let mut start = self.pindex - rbehind;
        if let Some(r) = (start..self.pindex)
            .rev()
            .find(|p| st.pages.contains_key(p))
        {
            start = r + 1;
        }
        for p in start..self.pindex {
            match self.alloc_into(object, &mut st, p) {
                Some(b) => cluster.behind.push(b),
                None => {
                    // All or nothing behind (seed L1296-1306).
                    drop(st);
                    cluster.behind.clear();
                    return;
                }
            }
        }
        // Ahead: stop below the nearest resident page and at the end.
        let end = (self.pindex + 1 + rahead).min(st.size);
        for p in self.pindex + 1..end {
            if st.pages.contains_key(&p) {
                break;
            }
            match self.alloc_into(object, &mut st, p) {
                Some(b) => cluster.ahead.push(b),
                None => break,
            }
        }
    }

    /// A new busy page inserted at `pindex` of `object` (locked as `st`).
    fn alloc_into<'m>(
        &self,
        object: &Arc<VmObject>,
        st: &mut crate::object::ObjectState,
        pindex: u64,
    ) -> Option<BusyPage<'m>>
    where
        Self: 'm,
    {
        let pages = &self.machine.pages;
        let id = pages.alloc(object.id().0 ^ pindex, AllocClass::Normal, false)?;
        let page = pages.get(id);
        page.set_flags(PageFlags::BUSY);
        object.insert_page(st, id, page, pindex);
        Some(BusyPage::new(
            self.machine,
            object.clone(),
            id,
            Disposal::Free,
        ))
    }

    /// The pager answered with device memory: put a fictitious page for
    /// it in the object in place of the page allocated for the read, which
    /// is freed (FreeBSD `dev_pager_getpages`).
    fn use_device_page(
        &mut self,
        pa: PhysAddr,
        attr: crate::mem_attr::MemAttr,
    ) -> Result<(), PagerError> {
        let pages = &self.machine.pages;
        let ram = self.m.take().expect("page to read");
        let object = ram.object().clone();
        let Some(fid) = pages.alloc_fictitious(crate::addr::Pfn::containing(pa), attr) else {
            self.m = Some(ram);
            return Err(PagerError::Again);
        };
        let page = pages.get(fid);
        page.set_flags(PageFlags::BUSY);
        {
            let mut st = object.lock();
            st.pages.remove(&self.pindex);
            object.insert_page(&mut st, fid, page, self.pindex);
        }
        drop(ram);
        self.m = Some(BusyPage::new(self.machine, object, fid, Disposal::Release));
        Ok(())
    }

    /// Calls the pager on the whole cluster and settles each page.
    fn read_cluster(
        &mut self,
        pager: &dyn Pager,
        cluster: &mut Cluster<'_>,
        mark: bool,
    ) -> Result<(), PagerError> {
        let m = self.m.as_mut().expect("page to read");
        let reqpage = cluster.behind.len();
        let phys = &self.machine.phys;
        let mut slots: SmallVec<[PageSlot<'_>; INLINE]> = SmallVec::new();
        for b in cluster
            .behind
            .iter()
            .chain(core::iter::once(&*m))
            .chain(cluster.ahead.iter())
        {
            b.page().clear_flags(PageFlags::ZERO);
            // Every page of the cluster is busy (owned by this fault) and
            // not wholly valid, so never mapped: the pager alone writes it.
            slots.push(PageSlot::new(b.page().pindex(), phys.writer_of(b.pfn())));
        }
        let counters = self.machine.counters.local();
        counters.v_pager_calls.fetch_add(1, Ordering::Relaxed);
        pager.get_pages(&mut slots, reqpage)?;
        let valid: SmallVec<[u8; INLINE]> = slots.iter().map(PageSlot::valid).collect();
        let device = slots[reqpage].device();
        drop(slots);
        if let Some((pa, attr)) = device {
            self.use_device_page(pa, attr)?;
            counters.v_io_faults.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.m
            .as_ref()
            .expect("page to read")
            .page()
            .set_valid(valid[reqpage]);
        // What the pager left invalid in the requested page is zeroed now,
        // before anything (a copy-on-write copy) can see the frame.
        self.settle_partial();
        let class = self
            .m
            .as_ref()
            .expect("page to read")
            .object()
            .kind()
            .class();
        // The marker is the first page read ahead: the next access starts
        // the next window while the reader goes through this one.
        if let Some(b) = cluster.ahead.first().filter(|_| mark) {
            // Busy still: whoever sees the page sees the marker.
            b.page().set_flags(PageFlags::READAHEAD);
        }
        let neighbours = cluster.behind.drain(..).chain(cluster.ahead.drain(..));
        let valid = valid[..reqpage].iter().chain(&valid[reqpage + 1..]);
        let read = 1 + keep_filled(neighbours.zip(valid.copied()));
        count_pages_in(counters, class, read);
        counters.v_io_faults.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The fault found a read-ahead marker (Linux's asynchronous
    /// read-ahead): allocates the window after the resident run that holds
    /// the marker, busy, doubles the entry's window as a sequential fault
    /// does, marks the new window's first page, and hands the read to the
    /// machine's [`IoExecutor`](crate::IoExecutor). The fault goes on; a
    /// fault on one of the pages waits for the read as for any busy page.
    pub(super) fn read_ahead_async(&self) {
        let object = self.current().clone();
        let Some(entry) = self
            .map
            .as_ref()
            .and_then(|g| g.entries.get(&self.entry_start))
        else {
            return;
        };
        let Some(pager) = object.lock().pager.clone() else {
            return;
        };
        if entry.behavior == Behavior::Random || !object.kind().clusters() {
            return;
        }
        let era = u64::from(entry.read_ahead.load(Ordering::Relaxed));
        // The scan reached the marker: what lies behind it is done with,
        // whether or not a next window is left to read (the last window
        // of an entry has none).
        self.cache_behind(era);
        let vm = self.target.vm;
        let Some(executor) = vm.io_executor() else {
            return;
        };
        let max = u64::from(vm.config.read_ahead_max);
        // The last page of this object the entry maps.
        let last = self.pindex + ((entry.end - self.va) >> crate::PAGE_SHIFT) - 1;
        let (limit, start) = {
            let st = object.lock();
            let limit = last.min(st.size.saturating_sub(1));
            let start = (self.pindex + 1..=limit)
                .take(max as usize + 1)
                .find(|p| !st.pages.contains_key(p));
            (limit, start)
        };
        let Some(start) = start else { return };
        let Some(contig) = pager.has_page(start) else {
            return;
        };
        let nera = if era == 0 { READ_MAX - 1 } else { 2 * era + 1 }.min(max);
        entry.read_ahead.store(nera as u32, Ordering::Relaxed);
        let mut end = (start + 1 + nera.min(u64::from(contig.ahead))).min(limit + 1);
        let pages = &self.machine.pages;
        let spare = pages.free_count().saturating_sub(pages.thresholds.reserved);
        if end - start > spare {
            self.machine
                .counters
                .local()
                .v_cluster_short
                .fetch_add(1, Ordering::Relaxed);
            self.shrink_window(spare);
            end = start + spare;
        }
        let mut ids: SmallVec<[PageId; INLINE]> = SmallVec::new();
        {
            let mut st = object.lock();
            for p in start..end {
                // The size again: a truncation may have come since.
                if p >= st.size || st.pages.contains_key(&p) {
                    break;
                }
                match self.alloc_into(&object, &mut st, p) {
                    Some(b) => ids.push(b.hand_over()),
                    None => break,
                }
            }
        }
        let Some(&first) = ids.first() else { return };
        entry.lastr.store(
            pages.get(first).pindex() + ids.len() as u64,
            Ordering::Relaxed,
        );
        // The next marker is this window's first page: when the reader
        // gets there, the window after it starts, a whole window ahead
        // (Linux marks the start of the asynchronous part the same way).
        if ids.len() >= 2 {
            pages.get(first).set_flags(PageFlags::READAHEAD);
        }
        self.machine.background_enter();
        let read = PendingRead {
            pager,
            ids,
            _done: BackgroundDone(object.machine.clone()),
            pip: Pip::new(object),
        };
        executor.execute(Box::new(move || read.run()));
    }
}

/// A background read handed to an executor: the window's busy pages and
/// the paging reference on their object. Dropped without running (an
/// executor that discards it), it frees the pages, as a failed read does.
/// Fields drop in order after that: the paging reference, then the count
/// a waiter for background reads watches, so the waiter finds every page
/// settled (even if the pager panics).
struct PendingRead {
    pager: Arc<dyn Pager>,
    ids: SmallVec<[PageId; INLINE]>,
    pip: Pip,
    _done: BackgroundDone,
}

impl PendingRead {
    fn run(mut self) {
        let ids = core::mem::take(&mut self.ids);
        read_in_background(&*self.pager, &self.pip, &ids);
    }
}

impl Drop for PendingRead {
    fn drop(&mut self) {
        let object = self.pip.object();
        for &id in &self.ids {
            drop(BusyPage::new(
                &object.machine,
                object.clone(),
                id,
                Disposal::Free,
            ));
        }
    }
}

/// Counts a background read as done when dropped.
struct BackgroundDone(Arc<crate::object::Machine>);

impl Drop for BackgroundDone {
    fn drop(&mut self) {
        self.0.background_leave();
    }
}

/// A background read of the busy pages `ids` of `pip`'s object, as the
/// fault path's [`read_cluster`](FaultState::read_cluster) settles a
/// cluster: pages the pager filled (even in part) stay, on the inactive
/// queue; the rest, or all on an error, are freed. Each is unbusied, which
/// wakes the faults waiting for it.
fn read_in_background(pager: &dyn Pager, pip: &Pip, ids: &[PageId]) {
    let object = pip.object();
    let machine = &*object.machine;
    let busy: SmallVec<[BusyPage<'_>; INLINE]> = ids
        .iter()
        .map(|&id| BusyPage::new(machine, object.clone(), id, Disposal::Free))
        .collect();
    let mut slots: SmallVec<[PageSlot<'_>; INLINE]> = busy
        .iter()
        .map(|b| {
            // The pager writes the frame: it is no longer known zero, even
            // if the read fails and the page goes back free.
            b.page().clear_flags(PageFlags::ZERO);
            PageSlot::new(b.page().pindex(), machine.phys.writer_of(b.pfn()))
        })
        .collect();
    let counters = machine.counters.local();
    counters.v_pager_calls.fetch_add(1, Ordering::Relaxed);
    counters.v_async_reads.fetch_add(1, Ordering::Relaxed);
    let result = pager.get_pages(&mut slots, 0);
    let device = slots.iter().any(|s| s.device().is_some());
    let valid: SmallVec<[u8; INLINE]> = slots.iter().map(PageSlot::valid).collect();
    drop(slots);
    if result.is_err() || device {
        // Dropped busy with `Free`: out of the object, freed, waiters woken
        // (they retry and read the page themselves).
        return;
    }
    let read = keep_filled(busy.into_iter().zip(valid));
    count_pages_in(counters, object.kind().class(), read);
}

/// Settles read pages with the validity the pager gave them: a page it
/// filled, even in part, stays (inactive, as the guard drops); one it left
/// invalid is freed. Returns the pages kept.
fn keep_filled<'m>(pages: impl Iterator<Item = (BusyPage<'m>, u8)>) -> u64 {
    let mut kept = 0;
    for (mut b, v) in pages {
        if v != 0 {
            b.page().set_valid(v);
            b.keep();
            kept += 1;
        }
    }
    kept
}

/// Counts `read` pages brought in by a pager of `class`.
fn count_pages_in(counters: &crate::counters::CounterShard, class: ObjectClass, read: u64) {
    counters.v_pager_pages.fetch_add(read, Ordering::Relaxed);
    let by_type = match class {
        ObjectClass::Anonymous => &counters.v_swappgsin,
        ObjectClass::File => &counters.v_vnodepgsin,
        ObjectClass::Device => return,
    };
    by_type.fetch_add(read, Ordering::Relaxed);
}
