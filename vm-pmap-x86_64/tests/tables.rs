//! The x86_64 pmap against a plain model, its TLB rules, cache bits and the
//! software MMU's fault codes.

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use vm_core::pmap::{PageInfo, Pmap, PmapError};
use vm_core::{Mapping, MemAttr, Pfn, PhysAddr, Prot, VirtAddr, Vm};
use vm_pmap_x86_64::mmu::{Access, Fault};
use vm_pmap_x86_64::paging::{Level, index};
use vm_pmap_x86_64::{PfErrorCode, PteFlags, X86Pmap, X86Space, tables};
use vm_testkit::test_config;

const PAGE: u64 = 4096;

fn machine(pmap: X86Pmap) -> (Arc<Vm<X86Pmap>>, X86Space) {
    let vm = Vm::new(pmap, test_config(512)).unwrap();
    let space = vm.pmap().create_space().unwrap();
    (vm, space)
}

fn page(pfn: u64) -> PageInfo {
    PageInfo {
        pfn: Pfn(pfn),
        managed: true,
        attr: MemAttr::WriteBack,
    }
}

/// A sparse pool of user addresses spread over the 48-bit space, so that
/// mappings share some tables and not others.
fn pool() -> Vec<u64> {
    let mut v = Vec::new();
    for hi in [0u64, 1, 255] {
        for mid in [0u64, 3] {
            for lo in [0u64, 1, 2, 511] {
                v.push((hi << 39) | (mid << 21) | (lo << 12) | 0x1000_0000);
            }
        }
    }
    v
}

#[derive(Clone, Debug)]
enum Op {
    Enter {
        at: usize,
        pfn: u64,
        write: bool,
        wired: bool,
    },
    Remove {
        from: usize,
        len: usize,
    },
    Protect {
        from: usize,
        len: usize,
        write: bool,
    },
    Wire {
        at: usize,
        wired: bool,
    },
    Touch {
        at: usize,
        write: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let n = pool().len();
    prop_oneof![
        (0..n, 100u64..140, any::<bool>(), any::<bool>()).prop_map(|(at, pfn, write, wired)| {
            Op::Enter {
                at,
                pfn,
                write,
                wired,
            }
        }),
        (0..n, 1..6usize).prop_map(|(from, len)| Op::Remove { from, len }),
        (0..n, 1..6usize, any::<bool>()).prop_map(|(from, len, write)| Op::Protect {
            from,
            len,
            write
        }),
        (0..n, any::<bool>()).prop_map(|(at, wired)| Op::Wire { at, wired }),
        (0..n, any::<bool>()).prop_map(|(at, write)| Op::Touch { at, write }),
    ]
}

/// Model: va → (pfn, writable, wired).
type Model = BTreeMap<u64, (u64, bool, bool)>;

fn apply(vm: &Vm<X86Pmap>, sp: &X86Space, model: &mut Model, op: &Op) {
    let p = vm.pmap();
    let pool = pool();
    let range = |from: usize, len: usize| {
        (
            pool[from],
            pool[(from + len).min(pool.len() - 1)].max(pool[from] + PAGE),
        )
    };
    match *op {
        Op::Enter {
            at,
            pfn,
            write,
            wired,
        } => {
            let prot = if write { Prot::RW } else { Prot::READ };
            p.enter(
                sp,
                VirtAddr(pool[at]),
                Mapping::new(page(pfn), prot)
                    .access(Prot::READ)
                    .wired(wired),
            )
            .unwrap();
            model.insert(pool[at], (pfn, write, wired));
        }
        Op::Remove { from, len } => {
            let (s, e) = range(from, len);
            p.remove(sp, VirtAddr(s)..VirtAddr(e), &mut |_| {});
            model.retain(|&va, _| !(s..e).contains(&va));
        }
        Op::Protect { from, len, write } => {
            let (s, e) = range(from, len);
            let prot = if write { Prot::RW } else { Prot::READ };
            p.protect(sp, VirtAddr(s)..VirtAddr(e), prot, &mut |_| {});
            for (_, m) in model.range_mut(s..e) {
                m.1 &= write;
            }
        }
        Op::Wire { at, wired } => {
            p.change_wiring(sp, VirtAddr(pool[at]), wired);
            if let Some(m) = model.get_mut(&pool[at]) {
                m.2 = wired;
            }
        }
        Op::Touch { at, write } => {
            let a = if write {
                Access::USER_WRITE
            } else {
                Access::USER_READ
            };
            let got = p.translate_access(sp, pool[at], a);
            let want = model.get(&pool[at]).is_some_and(|m| m.1 || !write);
            assert_eq!(got.is_ok(), want, "{op:?} -> {got:?}");
        }
    }
}

fn check(vm: &Vm<X86Pmap>, sp: &X86Space, model: &Model) {
    let p = vm.pmap();
    for va in pool() {
        let want = model.get(&va);
        assert_eq!(
            p.extract(sp, VirtAddr(va)),
            want.map(|m| Pfn(m.0)),
            "extract {va:#x}"
        );
        if let Some(&(pfn, write, wired)) = want {
            let pte = p.pte(sp, va).unwrap();
            assert_eq!(pte & PteFlags::WRITABLE.bits() != 0, write, "RW of {va:#x}");
            assert_eq!(pte & PteFlags::WIRED.bits() != 0, wired, "W of {va:#x}");
            let t = p.translate_access(sp, va, Access::USER_READ).unwrap();
            assert_eq!(t.pa.as_u64(), pfn * PAGE);
        } else {
            assert!(matches!(
                p.translate_access(sp, va, Access::USER_READ),
                Err(Fault::PageFault(_))
            ));
        }
    }
    assert_eq!(sp.resident_count(), model.len() as u64);
    assert_eq!(
        sp.wired_count(),
        model.values().filter(|m| m.2).count() as u64
    );
    let mut per_pfn: BTreeMap<u64, usize> = BTreeMap::new();
    for m in model.values() {
        *per_pfn.entry(m.0).or_default() += 1;
    }
    for pfn in 100..140 {
        assert_eq!(
            p.mapping_count(Pfn(pfn)),
            per_pfn.get(&pfn).copied().unwrap_or(0),
            "pv of {pfn}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x0dd_ba11),
        ..ProptestConfig::default()
    })]

