//! Red team: `visit` (the walk under `remove`, `protect` and
//! `destroy_space`) stops scanning a table the range covers whole once it
//! has seen as many valid entries as the table's count says (commits
//! 9edaeb4, ea24db1). If any path left a table's count below its real
//! number of present entries, a remove would leave a stale mapping (a use
//! after free of the frame) and a protect would leave a writable page.
//!
//! Every test here checks the tables against a model after the operations
//! (`extract`, `pte`, resident counts, `table_pages`) and ends by taking
//! the space down to its root, which only works if every table's count
//! was right. Debug builds also trip the `debug_assert` in `visit`; the
//! suite is meant to be run with `--release` too, where only the model
//! checks catch a short count.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use vm_core::pmap::{PageInfo, Pmap};
use vm_core::{Mapping, MemAttr, Pfn, Prot, SuperpagePolicy, VirtAddr, Vm, VmConfig};
use vm_pmap_x86_64::{X86Pmap, X86Space};
use vm_testkit::support::Rng;
use vm_testkit::test_config;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
const P: u64 = 0x1;
const RW: u64 = 0x2;
const PS: u64 = 0x80;

fn machine(la57: bool, pages: u64) -> Arc<Vm<X86Pmap>> {
    let p = if la57 {
        X86Pmap::new_la57()
    } else {
        X86Pmap::new()
    };
    Vm::new(p, test_config(pages)).unwrap()
}

fn user_end(la57: bool) -> u64 {
    if la57 { 1 << 56 } else { 1 << 47 }
}

fn mapping(pfn: u64, prot: Prot, wired: bool) -> Mapping {
    Mapping::new(
        PageInfo {
            pfn: Pfn(pfn),
            managed: true,
            attr: MemAttr::WriteBack,
        },
        prot,
    )
    .access(prot & Prot::WRITE)
    .wired(wired)
}

fn r(a: u64, b: u64) -> std::ops::Range<VirtAddr> {
    VirtAddr(a)..VirtAddr(b)
}

/// va -> (frame, writable, wired): what the tables must say.
type Model = BTreeMap<u64, (u64, bool, bool)>;

/// Every address ever touched maps exactly what the model says (frame,
/// write right, wiring); the resident and wired counts agree.
fn check(p: &X86Pmap, s: &X86Space, model: &Model, touched: &BTreeSet<u64>, what: &str) {
    for &va in touched {
        let got = p.extract(s, VirtAddr(va));
        match model.get(&va) {
            Some(&(pfn, w, _)) => {
                assert_eq!(got, Some(Pfn(pfn)), "{what}: {va:#x} lost its mapping");
                let e = p.pte(s, va).unwrap();
                assert_eq!(
                    e & RW != 0,
                    w,
                    "{what}: {va:#x} write right {e:#x}, model says {w}"
                );
            }
            None => assert_eq!(got, None, "{what}: {va:#x} is still mapped (stale entry)"),
        }
    }
    assert_eq!(s.resident_count(), model.len() as u64, "{what}: resident");
    let wired = model.values().filter(|v| v.2).count() as u64;
    assert_eq!(s.wired_count(), wired, "{what}: wired");
}

/// Addresses at the edges and middles of tables of every level: a table's
/// first, second, middle and last slots, at each level below the root.
fn edge_pool(la57: bool) -> Vec<u64> {
    let mut v = Vec::new();
    let tops: &[u64] = if la57 { &[0, 1, 255] } else { &[0] };
    for &l5 in tops {
        for l4 in [0u64, 1, 255] {
            for l3 in [0u64, 1, 511] {
                for l2 in [0u64, 255, 511] {
                    for l1 in [0u64, 1, 256, 511] {
                        let va = (l5 << 48) | (l4 << 39) | (l3 << 30) | (l2 << 21) | (l1 << 12);
                        if va != 0 {
                            v.push(va);
                        }
                    }
                }
            }
        }
    }
    v
}

