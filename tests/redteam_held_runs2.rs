//! Red team, second round on held superpage runs (commits 660c49a,
//! 690fcc1, c4f72fb, edee8e9 — `vm_core::page_queues`: the `nonempty`
//! mask of lists holding a page, the `transit` lock taken by claims from
//! the lists, by releases and by an allocation that finds the lists
//! empty; the zeroer's batch `Pages::take_plain` with its per-run
//! `RUN_PLAIN` hint and `zero_cursor`; `disown` of a claimed run whose
//! fault got no frame). Public API only. Aims at what
//! `redteam_held_runs.rs` (h01-h14) does not cover.

mod common;

use common::held::{cfg, lists_whole, no_leak, quiet_checks, resident, vm_at, with_swap};

use common::{Rng, audit, consistent, rdpage, squeeze, wrpage};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vm_core::page_queues::Thresholds;
use vm_core::{FaultFlags, Pmap, Prot, SuperpagePolicy, Vm, VmConfig, VmSpace};
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::RefPmap;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const PAGES: u64 = SUPER / PAGE;
const BASE: u64 = 0x4000_0000;
/// Address space for 4 KiB-only mappings (an entry that never covers an
/// aligned 2 MiB whole, so no reservation).
const SMALL: u64 = 0x7000_0000 + PAGE;

fn tag(va: u64, round: u64) -> u64 {
    (va << 8) | (round & 0xff) | 1
}

fn cfg_res(pages: u64, policy: SuperpagePolicy, reserved: u64, severe: u64) -> VmConfig {
    VmConfig {
        thresholds: Some(Thresholds {
            reserved,
            severe,
            target: 0,
        }),
        memory_retries: 3,
        memory_wait_ms: 1,
        ..cfg(pages, policy)
    }
}

/// Zeroes by hand until a call zeroes nothing (bounded); returns the
/// total.
fn zero_all<P: Pmap>(vm: &Vm<P>) -> u64 {
    let mut total = 0;
    for _ in 0..10_000 {
        let z = vm.zero_free_pages(u64::MAX);
        if z == 0 {
            return total;
        }
        total += z;
    }
    panic!("zero_free_pages never reached zero");
}

