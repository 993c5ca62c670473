//! Red team: superpage runs that hold their free frames (commit 660c49a,
//! `vm_core::page_queues`: `RunBits`, `claim_run` / `claim_held` /
//! `claim_listed`, `alloc_at`, `give_held`, `release_some` /
//! `release_run`, `take_held_rest`, `take_plain` and the `RUN_PLAIN`
//! hint), attacked through the public API only.
//!
//! Frames lost or handed out twice (the free count against a balloon that
//! takes every free frame), frames free but neither listed nor held, runs
//! that can never be claimed again, the zeroer that never finishes or
//! flags a dirty frame zero, memory exhaustion with every free frame in a
//! held run (faults, page tables, balloons, pageout, swap), tiny machines
//! of one to three runs and machines whose memory starts off a run
//! boundary, whole-superpage faults beside releases, fork / COW / unmap /
//! mprotect / mlock, on both pmaps.

mod common;

use common::held::{cfg, lists_whole, no_leak, quiet_checks, resident, vm_at, with_swap};

use common::{Rng, audit, consistent, rdpage, squeeze, wrpage};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vm_core::page_queues::Thresholds;
use vm_core::{FaultFlags, Pmap, Prot, SuperpageAdvice, SuperpagePolicy, Vm, VmConfig};
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::RefPmap;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const PAGES: u64 = SUPER / PAGE;
const BASE: u64 = 0x4000_0000;

fn tag(va: u64, round: u64) -> u64 {
    (va << 8) | (round & 0xff) | 1
}

fn vm_with<P: Pmap>(pmap: P, policy: SuperpagePolicy, pages: u64) -> Arc<Vm<P>> {
    Vm::new(pmap, cfg(pages, policy)).unwrap()
}

/// Frames past the last whole run: a partial run (never claimed) so that
/// the last whole-superpage fault still finds `severe + 512` frames free
/// after taking its own (`populate` counts its own frame as gone).
const TAIL: u64 = 16;

/// A RefPmap machine (no page-table frames) of `runs` whole runs and a
/// partial tail of [`TAIL`] frames, under `policy`.
fn runs_vm(runs: u64, policy: SuperpagePolicy) -> Arc<Vm<RefPmap>> {
    vm_with(RefPmap::new(), policy, runs * PAGES + TAIL)
}

/// On an idle [`runs_vm`] machine whose frames are all free: one write
/// fault per 2 MiB under `Always` must claim each run in turn and fill it
/// (512 resident pages per 2 MiB). A run that can no longer be claimed
/// leaves its 2 MiB with one page.
fn every_run_claimable(vm: &Arc<Vm<RefPmap>>, runs: u64, what: &str) {
    assert_eq!(vm.config().superpages, SuperpagePolicy::Always);
    no_leak(vm, what);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, runs * SUPER, Prot::RW).unwrap();
    let mut got = Vec::new();
    for k in 0..runs {
        s.write_u8(BASE + k * SUPER + 5 * PAGE, 7).unwrap();
        got.push(resident(&s, BASE + k * SUPER));
    }
    assert!(
        got.iter().all(|&n| n == PAGES),
        "{what}: with every frame free, not every run could be claimed for a \
         whole superpage: resident pages per 2 MiB {got:?}"
    );
    drop(s);
    no_leak(vm, what);
}

// ---------------------------------------------------------------------

/// Baseline for the claimability check: a fresh machine of four runs,
/// every run is claimed and filled by one write fault each, twice over
/// (the second time the runs come back held and wholly free), and again
/// after a balloon of everything released them onto the lists.
#[test]
fn h01_every_run_is_claimed_again_and_again() {
    let vm = runs_vm(4, SuperpagePolicy::Always);
    every_run_claimable(&vm, 4, "fresh");
    every_run_claimable(&vm, 4, "held and whole again");
    lists_whole(&vm, "after");
    every_run_claimable(&vm, 4, "released by a balloon");
    audit(&vm, "h01");
}

/// Memory that starts off a run boundary (frame 100) and ends inside a
/// run: two whole runs, a partial head (412 frames) and a partial tail.
/// Reserve and Always faults fill all of it, fork and COW, unmap, page
/// out; every frame handed out once, counts audited, both pmaps.
fn unaligned_machine<P: Pmap>(pmap: P, policy: SuperpagePolicy, what: &str) {
    let frames = 412 + 2 * PAGES + 37;
    let vm = vm_at(pmap, 100, frames, cfg(frames, policy));
    let (_swap, _t) = with_swap(&vm, 16);
    let s = vm.new_space().unwrap();
    // Three aligned 2 MiB of address space: more than memory holds at
    // once without pageout.
    s.map_anon(BASE, 3 * SUPER, Prot::RW).unwrap();
    for i in 0..3 * PAGES {
        let va = BASE + i * PAGE;
        wrpage(&s, va, tag(va, 1)).unwrap_or_else(|e| panic!("{what}: write {i}: {e}"));
    }
    let c = s.fork().unwrap();
    for i in (0..3 * PAGES).step_by(3) {
        let va = BASE + i * PAGE;
        wrpage(&c, va, tag(va, 2)).unwrap();
    }
    s.unmap(BASE + 700 * PAGE, 300 * PAGE).unwrap();
    squeeze(&vm);
    for i in 0..3 * PAGES {
        let va = BASE + i * PAGE;
        let want_c = tag(va, if i % 3 == 0 { 2 } else { 1 });
        assert_eq!(rdpage(&c, va), Ok(want_c), "{what}: child page {i}");
        if !(700..1000).contains(&i) {
            assert_eq!(rdpage(&s, va), Ok(tag(va, 1)), "{what}: parent page {i}");
        }
    }
    consistent(&vm, what);
    drop(c);
    drop(s);
    no_leak(&vm, what);
    audit(&vm, what);
    lists_whole(&vm, what);
    // And the two whole runs are still whole superpages' worth.
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 4 * SUPER, Prot::RW).unwrap();
    for k in 0..4 {
        s.write_u8(BASE + k * SUPER, 1).unwrap();
    }
    consistent(&vm, what);
    drop(s);
    no_leak(&vm, what);
    lists_whole(&vm, what);
}

