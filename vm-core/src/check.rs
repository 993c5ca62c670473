//! The consistency check: every page in exactly one state, counts adding
//! up, nothing left busy, held or paging. Tests call it after every
//! scenario; it is cheap enough for small machines and takes no lock for
//! long.

use crate::page::{PageQueue, VM_PAGE_BITS_ALL};
use crate::pmap::Pmap;
use crate::vm::Vm;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;

/// What the consistency check found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VM inconsistency: {0}")]
pub struct ConsistencyError(pub String);

/// Tallies of a consistent machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckReport {
    /// Free pages.
    pub free: u64,
    /// Pages on the active queue.
    pub active: u64,
    /// Pages on the inactive queue.
    pub inactive: u64,
    /// Wired pages (including page-table pages).
    pub wired: u64,
    /// Pages owned by objects.
    pub in_objects: u64,
    /// Live objects.
    pub objects: u64,
    /// Held pages (only [`Vm::check_consistency_with_holds`] allows any).
    pub held: u64,
    /// Pages freed while held, waiting for their last release.
    pub freed_held: u64,
}

impl core::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} pages free, {} active, {} inactive, {} wired; {} in {} objects; \
             {} held, {} freed while held",
            self.free,
            self.active,
            self.inactive,
            self.wired,
            self.in_objects,
            self.objects,
            self.held,
            self.freed_held
        )
    }
}

impl<P: Pmap> Vm<P> {
    /// Checks the machine at rest (no fault or map operation running, no
    /// page held).
    ///
    /// # Errors
    ///
    /// [`ConsistencyError`] naming the first broken invariant.
    pub fn check_consistency(&self) -> Result<CheckReport, ConsistencyError> {
        self.check(false)
    }

    /// As [`check_consistency`](Self::check_consistency), for a machine at
    /// rest whose users still hold pages ([`HeldPages`](crate::HeldPages)
    /// alive): held pages are allowed and counted.
    ///
    /// # Errors
    ///
    /// [`ConsistencyError`] naming the first broken invariant.
    pub fn check_consistency_with_holds(&self) -> Result<CheckReport, ConsistencyError> {
        self.check(true)
    }

