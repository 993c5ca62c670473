//! The fault handler: seed `vm_fault()` (L206-932) as a retry loop.
//!
//! [`VmSpace::fault`](crate::VmSpace::fault) resolves one fault through a
//! `FaultTarget`: the machine, one map and the pmap space that shows it
//! (this layer knows nothing of spaces). Each attempt builds a
//! `FaultState` that owns everything the attempt holds — the map read
//! lock, paging-in-progress references, busy pages — so that giving up,
//! retrying and succeeding all release exactly what is held. The attempt
//! returns a `Step` that tells the loop what to wait for before the next
//! try, and the loop does the waiting with nothing held.
//!
//! Attempt, in the seed's order:
//! 1. look the address up (growing a stack once on a miss, seed L231-270);
//! 2. walk the shadow chain (L317-686): busy a resident page, or allocate
//!    one and ask the pager, or go down; at the end zero-fill into the
//!    first object;
//! 3. copy-on-write into the first object (L701-787);
//! 4. re-validate the map if its lock was dropped for I/O (L789-842);
//! 5. dirty bookkeeping, pmap enter, queue placement, unbusy (L843-931).

mod cow;
mod pagein;
mod prefault;
mod reserve;

use crate::addr::{Pfn, VirtAddr, page_trunc};
use crate::error::FaultError;
use crate::map::{EntryFlags, LookupError, LookupMode, MapState, VmMap};
use crate::object::Machine;
use crate::object::ObjectFlags;
use crate::object::busy::{BusyPage, Disposal, Pip};
use crate::page::{PageFlags, PageId, VM_PAGE_BITS_ALL};
use crate::page_queues::AllocClass;
use crate::pager::PagerError;
use crate::pmap::Mapping;
use crate::pmap::{PageInfo, Pmap, PmapError};
use crate::prot::Prot;
use crate::sync::ShardedReadGuard;
use crate::vm::Vm;
use core::sync::atomic::Ordering;

bitflags::bitflags! {
    /// How a fault is being asked for (FreeBSD `VM_FAULT_*`, same values).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct FaultFlags: u32 {
        /// Wiring or unwiring the page (`VM_FAULT_CHANGE_WIRING`).
        ///
        /// Accepted for the seed's callers; wiring is done by
        /// [`VmSpace::wire`], whose faults run the same path. A fault on a
        /// wired entry keeps that entry's wiring on the page it maps
        /// whatever the flags, and a fault never takes a wiring away, so
        /// this flag changes nothing a fault does.
        const CHANGE_WIRING = 1;
        /// Wiring for the user, `mlock` (`VM_FAULT_USER_WIRE`). As
        /// [`CHANGE_WIRING`](Self::CHANGE_WIRING): accepted, no effect of
        /// its own.
        const USER_WIRE = 2;
        /// The access will dirty the page: mark it dirty now
        /// (`VM_FAULT_DIRTY`). A trap handler passes it with write faults.
        const DIRTY = 8;
    }
}

impl FaultFlags {
    /// An ordinary fault (`VM_FAULT_NORMAL`).
    pub const NORMAL: FaultFlags = FaultFlags::empty();
    /// Both wiring flags (`VM_FAULT_WIRE_MASK`).
    pub const WIRE_MASK: FaultFlags = FaultFlags::CHANGE_WIRING.union(FaultFlags::USER_WIRE);
}

/// What the core asks of a fault beyond the caller's flags.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FaultCtx {
    pub(crate) flags: FaultFlags,
    /// The wiring operation that owns the entry's transition.
    pub(crate) owner: bool,
    /// Give a private (copy-on-write) entry its own copy of the page even
    /// for a read (`VM_PROT_COPY`): holds that must not share, forced
    /// writes.
    pub(crate) copy: bool,
}

impl FaultCtx {
    /// A fault asked for through the public API.
    pub(crate) fn public(flags: FaultFlags) -> FaultCtx {
        FaultCtx {
            flags,
            ..FaultCtx::default()
        }
    }

    /// A fault of [`VmSpace::wire`] on an entry it put in transition.
    pub(crate) fn wiring() -> FaultCtx {
        FaultCtx {
            owner: true,
            ..FaultCtx::default()
        }
    }

    /// A fault that breaks copy-on-write sharing without writing.
    pub(crate) fn copy() -> FaultCtx {
        FaultCtx {
            copy: true,
            ..FaultCtx::default()
        }
    }
}

