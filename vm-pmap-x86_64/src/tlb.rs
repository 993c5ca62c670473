//! TLB invalidation: when a flush is owed, to whom, and how many.
//!
//! A CPU may cache any entry it has used (its A bit is set). So a change
//! that removes or lowers such an entry owes an invalidation; making a
//! not-present entry present owes none (FreeBSD's rule in `pmap_enter`,
//! `pmap_remove_pte`, `pmap_protect`). The pmap gathers what an operation
//! owes in a [`PendingFlush`] and hands it to the embedder's [`TlbHook`]
//! before the operation returns.

use core::sync::atomic::{AtomicU64, Ordering};
use smallvec::SmallVec;

/// The embedder's translation-cache invalidation (`invlpg`, a shootdown
/// IPI, `KVM_REQ_TLB_FLUSH`…). Called before the pmap operation that owes
/// it returns.
///
/// # Calling context
///
/// The pmap may call the hook while it holds the space's table-tree lock
/// (shared or exclusive) and, from `enter`, the spin lock of one leaf
/// table (as Linux flushes under its page-table lock). So the hook must
/// not call back into the pmap for the same space, and a shootdown that
/// waits for other CPUs to acknowledge must be acknowledged by CPUs that
/// are themselves spinning on a lock of this pmap (a kernel keeps
/// interrupts enabled while it spins, or answers the request from its
/// spin loop); a hook that waits for a thread which in turn waits for
/// this pmap deadlocks.
pub trait TlbHook: Send + Sync {
    /// Invalidates the translation of `va` in the space whose root is
    /// `root`.
    fn invalidate_page(&self, root: u64, va: u64);
    /// Invalidates every translation of the space whose root is `root`.
    fn invalidate_all(&self, root: u64);
}

/// The hook for machines without a hardware TLB (the software MMU reads
/// the tables on every access): nothing to do, but the pmap still counts
/// what it owed.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoTlb;

impl TlbHook for NoTlb {
    fn invalidate_page(&self, _root: u64, _va: u64) {}
    fn invalidate_all(&self, _root: u64) {}
}

/// Counts of invalidations the pmap issued.
#[derive(Debug, Default)]
pub struct TlbStats {
    /// Single-page invalidations.
    pub pages: AtomicU64,
    /// Whole-space invalidations.
    pub full: AtomicU64,
}

impl TlbStats {
    /// `(pages, full)` so far.
    #[must_use]
    pub fn get(&self) -> (u64, u64) {
        (
            self.pages.load(Ordering::Relaxed),
            self.full.load(Ordering::Relaxed),
        )
    }
}

/// Past this many pages one operation flushes the whole space instead.
const MAX_PAGES: usize = 32;

/// Invalidations owed by one operation, and the page-table frames it
/// emptied: those are freed only after the invalidation, so no CPU can walk
/// a table that has become something else (FreeBSD's `free` list in
/// `pmap_remove`). Must be finished (the pmap does it before the operation
/// returns).
#[must_use = "a pending flush must be finished, or stale translations survive"]
pub struct PendingFlush {
    root: u64,
    pages: SmallVec<[u64; 8]>,
    all: bool,
    tables: SmallVec<[u64; 2]>,
}

impl PendingFlush {
    pub(crate) fn new(root: u64) -> PendingFlush {
        PendingFlush {
            root,
            pages: SmallVec::new(),
            all: false,
            tables: SmallVec::new(),
        }
    }

    /// Notes a page-table frame (physical address) unlinked from the
    /// tree, to free once the invalidation is done.
    pub(crate) fn retire_table(&mut self, table: u64) {
        self.tables.push(table);
    }

    /// Notes that the entry for `va`, whose old value was `old`, changed in
    /// a way a TLB could have cached.
    pub(crate) fn note(&mut self, va: u64, old: u64) {
        if old & crate::entry::PteFlags::ACCESSED.bits() == 0 || self.all {
            return;
        }
        if self.pages.len() == MAX_PAGES {
            self.all = true;
            self.pages.clear();
        } else {
            self.pages.push(va);
        }
    }

    /// Whether anything is owed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        !self.all && self.pages.is_empty()
    }

    /// Issues the invalidations through `hook`, counting them in `stats`,
    /// and hands back the retired table frames, now safe to free once no
    /// software walk is still in them.
    pub(crate) fn finish<H: TlbHook + ?Sized>(
        self,
        hook: &H,
        stats: &TlbStats,
    ) -> SmallVec<[u64; 2]> {
        if self.pages.is_empty() && !self.all {
            // Nothing owed (a fault filling an empty entry): no shared
            // statistics line to touch.
            return self.tables;
        }
        if self.all {
            hook.invalidate_all(self.root);
            stats.full.fetch_add(1, Ordering::Relaxed);
        } else {
            for &va in &self.pages {
                hook.invalidate_page(self.root, va);
            }
            stats
                .pages
                .fetch_add(self.pages.len() as u64, Ordering::Relaxed);
        }
        self.tables
    }
}
