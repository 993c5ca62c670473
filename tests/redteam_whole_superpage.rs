//! Red team: the whole-superpage zero-fill fault now maps its 2 MiB with
//! one `Pmap::enter_superpage` entry (`map_populated` / `enter_whole`),
//! and takes the other 511 frames with `Pages::alloc_run_rest`.
//!
//! Attacked through the public API: racing first writes of one 2 MiB,
//! neighbouring 2 MiB contending for the table-tree lock, munmap /
//! mprotect / fork / mlock / pageout around and after it, tiny machines,
//! and the books (pmap resident and wired counts, pv entries, frames,
//! table frames) after each.

mod common;

use common::{Rng, config, consistent, rdpage, squeeze, wrpage};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vm_core::{Pfn, Pmap, Prot, SuperpageAdvice, SuperpagePolicy, Vm, VmConfig, VmSpace};
use vm_pager_swap::Swap;
use vm_pmap_x86_64::paging::Level;
use vm_pmap_x86_64::{PteFlags, X86Pmap};
use vm_testkit::RefPmap;
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const PAGES: u64 = SUPER / PAGE;
const BASE: u64 = 0x4000_0000;

fn tag(va: u64, round: u64) -> u64 {
    (va << 8) | (round & 0xff) | 1
}

fn vm_with<P: Pmap>(pmap: P, policy: SuperpagePolicy, pages: u64) -> Arc<Vm<P>> {
    Vm::new(
        pmap,
        VmConfig {
            superpages: policy,
            ..config(pages)
        },
    )
    .unwrap()
}

fn with_swap<P: Pmap>(vm: &Vm<P>, mib: u64) -> (Swap, TempPath) {
    let t = TempPath::new();
    let s = Swap::create(&t.0, mib << 20).unwrap();
    vm.set_swap(s.provider());
    (s, t)
}

fn is_super(vm: &Vm<X86Pmap>, s: &VmSpace<X86Pmap>, va: u64) -> bool {
    matches!(
        vm.pmap().leaf_entry(s.pmap_space(), va),
        Some((e, Level::PD)) if e & 1 != 0
    )
}

fn no_leak<P: Pmap>(vm: &Vm<P>, what: &str) {
    assert_eq!(vm.free_pages(), vm.total_pages(), "{what}: frames leaked");
}

/// Every frame can be taken once from the free lists, none twice.
fn lists_whole<P: Pmap>(vm: &Vm<P>, what: &str) {
    let b = vm.inflate_balloon(u64::MAX);
    let frames: HashSet<u64> = b.frames().map(|p| p.0).collect();
    assert_eq!(
        (b.len(), frames.len() as u64),
        (vm.total_pages(), vm.total_pages()),
        "{what}: the free lists do not hand out every frame exactly once"
    );
    drop(b);
    no_leak(vm, what);
}

/// The x86 pmap's books for `s`, whose mappings are all inside `ranges`:
/// the resident count is the number of mapped pages, the wired count the
/// number of pages whose entry (4 KiB, or the 2 MiB one) is wired, every
/// mapped frame has a pv entry for this mapping and no two pages of the
/// space map one frame (the core maps each page of an anonymous object
/// once per space).
fn books(vm: &Vm<X86Pmap>, s: &VmSpace<X86Pmap>, ranges: &[(u64, u64)], what: &str) {
    let p = vm.pmap();
    let (mut mapped, mut wired) = (0u64, 0u64);
    let mut frames: BTreeMap<u64, u64> = BTreeMap::new();
    for &(start, len) in ranges {
        for va in (start..start + len).step_by(PAGE as usize) {
            let Some((e, _level)) = p.leaf_entry(s.pmap_space(), va) else {
                continue;
            };
            if e & 1 == 0 {
                continue;
            }
            let pfn = s
                .extract(va)
                .unwrap_or_else(|| panic!("{what}: {va:#x} present but no frame"));
            mapped += 1;
            if e & PteFlags::WIRED.bits() != 0 {
                wired += 1;
            }
            if let Some(other) = frames.insert(pfn.0, va) {
                panic!(
                    "{what}: frame {:#x} mapped at {other:#x} and {va:#x}",
                    pfn.0
                );
            }
            assert!(
                p.mapping_count(pfn) >= 1,
                "{what}: frame {:#x} mapped at {va:#x} without a pv entry",
                pfn.0
            );
        }
    }
    let ps = s.pmap_space();
    assert_eq!(ps.resident_count(), mapped, "{what}: pmap resident count");
    assert_eq!(ps.wired_count(), wired, "{what}: pmap wired count");
}

fn whole_stats(vm: &Vm<X86Pmap>) -> (u64, u64) {
    let st = vm.pmap().superpage_stats();
    (
        st.mappings.load(Ordering::Relaxed),
        st.promotions.load(Ordering::Relaxed),
    )
}

// ---------------------------------------------------------------------