/// Joins `hs` or fails after `secs` seconds (a deadlock shows as a
/// failure, not a hung test run).
fn join_within(hs: Vec<std::thread::JoinHandle<()>>, secs: u64, what: &str) {
    let until = Instant::now() + Duration::from_secs(secs);
    while hs.iter().any(|h| !h.is_finished()) {
        assert!(
            Instant::now() < until,
            "{what}: threads still running after {secs} s (deadlock?)"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for h in hs {
        h.join().unwrap();
    }
}

// ---------------------------------------------------------------------

/// `take_plain` clears a held run's `RUN_PLAIN` hint before it looks and
/// sets it again only when the batch fills: a look that stops because
/// the free count is at the reserve (the `floor` check in
/// `take_plain_held`) takes nothing and leaves the hint cleared, so the
/// run's plain frames are never looked at again (no plain frame comes
/// back to it). A run holds 256 plain frames; a balloon brings the free
/// count to the reserve; `zero_free_pages` (rightly) zeroes nothing
/// there. The balloon goes: every free frame must then be zeroable.
#[test]
fn k01_zeroer_at_the_reserve_keeps_the_plain_hint() {
    let frames = 2 * PAGES + 16;
    let vm = Vm::new(
        RefPmap::new(),
        cfg_res(frames, SuperpagePolicy::Reserve, 300, 300),
    )
    .unwrap();
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, SUPER, Prot::RW).unwrap();
    for i in 0..PAGES {
        let va = BASE + i * PAGE;
        wrpage(&s, va, tag(va, 1)).unwrap();
    }
    // 256 plain frames back into the held, owned run.
    s.unmap(BASE, 256 * PAGE).unwrap();
    assert_eq!(vm.free_pages() - vm.free_zeroed_pages(), 256);
    // The rest (zeroed frames on the lists) down to the reserve.
    let b = vm.inflate_balloon(vm.free_pages() - 300);
    assert_eq!(vm.free_pages(), 300);
    assert_eq!(vm.zero_free_pages(u64::MAX), 0, "zeroed below the reserve");
    drop(b);
    audit(&vm, "k01 balloon gone");
    let plain = vm.free_pages() - vm.free_zeroed_pages();
    assert_eq!(plain, 256);
    let z = zero_all(&vm);
    assert_eq!(
        (z, vm.free_zeroed_pages(), vm.free_pages()),
        (256, vm.free_pages(), vm.free_pages()),
        "k01: plain frames of a held run left unzeroed after a look at the reserve"
    );
    for i in 256..PAGES {
        let va = BASE + i * PAGE;
        assert_eq!(rdpage(&s, va), Ok(tag(va, 1)));
    }
    drop(s);
    audit(&vm, "k01");
}

/// The zeroer's own batch brings the free count to the reserve in the
/// middle of a held run: 10 frames above the reserve, 256 plain frames in
/// a held run. Each `zero_free_pages` may zero only 10 at a time (then it
/// gives them back), but repeated calls must get through all 256; the
/// first call's early stop clears the run's hint for good.
#[test]
fn k02_zeroer_near_the_reserve_makes_progress_call_after_call() {
    let frames = 2 * PAGES + 16;
    let vm = Vm::new(
        RefPmap::new(),
        cfg_res(frames, SuperpagePolicy::Reserve, 300, 300),
    )
    .unwrap();
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, SUPER, Prot::RW).unwrap();
    for i in 0..PAGES {
        s.write_u8(BASE + i * PAGE, 0x5a).unwrap();
    }
    s.unmap(BASE, 256 * PAGE).unwrap();
    let b = vm.inflate_balloon(vm.free_pages() - 310);
    assert_eq!(vm.free_pages(), 310);
    let mut calls = Vec::new();
    for _ in 0..40 {
        let z = vm.zero_free_pages(u64::MAX);
        calls.push(z);
        if z == 0 {
            break;
        }
    }
    let total: u64 = calls.iter().sum();
    assert_eq!(
        (total, vm.free_zeroed_pages(), vm.free_pages()),
        (256, 310, 310),
        "k02: zeroer near the reserve stalled; frames per call {calls:?}"
    );
    drop(b);
    drop(s);
    audit(&vm, "k02");
}

/// `zero_free_pages(max)` for small `max` (0, 1, 31, 32, 33): returns
/// exactly `min(max, plain)` each time, frames on the lists and in
/// several held runs (owned and not, partly used), cursor moving between
/// runs; done by ones to the end: every free frame zero, the total equal
/// to the plain count, counts exact, data intact.
#[test]
fn k03_zero_free_pages_small_max() {
    let frames = 4 * PAGES + 100;
    let vm = Vm::new(RefPmap::new(), cfg(frames, SuperpagePolicy::Reserve)).unwrap();
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 3 * SUPER, Prot::RW).unwrap();
    // Three runs claimed; written in different densities.
    for k in 0..3 {
        for i in (0..PAGES).step_by(k as usize + 1) {
            let va = BASE + k * SUPER + i * PAGE;
            wrpage(&s, va, tag(va, 1)).unwrap();
        }
    }
    // Plain frames back into held runs: parts of each.
    s.unmap(BASE + 10 * PAGE, 40 * PAGE).unwrap();
    s.unmap(BASE + SUPER + 100 * PAGE, 200 * PAGE).unwrap();
    // The third wholly (its run wholly free again: held, owned by none).
    s.unmap(BASE + 2 * SUPER, SUPER).unwrap();
    // Plain frames on the lists: a 4 KiB-only mapping written and gone.
    s.map_anon(SMALL, 60 * PAGE, Prot::RW).unwrap();
    for i in 0..60 {
        s.write_u8(SMALL + i * PAGE, 0x77).unwrap();
    }
    s.unmap(SMALL, 60 * PAGE).unwrap();
    audit(&vm, "k03 before");
    let mut plain = vm.free_pages() - vm.free_zeroed_pages();
    assert!(plain > 200, "{plain}");
    let mut total = 0;
    for max in [0u64, 1, 31, 32, 33, 1, 0, 33, 31] {
        let z = vm.zero_free_pages(max);
        assert_eq!(
            z,
            max.min(plain),
            "zero_free_pages({max}) with {plain} plain"
        );
        plain -= z;
        total += z;
        assert_eq!(
            vm.free_pages() - vm.free_zeroed_pages(),
            plain,
            "after max {max}"
        );
    }
    let mut ones = 0;
    while vm.zero_free_pages(1) == 1 {
        ones += 1;
        assert!(ones <= 4 * PAGES, "zero_free_pages(1) never ends");
    }
    total += ones;
    assert_eq!(
        ones, plain,
        "k03: by ones, another count than the plain left"
    );
    assert_eq!(
        vm.free_zeroed_pages(),
        vm.free_pages(),
        "k03: not all zeroed (total {total})"
    );
    audit(&vm, "k03 after");
    for k in 0..2 {
        for i in (0..PAGES).step_by(k as usize + 1) {
            let va = BASE + k * SUPER + i * PAGE;
            let gone = (k == 0 && (10..50).contains(&i)) || (k == 1 && (100..300).contains(&i));
            if !gone {
                assert_eq!(rdpage(&s, va), Ok(tag(va, 1)), "k03 page {k}/{i}");
            }
        }
    }
    drop(s);
    audit(&vm, "k03 end");
    lists_whole(&vm, "k03");
}