/// How the page of a successful fault was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// It was resident (in the first object or, for a read, in a backing
    /// object).
    Resident,
    /// It was zero-filled.
    ZeroFill,
    /// A pager read it in.
    PagedIn,
    /// Copy-on-write: copied into the first object.
    CowCopy,
    /// Copy-on-write: moved up from a private backing object.
    CowMoved,
}

impl core::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            FaultKind::Resident => "resident",
            FaultKind::ZeroFill => "zero-filled",
            FaultKind::PagedIn => "paged in",
            FaultKind::CowCopy => "copied on write",
            FaultKind::CowMoved => "moved up on write",
        })
    }
}

/// What a successful fault did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultOutcome {
    /// The frame now mapped at the (page-truncated) address.
    pub pfn: Pfn,
    /// The protection it was mapped with (may be less than the entry's:
    /// a read of a copy-on-write page maps it read-only).
    pub prot: Prot,
    /// Whether the fault needed pager I/O (a major fault).
    pub major: bool,
    /// How the page was obtained (in the final attempt).
    pub kind: FaultKind,
}

impl core::fmt::Display for FaultOutcome {
    /// `page zero-filled, frame 0x1 mapped rw- (minor)`.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let how = if self.major { "major" } else { "minor" };
        write!(
            f,
            "page {}, frame {:#x} mapped {} ({how})",
            self.kind, self.pfn.0, self.prot
        )
    }
}

/// What an attempt asks of the retry loop.
enum Step {
    /// Start over now (the map changed, a race was lost).
    Retry,
    /// Sleep until the page is unbusied, then start over (`v_intrans`).
    WaitPage {
        id: PageId,
        object: u64,
        pindex: u64,
    },
    /// Sleep for free memory, then start over (`VM_WAITPFAULT`).
    WaitMemory,
    /// A wiring owns the entry: sleep until the map changes after the
    /// timestamp, then start over.
    WaitTransition(u64),
    /// The pager asked to be called again later.
    Again {
        object: crate::object::ObjectId,
        pindex: u64,
    },
    /// Give up with this error.
    Fail(FaultError),
}

/// State kept across attempts (the seed's locals outside `RetryFault`).
struct Retries {
    growstack: bool,
    hard: bool,
    memory_waits: u32,
    again_waits: u32,
    /// Direct reclaims run for this fault.
    reclaims: u32,
}

/// What one fault works on: the machine, a map, and the pmap space that
/// shows the map. A [`VmSpace`](crate::VmSpace) lends its three parts.
pub(crate) struct FaultTarget<'a, P: Pmap> {
    pub(crate) vm: &'a Vm<P>,
    pub(crate) map: &'a VmMap,
    pub(crate) pmap: &'a P::Space,
}

impl<P: Pmap> Clone for FaultTarget<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P: Pmap> Copy for FaultTarget<'_, P> {}

