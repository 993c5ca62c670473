//! Red team: `Pmap::enter_superpage` on the x86_64 pmap (one 2 MiB entry
//! written into an empty page-directory slot under the table-tree lock
//! taken exclusive with `try_write`, 512 pv entries, a spare table frame).
//!
//! Races against every other pmap operation on the same 2 MiB, destroy of
//! the space, the software MMU, running out of frames for tables, and a
//! single-threaded model in which `enter_superpage` must succeed exactly
//! when nothing is mapped in the 2 MiB.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vm_core::pmap::{Displaced, PageInfo, Pmap, PmapError};
use vm_core::{Mapping, MemAttr, Pfn, Prot, VirtAddr, Vm};
use vm_pmap_x86_64::mmu::Access;
use vm_pmap_x86_64::paging::Level;
use vm_pmap_x86_64::{PteFlags, X86Pmap, X86Space};
use vm_testkit::support::Rng;
use vm_testkit::test_config;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const N: u64 = 512;
/// Two 2 MiB-aligned runs of frames: 3072..3584 and 3584..4096.
const BASE_PFN: u64 = 3072;
/// Frames mapped one by one at addresses of the superpage.
const OTHER_PFN: u64 = 2048;
const VA: u64 = 0x40_0000_0000;

fn page(pfn: u64) -> PageInfo {
    PageInfo {
        pfn: Pfn(pfn),
        managed: true,
        attr: MemAttr::WriteBack,
    }
}

fn rw(pfn: u64) -> Mapping {
    Mapping::new(page(pfn), Prot::RW).access(Prot::WRITE)
}

fn machine() -> Arc<Vm<X86Pmap>> {
    Vm::new(X86Pmap::new(), test_config(4096)).unwrap()
}

fn is_super(p: &X86Pmap, space: &X86Space, va: u64) -> bool {
    matches!(p.leaf_entry(space, va), Some((e, Level::PD)) if e & 1 != 0)
}

/// The books of the 2 MiB at `va0` in `space` (the only mappings it has
/// besides `extra`, pages mapped elsewhere): resident and wired counts
/// match the entries, each mapped frame has exactly one pv entry for it
/// (no other space maps these frames), each frame of the run not mapped
/// has none. Returns the pages mapped.
fn books(p: &X86Pmap, space: &X86Space, va0: u64, pfn0: u64, extra: u64, what: &str) -> u64 {
    let (mut mapped, mut wired) = (0, 0);
    let mut seen = HashMap::new();
    for i in 0..N {
        let va = va0 + i * PAGE;
        let Some((e, _)) = p.leaf_entry(space, va) else {
            continue;
        };
        if e & 1 == 0 {
            continue;
        }
        mapped += 1;
        wired += u64::from(e & PteFlags::WIRED.bits() != 0);
        let pfn = p.extract(space, VirtAddr(va)).unwrap();
        assert!(
            seen.insert(pfn.0, va).is_none(),
            "{what}: frame {pfn:?} twice"
        );
        assert_eq!(p.mapping_count(pfn), 1, "{what}: pv of {pfn:?} at page {i}");
        // The software MMU agrees with the entry.
        let t = p.translate_access(space, va, Access::USER_READ).unwrap();
        assert_eq!(t.pa.as_u64(), pfn.0 * PAGE, "{what}: MMU at page {i}");
        let writable = e & PteFlags::WRITABLE.bits() != 0;
        assert_eq!(
            p.translate_access(space, va, Access::USER_WRITE).is_ok(),
            writable,
            "{what}: MMU write at page {i}"
        );
    }
    for i in 0..N {
        if !seen.contains_key(&(pfn0 + i)) {
            assert_eq!(
                p.mapping_count(Pfn(pfn0 + i)),
                0,
                "{what}: stale pv entry of run frame {i}"
            );
        }
    }
    assert_eq!(space.resident_count(), mapped + extra, "{what}: resident");
    assert_eq!(space.wired_count(), wired, "{what}: wired");
    mapped
}

// ---------------------------------------------------------------------

