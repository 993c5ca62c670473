//! `VmPage`: the per-frame record (FreeBSD `struct vm_page`).
//!
//! One exists for every frame of physical memory, so it is kept to 32 bytes.
//! Its state word packs the valid and dirty block masks, the flags and the
//! queue; every field is atomic. The protocol that keeps them meaningful
//! follows FreeBSD: the identity (object, pindex) changes only under the
//! owning object's lock; contents, valid and dirty bits change only while
//! the page is busy; the queue and wiring change with atomic operations.

use crate::sync::WaitTable;
use crate::sync::atomic::AtomicU32;
use core::sync::atomic::{AtomicU64, Ordering};

/// All eight 512-byte blocks of a 4 KiB page (FreeBSD `VM_PAGE_BITS_ALL`).
pub const VM_PAGE_BITS_ALL: u8 = 0xff;
/// Bytes per valid/dirty block (FreeBSD `DEV_BSIZE`).
pub const DEV_BSIZE: usize = 512;

/// Index of a page in the machine's page array.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageId(pub u32);

bitflags::bitflags! {
    /// Flags of a page (FreeBSD `PG_*` and `VPO_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PageFlags: u32 {
        /// Held exclusively by a fault, a pager or the pageout daemon
        /// (`VPO_BUSY`).
        const BUSY = 1 << 16;
        /// Someone sleeps until the page is no longer busy (`VPO_WANTED`).
        const WANTED = 1 << 17;
        /// The frame is known to hold zeros (`PG_ZERO`).
        const ZERO = 1 << 18;
        /// Recently used (`PG_REFERENCED`).
        const REFERENCED = 1 << 19;
        /// Not a frame of RAM: a device page (`PG_FICTITIOUS`).
        const FICTITIOUS = 1 << 20;
        /// Mappings are not tracked (`PG_UNMANAGED`).
        const UNMANAGED = 1 << 21;
        /// Written through a `MAP_NOSYNC` mapping (`VPO_NOSYNC`).
        const NOSYNC = 1 << 22;
        /// Freed while held: the last release frees it (FreeBSD's
        /// `PQ_HOLD`).
        const FREE_PENDING = 1 << 23;
        /// A page-table frame of the pmap's, from
        /// [`PhysFrames::alloc_zeroed`](crate::pmap::PhysFrames::alloc_zeroed).
        const TABLE = 1 << 24;
        /// A read-ahead marker (Linux's `PG_readahead`): the first fault
        /// that reaches this page starts reading the next window in the
        /// background, so a sequential reader finds it resident.
        /// Fault-around leaves it unmapped so that the access faults.
        const READAHEAD = 1 << 25;
        /// On a free list (set and cleared under the list's lock): only
        /// such a page may be taken off a list by its id.
        const LISTED = 1 << 26;
    }
}

/// The queue a page is on (FreeBSD `PQ_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum PageQueue {
    /// On no queue: busy in a fault, wired, or not yet placed.
    None = 0,
    /// Free for allocation.
    Free = 1,
    /// In use, recently referenced.
    Active = 2,
    /// In use, candidate for page-out.
    Inactive = 3,
}

const VALID_SHIFT: u32 = 0;
const DIRTY_SHIFT: u32 = 8;
const QUEUE_SHIFT: u32 = 28;
const QUEUE_MASK: u32 = 0xf << QUEUE_SHIFT;
const FLAG_MASK: u32 = 0x0fff_0000;

/// Object id meaning "owned by no object".
pub(crate) const NO_OBJECT: u64 = 0;

/// The per-frame record.
#[derive(Debug)]
pub struct VmPage {
    /// valid (bits 0-7) | dirty (8-15) | flags (16-27) | queue (28-31).
    state: AtomicU32,
    wire_count: AtomicU32,
    hold_count: AtomicU32,
    /// Soft-busy count: read-only I/O in progress (FreeBSD `m->busy`).
    soft_busy: AtomicU32,
    /// Owning object's id, [`NO_OBJECT`] when free.
    object: AtomicU64,
    /// Index in the owning object; while free, the free list's links
    /// (next | previous << 32).
    pindex: AtomicU64,
}

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<VmPage>() == 32);

impl Default for VmPage {
    fn default() -> Self {
        VmPage {
            state: AtomicU32::new(0),
            wire_count: AtomicU32::new(0),
            hold_count: AtomicU32::new(0),
            soft_busy: AtomicU32::new(0),
            object: AtomicU64::new(NO_OBJECT),
            pindex: AtomicU64::new(0),
        }
    }
}