impl<'a, P: Pmap> FaultTarget<'a, P> {
    /// Resolves a fault at page-truncated or unaligned `va` for `access`
    /// (seed `vm_fault`), as [`VmSpace::fault`](crate::VmSpace::fault)
    /// documents, with what the core asks besides the flags. The outcome's
    /// `major` says whether a pager was asked.
    pub(crate) fn resolve(
        self,
        va: u64,
        access: Prot,
        ctx: FaultCtx,
    ) -> Result<FaultOutcome, FaultError> {
        let machine = &*self.vm.machine;
        machine
            .counters
            .local()
            .v_vm_faults
            .fetch_add(1, Ordering::Relaxed);
        if va < self.map.min_addr() || va >= self.map.max_addr() {
            return Err(FaultError::InvalidAddress { addr: va });
        }
        let va = page_trunc(va);
        let access = if access.is_empty() {
            Prot::READ
        } else {
            access
        };
        let mut r = Retries {
            growstack: true,
            hard: false,
            memory_waits: 0,
            again_waits: 0,
            reclaims: 0,
        };
        loop {
            match self.fault_attempt(va, access, ctx, &mut r) {
                Ok((mut out, shadowed)) => {
                    if let Some(first) = shadowed {
                        // A copy-on-write just used the chain: merge what
                        // exited forks left private, now that this fault no
                        // longer holds the objects.
                        self.vm.collapse_chain(&first, 1);
                    }
                    out.major = r.hard;
                    return Ok(out);
                }
                Err(Step::Retry) => {}
                Err(Step::Fail(e)) => return Err(e),
                Err(Step::WaitPage { id, object, pindex }) => {
                    machine
                        .counters
                        .local()
                        .v_intrans
                        .fetch_add(1, Ordering::Relaxed);
                    machine.pages.wait_for_page(id, object, pindex);
                }
                Err(Step::WaitTransition(stamp)) => {
                    self.map.wait_changed(machine.pages.waits(), stamp)
                }
                Err(Step::WaitMemory) => {
                    machine
                        .counters
                        .local()
                        .v_wait_memory
                        .fetch_add(1, Ordering::Relaxed);
                    // Direct reclaim first; sleep only when it frees nothing.
                    if r.reclaims < crate::pageout::MAX_RECLAIMS && self.vm.reclaim() {
                        r.reclaims += 1;
                        continue;
                    }
                    if r.memory_waits >= self.vm.config.memory_retries {
                        return Err(FaultError::ResourceShortage { addr: va });
                    }
                    r.memory_waits += 1;
                    machine.pages.wait_for_memory(self.vm.config.memory_wait_ms);
                }
                Err(Step::Again { object, pindex }) => {
                    if r.again_waits >= self.vm.config.memory_retries {
                        return Err(FaultError::Pager {
                            addr: va,
                            object,
                            pindex,
                            error: PagerError::Again,
                        });
                    }
                    r.again_waits += 1;
                    machine.pages.wait_for_memory(self.vm.config.memory_wait_ms);
                }
            }
        }
    }

    /// One pass of the seed's `RetryFault` body.
    fn fault_attempt(
        self,
        va: u64,
        access: Prot,
        ctx: FaultCtx,
        r: &mut Retries,
    ) -> Result<
        (
            FaultOutcome,
            Option<alloc::sync::Arc<crate::object::VmObject>>,
        ),
        Step,
    > {
        let mode = LookupMode {
            override_write: false,
            copy: ctx.copy,
            owner: ctx.owner,
        };
        let (map, info, stamp) = match self.map.lookup(&self.vm.machine, va, access, mode) {
            Ok(found) => found,
            Err((LookupError::InTransition, stamp)) => return Err(Step::WaitTransition(stamp)),
            Err((LookupError::Fault(e), _)) => return Err(self.lookup_failed(va, e, r)),
            Err((LookupError::NeedsWrite, _)) => return Err(Step::Retry),
        };
        let entry = map.find(va).expect("lookup found the entry");
        if entry.eflags.contains(EntryFlags::NOFAULT) {
            return Err(Step::Fail(FaultError::NoFaultEntry { addr: va }));
        }
        // Wired faults take the entry's protection (seed L307-308); a copy
        // fault walks as a write (so a page below is copied up) but maps
        // with `prot`.
        let (entry_end, eflags) = (entry.end, entry.eflags);
        let mut fault_type = if info.wired { info.prot } else { access };
        if ctx.copy {
            fault_type |= Prot::WRITE;
        }
        let mut fs = FaultState {
            target: self,
            machine: &self.vm.machine,
            va,
            m: None,
            first_m: None,
            object: None,
            map: Some(map),
            stamp,
            entry_start: info.entry_start,
            entry_end,
            eflags,
            pindex: info.pindex,
            first_pindex: info.pindex,
            prot: info.prot,
            wired: info.wired,
            access,
            mode,
            fault_type,
            kind: FaultKind::Resident,
            read_around: None,
            marker_hit: false,
            first: Pip::new(info.object),
            first_info: FirstInfo::default(),
            populate: None,
            populated: alloc::vec::Vec::new(),
        };
        fs.walk(&mut r.hard)?;
        if fs.marker_hit {
            fs.read_ahead_async();
        }
        if fs.object.is_some() {
            if fs.fault_type.contains(Prot::WRITE) {
                fs.cow();
            } else {
                fs.prot.remove(Prot::WRITE);
            }
        }
        fs.revalidate()?;
        let cow = matches!(fs.kind, FaultKind::CowCopy | FaultKind::CowMoved);
        let first = cow.then(|| fs.first.object().clone());
        fs.finish(ctx).map(|out| (out, first))
    }

