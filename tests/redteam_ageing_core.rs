//! Red team, machine level: superpages aged by page-out without being
//! split (commit e683961) and reservations that claim the runs most
//! recently made whole first (commit ea7aa1b). Every byte must read what
//! was written, the books must balance after every step, and no frame may
//! leak or be handed out twice.

mod common;

use common::{Rng, config, consistent, rdpage, squeeze, wrpage};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vm_core::{Pmap, Prot, SuperpagePolicy, Vm, VmConfig, VmSpace};
use vm_pager_swap::Swap;
use vm_pmap_x86_64::{PteFlags, X86Pmap};
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const PAGES: u64 = SUPER / PAGE;
const BASE: u64 = 0x4000_0000;

fn tag(va: u64, round: u64) -> u64 {
    (va << 8) | (round & 0xff) | 1
}

fn vm_with(policy: SuperpagePolicy, pages: u64) -> Arc<Vm<X86Pmap>> {
    Vm::new(
        X86Pmap::new(),
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

fn supers(vm: &Vm<X86Pmap>, s: &VmSpace<X86Pmap>, base: u64, n: u64) -> usize {
    (0..n)
        .filter(|k| {
            vm.pmap()
                .pte(s.pmap_space(), base + k * SUPER)
                .is_some_and(|e| e & 1 != 0 && e & PteFlags::HUGE.bits() != 0)
        })
        .count()
}

fn fill<P: Pmap>(s: &VmSpace<P>, base: u64, pages: u64, round: u64) {
    for i in 0..pages {
        let va = base + i * PAGE;
        wrpage(s, va, tag(va, round)).unwrap();
    }
}

fn check<P: Pmap>(s: &VmSpace<P>, base: u64, pages: u64, want: impl Fn(u64) -> u64, what: &str) {
    for i in 0..pages {
        let va = base + i * PAGE;
        assert_eq!(rdpage(s, va), Ok(want(i)), "{what}: page {i} at {va:#x}");
    }
}

/// Every frame is on the free lists exactly once.
fn lists_whole<P: Pmap>(vm: &Vm<P>, what: &str) {
    assert_eq!(vm.free_pages(), vm.total_pages(), "{what}: frames leaked");
    let b = vm.inflate_balloon(u64::MAX);
    let frames: HashSet<u64> = b.frames().map(|p| p.0).collect();
    assert_eq!(
        (b.len(), frames.len() as u64),
        (vm.total_pages(), vm.total_pages()),
        "{what}: the free lists do not hand out every frame exactly once"
    );
    drop(b);
    assert_eq!(vm.free_pages(), vm.total_pages(), "{what}: after balloon");
}

/// Superpages aged by page-out under pressure (more memory written than
/// the machine has), forked, written on both sides, paged out again and
/// again: every byte survives, the books balance after each step.
#[test]
fn aged_superpages_under_pressure_fork_and_swap_keep_every_byte() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let what = format!("{policy:?}");
        // 24 MiB of memory, 16 MiB written by the parent, then a child.
        let vm = vm_with(policy, 6144);
        let (_swap, _t) = with_swap(&vm, 96);
        let p = vm.new_space().unwrap();
        let n = 8;
        p.map_anon(BASE, n * SUPER, Prot::RW).unwrap();
        fill(&p, BASE, n * PAGES, 1);
        consistent(&vm, &format!("{what}: filled"));
        // Age: page-out passes with accesses between (A set again).
        for round in 0..3 {
            vm.pageout(vm.free_pages() + 512);
            consistent(&vm, &format!("{what}: ageing {round}"));
            for k in 0..n {
                let va = BASE + k * SUPER + (round * 7 + k) * PAGE;
                assert_eq!(rdpage(&p, va), Ok(tag(va, 1)), "{what}: ageing {round}");
            }
        }
        let c = p.fork().unwrap();
        consistent(&vm, &format!("{what}: forked"));
        // Parent writes pages with i % 3 == 0, the child i % 3 == 1.
        for i in 0..n * PAGES {
            let va = BASE + i * PAGE;
            match i % 3 {
                0 => wrpage(&p, va, tag(va, 2)).unwrap(),
                1 => wrpage(&c, va, tag(va, 3)).unwrap(),
                _ => {}
            }
        }
        consistent(&vm, &format!("{what}: written after fork"));
        let pw = |i: u64| tag(BASE + i * PAGE, if i.is_multiple_of(3) { 2 } else { 1 });
        let cw = |i: u64| tag(BASE + i * PAGE, if i % 3 == 1 { 3 } else { 1 });
        for round in 0..3 {
            squeeze(&vm);
            consistent(&vm, &format!("{what}: squeezed {round}"));
            check(&c, BASE, n * PAGES, cw, &format!("{what}: child {round}"));
            consistent(&vm, &format!("{what}: child read {round}"));
            check(&p, BASE, n * PAGES, pw, &format!("{what}: parent {round}"));
            consistent(&vm, &format!("{what}: parent read {round}"));
        }
        drop(c);
        // The parent alone: rewrite a superpage's worth, age, check.
        fill(&p, BASE + 2 * SUPER, PAGES, 4);
        squeeze(&vm);
        check(
            &p,
            BASE,
            n * PAGES,
            |i| {
                if (2 * PAGES..3 * PAGES).contains(&i) {
                    tag(BASE + i * PAGE, 4)
                } else {
                    pw(i)
                }
            },
            &format!("{what}: parent alone"),
        );
        consistent(&vm, &format!("{what}: end"));
        drop(p);
        lists_whole(&vm, &what);
    }
}

