//! [`X86Pmap`]: vm-core's [`Pmap`] on real x86_64 page tables.
//!
//! Tables are frames of the machine's physical memory, laid out as the CPU
//! reads them; a space's root is a physical address to load into CR3.
//! Each space has a lock; each frame's pv list has one; the lock order is
//! space, then pv list. Per-page operations (`remove_all` and friends) read the
//! pv list, drop its lock, and take each space's lock in turn, checking
//! that the mapping is still the one they saw.

use crate::entry::{PG_FRAME, PteFlags};
use crate::mmu::{self, Access, CpuMode};
use crate::paging::{Level, PagingMode, TableIndex, index};
use crate::pat::{CACHE_MASK, cache_bits};
use crate::pv::PvTable;
use crate::tables::entry_at;
use crate::tlb::{NoTlb, PendingFlush, TlbHook, TlbStats};
use alloc::sync::{Arc, Weak};
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};
use hashbrown::HashMap;
use vm_core::pmap::{
    Displaced, DisplacedSink, Mapping, PageInfo, PhysFrames, Pmap, PmapError, RefMod,
};
use vm_core::sync::{Mutex, MutexGuard, RwLock};
use vm_core::{Pfn, PhysMem, Prot};
use vm_core::{PhysAddr, VirtAddr};

/// Flags of a table (non-leaf) entry for user space, as FreeBSD's
/// `_pmap_allocpte` makes them.
const TABLE_FLAGS: PteFlags = PteFlags::PRESENT
    .union(PteFlags::WRITABLE)
    .union(PteFlags::USER)
    .union(PteFlags::ACCESSED)
    .union(PteFlags::DIRTY);

/// A space's statistics; the lock that guards it also serialises every
/// change of the space's tables. Each table's count of valid entries lives
/// in its frame's table word ([`PhysFrames::table_word`]).
struct SpaceState {
    resident: u64,
    wired: u64,
    /// Set by `destroy_space` before it frees the tables: a per-page
    /// operation that found the space through a pv entry leaves it alone.
    destroyed: bool,
}

struct SpaceInner {
    id: u64,
    root: u64,
    state: Mutex<SpaceState>,
    /// Held shared by every software-MMU walk of the space, and exclusive
    /// while emptied table frames are freed: a walk that read a parent
    /// entry before it was cleared finishes in the old table, never in a
    /// frame reused for data. Holds whether the space was destroyed (its
    /// root freed): a walk then stops at once.
    walk: RwLock<bool>,
}

/// The entry for `va` in the table of `level` at physical address `table`.
fn slot_of(phys: &PhysMem, table: u64, va: u64, level: Level) -> Option<&AtomicU64> {
    entry_at(phys, PhysAddr(table), index(VirtAddr(va), level))
}

/// One address space's tables: its root (CR3) and statistics.
pub struct X86Space(Arc<SpaceInner>);

impl core::fmt::Debug for X86Space {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("X86Space")
            .field("id", &self.0.id)
            .field("root", &self.0.root)
            .finish()
    }
}

impl X86Space {
    /// Physical address of the root table: the value for CR3.
    #[must_use]
    pub fn root(&self) -> u64 {
        self.0.root
    }

    /// The space's number in its pmap.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Mapped pages (`pm_stats.resident_count`).
    #[must_use]
    pub fn resident_count(&self) -> u64 {
        self.0.state.lock().resident
    }

    /// Wired mappings (`pm_stats.wired_count`).
    #[must_use]
    pub fn wired_count(&self) -> u64 {
        self.0.state.lock().wired
    }
}

/// The x86_64 pmap. `T` is the embedder's TLB invalidation; the default
/// [`NoTlb`] suits the software MMU, which caches nothing.
pub struct X86Pmap<T: TlbHook = NoTlb> {
    frames: Option<PhysFrames>,
    mode: CpuMode,
    tlb: T,
    stats: TlbStats,
    pv: PvTable,
    spaces: Mutex<HashMap<u64, Weak<SpaceInner>>>,
    next_id: AtomicU64,
}

impl X86Pmap<NoTlb> {
    /// A 4-level pmap with no hardware TLB to invalidate.
    #[must_use]
    pub fn new() -> Self {
        Self::with_hook(CpuMode::default(), NoTlb)
    }