/// [`unaligned_machine`] on both pmaps under Always and Reserve: partial
/// runs at both ends of memory beside held runs.
#[test]
fn h02_memory_off_a_run_boundary() {
    unaligned_machine(RefPmap::new(), SuperpagePolicy::Always, "ref always");
    unaligned_machine(RefPmap::new(), SuperpagePolicy::Reserve, "ref reserve");
    unaligned_machine(X86Pmap::new(), SuperpagePolicy::Always, "x86 always");
    unaligned_machine(X86Pmap::new(), SuperpagePolicy::Reserve, "x86 reserve");
}

/// A machine of exactly one run on the x86 pmap: the first write fault
/// claims the only run, so every free frame is held by it (owned, still
/// filling) when the page tables are needed; they must come from breaking
/// it (`AllocClass::System`), and the rest of memory must still be
/// usable by 4 KiB faults until it is full, then freed whole.
fn one_run<P: Pmap>(pmap: P, policy: SuperpagePolicy, what: &str) {
    let vm = vm_with(pmap, policy, PAGES);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, SUPER, Prot::RW).unwrap();
    let mut ok = 0;
    for i in 0..PAGES {
        let va = BASE + i * PAGE;
        match wrpage(&s, va, tag(va, 1)) {
            Ok(()) => ok += 1,
            Err(_) => break,
        }
    }
    // Page tables take a few frames; everything else must be usable.
    assert!(ok >= PAGES - 8, "{what}: only {ok} pages written");
    // Memory full, every fault (even a read of a resident page) waits for
    // memory: give some back first.
    s.unmap(BASE + (ok - 16) * PAGE, 16 * PAGE).unwrap();
    let ok = ok - 16;
    for i in 0..ok {
        let va = BASE + i * PAGE;
        assert_eq!(rdpage(&s, va), Ok(tag(va, 1)), "{what}: page {i}");
    }
    consistent(&vm, what);
    drop(s);
    no_leak(&vm, what);
    lists_whole(&vm, what);
    audit(&vm, what);
}

/// [`one_run`] on both pmaps: all free memory held by one owned run when
/// page tables (`AllocClass::System`) and 4 KiB faults need frames.
#[test]
fn h03_one_run_machine_page_tables_break_the_reservation() {
    one_run(X86Pmap::new(), SuperpagePolicy::Reserve, "x86 reserve");
    one_run(X86Pmap::new(), SuperpagePolicy::Always, "x86 always");
    one_run(RefPmap::new(), SuperpagePolicy::Reserve, "ref reserve");
    one_run(RefPmap::new(), SuperpagePolicy::Always, "ref always");
}

/// Every free frame is in a held run (three runs claimed by three
/// reservations, each filled with one page): a balloon of everything must
/// still take every free frame (breaking the reservations), exactly once;
/// deflated, the reservations' next faults get their frames back from the
/// lists or a new claim, and the data is intact.
#[test]
fn h04_balloon_drains_held_runs_exactly() {
    for (policy, what) in [
        (SuperpagePolicy::Reserve, "reserve"),
        (SuperpagePolicy::Always, "always"),
    ] {
        let vm = vm_with(RefPmap::new(), policy, 3 * PAGES);
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, 3 * SUPER, Prot::RW).unwrap();
        s.advise_superpages(BASE + SUPER, SUPER, SuperpageAdvice::NoHuge)
            .unwrap();
        for k in [0, 2] {
            wrpage(&s, BASE + k * SUPER, tag(BASE + k * SUPER, 1)).unwrap();
        }
        let used = vm.total_pages() - vm.free_pages();
        let b = vm.inflate_balloon(u64::MAX);
        assert_eq!(b.len(), vm.total_pages() - used, "{what}: balloon");
        let frames: HashSet<u64> = b.frames().map(|p| p.0).collect();
        assert_eq!(frames.len() as u64, b.len(), "{what}: a frame twice");
        assert_eq!(vm.free_pages(), 0);
        consistent(&vm, what);
        drop(b);
        for i in 0..3 * PAGES {
            let va = BASE + i * PAGE;
            if i % 7 == 0 {
                wrpage(&s, va, tag(va, 2)).unwrap();
            }
        }
        for i in 0..3 * PAGES {
            let va = BASE + i * PAGE;
            let want = if i % 7 == 0 {
                tag(va, 2)
            } else if i == 0 || i == 2 * PAGES {
                tag(va, 1)
            } else {
                0
            };
            assert_eq!(rdpage(&s, va), Ok(want), "{what}: page {i}");
        }
        consistent(&vm, what);
        drop(s);
        no_leak(&vm, what);
        lists_whole(&vm, what);
        audit(&vm, what);
    }
}

