//! [`X86Pmap`]: vm-core's [`Pmap`] on real x86_64 page tables.
//!
//! Tables are frames of the machine's physical memory, laid out as the CPU
//! reads them; a space's root is a physical address to load into CR3.
//!
//! # Locking protocol
//!
//! Three locks, always taken in this order:
//!
//! 1. **The space's table-tree lock** (`SpaceInner::tables`, a
//!    [`ShardedRwLock`]: a reader writes only its own thread's shard).
//!    *Shared* by everything that adds or changes entries or walks the
//!    tree without freeing tables: `enter`, `enter_quick_run`,
//!    `change_wiring`, the per-page pv operations, the software MMU, `pte`
//!    and `table_pages`. *Exclusive* for whatever unlinks, replaces or
//!    frees table frames: `remove`, `protect`, `destroy_space`, pruning
//!    emptied tables, a superpage's promotion and demotion, and a
//!    superpage entered whole (see `superpage`; a shared holder that
//!    meets a superpage where it needs a 4 KiB entry lets go, demotes
//!    under the exclusive lock, and starts again). So no table a shared
//!    holder reached is freed or replaced under it, and a freed frame is
//!    never written through a stale path.
//! 2. **The leaf table's lock** (bit 63 of the table frame's word, see
//!    `ptlock`; Linux's split PTE locks). Guards the table's leaf entries
//!    against other pmap writers and its count of valid entries. Upper
//!    tables are made without it: a missing table is installed by
//!    compare-and-swap on the parent entry, and the loser frees its unused
//!    frame. Exclusive holders of (1) need no table lock: nobody else is
//!    inside.
//! 3. **A frame's pv list lock** (`PvTable`), held only inside its own
//!    calls.
//!
//! The CPU and the software MMU take none of these: they set A and D bits
//! with atomic operations, and every pmap change of an entry is one atomic
//! step that keeps or reports them. Per-page operations (`remove_all` and
//! friends) read the pv list, drop its lock, and take each space's locks in
//! turn, checking that the mapping is still the one they saw; a leaf table
//! they empty is pruned afterwards under the exclusive lock. Resident and
//! wired counts are split per thread ([`ShardedCount`]), so two faults in
//! one space on different leaf tables share no written cache line here.

use crate::entry::{EntryCell, PG_FRAME, PG_PS_FRAME, PteFlags};
use crate::mmu::{self, Access, CpuMode};
use crate::paging::{Level, PagingMode, TableIndex, index};
use crate::pat::{CACHE_MASK, cache_bits};
use crate::ptlock::{TableLock, count_of};
use crate::pv::PvTable;
use crate::superpage::{self, SUPERPAGE, SuperpageStats};
use crate::tables::{entry_at, table_at};
use crate::tlb::{NoTlb, PendingFlush, TlbHook, TlbStats};
use alloc::sync::{Arc, Weak};
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};
use hashbrown::HashMap;
use vm_core::pmap::{
    Displaced, DisplacedSink, Mapping, PageInfo, PhysFrames, Pmap, PmapError, RefMod,
};
use vm_core::sync::{Mutex, ShardedCount, ShardedReadGuard, ShardedRwLock, ShardedWriteGuard};
use vm_core::{Pfn, PhysMem, Prot};
use vm_core::{PhysAddr, VirtAddr};

/// Attempts a deferred promotion gets (see `SpaceInner::promote_later`).
const PROMOTE_TRIES: u64 = 8;

/// Flags of a table (non-leaf) entry for user space, as FreeBSD's
/// `_pmap_allocpte` makes them.
const TABLE_FLAGS: PteFlags = PteFlags::PRESENT
    .union(PteFlags::WRITABLE)
    .union(PteFlags::USER)
    .union(PteFlags::ACCESSED)
    .union(PteFlags::DIRTY);

/// One space's tables and statistics. Each table's count of valid entries
/// (and a leaf table's lock) lives in its frame's table word
/// ([`PhysFrames::table_word`]).
struct SpaceInner {
    id: u64,
    root: u64,
    /// The table-tree lock (see the module's locking protocol) and what
    /// only its exclusive holders change.
    tables: ShardedRwLock<Tree>,
    /// Mapped pages (`pm_stats.resident_count`).
    resident: ShardedCount,
    /// Wired mappings (`pm_stats.wired_count`).
    wired: ShardedCount,
    /// A full table whose promotion found the table-tree lock in use: its
    /// 2 MiB-aligned address | the attempts made so far (0: none). Later
    /// `enter`s in the space try again, a few times at most.
    promote_later: AtomicU64,
}

/// What the table-tree lock guards besides the tree itself.
#[derive(Default)]
struct Tree {
    /// `destroy_space` freed the tables: every operation then leaves the
    /// space alone, and a software walk stops at once.
    destroyed: bool,
    /// The leaf table each superpage replaced, by the superpage's address,
    /// kept for its demotion (FreeBSD keeps it in the pmap's radix tree):
    /// demotion then needs no memory and cannot fail.
    spare: HashMap<u64, u64>,
}

