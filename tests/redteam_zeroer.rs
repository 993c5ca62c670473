//! Red team: the background page zeroer (`Vm::spawn_page_zeroer`,
//! `Vm::zero_free_pages`) against everything that owns or writes frames.
//!
//! Invariants checked: a free frame flagged `ZERO` is all zeros (audited
//! frame by frame when the machine is quiet); the free and free-zeroed
//! counts match the page records; no page in use loses data to the
//! zeroer; fresh zero-fill pages (which may skip zeroing) read zero in
//! every byte; nothing deadlocks; the Vm is freed once the zeroer and the
//! last Arc go; superpage yield does not collapse beside the zeroer.

mod common;

use common::{Rng, audit, config, rdpage, wrpage};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vm_core::page_queues::Thresholds;
use vm_core::{Pmap, Prot, SuperpagePolicy, Vm, VmConfig, VmSpace};
use vm_pager_swap::Swap;
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::RefPmap;
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const PAGES: u64 = SUPER / PAGE;
const BASE: u64 = 0x4000_0000;

fn x86_policy(pages: u64, policy: SuperpagePolicy) -> Arc<Vm<X86Pmap>> {
    Vm::new(
        X86Pmap::new(),
        VmConfig {
            superpages: policy,
            ..config(pages)
        },
    )
    .unwrap()
}

/// A machine with real thresholds (so the pageout daemon works).
fn x86_thresh(pages: u64, policy: SuperpagePolicy) -> Arc<Vm<X86Pmap>> {
    Vm::new(
        X86Pmap::new(),
        VmConfig {
            superpages: policy,
            thresholds: Some(Thresholds::for_frames(pages)),
            ..config(pages)
        },
    )
    .unwrap()
}

fn with_swap<P: Pmap>(vm: &Vm<P>, bytes: u64) -> (Swap, TempPath) {
    let t = TempPath::new();
    let s = Swap::create(&t.0, bytes).unwrap();
    vm.set_swap(s.provider());
    (s, t)
}

