//! Fork (FreeBSD `vmspace_fork` / `vm_map_copy_entry`): each entry of the
//! parent is shared with the child, copied copy-on-write, copied outright
//! (a wired entry, seed `vm_fault_copy_entry`) or left out, by its
//! [`Inheritance`].
//!
//! Held (pinned) pages follow Linux's rule since CVE-2020-29374
//! (`page_needs_cow_for_dma`): a page of the parent's own memory that is
//! held at fork time is copied for the child at once, and the parent keeps
//! the held page itself, so whoever holds it (a device doing DMA, an I/O in
//! flight) goes on seeing what the parent writes and never what the child
//! writes. Every other page is shared copy-on-write from wherever it is
//! (resident, on swap, in a file).
//!
//! Fork waits for entries in transition (a wiring in progress) and reclaims
//! memory for its copies and page tables as a fault does.

use crate::addr::{PAGE_SIZE, va_range};
use crate::error::MapError;
use crate::map::{EntryFlags, Inheritance, MapEntry};
use crate::object::{ObjectFlags, VmObject};
use crate::page::PageId;
use crate::pmap::{Pmap, PmapError};
use crate::prot::Prot;
use crate::space::VmSpace;
use alloc::sync::Arc;
use alloc::vec::Vec;

impl<P: Pmap> VmSpace<P> {
    /// Forks the space (`vmspace_fork`): each entry is copied copy-on-write,
    /// shared, or left out, by its [`Inheritance`]. A wired copy entry is
    /// copied page by page now (`vm_fault_copy_entry`); held pages of a
    /// copied entry are copied for the child now (see the
    /// [module docs](crate::space::fork)).
    ///
    /// ```
    /// use vm_core::Prot;
    /// let (_vm, parent) = vm_testkit::machine(16);
    /// parent.map_anon(0x10_0000, 0x1000, Prot::RW)?;
    /// parent.write(0x10_0000, b"before")?;
    /// let child = parent.fork()?;
    /// child.write(0x10_0000, b"child!")?; // copy on write
    /// let mut b = [0; 6];
    /// parent.read(0x10_0000, &mut b)?;
    /// assert_eq!(&b, b"before");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`MapError::Pmap`] if the child's page tables cannot be made;
    /// [`MapError::ResourceShortage`] if a copy cannot be had — in both
    /// cases only after reclaiming memory as a fault would.
    pub fn fork(&self) -> Result<VmSpace<P>, MapError> {
        let vm = &self.vm;
        let child = vm
            .retry_for_memory(|| vm.new_space(), |e| *e == PmapError::NoMemory)
            .map_err(MapError::Pmap)?;
        let (min, max) = (self.map.min_addr(), self.map.max_addr());
        super::copy_entry::refault_missing_wired(self, min, max, |e| {
            e.inheritance == Inheritance::Copy
        });
        let mut pg = self.write_settled(min, max);
        let mut cg = child.map.write();
        let machine = &vm.machine;
        // Which held pages are the parent's own is decided before any entry
        // is changed: entries clipped from one share their object, and
        // making the first copy-on-write must not hide the second's.
        let mut held: alloc::collections::BTreeMap<u64, Vec<u64>> = pg
            .entries
            .iter()
            .filter(|(_, e)| e.inheritance == Inheritance::Copy && e.wired_count == 0)
            .map(|(&k, e)| (k, held_pages(e)))
            .filter(|(_, h)| !h.is_empty())
            .collect();
        for e in pg.entries.values_mut() {
            if let Some(o) = &e.object {
                // Chains grow by one shadow per fork; merge what the
                // exited children left private (FreeBSD collapses on
                // deallocation; here fork is where it pays off).
                vm.collapse(o);
            }
            let copy = match e.inheritance {
                Inheritance::None => continue,
                Inheritance::Share => {
                    if e.eflags.contains(EntryFlags::NEEDS_COPY) {
                        e.shadow(machine);
                    } else if e.object.is_none() {
                        e.allocate_object(machine);
                    }
                    if let Some(o) = &e.object {
                        o.lock().flags.remove(ObjectFlags::ONEMAPPING);
                    }
                    e.eflags.insert(EntryFlags::SHARED);
                    child_entry(e)
                }
                Inheritance::Copy if e.wired_count != 0 => {
                    crate::space::copy_entry::copy_entry(self, &child, e)?
                }
                Inheritance::Copy => {
                    let held = held.remove(&e.start).unwrap_or_default();
                    self.copy_on_write(e);
                    let mut c = child_entry(e);
                    if !held.is_empty() {
                        self.split_held(e, &mut c, &held)?;
                    }
                    c
                }
            };
            cg.entries.insert(copy.start, copy);
        }
        drop(cg);
        Ok(child)
    }