    #[test]
    fn pmap_agrees_with_a_plain_model(ops in prop::collection::vec(op(), 1..60), five in any::<bool>()) {
        let (vm, sp) = machine(if five { X86Pmap::new_la57() } else { X86Pmap::new() });
        let free = vm.free_pages();
        let mut model = Model::new();
        for op in &ops {
            apply(&vm, &sp, &mut model, op);
            check(&vm, &sp, &model);
        }
        vm.pmap().remove(&sp, VirtAddr(0)..VirtAddr(1 << 47), &mut |_| {});
        prop_assert_eq!(vm.pmap().table_pages(&sp), 1, "every table but the root is freed");
        prop_assert_eq!(vm.free_pages(), free);
        vm.pmap().destroy_space(&sp);
    }
}

#[test]
fn tables_are_made_and_freed_level_by_level() {
    for (pmap, levels) in [(X86Pmap::new(), 4), (X86Pmap::new_la57(), 5)] {
        let (vm, sp) = machine(pmap);
        let free = vm.free_pages();
        vm.pmap()
            .enter(
                &sp,
                VirtAddr(0x4000_0000),
                Mapping::new(page(200), Prot::RW).access(Prot::READ),
            )
            .unwrap();
        assert_eq!(vm.pmap().table_pages(&sp), levels);
        assert_eq!(vm.free_pages(), free - (levels as u64 - 1));
        vm.pmap()
            .enter(
                &sp,
                VirtAddr(0x4000_1000),
                Mapping::new(page(201), Prot::RW).access(Prot::READ),
            )
            .unwrap();
        assert_eq!(vm.pmap().table_pages(&sp), levels, "same leaf table");
        vm.pmap().remove(
            &sp,
            VirtAddr(0x4000_0000)..VirtAddr(0x4000_2000),
            &mut |_| {},
        );
        assert_eq!(vm.pmap().table_pages(&sp), 1);
        assert_eq!(vm.free_pages(), free);
    }
}