    /// The seed's handling of a failed lookup (L233-245): grow a stack
    /// once. (The seed's forced copy for a user wiring the lookup refused,
    /// L247-270, served entries without read access; wiring refuses those
    /// up front, as modern FreeBSD's `mlock` does.)
    fn lookup_failed(self, va: u64, e: FaultError, r: &mut Retries) -> Step {
        match e {
            FaultError::InvalidAddress { .. } if r.growstack => {
                r.growstack = false;
                if self.map.grow_stack(va, self.vm.config.stack_growth) {
                    self.vm
                        .counters()
                        .local()
                        .v_stack_growths
                        .fetch_add(1, Ordering::Relaxed);
                    Step::Retry
                } else {
                    Step::Fail(e)
                }
            }
            e => Step::Fail(e),
        }
    }
}

/// Everything one fault attempt holds (the seed's `struct faultstate`).
/// Dropping it is `unlock_and_deallocate` plus `release_page`.
pub(crate) struct FaultState<'a, P: Pmap> {
    target: FaultTarget<'a, P>,
    machine: &'a Machine,
    va: u64,
    /// The page found or allocated in the current object.
    m: Option<BusyPage<'a>>,
    /// The busy placeholder in the first object, held while the walk is
    /// below it.
    first_m: Option<BusyPage<'a>>,
    /// The current object when it is not the first.
    object: Option<Pip>,
    /// The map read lock; `None` once dropped for I/O
    /// (`lookup_still_valid`).
    map: Option<ShardedReadGuard<'a, MapState>>,
    stamp: u64,
    entry_start: u64,
    /// The entry's end and flags as the lookup found it (the map read
    /// lock held since), so the walk need not look the entry up again
    /// under the object's lock (`reserve`).
    entry_end: u64,
    eflags: EntryFlags,
    pindex: u64,
    first_pindex: u64,
    prot: Prot,
    wired: bool,
    /// The access asked for, and how the entry was looked up (for the
    /// relookup after I/O).
    access: Prot,
    mode: LookupMode,
    fault_type: Prot,
    kind: FaultKind,
    /// The addresses of the pages a pager read for this fault brought in
    /// (the cluster), which bound fault-around (modern FreeBSD prefaults
    /// only the pages just read, so cache-behind's work is not undone).
    read_around: Option<core::ops::Range<u64>>,
    /// The page found was a read-ahead marker: the next window is to be
    /// read in the background.
    marker_hit: bool,
    /// The first object, referenced and paging-in-progress.
    first: Pip,
    /// What the walk read of the first object for `finish`.
    first_info: FirstInfo,
    /// A superpage run this fault claimed and is to fill whole
    /// (`reserve`).
    populate: Option<reserve::Populate>,
    /// The frames `reserve::populate` took and zeroed beside the fault's
    /// own, by address and page index, for `finish` to insert and map;
    /// freed if the attempt ends otherwise.
    populated: alloc::vec::Vec<(u64, u64, PageId)>,
}

/// What `finish` needs of the first object, read under its lock by the
/// walk's first step. Pageout may give an anonymous object swap meanwhile
/// (a pager, a kind that maps clean pages read-only), but it cannot have
/// written the page this fault holds busy, so that page has no copy there
/// to protect or free: what was read still decides for it.
#[derive(Clone, Copy, Debug, Default)]
struct FirstInfo {
    /// It has a pager (which may hold a copy of the page).
    pager: bool,
    /// Its pager's kind maps clean pages read-only.
    clean_read_only: bool,
    /// It is already marked written (the marks are never taken back).
    written: bool,
}

impl<P: Pmap> Drop for FaultState<'_, P> {
    fn drop(&mut self) {
        // The seed's order: the current page, the placeholder, the current
        // object, then the map; the first object goes last.
        drop(self.m.take());
        drop(self.first_m.take());
        self.release_populated();
        drop(self.object.take());
        drop(self.map.take());
    }
}

impl<'a, P: Pmap> FaultState<'a, P> {
    fn current(&self) -> &alloc::sync::Arc<crate::object::VmObject> {
        self.object.as_ref().unwrap_or(&self.first).object()
    }

    fn fail(&self, e: FaultError) -> Step {
        Step::Fail(e)
    }