/// What a walk to a leaf entry found on its way.
enum Walk<'a> {
    /// The 4 KiB entry's slot and its leaf table.
    Leaf(&'a AtomicU64, u64),
    /// A 2 MiB entry maps the address.
    Superpage,
    /// No table reaches the address (or a walk that creates tables
    /// failed with this error).
    Missing(Option<PmapError>),
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
        self.0.resident.get()
    }

    /// Wired mappings (`pm_stats.wired_count`).
    #[must_use]
    pub fn wired_count(&self) -> u64 {
        self.0.wired.get()
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
    superpages: bool,
    superpage_stats: SuperpageStats,
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
            superpages: true,
            superpage_stats: SuperpageStats::default(),
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

    /// The raw value of the leaf entry for `va`, if the tables reach it:
    /// a 4 KiB entry, or the 2 MiB entry (with [`PteFlags::HUGE`]) of a
    /// superpage.
    pub fn pte(&self, space: &X86Space, va: impl Into<VirtAddr>) -> Option<u64> {
        let _g = self.share(&space.0)?;
        self.leaf(space.0.root, va.into().as_u64()).map(|(e, _)| e)
    }

    /// The raw leaf entry for `va` and its level: [`Level::PT`] for a
    /// 4 KiB entry, [`Level::PD`] for a superpage's 2 MiB entry. Unlike
    /// [`pte`](Self::pte) this tells the two apart: bit 7 is PAT in the
    /// one and PS in the other.
    ///
    /// ```
    /// use vm_core::{Prot, Vm, VmConfig};
    /// use vm_pmap_x86_64::{X86Pmap, paging::Level};
    ///
    /// let config = VmConfig { memory_bytes: 16 << 20, ..VmConfig::default() };
    /// let vm = Vm::new(X86Pmap::new(), config).unwrap();
    /// let space = vm.new_space().unwrap();
    /// space.map_anon(0x40_0000, 4096, Prot::RW).unwrap();
    /// space.write_u8(0x40_0000, 1).unwrap();
    /// let (entry, level) = vm.pmap().leaf_entry(space.pmap_space(), 0x40_0000u64).unwrap();
    /// assert_eq!((entry & 0b11, level), (0b11, Level::PT)); // present, writable
    /// assert!(vm.pmap().leaf_entry(space.pmap_space(), 0x80_0000u64).is_none());
    /// ```
    pub fn leaf_entry(&self, space: &X86Space, va: impl Into<VirtAddr>) -> Option<(u64, Level)> {
        let _g = self.share(&space.0)?;
        self.leaf(space.0.root, va.into().as_u64())
    }

    /// The leaf entry for `va` and its level (PT, or PD for a superpage).
    /// The caller holds the table-tree lock.
    fn leaf(&self, root: u64, va: u64) -> Option<(u64, Level)> {
        match self.table_of(root, va) {
            Walk::Leaf(slot, _) => Some((slot.load(Ordering::Acquire), Level::PT)),
            Walk::Superpage => Some((self.pd_slot(root, va)?.load(Ordering::Acquire), Level::PD)),
            Walk::Missing(_) => None,
        }
    }

    /// Whether the superpage mapping `va` maps it exactly as the 4 KiB
    /// entry `new` would (A and M aside: a superpage has both, or A alone
    /// if read-only). The caller holds the table-tree lock.
    fn superpage_maps(&self, root: u64, va: u64, new: u64) -> bool {
        self.pd_slot(root, va).is_some_and(|pd| {
            let cur = superpage::pte_of(
                pd.load(Ordering::Acquire),
                index(VirtAddr(va), Level::PT).get(),
            );
            (cur ^ new) & !crate::entry::HW_BITS == 0
        })
    }

    /// Whether a mapping of `pfn` at `va` in space `id` is dirty, read
    /// without demoting a superpage (FreeBSD's `pmap_is_modified` reads a
    /// 2 MiB mapping's M bit the same way).
    fn maps_dirty(&self, id: u64, va: u64, pfn: Pfn) -> bool {
        let Some(sp) = self.space_by_id(id) else {
            return false;
        };
        let Some(_g) = self.share(&sp) else {
            return false;
        };
        let dirty = PteFlags::DIRTY.bits() | PteFlags::WRITABLE.bits();
        self.leaf(sp.root, va).is_some_and(|(e, level)| {
            e & PteFlags::PRESENT.bits() != 0
                && leaf_frame(e, level, va) == pfn.phys_addr().as_u64()
                && e & dirty == dirty
        })
    }

    /// `ts_referenced` for the mapping of `pfn` at `va` by the superpage
    /// whose 2 MiB entry is `pd` (the table-tree lock held shared, under
    /// which only a CPU's A changes it): whether the entry has A, which is
    /// cleared (when `count`ing) only if `pfn` is the one page of the 512
    /// that a hash of frame, superpage and space picks, and the entry is
    /// not wired (FreeBSD `pmap_ts_referenced`: the bit is shared by 512
    /// pages, and clearing it at every test would make the whole superpage
    /// look unused after one page was asked).
    fn superpage_referenced(
        &self,
        sp: &SpaceInner,
        pd: &AtomicU64,
        va: u64,
        pfn: Pfn,
        count: bool,
    ) -> bool {
        let e = pd.load(Ordering::Acquire);
        let a = PteFlags::ACCESSED.bits();
        if leaf_frame(e, Level::PD, va) != pfn.phys_addr().as_u64() || e & a == 0 || !count {
            return false;
        }
        if superpage::clears_reference(pfn.0, va, sp.id) && e & PteFlags::WIRED.bits() == 0 {
            let old = pd.fetch_and(!a, Ordering::AcqRel);
            let mut flush = PendingFlush::new(sp.root);
            flush.note(va & !(SUPERPAGE - 1), old);
            self.complete(flush);
        }
        true
    }

    /// Superpage promotions and demotions so far.
    pub fn superpage_stats(&self) -> &SuperpageStats {
        &self.superpage_stats
    }

    /// Turns promotion to 2 MiB superpages on or off (FreeBSD's
    /// `vm.pmap.pg_ps_enabled`; on by default). Superpages made while it
    /// was on are demoted as usual when an operation needs it.
    #[must_use]
    pub fn with_superpages(mut self, on: bool) -> Self {
        self.superpages = on;
        self
    }

    /// Restores a leaf entry to a value read earlier with [`pte`](Self::pte)
    /// (the KVM oracle undoes its predictions this way).
    #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
    pub(crate) fn set_pte_for_oracle(&self, space: &X86Space, va: u64, value: u64) {
        let Some(_g) = self.share(&space.0) else {
            return;
        };
        let Walk::Leaf(slot, table) = self.table_of(space.0.root, va) else {
            return;
        };
        if let Some(_l) = self.table_lock(table) {
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
        let walking = space.0.tables.read();
        if walking.destroyed {
            return Err(mmu::Fault::BadPhysical(root));
        }
        mmu::translate(phys, &self.mode, root, va.into(), access)
    }

    /// The slot of the page-directory entry for `va`, if the tables
    /// reach it. The caller holds the table-tree lock.
    fn pd_slot(&self, root: u64, va: u64) -> Option<&AtomicU64> {
        let phys = self.phys()?;
        let mut table = root;
        for level in self.mode.paging.root().down_to(Level::PDPT) {
            let e = slot_of(phys, table, va, level)?.load(Ordering::Acquire);
            if e & PteFlags::PRESENT.bits() == 0 {
                return None;
            }
            table = e & PG_FRAME;
        }
        slot_of(phys, table, va, Level::PD)
    }

    /// The slot of the leaf for `va` and its table, making missing tables;
    /// the caller holds the table-tree lock (shared will do). A table
    /// is installed by compare-and-swap: if another thread installed one
    /// first, ours (never seen) goes back and theirs is used. On failure the
    /// tables made so far stay, empty, for [`prune_path`](Self::prune_path).
    /// A superpage on the way is reported, not entered: the caller
    /// demotes it first.
    fn leaf_slot_create(&self, sp: &SpaceInner, va: u64) -> Walk<'_> {
        let table = match self.table_create(sp, va, Level::PD) {
            Ok(table) => table,
            Err(walk) => return walk,
        };
        match self
            .phys()
            .and_then(|phys| slot_of(phys, table, va, Level::PT))
        {
            Some(slot) => Walk::Leaf(slot, table),
            None => Walk::Missing(Some(PmapError::BadAddress(VirtAddr(va)))),
        }
    }

    /// The table below `last` on the way to `va` (the leaf table for
    /// `Level::PD`, the page directory for `Level::PDPT`), making missing
    /// tables down to it as [`leaf_slot_create`](Self::leaf_slot_create)
    /// does; a superpage on the way is reported as `Walk::Superpage`.
    fn table_create(&self, sp: &SpaceInner, va: u64, last: Level) -> Result<u64, Walk<'_>> {
        let Some(frames) = self.frames.as_ref() else {
            return Err(Walk::Missing(Some(PmapError::NoMemory)));
        };
        let phys = frames.phys();
        let mut table = sp.root;
        let bad = Walk::Missing(Some(PmapError::BadAddress(VirtAddr(va))));
        for level in self.mode.paging.root().down_to(last) {
            let Some(slot) = slot_of(phys, table, va, level) else {
                return Err(bad);
            };
            let e = slot.load(Ordering::Acquire);
            if level == Level::PD && superpage::is_superpage(e) {
                return Err(Walk::Superpage);
            }
            if e & PteFlags::PRESENT.bits() != 0 {
                table = e & PG_FRAME;
                continue;
            }
            let Some(pfn) = frames.alloc_zeroed() else {
                return Err(Walk::Missing(Some(PmapError::NoMemory)));
            };
            let child = pfn.phys_addr().as_u64();
            // Checked under loom: `ptlock`'s `loom_racing_table_installs_link_one_table`.
            match EntryCell::compare_exchange(slot, e, child | TABLE_FLAGS.bits()) {
                Ok(_) => {
                    self.count_add(table, 1);
                    table = child;
                }
                Err(theirs) => {
                    // SAFETY: `pfn` came from `alloc_zeroed` just now and
                    // was never linked, so no walker can reach it, and it
                    // is still all zeros.
                    let freed = unsafe { frames.free_zeroed(pfn) };
                    debug_assert!(freed.is_ok(), "unused table {child:#x}: {freed:?}");
                    // Theirs is a table: a superpage replaces only a
                    // full table, under the exclusive lock we exclude.
                    table = theirs & PG_FRAME;
                }
            }
        }
        Ok(table)
    }

    /// Unlinks the tables on the path to `va` that hold nothing, bottom
    /// up, retiring their frames into `flush`. `_exclusive` is the
    /// table-tree lock, held exclusive.
    fn prune(&self, _exclusive: &mut Tree, root: u64, va: u64, flush: &mut PendingFlush) {
        let Some(phys) = self.phys() else { return };
        let mut path = [(0u64, Level::PT); 5];
        let mut table = root;
        let mut depth = 0;
        for level in self.mode.paging.root().down_to(Level::PD) {
            let Some(slot) = slot_of(phys, table, va, level) else {
                return;
            };
            let e = slot.load(Ordering::Acquire);
            if e & PteFlags::PRESENT.bits() == 0
                || (level == Level::PD && e & PteFlags::HUGE.bits() != 0)
            {
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
    /// frees the table frames it retired. A flush that retired tables
    /// comes from an exclusive holder of the table-tree lock, so no walker
    /// (pmap or software MMU) is in them.
    fn complete(&self, flush: PendingFlush) {
        for t in flush.finish(&self.tlb, &self.stats) {
            self.free_table(t);
        }
    }

    /// Prunes the emptied tables on the path to `va` under the exclusive
    /// table-tree lock (after a failed table allocation, or a per-page
    /// removal that emptied a leaf table under the shared lock).
    fn prune_path(&self, sp: &SpaceInner, va: u64) {
        let Some(mut x) = self.exclusive(sp) else {
            return;
        };
        let mut flush = PendingFlush::new(sp.root);
        self.prune(&mut x, sp.root, va, &mut flush);
        self.complete(flush);
    }

    /// The table-tree lock, shared, or `None` once the space is destroyed.
    fn share<'a>(&self, sp: &'a SpaceInner) -> Option<ShardedReadGuard<'a, Tree>> {
        let g = sp.tables.read();
        (!g.destroyed).then_some(g)
    }

    /// The table-tree lock, exclusive, or `None` once the space is
    /// destroyed: every operation on a destroyed space then does nothing
    /// (or fails), never touching frames that are no longer its.
    fn exclusive<'a>(&self, sp: &'a SpaceInner) -> Option<ShardedWriteGuard<'a, Tree>> {
        let g = sp.tables.write();
        (!g.destroyed).then_some(g)
    }

    /// The lock of the leaf table at `table` (see `ptlock`).
    fn table_lock(&self, table: u64) -> Option<TableLock<'_>> {
        self.table_word(table).map(TableLock::lock)
    }

    fn free_table(&self, table: u64) {
        if let Some(f) = &self.frames {
            let pfn = Pfn::containing(PhysAddr(table));
            // An emptied table is all zeros: an entry is counted in when it
            // is written non-zero and cleared to zero as it is counted out
            // (the CPU sets A/D only in present entries). So it goes back
            // to the pool of zeroed frames, and the next table or
            // zero-fill page taken from it is not zeroed on the fault path
            // (FreeBSD's amd64 pmap frees unwired page-table pages with
            // `PG_ZERO` the same way). Trusted, not re-read: reading a
            // cold 4 KiB frame was a quarter of an unmap; debug builds
            // check it (here and in `PhysFrames::free_zeroed`).
            let zero = self.count(table) == 0;
            debug_assert!(
                !zero || f.phys().is_zero(pfn),
                "an emptied table is not zero"
            );
            // Our own table frame: a refusal would be a bug here, and the
            // frame then stays allocated, which loses nothing.
            // SAFETY: `table` was unlinked from its parent, the flush that
            // retired it has completed (no CPU caches a path through it),
            // and the caller holds the space's table-tree lock exclusive,
            // so no pmap or software walker is inside it; nothing refers to
            // it again. For
            // `free_zeroed`, its bytes are zero (above), and no one writes
            // them any more.
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
            .map_or(0, |w| count_of(w.load(Ordering::Relaxed)))
    }

    /// Changes `table`'s count of valid entries: under the leaf table's
    /// lock, or for an upper table by whoever installed or unlinked a child
    /// (atomic: children of one table are installed concurrently).
    fn count_add(&self, table: u64, delta: i64) {
        if let Some(w) = self.table_word(table) {
            let old = w.fetch_add(delta as u64, Ordering::Relaxed);
            debug_assert!(
                count_of(old).checked_add_signed(delta).is_some(),
                "table count"
            );
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
                let huge = level == Level::PD && e & PteFlags::HUGE.bits() != 0;
                if e & PteFlags::PRESENT.bits() != 0 && !huge {
                    self.tables_under(e & PG_FRAME, below, out);
                }
            }
        }
        out.push(table);
    }

    /// Table pages `space` uses, the root and the tables kept for
    /// superpages' demotion included.
    #[must_use]
    pub fn table_pages(&self, space: &X86Space) -> usize {
        let Some(g) = self.share(&space.0) else {
            return 0;
        };
        let mut tables = alloc::vec::Vec::new();
        self.tables_under(space.0.root, self.mode.paging.root(), &mut tables);
        tables.len() + g.spare.len()
    }

    /// Visits every present leaf in `start..end` under `table` of
    /// `level`: `f` gets each 4 KiB entry (`Level::PT`) and each superpage
    /// wholly inside the range (`Level::PD`: changed or removed as one
    /// entry, FreeBSD `pmap_protect_pde` and `pmap_remove_pde`), and
    /// returns whether it cleared the entry; a superpage the range covers
    /// in part is demoted first. Tables left empty are freed (their parent
    /// entries noted in `flush`), and so is a removed superpage's kept
    /// table. The caller holds the table-tree lock exclusive (`tree`).
    #[allow(clippy::too_many_arguments)]
    fn visit(
        &self,
        tree: &mut Tree,
        table: u64,
        level: Level,
        base: u64,
        start: u64,
        end: u64,
        flush: &mut PendingFlush,
        f: &mut dyn FnMut(u64, &AtomicU64, Level) -> bool,
    ) {
        let Some(phys) = self.phys() else { return };
        let step = level.span();
        let first = ((start.max(base) - base) / step) as usize;
        let last = ((end - 1 - base) / step) as usize;
        // A table the range covers whole holds `count` valid entries: once
        // that many are seen the rest are empty, so taking down a sparse
        // space costs what it maps, not 512 loads per table.
        let mut left = if first == 0 && last == crate::paging::ENTRIES - 1 {
            self.count(table)
        } else {
            u64::MAX
        };
        for idx in TableIndex::all()
            .skip(first)
            .take(last.saturating_sub(first) + 1)
        {
            if left == 0 {
                debug_assert!(
                    self.empty_from(table, idx),
                    "table {table:#x} holds more than its count"
                );
                return;
            }
            let va = base + idx.get() as u64 * step;
            let Some(slot) = entry_at(phys, PhysAddr(table), idx) else {
                return;
            };
            let mut e = slot.load(Ordering::Acquire);
            if e & PteFlags::PRESENT.bits() == 0 {
                continue;
            }
            left -= 1;
            if level == Level::PD && superpage::is_superpage(e) {
                if start <= va && va + step <= end {
                    if f(va, slot, level) {
                        self.superpage_stats
                            .removals
                            .fetch_add(1, Ordering::Relaxed);
                        let kept = tree.spare.remove(&va);
                        debug_assert!(kept.is_some(), "superpage {va:#x} without its table");
                        if let Some(t) = kept {
                            flush.retire_table(t);
                        }
                        self.count_add(table, -1);
                    }
                    continue;
                }
                // In part: the 4 KiB entries carry each page's removal or
                // change.
                match self.demote(tree, slot, va, flush) {
                    Some(table) => e = table,
                    None => continue,
                }
            }
            let Some(below) = level.below() else {
                if f(va, slot, level) {
                    self.count_add(table, -1);
                }
                continue;
            };
            let child = e & PG_FRAME;
            self.visit(
                tree,
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

    /// Whether no entry of `table` from `idx` on is valid (a check of the
    /// entry counts `visit` trusts).
    fn empty_from(&self, table: u64, idx: TableIndex) -> bool {
        let Some(phys) = self.phys() else { return true };
        TableIndex::all().skip(idx.get()).all(|i| {
            entry_at(phys, PhysAddr(table), i)
                .is_none_or(|slot| slot.load(Ordering::Relaxed) & PteFlags::PRESENT.bits() == 0)
        })
    }

    /// `remove` of `start..end` under the table-tree lock held exclusive
    /// (`tree`).
    fn remove_locked(
        &self,
        tree: &mut Tree,
        sp: &SpaceInner,
        start: u64,
        end: u64,
        sink: &mut DisplacedSink<'_>,
    ) {
        let mut flush = PendingFlush::new(sp.root);
        let top = self.mode.paging.root();
        let mut noted = alloc::vec::Vec::new();
        let (mut resident, mut wired) = (0, 0);
        self.visit(
            tree,
            sp.root,
            top,
            0,
            start,
            end,
            &mut flush,
            &mut |va, slot, level| {
                let old = slot.swap(0, Ordering::AcqRel);
                for (va, old) in superpage::leaves(va, old, level) {
                    resident += 1;
                    if old & PteFlags::WIRED.bits() != 0 {
                        wired += 1;
                    }
                    noted.push((va, old));
                }
                true
            },
        );
        sp.resident.add(-resident);
        sp.wired.add(-wired);
        for (va, old) in noted {
            flush.note(va, old);
            if old & PteFlags::MANAGED.bits() != 0 {
                self.pv
                    .remove(Pfn::containing(PhysAddr(old & PG_FRAME)), sp.id, va);
                sink(displaced(old));
            }
        }
        self.complete(flush);
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
        sp: &SpaceInner,
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
            (false, true) => sp.wired.add(1),
            (true, false) => sp.wired.add(-1),
            _ => {}
        }
        (lost_write && prev & PteFlags::DIRTY.bits() != 0).then(|| displaced(prev))
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
    /// leaf table's lock. `f` either asks for the mapping's removal
    /// (`None`) or changes the entry with one atomic step and returns the
    /// value it replaced (`Some`), so a bit the CPU set up to that step is
    /// seen and one set after it stays in the entry. Returns the OR of the
    /// old entries' bits.
    fn for_each_mapping(&self, pfn: Pfn, mut f: impl FnMut(&AtomicU64) -> Option<u64>) -> u64 {
        let mut seen = 0;
        for (id, va) in self.pv.list(pfn) {
            let Some(sp) = self.space_by_id(id) else {
                continue;
            };
            let (bits, emptied) = self.on_mapping(&sp, va, pfn, &mut f, |_| false);
            seen |= bits;
            if emptied {
                self.prune_path(&sp, va);
            }
        }
        seen
    }

    /// [`for_each_mapping`](Self::for_each_mapping) for one pv entry:
    /// the OR of the old entry's bits, and whether its leaf table is left
    /// empty. A superpage mapping `va` is offered to `at_superpage` first
    /// (see [`leaf_locked_or`](Self::leaf_locked_or)).
    fn on_mapping(
        &self,
        sp: &SpaceInner,
        va: u64,
        pfn: Pfn,
        f: &mut impl FnMut(&AtomicU64) -> Option<u64>,
        at_superpage: impl FnMut(&AtomicU64) -> bool,
    ) -> (u64, bool) {
        let Some((_g, slot, locked)) = self.leaf_locked_or(sp, va, at_superpage) else {
            return (0, false);
        };
        let old = slot.load(Ordering::Acquire);
        if old & PteFlags::PRESENT.bits() == 0 || old & PG_FRAME != pfn.phys_addr().as_u64() {
            return (0, false);
        }
        let mut flush = PendingFlush::new(sp.root);
        let (seen, emptied) = match f(slot) {
            None => {
                let old = slot.swap(0, Ordering::AcqRel);
                self.pv.remove(pfn, sp.id, va);
                sp.resident.add(-1);
                if old & PteFlags::WIRED.bits() != 0 {
                    sp.wired.add(-1);
                }
                flush.note(va, old);
                locked.count_add(-1);
                (old, locked.count() == 0)
            }
            Some(replaced) => {
                if slot.load(Ordering::Acquire) != replaced {
                    flush.note(va, replaced);
                }
                (replaced, false)
            }
        };
        // Invalidated before the table is unlocked: an `enter` at `va`
        // that follows cannot be shadowed by a stale translation.
        self.complete(flush);
        (seen, emptied)
    }

    /// The table-tree lock (shared), `va`'s 4 KiB entry and its leaf
    /// table's lock, demoting a superpage that maps `va` first; `None` if
    /// no table reaches `va` (or the space is destroyed).
    #[allow(clippy::type_complexity)]
    fn leaf_locked<'a>(
        &'a self,
        sp: &'a SpaceInner,
        va: u64,
    ) -> Option<(ShardedReadGuard<'a, Tree>, &'a AtomicU64, TableLock<'a>)> {
        self.leaf_locked_or(sp, va, |_| false)
    }

    /// [`leaf_locked`](Self::leaf_locked), but a superpage mapping `va` is
    /// first offered to `at_superpage` (its 2 MiB entry, under the shared
    /// lock): if that answers for it (`true`) nothing is demoted and the
    /// result is `None`.
    #[allow(clippy::type_complexity)]
    fn leaf_locked_or<'a>(
        &'a self,
        sp: &'a SpaceInner,
        va: u64,
        mut at_superpage: impl FnMut(&AtomicU64) -> bool,
    ) -> Option<(ShardedReadGuard<'a, Tree>, &'a AtomicU64, TableLock<'a>)> {
        loop {
            // `None` once destroyed: its tables are being freed.
            let g = self.share(sp)?;
            match self.table_of(sp.root, va) {
                Walk::Leaf(slot, table) => return Some((g, slot, self.table_lock(table)?)),
                Walk::Superpage => {
                    if self.pd_slot(sp.root, va).is_some_and(&mut at_superpage) {
                        return None;
                    }
                    drop(g);
                    if !self.demote_at(sp, va) {
                        return None;
                    }
                }
                Walk::Missing(_) => return None,
            }
        }
    }

    /// The leaf entry's slot for `va` and its table, without making
    /// tables. The caller holds the table-tree lock.
    fn table_of(&self, root: u64, va: u64) -> Walk<'_> {
        let Some(phys) = self.phys() else {
            return Walk::Missing(None);
        };
        let mut table = root;
        for level in self.mode.paging.root().down_to(Level::PD) {
            let Some(slot) = slot_of(phys, table, va, level) else {
                return Walk::Missing(None);
            };
            let e = slot.load(Ordering::Acquire);
            if e & PteFlags::PRESENT.bits() == 0 {
                return Walk::Missing(None);
            }
            if level == Level::PD && e & PteFlags::HUGE.bits() != 0 {
                return Walk::Superpage;
            }
            table = e & PG_FRAME;
        }
        match slot_of(phys, table, va, Level::PT) {
            Some(slot) => Walk::Leaf(slot, table),
            None => Walk::Missing(None),
        }
    }

    /// `enter_superpage` once its spare table frame is had: the entry
    /// goes in if the page directory's slot for `va` is empty; `Ok(false)`
    /// if not (or if the lock is taken or a table cannot be made: the
    /// caller's page-by-page `enter` meets the same and reports it).
    fn install_superpage(
        &self,
        sp: &SpaceInner,
        va: u64,
        m: Mapping,
        spare: u64,
    ) -> Result<bool, PmapError> {
        let Some(mut tree) = sp.tables.try_write() else {
            return Ok(false);
        };
        if tree.destroyed {
            return Err(PmapError::SpaceDestroyed);
        }
        let dir = match self.table_create(sp, va, Level::PDPT) {
            Ok(dir) => dir,
            Err(_) => {
                // Tables made on the way stay empty: unlink them.
                let mut flush = PendingFlush::new(sp.root);
                self.prune(&mut tree, sp.root, va, &mut flush);
                self.complete(flush);
                return Ok(false);
            }
        };
        let Some(slot) = self.phys().and_then(|p| slot_of(p, dir, va, Level::PD)) else {
            return Ok(false);
        };
        // Only exclusive holders write a page-directory slot that is not
        // empty, and the CPU sets no bit in an empty one: it stays empty.
        if slot.load(Ordering::Acquire) != 0 {
            return Ok(false);
        }
        let pde = superpage::pde_of(self.new_pte(m.page, m.prot, m.access, m.wired));
        let pages = vm_core::SUPERPAGE_PAGES;
        if m.page.managed {
            // Before the entry: whoever finds a frame by its pv list then
            // finds this mapping of it.
            for i in 0..pages {
                let pfn = Pfn(m.page.pfn.0 + i);
                self.pv.add(pfn, sp.id, va + i * vm_core::PAGE_SIZE);
            }
        }
        self.count_add(spare, crate::paging::ENTRIES as i64);
        tree.spare.insert(va, spare);
        // Release: whoever walks to the entry sees the pv entries and the
        // spare table's count.
        slot.store(pde, Ordering::Release);
        self.count_add(dir, 1);
        sp.resident.add(pages as i64);
        if m.wired {
            sp.wired.add(pages as i64);
        }
        self.superpage_stats
            .mappings
            .fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Whether the leaf table `table`, just given entry `slot` for `va`
    /// and full, looks like a superpage (the cheap test before
    /// [`promote`](Self::promote)).
    fn promotable(&self, table: u64, va: u64, slot: &AtomicU64) -> bool {
        let Some(first) = self
            .phys()
            .and_then(|p| slot_of(p, table, va & !(SUPERPAGE - 1), Level::PT))
        else {
            return false;
        };
        superpage::may_promote(
            first.load(Ordering::Acquire),
            index(VirtAddr(va), Level::PT).get(),
            slot.load(Ordering::Acquire),
        )
    }

    /// Replaces the full leaf table holding `va` with one 2 MiB entry if
    /// its entries make a superpage (FreeBSD `pmap_promote_pde`); the
    /// table is kept for the demotion. Takes the table-tree lock exclusive
    /// if it can without waiting, else leaves `va` for a later `enter` of
    /// the space to try (`promote_later`; one such table at a time): a
    /// writer waiting for faults preempted inside the lock would hold up
    /// every fault of the space behind it. The caller holds none of the
    /// pmap's locks.
    fn promote(&self, sp: &SpaceInner, va: u64) {
        // `va` is 2 MiB-aligned; from `promote_later` its low bits count
        // the attempts made.
        let (va, tries) = (va & !(SUPERPAGE - 1), va & (SUPERPAGE - 1));
        let Some(mut tree) = sp.tables.try_write() else {
            // Each retry costs the contended lock a round of writes: give
            // up after a few (promotion is best effort).
            let next = if tries < PROMOTE_TRIES {
                va | (tries + 1)
            } else {
                0
            };
            sp.promote_later.store(next, Ordering::Relaxed);
            return;
        };
        // Whichever table waited, this attempt settles it (or another
        // table's wait is dropped: promotion is best effort).
        if sp.promote_later.load(Ordering::Relaxed) != 0 {
            sp.promote_later.store(0, Ordering::Relaxed);
        }
        if tree.destroyed {
            return;
        }
        let (Some(phys), Some(pd)) = (self.phys(), self.pd_slot(sp.root, va)) else {
            return;
        };
        let e = pd.load(Ordering::Acquire);
        if e & PteFlags::PRESENT.bits() == 0 || e & PteFlags::HUGE.bits() != 0 {
            return;
        }
        let table = e & PG_FRAME;
        let Some(ptes) = table_at(phys, PhysAddr(table)) else {
            return;
        };
        if self.count(table) != ptes.len() as u64 {
            return; // an entry went meanwhile
        }
        let Some(pde) = superpage::promote(ptes) else {
            self.superpage_stats
                .failures
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let base = va & !(SUPERPAGE - 1);
        // The CPU sets nothing in a table entry that has A and M, so a
        // store would do; the swap is for the flush.
        let old = pd.swap(pde, Ordering::AcqRel);
        tree.spare.insert(base, table);
        // Stale 4 KiB translations map the same frames with the same
        // attributes, or were write-protected while clean (a CPU writing
        // through one walks the tables to set M and faults); FreeBSD
        // invalidates the one page the same way.
        let mut flush = PendingFlush::new(sp.root);
        flush.note(base, old);
        self.complete(flush);
        self.superpage_stats
            .promotions
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Splits the superpage whose entry is `pd` (mapping `va`) back into
    /// its leaf table, entry for entry (FreeBSD `pmap_demote_pde`). The
    /// caller holds the table-tree lock exclusive (`tree`). Returns the
    /// new page-directory entry, or `None` if no table frame could be had
    /// (only if the table kept at promotion is missing: a bug).
    fn demote(
        &self,
        tree: &mut Tree,
        pd: &AtomicU64,
        va: u64,
        flush: &mut PendingFlush,
    ) -> Option<u64> {
        let phys = self.phys()?;
        let base = va & !(SUPERPAGE - 1);
        debug_assert!(
            tree.spare.contains_key(&base),
            "superpage {base:#x} without its table"
        );
        let table = match tree.spare.remove(&base) {
            Some(t) => t,
            None => {
                let t = self.frames.as_ref()?.alloc_zeroed()?.phys_addr().as_u64();
                self.count_add(t, crate::paging::ENTRIES as i64);
                t
            }
        };
        let ptes = table_at(phys, PhysAddr(table))?;
        // A superpage's entry is still but for A (see `superpage`): what is
        // read here is what the table gets, and an A a CPU sets before the
        // swap below is in `old`, which then makes the invalidation that
        // drops the 2 MiB translation it cached meanwhile. Every entry gets
        // A even where `ts_referenced` took it from the 2 MiB entry: a CPU
        // may still hold 4 KiB translations of these pages from before the
        // promotion (which invalidated only the 2 MiB entry's address),
        // and A is what makes the removal or protection of an entry
        // invalidate its translation (red team: without it an unmap after
        // ageing left a CPU writing into the freed frame).
        let a = PteFlags::ACCESSED.bits();
        let pde = pd.load(Ordering::Acquire);
        for (i, pte) in ptes.iter().enumerate() {
            pte.store(superpage::pte_of(pde | a, i), Ordering::Relaxed);
        }
        let new = table | TABLE_FLAGS.bits();
        // Release: a walker that sees the table sees its entries.
        let old = pd.swap(new, Ordering::AcqRel);
        debug_assert_eq!(old | a, pde | a, "a superpage's entry changed");
        flush.note(base, old);
        self.superpage_stats
            .demotions
            .fetch_add(1, Ordering::Relaxed);
        Some(new)
    }

    /// Demotes the superpage mapping `va`, if one still does, under the
    /// table-tree lock taken exclusive. `false` if it could not.
    fn demote_at(&self, sp: &SpaceInner, va: u64) -> bool {
        let Some(mut tree) = self.exclusive(sp) else {
            return true; // destroyed: the caller finds out under its lock
        };
        let Some(pd) = self.pd_slot(sp.root, va) else {
            return true;
        };
        if !superpage::is_superpage(pd.load(Ordering::Acquire)) {
            return true;
        }
        let mut flush = PendingFlush::new(sp.root);
        let done = self.demote(&mut tree, pd, va, &mut flush).is_some();
        self.complete(flush);
        done
    }
}

/// The frame leaf entry `e` of `level` maps at `va`.
fn leaf_frame(e: u64, level: Level, va: u64) -> u64 {
    if level == Level::PD {
        (e & PG_PS_FRAME) + (va & (SUPERPAGE - 1) & !(vm_core::PAGE_SIZE - 1))
    } else {
        e & PG_FRAME
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
            tables: ShardedRwLock::new(Tree::default()),
            resident: ShardedCount::default(),
            wired: ShardedCount::default(),
            promote_later: AtomicU64::new(0),
        });
        self.spaces.lock().insert(id, Arc::downgrade(&inner));
        Ok(X86Space(inner))
    }

    fn destroy_space(&self, space: &X86Space) {
        // One exclusive hold from the removal to the mark: an `enter`
        // racing the destruction either maps before it (and is removed
        // here) or finds the space destroyed, never maps into tables about
        // to be freed.
        let Some(mut destroyed) = self.exclusive(&space.0) else {
            return; // destroyed already: its root is not ours to free again
        };
        let user = self.mode.paging.user_end();
        self.remove_locked(&mut destroyed, &space.0, 0, user, &mut |_| {});
        destroyed.destroyed = true;
        self.spaces.lock().remove(&space.0.id);
        let mut tables = alloc::vec::Vec::new();
        self.tables_under(space.0.root, self.mode.paging.root(), &mut tables);
        debug_assert_eq!(tables.len(), 1, "only the root is left");
        // `remove` took every superpage, whole (freeing its kept table) or
        // demoted (the table back in the tree).
        debug_assert!(destroyed.spare.is_empty(), "a superpage's table is left");
        tables.extend(destroyed.spare.drain().map(|(_, t)| t));
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
        let sp = &*space.0;
        let new = self.new_pte(page, prot, access, wired);
        let (g, slot, table) = loop {
            let g = self.share(sp).ok_or(PmapError::SpaceDestroyed)?;
            match self.leaf_slot_create(sp, va) {
                Walk::Leaf(slot, table) => break (g, slot, table),
                // What the superpage maps there already (a fault two
                // threads took at once): nothing to change.
                Walk::Superpage if self.superpage_maps(sp.root, va, new) => return Ok(None),
                // Another frame or other attributes inside a superpage
                // (FreeBSD `pmap_enter` demotes too); promoted again when
                // the table is full and in line once more.
                Walk::Superpage => {
                    drop(g);
                    if !self.demote_at(sp, va) {
                        return Err(PmapError::NoMemory);
                    }
                }
                Walk::Missing(e) => {
                    drop(g);
                    self.prune_path(sp, va);
                    return Err(e.unwrap_or(PmapError::NoMemory));
                }
            }
        };
        // The walk just found (or made) this table, so it has a lock; a
        // frame that is not a table here would be a broken pmap, reported
        // as the frame it is rather than as a shortage.
        let locked = self
            .table_lock(table)
            .ok_or(PmapError::BadFrame(Pfn::containing(PhysAddr(table))))?;
        let old = slot.load(Ordering::Acquire);
        let mut flush = PendingFlush::new(sp.root);
        let mut out = None;
        if old & PteFlags::PRESENT.bits() != 0 && old & PG_FRAME == new & PG_FRAME {
            out = self.update_same_frame(sp, slot, old, new, va, wired, &mut flush);
        } else {
            if old & PteFlags::PRESENT.bits() != 0 {
                // Another frame: take it out, carrying its A/M to its page,
                // and invalidate before the new entry can be used (modern
                // FreeBSD's order), so no CPU mixes the two.
                let prev = slot.swap(0, Ordering::AcqRel);
                flush.note(va, prev);
                if prev & PteFlags::MANAGED.bits() != 0 {
                    self.pv
                        .remove(Pfn::containing(PhysAddr(prev & PG_FRAME)), sp.id, va);
                    out = Some(displaced(prev));
                }
                if prev & PteFlags::WIRED.bits() != 0 {
                    sp.wired.add(-1);
                }
                sp.resident.add(-1);
                locked.count_add(-1);
                self.complete(core::mem::replace(&mut flush, PendingFlush::new(sp.root)));
            }
            if page.managed {
                self.pv.add(page.pfn, sp.id, va);
            }
            slot.store(new, Ordering::Release);
            locked.count_add(1);
            sp.resident.add(1);
            if wired {
                sp.wired.add(1);
            }
        }
        self.complete(flush);
        let full = locked.count() == crate::paging::ENTRIES as u64;
        let promote = self.superpages && full && self.promotable(table, va, slot);
        drop((locked, g));
        if promote {
            self.promote(sp, va & !(SUPERPAGE - 1));
        } else if self.superpages {
            let later = sp.promote_later.load(Ordering::Relaxed);
            if later != 0 {
                self.promote(sp, later);
            }
        }
        Ok(out)
    }

    /// Writes the 2 MiB entry into an empty page-directory slot under the
    /// table-tree lock exclusive (taken only if free: a fault does not wait
    /// for it), with a table frame set aside for the demotion, as a
    /// promotion leaves one.
    fn enter_superpage(
        &self,
        space: &X86Space,
        va: VirtAddr,
        m: Mapping,
    ) -> Result<bool, PmapError> {
        let va = va.as_u64();
        self.check_va(va)?;
        self.check_va(va + SUPERPAGE - vm_core::PAGE_SIZE)?;
        let first = m.page.pfn.phys_addr().as_u64();
        // The invariant of `superpage`: a writable 2 MiB entry is dirty.
        let clean_writable = m.prot.contains(Prot::WRITE) && !m.access.contains(Prot::WRITE);
        if !self.superpages
            || va & (SUPERPAGE - 1) != 0
            || first & (SUPERPAGE - 1) != 0
            || clean_writable
            || (m.page.managed && !self.pv.covers(m.page.pfn, vm_core::SUPERPAGE_PAGES))
        {
            return Ok(false);
        }
        let sp = &*space.0;
        let Some(frames) = self.frames.as_ref() else {
            return Ok(false);
        };
        let Some(spare) = frames.alloc_zeroed() else {
            return Ok(false);
        };
        let done = self.install_superpage(sp, va, m, spare.phys_addr().as_u64());
        if !matches!(done, Ok(true)) {
            // SAFETY: `spare` came from `alloc_zeroed` above and was never
            // linked nor written.
            let freed = unsafe { frames.free_zeroed(spare) };
            debug_assert!(freed.is_ok(), "unused spare table: {freed:?}");
        }
        done
    }

    fn enter_quick(&self, space: &X86Space, va: VirtAddr, page: PageInfo, prot: Prot) -> bool {
        self.enter_quick_run(space, va, &[Some(page)], prot) == 1
    }

    /// One walk and one table lock per leaf table the run crosses (FreeBSD
    /// `pmap_enter_object`).
    fn enter_quick_run(
        &self,
        space: &X86Space,
        start: VirtAddr,
        pages: &[Option<PageInfo>],
        prot: Prot,
    ) -> usize {
        let sp = &*space.0;
        let (Some(phys), Some(g)) = (self.phys(), self.share(sp)) else {
            return 0;
        };
        // FreeBSD `pmap_enter_quick_locked`: V, cache bits, MANAGED, NX, U;
        // never A, M or RW.
        let mut base = PteFlags::PRESENT | PteFlags::USER;
        base.set(
            PteFlags::NO_EXECUTE,
            self.mode.nxe && !prot.contains(Prot::EXECUTE),
        );
        let mut held: Option<(u64, TableLock<'_>)> = None;
        // The run is inside a superpage: every page there is mapped.
        let mut in_superpage = false;
        let mut mapped = 0;
        // Counted per run of entries in one table, not per page.
        let mut entered = 0i64;
        let mut failed_at = None;
        for (i, page) in (0u64..).zip(pages) {
            let Some(va) = i
                .checked_mul(vm_core::PAGE_SIZE)
                .and_then(|o| start.as_u64().checked_add(o))
            else {
                break;
            };
            if va & (Level::PD.span() - 1) == 0 {
                sp.resident.add(core::mem::take(&mut entered));
                held = None; // the run enters the next leaf table
                in_superpage = false;
            }
            let Some(page) = page else { continue };
            if self.check_va(va).is_err() {
                break;
            }
            if in_superpage {
                continue;
            }
            if held.is_none() {
                match self.leaf_slot_create(sp, va) {
                    Walk::Leaf(_, t) => {
                        let Some(l) = self.table_lock(t) else { break };
                        held = Some((t, l));
                    }
                    Walk::Superpage => {
                        in_superpage = true;
                        continue;
                    }
                    Walk::Missing(_) => {
                        failed_at = Some(va);
                        break;
                    }
                }
            }
            let Some((t, locked)) = &held else { break };
            let Some(slot) = slot_of(phys, *t, va, Level::PT) else {
                break;
            };
            if slot.load(Ordering::Acquire) & PteFlags::PRESENT.bits() != 0 {
                continue;
            }
            let mut f = base | cache_bits(page.attr, false);
            f.set(PteFlags::MANAGED, page.managed);
            if page.managed {
                self.pv.add(page.pfn, sp.id, va);
            }
            slot.store(page.pfn.phys_addr().as_u64() | f.bits(), Ordering::Release);
            locked.count_add(1);
            entered += 1;
            mapped += 1;
        }
        sp.resident.add(entered);
        drop(held);
        drop(g);
        if let Some(va) = failed_at {
            self.prune_path(sp, va);
        }
        mapped
    }

    fn remove(&self, space: &X86Space, range: Range<VirtAddr>, sink: &mut DisplacedSink<'_>) {
        let (start, end) = (range.start.as_u64(), range.end.as_u64());
        let end = end.min(self.mode.paging.user_end());
        if start >= end {
            return;
        }
        let sp = &*space.0;
        if let Some(mut x) = self.exclusive(sp) {
            self.remove_locked(&mut x, sp, start, end, sink);
        }
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
        let sp = &*space.0;
        let Some(mut x) = self.exclusive(sp) else {
            return;
        };
        let mut flush = PendingFlush::new(sp.root);
        let top = self.mode.paging.root();
        let mut changed = alloc::vec::Vec::new();
        let nx = self.mode.nxe && !prot.contains(Prot::EXECUTE);
        self.visit(
            &mut x,
            sp.root,
            top,
            0,
            start,
            end,
            &mut flush,
            &mut |va, slot, level| {
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
                            changed.extend(superpage::leaves(va, cur, level));
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
        self.complete(flush);
    }

    fn extract(&self, space: &X86Space, va: VirtAddr) -> Option<Pfn> {
        let va = va.as_u64();
        let _g = self.share(&space.0)?;
        let (e, level) = self.leaf(space.0.root, va)?;
        (e & PteFlags::PRESENT.bits() != 0)
            .then(|| Pfn::containing(PhysAddr(leaf_frame(e, level, va))))
    }

    fn is_prefaultable(&self, space: &X86Space, va: VirtAddr) -> bool {
        let va = va.as_u64();
        // The page directory entry exists and is not a superpage, and the
        // PTE is empty (FreeBSD `pmap_is_prefaultable`).
        // A hint, read without the table-tree lock (entries are atomics
        // and table frames stay inside physical memory even if freed
        // meanwhile): enter_quick checks again under the leaf table's lock
        // and never replaces anything.
        self.check_va(va).is_ok()
            && matches!(self.table_of(space.0.root, va),
                Walk::Leaf(s, _) if s.load(Ordering::Acquire) & PteFlags::PRESENT.bits() == 0)
    }

    fn change_wiring(&self, space: &X86Space, va: VirtAddr, wired: bool) {
        let va = va.as_u64();
        let sp = &*space.0;
        // Per page: a superpage is demoted first (FreeBSD keeps one whole
        // when all of it is wired; not done here).
        let Some((_g, slot, _l)) = self.leaf_locked(sp, va) else {
            return;
        };
        let old = slot.load(Ordering::Acquire);
        if old & PteFlags::PRESENT.bits() == 0 || (old & PteFlags::WIRED.bits() != 0) == wired {
            return;
        }
        if wired {
            slot.fetch_or(PteFlags::WIRED.bits(), Ordering::AcqRel);
            sp.wired.add(1);
        } else {
            slot.fetch_and(!PteFlags::WIRED.bits(), Ordering::AcqRel);
            sp.wired.add(-1);
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
        self.pv
            .list(pfn)
            .into_iter()
            .any(|(id, va)| self.maps_dirty(id, va, pfn))
    }

    fn clear_modify(&self, pfn: Pfn) {
        self.for_each_mapping(pfn, |slot| {
            Some(slot.fetch_and(!PteFlags::DIRTY.bits(), Ordering::AcqRel))
        });
    }

    fn ts_referenced(&self, pfn: Pfn) -> u32 {
        // At most 5 counted (FreeBSD `PMAP_TS_REFERENCED_MAX`); a mapping
        // by a superpage answers from its 2 MiB entry without splitting it.
        let n = core::cell::Cell::new(0u32);
        let mut take = |slot: &AtomicU64| {
            if n.get() >= 5 {
                return Some(slot.load(Ordering::Acquire));
            }
            let old = slot.fetch_and(!PteFlags::ACCESSED.bits(), Ordering::AcqRel);
            if old & PteFlags::ACCESSED.bits() != 0 {
                n.set(n.get() + 1);
            }
            Some(old)
        };
        for (id, va) in self.pv.list(pfn) {
            let Some(sp) = self.space_by_id(id) else {
                continue;
            };
            let at_superpage = |pd: &AtomicU64| {
                let referenced = self.superpage_referenced(&sp, pd, va, pfn, n.get() < 5);
                n.set(n.get() + u32::from(referenced));
                true
            };
            if self.on_mapping(&sp, va, pfn, &mut take, at_superpage).1 {
                self.prune_path(&sp, va);
            }
        }
        n.get()
    }

    fn mapping_count(&self, pfn: Pfn) -> usize {
        self.pv.count(pfn)
    }
}