/// A range that covers whole tables of some level around `va` (so `visit`
/// trusts their counts), or a ragged one.
fn pick_range(rng: &mut Rng, pool: &[u64], la57: bool) -> (u64, u64) {
    let va = pool[rng.below(pool.len() as u64) as usize];
    let spans: &[u64] = if la57 {
        &[SUPER, GIB, 512 * GIB, 256 * 512 * GIB]
    } else {
        &[SUPER, GIB, 512 * GIB]
    };
    match rng.below(4) {
        0..=1 => {
            let span = spans[rng.below(spans.len() as u64) as usize];
            let start = va & !(span - 1);
            let n = 1 + rng.below(2);
            (start, (start + n * span).min(user_end(la57)))
        }
        2 => {
            let other = pool[rng.below(pool.len() as u64) as usize];
            let (a, b) = (va.min(other), va.max(other));
            (a, b + PAGE)
        }
        _ => (va, va + PAGE * (1 + rng.below(600))),
    }
}

/// The fuzz body: enters (single, quick runs crossing tables, replacing
/// frames), wiring changes, removes and protects of whole-table and ragged
/// ranges, per-frame removals (`remove_all`, which empties leaf tables
/// under the shared lock) and write-protects, checked after every step.
fn fuzz(la57: bool, seed: u64, steps: usize, end_with_destroy: bool) {
    let vm = machine(la57, 8192);
    let p = vm.pmap();
    let mut balloon = vm.inflate_balloon(1024);
    let frames: Vec<u64> = balloon.frames().map(|f| f.0).collect();
    let s = p.create_space().unwrap();
    let pool = edge_pool(la57);
    let mut rng = Rng::new(seed);
    let mut model = Model::new();
    let mut touched = BTreeSet::new();
    for step in 0..steps {
        let what = format!("seed {seed} step {step}");
        match rng.below(10) {
            0..=3 => {
                let va = pool[rng.below(pool.len() as u64) as usize];
                let pfn = frames[rng.below(frames.len() as u64) as usize];
                let w = rng.below(2) == 0;
                let wired = rng.below(4) == 0;
                let prot = if w { Prot::RW } else { Prot::READ };
                p.enter(&s, VirtAddr(va), mapping(pfn, prot, wired))
                    .unwrap();
                model.insert(va, (pfn, w, wired));
                touched.insert(va);
            }
            4 => {
                // A quick run crossing a leaf table's end, with holes.
                let va = pool[rng.below(pool.len() as u64) as usize];
                let start = (va & !(SUPER - 1)) + SUPER - PAGE * (1 + rng.below(8));
                let n = 2 + rng.below(16);
                let pages: Vec<Option<PageInfo>> = (0..n)
                    .map(|_| {
                        (rng.below(3) != 0).then(|| PageInfo {
                            pfn: Pfn(frames[rng.below(frames.len() as u64) as usize]),
                            managed: true,
                            attr: MemAttr::WriteBack,
                        })
                    })
                    .collect();
                if start + n * PAGE > user_end(la57) {
                    continue;
                }
                p.enter_quick_run(&s, VirtAddr(start), &pages, Prot::READ);
                for (i, pg) in pages.iter().enumerate() {
                    let va = start + i as u64 * PAGE;
                    if let Some(pg) = pg {
                        model.entry(va).or_insert((pg.pfn.0, false, false));
                        touched.insert(va);
                    }
                }
            }
            5 => {
                if let Some((&va, _)) = model.iter().nth(rng.below(model.len() as u64) as usize) {
                    let wired = rng.below(2) == 0;
                    p.change_wiring(&s, VirtAddr(va), wired);
                    model.get_mut(&va).unwrap().2 = wired;
                }
            }
            6 => {
                let (a, b) = pick_range(&mut rng, &pool, la57);
                p.remove(&s, r(a, b), &mut |_| {});
                let gone: Vec<u64> = model.range(a..b).map(|(&k, _)| k).collect();
                for k in gone {
                    model.remove(&k);
                }
            }
            7 => {
                let (a, b) = pick_range(&mut rng, &pool, la57);
                p.protect(&s, r(a, b), Prot::READ, &mut |_| {});
                for (_, v) in model.range_mut(a..b) {
                    v.1 = false;
                }
            }
            8 => {
                if let Some((_, &(pfn, _, _))) =
                    model.iter().nth(rng.below(model.len() as u64) as usize)
                {
                    if rng.below(2) == 0 {
                        p.remove_all(Pfn(pfn));
                        model.retain(|_, v| v.0 != pfn);
                    } else {
                        p.page_protect(Pfn(pfn), Prot::READ);
                        for v in model.values_mut().filter(|v| v.0 == pfn) {
                            v.1 = false;
                        }
                    }
                }
            }
            _ => {
                // The whole user range in one go, now and then.
                if rng.below(8) == 0 {
                    if rng.below(2) == 0 {
                        p.remove(&s, r(0, user_end(la57)), &mut |_| {});
                        model.clear();
                    } else {
                        p.protect(&s, r(0, user_end(la57)), Prot::READ, &mut |_| {});
                        for v in model.values_mut() {
                            v.1 = false;
                        }
                    }
                }
            }
        }
        check(p, &s, &model, &touched, &what);
    }
    if end_with_destroy {
        p.destroy_space(&s);
        for f in &frames {
            assert_eq!(
                p.mapping_count(Pfn(*f)),
                0,
                "frame {f} still has a pv entry"
            );
        }
    } else {
        p.remove(&s, r(0, user_end(la57)), &mut |_| {});
        check(p, &s, &Model::new(), &touched, "final remove");
        assert_eq!(p.table_pages(&s), 1, "only the root is left");
        p.destroy_space(&s);
    }
    balloon.deflate(u64::MAX);
    assert_eq!(vm.free_pages(), vm.total_pages(), "every table frame back");
    vm.check_consistency().unwrap();
}