/// One write fault in a fresh 2 MiB under `Always`: one 2 MiB entry,
/// counted as a mapping (no promotion), the 512 frames in order, each page
/// zero but the written one, one pv entry each, 512 resident; a table
/// frame set aside for demotion; everything back after the space goes.
#[test]
fn w01_one_write_maps_the_2mib_with_one_entry() {
    let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 4096);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
    let before = whole_stats(&vm);
    let va = BASE + 77 * PAGE;
    wrpage(&s, va, tag(va, 1)).unwrap();
    assert!(is_super(&vm, &s, BASE), "the 2 MiB is one entry");
    let after = whole_stats(&vm);
    assert_eq!(after.0 - before.0, 1, "one whole mapping");
    assert_eq!(after.1 - before.1, 0, "no promotion");
    let pfn0 = s.extract(BASE).unwrap().0;
    assert_eq!(pfn0 % PAGES, 0, "aligned run");
    for i in 0..PAGES {
        let v = BASE + i * PAGE;
        assert_eq!(s.extract(v), Some(Pfn(pfn0 + i)), "page {i}");
        assert_eq!(vm.pmap().mapping_count(Pfn(pfn0 + i)), 1, "pv of {i}");
        let want = if i == 77 { tag(va, 1) } else { 0 };
        assert_eq!(rdpage(&s, v), Ok(want), "page {i}");
    }
    // The second 2 MiB is untouched.
    assert!(s.extract(BASE + SUPER).is_none());
    books(&vm, &s, &[(BASE, 2 * SUPER)], "w01");
    // Root, PML4..PD path and the spare (no leaf table).
    let tables = vm.pmap().table_pages(s.pmap_space());
    assert_eq!(tables, 4, "root, PDPT, PD and the kept table");
    consistent(&vm, "w01");
    drop(s);
    no_leak(&vm, "w01");
    lists_whole(&vm, "w01");
}

/// The same whole fill, pmap with superpages off (`enter_superpage`
/// refuses): page-by-page entries, the data and books identical but for
/// the entry kind.
#[test]
fn w02_superpages_off_gives_the_same_memory() {
    for on in [true, false] {
        let what = format!("superpages {on}");
        let vm = vm_with(
            X86Pmap::new().with_superpages(on),
            SuperpagePolicy::Always,
            4096,
        );
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, SUPER, Prot::RW).unwrap();
        wrpage(&s, BASE + 3 * PAGE, 5).unwrap();
        assert_eq!(is_super(&vm, &s, BASE), on, "{what}");
        assert_eq!(whole_stats(&vm).0, u64::from(on), "{what}");
        for i in 0..PAGES {
            assert!(s.extract(BASE + i * PAGE).is_some(), "{what}: page {i}");
        }
        books(&vm, &s, &[(BASE, SUPER)], &what);
        assert_eq!(rdpage(&s, BASE + 3 * PAGE), Ok(5));
        consistent(&vm, &what);
        drop(s);
        no_leak(&vm, &what);
    }
}

/// Partial munmap, mprotect and mlock of a superpage entered whole: each
/// demotes it and keeps the other pages, their data and the books.
#[test]
fn w03_partial_operations_on_a_whole_superpage() {
    let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 4096);
    let s = vm.new_space().unwrap();
    let r = [(BASE, SUPER)];
    s.map_anon(BASE, SUPER, Prot::RW).unwrap();
    wrpage(&s, BASE, tag(BASE, 1)).unwrap();
    assert!(is_super(&vm, &s, BASE));
    for i in 1..PAGES {
        let v = BASE + i * PAGE;
        wrpage(&s, v, tag(v, 1)).unwrap();
    }
    assert!(is_super(&vm, &s, BASE), "writes through it keep it whole");
    // Unmap one page in the middle.
    s.unmap(BASE + 200 * PAGE, PAGE).unwrap();
    assert!(!is_super(&vm, &s, BASE));
    books(&vm, &s, &r, "after unmap of one page");
    assert_eq!(s.pmap_space().resident_count(), PAGES - 1);
    // Read-only over 10 pages, then a write there fails.
    s.protect(BASE + 10 * PAGE, 10 * PAGE, Prot::READ).unwrap();
    assert!(s.write_u8(BASE + 15 * PAGE, 9).is_err(), "read-only now");
    assert_eq!(rdpage(&s, BASE + 15 * PAGE), Ok(tag(BASE + 15 * PAGE, 1)));
    // Wire 50 pages, unwire them.
    s.wire(BASE + 300 * PAGE, 50 * PAGE, true).unwrap();
    books(&vm, &s, &r, "wired 50");
    assert_eq!(s.pmap_space().wired_count(), 50);
    s.unwire(BASE + 300 * PAGE, 50 * PAGE, true).unwrap();
    books(&vm, &s, &r, "unwired");
    assert_eq!(s.pmap_space().wired_count(), 0);
    for i in (0..PAGES).filter(|&i| i != 200) {
        let v = BASE + i * PAGE;
        assert_eq!(rdpage(&s, v), Ok(tag(v, 1)), "page {i}");
    }
    consistent(&vm, "w03");
    drop(s);
    no_leak(&vm, "w03");
}