    /// A 5-level (LA57) pmap with no hardware TLB to invalidate.
    #[must_use]
    pub fn new_la57() -> Self {
        Self::with_hook(
            CpuMode {
                paging: PagingMode::FiveLevel,
                ..CpuMode::default()
            },
            NoTlb,
        )
    }
}

impl Default for X86Pmap<NoTlb> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: TlbHook> X86Pmap<T> {
    /// A pmap for CPUs in `mode` whose TLBs `tlb` invalidates.
    pub fn with_hook(mode: CpuMode, tlb: T) -> Self {
        X86Pmap {
            frames: None,
            mode,
            tlb,
            stats: TlbStats::default(),
            pv: PvTable::default(),
            spaces: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// The CPU mode the tables are built for.
    pub fn mode(&self) -> &CpuMode {
        &self.mode
    }

    /// Invalidations issued so far.
    pub fn tlb_stats(&self) -> &TlbStats {
        &self.stats
    }

    /// The TLB hook.
    pub fn tlb(&self) -> &T {
        &self.tlb
    }

    fn phys(&self) -> Option<&PhysMem> {
        self.frames.as_ref().map(PhysFrames::phys)
    }

    /// The raw value of the leaf entry mapping `va`, if the tables reach
    /// it.
    pub fn pte(&self, space: &X86Space, va: impl Into<VirtAddr>) -> Option<u64> {
        let _g = self.lock_space(space)?;
        self.leaf_slot(space.0.root, va.into().as_u64())
            .map(|s| s.load(Ordering::Acquire))
    }

    /// Restores a leaf entry to a value read earlier with [`pte`](Self::pte)
    /// (the KVM oracle undoes its predictions this way).
    #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
    pub(crate) fn set_pte_for_oracle(&self, space: &X86Space, va: u64, value: u64) {
        let Some(_g) = self.lock_space(space) else {
            return;
        };
        if let Some(slot) = self.leaf_slot(space.0.root, va) {
            slot.store(value, Ordering::Release);
        }
    }

    /// Translates a user access through the software MMU.
    ///
    /// # Errors
    ///
    /// The [`mmu::Fault`] the CPU would raise.
    pub fn translate_access(
        &self,
        space: &X86Space,
        va: impl Into<VirtAddr>,
        access: Access,
    ) -> Result<mmu::Translation, mmu::Fault> {
        let root = PhysAddr(space.0.root);
        let phys = self.phys().ok_or(mmu::Fault::BadPhysical(root))?;
        let walking = space.0.walk.read();
        if *walking {
            return Err(mmu::Fault::BadPhysical(root));
        }
        mmu::translate(phys, &self.mode, root, va.into(), access)
    }

    /// The slot of the 4 KiB leaf for `va`, without creating tables.
    fn leaf_slot(&self, root: u64, va: u64) -> Option<&AtomicU64> {
        let phys = self.phys()?;
        let mut table = root;
        for level in self.mode.paging.root().down_to(Level::PD) {
            let e = slot_of(phys, table, va, level)?.load(Ordering::Acquire);
            if e & PteFlags::PRESENT.bits() == 0 || e & PteFlags::HUGE.bits() != 0 {
                return None;
            }
            table = e & PG_FRAME;
        }
        slot_of(phys, table, va, Level::PT)
    }

    /// The slot of the leaf for `va` and its table, making missing tables.
    fn leaf_slot_create(
        &self,
        st: &mut SpaceState,
        sp: &SpaceInner,
        va: u64,
    ) -> Result<(&AtomicU64, u64), PmapError> {
        let frames = self.frames.as_ref().ok_or(PmapError::NoMemory)?;
        let phys = frames.phys();
        let mut table = sp.root;
        for level in self.mode.paging.root().down_to(Level::PD) {
            let slot =
                slot_of(phys, table, va, level).ok_or(PmapError::BadAddress(VirtAddr(va)))?;
            let e = slot.load(Ordering::Acquire);
            if e & PteFlags::PRESENT.bits() != 0 {
                table = e & PG_FRAME;
                continue;
            }
            let Some(pfn) = frames.alloc_zeroed() else {
                let mut flush = PendingFlush::new(sp.root);
                self.prune(st, sp.root, va, &mut flush);
                self.complete(sp, flush);
                return Err(PmapError::NoMemory);
            };
            let child = pfn.phys_addr().as_u64();
            slot.store(child | TABLE_FLAGS.bits(), Ordering::Release);
            self.count_add(table, 1);
            table = child;
        }
        let slot =
            slot_of(phys, table, va, Level::PT).ok_or(PmapError::BadAddress(VirtAddr(va)))?;
        Ok((slot, table))
    }

    /// Unlinks the tables on the path to `va` that hold nothing, bottom
    /// up, retiring their frames into `flush`.
    fn prune(&self, _locked: &mut SpaceState, root: u64, va: u64, flush: &mut PendingFlush) {
        let Some(phys) = self.phys() else { return };
        let mut path = [(0u64, Level::PT); 5];
        let mut table = root;
        let mut depth = 0;
        for level in self.mode.paging.root().down_to(Level::PD) {
            let Some(slot) = slot_of(phys, table, va, level) else {
                return;
            };
            let e = slot.load(Ordering::Acquire);
            if e & PteFlags::PRESENT.bits() == 0 {
                break;
            }
            path[depth] = (table, level);
            depth += 1;
            table = e & PG_FRAME;
        }
        // `table` is the deepest table reached; unlink upwards while empty.
        while depth > 0 && self.count(table) == 0 {
            depth -= 1;
            let (parent, level) = path[depth];
            let slot = slot_of(phys, parent, va, level).expect("walked");
            let old = slot.swap(0, Ordering::AcqRel);
            flush.note(va, old);
            flush.retire_table(table);
            self.count_add(parent, -1);
            table = parent;
        }
    }

    /// Finishes an operation's `flush`: invalidates what it owes, then
    /// frees the table frames it retired, once no software walk of `sp` is
    /// still in them.
    fn complete(&self, sp: &SpaceInner, flush: PendingFlush) {
        let tables = flush.finish(&self.tlb, &self.stats);
        if !tables.is_empty() {
            let _quiet = sp.walk.write();
            for t in tables {
                self.free_table(t);
            }
        }
    }

    fn free_table(&self, table: u64) {
        if let Some(f) = &self.frames {
            let pfn = Pfn::containing(PhysAddr(table));
            // An emptied table is all zeros (every entry was cleared as it
            // was counted out): it goes back to the pool of zeroed frames,
            // so the next table or zero-fill page taken from it is not
            // zeroed on the fault path. Checked, not assumed: one read.
            let zero = self.count(table) == 0 && f.phys().is_zero(pfn);
            // Our own table frame: a refusal would be a bug here, and the
            // frame then stays allocated, which loses nothing.
            // SAFETY: `table` was unlinked from its parent, the flush that
            // retired it has completed (no CPU caches a path through it),
            // and the caller holds the space's walk lock for writing, so no
            // software walker is inside it; nothing refers to it again. For
            // `free_zeroed`, its bytes were just seen to be zero, and no one
            // writes them any more.
            let freed = unsafe {
                if zero {
                    f.free_zeroed(pfn)
                } else {
                    f.free(pfn)
                }
            };
            debug_assert!(freed.is_ok(), "freeing table {table:#x}: {freed:?}");
        }
    }

    /// The valid entries of `table` (kept in its frame's table word).
    fn count(&self, table: u64) -> u64 {
        self.table_word(table)
            .map_or(0, |w| w.load(Ordering::Relaxed))
    }

    /// Changes `table`'s count of valid entries; the space's lock is held.
    fn count_add(&self, table: u64, delta: i64) {
        if let Some(w) = self.table_word(table) {
            let old = w.load(Ordering::Relaxed);
            debug_assert!(old.checked_add_signed(delta).is_some(), "table count");
            w.store(old.wrapping_add_signed(delta), Ordering::Relaxed);
        }
    }

    fn table_word(&self, table: u64) -> Option<&AtomicU64> {
        self.frames
            .as_ref()?
            .table_word(Pfn::containing(PhysAddr(table)))
    }

    /// The table pages of the tree under `table` of `level`, itself
    /// included, deepest first.
    fn tables_under(&self, table: u64, level: Level, out: &mut alloc::vec::Vec<u64>) {
        if let (Some(below), Some(phys)) = (level.below(), self.phys()) {
            for idx in TableIndex::all() {
                let Some(e) =
                    entry_at(phys, PhysAddr(table), idx).map(|s| s.load(Ordering::Acquire))
                else {
                    break;
                };
                if e & PteFlags::PRESENT.bits() != 0 {
                    self.tables_under(e & PG_FRAME, below, out);
                }
            }
        }
        out.push(table);
    }

    /// Table pages `space` uses, the root included.
    #[must_use]
    pub fn table_pages(&self, space: &X86Space) -> usize {
        let Some(_st) = self.lock_space(space) else {
            return 0;
        };
        let mut tables = alloc::vec::Vec::new();
        self.tables_under(space.0.root, self.mode.paging.root(), &mut tables);
        tables.len()
    }

    /// Visits every present 4 KiB leaf in `start..end` under `table` of
    /// `level`; `f` returns whether it cleared the entry. Tables left empty
    /// are freed (their parent entries noted in `flush`).
    #[allow(clippy::too_many_arguments)]
    fn visit(
        &self,
        st: &mut SpaceState,
        table: u64,
        level: Level,
        base: u64,
        start: u64,
        end: u64,
        flush: &mut PendingFlush,
        f: &mut dyn FnMut(&mut SpaceState, u64, &AtomicU64) -> bool,
    ) {
        let Some(phys) = self.phys() else { return };
        let step = level.span();
        let first = ((start.max(base) - base) / step) as usize;
        let last = ((end - 1 - base) / step) as usize;
        for idx in TableIndex::all()
            .skip(first)
            .take(last.saturating_sub(first) + 1)
        {
            let va = base + idx.get() as u64 * step;
            let Some(slot) = entry_at(phys, PhysAddr(table), idx) else {
                return;
            };
            let e = slot.load(Ordering::Acquire);
            if e & PteFlags::PRESENT.bits() == 0 {
                continue;
            }
            let Some(below) = level.below() else {
                if f(st, va, slot) {
                    self.count_add(table, -1);
                }
                continue;
            };
            let child = e & PG_FRAME;
            self.visit(
                st,
                child,
                below,
                va,
                start.max(va),
                end.min(va + step),
                flush,
                f,
            );
            if self.count(child) == 0 {
                let old = slot.swap(0, Ordering::AcqRel);
                flush.note(va, old);
                flush.retire_table(child);
                self.count_add(table, -1);
            }
        }
    }

    /// `pmap_enter` on a slot that already maps the frame: a change of
    /// protection or wiring. What the CPU set (A, M) is kept unless write
    /// permission goes, when M goes to the page instead. The entry is
    /// changed by compare-and-swap, so an A or M the CPU (or the software
    /// MMU, which takes no lock) sets meanwhile is never lost. Returns the
    /// bits to carry into the page, if any.
    #[allow(clippy::too_many_arguments)]
    fn update_same_frame(
        &self,
        st: &mut SpaceState,
        slot: &AtomicU64,
        old: u64,
        new: u64,
        va: u64,
        wired: bool,
        flush: &mut PendingFlush,
    ) -> Option<Displaced> {
        let (prev, updated) = crate::entry::update_same_frame(slot, old, new)?;
        let lost_write =
            prev & PteFlags::WRITABLE.bits() != 0 && updated & PteFlags::WRITABLE.bits() == 0;
        let gained_nx =
            prev & PteFlags::NO_EXECUTE.bits() == 0 && updated & PteFlags::NO_EXECUTE.bits() != 0;
        if lost_write || gained_nx || (prev ^ updated) & CACHE_MASK.bits() != 0 {
            flush.note(va, prev);
        }
        match (prev & PteFlags::WIRED.bits() != 0, wired) {
            (false, true) => st.wired += 1,
            (true, false) => st.wired -= 1,
            _ => {}
        }
        (lost_write && prev & PteFlags::DIRTY.bits() != 0).then(|| displaced(prev))
    }

    /// The space's lock, or `None` once [`destroy_space`](Pmap::destroy_space)
    /// freed its tables: every operation on a destroyed space then does
    /// nothing (or fails), never touching frames that are no longer its.
    fn lock_space<'a>(&self, space: &'a X86Space) -> Option<MutexGuard<'a, SpaceState>> {
        let st = space.0.state.lock();
        (!st.destroyed).then_some(st)
    }

