//! `VmSpace`: one address space — a [`VmMap`] and its pmap — and the
//! operations that build it: map, unmap, protect, advise, fork (FreeBSD
//! `vm_map.c` / `vm_mmap.c` / `vmspace_fork`).

pub mod access;
mod copy_entry;
mod fault;
pub mod fork;
pub mod hold;
mod msync;
pub mod wire;

use crate::addr::{PAGE_SIZE, Pfn, VirtAddr, is_page_aligned, pages, va_range};
use crate::error::MapError;
use crate::map::{Behavior, EntryFlags, Inheritance, MapEntry, MapEntryInfo, MapState, VmMap};
use crate::object::{ObjectFlags, VmObject};
use crate::pmap::{Displaced, Pmap};
use crate::prot::Prot;
use crate::vm::Vm;
use alloc::sync::Arc;
use alloc::vec::Vec;

/// What to map: built with [`MapRequest::anon`] or [`MapRequest::object`]
/// and refined with the builder methods.
#[derive(Clone, Debug)]
pub struct MapRequest {
    start: u64,
    len: u64,
    prot: Prot,
    max_prot: Prot,
    object: Option<(Arc<VmObject>, u64)>,
    private: bool,
    flags: EntryFlags,
    /// `None`: what the mapping's kind implies (see
    /// [`inheritance`](Self::inheritance)).
    inheritance: Option<Inheritance>,
    behavior: Behavior,
}

impl MapRequest {
    /// Anonymous zero-fill memory at `start..start+len` (`MAP_ANON`).
    #[must_use]
    pub fn anon(start: u64, len: u64, prot: Prot) -> MapRequest {
        MapRequest {
            start,
            len,
            prot,
            max_prot: Prot::ALL,
            object: None,
            private: false,
            flags: EntryFlags::empty(),
            inheritance: None,
            behavior: Behavior::Normal,
        }
    }

    /// `len` bytes of `object` from byte `offset`, shared (`MAP_SHARED`)
    /// unless [`private`](Self::private) is called.
    #[must_use]
    pub fn object(
        start: u64,
        len: u64,
        object: Arc<VmObject>,
        offset: u64,
        prot: Prot,
    ) -> MapRequest {
        MapRequest {
            object: Some((object, offset)),
            ..MapRequest::anon(start, len, prot)
        }
    }

    /// Copy-on-write (`MAP_PRIVATE`): writes go to a private shadow.
    #[must_use]
    pub fn private(mut self) -> Self {
        self.private = true;
        self
    }

    /// Maximum protection (default: all).
    #[must_use]
    pub fn max_prot(mut self, max: Prot) -> Self {
        self.max_prot = max;
        self
    }

    /// Extra entry flags: only [`EntryFlags::NOSYNC`] and
    /// [`EntryFlags::NOFAULT`] are accepted.
    #[must_use]
    pub fn flags(mut self, flags: EntryFlags) -> Self {
        self.flags = flags & (EntryFlags::NOSYNC | EntryFlags::NOFAULT);
        self
    }

    /// Fork behaviour. The default follows `mmap`: a shared mapping of an
    /// object is shared with a forked child ([`Inheritance::Share`], as
    /// FreeBSD's `MAP_SHARED` sets `MAP_INHERIT_SHARE`), anonymous and
    /// private memory is copied ([`Inheritance::Copy`]). Asking a shared
    /// mapping to be copied makes it copy-on-write in the parent too after
    /// the fork (FreeBSD's `vm_map_copy_entry`).
    #[must_use]
    pub fn inheritance(mut self, i: Inheritance) -> Self {
        self.inheritance = Some(i);
        self
    }

    /// The fork behaviour the request resolves to.
    fn resolved_inheritance(&self) -> Inheritance {
        self.inheritance
            .unwrap_or(if self.object.is_some() && !self.private {
                Inheritance::Share
            } else {
                Inheritance::Copy
            })
    }

    /// Access pattern (default: normal).
    #[must_use]
    pub fn behavior(mut self, b: Behavior) -> Self {
        self.behavior = b;
        self
    }
}