/// Wiring the whole 2 MiB after a whole fill, then unwiring it: the
/// wired counts go to 512 and back to 0 (no wiring left over on the
/// demoted entries), and unmapping while wired frees everything.
#[test]
fn w04_mlock_whole_and_in_parts_after_a_whole_fill() {
    let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 4096);
    let s = vm.new_space().unwrap();
    let r = [(BASE, 2 * SUPER)];
    s.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
    wrpage(&s, BASE + SUPER - PAGE, 7).unwrap();
    assert!(is_super(&vm, &s, BASE));
    s.wire(BASE, SUPER, true).unwrap();
    books(&vm, &s, &r, "wired all");
    assert_eq!(s.pmap_space().wired_count(), PAGES);
    s.unwire(BASE, SUPER, true).unwrap();
    books(&vm, &s, &r, "unwired all");
    assert_eq!(s.pmap_space().wired_count(), 0);
    // Wire the second 2 MiB before touching it: wired faults fill page by
    // page (no whole fill for a wiring), then a write.
    s.wire(BASE + SUPER, SUPER, true).unwrap();
    assert_eq!(s.pmap_space().wired_count(), PAGES);
    wrpage(&s, BASE + SUPER + PAGE, 8).unwrap();
    books(&vm, &s, &r, "second wired");
    consistent(&vm, "w04 wired");
    // Unmap while wired.
    s.unmap(BASE, 2 * SUPER).unwrap();
    assert_eq!(s.pmap_space().resident_count(), 0);
    assert_eq!(s.pmap_space().wired_count(), 0);
    consistent(&vm, "w04");
    drop(s);
    no_leak(&vm, "w04");
}

/// Fork after a whole fill: the parent's superpage is write-protected
/// (and split or not), parent and child each see their own writes and the
/// other's old data, and all frames come back.
#[test]
fn w05_fork_and_cow_of_a_whole_superpage() {
    for pmap_on in [true, false] {
        let what = format!("pmap superpages {pmap_on}");
        let vm = vm_with(
            X86Pmap::new().with_superpages(pmap_on),
            SuperpagePolicy::Always,
            4096,
        );
        let p = vm.new_space().unwrap();
        let r = [(BASE, 2 * SUPER)];
        p.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
        for i in (0..PAGES).step_by(3) {
            let v = BASE + i * PAGE;
            wrpage(&p, v, tag(v, 1)).unwrap();
        }
        let c = p.fork().unwrap();
        books(&vm, &p, &r, &format!("{what}: parent after fork"));
        for i in (0..PAGES).step_by(5) {
            let v = BASE + i * PAGE;
            wrpage(&c, v, tag(v, 2)).unwrap();
        }
        for i in (1..PAGES).step_by(7) {
            let v = BASE + i * PAGE;
            wrpage(&p, v, tag(v, 3)).unwrap();
        }
        // The child's first write into the untouched second 2 MiB.
        wrpage(&c, BASE + SUPER + 9 * PAGE, tag(BASE + SUPER + 9 * PAGE, 4)).unwrap();
        for i in 0..PAGES {
            let v = BASE + i * PAGE;
            let old = if i % 3 == 0 { tag(v, 1) } else { 0 };
            let pw = if i % 7 == 1 { tag(v, 3) } else { old };
            let cw = if i % 5 == 0 { tag(v, 2) } else { old };
            assert_eq!(rdpage(&p, v), Ok(pw), "{what}: parent page {i}");
            assert_eq!(rdpage(&c, v), Ok(cw), "{what}: child page {i}");
        }
        assert_eq!(rdpage(&p, BASE + SUPER + 9 * PAGE), Ok(0), "{what}");
        books(&vm, &p, &r, &format!("{what}: parent"));
        books(&vm, &c, &r, &format!("{what}: child"));
        consistent(&vm, &what);
        drop(c);
        for i in 0..PAGES {
            let v = BASE + i * PAGE;
            let old = if i % 3 == 0 { tag(v, 1) } else { 0 };
            let pw = if i % 7 == 1 { tag(v, 3) } else { old };
            assert_eq!(
                rdpage(&p, v),
                Ok(pw),
                "{what}: parent page {i} after child exit"
            );
        }
        books(&vm, &p, &r, &format!("{what}: parent after child exit"));
        drop(p);
        no_leak(&vm, &what);
    }
}