    fn check_va(&self, va: u64) -> Result<(), PmapError> {
        if va >= self.mode.paging.user_end() || va % vm_core::PAGE_SIZE != 0 {
            return Err(PmapError::BadAddress(VirtAddr(va)));
        }
        Ok(())
    }

    /// The leaf entry for a new mapping (FreeBSD `pmap_enter`'s `newpte`).
    fn new_pte(&self, page: PageInfo, prot: Prot, access: Prot, wired: bool) -> u64 {
        let mut f =
            PteFlags::PRESENT | PteFlags::ACCESSED | PteFlags::USER | cache_bits(page.attr, false);
        f.set(
            PteFlags::DIRTY,
            access.contains(Prot::WRITE) && prot.contains(Prot::WRITE),
        );
        f.set(PteFlags::WRITABLE, prot.contains(Prot::WRITE));
        f.set(
            PteFlags::NO_EXECUTE,
            self.mode.nxe && !prot.contains(Prot::EXECUTE),
        );
        f.set(PteFlags::WIRED, wired);
        f.set(PteFlags::MANAGED, page.managed);
        page.pfn.phys_addr().as_u64() | f.bits()
    }

    fn space_by_id(&self, id: u64) -> Option<Arc<SpaceInner>> {
        self.spaces.lock().get(&id).and_then(Weak::upgrade)
    }