#[test]
fn five_level_tables_reach_above_47_bits() {
    let (vm, sp) = machine(X86Pmap::new_la57());
    let va = 0x00f0_0000_0000_0000;
    vm.pmap()
        .enter(
            &sp,
            VirtAddr(va),
            Mapping::new(page(300), Prot::READ).access(Prot::READ),
        )
        .unwrap();
    assert_eq!(vm.pmap().extract(&sp, VirtAddr(va)), Some(Pfn(300)));
    let (vm4, sp4) = machine(X86Pmap::new());
    assert_eq!(
        vm4.pmap().enter(
            &sp4,
            VirtAddr(va),
            Mapping::new(page(300), Prot::READ).access(Prot::READ)
        ),
        Err(PmapError::BadAddress(VirtAddr(va)))
    );
}

#[test]
fn entries_carry_freebsd_bits() {
    let (vm, sp) = machine(X86Pmap::new());
    let p = vm.pmap();
    p.enter(
        &sp,
        VirtAddr(0x10_0000),
        Mapping::new(page(150), Prot::RW)
            .access(Prot::WRITE)
            .wired(true),
    )
    .unwrap();
    let e = p.pte(&sp, 0x10_0000).unwrap();
    let want = PteFlags::PRESENT
        | PteFlags::WRITABLE
        | PteFlags::USER
        | PteFlags::ACCESSED
        | PteFlags::DIRTY
        | PteFlags::WIRED
        | PteFlags::MANAGED
        | PteFlags::NO_EXECUTE;
    assert_eq!(e, (150 * PAGE) | want.bits());
    // enter_quick: V, U, MANAGED, NX; never A, M or RW.
    assert!(p.enter_quick(&sp, VirtAddr(0x10_1000), page(151), Prot::RW));
    assert_eq!(
        p.pte(&sp, 0x10_1000).unwrap(),
        (151 * PAGE)
            | (PteFlags::PRESENT | PteFlags::USER | PteFlags::MANAGED | PteFlags::NO_EXECUTE)
                .bits()
    );
    assert!(
        !p.enter_quick(&sp, VirtAddr(0x10_1000), page(152), Prot::RW),
        "never replaces"
    );
    // Execute permission clears NX.
    p.enter(
        &sp,
        VirtAddr(0x10_2000),
        Mapping::new(page(153), Prot::READ | Prot::EXECUTE).access(Prot::READ),
    )
    .unwrap();
    assert_eq!(
        p.pte(&sp, 0x10_2000).unwrap() & PteFlags::NO_EXECUTE.bits(),
        0
    );
}

#[test]
fn device_pages_get_cache_bits_and_no_pv_entry() {
    let (vm, sp) = machine(X86Pmap::new());
    let dev = PageInfo {
        pfn: Pfn(0xfd000),
        managed: false,
        attr: MemAttr::WriteCombining,
    };
    vm.pmap()
        .enter(
            &sp,
            VirtAddr(0x20_0000),
            Mapping::new(dev, Prot::RW).access(Prot::READ),
        )
        .unwrap();
    let e = vm.pmap().pte(&sp, 0x20_0000).unwrap();
    assert_eq!(
        e & (PteFlags::WRITE_THROUGH | PteFlags::NO_CACHE | PteFlags::PTE_PAT).bits(),
        0x90,
        "WC = PAT slot 6"
    );
    assert_eq!(e & PteFlags::MANAGED.bits(), 0);
    assert_eq!(vm.pmap().mapping_count(Pfn(0xfd000)), 0);
    let uc = PageInfo {
        attr: MemAttr::Uncacheable,
        ..dev
    };
    vm.pmap()
        .enter(
            &sp,
            VirtAddr(0x20_1000),
            Mapping::new(uc, Prot::RW).access(Prot::READ),
        )
        .unwrap();
    assert_eq!(vm.pmap().pte(&sp, 0x20_1000).unwrap() & 0x98, 0x18);
}