/// Threads enter the same superpage at once: exactly one entry, one pv
/// entry per frame, 512 resident, one spare table, no frame leaked.
#[test]
fn e01_racing_enter_superpage_of_one_2mib_makes_one_entry() {
    let vm = machine();
    let p = vm.pmap();
    let free0 = vm.free_pages();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    while Instant::now() < deadline {
        rounds += 1;
        let space = p.create_space().unwrap();
        let bar = Barrier::new(3);
        let wins = AtomicU64::new(0);
        std::thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    bar.wait();
                    if p.enter_superpage(&space, VirtAddr(VA), rw(BASE_PFN)) == Ok(true) {
                        wins.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(wins.load(Ordering::Relaxed), 1, "round {rounds}: winners");
        assert!(is_super(p, &space, VA));
        assert_eq!(books(p, &space, VA, BASE_PFN, 0, "e01"), N);
        assert_eq!(p.table_pages(&space), 4, "root, PDPT, PD, spare");
        p.destroy_space(&space);
        assert_eq!(vm.free_pages(), free0, "round {rounds}: frames leaked");
    }
}

/// `enter_superpage` races `enter` of other frames at some pages of the
/// 2 MiB (a fault of another thread mapping its own page). Whatever the
/// order: those pages map the other frames, the rest the run or nothing,
/// a replaced run frame is reported displaced, the books balance.
#[test]
fn e02_enter_superpage_races_enter_of_other_frames() {
    let vm = machine();
    let p = vm.pmap();
    let free0 = vm.free_pages();
    let deadline = Instant::now() + Duration::from_secs(4);
    let (mut rounds, mut whole) = (0u64, 0u64);
    while Instant::now() < deadline {
        rounds += 1;
        let space = p.create_space().unwrap();
        let picks: Vec<u64> = {
            let mut r = Rng::new(rounds);
            (0..4).map(|_| r.below(N)).collect()
        };
        let bar = Barrier::new(2);
        let (sup, displaced) = std::thread::scope(|sc| {
            let a = sc.spawn(|| {
                bar.wait();
                p.enter_superpage(&space, VirtAddr(VA), rw(BASE_PFN))
                    .unwrap()
            });
            let b = sc.spawn(|| {
                bar.wait();
                let mut d: Vec<Displaced> = Vec::new();
                for (k, &i) in picks.iter().enumerate() {
                    if let Some(x) = p
                        .enter(&space, VirtAddr(VA + i * PAGE), rw(OTHER_PFN + k as u64))
                        .unwrap()
                    {
                        d.push(x);
                    }
                }
                d
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        whole += u64::from(sup);
        let mut want_other: HashMap<u64, u64> = HashMap::new();
        for (k, &i) in picks.iter().enumerate() {
            want_other.insert(i, OTHER_PFN + k as u64); // the last wins
        }
        for i in 0..N {
            let got = p.extract(&space, VirtAddr(VA + i * PAGE)).map(|f| f.0);
            let want = match want_other.get(&i) {
                Some(&o) => Some(o),
                None if sup => Some(BASE_PFN + i),
                None => None,
            };
            assert_eq!(
                got, want,
                "round {rounds}: page {i} (superpage made: {sup})"
            );
        }
        // Every displaced frame is a run frame the superpage mapped or an
        // other frame replaced by a later pick at the same page.
        for d in &displaced {
            let ok = (sup && (BASE_PFN..BASE_PFN + N).contains(&d.pfn.0))
                || (OTHER_PFN..OTHER_PFN + 4).contains(&d.pfn.0);
            assert!(ok, "round {rounds}: displaced {d:?}");
        }
        let run_displaced = displaced.iter().filter(|d| d.pfn.0 >= BASE_PFN).count();
        if sup {
            let distinct: std::collections::HashSet<u64> = picks.iter().copied().collect();
            assert_eq!(
                run_displaced,
                distinct.len(),
                "round {rounds}: each run frame replaced is reported once"
            );
            // The superpage was dirty: so is every frame it gave up.
            assert!(
                displaced
                    .iter()
                    .filter(|d| d.pfn.0 >= BASE_PFN)
                    .all(|d| d.modified),
                "round {rounds}: lost M of a replaced run frame"
            );
        }
        // Books: the other frames are outside the run; count them apart.
        let mapped = (0..N)
            .filter(|i| p.extract(&space, VirtAddr(VA + i * PAGE)).is_some())
            .count() as u64;
        assert_eq!(space.resident_count(), mapped, "round {rounds}: resident");
        for i in 0..N {
            let mapped_here = p.extract(&space, VirtAddr(VA + i * PAGE)) == Some(Pfn(BASE_PFN + i));
            assert_eq!(
                p.mapping_count(Pfn(BASE_PFN + i)),
                usize::from(mapped_here),
                "round {rounds}: pv of run frame {i}"
            );
        }
        for k in 0..4u64 {
            let n = (0..N)
                .filter(|i| p.extract(&space, VirtAddr(VA + i * PAGE)) == Some(Pfn(OTHER_PFN + k)))
                .count();
            assert_eq!(
                p.mapping_count(Pfn(OTHER_PFN + k)),
                n,
                "round {rounds}: pv of other {k}"
            );
        }
        p.destroy_space(&space);
        assert_eq!(vm.free_pages(), free0, "round {rounds}: frames leaked");
    }
    eprintln!("e02: {rounds} rounds, superpage made in {whole}");
}

/// Which operation races `enter_superpage` in [`race`].
#[derive(Clone, Copy, Debug)]
enum Op {
    RemoveAll,
    RemovePart,
    ProtectAll,
    ProtectPart,
    Wire,
    RemoveAllOfFrame,
    PageProtect,
    QuickRun,
    ClearModify,
    TsReferenced,
}

/// `enter_superpage` in one thread against `op` over the same 2 MiB in
/// another, started together, round after round; then the books.
fn race(op: Op, secs: u64) {
    let vm = machine();
    let p = vm.pmap();
    let free0 = vm.free_pages();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut rounds, mut whole) = (0u64, 0u64);
    while Instant::now() < deadline {
        rounds += 1;
        let what = format!("{op:?} round {rounds}");
        let space = p.create_space().unwrap();
        // A page outside the 2 MiB keeps the upper tables in place in
        // half of the rounds.
        let extra = rounds % 2;
        if extra == 1 {
            p.enter(&space, VirtAddr(VA + SUPER), rw(OTHER_PFN + 100))
                .unwrap();
        }
        let k = rounds * 37 % N;
        let bar = Barrier::new(2);
        let sup = std::thread::scope(|sc| {
            let a = sc.spawn(|| {
                bar.wait();
                p.enter_superpage(&space, VirtAddr(VA), rw(BASE_PFN))
                    .unwrap()
            });
            bar.wait();
            for _ in 0..3 {
                let r = VirtAddr(VA)..VirtAddr(VA + SUPER);
                let part = VirtAddr(VA + k * PAGE)..VirtAddr(VA + (k + 3).min(N) * PAGE);
                match op {
                    Op::RemoveAll => p.remove(&space, r, &mut |_| {}),
                    Op::RemovePart => p.remove(&space, part, &mut |_| {}),
                    Op::ProtectAll => p.protect(&space, r, Prot::READ, &mut |_| {}),
                    Op::ProtectPart => p.protect(&space, part, Prot::READ, &mut |_| {}),
                    Op::Wire => p.change_wiring(&space, VirtAddr(VA + k * PAGE), true),
                    Op::RemoveAllOfFrame => {
                        let _ = p.remove_all(Pfn(BASE_PFN + k));
                    }
                    Op::PageProtect => {
                        let _ = p.page_protect(Pfn(BASE_PFN + k), Prot::READ);
                    }
                    Op::QuickRun => {
                        let run: Vec<Option<PageInfo>> =
                            (0..N).map(|i| Some(page(BASE_PFN + i))).collect();
                        p.enter_quick_run(&space, VirtAddr(VA), &run, Prot::READ);
                    }
                    Op::ClearModify => p.clear_modify(Pfn(BASE_PFN + k)),
                    Op::TsReferenced => {
                        let _ = p.ts_referenced(Pfn(BASE_PFN + k));
                    }
                }
                std::thread::yield_now();
            }
            a.join().unwrap()
        });
        whole += u64::from(sup);
        let mapped = books(p, &space, VA, BASE_PFN, extra, &what);
        // Every page maps its own run frame, if anything.
        for i in 0..N {
            if let Some(f) = p.extract(&space, VirtAddr(VA + i * PAGE)) {
                assert_eq!(f.0, BASE_PFN + i, "{what}: page {i}");
            }
        }
        let part_len = (k + 3).min(N) - k;
        let allowed: &[u64] = match op {
            Op::RemoveAll => &[0, N],
            Op::RemovePart => &[0, N, N - part_len],
            Op::RemoveAllOfFrame => &[0, N, N - 1],
            Op::QuickRun => &[N],
            _ => &[0, N],
        };
        assert!(allowed.contains(&mapped), "{what}: {mapped} pages mapped");
        if !sup {
            // Nothing was entered whole: only the quick run maps.
            let want = if matches!(op, Op::QuickRun) { N } else { 0 };
            assert_eq!(mapped, want, "{what}: mapped without a superpage");
        }
        match op {
            Op::QuickRun => assert_eq!(mapped, N, "{what}: quick run or superpage maps all"),
            Op::Wire if sup => {
                // The wiring, if it came after, is on page k alone.
                let e = p.leaf_entry(&space, VA + k * PAGE).unwrap().0;
                let w = space.wired_count();
                assert!(
                    (w == 1 && e & PteFlags::WIRED.bits() != 0) || w == 0,
                    "{what}: wired {w}"
                );
            }
            _ => {}
        }
        if !matches!(
            op,
            Op::RemoveAll | Op::RemovePart | Op::RemoveAllOfFrame | Op::QuickRun
        ) {
            assert_eq!(mapped, if sup { N } else { 0 }, "{what}: pages mapped");
        }
        if matches!(op, Op::ProtectAll) && sup {
            // Protected before (nothing to protect) or after (all).
            let w = (0..N)
                .filter(|i| {
                    p.leaf_entry(&space, VA + i * PAGE)
                        .is_some_and(|(e, _)| e & PteFlags::WRITABLE.bits() != 0)
                })
                .count();
            assert!(w == 0 || w == N as usize, "{what}: {w} pages writable");
        }
        p.destroy_space(&space);
        assert_eq!(vm.free_pages(), free0, "{what}: frames leaked");
        for i in 0..N {
            assert_eq!(
                p.mapping_count(Pfn(BASE_PFN + i)),
                0,
                "{what}: pv after destroy"
            );
        }
    }
    eprintln!("race {op:?}: {rounds} rounds, superpage entered in {whole}");
}

#[test]
fn e03_enter_superpage_races_remove_of_all() {
    race(Op::RemoveAll, 2);
}

#[test]
fn e04_enter_superpage_races_remove_of_part() {
    race(Op::RemovePart, 2);
}

#[test]
fn e05_enter_superpage_races_protect_of_all() {
    race(Op::ProtectAll, 2);
}

#[test]
fn e06_enter_superpage_races_protect_of_part() {
    race(Op::ProtectPart, 2);
}

#[test]
fn e07_enter_superpage_races_change_wiring() {
    race(Op::Wire, 2);
}

#[test]
fn e08_enter_superpage_races_remove_all_of_a_frame() {
    race(Op::RemoveAllOfFrame, 2);
}

#[test]
fn e09_enter_superpage_races_page_protect() {
    race(Op::PageProtect, 2);
}

#[test]
fn e10_enter_superpage_races_enter_quick_run() {
    race(Op::QuickRun, 2);
}

#[test]
fn e11_enter_superpage_races_clear_modify_and_ts_referenced() {
    race(Op::ClearModify, 1);
    race(Op::TsReferenced, 1);
}

/// `enter_superpage` races `destroy_space`: it maps before (and the
/// destruction removes it) or reports the space destroyed; either way
/// every table frame, the spare included, goes back, and no pv entry is
/// left.
#[test]
fn e12_enter_superpage_races_destroy_space() {
    let vm = machine();
    let p = vm.pmap();
    let free0 = vm.free_pages();
    let deadline = Instant::now() + Duration::from_secs(3);
    let (mut rounds, mut before, mut after) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        rounds += 1;
        let space = p.create_space().unwrap();
        if rounds % 2 == 0 {
            p.enter(&space, VirtAddr(VA + SUPER), rw(OTHER_PFN))
                .unwrap();
        }
        let bar = Barrier::new(2);
        let r = std::thread::scope(|sc| {
            let a = sc.spawn(|| {
                bar.wait();
                p.enter_superpage(&space, VirtAddr(VA), rw(BASE_PFN))
            });
            bar.wait();
            p.destroy_space(&space);
            a.join().unwrap()
        });
        match r {
            Ok(true) => before += 1,
            Err(PmapError::SpaceDestroyed) => after += 1,
            Ok(false) => {}
            Err(e) => panic!("round {rounds}: {e:?}"),
        }
        assert_eq!(space.resident_count(), 0, "round {rounds}");
        assert_eq!(space.wired_count(), 0, "round {rounds}");
        for i in 0..N {
            assert_eq!(
                p.mapping_count(Pfn(BASE_PFN + i)),
                0,
                "round {rounds}: pv {i}"
            );
        }
        assert_eq!(p.mapping_count(Pfn(OTHER_PFN)), 0);
        drop(space);
        assert_eq!(
            vm.free_pages(),
            free0,
            "round {rounds}: frames leaked ({r:?})"
        );
    }
    eprintln!("e12: {rounds} rounds, entered before {before}, refused after {after}");
}

/// Readers walk the tables with the software MMU while one thread enters
/// and removes the superpage over and over (and demotes it by wiring a
/// page): every translation that succeeds names the page's own frame.
#[test]
fn e13_software_mmu_walks_while_superpages_come_and_go() {
    let vm = machine();
    let p = vm.pmap();
    let free0 = vm.free_pages();
    let space = p.create_space().unwrap();
    let stop = AtomicBool::new(false);
    let hits = AtomicU64::new(0);
    std::thread::scope(|sc| {
        for t in 0..2u64 {
            let (space, stop, hits) = (&space, &stop, &hits);
            sc.spawn(move || {
                let mut r = Rng::new(t + 1);
                while !stop.load(Ordering::Relaxed) {
                    let i = r.below(N);
                    let write = r.below(2) == 0;
                    let a = if write {
                        Access::USER_WRITE
                    } else {
                        Access::USER_READ
                    };
                    if let Ok(tr) = p.translate_access(space, VA + i * PAGE + 8, a) {
                        assert_eq!(tr.pa.as_u64(), (BASE_PFN + i) * PAGE + 8, "page {i}");
                        hits.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut n = 0u64;
        while Instant::now() < deadline {
            n += 1;
            while p.enter_superpage(&space, VirtAddr(VA), rw(BASE_PFN)) != Ok(true) {
                std::thread::yield_now();
            }
            match n % 3 {
                0 => p.change_wiring(&space, VirtAddr(VA + (n % N) * PAGE), true),
                1 => p.protect(
                    &space,
                    VirtAddr(VA)..VirtAddr(VA + SUPER),
                    Prot::READ,
                    &mut |_| {},
                ),
                _ => {}
            }
            p.remove(&space, VirtAddr(VA)..VirtAddr(VA + SUPER), &mut |_| {});
            assert_eq!(space.resident_count(), 0);
            assert_eq!(space.wired_count(), 0);
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(
        hits.load(Ordering::Relaxed) > 0,
        "the readers saw the superpage"
    );
    p.destroy_space(&space);
    assert_eq!(vm.free_pages(), free0);
}

/// With only a few free frames, `enter_superpage` needs the spare table
/// and whatever upper tables are missing: with fewer it refuses, taking
/// nothing (no table left behind, the free count unchanged); with enough
/// it maps. 4- and 5-level paging.
#[test]
fn e14_no_frames_for_the_spare_or_the_tables() {
    for la57 in [false, true] {
        for have_upper in [false, true] {
            for left in 0..6u64 {
                let what = format!("la57 {la57}, upper tables {have_upper}, {left} free");
                let pmap = if la57 {
                    X86Pmap::new_la57()
                } else {
                    X86Pmap::new()
                };
                let vm = Vm::new(pmap, test_config(4096)).unwrap();
                let p = vm.pmap();
                let space = p.create_space().unwrap();
                if have_upper {
                    p.enter(&space, VirtAddr(VA + SUPER), rw(OTHER_PFN))
                        .unwrap();
                }
                let tables0 = p.table_pages(&space);
                let free = vm.free_pages();
                let balloon = vm.inflate_balloon(free - left);
                assert_eq!(vm.free_pages(), left);
                let need = if have_upper {
                    1
                } else {
                    1 + if la57 { 3 } else { 2 }
                };
                let r = p.enter_superpage(&space, VirtAddr(VA), rw(BASE_PFN));
                if left >= need {
                    assert_eq!(r, Ok(true), "{what}");
                    assert_eq!(vm.free_pages(), left - need, "{what}");
                    books(p, &space, VA, BASE_PFN, u64::from(have_upper), &what);
                    // Demotion needs no frame: the spare is there.
                    p.change_wiring(&space, VirtAddr(VA + 5 * PAGE), true);
                    assert!(!is_super(p, &space, VA), "{what}");
                    books(p, &space, VA, BASE_PFN, u64::from(have_upper), &what);
                } else {
                    assert_eq!(r, Ok(false), "{what}");
                    assert_eq!(vm.free_pages(), left, "{what}: frames taken by a refusal");
                    assert_eq!(p.table_pages(&space), tables0, "{what}: tables left");
                    assert_eq!(p.mapping_count(Pfn(BASE_PFN)), 0, "{what}");
                    assert_eq!(space.resident_count(), u64::from(have_upper), "{what}");
                }
                drop(balloon);
                p.destroy_space(&space);
                drop(space);
                assert_eq!(vm.free_pages(), vm.total_pages(), "{what}: leaked");
            }
        }
    }
}

/// A wired superpage entered whole: 512 wired; unwiring page by page
/// demotes once and brings the count to 0; remove and destroy free all.
#[test]
fn e15_a_wired_superpage_entered_whole() {
    let vm = machine();
    let p = vm.pmap();
    let free0 = vm.free_pages();
    let space = p.create_space().unwrap();
    assert_eq!(
        p.enter_superpage(&space, VirtAddr(VA), rw(BASE_PFN).wired(true)),
        Ok(true)
    );
    assert_eq!(space.wired_count(), N);
    books(p, &space, VA, BASE_PFN, 0, "wired whole");
    // An enter of what it maps, wired, changes nothing.
    assert_eq!(
        p.enter(
            &space,
            VirtAddr(VA + 7 * PAGE),
            rw(BASE_PFN + 7).wired(true)
        ),
        Ok(None)
    );
    assert!(is_super(p, &space, VA));
    assert_eq!(space.wired_count(), N);
    for i in 0..N {
        p.change_wiring(&space, VirtAddr(VA + i * PAGE), false);
    }
    assert_eq!(space.wired_count(), 0);
    books(p, &space, VA, BASE_PFN, 0, "unwired");
    // ts_referenced clears A of a wired superpage never; of an unwired one
    // for its hashed page. Either way the mapping stays.
    for i in 0..N {
        let _ = p.ts_referenced(Pfn(BASE_PFN + i));
    }
    books(p, &space, VA, BASE_PFN, 0, "aged");
    p.remove(&space, VirtAddr(VA)..VirtAddr(VA + SUPER), &mut |_| {});
    assert_eq!(space.resident_count(), 0);
    p.destroy_space(&space);
    assert_eq!(vm.free_pages(), free0);
}

/// At the top of the user half (4- and 5-level) a superpage is entered
/// and removed; one past it, or straddling it, is refused as an error.
#[test]
fn e16_enter_superpage_at_the_edges_of_user_space() {
    for la57 in [false, true] {
        let pmap = if la57 {
            X86Pmap::new_la57()
        } else {
            X86Pmap::new()
        };
        let vm = Vm::new(pmap, test_config(4096)).unwrap();
        let free0 = vm.free_pages();
        let p = vm.pmap();
        let end = p.mode().paging.user_end();
        let space = p.create_space().unwrap();
        let top = end - SUPER;
        assert_eq!(
            p.enter_superpage(&space, VirtAddr(top), rw(BASE_PFN)),
            Ok(true)
        );
        books(p, &space, top, BASE_PFN, 0, "top");
        assert!(
            p.enter_superpage(&space, VirtAddr(end), rw(BASE_PFN))
                .is_err()
        );
        assert!(p.enter_superpage(&space, VirtAddr(0), rw(BASE_PFN - N)) == Ok(true));
        books(p, &space, 0, BASE_PFN - N, N, "zero");
        p.remove(&space, VirtAddr(0)..VirtAddr(end), &mut |_| {});
        assert_eq!(space.resident_count(), 0);
        assert_eq!(
            p.table_pages(&space),
            1,
            "la57 {la57}: tables left after remove"
        );
        p.destroy_space(&space);
        assert_eq!(vm.free_pages(), free0);
    }
}

// ---------------------------------------------------------------------
// Single-threaded model: `enter_superpage` succeeds exactly where nothing
// is mapped in the 2 MiB, whatever came before.

#[derive(Clone, Copy, Debug, PartialEq)]
struct M {
    pfn: u64,
    writable: bool,
    wired: bool,
}

/// Random operations over two 2 MiB regions of one space checked after
/// each against a plain model of what maps where.
#[test]
fn e17_model_enter_superpage_succeeds_exactly_where_nothing_is_mapped() {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seed = 0;
    while Instant::now() < deadline {
        seed += 1;
        model_run(seed, seed % 3 == 0);
    }
    eprintln!("e17: {seed} seeds");
}

fn model_run(seed: u64, la57: bool) {
    let pmap = if la57 {
        X86Pmap::new_la57()
    } else {
        X86Pmap::new()
    };
    let vm = Vm::new(pmap, test_config(4096)).unwrap();
    let p = vm.pmap();
    let free0 = vm.free_pages();
    let space = p.create_space().unwrap();
    let mut r = Rng::new(seed);
    let mut model: HashMap<u64, M> = HashMap::new(); // va -> mapping
    // Region g (0 or 1) at VA + g * SUPER; its run is BASE_PFN + g * N.
    let run = |g: u64| BASE_PFN + g * N;
    let mut log: Vec<String> = Vec::new();
    for step in 0..300 {
        let g = r.below(2);
        let va0 = VA + g * SUPER;
        let i = r.below(N);
        let va = va0 + i * PAGE;
        let op = r.below(12);
        let note = match op {
            0..=2 => {
                // enter_superpage: must succeed iff nothing is mapped.
                let wired = r.below(4) == 0;
                let empty = !(0..N).any(|j| model.contains_key(&(va0 + j * PAGE)));
                let got = p.enter_superpage(&space, VirtAddr(va0), rw(run(g)).wired(wired));
                assert_eq!(
                    got,
                    Ok(empty),
                    "seed {seed} step {step}: enter_superpage g{g}, empty {empty}; log {log:?}"
                );
                if empty {
                    for j in 0..N {
                        model.insert(
                            va0 + j * PAGE,
                            M {
                                pfn: run(g) + j,
                                writable: true,
                                wired,
                            },
                        );
                    }
                }
                format!("super g{g} wired {wired} -> {got:?}")
            }
            3 => {
                // enter a page: its run frame or an other frame.
                let pfn = if r.below(2) == 0 {
                    run(g) + i
                } else {
                    OTHER_PFN + r.below(64)
                };
                let wired = r.below(5) == 0;
                let prot = if r.below(3) == 0 {
                    Prot::READ
                } else {
                    Prot::RW
                };
                if model.values().any(|m| m.pfn == pfn)
                    && model.get(&va).map(|m| m.pfn) != Some(pfn)
                {
                    continue; // one mapping per frame keeps the pv check simple
                }
                let m = Mapping::new(page(pfn), prot)
                    .access(prot & Prot::WRITE)
                    .wired(wired);
                p.enter(&space, VirtAddr(va), m).unwrap();
                model.insert(
                    va,
                    M {
                        pfn,
                        writable: prot.contains(Prot::WRITE),
                        wired,
                    },
                );
                format!("enter {va:#x} pfn {pfn} {prot:?} wired {wired}")
            }
            4 => {
                let big = r.below(3) == 0;
                let len = 1 + r.below(if big { N } else { 8 });
                let end = (va + len * PAGE).min(VA + 2 * SUPER);
                p.remove(&space, VirtAddr(va)..VirtAddr(end), &mut |_| {});
                model.retain(|&a, _| !(va..end).contains(&a));
                format!("remove {va:#x}..{end:#x}")
            }
            5 => {
                let big = r.below(3) == 0;
                let len = 1 + r.below(if big { N } else { 8 });
                let end = (va + len * PAGE).min(VA + 2 * SUPER);
                p.protect(&space, VirtAddr(va)..VirtAddr(end), Prot::READ, &mut |_| {});
                for (a, m) in &mut model {
                    if (va..end).contains(a) {
                        m.writable = false;
                    }
                }
                format!("protect {va:#x}..{end:#x}")
            }
            6 => {
                let w = r.below(2) == 0;
                p.change_wiring(&space, VirtAddr(va), w);
                if let Some(m) = model.get_mut(&va) {
                    m.wired = w;
                }
                format!("wiring {va:#x} {w}")
            }
            7 => {
                let pfn = model.get(&va).map_or(run(g) + i, |m| m.pfn);
                let _ = p.remove_all(Pfn(pfn));
                model.retain(|_, m| m.pfn != pfn);
                format!("remove_all {pfn}")
            }
            8 => {
                let pfn = model.get(&va).map_or(run(g) + i, |m| m.pfn);
                let _ = p.page_protect(Pfn(pfn), Prot::READ);
                for m in model.values_mut() {
                    if m.pfn == pfn {
                        m.writable = false;
                    }
                }
                format!("page_protect {pfn}")
            }
            9 => {
                // enter_quick_run of the run frames over a few pages.
                let len = 1 + r.below(N - i);
                let pages: Vec<Option<PageInfo>> =
                    (i..i + len).map(|j| Some(page(run(g) + j))).collect();
                // Only where the run frames are not mapped elsewhere.
                if (i..i + len).any(|j| {
                    model
                        .iter()
                        .any(|(&a, m)| m.pfn == run(g) + j && a != va0 + j * PAGE)
                }) {
                    continue;
                }
                let super_here = is_super(p, &space, va0);
                let n = p.enter_quick_run(&space, VirtAddr(va), &pages, Prot::RW);
                let mut want = 0;
                for j in i..i + len {
                    let a = va0 + j * PAGE;
                    if !model.contains_key(&a) && !super_here {
                        model.insert(
                            a,
                            M {
                                pfn: run(g) + j,
                                writable: false,
                                wired: false,
                            },
                        );
                        want += 1;
                    }
                }
                assert_eq!(n, want, "seed {seed} step {step}: quick run; log {log:?}");
                format!("quick {va:#x}+{len}")
            }
            10 => {
                let pfn = model.get(&va).map_or(run(g) + i, |m| m.pfn);
                let _ = p.ts_referenced(Pfn(pfn));
                p.clear_modify(Pfn(pfn));
                format!("age {pfn}")
            }
            _ => {
                // Write through the MMU where writable.
                let ok = p.translate_access(&space, va, Access::USER_WRITE).is_ok();
                let want = model.get(&va).is_some_and(|m| m.writable);
                assert_eq!(
                    ok, want,
                    "seed {seed} step {step}: MMU write {va:#x}; log {log:?}"
                );
                format!("mmu write {va:#x}")
            }
        };
        log.push(note);
        if log.len() > 10 {
            log.remove(0);
        }
        // The model and the pmap agree.
        let (mut wired, mut resident) = (0, 0);
        for g in 0..2 {
            for j in 0..N {
                let a = VA + g * SUPER + j * PAGE;
                let got = p.extract(&space, VirtAddr(a)).map(|f| f.0);
                let want = model.get(&a).map(|m| m.pfn);
                assert_eq!(
                    got, want,
                    "seed {seed} step {step}: extract {a:#x}; log {log:?}"
                );
                if let Some(m) = model.get(&a) {
                    resident += 1;
                    let e = p.leaf_entry(&space, a).unwrap().0;
                    assert_eq!(
                        e & PteFlags::WIRED.bits() != 0,
                        m.wired,
                        "seed {seed} step {step}: wired {a:#x}; log {log:?}"
                    );
                    assert_eq!(
                        e & PteFlags::WRITABLE.bits() != 0,
                        m.writable,
                        "seed {seed} step {step}: writable {a:#x}; log {log:?}"
                    );
                    wired += u64::from(m.wired);
                    assert_eq!(
                        p.mapping_count(Pfn(m.pfn)),
                        1,
                        "seed {seed} step {step}: pv of {}; log {log:?}",
                        m.pfn
                    );
                }
            }
        }
        assert_eq!(
            space.resident_count(),
            resident,
            "seed {seed} step {step}; log {log:?}"
        );
        assert_eq!(
            space.wired_count(),
            wired,
            "seed {seed} step {step}; log {log:?}"
        );
    }
    p.remove(&space, VirtAddr(VA)..VirtAddr(VA + 2 * SUPER), &mut |_| {});
    assert_eq!(
        p.table_pages(&space),
        1,
        "seed {seed}: tables left after removing all"
    );
    p.destroy_space(&space);
    assert_eq!(vm.free_pages(), free0, "seed {seed}: frames leaked");
}

// ---------------------------------------------------------------------
// A model TLB: no translation a simulated CPU cached outlives a change of
// its entry, with superpages entered whole among the operations.

mod tlb_model {
    use super::*;
    use std::sync::Mutex;
    use vm_pmap_x86_64::TlbHook;
    use vm_pmap_x86_64::mmu::CpuMode;

    const RWB: u64 = PteFlags::WRITABLE.bits();
    const D: u64 = PteFlags::DIRTY.bits();

    #[derive(Clone, Copy, Debug)]
    struct Cached {
        pa: u64,
        writable: bool,
        dirty: bool,
    }

    /// (root, page or 2 MiB base, huge) -> cached; `invalidate_page(va)`
    /// drops `va`'s 4 KiB entry and any 2 MiB entry containing it.
    #[derive(Default)]
    pub struct ModelTlb {
        entries: Mutex<HashMap<(u64, u64, bool), Cached>>,
    }

    impl TlbHook for ModelTlb {
        fn invalidate_page(&self, root: u64, va: u64) {
            let mut e = self.entries.lock().unwrap();
            e.remove(&(root, va & !(PAGE - 1), false));
            e.remove(&(root, va & !(SUPER - 1), true));
        }
        fn invalidate_all(&self, root: u64) {
            self.entries.lock().unwrap().retain(|k, _| k.0 != root);
        }
    }

    type TPmap = X86Pmap<ModelTlb>;

    fn cpu(p: &TPmap, s: &X86Space, va: u64, write: bool) -> Option<u64> {
        let tlb = p.tlb();
        {
            let e = tlb.entries.lock().unwrap();
            for (key, off) in [
                ((s.root(), va & !(PAGE - 1), false), va & (PAGE - 1)),
                ((s.root(), va & !(SUPER - 1), true), va & (SUPER - 1)),
            ] {
                if let Some(c) = e.get(&key)
                    && (!write || (c.writable && c.dirty))
                {
                    return Some(c.pa + off);
                }
            }
        }
        let access = if write {
            Access::USER_WRITE
        } else {
            Access::USER_READ
        };
        let t = p.translate_access(s, va, access).ok()?;
        let huge = t.level == Level::PD;
        let span = if huge { SUPER } else { PAGE };
        let c = Cached {
            pa: t.pa.as_u64() & !(span - 1),
            writable: t.leaf & RWB != 0,
            dirty: t.leaf & D != 0,
        };
        tlb.entries
            .lock()
            .unwrap()
            .insert((s.root(), va & !(span - 1), huge), c);
        Some(t.pa.as_u64())
    }

    fn coherent(p: &TPmap, s: &X86Space, what: &str) {
        let e = p.tlb().entries.lock().unwrap().clone();
        for ((root, va, huge), c) in e {
            if root != s.root() {
                continue;
            }
            let step = if huge { SUPER } else { PAGE };
            for off in (0..step).step_by(PAGE as usize) {
                let at = va + off;
                let Some((leaf, level)) = p.leaf_entry(s, at) else {
                    panic!("{what}: the TLB still maps {at:#x} ({c:?}); the tables do not");
                };
                let frame = if level == Level::PD {
                    (leaf & 0x000f_ffff_ffe0_0000) + (at & (SUPER - 1))
                } else {
                    leaf & 0x000f_ffff_ffff_f000
                };
                assert!(
                    leaf & 1 != 0 && frame == c.pa + off,
                    "{what}: the TLB maps {at:#x} to {:#x} ({c:?}), the tables {leaf:#x}",
                    c.pa + off
                );
                if c.writable {
                    assert!(
                        leaf & RWB != 0,
                        "{what}: TLB still writes {at:#x}: {leaf:#x}"
                    );
                }
                if c.writable && c.dirty {
                    assert!(leaf & D != 0, "{what}: a TLB write at {at:#x} leaves no M");
                }
            }
        }
    }

    /// Random operations (superpages entered whole among them) with CPU
    /// accesses through the model TLB; coherent after every operation.
    #[test]
    fn e18_model_tlb_stays_coherent_with_whole_superpages() {
        let deadline = Instant::now() + Duration::from_secs(6);
        let mut seed = 0;
        while Instant::now() < deadline {
            seed += 1;
            let pmap = X86Pmap::with_hook(CpuMode::default(), ModelTlb::default());
            let vm = Vm::new(pmap, test_config(4096)).unwrap();
            let p = vm.pmap();
            let free0 = vm.free_pages();
            let s = p.create_space().unwrap();
            let mut r = Rng::new(seed + 1000);
            let mut log = Vec::new();
            for step in 0..200 {
                let g = r.below(2);
                let va0 = VA + g * SUPER;
                let i = r.below(N);
                let va = va0 + i * PAGE;
                let run = BASE_PFN + g * N;
                let note = match r.below(10) {
                    0 | 1 => {
                        let ro = r.below(3) == 0;
                        let m = if ro {
                            Mapping::new(page(run), Prot::READ).access(Prot::READ)
                        } else {
                            rw(run)
                        };
                        let got = p.enter_superpage(&s, VirtAddr(va0), m);
                        format!("super g{g} ro {ro} -> {got:?}")
                    }
                    2 => {
                        let pfn = if r.below(2) == 0 {
                            run + i
                        } else {
                            OTHER_PFN + r.below(64)
                        };
                        let prot = if r.below(3) == 0 {
                            Prot::READ
                        } else {
                            Prot::RW
                        };
                        let m = Mapping::new(page(pfn), prot).access(prot & Prot::WRITE);
                        p.enter(&s, VirtAddr(va), m).unwrap();
                        format!("enter {va:#x} {pfn} {prot:?}")
                    }
                    3 => {
                        let big = r.below(3) == 0;
                        let len = 1 + r.below(if big { N } else { 4 });
                        p.remove(&s, VirtAddr(va)..VirtAddr(va + len * PAGE), &mut |_| {});
                        format!("remove {va:#x}+{len}")
                    }
                    4 => {
                        let big = r.below(3) == 0;
                        let len = 1 + r.below(if big { N } else { 4 });
                        p.protect(
                            &s,
                            VirtAddr(va)..VirtAddr(va + len * PAGE),
                            Prot::READ,
                            &mut |_| {},
                        );
                        format!("protect {va:#x}+{len}")
                    }
                    5 => {
                        let pfn = p.extract(&s, VirtAddr(va)).map_or(run + i, |f| f.0);
                        match r.below(5) {
                            0 => drop(p.remove_all(Pfn(pfn))),
                            1 => drop(p.page_protect(Pfn(pfn), Prot::READ)),
                            2 => p.clear_modify(Pfn(pfn)),
                            3 => drop(p.ts_referenced(Pfn(pfn))),
                            _ => p.change_wiring(&s, VirtAddr(va), r.below(2) == 0),
                        }
                        format!("per-page op on {pfn}")
                    }
                    _ => {
                        let w = r.below(2) == 0;
                        let got = cpu(p, &s, va + 16, w);
                        format!("cpu {va:#x} write {w} -> {got:?}")
                    }
                };
                log.push(note);
                if log.len() > 8 {
                    log.remove(0);
                }
                coherent(p, &s, &format!("seed {seed} step {step}: {log:?}"));
            }
            p.remove(&s, VirtAddr(VA)..VirtAddr(VA + 2 * SUPER), &mut |_| {});
            assert_eq!(s.resident_count(), 0);
            p.destroy_space(&s);
            assert_eq!(vm.free_pages(), free0, "seed {seed}: leaked");
        }
        eprintln!("e18: {seed} seeds");
    }
}