    /// Applies `f` to every mapping of `pfn` that still maps it, under its
    /// space's lock. `f` either asks for the mapping's removal (`None`) or
    /// changes the entry with one atomic step and returns the value it
    /// replaced (`Some`), so a bit the CPU set up to that step is seen
    /// and one set after it stays in the entry. Returns the OR of the old
    /// entries' bits.
    fn for_each_mapping(&self, pfn: Pfn, mut f: impl FnMut(&AtomicU64) -> Option<u64>) -> u64 {
        let mut seen = 0;
        for (id, va) in self.pv.list(pfn) {
            let Some(sp) = self.space_by_id(id) else {
                continue;
            };
            let mut st = sp.state.lock();
            if st.destroyed {
                // Its tables are being freed (`destroy_space`).
                continue;
            }
            let Some(slot) = self.leaf_slot(sp.root, va) else {
                continue;
            };
            let old = slot.load(Ordering::Acquire);
            if old & PteFlags::PRESENT.bits() == 0 || old & PG_FRAME != pfn.phys_addr().as_u64() {
                continue;
            }
            let mut flush = PendingFlush::new(sp.root);
            match f(slot) {
                None => {
                    let old = slot.swap(0, Ordering::AcqRel);
                    seen |= old;
                    self.pv.remove(pfn, id, va);
                    st.resident -= 1;
                    if old & PteFlags::WIRED.bits() != 0 {
                        st.wired -= 1;
                    }
                    flush.note(va, old);
                    let table = self.table_of(sp.root, va);
                    if let Some(t) = table {
                        self.count_add(t, -1);
                    }
                    self.prune(&mut st, sp.root, va, &mut flush);
                }
                Some(replaced) => {
                    seen |= replaced;
                    if slot.load(Ordering::Acquire) != replaced {
                        flush.note(va, replaced);
                    }
                }
            }
            self.complete(&sp, flush);
        }
        seen
    }

