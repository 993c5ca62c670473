//! `VmMap`: the sorted entries of one address space, with the lock and
//! timestamp protocol the fault handler relies on (FreeBSD `vm_map.c`).
//!
//! The map is read-locked by faults and write-locked by every change; each
//! write lock bumps the timestamp, so a fault that dropped the lock for I/O
//! can tell whether to look its entry up again (seed L789-842).

mod wire_record;

pub(crate) use wire_record::WireRecord;

use crate::addr::{PAGE_SHIFT, pages};
use crate::error::FaultError;
use crate::object::Machine;
use crate::object::{Backing, ObjectFlags, VmObject};
use crate::prot::Prot;
use crate::sync::{ShardedReadGuard, ShardedRwLock, ShardedWriteGuard, WaitTable};
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

bitflags::bitflags! {
    /// Map entry flags (FreeBSD `MAP_ENTRY_*`, same values).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct EntryFlags: u32 {
        /// Writes need not be synced to the backing file (`MAP_NOSYNC`).
        const NOSYNC = 0x1;
        /// Copy-on-write mapping.
        const COW = 0x4;
        /// A shadow object must be made before the next write.
        const NEEDS_COPY = 0x8;
        /// Faults are not allowed on this entry.
        const NOFAULT = 0x10;
        /// Wired by the user (`mlock`).
        const USER_WIRED = 0x20;
        /// Being changed by a wiring operation.
        const IN_TRANSITION = 0x100;
        /// A stack that grows down into the gap below it.
        const GROWS_DOWN = 0x1000;
        /// (Not FreeBSD's.) Memory shared with another space by a fork
        /// that inherited the entry shared: never private again, whatever
        /// the inheritance becomes.
        const SHARED = 0x1_0000;
        /// (Not FreeBSD's; Linux's `VM_HUGEPAGE`.) Advised to be mapped
        /// by whole superpages ([`SuperpageAdvice::Huge`]).
        const HUGEPAGE = 0x2_0000;
        /// (Not FreeBSD's; Linux's `VM_NOHUGEPAGE`.) Advised never to be
        /// mapped by superpages ([`SuperpageAdvice::NoHuge`]).
        const NOHUGEPAGE = 0x4_0000;
    }
}

/// Superpage advice for a range (Linux `MADV_HUGEPAGE` /
/// `MADV_NOHUGEPAGE`), see [`SuperpagePolicy`](crate::SuperpagePolicy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SuperpageAdvice {
    /// The machine's policy decides.
    #[default]
    Default,
    /// Give each aligned 2 MiB its whole superpage at the first write
    /// fault, unless the machine's policy is
    /// [`Never`](crate::SuperpagePolicy::Never).
    Huge,
    /// No reservations and no superpages here.
    NoHuge,
}

/// Expected access pattern (`madvise`; FreeBSD `MAP_ENTRY_BEHAV_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Behavior {
    /// Cluster around the fault.
    #[default]
    Normal,
    /// Read ahead only, drop pages behind.
    Sequential,
    /// No clustering.
    Random,
}

/// What a fork does with an entry (`minherit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Inheritance {
    /// The child gets a copy-on-write copy.
    #[default]
    Copy,
    /// The child shares the memory.
    Share,
    /// The child gets nothing.
    None,
}

impl Inheritance {
    /// What a device mapping inherits when `asked`: sharing, or nothing.
    pub(crate) fn min_with(self, asked: Inheritance) -> Inheritance {
        if asked == Inheritance::None {
            Inheritance::None
        } else {
            self
        }
    }
}