/// v01: 4-level fuzz of sparse entries at tables' edge slots, every kind of
/// enter and whole-table remove/protect, checked after each step.
#[test]
fn v01_fuzz_four_level_edges() {
    for seed in 1..=3 {
        fuzz(false, seed, 300, seed % 2 == 0);
    }
}

/// v02: the same fuzz on 5-level (LA57) tables, whose root is the PML5 and
/// whose PML4 tables the ranges can cover whole.
#[test]
fn v02_fuzz_five_level_edges() {
    for seed in 11..=13 {
        fuzz(true, seed, 300, seed % 2 == 1);
    }
}

/// v03: superpages made both ways (promotion of a full leaf table under
/// SuperpagePolicy::Reserve, `enter_superpage` under Always) among sparse
/// 4 KiB pages in one page directory; a protect that covers the
/// directory whole but one superpage in part (demoted inside `visit`, the
/// count unchanged), then unmaps that cut superpages and cover tables
/// whole. No page stays writable after the read-only protect, none stays
/// mapped after its unmap, and only the root is left.
#[test]
fn v03_superpages_among_sparse_pages_protect_and_unmap() {
    for policy in [SuperpagePolicy::Reserve, SuperpagePolicy::Always] {
        let vm = Vm::new(
            X86Pmap::new(),
            VmConfig {
                superpages: policy,
                ..test_config(8192)
            },
        )
        .unwrap();
        let p = vm.pmap();
        let s = vm.new_space().unwrap();
        let base = 64 * GIB;
        s.map_anon(base, GIB, Prot::RW).unwrap();
        // Sparse pages at a directory's first and last leaf tables' edges.
        let sparse = [
            base,
            base + 511 * PAGE,
            base + 510 * SUPER,
            base + GIB - PAGE,
        ];
        for va in sparse {
            s.write(va, &va.to_le_bytes()).unwrap();
        }
        // Two whole 2 MiB written page by page (promoted, or entered
        // whole at the first write).
        let sps = [base + 8 * SUPER, base + 9 * SUPER];
        for sp in sps {
            for i in 0..512 {
                s.write_u8(sp + i * PAGE, (i as u8) | 1).unwrap();
            }
            let e = p.pte(s.pmap_space(), sp).unwrap();
            assert!(e & PS != 0, "{policy:?}: {sp:#x} not a superpage: {e:#x}");
        }
        let all: Vec<u64> = sparse
            .iter()
            .copied()
            .chain(
                sps.iter()
                    .flat_map(|&sp| (0..512).map(move |i| sp + i * PAGE)),
            )
            .collect();
        // Protect from the middle of the first superpage to the end: the
        // first superpage demoted, the second taken whole.
        let cut = sps[0] + 100 * PAGE;
        s.protect(cut, base + GIB - cut, Prot::READ).unwrap();
        for &va in &all {
            let e = p.pte(s.pmap_space(), va).unwrap();
            assert!(e & P != 0, "{policy:?}: {va:#x} lost");
            assert_eq!(
                e & RW != 0,
                va < cut,
                "{policy:?}: {va:#x} write right after protect: {e:#x}"
            );
        }
        // A write in the read-only part faults (SIGSEGV), not lands.
        assert!(s.write_u8(base + GIB - PAGE, 7).is_err());
        assert!(s.write_u8(sps[1] + 5 * PAGE, 7).is_err());
        // Back to RW over the whole directory, then unmap in pieces.
        s.protect(base, GIB, Prot::RW).unwrap();
        s.write_u8(sps[1] + 5 * PAGE, 9).unwrap();
        // One cut across the first two leaf tables (a sparse page in it),
        // one across both superpages.
        let cuts = [base + 300 * PAGE, sps[0] + 4 * PAGE];
        for c in cuts {
            s.unmap(c, SUPER).unwrap();
        }
        for &va in &all {
            let gone = cuts.iter().any(|&c| (c..c + SUPER).contains(&va));
            assert_eq!(
                s.extract(va).is_none(),
                gone,
                "{policy:?}: {va:#x} after the cutting unmap"
            );
        }
        assert_eq!(s.read_u8(sps[1] + 5 * PAGE).unwrap(), 9);
        s.unmap(base, GIB).unwrap();
        for &va in &all {
            assert_eq!(s.extract(va), None, "{policy:?}: {va:#x} still mapped");
            assert_eq!(p.pte(s.pmap_space(), va).map(|e| e & P), None);
        }
        assert_eq!(p.table_pages(s.pmap_space()), 1, "{policy:?}: tables left");
        vm.check_consistency().unwrap();
    }
}