/// Threads race the first writes of one fresh 2 MiB (released together
/// by a barrier), on several pages each. Every write survives, no frame is
/// mapped twice, the books balance, and nothing leaks, round after round.
#[test]
fn w06_threads_race_the_first_write_of_one_2mib() {
    const T: u64 = 4;
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut rounds, mut whole) = (0u64, 0u64);
    while Instant::now() < deadline {
        rounds += 1;
        let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 4096);
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, SUPER, Prot::RW).unwrap();
        let bar = Barrier::new(T as usize);
        std::thread::scope(|sc| {
            for t in 0..T {
                let (s, bar) = (&s, &bar);
                sc.spawn(move || {
                    let mut rng = Rng(rounds * 977 + t + 1);
                    bar.wait();
                    for k in 0..24 {
                        let i = (rng.below(PAGES / T) * T + t) % PAGES;
                        let v = BASE + i * PAGE;
                        wrpage(s, v, tag(v, t + 1)).unwrap();
                        if k % 4 == 0 {
                            assert_eq!(rdpage(s, v), Ok(tag(v, t + 1)), "round {rounds}");
                        }
                    }
                });
            }
        });
        whole += u64::from(is_super(&vm, &s, BASE));
        for i in 0..PAGES {
            let v = BASE + i * PAGE;
            let got = rdpage(&s, v).unwrap();
            let t = i % T;
            assert!(
                got == 0 || got == tag(v, t + 1),
                "round {rounds}: page {i} holds {got:#x}"
            );
        }
        books(&vm, &s, &[(BASE, SUPER)], &format!("w06 round {rounds}"));
        consistent(&vm, "w06");
        drop(s);
        no_leak(&vm, "w06");
    }
    eprintln!("w06: {rounds} rounds, {whole} ended as one 2 MiB entry");
}

/// Each thread's first write lands in its own fresh 2 MiB of one space at
/// the same moment: the whole fills contend for the space's table-tree
/// lock (`try_write`), the losers fall back to page-by-page entries. All
/// 2 MiB are fully mapped either way, and the books balance.
#[test]
fn w07_neighbouring_whole_fills_contend_for_the_tree_lock() {
    const T: u64 = 4;
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut rounds, mut entered, mut fell_back) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        rounds += 1;
        let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 8192);
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, T * SUPER, Prot::RW).unwrap();
        let bar = Barrier::new(T as usize);
        std::thread::scope(|sc| {
            for t in 0..T {
                let (s, bar) = (&s, &bar);
                sc.spawn(move || {
                    bar.wait();
                    let v = BASE + t * SUPER + (t * 37 % PAGES) * PAGE;
                    wrpage(s, v, tag(v, 1)).unwrap();
                });
            }
        });
        for t in 0..T {
            let b = BASE + t * SUPER;
            let sup = is_super(&vm, &s, b);
            if sup {
                entered += 1;
            } else {
                fell_back += 1;
            }
            for i in 0..PAGES {
                let v = b + i * PAGE;
                assert!(
                    s.extract(v).is_some(),
                    "round {rounds}: 2 MiB {t} page {i} not mapped (superpage {sup})"
                );
            }
            let v = b + (t * 37 % PAGES) * PAGE;
            assert_eq!(rdpage(&s, v), Ok(tag(v, 1)));
        }
        books(
            &vm,
            &s,
            &[(BASE, T * SUPER)],
            &format!("w07 round {rounds}"),
        );
        consistent(&vm, "w07");
        drop(s);
        no_leak(&vm, "w07");
    }
    eprintln!("w07: {rounds} rounds, {entered} 2 MiB entries, {fell_back} page by page");
}

/// Writers making whole fills race a thread that unmaps and maps the
/// region again and one that flips its protection. Writes fail only as
/// the mapping allows; afterwards every page holds zero or a tag of its
/// own, the books balance and nothing leaks.
#[test]
fn w08_whole_fills_race_munmap_and_mprotect() {
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        rounds += 1;
        let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 8192);
        let s = vm.new_space().unwrap();
        let region = (BASE, 3 * SUPER);
        s.map_anon(BASE, 3 * SUPER, Prot::RW).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|sc| {
            for t in 0..2u64 {
                let (s, stop) = (&s, &stop);
                sc.spawn(move || {
                    let mut rng = Rng(rounds * 31 + t + 5);
                    while !stop.load(Ordering::Relaxed) {
                        let v = BASE + rng.below(3 * PAGES) * PAGE;
                        let _ = wrpage(s, v, tag(v, 1));
                        if let Ok(got) = common::rd64(s, v) {
                            assert!(got == 0 || got == tag(v, 1), "{v:#x}: {got:#x}");
                        }
                    }
                });
            }
            let mut rng = Rng(rounds + 99);
            for _ in 0..40 {
                let k = rng.below(3);
                let b = BASE + k * SUPER;
                match rng.below(4) {
                    0 => {
                        s.unmap(b, SUPER).unwrap();
                        s.map_anon(b, SUPER, Prot::RW).unwrap();
                    }
                    1 => {
                        // Part of it only.
                        let off = rng.below(PAGES - 8) * PAGE;
                        s.unmap(b + off, 8 * PAGE).unwrap();
                        s.map_anon(b + off, 8 * PAGE, Prot::RW).unwrap();
                    }
                    2 => s.protect(b, SUPER, Prot::READ).unwrap(),
                    _ => s.protect(b, SUPER, Prot::RW).unwrap(),
                }
                std::thread::yield_now();
            }
            stop.store(true, Ordering::Relaxed);
        });
        s.protect(BASE, 3 * SUPER, Prot::RW).unwrap();
        for i in 0..3 * PAGES {
            let v = BASE + i * PAGE;
            if s.extract(v).is_some() {
                // Word by word: a write of a page's two words may straddle
                // an unmap or a protection change.
                for off in [0, PAGE - 8] {
                    let got = common::rd64(&s, v + off).unwrap();
                    assert!(
                        got == 0 || got == tag(v, 1),
                        "round {rounds}: {v:#x}+{off} holds {got:#x}"
                    );
                }
            }
        }
        books(&vm, &s, &[region], &format!("w08 round {rounds}"));
        consistent(&vm, "w08");
        drop(s);
        no_leak(&vm, "w08");
    }
    eprintln!("w08: {rounds} rounds");
}