    /// Seed L317-686: find the page, leaving it busy in `self.m`.
    ///
    /// Each object of the chain is locked once: what the walk needs of it
    /// later (its backing link; of the first object, what `finish` needs)
    /// is read in that one hold. The backing link stays as read while this
    /// fault holds the object paging-in-progress (collapse and bypass, its
    /// only writers, leave such objects alone); see [`FirstInfo`] for the
    /// rest.
    fn walk(&mut self, hard: &mut bool) -> Result<(), Step> {
        loop {
            // Borrowed from the field that holds it (not cloned: on a
            // shared object every count change is a contended write).
            let obj = match &self.object {
                Some(p) => p.object(),
                None => self.first.object(),
            };
            let trypager;
            let resident;
            let below;
            {
                let mut st = obj.lock();
                if st.flags.contains(ObjectFlags::DEAD) {
                    return Err(self.fail(FaultError::DeadObject {
                        addr: self.va,
                        object: obj.id(),
                    }));
                }
                // TRYPAGER (seed L185): the object has a pager. Unlike the
                // seed, a wiring fault asks it too: the seed skipped it
                // trusting that the wiring had just faulted the page in
                // under the map lock; here the entry is in transition, and
                // a page a pager holds is never zero-filled over.
                trypager = st.pager.is_some();
                if self.object.is_none() {
                    self.first_info = FirstInfo {
                        pager: trypager,
                        clean_read_only: trypager && st.kind.maps_clean_read_only(),
                        written: st
                            .flags
                            .contains(ObjectFlags::WRITEABLE | ObjectFlags::MIGHTBEDIRTY),
                    };
                }
                resident = st.pages.get(&self.pindex).copied();
                below = match resident {
                    Some(_) => None,
                    None => st.backing.clone(),
                };
                if let Some(id) = resident {
                    let page = self.machine.pages.get(id);
                    if !page.try_busy() {
                        return Err(Step::WaitPage {
                            id,
                            object: obj.id().0,
                            pindex: self.pindex,
                        });
                    }
                    self.machine.pages.dequeue(id);
                    if page.flags().contains(PageFlags::READAHEAD) {
                        page.clear_flags(PageFlags::READAHEAD);
                        self.marker_hit = page.valid() == VM_PAGE_BITS_ALL;
                    }
                    self.m = Some(BusyPage::new(
                        self.machine,
                        obj.clone(),
                        id,
                        Disposal::Release,
                    ));
                    if page.valid() == VM_PAGE_BITS_ALL {
                        return Ok(());
                    }
                    // Partly valid (read ahead up to EOF, or left past
                    // the end by a truncation): read the rest, within the
                    // object only.
                    if self.pindex >= st.size {
                        return Err(self.out_of_bounds(obj, st.size));
                    }
                } else if trypager || self.object.is_none() {
                    if self.pindex >= st.size {
                        return Err(self.out_of_bounds(obj, st.size));
                    }
                    if self.machine.pages.count_severe() {
                        return Err(Step::WaitMemory);
                    }
                    // Prefer a pre-zeroed page when nothing will fill it
                    // but zeros (seed L445-446).
                    let zero = st.pager.is_none() && st.backing.is_none();
                    let hint = obj.id().0 ^ self.pindex;
                    // An anonymous first object's page: its reservation's
                    // frame if it has one (see `reserve`).
                    let reserved = if zero && self.object.is_none() {
                        self.reserved_frame(&mut st)
                    } else {
                        None
                    };
                    if let Some((_, whole)) = reserved {
                        self.populate = whole;
                    }
                    let Some(id) = reserved
                        .map(|(id, _)| id)
                        .or_else(|| self.machine.pages.alloc(hint, AllocClass::Normal, zero))
                    else {
                        return Err(Step::WaitMemory);
                    };
                    let page = self.machine.pages.get(id);
                    page.set_flags(PageFlags::BUSY);
                    obj.insert_page(&mut st, id, page, self.pindex);
                    self.m = Some(BusyPage::new(self.machine, obj.clone(), id, Disposal::Free));
                }
            }
            if trypager && self.m.is_some() {
                let obj = obj.clone();
                match self.page_in(&obj) {
                    Ok(()) => {
                        *hard = true;
                        self.kind = FaultKind::PagedIn;
                        return Ok(());
                    }
                    Err(PagerError::Fail) => {}
                    Err(PagerError::Again) => {
                        return Err(Step::Again {
                            object: obj.id(),
                            pindex: self.pindex,
                        });
                    }
                    Err(PagerError::Bad) => return Err(self.out_of_bounds(&obj, obj.size())),
                    Err(error) => {
                        let pindex = self.pindex;
                        return Err(self.fail(FaultError::Pager {
                            addr: self.va,
                            object: obj.id(),
                            pindex,
                            error,
                        }));
                    }
                }
            }
            if resident.is_some() {
                // A partly valid page the pager cannot complete: its
                // valid blocks are all there is at this index.
                self.settle_partial();
                return Ok(());
            }
            // The pager does not have it (or there is none). In the first
            // object the page stays as a busy placeholder (seed L640-641);
            // below it, it goes (L624-633).
            if self.object.is_none() {
                self.first_m = self.m.take();
            } else {
                self.m = None;
            }
            match below {
                None => return self.zero_fill(),
                Some(b) => {
                    self.pindex += b.offset;
                    self.object = Some(Pip::new(b.object));
                }
            }
        }
    }