#[test]
fn downgrades_flush_and_upgrades_from_not_present_do_not() {
    let (vm, sp) = machine(X86Pmap::new());
    let p = vm.pmap();
    let flushed = || p.tlb_stats().get().0;
    p.enter(
        &sp,
        VirtAddr(0x30_0000),
        Mapping::new(page(160), Prot::READ).access(Prot::READ),
    )
    .unwrap();
    assert_eq!(flushed(), 0, "not present -> present needs no flush");
    p.enter(
        &sp,
        VirtAddr(0x30_0000),
        Mapping::new(page(160), Prot::RW).access(Prot::READ),
    )
    .unwrap();
    assert_eq!(flushed(), 0, "read-only -> writable needs no flush");
    p.protect(
        &sp,
        VirtAddr(0x30_0000)..VirtAddr(0x30_1000),
        Prot::READ,
        &mut |_| {},
    );
    assert_eq!(flushed(), 1, "writable -> read-only must flush");
    p.enter(
        &sp,
        VirtAddr(0x30_0000),
        Mapping::new(page(161), Prot::READ).access(Prot::READ),
    )
    .unwrap();
    assert_eq!(flushed(), 2, "a frame change must flush");
    p.remove(&sp, VirtAddr(0x30_0000)..VirtAddr(0x30_1000), &mut |_| {});
    assert!(flushed() >= 3, "present -> not present must flush");
    // A prefaulted mapping the CPU never used cannot be cached.
    let before = flushed();
    assert!(p.enter_quick(&sp, VirtAddr(0x31_0000), page(162), Prot::READ));
    p.enter(
        &sp,
        VirtAddr(0x31_1000),
        Mapping::new(page(163), Prot::READ).access(Prot::READ),
    )
    .unwrap();
    p.remove(&sp, VirtAddr(0x31_0000)..VirtAddr(0x31_1000), &mut |_| {});
    assert_eq!(flushed(), before, "never-accessed entry: no flush owed");
    // ...but once used, it can.
    assert!(p.enter_quick(&sp, VirtAddr(0x31_0000), page(162), Prot::READ));
    p.translate_access(&sp, 0x31_0000, Access::USER_READ)
        .unwrap();
    p.remove(&sp, VirtAddr(0x31_0000)..VirtAddr(0x31_1000), &mut |_| {});
    assert_eq!(flushed(), before + 1);
    // remove_all flushes every space's mapping.
    let sp2 = p.create_space().unwrap();
    p.enter(
        &sp,
        VirtAddr(0x32_0000),
        Mapping::new(page(170), Prot::RW).access(Prot::READ),
    )
    .unwrap();
    p.enter(
        &sp2,
        VirtAddr(0x32_0000),
        Mapping::new(page(170), Prot::RW).access(Prot::READ),
    )
    .unwrap();
    let before = flushed();
    let rm = p.remove_all(Pfn(170));
    assert!(rm.referenced);
    // One per mapping, plus the paging-structure entries of the second
    // space's tables, which its last mapping leaves empty.
    assert!(flushed() >= before + 2);
    assert_eq!(p.mapping_count(Pfn(170)), 0);
    assert_eq!(p.table_pages(&sp2), 1);
}

#[test]
fn referenced_and_modified_bits_reach_the_core() {
    let (vm, sp) = machine(X86Pmap::new());
    let p = vm.pmap();
    p.enter(
        &sp,
        VirtAddr(0x40_0000),
        Mapping::new(page(180), Prot::RW).access(Prot::READ),
    )
    .unwrap();
    assert!(!p.is_modified(Pfn(180)));
    p.translate_access(&sp, 0x40_0000, Access::USER_WRITE)
        .unwrap();
    assert!(p.is_modified(Pfn(180)));
    p.clear_modify(Pfn(180));
    assert!(!p.is_modified(Pfn(180)));
    assert_eq!(p.ts_referenced(Pfn(180)), 1);
    assert_eq!(p.ts_referenced(Pfn(180)), 0, "cleared by the first call");
    p.translate_access(&sp, 0x40_0000, Access::USER_WRITE)
        .unwrap();
    let mut got = Vec::new();
    p.protect(
        &sp,
        VirtAddr(0x40_0000)..VirtAddr(0x40_1000),
        Prot::READ,
        &mut |d| got.push(d),
    );
    assert_eq!(got.len(), 1);
    assert!(got[0].modified, "losing write hands M to the page");
    let rm = p.page_protect(Pfn(180), Prot::READ);
    assert!(!rm.modified);
}