/// A machine smaller than its memory use with swap: whole fills while the
/// pageout daemon runs continuously and readers read through the software
/// MMU. Every page written keeps its last write.
#[test]
fn w09_whole_fills_race_pageout_and_readers_on_a_small_machine() {
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        rounds += 1;
        let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 1800);
        let (_swap, _t) = with_swap(&vm, 32);
        let s = vm.new_space().unwrap();
        let n = 4 * PAGES;
        s.map_anon(BASE, 4 * SUPER, Prot::RW).unwrap();
        let stop = AtomicBool::new(false);
        let last: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
        std::thread::scope(|sc| {
            let pager = sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    vm.pageout(vm.total_pages());
                    std::thread::yield_now();
                }
            });
            let reader = sc.spawn(|| {
                let mut rng = Rng(rounds + 3);
                while !stop.load(Ordering::Relaxed) {
                    let i = rng.below(n);
                    let v = BASE + i * PAGE;
                    // One 8-byte word: a page is written in two steps.
                    let got = common::rd64(&s, v + 8 * (rng.below(2) * (PAGE / 8 - 1))).unwrap();
                    assert!(
                        got == 0 || got >> 8 == v,
                        "round {rounds}: reader saw {got:#x} at {v:#x}"
                    );
                }
            });
            let writers: Vec<_> = (0..2u64)
                .map(|t| {
                    let (s, last) = (&s, &last);
                    sc.spawn(move || {
                        let mut rng = Rng(rounds * 17 + t + 1);
                        for r in 1..120u64 {
                            // Thread t owns pages t, t+2, ...
                            let i = rng.below(n / 2) * 2 + t;
                            let v = BASE + i * PAGE;
                            wrpage(s, v, tag(v, r)).unwrap();
                            last[i as usize].store(tag(v, r), Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            pager.join().unwrap();
            reader.join().unwrap();
        });
        for i in 0..n {
            let v = BASE + i * PAGE;
            let want = last[i as usize].load(Ordering::Relaxed);
            assert_eq!(rdpage(&s, v), Ok(want), "round {rounds}: page {i}");
        }
        books(
            &vm,
            &s,
            &[(BASE, 4 * SUPER)],
            &format!("w09 round {rounds}"),
        );
        consistent(&vm, "w09");
        drop(s);
        no_leak(&vm, "w09");
    }
    eprintln!("w09: {rounds} rounds");
}

/// Machines with barely enough frames: the 512 for the data and from
/// none to a few for tables. The write either succeeds or reports a
/// shortage; nothing panics or hangs, nothing leaks, and a successful
/// write is kept.
#[test]
fn w10_tiny_machines_one_run_and_a_few_frames() {
    for extra in 0..12u64 {
        for policy in [SuperpagePolicy::Always, SuperpagePolicy::Never] {
            let what = format!("{extra} extra frames, {policy:?}");
            let vm = vm_with(X86Pmap::new(), policy, 1024);
            let s = vm.new_space().unwrap();
            s.map_anon(BASE, SUPER, Prot::RW).unwrap();
            // Leave 512 + extra frames free.
            let free = vm.free_pages();
            let keep = PAGES + extra;
            let balloon = vm.inflate_balloon(free.saturating_sub(keep));
            let got = wrpage(&s, BASE + 5 * PAGE, tag(BASE + 5 * PAGE, 1));
            if got.is_ok() {
                assert_eq!(
                    rdpage(&s, BASE + 5 * PAGE),
                    Ok(tag(BASE + 5 * PAGE, 1)),
                    "{what}"
                );
            }
            eprintln!("w10 {what}: {got:?}, superpage {}", is_super(&vm, &s, BASE));
            books(&vm, &s, &[(BASE, SUPER)], &what);
            consistent(&vm, &what);
            drop(balloon);
            drop(s);
            no_leak(&vm, &what);
        }
    }
}

/// A fresh whole fill after the same 2 MiB was mapped page by page and
/// unmapped: the page directory slot is empty again, so the fill is one
/// entry again, and no table frame is left over from the first life.
#[test]
fn w11_refill_after_unmap_is_whole_again_and_tables_do_not_grow() {
    let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 4096);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE + 8 * SUPER, SUPER, Prot::RW).unwrap();
    s.write_u8(BASE + 8 * SUPER, 1).unwrap(); // the upper tables exist
    let r = [(BASE, SUPER), (BASE + 8 * SUPER, SUPER)];
    let tables0 = vm.pmap().table_pages(s.pmap_space());
    for round in 0..20u64 {
        s.map_anon(BASE, SUPER, Prot::RW).unwrap();
        if round % 2 == 1 {
            s.advise_superpages(BASE, SUPER, SuperpageAdvice::NoHuge)
                .unwrap();
            for i in (0..PAGES).step_by(50) {
                s.write_u8(BASE + i * PAGE, 2).unwrap();
            }
            assert!(!is_super(&vm, &s, BASE), "round {round}");
        } else {
            s.write_u8(BASE + round * PAGE, 2).unwrap();
            assert!(is_super(&vm, &s, BASE), "round {round}: not whole");
        }
        books(&vm, &s, &r, &format!("w11 round {round}"));
        s.unmap(BASE, SUPER).unwrap();
        assert_eq!(
            vm.pmap().table_pages(s.pmap_space()),
            tables0,
            "round {round}: table frames left"
        );
    }
    consistent(&vm, "w11");
    drop(s);
    no_leak(&vm, "w11");
}