    /// The leaf table holding `va`'s entry.
    fn table_of(&self, root: u64, va: u64) -> Option<u64> {
        let phys = self.phys()?;
        let mut table = root;
        for level in self.mode.paging.root().down_to(Level::PD) {
            let e = slot_of(phys, table, va, level)?.load(Ordering::Acquire);
            if e & PteFlags::PRESENT.bits() == 0 {
                return None;
            }
            table = e & PG_FRAME;
        }
        Some(table)
    }
}

fn displaced(old: u64) -> Displaced {
    Displaced {
        pfn: Pfn::containing(PhysAddr(old & PG_FRAME)),
        referenced: old & PteFlags::ACCESSED.bits() != 0,
        modified: old & PteFlags::DIRTY.bits() != 0 && old & PteFlags::WRITABLE.bits() != 0,
    }
}

fn refmod(bits: u64) -> RefMod {
    RefMod {
        referenced: bits & PteFlags::ACCESSED.bits() != 0,
        modified: bits & PteFlags::DIRTY.bits() != 0,
    }
}

impl<T: TlbHook + 'static> Pmap for X86Pmap<T> {
    type Space = X86Space;

    fn attach(&mut self, frames: PhysFrames) {
        self.pv = PvTable::new(frames.phys().base_pfn(), frames.phys().frames());
        self.frames = Some(frames);
    }

    fn create_space(&self) -> Result<X86Space, PmapError> {
        let frames = self.frames.as_ref().ok_or(PmapError::NoMemory)?;
        let root = frames
            .alloc_zeroed()
            .ok_or(PmapError::NoMemory)?
            .phys_addr()
            .as_u64();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::new(SpaceInner {
            id,
            root,
            state: Mutex::new(SpaceState {
                resident: 0,
                wired: 0,
                destroyed: false,
            }),
            walk: RwLock::new(false),
        });
        self.spaces.lock().insert(id, Arc::downgrade(&inner));
        Ok(X86Space(inner))
    }

    fn destroy_space(&self, space: &X86Space) {
        let user = VirtAddr(0)..VirtAddr(self.mode.paging.user_end());
        self.remove(space, user, &mut |_| {});
        self.spaces.lock().remove(&space.0.id);
        let Some(mut st) = self.lock_space(space) else {
            return; // destroyed already: its root is not ours to free again
        };
        st.destroyed = true;
        let mut tables = alloc::vec::Vec::new();
        self.tables_under(space.0.root, self.mode.paging.root(), &mut tables);
        debug_assert_eq!(tables.len(), 1, "only the root is left");
        *space.0.walk.write() = true;
        for t in tables {
            self.free_table(t);
        }
    }

    fn enter(
        &self,
        space: &X86Space,
        va: VirtAddr,
        m: Mapping,
    ) -> Result<Option<Displaced>, PmapError> {
        let (va, page, prot, access, wired) = (va.as_u64(), m.page, m.prot, m.access, m.wired);
        self.check_va(va)?;
        let root = space.0.root;
        let mut st = self.lock_space(space).ok_or(PmapError::SpaceDestroyed)?;
        let (slot, table) = self.leaf_slot_create(&mut st, &space.0, va)?;
        let new = self.new_pte(page, prot, access, wired);
        let old = slot.load(Ordering::Acquire);
        let mut flush = PendingFlush::new(root);
        let mut out = None;
        if old & PteFlags::PRESENT.bits() != 0 && old & PG_FRAME == new & PG_FRAME {
            out = self.update_same_frame(&mut st, slot, old, new, va, wired, &mut flush);
        } else {
            if old & PteFlags::PRESENT.bits() != 0 {
                // Another frame: take it out, carrying its A/M to its page,
                // and invalidate before the new entry can be used (modern
                // FreeBSD's order), so no CPU mixes the two.
                let prev = slot.swap(0, Ordering::AcqRel);
                flush.note(va, prev);
                if prev & PteFlags::MANAGED.bits() != 0 {
                    self.pv
                        .remove(Pfn::containing(PhysAddr(prev & PG_FRAME)), space.0.id, va);
                    out = Some(displaced(prev));
                }
                if prev & PteFlags::WIRED.bits() != 0 {
                    st.wired -= 1;
                }
                st.resident -= 1;
                self.count_add(table, -1);
                let owed = core::mem::replace(&mut flush, PendingFlush::new(root));
                self.complete(&space.0, owed);
            }
            if page.managed {
                self.pv.add(page.pfn, space.0.id, va);
            }
            slot.store(new, Ordering::Release);
            self.count_add(table, 1);
            st.resident += 1;
            if wired {
                st.wired += 1;
            }
        }
        self.complete(&space.0, flush);
        Ok(out)
    }

    fn enter_quick(&self, space: &X86Space, va: VirtAddr, page: PageInfo, prot: Prot) -> bool {
        self.enter_quick_run(space, va, &[Some(page)], prot) == 1
    }

    /// One lock hold and one walk per leaf table the run crosses (FreeBSD
    /// `pmap_enter_object`).
    fn enter_quick_run(
        &self,
        space: &X86Space,
        start: VirtAddr,
        pages: &[Option<PageInfo>],
        prot: Prot,
    ) -> usize {
        let (Some(phys), Some(mut st)) = (self.phys(), self.lock_space(space)) else {
            return 0;
        };
        // FreeBSD `pmap_enter_quick_locked`: V, cache bits, MANAGED, NX, U;
        // never A, M or RW.
        let mut base = PteFlags::PRESENT | PteFlags::USER;
        base.set(
            PteFlags::NO_EXECUTE,
            self.mode.nxe && !prot.contains(Prot::EXECUTE),
        );
        let mut table = None;
        let mut mapped = 0;
        for (i, page) in (0u64..).zip(pages) {
            let Some(va) = i
                .checked_mul(vm_core::PAGE_SIZE)
                .and_then(|o| start.as_u64().checked_add(o))
            else {
                break;
            };
            if va & (Level::PD.span() - 1) == 0 {
                table = None; // the run enters the next leaf table
            }
            let Some(page) = page else { continue };
            if self.check_va(va).is_err() {
                break;
            }
            let t = match table {
                Some(t) => t,
                None => match self.leaf_slot_create(&mut st, &space.0, va) {
                    Ok((_, t)) => *table.insert(t),
                    Err(_) => break,
                },
            };
            let Some(slot) = slot_of(phys, t, va, Level::PT) else {
                break;
            };
            if slot.load(Ordering::Acquire) & PteFlags::PRESENT.bits() != 0 {
                continue;
            }
            let mut f = base | cache_bits(page.attr, false);
            f.set(PteFlags::MANAGED, page.managed);
            if page.managed {
                self.pv.add(page.pfn, space.0.id, va);
            }
            slot.store(page.pfn.phys_addr().as_u64() | f.bits(), Ordering::Release);
            self.count_add(t, 1);
            st.resident += 1;
            mapped += 1;
        }
        mapped
    }

    fn remove(&self, space: &X86Space, range: Range<VirtAddr>, sink: &mut DisplacedSink<'_>) {
        let (start, end) = (range.start.as_u64(), range.end.as_u64());
        let end = end.min(self.mode.paging.user_end());
        if start >= end {
            return;
        }
        let root = space.0.root;
        let id = space.0.id;
        let Some(mut st) = self.lock_space(space) else {
            return;
        };
        let mut flush = PendingFlush::new(root);
        let top = self.mode.paging.root();
        let mut noted = alloc::vec::Vec::new();
        self.visit(
            &mut st,
            root,
            top,
            0,
            start,
            end,
            &mut flush,
            &mut |st, va, slot| {
                let old = slot.swap(0, Ordering::AcqRel);
                st.resident -= 1;
                if old & PteFlags::WIRED.bits() != 0 {
                    st.wired -= 1;
                }
                noted.push((va, old));
                true
            },
        );
        for (va, old) in noted {
            flush.note(va, old);
            if old & PteFlags::MANAGED.bits() != 0 {
                self.pv
                    .remove(Pfn::containing(PhysAddr(old & PG_FRAME)), id, va);
                sink(displaced(old));
            }
        }
        self.complete(&space.0, flush);
    }

    fn protect(
        &self,
        space: &X86Space,
        range: Range<VirtAddr>,
        prot: Prot,
        sink: &mut DisplacedSink<'_>,
    ) {
        let (start, end) = (range.start.as_u64(), range.end.as_u64());
        if !prot.contains(Prot::READ) {
            return self.remove(space, range, sink);
        }
        let end = end.min(self.mode.paging.user_end());
        if start >= end {
            return;
        }
        let root = space.0.root;
        let Some(mut st) = self.lock_space(space) else {
            return;
        };
        let mut flush = PendingFlush::new(root);
        let top = self.mode.paging.root();
        let mut changed = alloc::vec::Vec::new();
        let nx = self.mode.nxe && !prot.contains(Prot::EXECUTE);
        self.visit(
            &mut st,
            root,
            top,
            0,
            start,
            end,
            &mut flush,
            &mut |_, va, slot| {
                let mut cur = slot.load(Ordering::Acquire);
                loop {
                    let mut new = cur;
                    if !prot.contains(Prot::WRITE) {
                        new &= !(PteFlags::WRITABLE.bits() | PteFlags::DIRTY.bits());
                    }
                    if nx {
                        new |= PteFlags::NO_EXECUTE.bits();
                    }
                    if new == cur {
                        break;
                    }
                    match slot.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => {
                            changed.push((va, cur));
                            break;
                        }
                        Err(now) => cur = now,
                    }
                }
                false
            },
        );
        for (va, old) in changed {
            flush.note(va, old);
            let lost_write = old & PteFlags::WRITABLE.bits() != 0 && !prot.contains(Prot::WRITE);
            if lost_write
                && old & PteFlags::MANAGED.bits() != 0
                && old & PteFlags::DIRTY.bits() != 0
            {
                sink(displaced(old));
            }
        }
        self.complete(&space.0, flush);
    }

    fn extract(&self, space: &X86Space, va: VirtAddr) -> Option<Pfn> {
        let va = va.as_u64();
        let e = self.pte(space, va)?;
        (e & PteFlags::PRESENT.bits() != 0).then(|| Pfn::containing(PhysAddr(e & PG_FRAME)))
    }

    fn is_prefaultable(&self, space: &X86Space, va: VirtAddr) -> bool {
        let va = va.as_u64();
        // The page directory entry exists and is not a superpage, and the
        // PTE is empty (FreeBSD `pmap_is_prefaultable`).
        // A hint, read without the space lock (entries are atomics and
        // table frames stay inside physical memory even if freed
        // meanwhile): enter_quick checks again under the lock and never
        // replaces anything.
        self.check_va(va).is_ok()
            && self
                .leaf_slot(space.0.root, va)
                .is_some_and(|s| s.load(Ordering::Acquire) & PteFlags::PRESENT.bits() == 0)
    }

    fn change_wiring(&self, space: &X86Space, va: VirtAddr, wired: bool) {
        let va = va.as_u64();
        let Some(mut st) = self.lock_space(space) else {
            return;
        };
        let Some(slot) = self.leaf_slot(space.0.root, va) else {
            return;
        };
        let old = slot.load(Ordering::Acquire);
        if old & PteFlags::PRESENT.bits() == 0 || (old & PteFlags::WIRED.bits() != 0) == wired {
            return;
        }
        if wired {
            slot.fetch_or(PteFlags::WIRED.bits(), Ordering::AcqRel);
            st.wired += 1;
        } else {
            slot.fetch_and(!PteFlags::WIRED.bits(), Ordering::AcqRel);
            st.wired -= 1;
        }
    }

    fn translate(&self, space: &X86Space, va: VirtAddr, access: Prot) -> Option<Pfn> {
        let va = va.as_u64();
        let a = Access {
            write: access.contains(Prot::WRITE),
            exec: access.contains(Prot::EXECUTE),
            user: true,
        };
        self.translate_access(space, va, a)
            .ok()
            .map(|t| Pfn::containing(t.pa))
    }

    fn remove_all(&self, pfn: Pfn) -> RefMod {
        refmod(self.for_each_mapping(pfn, |_| None))
    }

    fn page_protect(&self, pfn: Pfn, prot: Prot) -> RefMod {
        if !prot.contains(Prot::READ) {
            return self.remove_all(pfn);
        }
        if prot.contains(Prot::WRITE) {
            return RefMod::default();
        }
        // The M bit is taken in the same atomic step that takes write away:
        // a CPU write either happened before (and is reported) or faults.
        refmod(self.for_each_mapping(pfn, |slot| {
            Some(slot.fetch_and(
                !(PteFlags::WRITABLE.bits() | PteFlags::DIRTY.bits()),
                Ordering::AcqRel,
            ))
        }))
    }

    fn is_modified(&self, pfn: Pfn) -> bool {
        let mut any = false;
        self.for_each_mapping(pfn, |slot| {
            let e = slot.load(Ordering::Acquire);
            any |= e & PteFlags::DIRTY.bits() != 0 && e & PteFlags::WRITABLE.bits() != 0;
            Some(e)
        });
        any
    }

    fn clear_modify(&self, pfn: Pfn) {
        self.for_each_mapping(pfn, |slot| {
            Some(slot.fetch_and(!PteFlags::DIRTY.bits(), Ordering::AcqRel))
        });
    }

    fn ts_referenced(&self, pfn: Pfn) -> u32 {
        let mut n = 0;
        self.for_each_mapping(pfn, |slot| {
            if n < 5 {
                let old = slot.fetch_and(!PteFlags::ACCESSED.bits(), Ordering::AcqRel);
                if old & PteFlags::ACCESSED.bits() != 0 {
                    n += 1;
                }
                Some(old)
            } else {
                Some(slot.load(Ordering::Acquire))
            }
        });
        n
    }

    fn mapping_count(&self, pfn: Pfn) -> usize {
        self.pv.count(pfn)
    }
}