/// One address space. Shareable between threads (`Arc<VmSpace<P>>`):
/// faults and accesses from many threads run in parallel.
pub struct VmSpace<P: Pmap> {
    pub(crate) vm: Arc<Vm<P>>,
    /// The map, shared with the machine's registry of maps (for the
    /// consistency check's accounting of wirings).
    pub(crate) map: Arc<VmMap>,
    /// Shared (weakly) with the machine's registry of spaces.
    pub(crate) pmap: Arc<P::Space>,
    /// Per-thread shards: threads faulting in one space do not bounce
    /// a line between them.
    pub(crate) minflt: crate::sync::ShardedCount,
    pub(crate) majflt: crate::sync::ShardedCount,
}

impl<P: Pmap> core::fmt::Debug for VmSpace<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VmSpace")
            .field("entries", &self.entries())
            .finish_non_exhaustive()
    }
}

impl<P: Pmap> Vm<P> {
    /// A new, empty address space. When memory for its root table is
    /// short it reclaims and waits as a fault does (FreeBSD's
    /// `pmap_pinit` sleeps for its page).
    ///
    /// # Errors
    ///
    /// The pmap's error if it cannot make the root table:
    /// [`PmapError::NoMemory`](crate::PmapError::NoMemory) only once a
    /// fault would give up too.
    pub fn new_space(self: &Arc<Self>) -> Result<VmSpace<P>, crate::pmap::PmapError> {
        let made = self.retry_for_memory(
            || self.pmap.create_space(),
            |e| *e == crate::pmap::PmapError::NoMemory,
        );
        let pmap = Arc::new(made?);
        let map = Arc::new(VmMap::new(self.config.user_min, self.config.user_max));
        self.register_space(&map, &pmap);
        Ok(VmSpace {
            vm: self.clone(),
            map,
            pmap,
            minflt: crate::sync::ShardedCount::default(),
            majflt: crate::sync::ShardedCount::default(),
        })
    }

    /// Carries the referenced/modified bits of a removed mapping into its
    /// page (what FreeBSD's pmap does in `pmap_remove_pte`).
    pub(crate) fn note_displaced(&self, d: Displaced) {
        if let Some(id) = self.machine.pages.id_of(d.pfn) {
            let page = self.machine.pages.get(id);
            if d.referenced {
                page.set_flags(crate::page::PageFlags::REFERENCED);
            }
            if d.modified {
                page.dirty_all();
            }
        }
    }
}

impl<P: Pmap> VmSpace<P> {
    /// The machine.
    pub fn vm(&self) -> &Arc<Vm<P>> {
        &self.vm
    }

    /// The space's address map (FreeBSD's `vm_map`): its entries and
    /// their lock. [`map`](Self::map) is `mmap`, which adds to it.
    pub fn address_map(&self) -> &VmMap {
        &self.map
    }

    /// The pmap's per-space state.
    pub fn pmap_space(&self) -> &P::Space {
        &self.pmap
    }

    /// Minor and major faults taken in this space (`ru_minflt`,
    /// `ru_majflt`).
    #[must_use]
    pub fn rusage(&self) -> (u64, u64) {
        (self.minflt.get(), self.majflt.get())
    }

    /// The frame mapped at `va` in the pmap, if any.
    #[must_use]
    pub fn extract(&self, va: impl Into<VirtAddr>) -> Option<Pfn> {
        let va = va.into().as_u64();
        self.vm.pmap.extract(&self.pmap, VirtAddr(va).page_trunc())
    }

    /// A snapshot of the entries, in address order.
    #[must_use]
    pub fn entries(&self) -> Vec<MapEntryInfo> {
        self.map
            .read()
            .entries
            .values()
            .map(MapEntryInfo::from)
            .collect()
    }

    /// The object mapped at `va` and its page index there.
    ///
    /// While the handle lives the object keeps the pages it shows: collapse
    /// does not empty it into a shadow, and unmapping (or dropping) the
    /// space does not free them; mapping it with
    /// [`MapRequest::object`](crate::MapRequest::object) makes it shared
    /// memory for good ([`ObjectFlags::NAMED`]).
    #[must_use]
    pub fn object_at(&self, va: impl Into<VirtAddr>) -> Option<(Arc<VmObject>, u64)> {
        let va = va.into().as_u64();
        let g = self.map.read();
        let e = g.find(va)?;
        Some((e.object.clone()?.hand_out(), e.pindex(va)))
    }