    /// Makes `e` copy-on-write for a fork: its pages are write-protected
    /// and both it and the child's entry will shadow its object on their
    /// next write (`vm_map_copy_entry`).
    fn copy_on_write(&self, e: &mut MapEntry) {
        let Some(o) = &e.object else { return };
        if !e.eflags.contains(EntryFlags::NEEDS_COPY) {
            self.vm.pmap.protect(
                &self.pmap,
                va_range(e.start, e.end),
                e.protection - Prot::WRITE,
                &mut |d| self.vm.note_displaced(d),
            );
        }
        o.lock().flags.remove(ObjectFlags::ONEMAPPING);
        e.eflags |= EntryFlags::COW | EntryFlags::NEEDS_COPY;
    }

    /// The Linux rule for held pages at fork: both entries get their
    /// shadow now; each held page moves up into the parent's shadow (the
    /// same frame: its holder and the parent's mapping keep it) and the
    /// child's shadow gets a copy of it. `held` are the held pages' indexes
    /// in the entries' (shared) object.
    fn split_held(&self, e: &mut MapEntry, c: &mut MapEntry, held: &[u64]) -> Result<(), MapError> {
        let machine = &self.vm.machine;
        let Some(shared) = e.object.clone() else {
            return Ok(());
        };
        let first = e.offset / PAGE_SIZE;
        e.shadow(machine);
        c.shadow(machine);
        let (Some(mine), Some(theirs)) = (e.object.clone(), c.object.clone()) else {
            return Ok(());
        };
        for &pindex in held {
            let Some(id) = busy_page(machine, &shared, pindex) else {
                continue;
            };
            let at = pindex - first;
            let copied = crate::space::copy_entry::copy_page(self, id, &theirs, at);
            // The parent keeps its held page even if the child's copy could
            // not be made (the fork then fails and the child goes).
            move_up(machine, &shared, &mine, id, pindex, at);
            machine.pages.wake(id);
            machine.pages.activate(copied?);
        }
        Ok(())
    }
}

/// The indexes (in `e`'s object) of the held pages of `e`'s range, when
/// they are the parent's own: its object is private anonymous memory
/// (mapped by this space's entries only, each at its own indexes, not
/// named, not awaiting a copy). Held pages of shared or named objects are
/// not the parent's to give away.
fn held_pages(e: &MapEntry) -> Vec<u64> {
    let Some(object) = &e.object else {
        return Vec::new();
    };
    // No handle test here (unlike collapse's): the held page must move
    // with the parent whoever else holds the object, or the holder and the
    // parent part (CVE-2020-29374); a handle to the object taken before
    // the fork then no longer shows that page.
    let st = object.lock();
    let own = st.kind.is_anonymous()
        && st.flags.contains(ObjectFlags::ONEMAPPING)
        && !st.flags.contains(ObjectFlags::NAMED)
        && !e.eflags.contains(EntryFlags::NEEDS_COPY);
    if !own {
        return Vec::new();
    }
    let first = e.offset / PAGE_SIZE;
    let range = first..first + e.pages();
    let pages = &object.machine.pages;
    let mut held: Vec<u64> = st
        .pages
        .iter()
        .filter(|&(p, &id)| range.contains(p) && pages.get(id).hold_count() != 0)
        .map(|(&p, _)| p)
        .collect();
    held.sort_unstable();
    held
}

/// Busies the page at `pindex` of `object`, waiting out whoever has it
/// busy; `None` if it is gone meanwhile.
fn busy_page(
    machine: &crate::object::Machine,
    object: &Arc<VmObject>,
    pindex: u64,
) -> Option<PageId> {
    loop {
        // Busied under the object's lock, which page removal holds.
        let (id, busied) = {
            let st = object.lock();
            let id = *st.pages.get(&pindex)?;
            (id, machine.pages.get(id).try_busy())
        };
        if busied {
            return Some(id);
        }
        machine.pages.wait_for_page(id, object.id().0, pindex);
    }
}

/// Moves busy page `id` from `pindex` of `backing` to `at` of its shadow
/// `shadow` (the copy-on-write rename, FreeBSD `vm_page_rename`).
fn move_up(
    machine: &crate::object::Machine,
    backing: &Arc<VmObject>,
    shadow: &Arc<VmObject>,
    id: PageId,
    pindex: u64,
    at: u64,
) {
    // Lock order: shadow before backing.
    let mut sst = shadow.lock();
    let mut bst = backing.lock();
    if bst.pages.get(&pindex) == Some(&id) {
        bst.pages.remove(&pindex);
        if let Some(p) = &bst.pager {
            // The copy on backing store belongs to the old identity.
            p.page_unswapped(pindex);
        }
    }
    drop(bst);
    let page = machine.pages.get(id);
    shadow.insert_page(&mut sst, id, page, at);
    // The page exists nowhere else now.
    page.dirty_all();
}

/// The child's copy of a parent entry: same object (referenced), no
/// wiring.
fn child_entry(e: &MapEntry) -> MapEntry {
    let mut c = e.duplicate();
    c.wired_count = 0;
    c.eflags
        .remove(EntryFlags::USER_WIRED | EntryFlags::IN_TRANSITION);
    c
}