/// One map entry (FreeBSD `struct vm_map_entry`).
#[derive(Debug)]
pub(crate) struct MapEntry {
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// Byte offset into the object.
    pub(crate) offset: u64,
    pub(crate) object: Option<Arc<VmObject>>,
    pub(crate) protection: Prot,
    pub(crate) max_protection: Prot,
    pub(crate) eflags: EntryFlags,
    pub(crate) behavior: Behavior,
    pub(crate) inheritance: Inheritance,
    pub(crate) wired_count: u32,
    /// The pages the entry's wiring holds, while `wired_count` is not 0
    /// (see [`WireRecord`]).
    pub(crate) wiring: Option<WireRecord>,
    /// Last read-ahead page index; written by faults under the read lock,
    /// hence atomic (the seed notes the same at L555-558).
    pub(crate) lastr: AtomicU64,
    /// The read-ahead window, in pages after the faulting one: grown by
    /// sequential faults, halved by others (FreeBSD's `read_ahead`).
    pub(crate) read_ahead: AtomicU32,
    /// Faults that read around a page that was not sequential, less the
    /// resident pages found since (Linux's `mmap_miss`): past a limit the
    /// access is taken as random and a miss reads only its page.
    pub(crate) read_misses: AtomicU32,
    /// Room the stack may still grow below `start`, in bytes.
    pub(crate) avail_ssize: u64,
}

impl MapEntry {
    pub(crate) fn new(start: u64, end: u64, prot: Prot, max: Prot) -> MapEntry {
        MapEntry {
            start,
            end,
            offset: 0,
            object: None,
            protection: prot,
            max_protection: max,
            eflags: EntryFlags::empty(),
            behavior: Behavior::Normal,
            inheritance: Inheritance::Copy,
            wired_count: 0,
            wiring: None,
            lastr: AtomicU64::new(0),
            read_ahead: AtomicU32::new(0),
            read_misses: AtomicU32::new(0),
            avail_ssize: 0,
        }
    }

    /// A copy sharing the object (and taking a reference on it), without
    /// the wiring record (which belongs to one entry).
    pub(crate) fn duplicate(&self) -> MapEntry {
        if let Some(o) = &self.object {
            o.add_ref();
        }
        MapEntry {
            start: self.start,
            end: self.end,
            offset: self.offset,
            object: self.object.clone(),
            protection: self.protection,
            max_protection: self.max_protection,
            eflags: self.eflags,
            behavior: self.behavior,
            inheritance: self.inheritance,
            wired_count: self.wired_count,
            wiring: None,
            lastr: AtomicU64::new(self.lastr.load(Ordering::Relaxed)),
            read_ahead: AtomicU32::new(self.read_ahead.load(Ordering::Relaxed)),
            read_misses: AtomicU32::new(self.read_misses.load(Ordering::Relaxed)),
            avail_ssize: self.avail_ssize,
        }
    }

    /// Counts `n` resident pages found or mapped by faults: evidence of
    /// locality that takes back read-around misses. A plain load first, so
    /// an entry with no misses is never written by a soft fault.
    pub(crate) fn note_read_hits(&self, n: u32) {
        let misses = self.read_misses.load(Ordering::Relaxed);
        if misses > 0 {
            self.read_misses
                .store(misses.saturating_sub(n), Ordering::Relaxed);
        }
    }

    pub(crate) fn pages(&self) -> u64 {
        pages(self.end - self.start)
    }

    /// The object page index `va` maps to.
    pub(crate) fn pindex(&self, va: u64) -> u64 {
        (va - self.start + self.offset) >> PAGE_SHIFT
    }

    /// The raw id of the entry's own object, whose pages no other mapping
    /// shares copy-on-write: `None` while the entry still awaits its copy
    /// (no object yet, or one shared since a fork) or maps a named object.
    pub(crate) fn own_object(&self) -> Option<u64> {
        if self.eflags.contains(EntryFlags::NEEDS_COPY) {
            return None;
        }
        self.object
            .as_ref()
            .filter(|o| !o.flags().contains(ObjectFlags::NAMED))
            .map(|o| o.id().0)
    }

    /// Whether the entry maps private memory: not shared with another
    /// space by an earlier fork, and either a copy-on-write mapping or
    /// anonymous memory (no named object) not inherited shared (anonymous
    /// memory inherited shared is `MAP_SHARED | MAP_ANON`).
    pub(crate) fn private_memory(&self) -> bool {
        !self.eflags.contains(EntryFlags::SHARED)
            && (self.eflags.contains(EntryFlags::COW)
                || self.inheritance != Inheritance::Share
                    && self
                        .object
                        .as_ref()
                        .is_none_or(|o| !o.flags().contains(ObjectFlags::NAMED)))
    }