/// Plain frames freed back into held runs (written pages unmapped while
/// their runs are held) must all be found and zeroed by the zeroer, both
/// by hand and by the thread; no frame flagged zero holds data; and the
/// runs are still claimable afterwards.
#[test]
fn h05_zeroer_finds_every_plain_frame_in_held_runs() {
    let vm = vm_with(RefPmap::new(), SuperpagePolicy::Reserve, 4 * PAGES);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 4 * SUPER, Prot::RW).unwrap();
    // Each 2 MiB claims a run; write some of its pages.
    for k in 0..4 {
        for i in (0..PAGES).step_by(3) {
            let va = BASE + k * SUPER + i * PAGE;
            wrpage(&s, va, tag(va, 1)).unwrap();
        }
    }
    // Unmap parts: plain frames back into held, owned runs.
    s.unmap(BASE + 30 * PAGE, 100 * PAGE).unwrap();
    s.unmap(BASE + 2 * SUPER, SUPER).unwrap();
    audit(&vm, "h05 before zeroing");
    let plain = vm.free_pages() - vm.free_zeroed_pages();
    assert!(plain > 0);
    let z = vm.zero_free_pages(u64::MAX);
    assert_eq!(z, plain, "zero_free_pages zeroed another count");
    assert_eq!(vm.free_zeroed_pages(), vm.free_pages());
    audit(&vm, "h05 after zeroing by hand");
    // The rest unmapped, zeroed by the thread.
    drop(s);
    assert!(vm.free_zeroed_pages() < vm.free_pages());
    let zeroer = vm.spawn_page_zeroer(Duration::from_millis(1));
    let until = Instant::now() + Duration::from_secs(15);
    while vm.free_zeroed_pages() < vm.free_pages() {
        assert!(
            Instant::now() < until,
            "zeroer stalled: {} zeroed of {} free",
            vm.free_zeroed_pages(),
            vm.free_pages()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(zeroer);
    audit(&vm, "h05 after the zeroer");
    lists_whole(&vm, "h05");
    // Whole runs again: with Always, all four fill at once.
    let vm2 = runs_vm(4, SuperpagePolicy::Always);
    every_run_claimable(&vm2, 4, "h05 control");
}

/// The storm behind [`h06_storm_of_claims_zeroing_and_releases`]: on a
/// RefPmap machine of `runs` runs under `Always`, one thread fills a
/// 2 MiB with one write fault (claiming a run and taking the rest of it)
/// and unmaps it (512 plain frames back into the held run, wholly free
/// again), over and over; one zeroes free frames without pause (taking
/// plain frames out of held runs); one inflates a balloon of everything
/// (the lists empty, releasing held runs under the zeroer) and drops it.
/// Returns the machine, idle, every space gone.
fn storm(runs: u64, dur: Duration, seed: u64) -> Arc<Vm<RefPmap>> {
    storm_with(runs, dur, seed, true, true)
}

fn storm_with(
    runs: u64,
    dur: Duration,
    seed: u64,
    zeroer: bool,
    balloon: bool,
) -> Arc<Vm<RefPmap>> {
    let vm = runs_vm(runs, SuperpagePolicy::Always);
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    {
        let (vm, stop, cycles) = (vm.clone(), stop.clone(), cycles.clone());
        hs.push(std::thread::spawn(move || {
            let s = vm.new_space().unwrap();
            let mut rng = Rng::new(seed);
            while !stop.load(Ordering::Relaxed) {
                let k = rng.below(runs);
                let va = BASE + k * SUPER;
                if s.map_anon(va, SUPER, Prot::RW).is_err() {
                    continue;
                }
                let _ = s.write_u8(va + rng.below(PAGES) * PAGE, 3);
                s.unmap(va, SUPER).unwrap();
                cycles.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    if zeroer {
        let (vm, stop) = (vm.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                vm.zero_free_pages(u64::MAX);
            }
        }));
    }
    if balloon {
        let (vm, stop) = (vm.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ 0x55);
            while !stop.load(Ordering::Relaxed) {
                let b = vm.inflate_balloon(u64::MAX);
                if rng.below(2) == 0 {
                    std::thread::yield_now();
                }
                drop(b);
            }
        }));
    }
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    eprintln!(
        "storm: {} fill/unmap cycles",
        cycles.load(Ordering::Relaxed)
    );
    vm
}