#[test]
fn software_mmu_reports_the_cpu_error_codes() {
    let (vm, sp) = machine(X86Pmap::new());
    let p = vm.pmap();
    let code = |c: u64| Err(Fault::PageFault(PfErrorCode::from_bits_truncate(c)));
    // Not present: P clear; W/U/I say what was tried.
    assert_eq!(
        p.translate_access(&sp, 0x50_0000, Access::USER_WRITE)
            .map(|_| ()),
        code(0x6)
    );
    assert_eq!(
        p.translate_access(&sp, 0x50_0000, Access::USER_READ)
            .map(|_| ()),
        code(0x4)
    );
    p.enter(
        &sp,
        VirtAddr(0x50_0000),
        Mapping::new(page(190), Prot::READ).access(Prot::READ),
    )
    .unwrap();
    assert_eq!(
        p.translate_access(&sp, 0x50_0000, Access::USER_WRITE)
            .map(|_| ()),
        code(0x7)
    );
    assert_eq!(
        p.translate_access(&sp, 0x50_0000, Access::USER_EXEC)
            .map(|_| ()),
        code(0x15)
    );
    let kernel_write = Access {
        write: true,
        exec: false,
        user: false,
    };
    assert_eq!(
        p.translate_access(&sp, 0x50_0000, kernel_write).map(|_| ()),
        code(0x3),
        "CR0.WP"
    );
    // A reserved bit (51, above MAXPHYADDR 46) is a RSVD fault.
    let slot_va = 0x50_0000;
    let pte = p.pte(&sp, slot_va).unwrap();
    set_pte(&vm, &sp, slot_va, pte | 1 << 51);
    assert_eq!(
        p.translate_access(&sp, slot_va, Access::USER_READ)
            .map(|_| ()),
        code(0xd)
    );
    set_pte(&vm, &sp, slot_va, pte);
    // Non-canonical.
    assert_eq!(
        p.translate_access(&sp, 0x0000_8000_0000_0000, Access::USER_READ)
            .map(|_| ()),
        Err(Fault::NonCanonical)
    );
    // A and D: a read sets A everywhere, a write sets D on the leaf.
    p.enter(
        &sp,
        VirtAddr(0x51_0000),
        Mapping::new(page(191), Prot::RW).access(Prot::NONE),
    )
    .unwrap();
    set_pte(
        &vm,
        &sp,
        0x51_0000,
        p.pte(&sp, 0x51_0000).unwrap() & !(PteFlags::ACCESSED | PteFlags::DIRTY).bits(),
    );
    p.translate_access(&sp, 0x51_0000, Access::USER_READ)
        .unwrap();
    let e = p.pte(&sp, 0x51_0000).unwrap();
    assert_eq!(
        (
            e & PteFlags::ACCESSED.bits() != 0,
            e & PteFlags::DIRTY.bits() != 0
        ),
        (true, false)
    );
    p.translate_access(&sp, 0x51_0000, Access::USER_WRITE)
        .unwrap();
    assert_ne!(p.pte(&sp, 0x51_0000).unwrap() & PteFlags::DIRTY.bits(), 0);
}

/// Overwrites the leaf entry of `va` (tests only).
fn set_pte(vm: &Vm<X86Pmap>, sp: &X86Space, va: u64, value: u64) {
    let mut table = PhysAddr(sp.root());
    for level in Level::PML4.down_to(Level::PD) {
        let e = tables::entry_at(vm.phys(), table, index(VirtAddr(va), level)).unwrap();
        table = PhysAddr(e.load(Ordering::Acquire) & 0x000f_ffff_ffff_f000);
    }
    tables::entry_at(vm.phys(), table, index(VirtAddr(va), Level::PT))
        .unwrap()
        .store(value, Ordering::Release);
}

