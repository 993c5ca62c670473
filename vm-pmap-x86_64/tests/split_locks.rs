//! Issue 16 item 1: the x86_64 pmap's split page-table locks.
//!
//! Faults (`enter`) in one space run under the space's table-tree lock
//! shared and their leaf table's own lock; missing tables are installed by
//! compare-and-swap; whatever frees tables (`remove`, `protect`, pruning
//! after a per-page removal) holds the tree lock exclusive. These tests race
//! those paths against each other and check what a broken protocol loses:
//! an entry whose table another thread's install overwrote, a count of
//! valid entries (and so a table freed while it still maps pages, or never
//! freed), a resident count, a frame leaked or freed twice.

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vm_core::pmap::{PageInfo, Pmap};
use vm_core::{Mapping, MemAttr, Pfn, Prot, VirtAddr, Vm};
use vm_pmap_x86_64::X86Pmap;
use vm_pmap_x86_64::mmu::Access;
use vm_testkit::test_config;

const PAGE: u64 = 4096;
const TWO_MIB: u64 = 2 << 20;

fn page(pfn: u64) -> PageInfo {
    PageInfo {
        pfn: Pfn(pfn),
        managed: true,
        attr: MemAttr::WriteBack,
    }
}

/// Thread `t`'s `i`th address: threads alternate between two leaf tables
/// under one page directory that none of them finds made, so every round
/// races the installs of the PDPT, the PD and both PTs.
fn va_of(round: u64, t: u64, i: u64) -> u64 {
    let base = 0x40_0000_0000 + round * (1 << 30) * 2;
    base + (t % 2) * TWO_MIB + (t / 2 * 64 + i) * PAGE
}

#[test]
fn racing_enters_into_missing_tables_keep_every_entry() {
    const THREADS: u64 = 4;
    const PAGES: u64 = 48;
    let vm = Vm::new(X86Pmap::new(), test_config(2048)).unwrap();
    let p = vm.pmap();
    let free_before = vm.free_pages();
    for round in 0..200 {
        let space = p.create_space().unwrap();
        let go = Barrier::new(THREADS as usize);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (space, go) = (&space, &go);
                s.spawn(move || {
                    go.wait();
                    for i in 0..PAGES {
                        let m = Mapping::new(page(0x100 + t * PAGES + i), Prot::RW);
                        p.enter(space, VirtAddr(va_of(round, t, i)), m).unwrap();
                    }
                });
            }
        });
        for t in 0..THREADS {
            for i in 0..PAGES {
                let va = va_of(round, t, i);
                assert_eq!(
                    p.extract(&space, VirtAddr(va)),
                    Some(Pfn(0x100 + t * PAGES + i)),
                    "round {round}: thread {t}'s page {i} at {va:#x} was lost"
                );
            }
        }
        assert_eq!(space.resident_count(), THREADS * PAGES, "round {round}");
        // Root, PDPT, PD and two PTs: a table installed twice would show
        // as a sixth, or as a frame missing from the pool below.
        assert_eq!(p.table_pages(&space), 5, "round {round}");
        p.remove(&space, VirtAddr(0)..VirtAddr(1 << 47), &mut |_| {});
        assert_eq!(
            p.table_pages(&space),
            1,
            "round {round}: emptied tables left"
        );
        p.destroy_space(&space);
        assert_eq!(vm.free_pages(), free_before, "round {round}: frames leaked");
    }
}