/// v04: enters that fail for want of memory partway down a new path (the
/// tables made on the way stay empty until pruned, their parents counting
/// them), at every depth the shortage can strike, then entries beside them
/// and a whole remove: nothing left behind, every frame back.
#[test]
fn v04_failed_enters_under_shortage_then_whole_remove() {
    for la57 in [false, true] {
        let vm = machine(la57, 1024);
        let p = vm.pmap();
        let mut frames = vm.inflate_balloon(64);
        let data: Vec<u64> = frames.frames().map(|f| f.0).collect();
        let s = p.create_space().unwrap();
        let levels = if la57 { 5 } else { 4 };
        let mut model = Model::new();
        let mut touched = BTreeSet::new();
        for (k, room) in (0..levels).enumerate() {
            // Far apart: each va needs a fresh path under the root.
            let va = (k as u64 + 1) * if la57 { 1 << 48 } else { 1 << 39 } + 7 * PAGE;
            let mut squeeze = vm.inflate_balloon(u64::MAX);
            squeeze.deflate(room);
            assert_eq!(vm.free_pages(), room);
            let got = p.enter(&s, VirtAddr(va), mapping(data[k], Prot::RW, false));
            touched.insert(va);
            if room + 1 < levels {
                assert!(got.is_err(), "la57 {la57}: enter with {room} frames");
                assert_eq!(p.extract(&s, VirtAddr(va)), None);
            } else {
                got.unwrap();
                model.insert(va, (data[k], true, false));
            }
            drop(squeeze);
            // Neighbours in the same tables, now that memory is back.
            for j in 0..3 {
                let nb = (va & !(SUPER - 1)) + j * 255 * PAGE + 2 * SUPER * j;
                p.enter(
                    &s,
                    VirtAddr(nb),
                    mapping(data[8 + k * 3 + j as usize], Prot::RW, false),
                )
                .unwrap();
                model.insert(nb, (data[8 + k * 3 + j as usize], true, false));
                touched.insert(nb);
            }
            check(p, &s, &model, &touched, &format!("la57 {la57} room {room}"));
        }
        p.protect(&s, r(0, user_end(la57)), Prot::READ, &mut |_| {});
        for v in model.values_mut() {
            v.1 = false;
        }
        check(p, &s, &model, &touched, "protected");
        p.remove(&s, r(0, user_end(la57)), &mut |_| {});
        check(p, &s, &Model::new(), &touched, "removed");
        assert_eq!(p.table_pages(&s), 1, "la57 {la57}: only the root");
        p.destroy_space(&s);
        frames.deflate(u64::MAX);
        assert_eq!(vm.free_pages(), vm.total_pages());
        vm.check_consistency().unwrap();
    }
}