/// Claims, the zeroer's takes from held runs and releases of those runs
/// at once (see [`storm`]): afterwards every frame is free and handed out
/// exactly once, and — once a balloon has put every frame on the lists —
/// every run can still be claimed for a whole superpage. A release that
/// falls between the zeroer's take of a held frame and its re-setting of
/// the run's `RUN_PLAIN` hint (`take_plain`) leaves `RUN_PLAIN` on a run
/// no longer held; `claim_listed` wants the word to be exactly
/// `RUN_WHOLE`, `claim_held` wants `RUN_HELD`, and only a release clears
/// the hint, so such a run is never claimed again.
#[test]
fn h06_storm_of_claims_zeroing_and_releases() {
    // Short storms, each checked, until one breaks or ~8 s have gone.
    for round in 0..16 {
        let vm = storm(2, Duration::from_millis(500), 6 + round);
        let what = format!("h06 round {round}");
        no_leak(&vm, &what);
        audit(&vm, &what);
        lists_whole(&vm, &what);
        every_run_claimable(&vm, 2, &format!("{what}, after the storm"));
        audit(&vm, &format!("{what}, at the end"));
    }
}

/// A claim whose reservation never takes a frame: the free count sits
/// exactly at the reserve (`reserved == severe`), so the fault passes its
/// severity check and claims a held, wholly free run (`claim_held`), but
/// `alloc_at` refuses it the frame (it wants `reserved + 1`) and the fault
/// fails for want of memory. The object then goes, and memory comes back:
/// every run must be claimable again. `RUN_OWNED` is cleared only when a
/// frame given back makes the run wholly free, or by a release: a run
/// owned by a reservation that took nothing stays owned, and wholly free
/// and held, until a shortage breaks it.
#[test]
fn h07_a_claim_that_takes_no_frame_does_not_keep_the_run() {
    // Partial runs at both ends (412 + 500 frames), so that three
    // whole-superpage faults in a row each still find `severe + 512`
    // frames free.
    let frames = 412 + 3 * PAGES + 500;
    let vm = vm_at(
        RefPmap::new(),
        100,
        frames,
        VmConfig {
            thresholds: Some(Thresholds {
                reserved: 600,
                severe: 600,
                target: 0,
            }),
            memory_retries: 3,
            memory_wait_ms: 1,
            ..cfg(frames, SuperpagePolicy::Always)
        },
    );
    let s = vm.new_space().unwrap();
    // A run claimed, filled, and given back whole: held, owned by none.
    s.map_anon(BASE, SUPER, Prot::RW).unwrap();
    s.write_u8(BASE, 1).unwrap();
    assert_eq!(resident(&s, BASE), PAGES, "first 2 MiB filled whole");
    s.unmap(BASE, SUPER).unwrap();
    // Everything else but the reserve in a balloon: 512 frames held by
    // the run, 88 on the lists.
    let b = vm.inflate_balloon(vm.free_pages() - 600);
    assert_eq!(vm.free_pages(), 600);
    // A fault claims the held run, gets no frame, fails.
    s.map_anon(BASE + SUPER, SUPER, Prot::RW).unwrap();
    let e = s.fault(BASE + SUPER, Prot::WRITE, FaultFlags::DIRTY);
    assert!(e.is_err(), "no frame above the reserve: {e:?}");
    s.unmap(BASE + SUPER, SUPER).unwrap();
    drop(b);
    drop(s);
    consistent(&vm, "h07");
    no_leak(&vm, "h07");
    // Every run whole and free, nothing short: each 2 MiB gets one.
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 3 * SUPER, Prot::RW).unwrap();
    let mut got = Vec::new();
    for k in 0..3 {
        s.write_u8(BASE + k * SUPER, 1).unwrap();
        got.push(resident(&s, BASE + k * SUPER));
    }
    assert_eq!(
        got,
        vec![PAGES; 3],
        "h07: a run claimed by a reservation that took nothing cannot be claimed again"
    );
    drop(s);
    lists_whole(&vm, "h07");
    audit(&vm, "h07");
}

