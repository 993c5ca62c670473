//! Red team: the free-page counts batched per thread (commit 6ca2412,
//! `vm_core::sync::BatchedCount`): each thread's allocations and frees sit
//! in its shard until 32 pile up either way; the fault path's threshold
//! checks (severe, the reserve floor, a whole superpage's room, pageout's
//! target) read the shared total unless it is within `SLACK` of the
//! threshold, then the exact sum.
//!
//! Attacks: counts left in the shards of threads that have exited (both
//! ways: frees that make the total too low, allocations that make it too
//! high) at exactly the severe mark and the reserve floor; a waiter for
//! memory woken by such a free; page tables allocated from the reserve;
//! whole-superpage population near exhaustion; the pageout daemon and the
//! page zeroer at their targets; exact counts at rest after heavy
//! multithreaded churn (audited page record by page record).

mod common;

use common::{Rng, audit, config, rdpage, wrpage};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_core::page_queues::Thresholds;
use vm_core::sync::BatchedCount;
use vm_core::{Balloon, FaultError, Pmap, Prot, SuperpagePolicy, Vm, VmConfig};
use vm_pager_swap::Swap;
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::RefPmap;
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const BASE: u64 = 0x4000_0000;

fn thresholds(reserved: u64, severe: u64, target: u64) -> Option<Thresholds> {
    Some(Thresholds {
        reserved,
        severe,
        target,
    })
}

/// One-page balloons, taken by this thread: handed to other threads whose
/// drop of them frees a page into their own shard.
fn one_page_balloons<P: Pmap>(vm: &Vm<P>, n: u64) -> Vec<Balloon> {
    (0..n)
        .map(|_| {
            let b = vm.inflate_balloon(1);
            assert_eq!(b.len(), 1, "memory for the one-page balloons");
            b
        })
        .collect()
}