    /// Checks `start..start+len` and returns its end.
    pub(crate) fn check_range(&self, start: u64, len: u64) -> Result<u64, MapError> {
        if !is_page_aligned(start) {
            return Err(MapError::Misaligned {
                what: "address",
                value: start,
            });
        }
        if !is_page_aligned(len) {
            return Err(MapError::Misaligned {
                what: "length",
                value: len,
            });
        }
        match start.checked_add(len) {
            Some(end) if len > 0 && start >= self.map.min_addr() && end <= self.map.max_addr() => {
                Ok(end)
            }
            _ => Err(MapError::BadRange { start, len }),
        }
    }

    /// Maps what `req` describes (`mmap`; FreeBSD's `vm_map_find`/
    /// `vm_map_insert`): a new entry of the [address map](Self::address_map).
    ///
    /// ```
    /// use vm_core::{MapRequest, Prot};
    /// let (vm, space) = vm_testkit::machine(16);
    /// // Two anonymous pages, and a private (copy-on-write) view of an object.
    /// space.map(MapRequest::anon(0x10_0000, 0x2000, Prot::RW))?;
    /// let obj = vm.new_anon_object(1);
    /// space.map(MapRequest::object(0x20_0000, 0x1000, obj, 0, Prot::RW).private())?;
    /// space.write(0x20_0000, b"mine")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`MapError`] for a misaligned, empty, overflowing or occupied range,
    /// a protection above the maximum, an object range outside the object,
    /// or an object of another machine. Nothing is mapped then.
    pub fn map(&self, req: MapRequest) -> Result<(), MapError> {
        let end = self.check_range(req.start, req.len)?;
        if !req.max_prot.contains(req.prot) {
            return Err(MapError::ProtectionExceedsMax {
                prot: req.prot,
                max: req.max_prot,
            });
        }
        if let Some((obj, offset)) = &req.object {
            if !obj.same_machine(&self.vm.machine) {
                return Err(MapError::ForeignObject { object: obj.id() });
            }
            let size = obj.size();
            let bad = MapError::ObjectRange {
                object: obj.id(),
                offset: *offset,
                len: req.len,
                size,
            };
            if !is_page_aligned(*offset) {
                return Err(MapError::Misaligned {
                    what: "offset",
                    value: *offset,
                });
            }
            // A file may be mapped past its end (POSIX `mmap`): it can
            // grow, and until then an access there is SIGBUS. Other
            // objects must hold the whole range.
            // Byte offsets of the whole range must be representable too.
            let grows = obj.kind().grows();
            let fits = offset.checked_add(req.len).is_some();
            match (offset / PAGE_SIZE).checked_add(pages(req.len)) {
                Some(last) if fits && (last <= size || grows) => {}
                _ => return Err(bad),
            }
        }
        let mut g = self.map.write();
        if g.overlaps(req.start, end) {
            return Err(MapError::Overlap {
                start: req.start,
                end,
            });
        }
        let mut e = MapEntry::new(req.start, end, req.prot, req.max_prot);
        e.eflags = req.flags;
        e.inheritance = req.resolved_inheritance();
        e.behavior = req.behavior;
        if let Some((obj, offset)) = req.object {
            if obj.kind().class() == crate::pager::ObjectClass::Device {
                // Device memory is shared or nothing: it has no pages to
                // copy, so neither a private mapping nor a copying fork.
                if req.private {
                    return Err(MapError::PrivateDevice { object: obj.id() });
                }
                e.inheritance = Inheritance::Share.min_with(e.inheritance);
            }
            obj.add_ref();
            // An object the caller hands in (from `new_anon_object`, a
            // pager, or another space's `object_at`) is one someone outside
            // the map can find: it keeps its pages, and its mappings are
            // shared memory.
            obj.mark_named();
            e.object = Some(obj);
            e.offset = offset;
            if req.private {
                e.eflags |= EntryFlags::COW | EntryFlags::NEEDS_COPY;
            }
        }
        g.entries.insert(req.start, e);
        Ok(())
    }

    /// Maps anonymous read/write (or `prot`) memory at `start`.
    ///
    /// # Errors
    ///
    /// As [`map`](Self::map).
    pub fn map_anon(
        &self,
        start: impl Into<VirtAddr>,
        len: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        let start = start.into().as_u64();
        self.map(MapRequest::anon(start, len, prot))
    }