/// A machine off a run boundary (a partial head of 412 frames, then three
/// whole runs) under `Always` with `reserved == severe == 700`: two
/// 2 MiB filled whole (the top two runs), then 4 KiB pages (from the
/// head) until exactly 700 frames are free, the lowest run still whole
/// on the lists. A write fault in a new 2 MiB then claims that run from
/// the lists (`claim_listed`), `alloc_at` refuses its frame (the
/// reserve) and the fault fails: the run must be disowned. Returns the
/// machine, the space, and the failed 2 MiB's address (still mapped).
fn claim_at_reserve<P: Pmap>(pmap: P, what: &str) -> (Arc<Vm<P>>, VmSpace<P>, u64) {
    let frames = 412 + 3 * PAGES;
    let vm = vm_at(
        pmap,
        100,
        frames,
        cfg_res(frames, SuperpagePolicy::Always, 700, 700),
    );
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
    for k in 0..2 {
        let va = BASE + k * SUPER;
        wrpage(&s, va, tag(va, 1)).unwrap();
        assert_eq!(resident(&s, va), PAGES, "{what}: 2 MiB {k} filled whole");
    }
    s.map_anon(SMALL, 400 * PAGE, Prot::RW).unwrap();
    let mut i = 0;
    // Pageout (no swap) frees no page but may free a page-table frame
    // (x86): settle that first, so the fault's own reclaim finds nothing.
    for _ in 0..10 {
        while vm.free_pages() > 700 {
            let va = SMALL + i * PAGE;
            wrpage(&s, va, tag(va, 2)).unwrap();
            i += 1;
            assert!(i < 400);
        }
        squeeze(&vm);
        if vm.free_pages() == 700 {
            break;
        }
    }
    assert_eq!(vm.free_pages(), 700, "{what}: set-up");
    let va = BASE + 4 * SUPER;
    s.map_anon(va, SUPER, Prot::RW).unwrap();
    let e = s.fault(va, Prot::WRITE, FaultFlags::DIRTY);
    assert!(e.is_err(), "{what}: a frame above the reserve: {e:?}");
    assert_eq!(vm.free_pages(), 700, "{what}: the failed fault took frames");
    consistent(&vm, what);
    // Memory back: the 4 KiB pages go.
    s.unmap(SMALL, 400 * PAGE).unwrap();
    (vm, s, va)
}