/// Frees each balloon's page on a thread of its own that then exits: the
/// frees stay in those threads' shards (fewer than 32 per shard unless
/// many threads share one).
fn free_on_exiting_threads(balloons: Vec<Balloon>) {
    let hs: Vec<_> = balloons
        .into_iter()
        .map(|b| std::thread::spawn(move || drop(b)))
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

/// Allocates `n` one-page balloons each on `threads` threads that then
/// exit: their shards keep the allocations (the total reads too high).
fn alloc_on_exiting_threads<P: Pmap + 'static>(
    vm: &Arc<Vm<P>>,
    threads: u64,
    n: u64,
) -> Vec<Balloon> {
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let vm = vm.clone();
            std::thread::spawn(move || vm.inflate_balloon(n))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

fn is_shortage<T: std::fmt::Debug>(r: Result<T, FaultError>) -> bool {
    matches!(r, Err(FaultError::ResourceShortage { .. }))
}

/// c01: twelve threads fault, fork, write copies, unmap in part, protect
/// and drop spaces on the x86_64 pmap (page tables made and freed, zeroed
/// frames freed) with the page zeroer running, then exit with whatever
/// their shards hold. At rest the free and free-zeroed counts equal the
/// page records; once every space is gone every frame is free again.
#[test]
fn c01_exact_counts_at_rest_after_multithreaded_churn() {
    let vm = Vm::new(
        X86Pmap::new(),
        VmConfig {
            superpages: SuperpagePolicy::Reserve,
            ..config(4096)
        },
    )
    .unwrap();
    let keep = vm.new_space().unwrap();
    keep.map_anon(BASE, 64 * PAGE, Prot::RW).unwrap();
    for i in 0..64 {
        wrpage(&keep, BASE + i * PAGE, i + 1).unwrap();
    }
    let zeroer = vm.spawn_page_zeroer(Duration::from_micros(200));
    std::thread::scope(|sc| {
        for t in 0..12u64 {
            let vm = &vm;
            let keep = &keep;
            sc.spawn(move || {
                let mut rng = Rng(0x1234_5678 + t * 77);
                let s = vm.new_space().unwrap();
                let base = BASE + (t + 1) * SUPER * 4;
                s.map_anon(base, 2 * SUPER, Prot::RW).unwrap();
                for round in 0..6u64 {
                    let n = 17 + rng.below(60);
                    for i in 0..n {
                        wrpage(&s, base + i * PAGE, round * 1000 + i).unwrap();
                    }
                    let child = s.fork().unwrap();
                    for i in (0..n).step_by(3) {
                        wrpage(&child, base + i * PAGE, 7).unwrap();
                    }
                    for i in 0..n {
                        assert_eq!(rdpage(&s, base + i * PAGE).unwrap(), round * 1000 + i);
                    }
                    drop(child);
                    // A hole, punched and mapped anew (zero-fill again).
                    let (hole, len) = (base + rng.below(n) * PAGE, (1 + rng.below(9)) * PAGE);
                    s.unmap(hole, len).unwrap();
                    s.map_anon(hole, len, Prot::RW).unwrap();
                    // The second 2 MiB stays mapped whole (the holes are
                    // in the first): protect it both ways.
                    for i in 0..8 {
                        wrpage(&s, base + SUPER + i * 61 * PAGE, i).unwrap();
                    }
                    s.protect(base + SUPER, SUPER, Prot::READ).unwrap();
                    assert!(s.write_u8(base + SUPER, 1).is_err());
                    s.protect(base + SUPER, SUPER, Prot::RW).unwrap();
                    if rng.pct(30) {
                        s.unmap(base, 2 * SUPER).unwrap();
                        s.map_anon(base, 2 * SUPER, Prot::RW).unwrap();
                    }
                    // A page of the shared space too (its tables are shared).
                    assert_eq!(rdpage(keep, BASE + t * PAGE).unwrap(), t + 1);
                }
            });
        }
    });
    drop(zeroer);
    audit(&vm, "after churn");
    for i in 0..64 {
        assert_eq!(rdpage(&keep, BASE + i * PAGE).unwrap(), i + 1);
    }
    drop(keep);
    audit(&vm, "every space gone");
    assert_eq!(vm.free_pages(), vm.total_pages(), "every frame free");
}

/// c02: the severe mark read exactly when the frees that lift memory to
/// it sit in the shards of threads that have exited (the shared total
/// reads about zero). Faults that find `free >= severe` succeed at once;
/// the one below it fails for want of memory (no retries, nothing to
/// reclaim), and the free count is then exactly `severe - 1`.
#[test]
fn c02_severe_mark_exact_with_frees_in_exited_threads() {
    const SEVERE: u64 = 24;
    let vm = Vm::new(
        RefPmap::new(),
        VmConfig {
            thresholds: thresholds(4, SEVERE, SEVERE),
            memory_retries: 0,
            memory_wait_ms: 1,
            ..config(1024)
        },
    )
    .unwrap();
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 64 * PAGE, Prot::RW).unwrap();
    let ones = one_page_balloons(&vm, SEVERE + 8);
    let rest = vm.inflate_balloon(u64::MAX);
    assert_eq!(vm.free_pages(), 0);
    free_on_exiting_threads(ones);
    assert_eq!(vm.free_pages(), SEVERE + 8, "exact with frees in shards");
    let waits = vm.counters().snapshot().v_wait_memory;
    // free = 32 .. 24 before each: nine faults succeed.
    for i in 0..9 {
        s.write_u8(BASE + i * PAGE, 1)
            .unwrap_or_else(|e| panic!("fault {i} with {} free: {e}", vm.free_pages()));
    }
    assert_eq!(vm.free_pages(), SEVERE - 1);
    assert_eq!(
        vm.counters().snapshot().v_wait_memory,
        waits,
        "no fault above the severe mark waited"
    );
    assert!(
        is_shortage(s.write_u8(BASE + 9 * PAGE, 1)),
        "below the severe mark a fault waits (and with no retries fails)"
    );
    assert_eq!(vm.free_pages(), SEVERE - 1, "the failed fault took nothing");
    drop(rest);
    s.write_u8(BASE + 9 * PAGE, 1).unwrap();
    audit(&vm, "c02");
}