/// Whole fills under `HUGEPAGE` advice on the default policy, then
/// pageout of everything to swap and back: the data comes back, books
/// balance, and a second whole fill of the same 2 MiB (after the pageout
/// gave the object a pager) is not made (pages come from swap).
#[test]
fn w12_advised_fill_then_pageout_and_back() {
    let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Reserve, 2048);
    let (_swap, _t) = with_swap(&vm, 32);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
    s.advise_superpages(BASE, 2 * SUPER, SuperpageAdvice::Huge)
        .unwrap();
    for i in (0..PAGES).step_by(9) {
        let v = BASE + i * PAGE;
        wrpage(&s, v, tag(v, 1)).unwrap();
    }
    assert!(is_super(&vm, &s, BASE));
    squeeze(&vm);
    books(&vm, &s, &[(BASE, 2 * SUPER)], "w12 after squeeze");
    // Touch the other 2 MiB: its object has a pager now.
    let v = BASE + SUPER + 3 * PAGE;
    wrpage(&s, v, tag(v, 2)).unwrap();
    for i in 0..PAGES {
        let v = BASE + i * PAGE;
        let want = if i % 9 == 0 { tag(v, 1) } else { 0 };
        assert_eq!(rdpage(&s, v), Ok(want), "page {i}");
    }
    assert_eq!(rdpage(&s, v), Ok(tag(v, 2)));
    books(&vm, &s, &[(BASE, 2 * SUPER)], "w12");
    consistent(&vm, "w12");
    drop(s);
    no_leak(&vm, "w12");
}

/// The same random program of writes, reads, munmap/mmap, mprotect,
/// mlock/munlock, fork (child writes then exits) and pageout on four
/// machines: whole fills entered with one entry, whole fills entered page
/// by page (pmap superpages off), no reservations, and the reference
/// pmap. Every read matches a byte model, on all four.
#[test]
fn w13_random_program_matches_a_model_on_four_machines() {
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut seed = 0u64;
    if let Ok(one) = std::env::var("W13_SEED") {
        let seed: u64 = one.parse().unwrap();
        let r = [
            std::panic::catch_unwind(|| {
                run_model(
                    vm_with(X86Pmap::new(), SuperpagePolicy::Always, 3000),
                    seed,
                    "x86 whole",
                    None,
                )
            })
            .is_ok(),
            std::panic::catch_unwind(|| {
                run_model(
                    vm_with(
                        X86Pmap::new().with_superpages(false),
                        SuperpagePolicy::Always,
                        3000,
                    ),
                    seed,
                    "x86 off",
                    None,
                )
            })
            .is_ok(),
            std::panic::catch_unwind(|| {
                run_model(
                    vm_with(X86Pmap::new(), SuperpagePolicy::Never, 3000),
                    seed,
                    "x86 never",
                    None,
                )
            })
            .is_ok(),
            std::panic::catch_unwind(|| {
                run_model(
                    vm_with(RefPmap::new(), SuperpagePolicy::Always, 3000),
                    seed,
                    "ref",
                    None,
                )
            })
            .is_ok(),
        ];
        assert_eq!(r, [true; 4], "seed {seed}: which machines kept the model");
        return;
    }
    while Instant::now() < deadline {
        seed += 1;
        run_model(
            vm_with(X86Pmap::new(), SuperpagePolicy::Always, 3000),
            seed,
            "x86 whole",
            Some(true),
        );
        run_model(
            vm_with(
                X86Pmap::new().with_superpages(false),
                SuperpagePolicy::Always,
                3000,
            ),
            seed,
            "x86 no superpages",
            Some(false),
        );
        run_model(
            vm_with(X86Pmap::new(), SuperpagePolicy::Never, 3000),
            seed,
            "x86 never",
            None,
        );
        run_model(
            vm_with(RefPmap::new(), SuperpagePolicy::Always, 3000),
            seed,
            "ref",
            None,
        );
    }
    eprintln!("w13: {seed} seeds");
}