/// Whole-superpage faults (`Always`) on both pmaps from two threads, each
/// in its own space, filling, checking and unmapping 2 MiB regions, while
/// a third inflates balloons of most of the free memory (emptying the
/// lists: held runs, owned ones still filling included, are released
/// under the faults' `alloc_at` and `alloc_run_rest`) and drops them.
/// No write may be lost or land in another's frame; at rest every frame
/// is free exactly once.
fn faults_vs_balloons<P: Pmap + 'static>(vm: Arc<Vm<P>>, secs: u64, what: &str) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let (vm, stop) = (vm.clone(), stop.clone());
        let what = what.to_string();
        hs.push(std::thread::spawn(move || {
            let s = vm.new_space().unwrap();
            let base = BASE + t * 8 * SUPER;
            let mut rng = Rng::new(t + 1);
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let k = rng.below(2);
                let va0 = base + k * SUPER;
                s.map_anon(va0, SUPER, Prot::RW).unwrap();
                // Which pages hold the round's tag (a failed write, for
                // want of memory, leaves its page unknown).
                let mut ok = vec![false; PAGES as usize];
                let step = 1 + rng.below(5);
                for i in (0..PAGES).step_by(step as usize) {
                    let va = va0 + i * PAGE;
                    ok[i as usize] = wrpage(&s, va, tag(va, round)).is_ok();
                }
                for i in (0..PAGES).step_by(step as usize) {
                    let va = va0 + i * PAGE;
                    if ok[i as usize] {
                        match rdpage(&s, va) {
                            Ok(v) => assert_eq!(v, tag(va, round), "{what}: t{t} page {i}"),
                            Err(e) if e.contains("torn") => panic!("{what}: t{t} page {i}: {e}"),
                            Err(_) => {}
                        }
                    }
                }
                s.unmap(va0, SUPER).unwrap();
            }
        }));
    }
    {
        let (vm, stop) = (vm.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng::new(99);
            while !stop.load(Ordering::Relaxed) {
                let free = vm.free_pages();
                let b = vm.inflate_balloon(free.saturating_sub(32 + rng.below(600)));
                std::thread::sleep(Duration::from_micros(rng.below(500)));
                drop(b);
                std::thread::yield_now();
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    quiet_checks(&vm, what);
}

/// [`faults_vs_balloons`]: whole-superpage and reserved faults while
/// balloons empty the lists and release (break) held runs under them.
#[test]
fn h08_whole_superpage_faults_vs_balloons() {
    faults_vs_balloons(
        vm_with(X86Pmap::new(), SuperpagePolicy::Always, 4 * PAGES + TAIL),
        3,
        "x86 always",
    );
    faults_vs_balloons(
        vm_with(RefPmap::new(), SuperpagePolicy::Always, 4 * PAGES + TAIL),
        3,
        "ref always",
    );
    faults_vs_balloons(
        vm_with(X86Pmap::new(), SuperpagePolicy::Reserve, 4 * PAGES + TAIL),
        3,
        "x86 reserve",
    );
}

/// The zeroer thread beside Reserve faults that fill, fork, COW and unmap
/// parts of 2 MiB regions (plain frames going back into held runs, owned
/// and not) under pageout to swap; when the faults stop, the zeroer must
/// zero every free frame within seconds, and no frame flagged zero may
/// hold data.
fn zeroer_beside_faults<P: Pmap + 'static>(vm: Arc<Vm<P>>, what: &str) {
    let (_swap, _t) = with_swap(&vm, 32);
    let zeroer = vm.spawn_page_zeroer(Duration::from_millis(1));
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let vm = vm.clone();
        let what = what.to_string();
        hs.push(std::thread::spawn(move || {
            let s = vm.new_space().unwrap();
            let base = BASE + t * 8 * SUPER;
            let mut rng = Rng::new(t + 7);
            for round in 1..=6u64 {
                s.map_anon(base, 2 * SUPER, Prot::RW).unwrap();
                for i in 0..2 * PAGES {
                    if rng.pct(60) {
                        let va = base + i * PAGE;
                        wrpage(&s, va, tag(va, round)).unwrap();
                    }
                }
                let c = s.fork().unwrap();
                for i in (0..2 * PAGES).step_by(7) {
                    let va = base + i * PAGE;
                    wrpage(&c, va, tag(va, 100 + round)).unwrap();
                }
                let off = rng.below(PAGES);
                s.unmap(base + off * PAGE, (1 + rng.below(400)) * PAGE)
                    .unwrap();
                if t == 0 {
                    squeeze(&vm);
                }
                for i in (0..2 * PAGES).step_by(7) {
                    let va = base + i * PAGE;
                    assert_eq!(
                        rdpage(&c, va),
                        Ok(tag(va, 100 + round)),
                        "{what}: child {i}"
                    );
                }
                drop(c);
                s.unmap(base, 2 * SUPER).unwrap();
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    let until = Instant::now() + Duration::from_secs(15);
    while vm.free_zeroed_pages() < vm.free_pages() || vm.free_pages() < vm.total_pages() {
        assert!(
            Instant::now() < until,
            "{what}: the zeroer never finished: {} zeroed of {} free of {}",
            vm.free_zeroed_pages(),
            vm.free_pages(),
            vm.total_pages()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(zeroer);
    audit(&vm, what);
    lists_whole(&vm, what);
}

/// [`zeroer_beside_faults`]: the zeroer thread must finish, and flag no
/// dirty frame zero, after faults, forks and pageout fed held runs.
#[test]
fn h09_zeroer_finishes_beside_reserve_faults_fork_and_pageout() {
    zeroer_beside_faults(
        vm_with(X86Pmap::new(), SuperpagePolicy::Reserve, 5 * PAGES + TAIL),
        "x86 reserve",
    );
    zeroer_beside_faults(
        vm_with(RefPmap::new(), SuperpagePolicy::Always, 5 * PAGES + TAIL),
        "ref always",
    );
}

/// `alloc_run_rest` from held runs rolled back again and again: the
/// zeroer (by hand, in a loop) keeps taking plain frames out of held runs,
/// so whole-superpage faults find a frame missing and give back the words
/// they took (`take_held_rest`), while balloons release the runs between
/// the words. Frames freed back plain keep the zeroer busy. At rest: no
/// frame lost or doubled, no dirty frame flagged zero.
fn rollback_storm<P: Pmap + 'static>(vm: Arc<Vm<P>>, secs: u64, what: &str) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let (vm, stop) = (vm.clone(), stop.clone());
        let what = what.to_string();
        hs.push(std::thread::spawn(move || {
            let s = vm.new_space().unwrap();
            let mut rng = Rng::new(t + 40);
            let base = BASE + t * 8 * SUPER;
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                s.map_anon(base, 3 * SUPER, Prot::RW).unwrap();
                let mut ok = Vec::new();
                for k in 0..3 {
                    let va = base + k * SUPER + rng.below(PAGES) * PAGE;
                    if wrpage(&s, va, tag(va, round)).is_ok() {
                        ok.push(va);
                    }
                }
                // Dirty a few neighbours so their frames go back plain.
                for &va in &ok {
                    let n = va ^ PAGE;
                    let _ = s.write_u8(n + 8, 0xee);
                }
                for &va in &ok {
                    match rdpage(&s, va) {
                        Ok(v) => assert_eq!(v, tag(va, round), "{what}: t{t} {va:#x}"),
                        Err(e) if e.contains("torn") => panic!("{what}: {e}"),
                        Err(_) => {}
                    }
                }
                s.unmap(base, 3 * SUPER).unwrap();
            }
        }));
    }
    {
        let (vm, stop) = (vm.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                vm.zero_free_pages(64);
                std::thread::yield_now();
            }
        }));
    }
    {
        let (vm, stop) = (vm.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng::new(5);
            while !stop.load(Ordering::Relaxed) {
                let b = vm.inflate_balloon(vm.free_pages().saturating_sub(16 + rng.below(1200)));
                std::thread::yield_now();
                drop(b);
                std::thread::sleep(Duration::from_micros(rng.below(300)));
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    quiet_checks(&vm, what);
}

/// [`rollback_storm`]: `take_held_rest` rollbacks racing the zeroer and
/// releases lose and double no frame.
#[test]
fn h10_whole_superpage_rollbacks_vs_zeroer_and_releases() {
    rollback_storm(
        vm_with(RefPmap::new(), SuperpagePolicy::Always, 5 * PAGES + TAIL),
        4,
        "ref always",
    );
    rollback_storm(
        vm_with(X86Pmap::new(), SuperpagePolicy::Always, 5 * PAGES + TAIL),
        4,
        "x86 always",
    );
}

/// fork / COW / mprotect / mlock / partial unmap of Reserve and Always
/// regions on a machine whose memory starts off a run boundary and is
/// short (a balloon holds a third of it), pageout to swap between: every
/// free frame sits in held runs or lists in turn, and the data of both
/// sides survives; at rest the books balance and every frame is free once.
fn fork_ops_short<P: Pmap>(pmap: P, policy: SuperpagePolicy, what: &str) {
    let frames = 300 + 4 * PAGES + 200;
    let vm = vm_at(pmap, 212, frames, cfg(frames, policy));
    let (_swap, _t) = with_swap(&vm, 32);
    let balloon = vm.inflate_balloon(frames / 3);
    let p = vm.new_space().unwrap();
    p.map_anon(BASE, 3 * SUPER, Prot::RW).unwrap();
    for i in 0..3 * PAGES {
        if i.is_multiple_of(2) || i >= 2 * PAGES {
            let va = BASE + i * PAGE;
            wrpage(&p, va, tag(va, 1)).unwrap_or_else(|e| panic!("{what}: write {i}: {e}"));
        }
    }
    let c = p.fork().unwrap();
    p.protect(BASE + 400 * PAGE, 300 * PAGE, Prot::READ)
        .unwrap();
    c.wire(BASE + 1000 * PAGE, 64 * PAGE, true).unwrap();
    for i in (0..3 * PAGES).step_by(5) {
        let va = BASE + i * PAGE;
        wrpage(&c, va, tag(va, 2)).unwrap_or_else(|e| panic!("{what}: child write {i}: {e}"));
    }
    squeeze(&vm);
    p.unmap(BASE + 2 * SUPER - 100 * PAGE, 200 * PAGE).unwrap();
    let old = |i: u64| {
        if i.is_multiple_of(2) || i >= 2 * PAGES {
            tag(BASE + i * PAGE, 1)
        } else {
            0
        }
    };
    for i in 0..3 * PAGES {
        let va = BASE + i * PAGE;
        let want_c = if i % 5 == 0 { tag(va, 2) } else { old(i) };
        assert_eq!(rdpage(&c, va), Ok(want_c), "{what}: child page {i}");
        if !(2 * PAGES - 100..2 * PAGES + 100).contains(&i) {
            assert_eq!(rdpage(&p, va), Ok(old(i)), "{what}: parent page {i}");
        }
    }
    assert!(
        p.write_u8(BASE + 500 * PAGE, 1).is_err(),
        "{what}: read-only"
    );
    drop(balloon);
    p.protect(BASE + 400 * PAGE, 300 * PAGE, Prot::RW).unwrap();
    for i in (0..3 * PAGES).step_by(3) {
        let va = BASE + i * PAGE;
        if !(2 * PAGES - 100..2 * PAGES + 100).contains(&i) {
            wrpage(&p, va, tag(va, 3)).unwrap();
        }
    }
    squeeze(&vm);
    for i in (0..3 * PAGES).step_by(5) {
        let va = BASE + i * PAGE;
        assert_eq!(
            rdpage(&c, va),
            Ok(tag(va, 2)),
            "{what}: child at the end {i}"
        );
    }
    consistent(&vm, what);
    c.unwire(BASE + 1000 * PAGE, 64 * PAGE, true).unwrap();
    drop(c);
    drop(p);
    no_leak(&vm, what);
    lists_whole(&vm, what);
    audit(&vm, what);
}

/// [`fork_ops_short`] on both pmaps, Reserve and Always: fork / COW /
/// mprotect / mlock / unmap with a third of memory ballooned away.
#[test]
fn h11_fork_cow_protect_wire_unmap_on_short_unaligned_memory() {
    fork_ops_short(X86Pmap::new(), SuperpagePolicy::Reserve, "x86 reserve");
    fork_ops_short(X86Pmap::new(), SuperpagePolicy::Always, "x86 always");
    fork_ops_short(RefPmap::new(), SuperpagePolicy::Reserve, "ref reserve");
    fork_ops_short(RefPmap::new(), SuperpagePolicy::Always, "ref always");
}

/// All free memory is one held run (the lists empty): two threads each
/// ask for one frame at the same instant. Both must get one (511 are
/// free). The first to find the lists empty releases the run: it turns
/// `RUN_HELD` off and swaps the run's bits before it lists the frames one
/// shard at a time; the other, finding the lists still empty and no run
/// held, gets nothing (`alloc` returns `None` with 512 frames free but in
/// neither place) — a spurious shortage: a balloon comes back short, a
/// fault waits for memory and runs a needless pageout pass.
#[test]
fn h12_two_allocations_racing_the_release_of_the_only_held_run() {
    use std::sync::Barrier;
    let vm = runs_vm(1, SuperpagePolicy::Always);
    let s = vm.new_space().unwrap();
    // The run claimed once (filled, given back whole): the tail's frames
    // are all that is listed; a balloon keeps them.
    s.map_anon(BASE, SUPER, Prot::RW).unwrap();
    s.write_u8(BASE, 1).unwrap();
    assert_eq!(resident(&s, BASE), PAGES);
    s.unmap(BASE, SUPER).unwrap();
    let mut tail = vm.inflate_balloon(TAIL);
    assert_eq!(tail.len(), TAIL);
    let go = Arc::new(Barrier::new(3));
    let done = Arc::new(Barrier::new(3));
    let stop = Arc::new(AtomicBool::new(false));
    let short = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let (vm, go, done, stop, short) = (
            vm.clone(),
            go.clone(),
            done.clone(),
            stop.clone(),
            short.clone(),
        );
        hs.push(std::thread::spawn(move || {
            // One thread starts a little late, by a varying amount, to
            // sweep the other's release.
            let mut rng = Rng::new(t + 12);
            loop {
                go.wait();
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if t == 1 {
                    for _ in 0..rng.below(400) {
                        std::hint::spin_loop();
                    }
                }
                let b = vm.inflate_balloon(1);
                if b.is_empty() {
                    short.fetch_add(1, Ordering::Relaxed);
                }
                done.wait();
                drop(b);
                done.wait();
            }
        }));
    }
    let mut rounds = 0;
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until && short.load(Ordering::Relaxed) == 0 {
        rounds += 1;
        // Claim the run again and give it back whole: held; the tail's
        // frames (room for the whole-superpage fault) back in the balloon:
        // the lists are empty.
        tail.deflate(TAIL);
        s.map_anon(BASE, SUPER, Prot::RW).unwrap();
        s.write_u8(BASE, 1).unwrap();
        assert_eq!(resident(&s, BASE), PAGES, "round {rounds}: claimed whole");
        s.unmap(BASE, SUPER).unwrap();
        assert_eq!(tail.inflate(TAIL), TAIL);
        assert_eq!(vm.free_pages(), PAGES);
        go.wait();
        done.wait();
        done.wait();
    }
    eprintln!("h12: {rounds} rounds");
    stop.store(true, Ordering::Relaxed);
    go.wait();
    for h in hs {
        h.join().unwrap();
    }
    drop(tail);
    drop(s);
    no_leak(&vm, "h12");
    lists_whole(&vm, "h12");
    assert_eq!(
        short.load(Ordering::Relaxed),
        0,
        "h12: an allocation found nothing with {PAGES} frames free (round {rounds})"
    );
}

/// The zeroer's take from a held run against the run's release, nothing
/// else: a one-run machine (its partial tail kept in a balloon, so the
/// lists are empty) whose run is held with 512 plain frames; one thread
/// zeroes a few frames (`take_plain`: clears the run's `RUN_PLAIN`, takes
/// a frame with `take_held`, counts it, then sets `RUN_PLAIN` again),
/// another inflates a balloon of everything (`release_run`: clears
/// `RUN_HELD | RUN_OWNED | RUN_PLAIN`). No frame goes back plain into a
/// held run during the race (the zeroer gives its frames back zero), so a
/// run left unclaimable afterwards can only be the zeroer's re-set of
/// `RUN_PLAIN` landing after the release: the word is then
/// `RUN_WHOLE | RUN_PLAIN` with the run not held — `claim_listed` wants
/// exactly `RUN_WHOLE`, `claim_held` wants `RUN_HELD`, and only a release
/// of a held run clears the hint. Each round starts by claiming the run
/// for a whole superpage.
#[test]
fn h13_zeroer_take_racing_a_release_keeps_the_run_claimable() {
    use std::sync::Barrier;
    let vm = runs_vm(1, SuperpagePolicy::Always);
    let s = vm.new_space().unwrap();
    let mut tail = vm.inflate_balloon(0);
    let go = Arc::new(Barrier::new(3));
    let done = Arc::new(Barrier::new(3));
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    {
        let (vm, go, done, stop) = (vm.clone(), go.clone(), done.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng::new(3);
            loop {
                go.wait();
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                vm.zero_free_pages(8 + rng.below(25));
                done.wait();
                done.wait();
            }
        }));
    }
    {
        let (vm, go, done, stop) = (vm.clone(), go.clone(), done.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng::new(4);
            loop {
                go.wait();
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                for _ in 0..rng.below(1500) {
                    std::hint::spin_loop();
                }
                let b = vm.inflate_balloon(u64::MAX);
                done.wait();
                drop(b);
                done.wait();
            }
        }));
    }
    let until = Instant::now() + Duration::from_secs(15);
    let mut rounds = 0;
    let mut got = PAGES;
    while Instant::now() < until {
        rounds += 1;
        // Room for the whole-superpage fault, then claim the run (its
        // frames all listed) and fill it.
        tail.deflate(TAIL);
        assert_eq!(vm.free_pages(), vm.total_pages());
        s.map_anon(BASE, SUPER, Prot::RW).unwrap();
        s.write_u8(BASE, 1).unwrap();
        got = resident(&s, BASE);
        if got != PAGES {
            break;
        }
        // 512 plain frames back into the held run; the lists emptied.
        s.unmap(BASE, SUPER).unwrap();
        assert_eq!(tail.inflate(TAIL), TAIL);
        go.wait();
        done.wait();
        done.wait();
    }
    stop.store(true, Ordering::Relaxed);
    go.wait();
    for h in hs {
        h.join().unwrap();
    }
    eprintln!("h13: {rounds} rounds");
    drop(tail);
    drop(s);
    no_leak(&vm, "h13");
    lists_whole(&vm, "h13");
    audit(&vm, "h13");
    assert_eq!(
        got, PAGES,
        "h13 round {rounds}: the only run, every frame free and listed, was not claimed"
    );
}