fn wait_all_zeroed<P: Pmap>(vm: &Vm<P>, what: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    while vm.free_zeroed_pages() < vm.free_pages() {
        assert!(Instant::now() < until, "{what}: zeroing never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Every byte of `pages` pages from `base` is zero.
fn all_zero<P: Pmap>(s: &VmSpace<P>, base: u64, pages: u64, what: &str) {
    let mut buf = vec![0u8; PAGE as usize];
    for i in 0..pages {
        s.read(base + i * PAGE, &mut buf).unwrap();
        if let Some(off) = buf.iter().position(|&b| b != 0) {
            panic!(
                "{what}: fresh page {i} at {:#x} has byte {:#x} at {off}",
                base + i * PAGE,
                buf[off]
            );
        }
    }
}

fn tag(va: u64, round: u64) -> u64 {
    (va << 8) | (round & 0xff) | 1
}

/// Fills the whole page at `va` with a non-zero pattern.
fn dirty_page<P: Pmap>(s: &VmSpace<P>, va: u64, b: u8) {
    s.write(va, &[b | 1; PAGE as usize]).unwrap();
}

// ---------------------------------------------------------------------
// 1. Frames freed by every path come back honest about ZERO.

/// A mixed workload on the x86_64 pmap (page tables made and freed with
/// `free_zeroed`, promotions, demotions, forks, mlock, mprotect, partial
/// unmaps), then a frame-by-frame audit, before and after the zeroer.
#[test]
fn z01_every_free_zero_frame_is_zero_after_mixed_workload() {
    let vm = x86_policy(4096, SuperpagePolicy::Reserve);
    {
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
        for i in 0..2 * PAGES {
            wrpage(&s, BASE + i * PAGE, tag(BASE + i * PAGE, 1)).unwrap();
        }
        // Sparse pages far apart: a table tree per page.
        for k in 0..24u64 {
            let va = 0x10_0000_0000 + k * (1 << 30);
            s.map_anon(va, PAGE, Prot::RW).unwrap();
            dirty_page(&s, va, k as u8);
        }
        s.wire(BASE + 8 * PAGE, 16 * PAGE, true).unwrap();
        let child = s.fork().unwrap();
        for i in (0..2 * PAGES).step_by(7) {
            wrpage(&child, BASE + i * PAGE, tag(BASE + i * PAGE, 2)).unwrap();
        }
        s.protect(BASE + SUPER, 4 * PAGE, Prot::READ).unwrap();
        s.unmap(BASE + 100 * PAGE, 3 * PAGE).unwrap();
        for k in (0..24u64).step_by(2) {
            s.unmap(0x10_0000_0000 + k * (1 << 30), PAGE).unwrap();
        }
        audit(&vm, "z01 midway");
        drop(child);
        audit(&vm, "z01 child gone");
    }
    assert_eq!(vm.free_pages(), vm.total_pages(), "z01: frames leaked");
    audit(&vm, "z01 all freed");
    let z = vm.spawn_page_zeroer(Duration::ZERO);
    wait_all_zeroed(&vm, "z01");
    drop(z);
    audit(&vm, "z01 after zeroer");
    assert_eq!(vm.free_zeroed_pages(), vm.total_pages());
}

/// Page tables freed as zero on a busy machine: many spaces touching
/// sparse addresses, torn down in turn, the zeroer on; then every fresh
/// zero-fill page (which skips zeroing) must read zero in every byte.
#[test]
fn z02_fresh_pages_after_table_churn_read_zero_everywhere() {
    let vm = x86_policy(2048, SuperpagePolicy::Never);
    let z = vm.spawn_page_zeroer(Duration::ZERO);
    for round in 0..6u64 {
        let spaces: Vec<_> = (0..4).map(|_| vm.new_space().unwrap()).collect();
        for (j, s) in spaces.iter().enumerate() {
            for k in 0..16u64 {
                let va = 0x20_0000_0000 + (k * 4 + j as u64) * (1 << 21) + round * PAGE;
                s.map_anon(va, 2 * PAGE, Prot::RW).unwrap();
                dirty_page(s, va, (round + k) as u8);
                dirty_page(s, va + PAGE, 0x5a);
            }
        }
        drop(spaces);
    }
    drop(z);
    audit(&vm, "z02 churn");
    let s = vm.new_space().unwrap();
    let n = vm.free_pages() - 64;
    s.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
    let before = vm.counters().snapshot();
    all_zero(&s, BASE, n, "z02");
    let d = vm.counters().snapshot().since(&before);
    assert!(d.v_ozfod > 0, "no pre-zeroed page was used");
    drop(s);
    audit(&vm, "z02 end");
}

/// Balloon inflate/deflate beside the zeroer: the counts settle and no
/// frame flagged ZERO holds data.
#[test]
fn z03_balloon_beside_the_zeroer() {
    let vm = x86_policy(1024, SuperpagePolicy::Never);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 256 * PAGE, Prot::RW).unwrap();
    for i in 0..256 {
        dirty_page(&s, BASE + i * PAGE, i as u8);
    }
    s.unmap(BASE, 128 * PAGE).unwrap();
    let z = vm.spawn_page_zeroer(Duration::ZERO);
    for _ in 0..40 {
        let mut b = vm.inflate_balloon(vm.free_pages());
        assert!(!b.is_empty());
        b.deflate(b.len() / 2);
        drop(b);
    }
    wait_all_zeroed(&vm, "z03");
    drop(z);
    audit(&vm, "z03");
    for i in 128..256 {
        let mut got = [0u8; 16];
        s.read(BASE + i * PAGE + 100, &mut got).unwrap();
        assert!(
            got.iter().all(|&b| b == (i as u8 | 1)),
            "z03: page {i} lost data"
        );
    }
    drop(s);
    assert_eq!(vm.free_pages(), vm.total_pages());
}

// ---------------------------------------------------------------------
// 2. Pages in use keep their data beside a zeroer that never sleeps.

/// Wired (mlock), forked (COW chains), held, swapped pages, with the
/// pageout daemon and a zeroer racing; every page keeps its tag.
#[test]
fn z04_in_use_pages_survive_zeroer_pageout_and_swap() {
    vm_testkit::support::bounded(60, || {
        let vm = x86_thresh(768, SuperpagePolicy::Reserve);
        let (swap, _t) = with_swap(&*vm, 16 << 20);
        let z = vm.spawn_page_zeroer(Duration::ZERO);
        let d = vm.spawn_pageout_daemon(Duration::from_millis(1));
        let n = 1024u64; // more than memory: pages go to swap and back
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        for i in 0..n {
            wrpage(&s, BASE + i * PAGE, tag(BASE + i * PAGE, 1)).unwrap();
        }
        s.wire(BASE, 32 * PAGE, true).unwrap();
        let child = s.fork().unwrap();
        for i in (0..n).step_by(5) {
            wrpage(&child, BASE + i * PAGE, tag(BASE + i * PAGE, 2)).unwrap();
        }
        for round in 0..2 {
            for i in 0..n {
                let va = BASE + i * PAGE;
                assert_eq!(
                    rdpage(&s, va),
                    Ok(tag(va, 1)),
                    "round {round}: parent page {i}"
                );
                let want = if i % 5 == 0 { tag(va, 2) } else { tag(va, 1) };
                assert_eq!(
                    rdpage(&child, va),
                    Ok(want),
                    "round {round}: child page {i}"
                );
            }
        }
        drop(d);
        drop(z);
        drop(child);
        drop(s);
        audit(&vm, "z04");
        assert_eq!(vm.free_pages(), vm.total_pages(), "z04: frames leaked");
        assert_eq!(swap.stats().used, 0, "z04: swap leaked");
    });
}

/// Many threads writing and checking their own pages (with forks and
/// unmaps) while two zeroers and `zero_free_pages` loops race.
#[test]
fn z05_many_threads_beside_two_zeroers_and_manual_zeroing() {
    vm_testkit::support::bounded(60, || {
        let vm = x86_policy(2048, SuperpagePolicy::Reserve);
        let z1 = vm.spawn_page_zeroer(Duration::ZERO);
        let z2 = vm.spawn_page_zeroer(Duration::ZERO);
        let stop = Arc::new(AtomicBool::new(false));
        let manual = {
            let (vm, stop) = (vm.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += vm.zero_free_pages(u64::MAX);
                }
                n
            })
        };
        let threads: Vec<_> = (0..3u64)
            .map(|t| {
                let vm = vm.clone();
                std::thread::spawn(move || {
                    let s = vm.new_space().unwrap();
                    let mut rng = Rng(0x9e37 + t);
                    let base = BASE + t * 4 * SUPER;
                    let n = 160u64;
                    for round in 1..8u64 {
                        s.map_anon(base, n * PAGE, Prot::RW).unwrap();
                        all_zero(&s, base, 4, "z05 fresh");
                        for i in 0..n {
                            wrpage(&s, base + i * PAGE, tag(base + i * PAGE, round)).unwrap();
                        }
                        let child = if rng.pct(50) {
                            Some(s.fork().unwrap())
                        } else {
                            None
                        };
                        if let Some(c) = &child {
                            for i in (0..n).step_by(3) {
                                wrpage(c, base + i * PAGE, 7).unwrap();
                            }
                        }
                        for i in 0..n {
                            let va = base + i * PAGE;
                            assert_eq!(rdpage(&s, va), Ok(tag(va, round)), "t{t} r{round} p{i}");
                        }
                        drop(child);
                        s.unmap(base, n * PAGE).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        manual.join().unwrap();
        drop(z1);
        drop(z2);
        audit(&vm, "z05");
        assert_eq!(vm.free_pages(), vm.total_pages(), "z05: frames leaked");
    });
}

/// Whole-superpage faults (`Always`) in several threads beside a zeroer
/// that never sleeps: every superpage's 512 pages read zero when fresh
/// (most skip zeroing) and keep what was written.
#[test]
fn z06_whole_superpage_faults_beside_the_zeroer_read_zero_and_keep_data() {
    vm_testkit::support::bounded(60, || {
        let vm = x86_policy(8192, SuperpagePolicy::Always);
        let z = vm.spawn_page_zeroer(Duration::ZERO);
        let go = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let (vm, go) = (vm.clone(), go.clone());
                std::thread::spawn(move || {
                    let s = vm.new_space().unwrap();
                    let base = BASE + t * 8 * SUPER;
                    go.wait();
                    for round in 1..6u64 {
                        s.map_anon(base, 4 * SUPER, Prot::RW).unwrap();
                        for k in 0..4 {
                            let sp = base + k * SUPER;
                            wrpage(&s, sp + 3 * PAGE, tag(sp, round)).unwrap();
                            // The rest of the 2 MiB came with the fault.
                            let mut buf = vec![0u8; SUPER as usize];
                            s.read(sp, &mut buf).unwrap();
                            for (off, &b) in buf.iter().enumerate() {
                                let p = off as u64 / PAGE;
                                if p != 3 {
                                    assert_eq!(
                                        b, 0,
                                        "t{t} r{round} sp{k}: byte {off:#x} of fresh 2 MiB"
                                    );
                                }
                            }
                            for i in (0..PAGES).step_by(16) {
                                dirty_page(&s, sp + i * PAGE, round as u8);
                            }
                        }
                        for k in 0..4 {
                            let sp = base + k * SUPER;
                            let mut b = [0u8; 8];
                            s.read(sp + 16 * PAGE + 8, &mut b).unwrap();
                            assert!(
                                b.iter().all(|&x| x == (round as u8 | 1)),
                                "t{t} r{round}: data lost"
                            );
                        }
                        s.unmap(base, 4 * SUPER).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(z);
        audit(&vm, "z06");
        assert_eq!(vm.free_pages(), vm.total_pages(), "z06: frames leaked");
    });
}

// ---------------------------------------------------------------------
// 3. Lifetimes, tiny machines, pressure.

/// Every Arc to the Vm dropped while the zeroer runs: the zeroer keeps it
/// alive and working; dropping the zeroer then frees the Vm.
#[test]
fn z07_vm_dropped_while_the_zeroer_runs_is_freed_after_it() {
    vm_testkit::support::bounded(30, || {
        let vm = x86_policy(1024, SuperpagePolicy::Reserve);
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, 512 * PAGE, Prot::RW).unwrap();
        for i in 0..512 {
            dirty_page(&s, BASE + i * PAGE, 3);
        }
        let z = vm.spawn_page_zeroer(Duration::from_millis(1));
        let weak = Arc::downgrade(&vm);
        drop(s);
        drop(vm);
        // Still alive: the zeroer holds it, and it zeroes what was freed.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let vm = weak.upgrade().expect("the zeroer's Arc keeps the Vm");
            // Every frame free and zero (while the zeroer holds its last
            // batch, the frames left may all be zero but not all free).
            let (free, zeroed) = (vm.free_pages(), vm.free_zeroed_pages());
            if free == vm.total_pages() && zeroed == free {
                break;
            }
            assert!(
                Instant::now() < until,
                "z07: zeroing stalled after the Vm's Arcs went or frames leaked: \
                 {free} free, {zeroed} zeroed, of {}",
                vm.total_pages()
            );
            drop(vm);
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(z);
        assert!(weak.upgrade().is_none(), "z07: the Vm outlives its zeroer");
    });
}

/// A machine too small for the zeroer to ever find spare memory, and one
/// just big enough: faults filling memory beside a zeroer and a manual
/// `zero_free_pages` loop neither deadlock nor fail.
#[test]
fn z08_tiny_machines_fill_memory_beside_the_zeroer() {
    vm_testkit::support::bounded(60, || {
        for pages in [24u64, 48, 96] {
            let vm = Vm::new(RefPmap::new(), config(pages)).unwrap();
            let z = vm.spawn_page_zeroer(Duration::ZERO);
            let stop = Arc::new(AtomicBool::new(false));
            let zeroed = Arc::new(AtomicU64::new(0));
            let manual = {
                let (vm, stop, zeroed) = (vm.clone(), stop.clone(), zeroed.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        zeroed.fetch_add(vm.zero_free_pages(u64::MAX), Ordering::Relaxed);
                        std::thread::yield_now();
                    }
                })
            };
            let s = vm.new_space().unwrap();
            let n = pages - 4; // nearly all of memory
            for round in 1..30u64 {
                s.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
                for i in 0..n {
                    let va = BASE + i * PAGE;
                    wrpage(&s, va, tag(va, round))
                        .unwrap_or_else(|e| panic!("{pages} pages, round {round}, page {i}: {e}"));
                }
                for i in 0..n {
                    let va = BASE + i * PAGE;
                    assert_eq!(
                        rdpage(&s, va),
                        Ok(tag(va, round)),
                        "{pages} pages: page {i}"
                    );
                }
                s.unmap(BASE, n * PAGE).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            manual.join().unwrap();
            drop(z);
            drop(s);
            // Whoever zeroed (the thread or the loop), all of it ends zeroed.
            let _ = zeroed.load(Ordering::Relaxed);
            vm.zero_free_pages(u64::MAX);
            assert_eq!(
                vm.free_zeroed_pages(),
                vm.free_pages(),
                "{pages}: not all zeroed"
            );
            audit(&*vm, "z08");
            assert_eq!(vm.free_pages(), vm.total_pages());
        }
    });
}

/// Under real thresholds the zeroer must leave the pageout target alone:
/// with free memory at or below target + 32 it takes nothing.
#[test]
fn z09_the_zeroer_sleeps_when_memory_is_at_the_pageout_target() {
    let pages = 2048;
    let vm = x86_thresh(pages, SuperpagePolicy::Never);
    let target = Thresholds::for_frames(pages).target;
    let s = vm.new_space().unwrap();
    // Dirty every frame once, then free them all but target + 32.
    let n = vm.free_pages() - 8;
    s.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
    for i in 0..n {
        s.write_u8(BASE + i * PAGE, 1).unwrap();
    }
    let mut keep = n;
    while vm.free_pages() < target + 28 {
        keep -= 1;
        s.unmap(BASE + keep * PAGE, PAGE).unwrap();
    }
    assert!(
        vm.free_pages() <= target + 32,
        "setup: {} free",
        vm.free_pages()
    );
    let before = vm.free_zeroed_pages();
    let z = vm.spawn_page_zeroer(Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(200));
    drop(z);
    assert_eq!(vm.free_zeroed_pages(), before, "zeroed below the target");
    // Free more: now it zeroes.
    s.unmap(BASE, keep * PAGE).unwrap();
    let z = vm.spawn_page_zeroer(Duration::from_millis(1));
    let until = Instant::now() + Duration::from_secs(10);
    while vm.free_zeroed_pages() <= before + 32 {
        assert!(Instant::now() < until, "z09: the zeroer never woke");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(z);
    audit(&vm, "z09");
}

// ---------------------------------------------------------------------
// 4. Quality: whole-superpage faults beside the zeroer.

/// Superpages made by whole-superpage faults (`Always`) over repeated
/// map/write/unmap cycles, with and without a zeroer running meanwhile.
fn yield_of(zeroer: bool) -> u64 {
    let vm = x86_policy(8192, SuperpagePolicy::Always);
    let z = zeroer.then(|| vm.spawn_page_zeroer(Duration::ZERO));
    let s = vm.new_space().unwrap();
    let before = vm.pmap().superpage_stats().made();
    for round in 0..8u64 {
        s.map_anon(BASE, 8 * SUPER, Prot::RW).unwrap();
        for k in 0..8 {
            wrpage(&s, BASE + k * SUPER, tag(BASE, round)).unwrap();
        }
        // Give the zeroer time to chew on what was freed.
        s.unmap(BASE, 8 * SUPER).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let made = vm.pmap().superpage_stats().made() - before;
    drop(z);
    drop(s);
    audit(&vm, "yield");
    made
}

#[test]
fn z10_superpage_yield_beside_the_zeroer() {
    let without = yield_of(false);
    let with = yield_of(true);
    eprintln!("z10: superpages made of 64 without / with zeroer: {without} / {with}");
    assert!(without >= 60, "baseline: {without} of 64");
    assert!(
        with + 4 >= without,
        "superpage yield collapses with the zeroer running: {with} vs {without} of 64"
    );
}

/// As [`yield_of`], but tighter: no pause between cycles, two threads
/// faulting, each cycle right after the other's unmap (the zeroer works on
/// exactly the runs the next faults claim).
fn racing_yield_of(zeroer: bool) -> u64 {
    let vm = x86_policy(8192, SuperpagePolicy::Always);
    let z = zeroer.then(|| vm.spawn_page_zeroer(Duration::ZERO));
    let before = vm.pmap().superpage_stats().made();
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let vm = vm.clone();
            std::thread::spawn(move || {
                let s = vm.new_space().unwrap();
                let base = BASE + t * 8 * SUPER;
                for round in 0..16u64 {
                    s.map_anon(base, 4 * SUPER, Prot::RW).unwrap();
                    for k in 0..4 {
                        wrpage(&s, base + k * SUPER + PAGE, tag(base, round)).unwrap();
                    }
                    s.unmap(base, 4 * SUPER).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let made = vm.pmap().superpage_stats().made() - before;
    drop(z);
    audit(&vm, "racing yield");
    made
}

#[test]
fn z11_superpage_yield_beside_a_busy_zeroer_and_racing_faults() {
    let without = racing_yield_of(false);
    let with = racing_yield_of(true);
    eprintln!("z11: superpages made of 128 without / with zeroer: {without} / {with}");
    assert!(without >= 120, "baseline: {without} of 128");
    assert!(
        with * 10 >= without * 9,
        "superpage yield drops with the zeroer running: {with} vs {without} of 128"
    );
}

/// Whole superpages through mprotect, fork + COW, mlock, pageout to swap
/// and back, partial unmap and space teardown (spare tables kept at
/// promotion and freed on demotion); then a frame-by-frame audit and
/// fresh zero-fills that must read zero.
#[test]
fn z12_superpage_lifecycle_then_audit() {
    vm_testkit::support::bounded(60, || {
        let vm = x86_thresh(4096, SuperpagePolicy::Always);
        let (swap, _t) = with_swap(&*vm, 32 << 20);
        let z = vm.spawn_page_zeroer(Duration::ZERO);
        {
            let s = vm.new_space().unwrap();
            s.map_anon(BASE, 4 * SUPER, Prot::RW).unwrap();
            for i in 0..4 * PAGES {
                wrpage(&s, BASE + i * PAGE, tag(BASE + i * PAGE, 1)).unwrap();
            }
            s.protect(BASE, SUPER, Prot::READ).unwrap();
            s.wire(BASE + SUPER, SUPER, true).unwrap();
            let child = s.fork().unwrap();
            for i in (0..PAGES).step_by(9) {
                let va = BASE + 2 * SUPER + i * PAGE;
                wrpage(&child, va, tag(va, 2)).unwrap();
            }
            s.unmap(BASE + 3 * SUPER + 17 * PAGE, 5 * PAGE).unwrap();
            for _ in 0..4 {
                vm.pageout(vm.total_pages());
            }
            for i in 0..4 * PAGES {
                let va = BASE + i * PAGE;
                if (3 * PAGES + 17..3 * PAGES + 22).contains(&i) {
                    continue;
                }
                assert_eq!(rdpage(&s, va), Ok(tag(va, 1)), "z12: parent page {i}");
            }
            for i in 0..PAGES {
                let va = BASE + 2 * SUPER + i * PAGE;
                let want = if i % 9 == 0 { tag(va, 2) } else { tag(va, 1) };
                assert_eq!(rdpage(&child, va), Ok(want), "z12: child page {i}");
            }
            drop(child);
        }
        wait_all_zeroed(&vm, "z12");
        drop(z);
        audit(&vm, "z12");
        assert_eq!(vm.free_pages(), vm.total_pages(), "z12: frames leaked");
        assert_eq!(swap.stats().used, 0, "z12: swap leaked");
        let s = vm.new_space().unwrap();
        let n = vm.free_pages() / 2;
        s.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        all_zero(&s, BASE, n, "z12 fresh");
    });
}

/// A small x86_64 machine (page tables from the same frames) with real
/// thresholds, swap, the pageout daemon, a zeroer and a manual
/// `zero_free_pages` loop (which may dig into the reserve): a working set
/// twice memory is written and read back in several threads.
#[test]
fn z13_small_x86_machine_under_pressure_with_zeroer_daemon_and_swap() {
    vm_testkit::support::bounded(90, || {
        let pages = 256;
        let vm = x86_thresh(pages, SuperpagePolicy::Reserve);
        let (swap, _t) = with_swap(&*vm, 16 << 20);
        let z = vm.spawn_page_zeroer(Duration::ZERO);
        let d = vm.spawn_pageout_daemon(Duration::from_millis(1));
        let stop = Arc::new(AtomicBool::new(false));
        let manual = {
            let (vm, stop) = (vm.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    vm.zero_free_pages(u64::MAX);
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let vm = vm.clone();
                std::thread::spawn(move || {
                    let s = vm.new_space().unwrap();
                    let base = BASE + t * SUPER;
                    let n = pages;
                    s.map_anon(base, n * PAGE, Prot::RW).unwrap();
                    for round in 1..3u64 {
                        for i in 0..n {
                            let va = base + i * PAGE;
                            wrpage(&s, va, tag(va, round))
                                .unwrap_or_else(|e| panic!("t{t} r{round} write {i}: {e}"));
                        }
                        for i in 0..n {
                            let va = base + i * PAGE;
                            assert_eq!(rdpage(&s, va), Ok(tag(va, round)), "t{t} r{round} p{i}");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        manual.join().unwrap();
        drop(d);
        drop(z);
        assert!(
            vm.counters().snapshot().v_swappgsout > 0,
            "z13: nothing went to swap"
        );
        audit(&vm, "z13");
        assert_eq!(vm.free_pages(), vm.total_pages(), "z13: frames leaked");
        assert_eq!(swap.stats().used, 0, "z13: swap leaked");
    });
}