trait Books {
    fn books_of(&self, s: &VmSpace<Self::P>, ranges: &[(u64, u64)], what: &str);
    type P: Pmap;
}

impl Books for Vm<X86Pmap> {
    type P = X86Pmap;
    fn books_of(&self, s: &VmSpace<X86Pmap>, ranges: &[(u64, u64)], what: &str) {
        books(self, s, ranges, what);
    }
}

impl Books for Vm<RefPmap> {
    type P = RefPmap;
    fn books_of(&self, _: &VmSpace<RefPmap>, _: &[(u64, u64)], _: &str) {}
}

fn run_model<P: Pmap>(vm: Arc<Vm<P>>, seed: u64, what: &str, _pmap_whole: Option<bool>)
where
    Vm<P>: Books<P = P>,
{
    const REGIONS: u64 = 3;
    let (_swap, _t) = with_swap(&*vm, 32);
    let s = vm.new_space().unwrap();
    let ranges = [(BASE, REGIONS * SUPER)];
    s.map_anon(BASE, REGIONS * SUPER, Prot::RW).unwrap();
    // Page index -> (mapped, writable, value)
    let n = REGIONS * PAGES;
    let mut model: Vec<(bool, bool, u64)> = vec![(true, true, 0); n as usize];
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut wired: Vec<(u64, u64)> = Vec::new();
    for step in 0..120u64 {
        let w = format!("{what} seed {seed} step {step}");
        let trace = std::env::var("W13_TRACE").is_ok();
        let op = rng.below(100);
        if trace {
            eprintln!("{w}: op {op}");
        }
        match op {
            0..=44 => {
                let i = rng.below(n);
                let v = BASE + i * PAGE;
                let val = tag(v, step);
                if trace {
                    eprintln!("  write {i}");
                }
                let r = wrpage(&s, v, val);
                let (m, wr, _) = model[i as usize];
                assert_eq!(r.is_ok(), m && wr, "{w}: write at page {i}: {r:?}");
                if r.is_ok() {
                    model[i as usize].2 = val;
                }
            }
            45..=64 => {
                let i = rng.below(n);
                let v = BASE + i * PAGE;
                let r = rdpage(&s, v);
                let (m, _, val) = model[i as usize];
                if m {
                    assert_eq!(r, Ok(val), "{w}: read page {i}");
                } else {
                    assert!(r.is_err(), "{w}: read of unmapped page {i}");
                }
            }
            65..=71 => {
                // munmap + mmap a run of pages (not wired ones).
                let i = rng.below(n);
                let big = rng.pct(30);
                let len = 1 + rng.below(if big { PAGES } else { 16 });
                let len = len.min(n - i);
                if wired.iter().any(|&(a, l)| i < a + l && a < i + len) {
                    continue;
                }
                if trace {
                    eprintln!("  unmap {i}+{len}");
                }
                s.unmap(BASE + i * PAGE, len * PAGE).unwrap();
                for k in i..i + len {
                    model[k as usize] = (false, true, 0);
                }
                if rng.pct(70) {
                    s.map_anon(BASE + i * PAGE, len * PAGE, Prot::RW).unwrap();
                    for k in i..i + len {
                        model[k as usize] = (true, true, 0);
                    }
                }
            }
            72..=79 => {
                let i = rng.below(n);
                let len = (1 + rng.below(PAGES)).min(n - i);
                if (i..i + len).any(|k| !model[k as usize].0) {
                    continue;
                }
                let prot = if rng.pct(50) { Prot::READ } else { Prot::RW };
                if trace {
                    eprintln!("  protect {i}+{len} {prot:?}");
                }
                s.protect(BASE + i * PAGE, len * PAGE, prot).unwrap();
                for k in i..i + len {
                    model[k as usize].1 = prot.contains(Prot::WRITE);
                }
            }
            80..=85 => {
                if let Some((a, l)) = wired.pop() {
                    if trace {
                        eprintln!("  unwire {a}+{l}");
                    }
                    s.unwire(BASE + a * PAGE, l * PAGE, true).unwrap();
                } else {
                    let i = rng.below(n);
                    let len = (1 + rng.below(64)).min(n - i);
                    if (i..i + len).any(|k| !model[k as usize].0) {
                        continue;
                    }
                    if trace {
                        eprintln!("  wire {i}+{len}");
                    }
                    s.wire(BASE + i * PAGE, len * PAGE, true).unwrap();
                    wired.push((i, len));
                }
            }
            86..=91 => {
                // fork; the child writes some pages then exits.
                let c = s.fork().unwrap();
                let mut own = HashSet::new();
                for _ in 0..8 {
                    let i = rng.below(n);
                    let (m, wr, val) = model[i as usize];
                    let v = BASE + i * PAGE;
                    if m {
                        let want = if own.contains(&i) { tag(v, 0xfe) } else { val };
                        assert_eq!(rdpage(&c, v), Ok(want), "{w}: child read {i}");
                    }
                    if m && wr {
                        own.insert(i);
                        if trace {
                            eprintln!("  child write {i}");
                        }
                        wrpage(&c, v, tag(v, 0xfe)).unwrap();
                    }
                }
                if rng.pct(50) {
                    drop(c);
                } else {
                    // The parent writes while the child lives.
                    for _ in 0..8 {
                        let i = rng.below(n);
                        let (m, wr, _) = model[i as usize];
                        let v = BASE + i * PAGE;
                        if m && wr {
                            wrpage(&s, v, tag(v, step)).unwrap();
                            model[i as usize].2 = tag(v, step);
                        }
                    }
                    drop(c);
                }
            }
            92..=95 => {
                vm.pageout(vm.total_pages() / 2);
            }
            _ => {
                vm.books_of(&s, &ranges, &w);
                consistent(&*vm, &w);
            }
        }
    }
    for (a, l) in wired.drain(..) {
        s.unwire(BASE + a * PAGE, l * PAGE, true).unwrap();
    }
    for i in 0..n {
        let v = BASE + i * PAGE;
        let (m, _, val) = model[i as usize];
        if m {
            assert_eq!(rdpage(&s, v), Ok(val), "{what} seed {seed}: final page {i}");
        }
    }
    vm.books_of(&s, &ranges, what);
    consistent(&*vm, what);
    drop(s);
    no_leak(&*vm, what);
}