    /// Whether a wiring operation owns the entry (`MAP_ENTRY_IN_TRANSITION`).
    pub(crate) fn in_transition(&self) -> bool {
        self.eflags.contains(EntryFlags::IN_TRANSITION)
    }

    /// Puts a shadow object in front of the entry's object
    /// (`vm_object_shadow`); the entry's reference moves to the shadow.
    pub(crate) fn shadow(&mut self, machine: &Arc<Machine>) {
        let size = self.pages();
        let backing = self.object.take().map(|o| {
            let mut st = o.lock();
            st.shadow_count += 1;
            // A backing object is only read through its shadows from now
            // on; it is no longer the single mapping's own.
            st.flags.remove(ObjectFlags::ONEMAPPING);
            drop(st);
            Backing {
                object: o,
                offset: self.offset >> PAGE_SHIFT,
            }
        });
        let shadow = VmObject::create(machine, size, None, backing);
        shadow.add_ref();
        machine
            .counters
            .local()
            .v_shadows
            .fetch_add(1, Ordering::Relaxed);
        self.object = Some(shadow);
        self.offset = 0;
        self.eflags.remove(EntryFlags::NEEDS_COPY);
    }

    /// Gives an entry without an object its own anonymous object.
    pub(crate) fn allocate_object(&mut self, machine: &Arc<Machine>) {
        let obj = VmObject::create(machine, self.pages(), None, None);
        obj.add_ref();
        self.object = Some(obj);
        self.offset = 0;
    }

    /// Protection to give the pmap when changing protection: a
    /// copy-on-write entry is never made writable ahead of a fault (FreeBSD
    /// `vm_map_protect`'s `MASK`).
    pub(crate) fn pmap_prot(&self) -> Prot {
        if self.eflags.contains(EntryFlags::COW) {
            self.protection - Prot::WRITE
        } else {
            self.protection
        }
    }
}

/// A read-only snapshot of an entry, for callers and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntryInfo {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Byte offset into the object.
    pub offset: u64,
    /// The object's id, if the entry has one yet.
    pub object: Option<crate::object::ObjectId>,
    /// Current protection.
    pub protection: Prot,
    /// Maximum protection.
    pub max_protection: Prot,
    /// Flags.
    pub eflags: EntryFlags,
    /// Access pattern.
    pub behavior: Behavior,
    /// Fork behaviour.
    pub inheritance: Inheritance,
    /// Wirings.
    pub wired_count: u32,
    /// Last read-ahead index.
    pub lastr: u64,
    /// The read-ahead window sequential faults have grown, in pages.
    pub read_ahead: u32,
}

impl From<&MapEntry> for MapEntryInfo {
    fn from(e: &MapEntry) -> Self {
        MapEntryInfo {
            start: e.start,
            end: e.end,
            offset: e.offset,
            object: e.object.as_ref().map(|o| o.id()),
            protection: e.protection,
            max_protection: e.max_protection,
            eflags: e.eflags,
            behavior: e.behavior,
            inheritance: e.inheritance,
            wired_count: e.wired_count,
            lastr: e.lastr.load(Ordering::Relaxed),
            read_ahead: e.read_ahead.load(Ordering::Relaxed),
        }
    }
}

/// Entries keyed by start address.
#[derive(Debug, Default)]
pub(crate) struct MapState {
    pub(crate) entries: BTreeMap<u64, MapEntry>,
}

/// What a successful lookup yields (`vm_map_lookup`'s out-parameters).
#[derive(Clone)]
pub(crate) struct LookupInfo {
    pub(crate) entry_start: u64,
    pub(crate) object: Arc<VmObject>,
    pub(crate) pindex: u64,
    pub(crate) prot: Prot,
    pub(crate) wired: bool,
}

/// How a fault asks the map for its entry.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LookupMode {
    /// Check against the maximum protection (`VM_PROT_OVERRIDE_WRITE`).
    pub(crate) override_write: bool,
    /// Give the entry its own copy even for a read (`VM_PROT_COPY`): a
    /// pending shadow is made now.
    pub(crate) copy: bool,
    /// The caller is the wiring operation that put the entry in
    /// transition, so it does not wait for itself.
    pub(crate) owner: bool,
}