/// [`claim_at_reserve`] on both pmaps: the run claimed from the lists by
/// the failed fault (x86: page tables beside it) must be claimable again:
/// a new 2 MiB (too little memory to fill it whole) takes its frames out
/// of that run at their offsets (frame 512 + offset: the run starts at
/// frame 512); the others' data intact; at rest, counts exact and every
/// frame free once.
#[test]
fn k04_run_claimed_from_the_lists_at_the_reserve_is_claimable_again() {
    fn run<P: Pmap>(pmap: P, what: &str) {
        let (vm, s, failed) = claim_at_reserve(pmap, what);
        s.unmap(failed, SUPER).unwrap();
        let va = BASE + 6 * SUPER;
        s.map_anon(va, SUPER, Prot::RW).unwrap();
        for i in [3u64, 4, 100, 511, 0] {
            s.write_u8(va + i * PAGE, 9).unwrap();
            assert_eq!(
                s.extract(va + i * PAGE).map(|p| p.0),
                Some(512 + i),
                "{what}: page {i} of a new 2 MiB not from the disowned run"
            );
        }
        for k in 0..2 {
            for i in (0..PAGES).step_by(97) {
                let v = BASE + k * SUPER + i * PAGE;
                let want = if i == 0 { tag(v, 1) } else { 0 };
                assert_eq!(rd(&s, v), want, "{what}: 2 MiB {k} page {i}");
            }
        }
        drop(s);
        no_leak(&vm, what);
        audit(&vm, what);
        lists_whole(&vm, what);
    }
    run(X86Pmap::new(), "k04 x86");
    run(RefPmap::new(), "k04 ref");
}

fn rd<P: Pmap>(s: &VmSpace<P>, va: u64) -> u64 {
    common::rd64(s, va).unwrap()
}

/// [`claim_at_reserve`], then the same fault again in the same object
/// once memory is back: under `Always` it must fill the 2 MiB whole, as
/// the first fault would have with memory. The failed fault disowned the
/// run but left the object's reservation record (`st.reservations`,
/// `fault/reserve.rs`) pointing at it, so the retry is not `fresh`: it
/// takes its one frame out of the (unowned) run and the 2 MiB stays
/// 4 KiB pages, filled from a run no reservation owns (the first a
/// shortage breaks). Same with the fault's own wait-and-retry when memory
/// comes back while it waits.
#[test]
fn k05_failed_claim_retried_in_the_same_object_fills_whole() {
    fn run<P: Pmap>(pmap: P, what: &str) -> (u64, u64) {
        let (vm, s, failed) = claim_at_reserve(pmap, what);
        // Enough memory for two whole superpages (severe + 2 * 512): the
        // filled 2 MiB go too (their runs wholly free again, held).
        s.unmap(BASE, 2 * SUPER).unwrap();
        assert!(
            vm.free_pages() >= 700 + 2 * PAGES,
            "{what}: {}",
            vm.free_pages()
        );
        // The same fault again, in the same object.
        s.write_u8(failed + 3 * PAGE, 9).unwrap();
        let retried = resident(&s, failed);
        // Control: a new object's 2 MiB, same moment.
        let va = BASE + 8 * SUPER;
        s.map_anon(va, SUPER, Prot::RW).unwrap();
        s.write_u8(va + 3 * PAGE, 9).unwrap();
        let fresh = resident(&s, va);
        drop(s);
        no_leak(&vm, what);
        audit(&vm, what);
        (retried, fresh)
    }
    let got = [
        run(X86Pmap::new(), "k05 x86"),
        run(RefPmap::new(), "k05 ref"),
    ];
    assert_eq!(
        got,
        [(PAGES, PAGES); 2],
        "k05: (pages of the retried 2 MiB, pages of a new object's 2 MiB) on x86, ref: \
         the retry in the object whose claim failed is not filled whole"
    );
}