/// v05: enters, per-frame removals (`remove_all`, emptying a leaf table
/// under the shared lock before it is pruned) and wiring changes running
/// in one leaf table while another thread enters sparse pages in the
/// neighbouring leaf tables and page directory, then protects and removes
/// them with ranges that cover those tables whole. After each of its
/// removes none of its pages is mapped; after each protect none is
/// writable; at the end both threads' pages are as they left them and the
/// space comes down to its root.
#[test]
fn v05_concurrent_enters_beside_whole_table_removes() {
    let vm = machine(false, 4096);
    let p = vm.pmap();
    let mut balloon = vm.inflate_balloon(256);
    let frames: Vec<u64> = balloon.frames().map(|f| f.0).collect();
    let s = p.create_space().unwrap();
    let base = 3 * GIB;
    // Thread A's leaf table: base..base + 2 MiB. Thread B's: the next
    // three leaf tables and the whole next directory.
    let b_pages: Vec<u64> = [SUPER, 2 * SUPER, 3 * SUPER]
        .iter()
        .flat_map(|&t| [0, 1, 256, 511].map(|i| base + t + i * PAGE))
        .chain([GIB, GIB + 511 * SUPER + 511 * PAGE].map(|o| base + o))
        .collect();
    let stop = AtomicBool::new(false);
    let go = Barrier::new(2);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            go.wait();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let va = base + (i % 512) * PAGE;
                let f = frames[(i % 64) as usize];
                p.enter(&s, VirtAddr(va), mapping(f, Prot::RW, i % 3 == 0))
                    .unwrap();
                if i % 5 == 0 {
                    p.change_wiring(&s, VirtAddr(va), false);
                }
                if i % 7 == 0 {
                    p.remove_all(Pfn(f));
                }
                i += 1;
            }
            // Leave A's table as a known state: every page of it removed.
            p.remove(&s, r(base, base + SUPER), &mut |_| {});
        });
        sc.spawn(|| {
            go.wait();
            for round in 0..150u64 {
                for (k, &va) in b_pages.iter().enumerate() {
                    let f = frames[128 + (k as u64 + round) as usize % 64];
                    p.enter(&s, VirtAddr(va), mapping(f, Prot::RW, k % 2 == 0))
                        .unwrap();
                }
                if round % 2 == 0 {
                    p.protect(&s, r(base + SUPER, base + 2 * GIB), Prot::READ, &mut |_| {});
                    for &va in &b_pages {
                        let e = p.pte(&s, va).unwrap();
                        assert_eq!(e & (P | RW), P, "round {round}: {va:#x} {e:#x}");
                    }
                }
                p.remove(&s, r(base + SUPER, base + 2 * GIB), &mut |_| {});
                for &va in &b_pages {
                    assert_eq!(
                        p.extract(&s, VirtAddr(va)),
                        None,
                        "round {round}: {va:#x} stale after remove"
                    );
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    });
    assert_eq!(s.resident_count(), 0);
    assert_eq!(s.wired_count(), 0);
    p.remove(&s, r(0, user_end(false)), &mut |_| {});
    assert_eq!(p.table_pages(&s), 1);
    p.destroy_space(&s);
    for f in &frames {
        assert_eq!(p.mapping_count(Pfn(*f)), 0);
    }
    balloon.deflate(u64::MAX);
    assert_eq!(vm.free_pages(), vm.total_pages());
    vm.check_consistency().unwrap();
}

/// v06: through vm-core on 5-level tables: pages at leaf tables' edges in
/// four page directories, a fork (the parent write-protected, the child's
/// reads possibly prefaulting neighbours), copy-on-write in the child,
/// then mprotect read-only and munmap of ranges covering whole tables in
/// parent and child: no writable page after the protect, no mapping after
/// the unmap, data intact where still mapped, tables all freed.
#[test]
fn v06_fork_protect_unmap_whole_tables_la57() {
    let vm = Vm::new(
        X86Pmap::new_la57(),
        VmConfig {
            user_max: 1 << 56,
            ..test_config(8192)
        },
    )
    .unwrap();
    let p = vm.pmap();
    let s = vm.new_space().unwrap();
    let base = 1u64 << 48; // second PML5 slot
    let len = 4 * GIB;
    s.map_anon(base, len, Prot::RW).unwrap();
    let pages: Vec<u64> = (0..4u64)
        .flat_map(|g| [0u64, 1, 255, 511].map(move |t| base + g * GIB + t * SUPER))
        .flat_map(|t| [0u64, 1, 510, 511].map(move |i| t + i * PAGE))
        .collect();
    for &va in &pages {
        s.write(va, &va.to_le_bytes()).unwrap();
    }
    let child = s.fork().unwrap();
    for sp in [&s, &child] {
        for &va in &pages {
            let mut b = [0u8; 8];
            sp.read(va, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), va);
        }
    }
    // Child writes half (copy on write), then both protect all.
    for &va in pages.iter().step_by(2) {
        child.write(va, &(!va).to_le_bytes()).unwrap();
    }
    for sp in [&s, &child] {
        sp.protect(base, len, Prot::READ).unwrap();
        for &va in &pages {
            if let Some(e) = p.pte(sp.pmap_space(), va) {
                assert_eq!(e & RW, 0, "{va:#x} writable after protect: {e:#x}");
            }
        }
    }
    // Unmap the parent's first 2 GiB (whole directories), then all.
    s.unmap(base, 2 * GIB).unwrap();
    for &va in &pages {
        if va < base + 2 * GIB {
            assert_eq!(s.extract(va), None, "{va:#x} stale in the parent");
        } else {
            assert_eq!(s.read_u8(va).unwrap(), va as u8, "parent's {va:#x}");
        }
    }
    for (k, &va) in pages.iter().enumerate() {
        let mut b = [0u8; 8];
        child.read(va, &mut b).unwrap();
        let want = if k % 2 == 0 { !va } else { va };
        assert_eq!(u64::from_le_bytes(b), want, "child's {va:#x}");
    }
    s.unmap(base, len).unwrap();
    child.unmap(base, len).unwrap();
    for &va in &pages {
        assert_eq!(s.extract(va), None);
        assert_eq!(child.extract(va), None);
    }
    assert_eq!(p.table_pages(s.pmap_space()), 1);
    assert_eq!(p.table_pages(child.pmap_space()), 1);
    vm.check_consistency().unwrap();
}