/// Why a lookup did not succeed.
pub(crate) enum LookupError {
    /// A real failure to report.
    Fault(FaultError),
    /// The entry needs a shadow or an object first: retry with the map
    /// write-locked.
    NeedsWrite,
    /// A wiring operation owns the entry: wait until the map's timestamp
    /// moves past `stamp`, then retry (FreeBSD sleeps on
    /// `MAP_ENTRY_NEEDS_WAKEUP`).
    InTransition,
}

impl MapState {
    /// The entry containing `va`.
    pub(crate) fn find(&self, va: u64) -> Option<&MapEntry> {
        self.entries
            .range(..=va)
            .next_back()
            .map(|(_, e)| e)
            .filter(|e| va < e.end)
    }

    pub(crate) fn find_mut(&mut self, va: u64) -> Option<&mut MapEntry> {
        self.entries
            .range_mut(..=va)
            .next_back()
            .map(|(_, e)| e)
            .filter(|e| va < e.end)
    }

    /// Whether an entry overlapping `start..end` is in transition.
    pub(crate) fn in_transition(&self, start: u64, end: u64) -> bool {
        let first = self.find(start).map(|e| e.start).unwrap_or(start);
        self.entries
            .range(first..end)
            .any(|(_, e)| e.in_transition())
    }

    /// The checks of `vm_map_lookup` on a locked map, without changing it.
    pub(crate) fn lookup(
        &self,
        va: u64,
        access: Prot,
        mode: LookupMode,
    ) -> Result<LookupInfo, LookupError> {
        let Some(e) = self.find(va) else {
            return Err(LookupError::Fault(FaultError::InvalidAddress { addr: va }));
        };
        if e.in_transition() && !mode.owner {
            return Err(LookupError::InTransition);
        }
        let mut prot = if mode.override_write {
            e.max_protection
        } else {
            e.protection
        };
        if !prot.contains(access) {
            return Err(LookupError::Fault(FaultError::ProtectionFailure {
                addr: va,
                access,
                allowed: e.protection,
            }));
        }
        // A wired entry is faulted for everything it allows (seed
        // L307-308). A user-wired copy-on-write entry was copied when it
        // was wired, so writing it needs no new copy (modern FreeBSD drops
        // the seed's refusal of such writes).
        let wired = e.wired_count != 0;
        let fault_type = if wired { prot } else { access };
        if e.eflags.contains(EntryFlags::NEEDS_COPY) {
            if fault_type.contains(Prot::WRITE) || mode.copy {
                return Err(LookupError::NeedsWrite);
            }
            prot.remove(Prot::WRITE);
        }
        let Some(object) = &e.object else {
            return Err(LookupError::NeedsWrite);
        };
        Ok(LookupInfo {
            entry_start: e.start,
            object: object.clone(),
            pindex: e.pindex(va),
            prot,
            wired,
        })
    }

    /// Makes the change a lookup asked for: the shadow of a NEEDS_COPY
    /// entry about to be written (or copied), or the object of an entry
    /// without one.
    fn prepare_entry(&mut self, machine: &Arc<Machine>, va: u64, access: Prot, copy: bool) {
        let Some(e) = self.find_mut(va) else { return };
        let fault_type = if e.wired_count != 0 {
            e.protection
        } else {
            access
        };
        if e.eflags.contains(EntryFlags::NEEDS_COPY) && (fault_type.contains(Prot::WRITE) || copy) {
            e.shadow(machine);
        } else if e.object.is_none() {
            e.allocate_object(machine);
        }
    }

    /// Splits the entry containing `at` so that an entry starts at `at`
    /// (`vm_map_clip_start`). No-op if `at` is a boundary or unmapped.
    pub(crate) fn clip(&mut self, at: u64) {
        let Some(e) = self.find_mut(at) else { return };
        if e.start == at {
            return;
        }
        let mut upper = e.duplicate();
        let lower_pages = (at - e.start) >> PAGE_SHIFT;
        upper.wiring = e.wiring.as_mut().map(|w| w.split_off(lower_pages));
        e.end = at;
        e.eflags.remove(EntryFlags::GROWS_DOWN);
        upper.offset += at - upper.start;
        upper.start = at;
        upper.avail_ssize = 0;
        self.entries.insert(at, upper);
    }

