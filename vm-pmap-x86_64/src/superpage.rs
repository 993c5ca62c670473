//! 2 MiB superpages: a full leaf table promoted into one page-directory
//! entry with PS set, and demoted back (FreeBSD `pmap_promote_pde`,
//! `pmap_demote_pde`).
//!
//! # The invariant that keeps a PS entry's M still
//!
//! A 2 MiB entry this pmap writes always has A set, and if it has write
//! permission it has M set too. So neither the CPU nor the software MMU
//! ever sets M in it (they set M only where clear, and only through a
//! writable entry), and demotion can copy it into 512 entries and replace
//! it with one store, losing no dirty bit. Promotion earns the invariant:
//! it requires A in all 512 entries, and takes write permission from each
//! entry that is writable but clean before it compares them (one atomic
//! step each, so an M the CPU sets first is kept and the entry then stays
//! writable and dirty).
//!
//! A alone may change: `ts_referenced` clears it in a 2 MiB entry for one
//! of its 512 pages (as FreeBSD does; [`clears_reference`]) so page-out
//! can age a superpage without splitting it, and the CPU or the software
//! MMU sets it again at the next access. Demotion gives every 4 KiB entry
//! A regardless: a CPU may still cache 4 KiB translations of the pages
//! from before the promotion, and an entry's A is what makes its later
//! removal or protection invalidate them.
//!
//! # Where the pmap uses them
//!
//! A leaf table is promoted when an `enter` fills it (its count reaches
//! 512) with frames in physical order from a 2 MiB-aligned frame and equal
//! flags. The table's frame is kept aside (`Tree::spare`) so demotion never
//! needs memory. `enter_superpage` writes a 2 MiB entry directly into an
//! empty page-directory slot (FreeBSD `pmap_enter_pde`, for a fault that
//! fills the whole 2 MiB), with a fresh table frame set aside the same
//! way; it keeps the invariant above by refusing a writable entry that is
//! not dirty. Any operation that needs a 4 KiB entry inside a
//! superpage — a `remove` or `protect` of part of it, `enter` of a page
//! in it, a wiring change, the per-page pv operations but `is_modified`
//! and `ts_referenced` — demotes it first. A `remove` or `protect` of the
//! whole 2 MiB changes the one entry (FreeBSD `pmap_remove_pde`,
//! `pmap_protect_pde`), reporting and invalidating page by page.
//! Both changes take the table-tree lock exclusive; promotion only if it
//! can without waiting (a waiting writer behind a fault preempted inside
//! the lock would stall every fault of the space), else a later `enter`
//! of the space tries again. Read-only questions (`extract`, `is_modified`, the software MMU)
//! read a superpage's entry as it is, and an `enter` of what a superpage
//! already maps changes nothing.

use crate::entry::{PG_FRAME, PG_PS_FRAME, PteFlags};
use crate::paging::{ENTRIES, Level};
use core::sync::atomic::{AtomicU64, Ordering};

/// Bytes a superpage maps.
pub(crate) const SUPERPAGE: u64 = Level::PD.span();

const RW: u64 = PteFlags::WRITABLE.bits();
const DIRTY: u64 = PteFlags::DIRTY.bits();
const ACCESSED: u64 = PteFlags::ACCESSED.bits();
const HUGE: u64 = PteFlags::HUGE.bits();
const PTE_PAT: u64 = PteFlags::PTE_PAT.bits();
const PDE_PAT: u64 = PteFlags::PDE_PAT.bits();

/// `pte` as it will be once promotion has write-protected it if it is
/// writable and clean.
fn settled(pte: u64) -> u64 {
    if pte & (RW | DIRTY) == RW {
        pte & !RW
    } else {
        pte
    }
}

/// Whether entry `i` of a table, `pte`, fits a superpage whose first entry
/// settles to `first`: present and accessed, the frame `i` pages after the
/// first, and the same flags once settled.
fn fits(first: u64, i: usize, pte: u64) -> bool {
    let frame = (first & PG_FRAME) + i as u64 * vm_core::PAGE_SIZE;
    pte & ACCESSED != 0 && pte & PG_FRAME == frame && settled(pte) & !PG_FRAME == first & !PG_FRAME
}

/// A cheap first test for the entry just written at index `i` of a full
/// table whose first entry is `first`: whether a promotion is worth
/// trying. A COW or a protection change that breaks the run fails here.
pub(crate) fn may_promote(first: u64, i: usize, pte: u64) -> bool {
    let first = settled(first);
    first & PteFlags::PRESENT.bits() != 0
        && first & PG_FRAME & (SUPERPAGE - 1) == 0
        && fits(first, i, pte)
}