/// The `nonempty` mask with every list holding at most a frame or two:
/// eight free frames on eight shards (the rest in use by 4 KiB pages, no
/// reservations), three threads taking and giving back one frame at a
/// time through balloons (`alloc(.., System, zero = false)`: plain
/// first), one thread faulting a zero-fill page and unmapping it
/// (`alloc(.., Normal, zero = true)`: zeroed first; the frame comes back
/// plain). Each push or pop of a list's last frame flips its bit. At any
/// instant at most four frames are taken or between their count and
/// their list, so at least four sit on the lists: an allocation must
/// never fail, whichever kinds are where.
#[test]
fn k06_nonempty_mask_with_lists_of_one_frame() {
    let total = 200u64;
    let vm = Vm::new(RefPmap::new(), cfg(total, SuperpagePolicy::Never)).unwrap();
    let s = vm.new_space().unwrap();
    s.map_anon(SMALL, 192 * PAGE, Prot::RW).unwrap();
    for i in 0..192 {
        let va = SMALL + i * PAGE;
        wrpage(&s, va, tag(va, 1)).unwrap();
    }
    assert_eq!(vm.free_pages(), 8);
    let s = Arc::new(s);
    let stop = Arc::new(AtomicBool::new(false));
    let fails = Arc::new(AtomicU64::new(0));
    let rounds = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for _ in 0..3 {
        let (vm, stop, fails, rounds) = (vm.clone(), stop.clone(), fails.clone(), rounds.clone());
        hs.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let b = vm.inflate_balloon(1);
                if b.len() != 1 {
                    fails.fetch_add(1, Ordering::Relaxed);
                }
                drop(b);
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    {
        let (vm, stop, fails) = (vm.clone(), stop.clone(), fails.clone());
        hs.push(std::thread::spawn(move || {
            let sp = vm.new_space().unwrap();
            let va = BASE + PAGE;
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                sp.map_anon(va, PAGE, Prot::RW).unwrap();
                if let Err(e) = sp.fault(va, Prot::WRITE, FaultFlags::DIRTY) {
                    eprintln!("fault round {round}: {e:?}");
                    fails.fetch_add(1000, Ordering::Relaxed);
                } else {
                    wrpage(&sp, va, tag(va, round)).unwrap();
                    assert_eq!(rdpage(&sp, va), Ok(tag(va, round)));
                }
                sp.unmap(va, PAGE).unwrap();
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    join_within(hs, 20, "k06");
    eprintln!("k06: {} balloon rounds", rounds.load(Ordering::Relaxed));
    assert_eq!(
        fails.load(Ordering::Relaxed),
        0,
        "k06: an allocation failed (balloon: +1, fault: +1000) with frames on the lists"
    );
    for i in 0..192 {
        let va = SMALL + i * PAGE;
        assert_eq!(rdpage(&s, va), Ok(tag(va, 1)));
    }
    audit(&vm, "k06");
    drop(s);
    no_leak(&vm, "k06");
    audit(&vm, "k06 end");
    lists_whole(&vm, "k06");
}

/// Lock order under load (object lock -> transit -> shard locks; claims
/// under an object's lock, allocations holding transit while they
/// release runs): on a tiny x86 machine off a run boundary (two whole
/// runs) under `Always`, two threads fault whole 2 MiB, fork, COW and
/// unmap; one inflates balloons of everything (the lists empty: held runs
/// released under the transit lock) and drops them; one zeroes by hand;
/// one pages out to swap. Must finish (a deadlock fails the test), every
/// write intact, and at rest the books balance and every frame is free
/// once.
#[test]
fn k07_transit_lock_order_under_claims_releases_zeroer_pageout() {
    let frames = 300 + 2 * PAGES + 60;
    let vm = vm_at(
        X86Pmap::new(),
        212,
        frames,
        cfg(frames, SuperpagePolicy::Always),
    );
    let (_swap, _t) = with_swap(&vm, 32);
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let (vm, stop) = (vm.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let s = vm.new_space().unwrap();
            let base = BASE + t * 8 * SUPER;
            let mut rng = Rng::new(t + 70);
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                s.map_anon(base, SUPER, Prot::RW).unwrap();
                let mut ok = Vec::new();
                for _ in 0..8 {
                    let va = base + rng.below(PAGES) * PAGE;
                    if wrpage(&s, va, tag(va, round)).is_ok() {
                        ok.push(va);
                    }
                }
                if let Ok(c) = s.fork() {
                    for &va in ok.iter().take(3) {
                        let _ = wrpage(&c, va, tag(va, round + 100));
                    }
                    for &va in &ok {
                        match rdpage(&s, va) {
                            Ok(v) => assert_eq!(v, tag(va, round), "t{t} parent {va:#x}"),
                            Err(e) if e.contains("torn") => panic!("t{t}: {e}"),
                            Err(_) => {}
                        }
                    }
                    drop(c);
                }
                s.unmap(base, SUPER).unwrap();
            }
        }));
    }
    {
        let (vm, stop) = (vm.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng::new(3);
            while !stop.load(Ordering::Relaxed) {
                let b = vm.inflate_balloon(u64::MAX);
                std::thread::sleep(Duration::from_micros(rng.below(300)));
                drop(b);
                std::thread::sleep(Duration::from_micros(rng.below(1000)));
            }
        }));
    }
    {
        let (vm, stop) = (vm.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                vm.zero_free_pages(33);
                std::thread::yield_now();
            }
        }));
    }
    {
        let (vm, stop) = (vm.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                vm.pageout(vm.total_pages() / 2);
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    join_within(hs, 20, "k07");
    quiet_checks(&vm, "k07");
    // (Whether both runs are still claimable whole is not checked here:
    // on x86 the check's own page-table frames come off whatever the
    // lists' heads are after the storm, run frames included.)
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, SUPER, Prot::RW).unwrap();
    s.write_u8(BASE, 1).unwrap();
    drop(s);
    audit(&vm, "k07 end");
}

