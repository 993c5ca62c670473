//! Fault-around: after a fault, map resident neighbours read-only so the
//! next accesses need no fault. Two policies ([`FaultAround`]): the seed's
//! outward prefault (`vm_fault_prefault`, L934-1006) and Linux's aligned
//! window, entered as one run ([`Pmap::enter_quick_run`]).

use super::{FaultKind, FaultState};
use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::map::MapEntry;
use crate::object::{ObjectState, VmObject};
use crate::page::{PageFlags, PageId, VM_PAGE_BITS_ALL};
use crate::pmap::{PageInfo, Pmap};
use crate::prot::Prot;
use crate::sync::MutexGuard;
use crate::vm::FaultAround;
use alloc::sync::Arc;
use core::sync::atomic::Ordering;

/// What one object of a chain says about a page index.
enum Lookup {
    /// A page that can be mapped.
    Usable(PageInfo),
    /// A page that hides the objects below but cannot be mapped now
    /// (busy, partly valid, a device page).
    Unusable,
    /// No page: look below, if the object lets the walk through.
    Absent,
}

impl<P: Pmap> FaultState<'_, P> {
    /// Maps the fault's resident neighbours inside `entry` as the
    /// machine's [`FaultAround`] policy says.
    pub(super) fn prefault(&self, entry: &MapEntry) {
        let Some(object) = entry.object.as_ref() else {
            return;
        };
        // A present entry can be read on x86: a mapping that allows
        // neither read nor execute (reached by a forced access) gets no
        // neighbours.
        if !entry.protection.intersects(Prot::READ | Prot::EXECUTE) {
            return;
        }
        match self.target.vm.config.fault_around {
            FaultAround::Off => {}
            FaultAround::Outward(n) => self.prefault_outward(object, entry, n),
            // As Linux, only after a read or execute: the neighbours are
            // mapped read-only, so after a write (a zero-fill or a
            // copy-on-write run, typically) the next write to one faults
            // anyway and the look-ups would be wasted.
            FaultAround::Window(n) if !self.fault_type.contains(Prot::WRITE) => {
                self.fault_around_window(object, entry, n);
            }
            FaultAround::Window(_) => {}
        }
    }

    /// The seed's order: -1, +1, -2, +2, … up to `n` pages each side,
    /// where the pmap can map without replacing, stopping at the first
    /// page that is not resident (seed L990-993).
    fn prefault_outward(&self, object: &Arc<VmObject>, entry: &MapEntry, n: u32) {
        // No further than the entry reaches on its longer side: the cost is
        // bounded by the entry, whatever `n` says.
        let back = (self.va - entry.start) / PAGE_SIZE;
        let ahead = (entry.end - self.va) / PAGE_SIZE - 1;
        let n = u64::from(n).min(back.max(ahead));
        for i in 0..2 * n {
            let dist = (i / 2 + 1) * PAGE_SIZE;
            let addr = if i % 2 == 0 {
                self.va.checked_sub(dist)
            } else {
                self.va.checked_add(dist)
            };
            let Some(addr) = addr.filter(|a| (entry.start..entry.end).contains(a)) else {
                continue;
            };
            if !self
                .target
                .vm
                .pmap
                .is_prefaultable(self.target.pmap, VirtAddr(addr))
            {
                continue;
            }
            if !self.map_through_chain(object, entry, addr) {
                break;
            }
        }
    }

    /// Every resident page of the aligned `n`-page window around the
    /// fault, within the pages a pager read for it if it read any. Pages
    /// of the first object (the common case: one object, no chain) are
    /// entered as one run under its lock; holes are then looked up below,
    /// page by page, where the chain lets the walk through.
    fn fault_around_window(&self, object: &Arc<VmObject>, entry: &MapEntry, n: u32) {
        const MAX: usize = FaultAround::MAX_WINDOW as usize;
        let span = u64::from(n.clamp(1, FaultAround::MAX_WINDOW).next_power_of_two()) * PAGE_SIZE;
        let (mut lo, mut hi) = (entry.start, entry.end);
        if let Some(read) = &self.read_around {
            (lo, hi) = (lo.max(read.start), hi.min(read.end));
        }
        let start = (self.va & !(span - 1)).max(lo);
        let end = (self.va & !(span - 1)).saturating_add(span).min(hi);
        let mut run = [None; MAX];
        let mut holes = 0u64; // bit i: nothing in the first object at page i
        let st = object.lock();
        for (i, addr) in (start..end).step_by(PAGE_SIZE as usize).enumerate() {
            if addr == self.va {
                continue;
            }
            match self.lookup(&st, entry.pindex(addr)) {
                Lookup::Usable(info) => run[i] = Some(info),
                Lookup::Unusable => {}
                Lookup::Absent => holes |= 1 << i,
            }
        }
        // At most MAX pages: the window is aligned and no larger.
        let count = ((end - start) / PAGE_SIZE) as usize;
        let vm = &self.target.vm;
        let mapped = vm.pmap.enter_quick_run(
            self.target.pmap,
            VirtAddr(start),
            &run[..count],
            entry.protection,
        );
        self.count_prefaults(entry, mapped);
        if holes == 0 || !Self::passes_through(&st) {
            return;
        }
        drop(st);
        // Holes in a shadow: the page may be below (a fork's or a private
        // mapping's chain). Rare next to the run above; one at a time.
        while holes != 0 {
            let i = u64::from(holes.trailing_zeros());
            holes &= holes - 1;
            let addr = start + i * PAGE_SIZE;
            self.map_through_chain(object, entry, addr);
        }
    }

    /// Maps the page `addr` shows, looking down the chain from `object`;
    /// false if no page is resident (the seed then gives up on the rest).
    fn map_through_chain(&self, object: &Arc<VmObject>, entry: &MapEntry, addr: u64) -> bool {
        self.map_from(object.lock(), entry.pindex(addr), entry, addr)
    }

    /// [`map_through_chain`](Self::map_through_chain) from the object `st`
    /// locks, at `pindex` of it. Locks are taken hand over hand (a shadow's
    /// before its backing object's, the crate's order, as FreeBSD's
    /// prefault does): while the walk looks below, the page cannot appear
    /// above it, so a page found below is still the one the address shows.
    /// The lock of the page's object is held across the pmap call, so the
    /// page cannot be freed or moved while it is mapped.
    fn map_from(
        &self,
        st: MutexGuard<'_, ObjectState>,
        pindex: u64,
        entry: &MapEntry,
        addr: u64,
    ) -> bool {
        match self.lookup(&st, pindex) {
            Lookup::Usable(info) => {
                let pmap = &self.target.vm.pmap;
                let mapped =
                    pmap.enter_quick(self.target.pmap, VirtAddr(addr), info, entry.protection);
                self.count_prefaults(entry, usize::from(mapped));
                return true;
            }
            Lookup::Unusable => return true,
            Lookup::Absent => {}
        }
        let next = match st.backing.as_ref() {
            Some(b) if Self::passes_through(&st) => (b.object.clone(), pindex + b.offset),
            _ => return false,
        };
        let (below, below_pindex) = next;
        let lower = below.lock();
        drop(st);
        // One frame per object of the chain: `below` lives here while the
        // next level holds its lock.
        self.map_from(lower, below_pindex, entry, addr)
    }

    /// Whether a lookup that finds nothing in the object `st` locks may go
    /// on to its backing object: only anonymous chains are followed (seed
    /// L977-986), and an anonymous object with a pager may hold the page
    /// in its pager, so it has the last word.
    fn passes_through(st: &ObjectState) -> bool {
        st.kind.is_anonymous() && st.pager.is_none() && st.backing.is_some()
    }

    /// What the object `st` locks holds at `pindex`.
    fn lookup(&self, st: &ObjectState, pindex: u64) -> Lookup {
        let pages = &self.machine.pages;
        let Some(&id) = st.pages.get(&pindex) else {
            return Lookup::Absent;
        };
        let page = pages.get(id);
        // A read-ahead marker stays unmapped: its access must fault to
        // start the next window.
        let usable = page.valid() == VM_PAGE_BITS_ALL
            && !page.is_busy()
            && !page
                .flags()
                .intersects(PageFlags::FICTITIOUS | PageFlags::READAHEAD);
        if !usable {
            return Lookup::Unusable;
        }
        Lookup::Usable(self.page_info(id))
    }

    fn page_info(&self, id: PageId) -> PageInfo {
        let pages = &self.machine.pages;
        PageInfo {
            pfn: pages.pfn(id),
            managed: !pages.get(id).flags().contains(PageFlags::UNMANAGED),
            attr: pages.attr(id),
        }
    }

    /// Counts pages fault-around mapped; after a soft fault they are also
    /// read-around hits of the entry (pages mapped right after a read are
    /// not: nobody has asked for them yet).
    fn count_prefaults(&self, entry: &MapEntry, mapped: usize) {
        if mapped > 0 {
            self.machine
                .counters
                .local()
                .v_prefaults
                .fetch_add(mapped as u64, Ordering::Relaxed);
            if self.kind == FaultKind::Resident {
                entry.note_read_hits(u32::try_from(mapped).unwrap_or(u32::MAX));
            }
        }
    }
}