/// c03: the reserve floor read exactly both ways the total can be off.
/// (a) The last `reserved` frees sit in exited threads' shards (total too
/// low); (b) 16 threads each allocated 31 pages and exited (total up to
/// 496 too high). Either way, with exactly `reserved` pages free, a
/// normal fault takes none of them, while page tables (a new space's
/// root, a new path of tables for an entry) still come out of the
/// reserve.
#[test]
fn c03_reserve_floor_exact_and_left_for_page_tables() {
    const RESERVED: u64 = 8;
    for too_high in [false, true] {
        let vm = Vm::new(
            X86Pmap::new(),
            VmConfig {
                thresholds: thresholds(RESERVED, RESERVED, RESERVED),
                memory_retries: 0,
                memory_wait_ms: 1,
                ..config(2048)
            },
        )
        .unwrap();
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, 64 * PAGE, Prot::RW).unwrap();
        s.write_u8(BASE, 1).unwrap(); // the tables for BASE
        // Wired: the direct reclaim of the failing fault below must not
        // unmap it (and free its emptied tables).
        s.wire(BASE, PAGE, true).unwrap();
        let data = vm.inflate_balloon(1);
        let held;
        let rest;
        if too_high {
            rest = vm.inflate_balloon(vm.free_pages() - RESERVED - 16 * 31);
            held = alloc_on_exiting_threads(&vm, 16, 31);
        } else {
            let ones = one_page_balloons(&vm, RESERVED);
            rest = vm.inflate_balloon(u64::MAX);
            free_on_exiting_threads(ones);
            held = Vec::new();
        }
        assert_eq!(vm.free_pages(), RESERVED, "too_high {too_high}");
        assert!(
            is_shortage(s.write_u8(BASE + PAGE, 1)),
            "too_high {too_high}: a normal fault at the floor"
        );
        assert_eq!(
            vm.free_pages(),
            RESERVED,
            "too_high {too_high}: reserve kept"
        );
        let s2 = vm
            .new_space()
            .unwrap_or_else(|e| panic!("too_high {too_high}: a root from the reserve: {e:?}"));
        assert_eq!(vm.free_pages(), RESERVED - 1);
        // A fresh path of three tables for one entry, from the reserve.
        let pfn = data.frames().next().unwrap();
        let m = vm_core::Mapping::new(
            vm_core::PageInfo {
                pfn,
                managed: false,
                attr: vm_core::MemAttr::WriteBack,
            },
            Prot::READ,
        );
        vm.pmap()
            .enter(s2.pmap_space(), vm_core::VirtAddr(1 << 40), m)
            .unwrap();
        assert_eq!(vm.free_pages(), RESERVED - 4);
        drop(s2);
        drop(rest);
        s.write_u8(BASE + PAGE, 1).unwrap();
        drop(data);
        drop(held);
        audit(&vm, "c03");
    }
}

/// c04: a fault waiting for memory (a long wait, one retry) is woken by a
/// free made on another thread that then exits with the page in its
/// shard: the waiter's check reads the exact count, and the fault ends
/// long before its wait would time out.
#[test]
fn c04_memory_waiter_wakes_on_a_free_left_in_an_exited_shard() {
    let vm = Vm::new(
        RefPmap::new(),
        VmConfig {
            memory_retries: 1,
            memory_wait_ms: 20_000,
            ..config(512)
        },
    )
    .unwrap();
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 16 * PAGE, Prot::RW).unwrap();
    let ones = one_page_balloons(&vm, 3);
    let _rest = vm.inflate_balloon(u64::MAX);
    assert_eq!(vm.free_pages(), 0);
    let waits = vm.counters().snapshot().v_wait_memory;
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            // Let the fault get to its wait first (it may also come after).
            std::thread::sleep(Duration::from_millis(200));
            free_on_exiting_threads(ones);
        });
        s.write_u8(BASE, 5).unwrap();
    });
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "the waiter slept {took:?}");
    assert!(vm.counters().snapshot().v_wait_memory > waits, "it waited");
    assert_eq!(s.read_u8(BASE).unwrap(), 5);
    assert_eq!(vm.free_pages(), 2);
}

/// c05: SuperpagePolicy::Always near exhaustion on the x86_64 pmap: six
/// threads each write every page of their own 2 MiB while memory holds
/// little more than all of them page by page; some get a whole superpage
/// (the room check passes), the others fall back to 4 KiB pages. No
/// write fails, every byte reads back, the counts are exact after.
#[test]
fn c05_whole_superpages_near_exhaustion() {
    let pages = 6 * 512 + 200;
    let vm = Vm::new(
        X86Pmap::new(),
        VmConfig {
            superpages: SuperpagePolicy::Always,
            thresholds: Some(Thresholds::for_frames(pages)),
            ..config(pages)
        },
    )
    .unwrap();
    let spaces: Vec<_> = (0..6).map(|_| vm.new_space().unwrap()).collect();
    std::thread::scope(|sc| {
        for (t, s) in spaces.iter().enumerate() {
            sc.spawn(move || {
                let base = BASE + t as u64 * SUPER;
                s.map_anon(base, SUPER, Prot::RW).unwrap();
                for i in 0..512u64 {
                    wrpage(s, base + i * PAGE, (t as u64) << 20 | i)
                        .unwrap_or_else(|e| panic!("thread {t} page {i}: {e}"));
                }
            });
        }
    });
    let mut whole = 0;
    for (t, s) in spaces.iter().enumerate() {
        let base = BASE + t as u64 * SUPER;
        for i in 0..512u64 {
            assert_eq!(rdpage(s, base + i * PAGE).unwrap(), (t as u64) << 20 | i);
        }
        whole += u64::from(
            vm.pmap()
                .pte(s.pmap_space(), base)
                .is_some_and(|e| e & 0x80 != 0),
        );
    }
    assert!(whole >= 1, "at least the first superpage was whole");
    audit(&vm, "c05");
    drop(spaces);
    assert_eq!(vm.free_pages(), vm.total_pages());
}