/// The zeroer (by hand, in a loop, batches of 1 to 40) beside a balloon
/// that brings the free count to the reserve and back, on a machine of
/// four runs (three held with plain frames, partly used) with
/// `reserved = severe = 200`: when the balloon is gone and the zeroer
/// stops, one last pass by hand must leave every free frame zero. A look
/// at the reserve clears a run's hint (see [`k01_zeroer_at_the_reserve_keeps_the_plain_hint`])
/// and loses the run's plain frames for good.
#[test]
fn k08_zeroer_beside_balloons_at_the_reserve_finishes() {
    let frames = 4 * PAGES + 40;
    let vm = Vm::new(
        RefPmap::new(),
        cfg_res(frames, SuperpagePolicy::Reserve, 200, 200),
    )
    .unwrap();
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 3 * SUPER, Prot::RW).unwrap();
    for k in 0..3 {
        for i in 0..PAGES {
            let va = BASE + k * SUPER + i * PAGE;
            wrpage(&s, va, tag(va, 1)).unwrap();
        }
    }
    for k in 0..3 {
        s.unmap(BASE + k * SUPER + (k + 1) * 64 * PAGE, 120 * PAGE)
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    {
        let (vm, stop) = (vm.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng::new(8);
            while !stop.load(Ordering::Relaxed) {
                vm.zero_free_pages(1 + rng.below(40));
            }
        }));
    }
    {
        let (vm, stop) = (vm.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng::new(9);
            while !stop.load(Ordering::Relaxed) {
                let free = vm.free_pages();
                let b = vm.inflate_balloon(free.saturating_sub(200 + rng.below(20)));
                std::thread::sleep(Duration::from_micros(rng.below(500)));
                drop(b);
                std::thread::sleep(Duration::from_micros(rng.below(500)));
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    join_within(hs, 20, "k08");
    audit(&vm, "k08 quiet");
    zero_all(&vm);
    assert_eq!(
        vm.free_zeroed_pages(),
        vm.free_pages(),
        "k08: plain frames left after the zeroer's last pass"
    );
    for k in 0..3 {
        for i in (0..PAGES).step_by(5) {
            let va = BASE + k * SUPER + i * PAGE;
            let lo = (k + 1) * 64;
            if !(lo..lo + 120).contains(&i) {
                assert_eq!(rdpage(&s, va), Ok(tag(va, 1)), "k08 {k}/{i}");
            }
        }
    }
    drop(s);
    audit(&vm, "k08 end");
    lists_whole(&vm, "k08");
}