/// Two spaces share one anonymous object (inherit share across a fork);
/// a thread in each makes first writes in the same fresh 2 MiB regions,
/// so whole fills race from two pmaps over one object, while a third
/// thread churns the free lists (balloon in and out, single pages of a
/// third space faulted and unmapped) under `alloc_run_rest`. Both spaces
/// see every last write, books balance, every frame comes back once.
#[test]
fn w14_whole_fills_from_two_spaces_of_one_object_and_free_list_churn() {
    use vm_core::Inheritance;
    const R: u64 = 4;
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        rounds += 1;
        let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 6144);
        let a = vm.new_space().unwrap();
        a.map_anon(BASE, R * SUPER, Prot::RW).unwrap();
        a.set_inheritance(BASE, R * SUPER, Inheritance::Share)
            .unwrap();
        let b = a.fork().unwrap();
        let churn_space = vm.new_space().unwrap();
        let cbase = BASE + 64 * SUPER;
        churn_space.map_anon(cbase, SUPER, Prot::RW).unwrap();
        churn_space
            .advise_superpages(cbase, SUPER, SuperpageAdvice::NoHuge)
            .unwrap();
        let n = R * PAGES;
        let last: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
        let stop = AtomicBool::new(false);
        std::thread::scope(|sc| {
            let churn = sc.spawn(|| {
                let mut rng = Rng(rounds + 77);
                while !stop.load(Ordering::Relaxed) {
                    let bl = vm.inflate_balloon(rng.below(300));
                    for _ in 0..16 {
                        let v = cbase + rng.below(PAGES) * PAGE;
                        let _ = churn_space.write_u8(v, 1);
                    }
                    drop(bl);
                    churn_space.unmap(cbase, SUPER).unwrap();
                    churn_space.map_anon(cbase, SUPER, Prot::RW).unwrap();
                    churn_space
                        .advise_superpages(cbase, SUPER, SuperpageAdvice::NoHuge)
                        .unwrap();
                }
            });
            let writers: Vec<_> = [&a, &b]
                .into_iter()
                .enumerate()
                .map(|(t, s)| {
                    let last = &last;
                    let t = t as u64;
                    sc.spawn(move || {
                        let mut rng = Rng(rounds * 7 + t + 1);
                        for r in 1..100u64 {
                            let i = rng.below(n / 2) * 2 + t;
                            let v = BASE + i * PAGE;
                            wrpage(s, v, tag(v, r)).unwrap();
                            last[i as usize].store(tag(v, r), Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            churn.join().unwrap();
        });
        for i in 0..n {
            let v = BASE + i * PAGE;
            let want = last[i as usize].load(Ordering::Relaxed);
            assert_eq!(rdpage(&a, v), Ok(want), "round {rounds}: space a page {i}");
            assert_eq!(rdpage(&b, v), Ok(want), "round {rounds}: space b page {i}");
        }
        books(
            &vm,
            &a,
            &[(BASE, R * SUPER)],
            &format!("w14 round {rounds} a"),
        );
        books(
            &vm,
            &b,
            &[(BASE, R * SUPER)],
            &format!("w14 round {rounds} b"),
        );
        consistent(&vm, "w14");
        drop(churn_space);
        drop(b);
        drop(a);
        lists_whole(&vm, "w14");
    }
    eprintln!("w14: {rounds} rounds");
}