/// c06: pageout's target (600 pages, beyond the slack, so the total
/// alone decides far from it) reached after eight threads filled memory
/// and exited with their counts in their shards: `pageout(target)` stops
/// only with `free >= target`; then the pageout daemon keeps memory at
/// its target while the threads fault again, and every page reads back
/// (from swap where it went).
#[test]
fn c06_pageout_reaches_its_target_with_counts_in_shards() {
    const TARGET: u64 = 600;
    let vm = Vm::new(
        RefPmap::new(),
        VmConfig {
            thresholds: thresholds(8, 64, TARGET),
            ..config(2048)
        },
    )
    .unwrap();
    let t = TempPath::new();
    let swap = Swap::create(&t.0, 16 << 20).unwrap();
    vm.set_swap(swap.provider());
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 8 * 512 * PAGE, Prot::RW).unwrap();
    let fill = |round: u64| {
        std::thread::scope(|sc| {
            for k in 0..8u64 {
                let s = &s;
                sc.spawn(move || {
                    for i in 0..200u64 {
                        let va = BASE + (k * 512 + i) * PAGE;
                        wrpage(s, va, round << 32 | va).unwrap();
                    }
                });
            }
        });
    };
    fill(1);
    assert!(vm.free_pages() < TARGET, "memory filled");
    let r = vm.pageout(TARGET);
    assert!(
        vm.free_pages() >= TARGET,
        "pageout stopped at {} free ({r:?})",
        vm.free_pages()
    );
    audit(&vm, "after pageout");
    {
        let _daemon = vm.spawn_pageout_daemon(Duration::from_millis(1));
        fill(2);
        let until = Instant::now() + Duration::from_secs(5);
        while vm.free_pages() < TARGET {
            assert!(
                Instant::now() < until,
                "the daemon left {}",
                vm.free_pages()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    for k in 0..8u64 {
        for i in 0..200u64 {
            let va = BASE + (k * 512 + i) * PAGE;
            assert_eq!(rdpage(&s, va).unwrap(), 2 << 32 | va);
        }
    }
    audit(&vm, "c06");
}

/// c07: the page zeroer at its threshold (it zeroes only while more than
/// `target + 32` pages are free) with every free page a dirty one freed
/// by a thread that exited: at exactly `target + 32` free it zeroes
/// nothing; one page more (freed on another exiting thread) and it
/// zeroes every free page, then sleeps with the counts exact.
#[test]
fn c07_zeroer_threshold_with_frees_in_exited_threads() {
    const TARGET: u64 = 267;
    let vm = Vm::new(
        RefPmap::new(),
        VmConfig {
            thresholds: thresholds(0, 0, TARGET),
            ..config(1024)
        },
    )
    .unwrap();
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 300 * PAGE, Prot::RW).unwrap();
    let one = one_page_balloons(&vm, 1);
    let _rest = vm.inflate_balloon(vm.free_pages() - 299);
    for i in 0..299 {
        wrpage(&s, BASE + i * PAGE, i | 1 << 40).unwrap();
    }
    assert_eq!(vm.free_pages(), 0);
    // Ten threads unmap about 30 dirty pages each and exit.
    std::thread::scope(|sc| {
        for k in 0..10u64 {
            let s = &s;
            sc.spawn(move || {
                let a = k * 30;
                let n = if k == 9 { 299 - a } else { 30 };
                s.unmap(BASE + a * PAGE, n * PAGE).unwrap();
            });
        }
    });
    assert_eq!((vm.free_pages(), vm.free_zeroed_pages()), (TARGET + 32, 0));
    let zeroer = vm.spawn_page_zeroer(Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        vm.free_zeroed_pages(),
        0,
        "at target + 32 free the zeroer takes nothing"
    );
    free_on_exiting_threads(one);
    let until = Instant::now() + Duration::from_secs(10);
    while vm.free_zeroed_pages() < vm.free_pages() {
        assert!(Instant::now() < until, "zeroing never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(zeroer);
    assert_eq!((vm.free_pages(), vm.free_zeroed_pages()), (300, 300));
    audit(&vm, "c07");
}

/// c08: twenty threads on a 256-page machine, each in its own space on
/// the x86_64 pmap (four table pages each), fault eight pages, check
/// them and unmap them, over and over: together they never need more
/// than there is, so no fault may fail for want of memory (however the
/// counts sit in the shards); at rest the counts are exact and, with the
/// spaces gone, every frame is free.
#[test]
fn c08_tiny_machine_many_threads_no_spurious_shortage() {
    let vm = Vm::new(X86Pmap::new(), config(256)).unwrap();
    std::thread::scope(|sc| {
        for t in 0..20u64 {
            let vm = &vm;
            sc.spawn(move || {
                let s = vm.new_space().unwrap();
                let base = BASE + t * SUPER;
                s.map_anon(base, 8 * PAGE, Prot::RW).unwrap();
                for round in 0..40u64 {
                    for i in 0..8 {
                        wrpage(&s, base + i * PAGE, round << 8 | i)
                            .unwrap_or_else(|e| panic!("thread {t} round {round}: {e}"));
                    }
                    for i in 0..8 {
                        assert_eq!(rdpage(&s, base + i * PAGE).unwrap(), round << 8 | i);
                    }
                    s.unmap(base, 8 * PAGE).unwrap();
                    s.map_anon(base, 8 * PAGE, Prot::RW).unwrap();
                }
            });
        }
    });
    audit(&vm, "c08");
    assert_eq!(vm.free_pages(), vm.total_pages());
}

/// c09: `BatchedCount` itself at rest after threads (more than its 16
/// shards, so some share) left residues of either sign in their shards,
/// the total above or below zero: `at_least(n)` answers exactly for every
/// `n` within two slacks of the count, `approx` is within the slack, and
/// `exact` is the count.
#[test]
fn c09_batched_count_at_least_is_exact_at_rest() {
    for seed in 1..=20u64 {
        let c = BatchedCount::default();
        let mut rng = Rng((seed * 0x9E37_79B9) | 1);
        let base = rng.below(3000) as i64;
        c.add(base);
        let deltas: Vec<Vec<i64>> = (0..24)
            .map(|_| {
                (0..rng.below(80))
                    .map(|_| rng.below(41) as i64 - 20)
                    .collect()
            })
            .collect();
        let want: i64 = base + deltas.iter().flatten().sum::<i64>();
        std::thread::scope(|sc| {
            for d in &deltas {
                let c = &c;
                sc.spawn(move || {
                    for &x in d {
                        c.add(x);
                    }
                });
            }
        });
        if want < 0 {
            continue; // not a count
        }
        let want = want as u64;
        assert_eq!(c.exact(), want, "seed {seed}");
        assert!(
            c.approx().abs_diff(want) <= BatchedCount::SLACK,
            "seed {seed}"
        );
        let lo = want.saturating_sub(2 * BatchedCount::SLACK);
        for n in lo..=want + 2 * BatchedCount::SLACK {
            assert_eq!(
                c.at_least(n),
                want >= n,
                "seed {seed}: at_least({n}), count {want}"
            );
        }
    }
}

/// c10: a count that only grows, read by `exact` (and so by `at_least`
/// near a threshold) while one other thread adds to it one at a time:
/// a read must never come out below what the count had already reached
/// before the read began.
///
// Found by this red team on 6ca2412: `exact` loaded the shared total
// and then the shards, so a fold between them (a shard's `swap(0)` then
// `total += d`) was in neither value read — up to 31 below a count already
// reached, thousands of times in 2 s. `at_least` near a threshold acts on
// it (`count_severe`, the reserve floor). Fixed: folds and `exact` take
// one lock, so a read sees a fold wholly or not at all.
#[test]
fn c10_exact_never_below_what_was_already_counted() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let c = BatchedCount::default();
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let (mut hits, mut worst) = (0u64, 0u64);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                c.add(1);
                // Published after the add: whoever sees `done` = d knows
                // the count is at least d.
                done.fetch_add(1, Ordering::Release);
            }
        });
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            let d = done.load(Ordering::Acquire);
            let v = c.exact();
            if v < d {
                hits += 1;
                worst = worst.max(d - v);
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        hits, 0,
        "exact() read below the count already reached {hits} times (by up to {worst})"
    );
}