    fn check(&self, holds: bool) -> Result<CheckReport, ConsistencyError> {
        // Pages a background read holds busy settle first.
        self.wait_for_background_io();
        let err = |s: String| Err(ConsistencyError(s));
        let pages = &self.machine.pages;
        let mut r = CheckReport::default();
        // Owner of each page according to the objects.
        let mut owned: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for obj in self.machine.objects.all() {
            r.objects += 1;
            if obj.paging_in_progress() != 0 {
                return err(format!(
                    "object {} has paging in progress {}",
                    obj.id(),
                    obj.paging_in_progress()
                ));
            }
            let st = obj.lock();
            for (&pindex, &id) in &st.pages {
                if owned.insert(id.0, (obj.id().0, pindex)).is_some() {
                    return err(format!("page {} is in two objects", id.0));
                }
                if pindex >= st.size && !st.flags.contains(crate::object::ObjectFlags::DEAD) {
                    return err(format!(
                        "object {} has page {pindex} beyond its size {}",
                        obj.id(),
                        st.size
                    ));
                }
            }
        }
        let wirings = self.entry_wirings()?;
        for i in 0..pages.len() {
            let id = crate::page::PageId(i);
            let p = pages.get(id);
            let pfn = pages.pfn(id);
            if p.is_busy() {
                return err(format!("page {i} left busy"));
            }
            if p.hold_count() != 0 {
                if !holds {
                    return err(format!("page {i} left held ({})", p.hold_count()));
                }
                r.held += 1;
            }
            self.check_wiring(i, &wirings, owned.contains_key(&i))?;
            if p.flags().contains(crate::page::PageFlags::FREE_PENDING) && p.wire_count() == 0 {
                // Freed while held: out of its object and of every queue,
                // freed by the last release.
                if p.hold_count() == 0 || owned.contains_key(&i) || p.queue() != PageQueue::None {
                    return err(format!("page {i} was freed but is still in use"));
                }
                if self.pmap.mapping_count(pfn) != 0 {
                    return err(format!("freed page {i} is still mapped"));
                }
                r.freed_held += 1;
                continue;
            }
            match (p.queue(), p.wire_count()) {
                (PageQueue::Free, 0) => {
                    r.free += 1;
                    if owned.contains_key(&i) || p.object_raw() != 0 {
                        return err(format!("free page {i} belongs to an object"));
                    }
                    if self.pmap.mapping_count(pfn) != 0 {
                        return err(format!("free page {i} is still mapped"));
                    }
                    continue;
                }
                (PageQueue::Active, 0) => r.active += 1,
                (PageQueue::Inactive, 0) => r.inactive += 1,
                (PageQueue::None, w) if w > 0 => r.wired += 1,
                (q, w) => return err(format!("page {i} is on queue {q:?} with wire count {w}")),
            }
            match owned.get(&i) {
                Some(&(obj, pindex)) => {
                    r.in_objects += 1;
                    if p.object_raw() != obj || p.pindex() != pindex {
                        return err(format!(
                            "page {i} says object #{} page {} but object #{obj} has it at {pindex}",
                            p.object_raw(),
                            p.pindex()
                        ));
                    }
                    if p.valid() != VM_PAGE_BITS_ALL && self.pmap.mapping_count(pfn) != 0 {
                        return err(format!("page {i} is mapped but not wholly valid"));
                    }
                }
                // A page-table or balloon frame, or a page freed while an
                // entry's wiring still held it (checked above).
                None if p.wire_count() > 0 => {}
                None => return err(format!("page {i} is in use but in no object")),
            }
        }
        let (a, ina, w) = self.queue_counts();
        if (r.free, r.active, r.inactive, r.wired) != (self.free_pages(), a, ina, w) {
            return err(format!(
                "queue counters free/active/inactive/wired {}/{a}/{ina}/{w} but pages say {}/{}/{}/{}",
                self.free_pages(),
                r.free,
                r.active,
                r.inactive,
                r.wired
            ));
        }
        if r.free + r.active + r.inactive + r.wired + r.freed_held != u64::from(pages.len()) {
            return err(String::from("page states do not add up to the total"));
        }
        Ok(r)
    }

    /// How many wired entries' records name each page; checks that no
    /// entry is in transition and that an entry has a record exactly while
    /// it is wired.
    fn entry_wirings(&self) -> Result<BTreeMap<u32, u32>, ConsistencyError> {
        let mut count = BTreeMap::new();
        for (map, _) in self.live_spaces() {
            let g = map.read();
            for e in g.entries.values() {
                if e.in_transition() {
                    return Err(ConsistencyError(format!(
                        "entry {:#x}..{:#x} left in transition",
                        e.start, e.end
                    )));
                }
                if (e.wired_count != 0) != e.wiring.is_some() {
                    return Err(ConsistencyError(format!(
                        "entry {:#x}..{:#x} has wired count {} but {} record",
                        e.start,
                        e.end,
                        e.wired_count,
                        if e.wiring.is_some() { "a" } else { "no" }
                    )));
                }
                for (_, id) in e.wiring.iter().flat_map(crate::map::WireRecord::held) {
                    *count.entry(id.0).or_insert(0) += 1;
                }
            }
        }
        Ok(count)
    }

    /// A page's wire count is what the entries' wirings account for; a
    /// wired page no entry accounts for is a frame the machine took for
    /// itself (a page table, the balloon): in no object, wired once, and
    /// mapped nowhere.
    fn check_wiring(
        &self,
        i: u32,
        wirings: &BTreeMap<u32, u32>,
        in_object: bool,
    ) -> Result<(), ConsistencyError> {
        let pages = &self.machine.pages;
        let id = crate::page::PageId(i);
        let wire = pages.get(id).wire_count();
        let recorded = wirings.get(&i).copied().unwrap_or(0);
        let fine = if recorded != 0 || in_object {
            wire == recorded
        } else {
            wire <= 1 && (wire == 0 || self.pmap.mapping_count(pages.pfn(id)) == 0)
        };
        if fine {
            Ok(())
        } else {
            Err(ConsistencyError(format!(
                "page {i} has wire count {wire} but wired entries account for {recorded}{}",
                if in_object { "" } else { " (in no object)" }
            )))
        }
    }
}