    /// Clips at both ends of `start..end` and returns the start addresses
    /// of the entries inside, or `None` if the range has a hole.
    pub(crate) fn clip_range(&mut self, start: u64, end: u64) -> Option<Vec<u64>> {
        if !self.covers(start, end) {
            return None;
        }
        self.clip(start);
        self.clip(end);
        Some(self.entries.range(start..end).map(|(&s, _)| s).collect())
    }

    /// Whether `start..end` is mapped without a hole.
    pub(crate) fn covers(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        while at < end {
            match self.find(at) {
                Some(e) => at = e.end,
                None => return false,
            }
        }
        true
    }

    /// Whether any entry intersects `start..end`.
    pub(crate) fn overlaps(&self, start: u64, end: u64) -> bool {
        self.find(start).is_some() || self.entries.range(start..end).next().is_some()
    }
}

/// An address space's map: entries, the lock, the timestamp, and the range
/// of addresses it may hold.
#[derive(Debug)]
pub struct VmMap {
    pub(crate) state: ShardedRwLock<MapState>,
    timestamp: AtomicU64,
    min: u64,
    max: u64,
}

impl VmMap {
    pub(crate) fn new(min: u64, max: u64) -> VmMap {
        VmMap {
            state: ShardedRwLock::new(MapState::default()),
            timestamp: AtomicU64::new(0),
            min,
            max,
        }
    }

    /// Lowest mappable address.
    #[must_use]
    pub fn min_addr(&self) -> u64 {
        self.min
    }

    /// One past the highest mappable address.
    #[must_use]
    pub fn max_addr(&self) -> u64 {
        self.max
    }

    /// The change counter: bumped by every write lock.
    #[must_use]
    pub fn timestamp(&self) -> u64 {
        self.timestamp.load(Ordering::Acquire)
    }

