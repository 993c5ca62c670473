//! Wiring: keeping a range resident and mapped (`mlock`, kernel wiring;
//! seed `vm_fault_wire` / `vm_fault_unwire`, L1026-1086, driven as modern
//! FreeBSD's `vm_map_wire` / `vm_map_unwire` drive them).
//!
//! # The protocol
//!
//! An entry's `wired_count` counts its wirings: kernel wirings nest, a user
//! wiring (`mlock`) counts once however often it is asked for (FreeBSD's
//! `MAP_ENTRY_USER_WIRED` beside `wired_count`; locks do not stack, as
//! mlock(2) says). The pages are faulted in only when the count leaves
//! zero, and unwired only when it returns there.
//!
//! While [`VmSpace::wire`] faults an entry in, the entry is *in transition*
//! (`MAP_ENTRY_IN_TRANSITION`): under the map's write lock every entry of
//! the range is marked and the timestamp moves; the lock is dropped for
//! the faults; then it is taken again, the marks cleared, and whoever
//! waits is woken. Faults of other threads, unmap, protect, advice,
//! another wiring and fork all wait for an entry in transition, so the
//! wiring's faults always meet the entry they marked and fork never sees
//! a half-wired entry.
//!
//! # Accounting: the wire record
//!
//! A wired entry holds one wiring on each page it shows, and remembers
//! which page in a wire record (one slot per page of the entry). Every
//! fault on a wired entry — the wiring's own, or a refault after another
//! space's copy-on-write removed the mapping, or after a truncation took
//! the page — records the page it maps and moves the entry's wiring to it
//! from the page recorded before. Unwiring releases exactly what the
//! record holds. So the wire count of a page is always the number of wired
//! entries whose record names it (plus page-table and balloon frames), and
//! nothing another space does can strand or steal a wiring (FreeBSD
//! reaches the same pages through the object chain, `vm_object_unwire`).
//! A page freed while an entry's wiring holds it stays out of reuse until
//! that wiring is released.

use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::error::MapError;
use crate::fault::FaultCtx;
use crate::map::{EntryFlags, MapEntry, MapState, WireRecord};
use crate::pmap::Pmap;
use crate::prot::Prot;
use crate::space::VmSpace;
use crate::sync::ShardedWriteGuard;
use alloc::vec::Vec;