    fn out_of_bounds(&self, obj: &crate::object::VmObject, size: u64) -> Step {
        Step::Fail(FaultError::OutOfBounds {
            addr: self.va,
            object: obj.id(),
            pindex: self.pindex,
            size,
        })
    }

    /// Makes the busy page `self.m` wholly valid: blocks nobody filled are
    /// zeroed, so a page never shows what its frame held before (seed
    /// L882-885; FreeBSD's pagers do it in `vm_page_zero_invalid`).
    pub(super) fn settle_partial(&mut self) {
        let Some(m) = self.m.as_mut() else { return };
        let page = m.page();
        let valid = page.valid();
        if valid != VM_PAGE_BITS_ALL {
            let block = crate::page::DEV_BSIZE;
            for b in (0..8).filter(|b| valid & (1 << b) == 0) {
                self.machine
                    .phys
                    .zero_range(m.pfn(), b * block, (b + 1) * block);
            }
            page.set_valid(VM_PAGE_BITS_ALL);
            self.machine
                .counters
                .local()
                .v_pager_partial
                .fetch_add(1, Ordering::Relaxed);
        }
        m.keep();
    }

    /// Seed L649-675: nothing below; zero the placeholder in the first
    /// object.
    fn zero_fill(&mut self) -> Result<(), Step> {
        self.object = None;
        self.pindex = self.first_pindex;
        let Some(mut m) = self.first_m.take() else {
            debug_assert!(false, "no placeholder page at the end of the chain");
            return Err(Step::Retry);
        };
        let page = m.page();
        let counters = self.machine.counters.local();
        if page.flags().contains(PageFlags::ZERO) {
            counters.v_ozfod.fetch_add(1, Ordering::Relaxed);
        } else {
            self.machine.phys.zero(m.pfn());
        }
        counters.v_zfod.fetch_add(1, Ordering::Relaxed);
        page.clear_flags(PageFlags::ZERO);
        page.set_valid(VM_PAGE_BITS_ALL);
        m.keep();
        self.kind = FaultKind::ZeroFill;
        self.m = Some(m);
        if let Some(p) = self.populate.take() {
            self.populate(p);
        }
        Ok(())
    }

    /// Seed L789-842: if the map lock was dropped, take it again and check
    /// that the entry still maps the same page; narrow `prot` to what the
    /// entry allows now, and take its wiring as it is now.
    fn revalidate(&mut self) -> Result<(), Step> {
        if self.map.is_some() {
            return Ok(());
        }
        let map = &self.target.map;
        let Some(g) = map.try_read() else {
            return Err(Step::Retry);
        };
        let now = map.timestamp();
        if now != self.stamp {
            match g.lookup(self.va, self.access, self.mode) {
                Err(LookupError::NeedsWrite) => return Err(Step::Retry),
                Err(LookupError::InTransition) => return Err(Step::WaitTransition(now)),
                Err(LookupError::Fault(e)) => return Err(Step::Fail(e)),
                Ok(info) => {
                    if !alloc::sync::Arc::ptr_eq(&info.object, self.first.object())
                        || info.pindex != self.first_pindex
                    {
                        return Err(Step::Retry);
                    }
                    self.prot &= info.prot;
                    self.wired = info.wired;
                    self.entry_start = info.entry_start;
                    if let Some(e) = g.entries.get(&info.entry_start) {
                        (self.entry_end, self.eflags) = (e.end, e.eflags);
                    }
                }
            }
        }
        self.map = Some(g);
        Ok(())
    }