/// Faults on two leaf tables of one space race per-page removals
/// (`remove_all`, which prunes the tables it empties under the exclusive
/// lock), write-protection (`page_protect`), range removals of a third
/// table and software-MMU walks. Every round each faulting thread checks
/// what it entered is still there unless a remover took it, and at the end
/// the counts agree with the tables and every frame is back.
#[test]
fn faults_race_per_page_removals_prunes_and_walks() {
    let vm = Vm::new(X86Pmap::new(), test_config(2048)).unwrap();
    let p = vm.pmap();
    let free_before = vm.free_pages();
    let space = p.create_space().unwrap();
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_millis(1500);
    const PAGES: u64 = 32;
    let base = 0x7f00_0000_0000u64;
    let pfn_of = |t: u64, i: u64| 0x200 + t * PAGES + i;
    std::thread::scope(|s| {
        // Two faulting threads, each on its own leaf table.
        for t in 0..2u64 {
            let (space, stop) = (&space, &stop);
            s.spawn(move || {
                let mut rounds = 0u64;
                while Instant::now() < deadline {
                    for i in 0..PAGES {
                        let va = base + t * TWO_MIB + i * PAGE;
                        let m = Mapping::new(page(pfn_of(t, i)), Prot::RW).access(Prot::WRITE);
                        p.enter(space, VirtAddr(va), m).unwrap();
                        // Only this thread maps this address; removers may
                        // take it away, never put another frame there.
                        let got = p.extract(space, VirtAddr(va));
                        assert!(
                            got.is_none() || got == Some(Pfn(pfn_of(t, i))),
                            "{va:#x} maps {got:?}"
                        );
                    }
                    rounds += 1;
                }
                stop.store(true, Ordering::Relaxed);
                assert!(rounds > 0);
            });
        }
        // Per-page operations through the pv lists.
        let (stop_r, space_r) = (&stop, &space);
        s.spawn(move || {
            let mut k = 0u64;
            while !stop_r.load(Ordering::Relaxed) {
                let (t, i) = (k % 2, (k / 2) % PAGES);
                if k % 3 == 0 {
                    p.page_protect(Pfn(pfn_of(t, i)), Prot::READ);
                } else {
                    p.remove_all(Pfn(pfn_of(t, i)));
                }
                let va = base + t * TWO_MIB + i * PAGE;
                let _ = p.translate_access(space_r, va, Access::USER_READ);
                k += 1;
            }
        });
        // Range removals (tables made and pruned) on a third leaf table.
        let (stop_x, space_x) = (&stop, &space);
        s.spawn(move || {
            let third = base + 2 * TWO_MIB;
            while !stop_x.load(Ordering::Relaxed) {
                for i in 0..8 {
                    let m = Mapping::new(page(0x900 + i), Prot::READ);
                    p.enter(space_x, VirtAddr(third + i * PAGE), m).unwrap();
                }
                assert_eq!(p.extract(space_x, VirtAddr(third)), Some(Pfn(0x900)));
                p.remove(
                    space_x,
                    VirtAddr(third)..VirtAddr(third + TWO_MIB),
                    &mut |_| {},
                );
            }
        });
    });
    let mapped = (0..2u64)
        .flat_map(|t| (0..PAGES).map(move |i| base + t * TWO_MIB + i * PAGE))
        .filter(|&va| p.extract(&space, VirtAddr(va)).is_some())
        .count() as u64;
    assert_eq!(space.resident_count(), mapped, "resident count drifted");
    p.remove(&space, VirtAddr(0)..VirtAddr(1 << 47), &mut |_| {});
    assert_eq!(space.resident_count(), 0);
    assert_eq!(p.table_pages(&space), 1, "tables left behind");
    for pfn in (0x200..0x200 + 2 * PAGES).chain(0x900..0x908) {
        assert_eq!(p.mapping_count(Pfn(pfn)), 0, "pv entry left for {pfn:#x}");
    }
    p.destroy_space(&space);
    assert_eq!(vm.free_pages(), free_before, "table frames leaked");
}

/// Four threads hammer the same eight entries of one leaf table: entering
/// one of two frames (so an entry changes frame under another thread),
/// wiring and unwiring, and removing by frame. The leaf table's lock makes
/// each of these one step on the entry, its table's count, the space's
/// counts and the pv lists: afterwards the resident and wired counts, the
/// pv lists and the entries agree.
#[test]
fn one_leaf_table_hammered_keeps_entries_counts_and_pv_lists_agreeing() {
    const SLOTS: u64 = 8;
    let vm = Vm::new(X86Pmap::new(), test_config(1024)).unwrap();
    let p = vm.pmap();
    let free_before = vm.free_pages();
    let space = p.create_space().unwrap();
    let base = 0x1234_0000_0000u64;
    let deadline = Instant::now() + Duration::from_millis(1500);
    let pfn_of = |slot: u64, alt: u64| 0x300 + slot * 2 + alt;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let space = &space;
            s.spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
                while Instant::now() < deadline {
                    for _ in 0..64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let slot = x % SLOTS;
                        let va = VirtAddr(base + slot * PAGE);
                        let pfn = pfn_of(slot, (x >> 8) & 1);
                        match (x >> 16) % 4 {
                            0 | 1 => {
                                let m = Mapping::new(page(pfn), Prot::RW).wired((x >> 20) & 1 == 1);
                                p.enter(space, va, m).unwrap();
                            }
                            2 => p.change_wiring(space, va, (x >> 20) & 1 == 1),
                            _ => {
                                p.remove_all(Pfn(pfn));
                            }
                        }
                    }
                }
            });
        }
    });
    let (mut mapped, mut wired) = (0, 0);
    for slot in 0..SLOTS {
        let va = base + slot * PAGE;
        let pte = p.pte(&space, va).unwrap_or(0);
        let present = pte & vm_pmap_x86_64::PteFlags::PRESENT.bits() != 0;
        mapped += u64::from(present);
        wired += u64::from(present && pte & vm_pmap_x86_64::PteFlags::WIRED.bits() != 0);
        for alt in 0..2 {
            let pfn = pfn_of(slot, alt);
            let maps_it = present && p.extract(&space, VirtAddr(va)) == Some(Pfn(pfn));
            assert_eq!(
                p.mapping_count(Pfn(pfn)),
                usize::from(maps_it),
                "pv list of {pfn:#x} disagrees with the entry {pte:#x}"
            );
        }
    }
    assert_eq!(space.resident_count(), mapped, "resident count drifted");
    assert_eq!(space.wired_count(), wired, "wired count drifted");
    p.remove(&space, VirtAddr(0)..VirtAddr(1 << 47), &mut |_| {});
    assert_eq!(
        p.table_pages(&space),
        1,
        "a table count drifted: tables left"
    );
    p.destroy_space(&space);
    assert_eq!(vm.free_pages(), free_before, "table frames leaked");
}