impl VmPage {
    /// Blocks holding valid data, one bit per 512 bytes.
    #[must_use]
    pub fn valid(&self) -> u8 {
        (self.state.load(Ordering::Acquire) >> VALID_SHIFT) as u8
    }

    /// Blocks modified since last cleaned, one bit per 512 bytes.
    #[must_use]
    pub fn dirty(&self) -> u8 {
        (self.state.load(Ordering::Acquire) >> DIRTY_SHIFT) as u8
    }

    /// The page's flags.
    #[must_use]
    pub fn flags(&self) -> PageFlags {
        PageFlags::from_bits_truncate(self.state.load(Ordering::Acquire) & FLAG_MASK)
    }

    /// The queue the page is on.
    #[must_use]
    pub fn queue(&self) -> PageQueue {
        queue_of(self.state.load(Ordering::Acquire))
    }

    /// Wirings of the page (FreeBSD `wire_count`).
    #[must_use]
    pub fn wire_count(&self) -> u32 {
        self.wire_count.load(Ordering::Acquire)
    }

    /// Holds (pins) of the page (FreeBSD `hold_count`).
    #[must_use]
    pub fn hold_count(&self) -> u32 {
        self.hold_count.load(Ordering::Acquire)
    }

    /// Soft-busy count (read-only I/O in progress).
    #[must_use]
    pub fn soft_busy(&self) -> u32 {
        self.soft_busy.load(Ordering::Acquire)
    }

    /// Raw id of the owning object, 0 for none.
    #[must_use]
    pub fn object_raw(&self) -> u64 {
        self.object.load(Ordering::Acquire)
    }

    /// Index of the page in its object (meaningless while free).
    #[must_use]
    pub fn pindex(&self) -> u64 {
        self.pindex.load(Ordering::Acquire)
    }