/// Memory oversubscribed four times over on tiny machines (two and three
/// runs, memory off a run boundary), two threads writing and checking
/// their own 2 MiB regions under Reserve and Always, pageout to swap
/// doing the rest: reservations claim runs that pageout empties again,
/// faults and page tables break them when the lists run dry. Every write
/// survives; at rest the books balance and every frame is free once.
fn oversubscribed<P: Pmap + 'static>(vm: Arc<Vm<P>>, what: &str) {
    let (_swap, _t) = with_swap(&vm, 64);
    let total = vm.total_pages();
    let per = (2 * total).div_ceil(PAGES); // 2 MiB regions per thread
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let vm = vm.clone();
        let what = what.to_string();
        hs.push(std::thread::spawn(move || {
            let s = vm.new_space().unwrap();
            let base = BASE + t * 64 * SUPER;
            s.map_anon(base, per * SUPER, Prot::RW).unwrap();
            let mut rng = Rng::new(t + 21);
            let mut want = vec![0u64; (per * PAGES) as usize];
            for round in 1..=2u64 {
                for i in 0..per * PAGES {
                    if rng.pct(50) {
                        let va = base + i * PAGE;
                        wrpage(&s, va, tag(va, round))
                            .unwrap_or_else(|e| panic!("{what}: t{t} write {i}: {e}"));
                        want[i as usize] = tag(va, round);
                    }
                }
                for i in (0..per * PAGES).step_by(3) {
                    let va = base + i * PAGE;
                    assert_eq!(
                        rdpage(&s, va),
                        Ok(want[i as usize]),
                        "{what}: t{t} round {round} page {i}"
                    );
                }
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    quiet_checks(&vm, what);
}

/// [`oversubscribed`] on two- and three-run machines off a run boundary,
/// both pmaps: held runs emptied by pageout and broken by faults.
#[test]
fn h14_oversubscribed_tiny_machines_with_swap() {
    for (runs, policy, what) in [
        (2, SuperpagePolicy::Reserve, "2 runs reserve"),
        (3, SuperpagePolicy::Always, "3 runs always"),
    ] {
        let frames = 100 + runs * PAGES + 60;
        oversubscribed(
            vm_at(X86Pmap::new(), 412, frames, cfg(frames, policy)),
            &format!("x86 {what}"),
        );
        oversubscribed(
            vm_at(RefPmap::new(), 412, frames, cfg(frames, policy)),
            &format!("ref {what}"),
        );
    }
}