/// Page-out running continuously (ageing superpages whole) while threads
/// write into whole superpages and read them back: no write is lost.
#[test]
fn continuous_pageout_ageing_whole_superpages_loses_no_write() {
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        rounds += 1;
        let vm = vm_with(SuperpagePolicy::Always, 4096);
        let (_swap, _t) = with_swap(&vm, 48);
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, 4 * SUPER, Prot::RW).unwrap();
        // Whole superpages first, so page-out meets 2 MiB entries.
        for k in 0..4 {
            wrpage(&s, BASE + k * SUPER, tag(BASE + k * SUPER, 1)).unwrap();
        }
        let stop = AtomicBool::new(false);
        let written: Vec<(u64, u64)> = std::thread::scope(|sc| {
            let pager = sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    vm.pageout(vm.free_pages() + 256);
                }
            });
            let writers: Vec<_> = (0..2u64)
                .map(|t| {
                    let s = &s;
                    sc.spawn(move || {
                        let mut rng = Rng(rounds * 977 + t + 3);
                        let mut mine = Vec::new();
                        for n in 0..300 {
                            let i = rng.below(4 * PAGES / 2) * 2 + t;
                            let va = BASE + i * PAGE;
                            let v = tag(va, n + 2);
                            wrpage(s, va, v).unwrap();
                            assert_eq!(rdpage(s, va), Ok(v), "round {rounds}: read back");
                            mine.retain(|&(j, _)| j != i);
                            mine.push((i, v));
                        }
                        mine
                    })
                })
                .collect();
            let w = writers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect();
            stop.store(true, Ordering::Relaxed);
            pager.join().unwrap();
            w
        });
        let mut want = vec![0u64; (4 * PAGES) as usize];
        for k in 0..4 {
            want[(k * PAGES) as usize] = tag(BASE + k * SUPER, 1);
        }
        for (i, v) in written {
            want[i as usize] = v;
        }
        for (i, w) in want.iter().enumerate() {
            let va = BASE + i as u64 * PAGE;
            assert_eq!(rdpage(&s, va), Ok(*w), "round {rounds}: page {i} lost");
        }
        consistent(&vm, "continuous pageout");
        drop(s);
        lists_whole(&vm, "continuous pageout");
    }
    eprintln!("{rounds} rounds");
}