    /// Maps a stack: `initial` bytes below `top`, growing down on faults
    /// below it up to `max` bytes in all.
    ///
    /// # Errors
    ///
    /// As [`map`](Self::map); [`MapError::BadRange`] if `initial > max` or
    /// the growth room would leave the space.
    pub fn map_stack(&self, top: u64, initial: u64, max: u64) -> Result<(), MapError> {
        let start = top.wrapping_sub(initial);
        if initial > max || top < max || top - max < self.map.min_addr() {
            return Err(MapError::BadRange { start, len: max });
        }
        self.map(MapRequest::anon(start, initial, Prot::RW))?;
        let mut g = self.map.write();
        if let Some(e) = g.entries.get_mut(&start) {
            e.eflags |= EntryFlags::GROWS_DOWN;
            e.avail_ssize = max - initial;
        }
        Ok(())
    }

    /// Removes every mapping in `start..start+len` (`munmap`). Holes in the
    /// range are allowed.
    ///
    /// # Errors
    ///
    /// [`MapError`] for a misaligned, empty or out-of-space range.
    pub fn unmap(&self, start: impl Into<VirtAddr>, len: u64) -> Result<(), MapError> {
        let start = start.into().as_u64();
        let end = self.check_range(start, len)?;
        let removed = {
            let mut g = self.write_settled(start, end);
            g.clip(start);
            g.clip(end);
            let keys: Vec<u64> = g.entries.range(start..end).map(|(&s, _)| s).collect();
            let mut removed: Vec<MapEntry> =
                keys.iter().filter_map(|k| g.entries.remove(k)).collect();
            self.vm
                .pmap
                .remove(&self.pmap, va_range(start, end), &mut |d| {
                    self.vm.note_displaced(d)
                });
            for e in &mut removed {
                self.release_wiring(e, false);
            }
            removed
        };
        // Objects are released outside the map lock: freeing their pages
        // must not hold up faults on the rest of the map.
        self.release_entries(removed);
        Ok(())
    }

    /// Changes the protection of `start..start+len` (`mprotect`).
    ///
    /// # Errors
    ///
    /// [`MapError::NotMapped`] if part of the range is unmapped,
    /// [`MapError::ProtectionExceedsMax`] if `prot` exceeds an entry's
    /// maximum; nothing changes then. A user-wired copy-on-write entry
    /// that gains write gets its own wired copies of its pages; if that
    /// fails ([`MapError::ResourceShortage`]) that entry keeps its old
    /// protection and entries before it keep the new one.
    pub fn protect(
        &self,
        start: impl Into<VirtAddr>,
        len: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        let start = start.into().as_u64();
        let end = self.check_range(start, len)?;
        if prot.contains(Prot::WRITE) {
            // A wired copy-on-write entry gaining write copies its pages.
            copy_entry::refault_missing_wired(self, start, end, |e| {
                e.eflags.contains(EntryFlags::USER_WIRED | EntryFlags::COW)
            });
        }
        let mut g = self.write_settled(start, end);
        if !g.covers(start, end) {
            return Err(MapError::NotMapped { start, end });
        }
        let mut at = start;
        while at < end {
            let e = g.find(at).expect("covered");
            if !e.max_protection.contains(prot) {
                return Err(MapError::ProtectionExceedsMax {
                    prot,
                    max: e.max_protection,
                });
            }
            at = e.end;
        }
        for s in g.clip_range(start, end).expect("covered") {
            let e = g.entries.get_mut(&s).expect("clipped entry");
            let old = core::mem::replace(&mut e.protection, prot);
            let user_wired_cow = EntryFlags::USER_WIRED | EntryFlags::COW;
            if e.eflags.contains(user_wired_cow) && (prot - old).contains(Prot::WRITE) {
                if let Err(err) = copy_entry::upgrade_wired_entry(self, e) {
                    // The copies made so far stay (each is the entry's own
                    // copy of what it showed) but not with the write
                    // permission they were entered with.
                    e.protection = old;
                    let pprot = e.pmap_prot();
                    self.vm
                        .pmap
                        .protect(&self.pmap, va_range(e.start, e.end), pprot, &mut |d| {
                            self.vm.note_displaced(d)
                        });
                    return Err(err);
                }
            }
            // Only a restriction reaches the pmap (as modern FreeBSD): a
            // grant is taken up by the next fault, and re-protecting a
            // copy-on-write entry would take write from pages it owns.
            if !(old - prot).is_empty() {
                let pprot = e.pmap_prot();
                self.vm
                    .pmap
                    .protect(&self.pmap, va_range(e.start, e.end), pprot, &mut |d| {
                        self.vm.note_displaced(d)
                    });
            }
        }
        Ok(())
    }