    /// Seed L843-931: dirty bookkeeping, pmap enter, queue placement, the
    /// entry's wiring.
    fn finish(mut self, ctx: FaultCtx) -> Result<FaultOutcome, Step> {
        let Some(entry) = self
            .map
            .as_ref()
            .and_then(|g| g.entries.get(&self.entry_start))
        else {
            return Err(Step::Retry);
        };
        let nosync = entry.eflags.contains(EntryFlags::NOSYNC);
        let m = self.m.as_ref().expect("page found");
        let page = m.page();
        let dirtying = self.prot.contains(Prot::WRITE) && ctx.flags.contains(FaultFlags::DIRTY);
        // The first object is locked again only to mark it written the
        // first time, or to tell its pager about a page this fault dirties.
        let info = self.first_info;
        let mark = self.prot.contains(Prot::WRITE) && !info.written;
        let pager = if mark || (dirtying && info.pager) {
            let mut st = self.first.object().lock();
            if mark {
                st.flags |= ObjectFlags::WRITEABLE | ObjectFlags::MIGHTBEDIRTY;
            }
            if dirtying { st.pager.clone() } else { None }
        } else {
            None
        };
        let clean_read_only = info.clean_read_only;
        // A clean page with a copy on swap is mapped read-only by a read
        // fault, so that the first write faults and frees the swap block
        // (`page_unswapped`) instead of leaving a stale copy allocated.
        if !self.fault_type.contains(Prot::WRITE) && page.dirty() == 0 && clean_read_only {
            self.prot.remove(Prot::WRITE);
        }
        if self.prot.contains(Prot::WRITE) {
            if nosync {
                if page.dirty() == 0 {
                    page.set_flags(PageFlags::NOSYNC);
                }
            } else {
                page.clear_flags(PageFlags::NOSYNC);
            }
            if dirtying {
                page.dirty_all();
                if let Some(p) = pager {
                    p.page_unswapped(self.first_pindex);
                }
            }
        }
        // The walk leaves only wholly valid pages (seed L882-885).
        debug_assert_eq!(
            page.valid(),
            VM_PAGE_BITS_ALL,
            "mapping a partly valid page"
        );
        let pg = PageInfo {
            pfn: m.pfn(),
            managed: !page
                .flags()
                .intersects(PageFlags::FICTITIOUS | PageFlags::UNMANAGED),
            attr: self.machine.pages.attr(m.id),
        };
        let vm = &self.target.vm;
        let mapping = Mapping::new(pg, self.prot)
            .access(self.fault_type & self.prot)
            .wired(self.wired);
        // A zero-filled superpage's other pages go in first, so that one
        // entry can map all 512 (`reserve`).
        let populated = core::mem::take(&mut self.populated);
        let whole = self.map_populated(populated, entry, mapping);
        let entered = if whole {
            Ok(None)
        } else {
            vm.pmap.enter(self.target.pmap, VirtAddr(self.va), mapping)
        };
        match entered {
            Ok(displaced) => {
                if let Some(d) = displaced {
                    vm.note_displaced(d);
                }
            }
            Err(PmapError::NoMemory) => {
                // A copy made for this write is dropped, so that a fault
                // that ends in a shortage leaves the chain as it was (a
                // copy kept would stop the mapping seeing later changes
                // of the page below). The retry copies again.
                if self.kind == FaultKind::CowCopy {
                    if let Some(m) = self.m.as_mut() {
                        m.discard();
                    }
                }
                return Err(Step::WaitMemory);
            }
            Err(error) => {
                return Err(Step::Fail(FaultError::Pmap {
                    addr: self.va,
                    error,
                }));
            }
        }
        page.set_flags(PageFlags::REFERENCED);
        let pages = &self.machine.pages;
        let id = m.id;
        if self.wired {
            // The entry's wiring holds the page it shows (module `wire`).
            match &entry.wiring {
                Some(w) => w.note(pages, (self.va - entry.start) / crate::PAGE_SIZE, id),
                None => debug_assert!(false, "a wired entry without its record"),
            }
        } else {
            if self.kind == FaultKind::Resident {
                entry.note_read_hits(1);
            }
            self.prefault(entry);
            // The page goes where the pageout daemon can find it.
            pages.activate(id);
        }
        let out = FaultOutcome {
            pfn: pg.pfn,
            prot: self.prot,
            major: false,
            kind: self.kind,
        };
        self.m.take().expect("page found").unbusy();
        Ok(out)
    }
}