/// Superpage counts of a pmap (FreeBSD's `vm.pmap.pde.*` sysctls).
#[derive(Debug, Default)]
pub struct SuperpageStats {
    /// Leaf tables replaced by a 2 MiB entry.
    pub promotions: AtomicU64,
    /// 2 MiB entries split back into a leaf table.
    pub demotions: AtomicU64,
    /// Full leaf tables looked at that could not be promoted.
    pub failures: AtomicU64,
    /// 2 MiB entries made whole by `enter_superpage`, without a leaf table
    /// first (FreeBSD's `vm.pmap.pde.mappings`).
    pub mappings: AtomicU64,
    /// 2 MiB entries removed whole by a `remove` of all their 2 MiB,
    /// without a demotion. Every entry made ends as a demotion or one of
    /// these.
    pub removals: AtomicU64,
}

impl SuperpageStats {
    /// 2 MiB entries made so far, by promotion or whole
    /// (`promotions + mappings`).
    #[must_use]
    pub fn made(&self) -> u64 {
        self.promotions.load(Ordering::Relaxed) + self.mappings.load(Ordering::Relaxed)
    }

    /// (promotions, demotions, failures) so far.
    #[must_use]
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.promotions.load(Ordering::Relaxed),
            self.demotions.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

/// Checks the 512 entries of a table (`ptes`) for promotion and
/// write-protects the clean writable ones; returns the 2 MiB entry that
/// replaces the table, or `None` (and changes nothing) if they do not make
/// a superpage. The caller holds the table-tree lock exclusive, so only a
/// CPU changes the entries meanwhile, and only their A and M bits.
pub(crate) fn promote(ptes: &[AtomicU64]) -> Option<u64> {
    let first = settled(ptes.first()?.load(Ordering::Acquire));
    if first & PteFlags::PRESENT.bits() == 0 || first & PG_FRAME & (SUPERPAGE - 1) != 0 {
        return None;
    }
    // A read-only pass first, so a table that cannot be promoted keeps
    // its write permissions.
    if ptes.len() != ENTRIES
        || !(ptes.iter().enumerate()).all(|(i, s)| fits(first, i, s.load(Ordering::Acquire)))
    {
        return None;
    }
    for (i, s) in ptes.iter().enumerate() {
        let mut cur = s.load(Ordering::Acquire);
        while cur & (RW | DIRTY) == RW {
            match s.compare_exchange(cur, cur & !RW, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => cur &= !RW,
                Err(now) => cur = now, // the CPU set M: the entry stays writable
            }
        }
        if !fits(first, i, cur) {
            // M arrived in an entry after the first pass: the settled
            // flags differ now. Entries already write-protected stay so
            // (they fault on the next write, which maps them again).
            return None;
        }
    }
    Some(pde_of(first))
}

/// The 2 MiB entry mapping what the table's `first` entry starts: the same
/// flags with PS, PAT moved from bit 7 to bit 12.
pub(crate) fn pde_of(first: u64) -> u64 {
    let mut flags = first & !PG_FRAME & !PTE_PAT;
    if first & PTE_PAT != 0 {
        flags |= PDE_PAT;
    }
    (first & PG_FRAME) | flags | HUGE
}

/// Entry `i` of the table a 2 MiB entry `pde` demotes into: its frame,
/// its flags (A and M included), PAT moved back to bit 7.
pub(crate) fn pte_of(pde: u64, i: usize) -> u64 {
    let mut flags = pde & !PG_FRAME & !(HUGE | PDE_PAT);
    if pde & PDE_PAT != 0 {
        flags |= PTE_PAT;
    }
    ((pde & PG_PS_FRAME) + i as u64 * vm_core::PAGE_SIZE) | flags
}

/// The 4 KiB pages leaf entry `e` of `level` at `va` maps, each with the
/// entry it has or would have: itself for a 4 KiB entry, the 512 entries a
/// demotion would make for a 2 MiB one (A in each, as demotion gives it:
/// what makes a later flush of each page's address, so no CPU keeps a
/// 4 KiB translation cached from before a promotion). What a removal or
/// protection of a whole superpage reports and invalidates, page by page.
pub(crate) fn leaves(va: u64, e: u64, level: Level) -> impl Iterator<Item = (u64, u64)> {
    let n = if level == Level::PD { ENTRIES } else { 1 };
    (0..n).map(move |i| {
        if level == Level::PD {
            (va + i as u64 * vm_core::PAGE_SIZE, pte_of(e | ACCESSED, i))
        } else {
            (va, e)
        }
    })
}

/// Whether `ts_referenced` of frame `pfn` through a superpage at `va` of
/// space `space` clears the 2 MiB entry's A: for one frame of the 512 in
/// each superpage, which the hash spreads over the superpages and spaces
/// so the same offset is not chosen for all (FreeBSD's choice).
pub(crate) fn clears_reference(pfn: u64, va: u64, space: u64) -> bool {
    (pfn ^ (va >> Level::PD.shift()) ^ space) & (ENTRIES as u64 - 1) == 0
}

/// Whether `e`, an entry of a page directory, is a 2 MiB leaf.
pub(crate) fn is_superpage(e: u64) -> bool {
    e & (PteFlags::PRESENT.bits() | HUGE) == PteFlags::PRESENT.bits() | HUGE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::PteFlags as F;

    const BASE: u64 = 0x4020_0000; // 2 MiB aligned
    const URW: u64 = F::PRESENT.bits() | F::USER.bits() | F::WRITABLE.bits();

    fn frame(i: usize) -> u64 {
        BASE + i as u64 * 4096
    }

    fn table(f: impl Fn(usize) -> u64) -> alloc::vec::Vec<AtomicU64> {
        (0..ENTRIES).map(|i| AtomicU64::new(f(i))).collect()
    }

    fn run(t: &[AtomicU64]) -> Option<u64> {
        promote(t)
    }

    #[test]
    fn a_run_of_dirty_writable_frames_becomes_one_entry() {
        let t = table(|i| frame(i) | URW | ACCESSED | DIRTY);
        let pde = run(&t).expect("promotable");
        assert_eq!(pde, BASE | URW | ACCESSED | DIRTY | HUGE);
        for i in [0, 1, 77, 511] {
            assert_eq!(pte_of(pde, i), t[i].load(Ordering::Relaxed), "entry {i}");
        }
    }

    #[test]
    fn clean_writable_entries_are_write_protected_so_m_stays_tracked() {
        let t = table(|i| frame(i) | URW | ACCESSED);
        let pde = run(&t).expect("promotable");
        assert_eq!(pde & (RW | DIRTY), 0, "read-only and clean: {pde:#x}");
        assert!(t.iter().all(|e| e.load(Ordering::Relaxed) & RW == 0));
    }

    #[test]
    fn pat_moves_between_bit_7_and_bit_12() {
        let t = table(|i| frame(i) | URW | ACCESSED | DIRTY | PTE_PAT);
        let pde = run(&t).expect("promotable");
        assert_eq!(pde & (PDE_PAT | HUGE), PDE_PAT | HUGE);
        assert_eq!(pde & PG_FRAME & !PDE_PAT, BASE);
        for i in [2, 3] {
            // Bit 12 of a 4 KiB entry is frame, not PAT.
            assert_eq!(pte_of(pde, i), t[i].load(Ordering::Relaxed), "entry {i}");
        }
    }

    #[test]
    fn anything_out_of_line_refuses_and_changes_nothing() {
        type Case = (&'static str, fn(usize, u64) -> u64);
        let cases: [Case; 6] = [
            ("unaligned", |i, _| frame(i + 1) | URW | ACCESSED),
            ("out of order", |i, e| if i == 9 { e + 4096 } else { e }),
            (
                "not accessed",
                |i, e| if i == 300 { e & !ACCESSED } else { e },
            ),
            (
                "one wired",
                |i, e| if i == 5 { e | F::WIRED.bits() } else { e },
            ),
            ("one dirty among clean", |i, e| {
                if i == 511 { e | DIRTY } else { e }
            }),
            ("one missing", |i, e| if i == 200 { 0 } else { e }),
        ];
        for (what, change) in cases {
            let t = table(|i| change(i, frame(i) | URW | ACCESSED));
            let before: alloc::vec::Vec<u64> =
                t.iter().map(|e| e.load(Ordering::Relaxed)).collect();
            assert_eq!(run(&t), None, "{what}");
            let after: alloc::vec::Vec<u64> = t.iter().map(|e| e.load(Ordering::Relaxed)).collect();
            assert_eq!(before, after, "{what}: a refused promotion wrote entries");
        }
    }

    #[test]
    fn the_quick_test_sees_a_broken_run() {
        let first = BASE | URW | ACCESSED | DIRTY;
        assert!(may_promote(first, 7, frame(7) | URW | ACCESSED | DIRTY));
        assert!(!may_promote(first, 7, frame(9) | URW | ACCESSED | DIRTY));
        assert!(!may_promote(
            first,
            7,
            frame(7) | F::PRESENT.bits() | F::USER.bits() | ACCESSED
        ));
        assert!(!may_promote(
            first + 4096,
            7,
            frame(8) | URW | ACCESSED | DIRTY
        ));
    }
}