    fn update_entries(
        &self,
        start: u64,
        len: u64,
        f: impl Fn(&mut MapEntry),
    ) -> Result<(), MapError> {
        let end = self.check_range(start, len)?;
        let mut g = self.write_settled(start, end);
        let keys = g
            .clip_range(start, end)
            .ok_or(MapError::NotMapped { start, end })?;
        for s in keys {
            f(g.entries.get_mut(&s).expect("clipped entry"));
        }
        Ok(())
    }

    /// Sets the access pattern of a range (`madvise`).
    ///
    /// # Errors
    ///
    /// [`MapError`] for a bad range or one with holes.
    pub fn set_behavior(
        &self,
        start: impl Into<VirtAddr>,
        len: u64,
        b: Behavior,
    ) -> Result<(), MapError> {
        let start = start.into().as_u64();
        self.update_entries(start, len, |e| e.behavior = b)
    }

    /// Advises superpages for a range (Linux `madvise` with
    /// `MADV_HUGEPAGE` / `MADV_NOHUGEPAGE`; see
    /// [`SuperpagePolicy`](crate::SuperpagePolicy)). Pages already there
    /// stay as they are.
    ///
    /// # Errors
    ///
    /// [`MapError`] for a bad range or one with holes.
    pub fn advise_superpages(
        &self,
        start: impl Into<VirtAddr>,
        len: u64,
        advice: crate::map::SuperpageAdvice,
    ) -> Result<(), MapError> {
        use crate::map::SuperpageAdvice;
        let start = start.into().as_u64();
        self.update_entries(start, len, |e| {
            e.eflags
                .remove(EntryFlags::HUGEPAGE | EntryFlags::NOHUGEPAGE);
            match advice {
                SuperpageAdvice::Default => {}
                SuperpageAdvice::Huge => e.eflags.insert(EntryFlags::HUGEPAGE),
                SuperpageAdvice::NoHuge => e.eflags.insert(EntryFlags::NOHUGEPAGE),
            }
        })
    }

    /// Sets what a fork does with a range (`minherit`). Device mappings
    /// stay shared (or none): a copy of device memory is not possible.
    ///
    /// # Errors
    ///
    /// [`MapError`] for a bad range or one with holes.
    pub fn set_inheritance(
        &self,
        start: impl Into<VirtAddr>,
        len: u64,
        i: Inheritance,
    ) -> Result<(), MapError> {
        let start = start.into().as_u64();
        self.update_entries(start, len, |e| {
            let device = e
                .object
                .as_ref()
                .is_some_and(|o| o.kind().class() == crate::pager::ObjectClass::Device);
            e.inheritance = if device {
                Inheritance::Share.min_with(i)
            } else {
                i
            };
        })
    }
}

impl<P: Pmap> VmSpace<P> {
    /// Drops removed entries' object references. Pages of an anonymous
    /// object that only this entry mapped can never be seen again: they
    /// are freed now, not when the object dies (FreeBSD `vm_map_delete`) —
    /// unless a user holds the object ([`object_at`](Self::object_at)):
    /// mapped again through that handle, they are its contents.
    fn release_entries(&self, entries: Vec<MapEntry>) {
        for e in entries {
            let Some(o) = &e.object else { continue };
            let private = {
                let st = o.lock();
                st.flags.contains(ObjectFlags::ONEMAPPING)
                    && st.kind.is_anonymous()
                    && st.shadow_count == 0
            };
            if private {
                let first = e.offset / PAGE_SIZE;
                // Asked under the object's lock, which handing a handle out
                // takes too: a handle either exists now (the pages stay)
                // or comes after they are gone.
                self.vm
                    .page_remove_unless(o, first, first + e.pages(), || !o.unexposed(0));
            }
            o.drop_ref();
        }
    }
}

impl<P: Pmap> Drop for VmSpace<P> {
    fn drop(&mut self) {
        let mut removed: Vec<MapEntry> = {
            let g: &mut MapState = &mut self.map.write();
            core::mem::take(&mut g.entries).into_values().collect()
        };
        self.vm.pmap.remove(
            &self.pmap,
            va_range(self.map.min_addr(), self.map.max_addr()),
            &mut |d| self.vm.note_displaced(d),
        );
        for e in &mut removed {
            self.release_wiring(e, false);
        }
        self.release_entries(removed);
        self.vm.pmap.destroy_space(&self.pmap);
    }
}