/// Runs recycled quickly: threads map whole superpages, fill, check,
/// unmap and map again (the ring hands back the runs just freed), one
/// forking and another paging out meanwhile. Every byte reads what was
/// written; at the end every frame is free exactly once.
#[test]
fn recycled_runs_from_many_threads_keep_every_byte() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let vm = vm_with(policy, 8192);
        let (_swap, _t) = with_swap(&vm, 64);
        let deadline = Instant::now() + Duration::from_secs(8);
        let stop = AtomicBool::new(false);
        let total_supers = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|sc| {
            let pager = sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    vm.pageout(vm.free_pages() + 128);
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            let workers: Vec<_> = (0..3u64)
                .map(|t| {
                    let vm = &vm;
                    let total_supers = &total_supers;
                    sc.spawn(move || {
                        let s = vm.new_space().unwrap();
                        let base = BASE + t * 64 * SUPER;
                        let mut rng = Rng(t * 31 + 11);
                        let mut round = 0u64;
                        while Instant::now() < deadline {
                            round += 1;
                            let n = 1 + rng.below(3);
                            s.map_anon(base, n * SUPER, Prot::RW).unwrap();
                            // Partly: a write per page (whole-superpage
                            // fault on the first), then every page.
                            fill(&s, base, n * PAGES, round);
                            total_supers.fetch_add(supers(vm, &s, base, n), Ordering::Relaxed);
                            if t == 0 && round.is_multiple_of(3) {
                                let c = s.fork().unwrap();
                                let half = n * PAGES / 2;
                                fill(&c, base, half, round + 100);
                                check(
                                    &s,
                                    base,
                                    n * PAGES,
                                    |i| tag(base + i * PAGE, round),
                                    "parent after the child wrote",
                                );
                                check(
                                    &c,
                                    base,
                                    n * PAGES,
                                    |i| {
                                        tag(
                                            base + i * PAGE,
                                            if i < half { round + 100 } else { round },
                                        )
                                    },
                                    "child",
                                );
                                drop(c);
                            }
                            check(
                                &s,
                                base,
                                n * PAGES,
                                |i| tag(base + i * PAGE, round),
                                &format!("thread {t} round {round}"),
                            );
                            s.unmap(base, n * SUPER).unwrap();
                        }
                        round
                    })
                })
                .collect();
            let rounds: Vec<u64> = workers.into_iter().map(|w| w.join().unwrap()).collect();
            stop.store(true, Ordering::Relaxed);
            pager.join().unwrap();
            eprintln!("{policy:?}: rounds {rounds:?}");
        });
        consistent(&vm, "recycled runs");
        if policy == SuperpagePolicy::Always {
            assert!(
                total_supers.load(Ordering::Relaxed) > 0,
                "no superpage was ever made"
            );
        }
        lists_whole(&vm, &format!("{policy:?}: recycled runs"));
    }
}

/// A region of several superpages freed and faulted again gets whole
/// runs back each time (the ring), single-threaded and exact: every
/// superpage is promoted each round, frames are never shared between two
/// pages, and nothing leaks.
#[test]
fn a_region_faulted_again_gets_whole_runs_each_round() {
    let vm = vm_with(SuperpagePolicy::Always, 8192);
    let s = vm.new_space().unwrap();
    let other = vm.new_space().unwrap();
    let n = 5;
    for round in 1..=12u64 {
        s.map_anon(BASE, n * SUPER, Prot::RW).unwrap();
        fill(&s, BASE, n * PAGES, round);
        assert_eq!(supers(&vm, &s, BASE, n), n as usize, "round {round}");
        // 4 KiB allocations elsewhere between: take frames off some runs.
        if round % 2 == 1 {
            other.map_anon(BASE, 64 * PAGE, Prot::RW).unwrap();
        }
        fill(&other, BASE, 64, round);
        let mut frames = HashSet::new();
        for i in 0..n * PAGES {
            let f = s.extract(BASE + i * PAGE).unwrap();
            assert!(frames.insert(f.0), "round {round}: frame {f:?} twice");
        }
        for i in 0..64 {
            let f = other.extract(BASE + i * PAGE).unwrap();
            assert!(frames.insert(f.0), "round {round}: frame {f:?} shared");
        }
        check(&s, BASE, n * PAGES, |i| tag(BASE + i * PAGE, round), "s");
        consistent(&vm, &format!("round {round}"));
        s.unmap(BASE, n * SUPER).unwrap();
        if round % 2 == 0 {
            other.unmap(BASE, 64 * PAGE).unwrap();
        }
    }
    drop(s);
    drop(other);
    lists_whole(&vm, "regions again");
}