/// `enter_quick_run` (one lock, one walk per leaf table) makes exactly the
/// entries, pv entries and counts that `enter_quick` page by page makes:
/// across a leaf-table boundary, over holes, beside existing mappings it
/// must not replace, and up to the end of user space, where it stops.
#[test]
fn a_quick_run_equals_quick_entries_one_by_one() {
    let (vm, run_space) = machine(X86Pmap::new());
    let p = vm.pmap();
    let each_space = p.create_space().unwrap();
    let user_end = p.mode().paging.user_end();
    let mut total = 0;
    for (start, len) in [
        (2 * 0x20_0000 - 5 * PAGE, 12u64), // crosses into the next table
        (0x7_0000_0000, 64),
        (user_end - 3 * PAGE, 6), // the last three are not user addresses
    ] {
        // Something already mapped at the second page of the run.
        for sp in [&run_space, &each_space] {
            p.enter(
                sp,
                VirtAddr(start + PAGE),
                Mapping::new(page(400), Prot::RW).access(Prot::WRITE),
            )
            .unwrap();
        }
        let pages: Vec<Option<PageInfo>> = (0..len)
            .map(|i| (i % 5 != 2).then(|| page(200 + i)))
            .collect();
        let made = p.enter_quick_run(&run_space, VirtAddr(start), &pages, Prot::READ);
        let mut made_each = 0;
        for (i, pg) in (0u64..).zip(&pages) {
            if let Some(pg) = pg {
                made_each += usize::from(p.enter_quick(
                    &each_space,
                    VirtAddr(start + i * PAGE),
                    *pg,
                    Prot::READ,
                ));
            }
        }
        assert_eq!(made, made_each, "run at {start:#x}");
        assert!(made > 0);
        total += made;
        for i in 0..len {
            let va = start + i * PAGE;
            assert_eq!(p.pte(&run_space, va), p.pte(&each_space, va), "{va:#x}");
        }
    }
    assert_eq!(run_space.resident_count(), each_space.resident_count());
    assert_eq!(p.table_pages(&run_space), p.table_pages(&each_space));
    let pv: usize = (200..264).map(|pfn| p.mapping_count(Pfn(pfn))).sum();
    assert_eq!(pv, 2 * total, "one pv entry per mapping, in each space");
    // The entries the run made work for the MMU: read yes, write no.
    let va = 2 * 0x20_0000 - 5 * PAGE;
    assert_eq!(
        p.translate(&run_space, VirtAddr(va), Prot::READ),
        Some(Pfn(200))
    );
    assert_eq!(p.translate(&run_space, VirtAddr(va), Prot::WRITE), None);
}

/// Page-table pages come back to the pool of known-zero frames when they
/// are emptied, so the next table (or zero-fill page) taken from it needs
/// no zeroing on the fault path; the pool never gets a frame that is not
/// zero.
#[test]
fn emptied_tables_return_to_the_zeroed_pool() {
    let (vm, sp) = machine(X86Pmap::new());
    let p = vm.pmap();
    let va = 0x55_4000_3000u64; // a fresh PDPT, PD and PT
    let zeroed_before = vm.free_zeroed_pages();
    p.enter(
        &sp,
        VirtAddr(va),
        Mapping::new(page(300), Prot::RW).access(Prot::WRITE),
    )
    .unwrap();
    assert_eq!(
        vm.free_zeroed_pages(),
        zeroed_before - 3,
        "three tables taken"
    );
    p.remove(&sp, VirtAddr(va)..VirtAddr(va + PAGE), &mut |_| {});
    assert_eq!(
        vm.free_zeroed_pages(),
        zeroed_before,
        "the three emptied tables are back as zeroed frames"
    );
    // The root goes back zeroed too; a new space's tables read as zeros.
    p.destroy_space(&sp);
    assert_eq!(vm.free_zeroed_pages(), zeroed_before + 1);
    let again = p.create_space().unwrap();
    p.enter(
        &again,
        VirtAddr(va),
        Mapping::new(page(301), Prot::READ).access(Prot::READ),
    )
    .unwrap();
    let root = Pfn(again.root() >> 12);
    let nonzero = (0..512usize)
        .filter(|i| {
            let mut b = [0u8; 8];
            vm.phys().read(root, i * 8, &mut b);
            u64::from_le_bytes(b) != 0
        })
        .count();
    assert_eq!(nonzero, 1, "the new root holds exactly its one entry");
    assert_eq!(
        p.translate(&again, VirtAddr(va), Prot::READ),
        Some(Pfn(301))
    );
}