/// v07: a promotion from `enter` (a full, in-line leaf table), demoted by
/// a 4 KiB `enter` of another frame inside it (the count stays 512 with
/// one entry replaced), re-promoted after that entry is put back, then
/// wired page by page (demoting) and protected and removed by ranges that
/// cover the directory whole: every page read-only after the protect and
/// unmapped after the remove.
#[test]
fn v07_promote_demote_replace_then_whole_directory() {
    let vm = machine(false, 8192);
    let p = vm.pmap();
    // Own frames one balloon each, keep an aligned run of 512 and a few
    // others, give the rest back (for tables): map only frames we own.
    let mut ones: BTreeMap<u64, vm_core::Balloon> = BTreeMap::new();
    loop {
        let b = vm.inflate_balloon(1);
        let Some(f) = b.frames().next() else { break };
        ones.insert(f.0, b);
    }
    let run = ones
        .keys()
        .copied()
        .filter(|f| f % 512 == 0)
        .find(|&f| (f..f + 512).all(|x| ones.contains_key(&x)))
        .expect("an aligned run");
    let odd = *ones.keys().find(|&&f| f >= run + 512 + 8).unwrap();
    let keep: BTreeSet<u64> = (run..run + 512).chain(odd..=odd + 4).collect();
    assert!(
        keep.iter().all(|f| ones.contains_key(f)),
        "odd frames owned"
    );
    ones.retain(|f, _| keep.contains(f));
    let s = p.create_space().unwrap();
    let base = 5 * GIB + 7 * SUPER;
    let m = |pfn: u64| mapping(pfn, Prot::RW, false);
    for i in 0..512 {
        p.enter(&s, VirtAddr(base + i * PAGE), m(run + i)).unwrap();
    }
    // Sparse neighbours in the same directory.
    let sparse = [5 * GIB, 5 * GIB + GIB - PAGE, base - PAGE, base + SUPER];
    for (k, &va) in sparse.iter().enumerate() {
        p.enter(&s, VirtAddr(va), m(odd + 1 + k as u64)).unwrap();
    }
    let ps = |va: u64| p.pte(&s, va).is_some_and(|e| e & PS != 0);
    assert!(ps(base), "promoted");
    // Another frame inside: demoted, the entry replaced.
    p.enter(&s, VirtAddr(base + 100 * PAGE), m(odd)).unwrap();
    assert!(!ps(base), "demoted");
    assert_eq!(p.extract(&s, VirtAddr(base + 100 * PAGE)), Some(Pfn(odd)));
    // Put back: promoted again.
    p.enter(&s, VirtAddr(base + 100 * PAGE), m(run + 100))
        .unwrap();
    assert!(ps(base), "promoted again");
    for i in (0..512).step_by(37) {
        p.change_wiring(&s, VirtAddr(base + i * PAGE), true);
    }
    assert_eq!(s.resident_count(), 512 + sparse.len() as u64);
    p.protect(&s, r(5 * GIB, 6 * GIB), Prot::READ, &mut |_| {});
    for va in (0..512).map(|i| base + i * PAGE).chain(sparse) {
        let e = p.pte(&s, va).unwrap();
        assert_eq!(e & (P | RW), P, "{va:#x} after protect: {e:#x}");
    }
    p.remove(&s, r(5 * GIB, 6 * GIB), &mut |_| {});
    for va in (0..512).map(|i| base + i * PAGE).chain(sparse) {
        assert_eq!(p.extract(&s, VirtAddr(va)), None, "{va:#x} stale");
    }
    assert_eq!((s.resident_count(), s.wired_count()), (0, 0));
    assert_eq!(p.table_pages(&s), 1);
    p.destroy_space(&s);
    drop(ones);
    assert_eq!(vm.free_pages(), vm.total_pages());
    vm.check_consistency().unwrap();
}