impl<P: Pmap> VmSpace<P> {
    /// Wires `start..start+len` (`mlock` with `user`, kernel wiring
    /// without): every page is faulted in, entered wired in the pmap, and
    /// kept resident until unwired. A user wiring of an entry already
    /// user-wired changes nothing; kernel wirings nest. A writable private
    /// (copy-on-write) range gets its own copy of every page now, so that
    /// writes to wired memory never fault; a read-only private range is
    /// wired where its pages are (a later `protect` that grants write
    /// copies them, see [`protect`](Self::protect)).
    ///
    /// ```
    /// use vm_core::Prot;
    /// let (vm, space) = vm_testkit::machine(16);
    /// space.map_anon(0x10_0000, 0x2000, Prot::RW)?;
    /// space.wire(0x10_0000, 0x2000, true)?; // mlock
    /// assert_eq!(vm.queue_counts().2, 2, "two wired pages");
    /// vm.pageout(vm.total_pages()); // even under pressure they stay
    /// assert_eq!(space.entries()[0].wired_count, 1);
    /// space.unwire(0x10_0000, 0x2000, true)?; // munlock
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`MapError::NotMapped`] if the range has holes;
    /// [`MapError::NoAccess`] if part of the range allows neither read
    /// nor execute (as FreeBSD's `mlock`, which skips such entries and
    /// fails); [`MapError::Fault`] with the first page that could not be
    /// faulted. Nothing this call wired stays wired after an error.
    pub fn wire(&self, start: impl Into<VirtAddr>, len: u64, user: bool) -> Result<(), MapError> {
        let start = start.into().as_u64();
        let end = self.check_range(start, len)?;
        let (marked, to_fault) = {
            let mut g = self.write_settled(start, end);
            let keys = g
                .clip_range(start, end)
                .ok_or(MapError::NotMapped { start, end })?;
            self.mark_wiring(&mut g, &keys, user)?
        };
        let result = self.fault_wired(&to_fault);
        let mut g = self.map.write();
        for &(k, changed) in &marked {
            let Some(e) = g.entries.get_mut(&k) else {
                continue;
            };
            e.eflags.remove(EntryFlags::IN_TRANSITION);
            if result.is_err() && changed {
                self.drop_wiring(e, user);
            }
        }
        drop(g);
        self.end_transition();
        result
    }

    /// Marks the clipped entries `keys` in transition and counts this
    /// wiring in each (a user wiring only where the user has none yet).
    /// Returns each entry with whether its count changed, and the ranges
    /// to fault in: the entries whose count left zero.
    #[allow(clippy::type_complexity)]
    fn mark_wiring(
        &self,
        g: &mut ShardedWriteGuard<'_, MapState>,
        keys: &[u64],
        user: bool,
    ) -> Result<(Vec<(u64, bool)>, Vec<(u64, u64, Prot)>), MapError> {
        let skip = |e: &MapEntry| user && e.eflags.contains(EntryFlags::USER_WIRED);
        // Check first: a refusal changes nothing.
        for k in keys {
            let e = &g.entries[k];
            if e.wired_count == 0
                && !skip(e)
                && !e.protection.intersects(Prot::READ | Prot::EXECUTE)
            {
                return Err(MapError::NoAccess {
                    start: e.start,
                    end: e.end,
                });
            }
        }
        let mut marked = Vec::with_capacity(keys.len());
        let mut to_fault = Vec::new();
        for &k in keys {
            let e = g.entries.get_mut(&k).expect("clipped entry");
            e.eflags.insert(EntryFlags::IN_TRANSITION);
            let changed = !skip(e);
            marked.push((k, changed));
            if !changed {
                continue;
            }
            if user {
                e.eflags.insert(EntryFlags::USER_WIRED);
            }
            e.wired_count += 1;
            if e.wired_count == 1 {
                e.wiring = Some(WireRecord::new(e.pages()));
                to_fault.push((e.start, e.end, e.protection & (Prot::READ | Prot::EXECUTE)));
            }
        }
        Ok((marked, to_fault))
    }

    /// Faults every page of the ranges in, as the owner of their
    /// transition (seed `vm_fault_wire`).
    fn fault_wired(&self, ranges: &[(u64, u64, Prot)]) -> Result<(), MapError> {
        for &(start, end, access) in ranges {
            for va in (start..end).step_by(PAGE_SIZE as usize) {
                self.fault_with(va, access, FaultCtx::wiring())
                    .map_err(MapError::Fault)?;
            }
        }
        Ok(())
    }

    /// Unwires `start..start+len` (`munlock` with `user`, kernel unwiring
    /// without). A user unwiring takes away the user wiring, whatever
    /// number of `wire` calls made it; a kernel unwiring takes one kernel
    /// wiring. Pages are unwired when the last wiring goes.
    ///
    /// # Errors
    ///
    /// [`MapError::NotMapped`] for holes, [`MapError::NotWired`] if part of
    /// the range is not wired in the asked way; nothing changes then.
    pub fn unwire(&self, start: impl Into<VirtAddr>, len: u64, user: bool) -> Result<(), MapError> {
        let start = start.into().as_u64();
        let end = self.check_range(start, len)?;
        let mut g = self.write_settled(start, end);
        let keys = g
            .clip_range(start, end)
            .ok_or(MapError::NotMapped { start, end })?;
        let not_wired = keys.iter().any(|k| {
            let e = &g.entries[k];
            let user_wired = e.eflags.contains(EntryFlags::USER_WIRED);
            if user {
                !user_wired
            } else {
                // The user's wiring is not the kernel's to take.
                e.wired_count <= u32::from(user_wired)
            }
        });
        if not_wired {
            return Err(MapError::NotWired { start, end });
        }
        for k in keys {
            let e = g.entries.get_mut(&k).expect("clipped entry");
            self.drop_wiring(e, user);
        }
        Ok(())
    }

    /// Takes one wiring (the user's with `user`) from entry `e`, releasing
    /// its pages if it was the last.
    fn drop_wiring(&self, e: &mut MapEntry, user: bool) {
        e.wired_count = e.wired_count.saturating_sub(1);
        if user {
            e.eflags.remove(EntryFlags::USER_WIRED);
        }
        if e.wired_count == 0 {
            self.release_wiring(e, true);
        }
    }

    /// Releases the pages entry `e`'s wiring holds: each is unwired and,
    /// with `unmap_wired`, its mapping here loses the wired attribute.
    pub(crate) fn release_wiring(&self, e: &mut MapEntry, unmap_wired: bool) {
        let Some(record) = e.wiring.take() else {
            return;
        };
        let pages = &self.vm.machine.pages;
        for (index, id) in record.held() {
            if unmap_wired {
                self.vm.pmap.change_wiring(
                    &self.pmap,
                    VirtAddr(e.start + index * PAGE_SIZE),
                    false,
                );
            }
            pages.unwire(id, true);
        }
    }

    /// Write-locks the map once no entry overlapping `start..end` is in
    /// transition (every change of the map waits so for a wiring).
    pub(crate) fn write_settled(&self, start: u64, end: u64) -> ShardedWriteGuard<'_, MapState> {
        loop {
            let g = self.map.write();
            if !g.in_transition(start, end) {
                return g;
            }
            let stamp = self.map.timestamp();
            drop(g);
            self.wait_transition(stamp);
        }
    }

    /// Sleeps until the map changes after `stamp` (a wiring that ends
    /// takes the write lock, which moves the timestamp, then wakes us).
    pub(crate) fn wait_transition(&self, stamp: u64) {
        self.map.wait_changed(self.vm.machine.pages.waits(), stamp);
    }

    fn end_transition(&self) {
        self.vm.machine.pages.waits().notify(self.map.wait_key());
    }
}