    pub(crate) fn read(&self) -> ShardedReadGuard<'_, MapState> {
        self.state.read()
    }

    pub(crate) fn try_read(&self) -> Option<ShardedReadGuard<'_, MapState>> {
        self.state.try_read()
    }

    /// Write-locks the map; the timestamp is bumped now, before any change
    /// is visible (FreeBSD bumps it on every exclusive lock).
    pub(crate) fn write(&self) -> ShardedWriteGuard<'_, MapState> {
        let g = self.state.write();
        self.timestamp.fetch_add(1, Ordering::AcqRel);
        g
    }

    /// `vm_map_lookup`: finds and checks the entry for a fault, making the
    /// shadow or object it needs under the write lock first. Returns the
    /// read-locked map with the result and the timestamp it was read at;
    /// an entry in transition comes back as [`LookupError::InTransition`]
    /// with that timestamp, for the caller to wait on.
    pub(crate) fn lookup(
        &self,
        machine: &Arc<Machine>,
        va: u64,
        access: Prot,
        mode: LookupMode,
    ) -> Result<(ShardedReadGuard<'_, MapState>, LookupInfo, u64), (LookupError, u64)> {
        loop {
            let g = self.read();
            let stamp = self.timestamp();
            match g.lookup(va, access, mode) {
                Ok(info) => return Ok((g, info, stamp)),
                Err(LookupError::NeedsWrite) => {
                    drop(g);
                    self.write().prepare_entry(machine, va, access, mode.copy);
                }
                Err(e) => return Err((e, stamp)),
            }
        }
    }

    /// Grows the stack entry above `va` down to cover it
    /// (`vm_map_growstack`); false if `va` is not within a stack's growth
    /// room (then it is simply unmapped, as FreeBSD treats it). It grows by
    /// at least `step` bytes (FreeBSD `sgrowsiz`) where there is room.
    pub(crate) fn grow_stack(&self, va: u64, step: u64) -> bool {
        let va = crate::addr::page_trunc(va);
        let mut g = self.write();
        let Some((&start, e)) = g.entries.range(va..).next() else {
            return false;
        };
        if !e.eflags.contains(EntryFlags::GROWS_DOWN) || start - va > e.avail_ssize {
            return false;
        }
        // The entry above `va` is the stack, so the one below ends at or
        // below `va`: growing down to `va` always fits. Grow by at least
        // the configured step, within the room left and the gap.
        let floor = g
            .entries
            .range(..start)
            .next_back()
            .map_or(self.min_addr(), |(_, p)| p.end);
        let grow = (start - va).max(step).min(e.avail_ssize).min(start - floor);
        let new_start = start - grow;
        let mut below = MapEntry::new(new_start, start, e.protection, e.max_protection);
        below.eflags = EntryFlags::GROWS_DOWN | (e.eflags & EntryFlags::NOSYNC);
        below.avail_ssize = e.avail_ssize - grow;
        below.inheritance = e.inheritance;
        let e = g.entries.get_mut(&start).expect("entry found above");
        e.eflags.remove(EntryFlags::GROWS_DOWN);
        e.avail_ssize = 0;
        g.entries.insert(new_start, below);
        true
    }

    /// Sleeps in `waits` until the map changes after `stamp` (an entry in
    /// transition: the wiring that ends takes the write lock, which moves
    /// the timestamp, then wakes the map's key).
    pub(crate) fn wait_changed(&self, waits: &WaitTable, stamp: u64) {
        waits.wait_while(self.wait_key(), || self.timestamp() == stamp);
    }

    /// The key this map's waiters sleep on in the machine's wait table.
    pub(crate) fn wait_key(&self) -> u64 {
        core::ptr::from_ref(self) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(entries: &[(u64, u64)]) -> MapState {
        let mut s = MapState::default();
        for &(a, b) in entries {
            s.entries
                .insert(a, MapEntry::new(a, b, Prot::RW, Prot::ALL));
        }
        s
    }

    #[test]
    fn find_and_cover_respect_holes() {
        let s = state(&[(0x1000, 0x3000), (0x4000, 0x5000)]);
        assert_eq!(s.find(0x2fff).map(|e| e.start), Some(0x1000));
        assert!(s.find(0x3000).is_none());
        assert!(s.covers(0x1000, 0x3000));
        assert!(!s.covers(0x1000, 0x5000));
        assert!(s.overlaps(0x2000, 0x4001));
        assert!(!s.overlaps(0x3000, 0x4000));
    }

    #[test]
    fn clip_splits_with_offsets() {
        let mut s = state(&[(0x1000, 0x5000)]);
        s.entries.get_mut(&0x1000).unwrap().offset = 0x10000;
        let keys = s.clip_range(0x2000, 0x3000).unwrap();
        assert_eq!(keys, vec![0x2000]);
        let got: Vec<(u64, u64, u64)> = s
            .entries
            .values()
            .map(|e| (e.start, e.end, e.offset))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x1000, 0x2000, 0x10000),
                (0x2000, 0x3000, 0x11000),
                (0x3000, 0x5000, 0x12000)
            ]
        );
        assert!(s.clip_range(0x4000, 0x6000).is_none(), "a hole");
    }

    #[test]
    fn lookup_checks_protection_and_asks_for_changes() {
        let mut s = state(&[(0x1000, 0x2000)]);
        assert!(
            matches!(
                s.lookup(0x1000, Prot::READ, LookupMode::default()),
                Err(LookupError::NeedsWrite)
            ),
            "no object yet"
        );
        let e = s.entries.get_mut(&0x1000).unwrap();
        e.protection = Prot::READ;
        assert!(matches!(
            s.lookup(0x1000, Prot::WRITE, LookupMode::default()),
            Err(LookupError::Fault(FaultError::ProtectionFailure { .. }))
        ));
        assert!(matches!(
            s.lookup(0x9000, Prot::READ, LookupMode::default()),
            Err(LookupError::Fault(FaultError::InvalidAddress {
                addr: 0x9000
            }))
        ));
    }
}