    fn update(&self, f: impl Fn(u32) -> u32) -> u32 {
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            match self
                .state
                .compare_exchange_weak(cur, f(cur), Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(old) => return old,
                Err(now) => cur = now,
            }
        }
    }

    pub(crate) fn set_flags(&self, f: PageFlags) {
        self.state.fetch_or(f.bits(), Ordering::AcqRel);
    }

    pub(crate) fn clear_flags(&self, f: PageFlags) {
        self.state.fetch_and(!f.bits(), Ordering::AcqRel);
    }

    /// Clears `f`; true if this call cleared it (it was set).
    pub(crate) fn take_flag(&self, f: PageFlags) -> bool {
        self.state.fetch_and(!f.bits(), Ordering::AcqRel) & f.bits() != 0
    }

    /// Busies the page if it is neither busy nor soft-busy; true on success.
    pub(crate) fn try_busy(&self) -> bool {
        if self.soft_busy() != 0 {
            return false;
        }
        self.state
            .fetch_or(PageFlags::BUSY.bits(), Ordering::AcqRel)
            & PageFlags::BUSY.bits()
            == 0
    }

    /// Whether the page is busy or soft-busy.
    #[must_use]
    pub fn is_busy(&self) -> bool {
        self.flags().contains(PageFlags::BUSY) || self.soft_busy() != 0
    }

    /// Clears BUSY and WANTED; returns whether someone was waiting.
    pub(crate) fn unbusy(&self) -> bool {
        let old = self.state.fetch_and(
            !(PageFlags::BUSY | PageFlags::WANTED).bits(),
            Ordering::AcqRel,
        );
        debug_assert!(
            old & PageFlags::BUSY.bits() != 0,
            "unbusy of a page not busy"
        );
        old & PageFlags::WANTED.bits() != 0
    }

    /// Unbusies the page and wakes whoever sleeps on it under `key`
    /// (`vm_page_wakeup`).
    pub(crate) fn wake(&self, waits: &WaitTable, key: u64) {
        if self.unbusy() {
            waits.notify(key);
        }
    }

    /// Sleeps (on `key`) while the page is busy and still page `pindex` of
    /// object `object` (`vm_page_sleep_if_busy`, seed L389-394): the
    /// waiter marks the page wanted under the wait bucket's lock, so the
    /// unbusy that follows sees the mark and wakes it.
    pub(crate) fn sleep_while_busy(&self, waits: &WaitTable, key: u64, object: u64, pindex: u64) {
        waits.wait_while(key, || {
            self.object_raw() == object && self.pindex() == pindex && self.want()
        });
    }

    /// Marks that a waiter sleeps on the page; false if it is no longer busy.
    pub(crate) fn want(&self) -> bool {
        let old = self.update(|s| {
            if s & PageFlags::BUSY.bits() != 0 {
                s | PageFlags::WANTED.bits()
            } else {
                s
            }
        });
        old & PageFlags::BUSY.bits() != 0 || self.soft_busy() != 0
    }

    pub(crate) fn set_valid(&self, v: u8) {
        self.update(|s| (s & !(0xff << VALID_SHIFT)) | (u32::from(v) << VALID_SHIFT));
    }

    /// Marks every block clean (after write-back).
    pub(crate) fn clear_dirty(&self) {
        self.state.fetch_and(
            !(u32::from(VM_PAGE_BITS_ALL) << DIRTY_SHIFT),
            Ordering::AcqRel,
        );
    }

    /// Marks every block dirty (FreeBSD `vm_page_dirty`).
    pub(crate) fn dirty_all(&self) {
        self.state
            .fetch_or(u32::from(VM_PAGE_BITS_ALL) << DIRTY_SHIFT, Ordering::AcqRel);
    }

    /// Sets the queue bits; returns the previous queue.
    pub(crate) fn set_queue(&self, q: PageQueue) -> PageQueue {
        queue_of(self.update(|s| (s & !QUEUE_MASK) | ((q as u32) << QUEUE_SHIFT)))
    }

    /// Moves an in-use page to queue `q`; a free page, or one whose free
    /// is pending, is left alone. Returns the queue it left, `None` if it
    /// was left alone — decided by the one atomic step that moved it, so
    /// the caller's count follows what happened.
    pub(crate) fn requeue(&self, q: PageQueue) -> Option<PageQueue> {
        let refused =
            |s: u32| queue_of(s) == PageQueue::Free || s & PageFlags::FREE_PENDING.bits() != 0;
        let old = self.update(|s| {
            if refused(s) {
                s
            } else {
                (s & !QUEUE_MASK) | ((q as u32) << QUEUE_SHIFT)
            }
        });
        (!refused(old)).then(|| queue_of(old))
    }

    // Wire and hold counts and the FREE_PENDING flag follow one protocol
    // (see `Pages::free`): each side changes its own word, then reads the
    // others, all sequentially consistent, so that of a free racing the
    // last release at least one sees the other's change.

    pub(crate) fn wire_inc(&self) -> u32 {
        self.wire_count.fetch_add(1, Ordering::SeqCst)
    }

    /// Drops one wiring; returns the count before, or `None` if it was zero.
    pub(crate) fn wire_dec(&self) -> Option<u32> {
        self.wire_count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| w.checked_sub(1))
            .ok()
    }

    pub(crate) fn hold_inc(&self) {
        self.hold_count.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn hold_dec(&self) -> u32 {
        self.hold_count.fetch_sub(1, Ordering::SeqCst)
    }

    /// Marks the page as freed by its owner (the free is carried out by
    /// whoever then sees it unwired and unheld).
    pub(crate) fn set_free_pending(&self) {
        self.state
            .fetch_or(PageFlags::FREE_PENDING.bits(), Ordering::SeqCst);
    }

    /// Whether neither a wiring nor a hold keeps the page, read after the
    /// caller's own change (see above). The counts are read with
    /// read-modify-writes, which see the latest value of each, so the
    /// protocol does not rest on sequentially consistent loads (which
    /// loom, which checks it, does not model).
    pub(crate) fn unreferenced(&self) -> bool {
        self.wire_count.fetch_add(0, Ordering::SeqCst) == 0
            && self.hold_count.fetch_add(0, Ordering::SeqCst) == 0
    }

    /// Takes the pending free if it is still pending: whoever clears the
    /// flag frees the page.
    pub(crate) fn claim_pending_free(&self) -> bool {
        self.state
            .fetch_and(!PageFlags::FREE_PENDING.bits(), Ordering::SeqCst)
            & PageFlags::FREE_PENDING.bits()
            != 0
    }

    /// The page-index word, which a page in no object (a page-table page)
    /// lends to its owner: see [`PhysFrames::table_word`](crate::pmap::PhysFrames::table_word).
    pub(crate) fn spare_word(&self) -> &AtomicU64 {
        &self.pindex
    }

    pub(crate) fn set_identity(&self, object: u64, pindex: u64) {
        self.object.store(object, Ordering::Release);
        self.pindex.store(pindex, Ordering::Release);
    }

    /// The free list's links of a free page: (next, previous) page ids.
    pub(crate) fn free_links(&self) -> (u32, u32) {
        let w = self.pindex.load(Ordering::Relaxed);
        (w as u32, (w >> 32) as u32)
    }

    pub(crate) fn set_free_links(&self, next: u32, prev: u32) {
        self.pindex
            .store(u64::from(next) | u64::from(prev) << 32, Ordering::Relaxed);
    }

    /// Resets state to "free" in one atomic step: flags cleared except
    /// `keep`, queue Free. Returns the queue the page was on, so the
    /// caller can settle its count (a racing requeue may have moved it).
    pub(crate) fn reset_free(&self, keep: PageFlags) -> PageQueue {
        let old = self.update(|s| (s & keep.bits()) | ((PageQueue::Free as u32) << QUEUE_SHIFT));
        self.object.store(NO_OBJECT, Ordering::Release);
        queue_of(old)
    }
}

fn queue_of(state: u32) -> PageQueue {
    match (state & QUEUE_MASK) >> QUEUE_SHIFT {
        1 => PageQueue::Free,
        2 => PageQueue::Active,
        3 => PageQueue::Inactive,
        _ => PageQueue::None,
    }
}

/// Mask of the 512-byte blocks that the byte range `start..end` of a page
/// covers completely.
#[must_use]
pub fn blocks_covered(start: usize, end: usize) -> u8 {
    let first = start.div_ceil(DEV_BSIZE);
    let last = end / DEV_BSIZE;
    (first..last.min(8)).fold(0u8, |m, b| m | (1 << b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(loom))]
    #[test]
    fn page_record_stays_small() {
        assert_eq!(core::mem::size_of::<VmPage>(), 32);
    }

    #[test]
    fn busy_is_exclusive_and_unbusy_reports_waiters() {
        let p = VmPage::default();
        assert!(p.try_busy());
        assert!(!p.try_busy());
        assert!(p.want(), "still busy: the waiter must sleep");
        assert!(p.flags().contains(PageFlags::WANTED));
        assert!(p.unbusy(), "a waiter was recorded");
        assert!(!p.flags().intersects(PageFlags::BUSY | PageFlags::WANTED));
        assert!(!p.want(), "not busy: nothing to wait for");
        assert!(p.try_busy());
        assert!(!p.unbusy());
    }

    #[test]
    fn soft_busy_blocks_exclusive_busy() {
        let p = VmPage::default();
        p.soft_busy.store(1, Ordering::Relaxed);
        assert!(!p.try_busy());
        assert!(p.is_busy());
    }

    #[test]
    fn valid_dirty_flags_and_queue_share_one_word_without_interfering() {
        let p = VmPage::default();
        p.set_valid(0x0f);
        p.dirty_all();
        p.set_flags(PageFlags::ZERO | PageFlags::NOSYNC);
        p.set_queue(PageQueue::Inactive);
        assert_eq!((p.valid(), p.dirty()), (0x0f, 0xff));
        assert_eq!(p.flags(), PageFlags::ZERO | PageFlags::NOSYNC);
        assert_eq!(p.queue(), PageQueue::Inactive);
        p.reset_free(PageFlags::ZERO);
        assert_eq!(
            (p.valid(), p.dirty(), p.flags(), p.queue()),
            (0, 0, PageFlags::ZERO, PageQueue::Free)
        );
    }

    #[test]
    fn wire_count_never_underflows() {
        let p = VmPage::default();
        assert_eq!(p.wire_dec(), None);
        p.wire_inc();
        assert_eq!(p.wire_dec(), Some(1));
        assert_eq!(p.wire_count(), 0);
    }

    #[test]
    fn blocks_covered_counts_whole_512_byte_blocks() {
        assert_eq!(blocks_covered(0, 4096), 0xff);
        assert_eq!(blocks_covered(0, 512), 0x01);
        assert_eq!(blocks_covered(0, 511), 0x00);
        assert_eq!(blocks_covered(1, 1024), 0x02);
        assert_eq!(
            blocks_covered(0, 1000),
            0x01,
            "EOF inside a block: only whole blocks"
        );
    }
}
