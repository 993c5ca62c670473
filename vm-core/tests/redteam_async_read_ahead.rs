//! Red team of asynchronous read-ahead (commit 0499376): a background read
//! in flight (held by a `Manual` executor, run at the moment the test
//! chooses) combined with termination, truncation and regrowth, unmap /
//! remap / protect, fork with copy-on-write, pageout, the space or the
//! whole machine going away, collapse, wiring, holds, misbehaving pagers,
//! shared writable mappings with msync, fault-around policies, an inline
//! executor and the default thread pool. Every byte read is checked
//! against the pager's pattern; every test ends with a consistency check
//! (nothing left busy) and runs under a watchdog.
//!
//! Written against commit 0499376; adapted since to the marker on a
//! window's first page (page 1 for the first window) and to asynchronous
//! read-ahead being opt-in (`cfg` turns it on).
//!
//! Found and fixed: `pool_threads_killed_by_a_panicking_pager_strand_queued_reads`
//! (when both `IoThreads` workers died in panicking pager calls, the jobs
//! queued in the channel were dropped unrun with their pages busy forever).
//! The workers now catch a job's panic, and a job dropped without running
//! frees its pages (`async_read_ahead.rs::a_job_dropped_without_running_releases_its_pages`).
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use vm_core::io_executor::IoJob;
use vm_core::{
    Contiguity, FaultAround, IoExecutor, MapRequest, PageFlags, PagerKind, Prot, Signal, Vm,
    VmConfig, VmObject, VmSpace,
};
use vm_testkit::support::ManualExecutor as Manual;
use vm_testkit::support::{bounded, scaled_secs};
use vm_testkit::{Injected, MemPager, RefPmap, pattern_byte};

// ---------------------------------------------------------------- helpers

/// Joins `h` within `secs` seconds or panics.
fn join_within<T: Send + 'static>(h: std::thread::JoinHandle<T>, secs: u64, what: &str) -> T {
    let t0 = Instant::now();
    while !h.is_finished() {
        assert!(
            t0.elapsed() < scaled_secs(secs),
            "deadlock: {what} did not finish within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    match h.join() {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
}

/// Runs a manual executor's jobs every millisecond until dropped.
struct Pump(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Pump {
    fn start(m: Arc<Manual>) -> Pump {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let h = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                m.run_all();
                std::thread::sleep(Duration::from_millis(1));
            }
            m.run_all();
        });
        Pump(stop, Some(h))
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
        if let Some(h) = self.1.take() {
            let _ = h.join();
        }
    }
}

/// An executor that runs each job on the caller's thread, at once (the
/// trait allows it).
struct Inline;

impl IoExecutor for Inline {
    fn execute(&self, job: IoJob) {
        job();
    }
}

fn cfg(pages: u64) -> VmConfig {
    VmConfig {
        async_read_ahead: true,
        memory_wait_ms: 1,
        memory_retries: 500,
        ..vm_testkit::test_config(pages)
    }
}

fn big_pager(kind: PagerKind, pages: u64) -> Arc<MemPager> {
    let pager = Arc::new(MemPager::with_pattern(kind, pages));
    pager.set_contiguity(Contiguity {
        behind: 255,
        ahead: 255,
    });
    pager
}

struct Setup {
    vm: Arc<Vm<RefPmap>>,
    space: Arc<VmSpace<RefPmap>>,
    pager: Arc<MemPager>,
    obj: Arc<VmObject>,
    manual: Arc<Manual>,
}

/// A machine of `mem` pages with a manual executor and a `pages`-page
/// file mapped at `BASE` with `prot` (private if asked).
fn setup_with(config: VmConfig, pages: u64, prot: Prot, private: bool) -> Setup {
    let vm = Vm::new(RefPmap::new(), config).unwrap();
    let manual = Arc::new(Manual::default());
    vm.set_io_executor(Some(manual.clone()));
    let space = Arc::new(vm.new_space().unwrap());
    let pager = big_pager(PagerKind::FILE, pages);
    let obj = vm.new_object(pages, pager.clone());
    let mut req = MapRequest::object(BASE, pages * PAGE, obj.clone(), 0, prot);
    if private {
        req = req.private();
    }
    space.map(req).unwrap();
    Setup {
        vm,
        space,
        pager,
        obj,
        manual,
    }
}

fn setup(pages: u64) -> Setup {
    setup_with(cfg(4096), pages, Prot::READ, false)
}

/// Reads the whole page `p` at `base` and checks every byte against the
/// pattern of object page `p + shift`.
fn page_ok_at(space: &VmSpace<RefPmap>, base: u64, p: u64, shift: u64) {
    let mut buf = vec![0u8; PAGE as usize];
    space
        .read(base + p * PAGE, &mut buf)
        .unwrap_or_else(|e| panic!("page {p}: {e}"));
    for (o, &b) in buf.iter().enumerate() {
        assert_eq!(
            b,
            pattern_byte(p + shift, o),
            "page {p} byte {o}: shows another page's or stale bytes"
        );
    }
}

fn page_ok(space: &VmSpace<RefPmap>, p: u64) {
    page_ok_at(space, BASE, p, 0);
}

/// The first window (0..=15, marker 8) read synchronously, then the
/// marker hit: the window 16..48 (marker 32) is queued on the manual
/// executor and busy in the object.
fn start_background(s: &Setup) {
    page_ok(&s.space, 0);
    assert_eq!(s.manual.pending(), 0);
    let marker = s.obj.resident_page(1).expect("page 1 read ahead");
    assert!(
        s.vm.page(marker).flags().contains(PageFlags::READAHEAD),
        "the first window marks its first read-ahead page"
    );
    page_ok(&s.space, 1);
    assert_eq!(s.manual.pending(), 1, "the marker queued a background read");
    let id = s.obj.resident_page(20).expect("allocated for the read");
    assert!(s.vm.page(id).is_busy());
}

fn in_flight_range(s: &Setup) -> Vec<u64> {
    (9..200)
        .filter(|&p| {
            s.obj
                .resident_page(p)
                .is_some_and(|id| s.vm.page(id).is_busy())
        })
        .collect()
}

fn fill(byte: u8) -> Vec<u8> {
    vec![byte; PAGE as usize]
}

// ---------------------------------------------------------------- tests

/// terminate_object with a background read queued waits for it (paging
/// in progress) and then leaves nothing: every page gone, faults fail,
/// the machine is consistent.
#[test]
fn terminate_waits_for_a_queued_read_and_leaves_nothing() {
    bounded(15, || {
        let s = setup(256);
        start_background(&s);
        let (vm, obj) = (s.vm.clone(), s.obj.clone());
        let t = std::thread::spawn(move || vm.terminate_object(&obj));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!t.is_finished(), "terminate waits for the read in flight");
        assert_eq!(s.manual.run_all(), 1);
        join_within(t, 5, "terminate_object");
        assert!(s.obj.is_dead());
        assert!(
            s.obj.resident_between(0, u64::MAX).is_empty(),
            "a dead object keeps no page"
        );
        for p in [0u64, 8, 20, 40, 100] {
            assert!(s.space.read_u8(BASE + p * PAGE).is_err(), "page {p}");
        }
        assert_eq!(s.manual.pending(), 0, "a dead object starts no read");
        consistent(&s.vm);
    });
}

/// Truncation into a window in flight, then regrowth and new file
/// contents: after the regrow, no page shows what the pager held before
/// the truncation (the old pattern) where it now holds new bytes.
#[test]
fn truncate_and_regrow_around_a_read_in_flight() {
    bounded(15, || {
        let s = setup(256);
        start_background(&s);
        let (vm, obj) = (s.vm.clone(), s.obj.clone());
        let t = std::thread::spawn(move || vm.resize_object(&obj, 24));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!t.is_finished());
        s.manual.run_all();
        join_within(t, 5, "resize_object");
        assert!(s.obj.resident_between(24, u64::MAX).is_empty());
        assert!(matches!(
            s.space.read_u8(BASE + 30 * PAGE).unwrap_err().signal(),
            Signal::Bus(_)
        ));
        // The file is rewritten past the old end, then grows again.
        for p in 24..256 {
            s.pager.put(p, &fill(0x5A));
        }
        s.vm.resize_object(&s.obj, 256);
        for p in 0..24 {
            page_ok(&s.space, p);
            s.manual.run_all();
        }
        let mut buf = vec![0u8; PAGE as usize];
        for p in 24..256 {
            s.space.read(BASE + p * PAGE, &mut buf).unwrap();
            assert!(
                buf.iter().all(|&b| b == 0x5A),
                "page {p} after regrow shows stale bytes"
            );
            s.manual.run_all();
        }
        s.manual.run_all();
        consistent(&s.vm);
    });
}

/// Truncated below the window in flight's start before the job runs and
/// regrown before it runs too: the job's pages (allocated while they were
/// inside the object) settle; the pages between are read fresh.
#[test]
fn truncate_below_and_regrow_before_the_job_runs() {
    bounded(15, || {
        let s = setup(256);
        page_ok(&s.space, 0);
        // Truncate to 20 before the marker is hit: the window is cut at 20.
        s.vm.resize_object(&s.obj, 20);
        page_ok(&s.space, 1);
        assert_eq!(s.manual.pending(), 1);
        assert!(
            s.obj.resident_between(20, u64::MAX).is_empty(),
            "the background window stays inside the object"
        );
        // Grow again and change the bytes past 20 before the job runs.
        for p in 20..256 {
            s.pager.put(p, &fill(0xC3));
        }
        s.vm.resize_object(&s.obj, 256);
        s.manual.run_all();
        for p in 0..20 {
            page_ok(&s.space, p);
            s.manual.run_all();
        }
        let mut buf = vec![0u8; PAGE as usize];
        for p in 20..256 {
            s.space.read(BASE + p * PAGE, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0xC3), "page {p}");
            s.manual.run_all();
        }
        consistent(&s.vm);
    });
}

/// Unmapped while the read is in flight, then remapped at another address
/// and offset: the settled pages serve the new mapping with the right
/// bytes.
#[test]
fn unmap_and_remap_while_in_flight() {
    bounded(15, || {
        let s = setup(256);
        start_background(&s);
        let busy = in_flight_range(&s);
        assert!(!busy.is_empty());
        s.space.unmap(BASE, 256 * PAGE).unwrap();
        assert_eq!(s.manual.run_all(), 1);
        let base2 = 0x2000_0000;
        s.space
            .map(MapRequest::object(
                base2,
                200 * PAGE,
                s.obj.clone(),
                16 * PAGE,
                Prot::READ,
            ))
            .unwrap();
        for p in 0..200 {
            page_ok_at(&s.space, base2, p, 16);
            s.manual.run_all();
        }
        // And again where it was, while a new read is queued.
        s.space
            .map(MapRequest::object(
                BASE,
                256 * PAGE,
                s.obj.clone(),
                0,
                Prot::READ,
            ))
            .unwrap();
        for p in (0..256).rev() {
            page_ok(&s.space, p);
        }
        s.manual.run_all();
        consistent(&s.vm);
    });
}

/// Protected to nothing while the read is in flight: accesses fault
/// SEGV, the read settles, and restored protection shows the right bytes.
#[test]
fn protect_while_in_flight() {
    bounded(15, || {
        let s = setup(256);
        start_background(&s);
        s.space.protect(BASE, 256 * PAGE, Prot::NONE).unwrap();
        for p in [0u64, 8, 20, 40] {
            let e = s.space.read_u8(BASE + p * PAGE).unwrap_err();
            assert!(matches!(e.signal(), Signal::Segv(_)), "page {p}: {e}");
        }
        s.manual.run_all();
        s.space.protect(BASE, 256 * PAGE, Prot::READ).unwrap();
        for p in 0..256 {
            page_ok(&s.space, p);
            s.manual.run_all();
        }
        consistent(&s.vm);
    });
}

/// A private file mapping with a read in flight is forked; parent and
/// child then write pages (copy-on-write), including pages of the window
/// in flight (they wait for it). Each sees its own writes and the file's
/// bytes elsewhere; the file is never written.
#[test]
fn fork_with_cow_writes_while_in_flight() {
    bounded(15, || {
        let s = setup_with(cfg(4096), 256, Prot::RW, true);
        start_background(&s);
        let child = Arc::new(s.space.fork().unwrap());
        // The parent writes page 20 (in flight): it waits for the read.
        let sp = s.space.clone();
        let w = std::thread::spawn(move || sp.write(BASE + 20 * PAGE, &fill(0x11)).unwrap());
        let ch = child.clone();
        let w2 = std::thread::spawn(move || ch.write(BASE + 30 * PAGE, &fill(0x22)).unwrap());
        std::thread::sleep(Duration::from_millis(30));
        assert!(!w.is_finished() && !w2.is_finished(), "writers wait");
        s.manual.run_all();
        join_within(w, 5, "parent write");
        join_within(w2, 5, "child write");
        s.space.write(BASE + 3 * PAGE, &fill(0x33)).unwrap();
        child.write(BASE + 40 * PAGE, &fill(0x44)).unwrap();
        let mut buf = vec![0u8; PAGE as usize];
        for p in 0..256u64 {
            for (who, sp) in [("parent", &*s.space), ("child", &*child)] {
                let mine = match (who, p) {
                    ("parent", 20) => Some(0x11),
                    ("parent", 3) => Some(0x33),
                    ("child", 30) => Some(0x22),
                    ("child", 40) => Some(0x44),
                    _ => None,
                };
                sp.read(BASE + p * PAGE, &mut buf).unwrap();
                match mine {
                    Some(v) => assert!(buf.iter().all(|&b| b == v), "{who} page {p}"),
                    None => {
                        for (o, &b) in buf.iter().enumerate() {
                            assert_eq!(b, pattern_byte(p, o), "{who} page {p} byte {o}");
                        }
                    }
                }
                s.manual.run_all();
            }
        }
        for p in [3u64, 20, 30, 40] {
            let stored = s.pager.stored(p).unwrap();
            assert_eq!(stored[0], pattern_byte(p, 0), "the file is not written");
        }
        drop(child);
        s.manual.run_all();
        consistent(&s.vm);
    });
}

/// Memory pressure: the pageout scan runs with a read in flight (its
/// pages are busy, not on a queue); it must leave them, and the reader
/// gets the right bytes afterwards. Then a whole scan under pressure on a
/// small machine.
#[test]
fn pageout_under_pressure_while_in_flight() {
    bounded(15, || {
        let s = setup_with(cfg(160), 1024, Prot::READ, false);
        start_background(&s);
        let busy = in_flight_range(&s);
        let ids: Vec<_> = busy
            .iter()
            .map(|&p| s.obj.resident_page(p).unwrap())
            .collect();
        let r = s.vm.pageout(s.vm.total_pages());
        assert!(r.freed > 0, "the clean first window is reclaimable: {r:?}");
        for (&p, &id) in busy.iter().zip(&ids) {
            assert_eq!(s.obj.resident_page(p), Some(id), "busy page {p} kept");
            assert!(s.vm.page(id).is_busy());
        }
        s.manual.run_all();
        for p in 0..1024 {
            page_ok(&s.space, p);
            if p % 7 == 0 {
                s.manual.run_all();
            }
            if p % 50 == 0 {
                s.vm.pageout(s.vm.total_pages());
            }
        }
        s.manual.run_all();
        consistent(&s.vm);
    });
}

/// The space that started the read is dropped before the job runs.
#[test]
fn space_dropped_before_the_job_runs() {
    bounded(15, || {
        let s = setup(256);
        start_background(&s);
        let Setup {
            vm,
            space,
            pager: _pager,
            obj,
            manual,
        } = s;
        drop(space);
        assert_eq!(manual.run_all(), 1);
        let space = vm.new_space().unwrap();
        space
            .map(MapRequest::object(
                BASE,
                256 * PAGE,
                obj.clone(),
                0,
                Prot::READ,
            ))
            .unwrap();
        let calls = vm.counters().snapshot().v_pager_calls;
        for p in 16..48 {
            page_ok(&space, p);
        }
        assert_eq!(
            vm.counters().snapshot().v_pager_calls,
            calls,
            "the settled window serves the new space"
        );
        manual.run_all();
        consistent(&vm);
    });
}

/// The whole machine (every space, object and the Vm) goes away while the
/// manual executor still holds the job; then the job runs: no crash.
#[test]
fn whole_vm_dropped_before_the_job_runs() {
    bounded(15, || {
        let s = setup(256);
        start_background(&s);
        let Setup {
            vm,
            space,
            pager,
            obj,
            manual,
        } = s;
        let weak = Arc::downgrade(&vm);
        drop(space);
        drop(obj);
        drop(vm);
        assert!(weak.upgrade().is_none(), "the Vm is gone");
        assert_eq!(manual.pending(), 1);
        assert_eq!(manual.run_all(), 1, "the job runs after the Vm is gone");
        assert_eq!(pager.calls().len(), 2, "and it read");
    });
}

/// Same with the machine's private pool (the default executor): the
/// pager is paused inside the background read while everything is
/// dropped, then resumed.
#[test]
fn whole_vm_dropped_while_the_pool_reads() {
    bounded(15, || {
        let vm = Vm::new(RefPmap::new(), cfg(4096)).unwrap();
        let space = vm.new_space().unwrap();
        let pager = big_pager(PagerKind::FILE, 256);
        let obj = vm.new_object(256, pager.clone());
        space
            .map(MapRequest::object(
                BASE,
                256 * PAGE,
                obj.clone(),
                0,
                Prot::READ,
            ))
            .unwrap();
        page_ok(&space, 0);
        let pause = pager.pause_next();
        page_ok(&space, 1);
        assert_eq!(pause.wait_started(), 16);
        drop(space);
        drop(obj);
        drop(vm);
        pause.resume();
        // The job finishes on the pool: wait until the pager is the only
        // owner again (the job dropped its clone).
        let t0 = Instant::now();
        while Arc::strong_count(&pager) > 1 {
            assert!(t0.elapsed() < scaled_secs(5), "job never ended");
            std::thread::sleep(Duration::from_millis(2));
        }
    });
}

/// A SwapProvider backed by MemPagers (anonymous objects become backed by
/// a MemPager of kind ANONYMOUS with big contiguity on their first
/// page-out).
struct MemSwap(Mutex<Vec<Arc<MemPager>>>);

impl vm_core::SwapProvider for MemSwap {
    fn pager_for(&self, _pages: u64) -> Option<Arc<dyn vm_core::Pager>> {
        let p = Arc::new(MemPager::new(PagerKind::ANONYMOUS));
        p.set_contiguity(Contiguity {
            behind: 255,
            ahead: 255,
        });
        self.0.lock().unwrap().push(p.clone());
        Some(p)
    }
}

fn anon_byte(p: u64, o: usize, tag: u8) -> u8 {
    (p as u8).wrapping_mul(7) ^ (o as u8) ^ tag
}

fn write_anon(space: &VmSpace<RefPmap>, base: u64, p: u64, tag: u8) {
    let buf: Vec<u8> = (0..PAGE as usize).map(|o| anon_byte(p, o, tag)).collect();
    space.write(base + p * PAGE, &buf).unwrap();
}

fn check_anon(space: &VmSpace<RefPmap>, base: u64, p: u64, tag: u8, who: &str) {
    let mut buf = vec![0u8; PAGE as usize];
    space.read(base + p * PAGE, &mut buf).unwrap();
    for (o, &b) in buf.iter().enumerate() {
        assert_eq!(b, anon_byte(p, o, tag), "{who}: page {p} byte {o}");
    }
}

/// Anonymous memory paged out to swap, then a fork and a sequential read
/// in the child: the background swap-in runs in the shared backing
/// object. The child exits; collapse of the parent's chain must not merge
/// while the read is in flight, and merges after it; data stays right.
#[test]
fn collapse_with_a_background_swap_in_in_flight() {
    bounded(15, || {
        let vm = Vm::new(RefPmap::new(), cfg(4096)).unwrap();
        let manual = Arc::new(Manual::default());
        vm.set_io_executor(Some(manual.clone()));
        vm.set_swap(Arc::new(MemSwap(Mutex::new(Vec::new()))));
        let space = vm.new_space().unwrap();
        let n = 200u64;
        space.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        for p in 0..n {
            write_anon(&space, BASE, p, 0);
        }
        // Everything to swap.
        let r = vm.pageout(vm.total_pages());
        assert!(r.laundered >= n, "{r:?}");
        let (anon, _) = space.object_at(BASE).unwrap();
        assert!(anon.resident_between(0, u64::MAX).is_empty());
        // A live handle would keep the object from being merged.
        drop(anon);
        let child = space.fork().unwrap();
        // Both write a page: each gets a shadow over the swap-backed object.
        write_anon(&space, BASE, 0, 0x80);
        write_anon(&child, BASE, n - 1, 0x40);
        let (top, _) = space.object_at(BASE).unwrap();
        assert!(top.backing().is_some(), "the parent has a shadow");
        // The child reads sequentially: windows, then the marker.
        let mut started = false;
        for p in 0..n {
            let tag = if p == n - 1 { 0x40 } else { 0 };
            check_anon(&child, BASE, p, tag, "child");
            if manual.pending() > 0 {
                started = true;
                break;
            }
        }
        assert!(started, "a background swap-in was started");
        drop(child);
        // The parent's chain: its shadow and the object below.
        let merged_during = vm.collapse(&top);
        assert_eq!(merged_during, 0, "no merge while a read is in flight below");
        manual.run_all();
        let merged_after = vm.collapse(&top);
        assert_eq!(
            merged_after, 1,
            "the child's exit left the backing object mergeable"
        );
        for p in 0..n {
            let tag = if p == 0 { 0x80 } else { 0 };
            check_anon(&space, BASE, p, tag, "parent");
            manual.run_all();
        }
        // Writes after all that land where they should.
        for p in (0..n).step_by(3) {
            write_anon(&space, BASE, p, 0x80);
        }
        for p in 0..n {
            let tag = if p % 3 == 0 || p == 0 { 0x80 } else { 0 };
            check_anon(&space, BASE, p, tag, "parent after writes");
            manual.run_all();
        }
        manual.run_all();
        consistent(&vm);
    });
}

/// Wiring a range whose pages are in flight waits for the read, then
/// wires the read pages; data is right; unwiring leaves a consistent
/// machine.
#[test]
fn wire_a_range_in_flight() {
    bounded(15, || {
        let s = setup(256);
        start_background(&s);
        let sp = s.space.clone();
        let t = std::thread::spawn(move || sp.wire(BASE + 10 * PAGE, 40 * PAGE, true));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!t.is_finished(), "wiring waits for the busy pages");
        // Wiring faults the next marker too (page 32), whose window it
        // then waits for: run jobs until it is done.
        let pump = Pump::start(s.manual.clone());
        join_within(t, 5, "wire").unwrap();
        drop(pump);
        for p in 10..50 {
            let id = s.obj.resident_page(p).unwrap();
            assert!(s.vm.page(id).wire_count() > 0, "page {p} wired");
            page_ok(&s.space, p);
        }
        s.manual.run_all();
        consistent(&s.vm);
        s.space.unwire(BASE + 10 * PAGE, 40 * PAGE, true).unwrap();
        for p in 0..256 {
            page_ok(&s.space, p);
            s.manual.run_all();
        }
        consistent(&s.vm);
    });
}

/// space.hold of pages in flight waits for the read and holds the right
/// bytes; pageout cannot take held pages.
#[test]
fn hold_pages_in_flight() {
    bounded(15, || {
        let s = setup(256);
        start_background(&s);
        let sp = s.space.clone();
        let t = std::thread::spawn(move || sp.hold(BASE + 14 * PAGE, 30 * PAGE, Prot::READ));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!t.is_finished());
        s.manual.run_all();
        let held = join_within(t, 5, "hold").unwrap();
        s.vm.pageout(s.vm.total_pages());
        let mut buf = vec![0u8; PAGE as usize];
        for i in 0..30u64 {
            held.read(i as usize * PAGE as usize, &mut buf).unwrap();
            for (o, &b) in buf.iter().enumerate() {
                assert_eq!(b, pattern_byte(14 + i, o), "held page {}", 14 + i);
            }
        }
        drop(held);
        s.manual.run_all();
        consistent(&s.vm);
    });
}

/// A pager answering the background read with nonsense (success, nothing
/// filled): every page of the window is freed and later read right.
#[test]
fn nonsense_answer_to_a_background_read() {
    bounded(15, || {
        let s = setup(256);
        start_background(&s);
        s.pager.inject(Injected::Nonsense);
        s.manual.run_all();
        assert!(
            s.obj.resident_between(16, 48).is_empty(),
            "nothing the pager did not fill stays"
        );
        for p in 0..256 {
            page_ok(&s.space, p);
            s.manual.run_all();
        }
        consistent(&s.vm);
    });
}

/// A pager that, when armed for the next call, fills whole frames with
/// junk and marks only the first half of each page valid with the right
/// bytes (a partial read that leaves junk): the junk must never show.
struct HalfJunk {
    inner: MemPager,
    armed: AtomicUsize,
}

impl vm_core::Pager for HalfJunk {
    fn kind(&self) -> PagerKind {
        self.inner.kind()
    }
    fn has_page(&self, pindex: u64) -> Option<Contiguity> {
        self.inner.has_page(pindex)
    }
    fn get_pages(
        &self,
        pages: &mut [vm_core::PageSlot<'_>],
        reqpage: usize,
    ) -> Result<(), vm_core::PagerError> {
        if self.armed.load(Ordering::SeqCst) == 0 {
            return self.inner.get_pages(pages, reqpage);
        }
        self.armed.fetch_sub(1, Ordering::SeqCst);
        for s in pages.iter_mut() {
            let p = s.pindex();
            s.frame().fill(0, PAGE as usize, 0xEE);
            let half: Vec<u8> = (0..PAGE as usize / 2).map(|o| pattern_byte(p, o)).collect();
            s.write(0, &half);
            s.set_valid(0x0F);
        }
        Ok(())
    }
}

/// Background read returning partial validity with junk in the rest:
/// whoever reads a page sees the file's bytes (re-read) or zeros, never
/// the junk; fault-around never maps a partial page.
#[test]
fn partial_validity_with_junk_from_a_background_read() {
    for fa in [
        FaultAround::Window(16),
        FaultAround::Outward(4),
        FaultAround::Off,
    ] {
        bounded(15, move || {
            let vm = Vm::new(
                RefPmap::new(),
                VmConfig {
                    fault_around: fa,
                    ..cfg(4096)
                },
            )
            .unwrap();
            let manual = Arc::new(Manual::default());
            vm.set_io_executor(Some(manual.clone()));
            let space = vm.new_space().unwrap();
            let inner = MemPager::with_pattern(PagerKind::FILE, 256);
            inner.set_contiguity(Contiguity {
                behind: 255,
                ahead: 255,
            });
            let pager = Arc::new(HalfJunk {
                inner,
                armed: AtomicUsize::new(0),
            });
            let obj = vm.new_object(256, pager.clone());
            space
                .map(MapRequest::object(
                    BASE,
                    256 * PAGE,
                    obj.clone(),
                    0,
                    Prot::READ,
                ))
                .unwrap();
            page_ok(&space, 0);
            page_ok(&space, 1);
            assert_eq!(manual.pending(), 1, "{fa:?}");
            pager.armed.store(1, Ordering::SeqCst);
            manual.run_all();
            let partial = obj.resident_page(20).expect("partial page kept");
            assert_eq!(vm.page(partial).valid(), 0x0F, "{fa:?}");
            vm.check_consistency()
                .unwrap_or_else(|e| panic!("{fa:?}: {e}"));
            // Faults around the partial pages (the earlier ones) must not map
            // them; reads of them re-read.
            let mut buf = vec![0u8; PAGE as usize];
            for p in (0..64).rev() {
                space.read(BASE + p * PAGE, &mut buf).unwrap();
                for (o, &b) in buf.iter().enumerate() {
                    assert!(
                        b == pattern_byte(p, o),
                        "{fa:?}: page {p} byte {o} is {b:#x}"
                    );
                }
                manual.run_all();
            }
            for p in 64..256 {
                page_ok(&space, p);
                manual.run_all();
            }
            manual.run_all();
            consistent(&vm);
        });
    }
}

/// A background read that fails with an I/O error, then the faulting
/// reader's own read fails too (SIGBUS), then all is read right.
#[test]
fn failing_background_read_then_failing_fault() {
    bounded(15, || {
        let s = setup(256);
        start_background(&s);
        s.pager.inject(Injected::Fail(MemPager::io_error()));
        s.manual.run_all();
        assert!(s.obj.resident_between(16, 48).is_empty());
        s.pager.inject(Injected::Fail(MemPager::io_error()));
        let e = s.space.read_u8(BASE + 32 * PAGE).unwrap_err();
        assert!(matches!(e.signal(), Signal::Bus(_)), "{e}");
        for p in 0..256 {
            page_ok(&s.space, p);
            s.manual.run_all();
        }
        consistent(&s.vm);
    });
}

/// Many threads scan the same mapping and their own mappings of the same
/// and of other objects, on the default pool, with a slow pager; every
/// byte is checked.
#[test]
fn many_threads_scan_on_the_real_pool() {
    bounded(19, || {
        let vm = Vm::new(RefPmap::new(), cfg(3000)).unwrap();
        let pages = 1024u64;
        let pa = big_pager(PagerKind::FILE, pages);
        let pb = big_pager(PagerKind::FILE, pages);
        pa.set_delay(Some(Duration::from_micros(200)));
        pb.set_delay(Some(Duration::from_micros(300)));
        let oa = vm.new_object(pages, pa.clone());
        let ob = vm.new_object(pages, pb.clone());
        let shared = Arc::new(vm.new_space().unwrap());
        shared
            .map(MapRequest::object(
                BASE,
                pages * PAGE,
                oa.clone(),
                0,
                Prot::READ,
            ))
            .unwrap();
        let start = Arc::new(Barrier::new(6));
        let mut hs = Vec::new();
        for t in 0..6u64 {
            let (vm, oa, ob, shared, start) = (
                vm.clone(),
                oa.clone(),
                ob.clone(),
                shared.clone(),
                start.clone(),
            );
            hs.push(std::thread::spawn(move || {
                let own = vm.new_space().unwrap();
                let obj = if t % 2 == 0 { oa } else { ob };
                // Own mapping at an offset of 64 pages.
                own.map(MapRequest::object(
                    BASE,
                    (pages - 64) * PAGE,
                    obj,
                    64 * PAGE,
                    Prot::READ,
                ))
                .unwrap();
                start.wait();
                let mut buf = vec![0u8; PAGE as usize];
                for round in 0..2 {
                    let (sp, n, shift): (&VmSpace<RefPmap>, u64, u64) = if (t + round) % 2 == 0 {
                        (&shared, pages, 0)
                    } else {
                        (&own, pages - 64, 64)
                    };
                    for p in 0..n {
                        sp.read(BASE + p * PAGE, &mut buf).unwrap();
                        for (o, &b) in buf.iter().enumerate().step_by(97) {
                            assert_eq!(b, pattern_byte(p + shift, o), "t{t} page {p}");
                        }
                        assert_eq!(
                            buf[PAGE as usize - 1],
                            pattern_byte(p + shift, PAGE as usize - 1)
                        );
                    }
                    if t == 5 {
                        vm.pageout(vm.total_pages());
                    }
                }
            }));
        }
        for h in hs {
            join_within(h, 18, "scanner");
        }
        vm.wait_for_background_io();
        assert!(vm.counters().snapshot().v_async_reads > 0);
        consistent(&vm);
    });
}

/// Markers in a shared writable mapping that then get written: the write
/// fault on a marker starts the next window; writes to pages in flight
/// wait; msync writes exactly the written pages with their bytes.
#[test]
fn markers_written_in_a_shared_mapping_and_msync() {
    bounded(15, || {
        let s = setup_with(cfg(4096), 256, Prot::RW, false);
        page_ok(&s.space, 0);
        // Write the marker page 1: the background read of 16..48 starts.
        s.space.write(BASE + PAGE, &fill(0x81)).unwrap();
        assert_eq!(
            s.manual.pending(),
            1,
            "a write fault on a marker reads ahead"
        );
        let sp = s.space.clone();
        let w = std::thread::spawn(move || sp.write(BASE + 32 * PAGE, &fill(0x82)).unwrap());
        std::thread::sleep(Duration::from_millis(30));
        assert!(!w.is_finished());
        s.manual.run_all();
        join_within(w, 5, "write to the page in flight");
        // 32 was the next marker: that write started the next window.
        s.manual.run_all();
        s.space.write(BASE + 40 * PAGE, &fill(0x83)).unwrap();
        s.manual.run_all();
        let written = s.space.msync(BASE, 256 * PAGE).unwrap();
        assert!(written >= 3, "{written}");
        for p in 0..256u64 {
            let stored = s.pager.stored(p).unwrap();
            let want: Option<u8> = match p {
                1 => Some(0x81),
                32 => Some(0x82),
                40 => Some(0x83),
                _ => None,
            };
            match want {
                Some(v) => assert!(stored.iter().all(|&b| b == v), "stored page {p}"),
                None => assert!(
                    stored
                        .iter()
                        .enumerate()
                        .all(|(o, &b)| b == pattern_byte(p, o)),
                    "stored page {p} was written"
                ),
            }
        }
        let puts: Vec<u64> = s.pager.puts().into_iter().flatten().collect();
        let mut puts_sorted = puts.clone();
        puts_sorted.sort_unstable();
        assert_eq!(puts_sorted, vec![1, 32, 40], "only the written pages");
        for p in 0..256 {
            let mut buf = vec![0u8; PAGE as usize];
            s.space.read(BASE + p * PAGE, &mut buf).unwrap();
            match p {
                1 => assert!(buf.iter().all(|&b| b == 0x81)),
                32 => assert!(buf.iter().all(|&b| b == 0x82)),
                40 => assert!(buf.iter().all(|&b| b == 0x83)),
                _ => assert!(
                    buf.iter()
                        .enumerate()
                        .all(|(o, &b)| b == pattern_byte(p, o)),
                    "page {p}"
                ),
            }
            s.manual.run_all();
        }
        consistent(&s.vm);
    });
}

/// A marker page paged out (freed) and read back: the frame's flags are
/// clean when reused (a zero-fill page is no marker), the scan goes on
/// right.
#[test]
fn marker_paged_out_and_read_back() {
    bounded(15, || {
        let s = setup_with(cfg(256), 256, Prot::READ, false);
        page_ok(&s.space, 0);
        let marker = s.obj.resident_page(1).unwrap();
        assert!(s.vm.page(marker).flags().contains(PageFlags::READAHEAD));
        let r = s.vm.pageout(s.vm.total_pages());
        assert!(r.freed > 0);
        assert!(
            s.obj.resident_page(1).is_none(),
            "the marker page was freed"
        );
        // Take every free frame for anonymous memory: none is a marker.
        let anon = 0x4000_0000;
        let n = s.vm.free_pages();
        s.space.map_anon(anon, n * PAGE, Prot::RW).unwrap();
        let (aobj, _) = {
            s.space.write_u8(anon, 1).unwrap();
            s.space.object_at(anon).unwrap()
        };
        for i in 1..n {
            if s.space.write_u8(anon + i * PAGE, 1).is_err() {
                break;
            }
        }
        for pi in aobj.resident_between(0, u64::MAX) {
            let id = aobj.resident_page(pi).unwrap();
            assert!(
                !s.vm.page(id).flags().contains(PageFlags::READAHEAD),
                "a zero-fill page carries a stale read-ahead marker"
            );
        }
        // A live handle would keep the pages (and the memory) after unmap.
        drop(aobj);
        s.space.unmap(anon, n * PAGE).unwrap();
        for p in 0..256 {
            page_ok(&s.space, p);
            s.manual.run_all();
        }
        s.manual.run_all();
        consistent(&s.vm);
    });
}

/// FaultAround::Off and Outward(4): the marker page is never mapped
/// before it is accessed, every window after the first is read in the
/// background, and the bytes are right.
#[test]
fn fault_around_off_and_outward() {
    for fa in [
        FaultAround::Off,
        FaultAround::Outward(4),
        FaultAround::Outward(64),
    ] {
        bounded(15, move || {
            let s = setup_with(
                VmConfig {
                    fault_around: fa,
                    ..cfg(4096)
                },
                1024,
                Prot::READ,
                false,
            );
            page_ok(&s.space, 0);
            let mut markers = 0;
            for p in 1..1024u64 {
                // A marker page is never mapped before it is accessed.
                if let Some(id) = s.obj.resident_page(p)
                    && s.vm.page(id).flags().contains(PageFlags::READAHEAD)
                {
                    markers += 1;
                    assert!(
                        s.space.extract(BASE + p * PAGE).is_none(),
                        "{fa:?}: marker {p} mapped"
                    );
                }
                page_ok(&s.space, p);
                s.manual.run_all();
            }
            assert!(markers >= 5, "{fa:?}: markers {markers}");
            let c = s.vm.counters().snapshot();
            assert_eq!(c.v_io_faults, 1, "{fa:?}: {c:?}");
            consistent(&s.vm);
        });
    }
}

/// An executor that runs the job on the faulting thread (allowed by the
/// IoExecutor contract): no deadlock, the data is right, including a
/// failing read and a private mapping written.
#[test]
fn inline_executor() {
    bounded(15, || {
        let vm = Vm::new(RefPmap::new(), cfg(4096)).unwrap();
        vm.set_io_executor(Some(Arc::new(Inline)));
        let space = vm.new_space().unwrap();
        let pager = big_pager(PagerKind::FILE, 512);
        let obj = vm.new_object(512, pager.clone());
        space
            .map(MapRequest::object(BASE, 512 * PAGE, obj.clone(), 0, Prot::RW).private())
            .unwrap();
        for p in 0..200 {
            page_ok(&space, p);
        }
        pager.inject(Injected::Fail(MemPager::io_error()));
        for p in 200..512 {
            if p % 5 == 0 {
                space.write(BASE + p * PAGE, &fill(0x99)).unwrap();
            } else {
                page_ok(&space, p);
            }
        }
        for p in 0..512u64 {
            if p >= 200 && p % 5 == 0 {
                let mut buf = fill(0);
                space.read(BASE + p * PAGE, &mut buf).unwrap();
                assert!(buf.iter().all(|&b| b == 0x99), "page {p}");
            } else {
                page_ok(&space, p);
            }
        }
        assert!(vm.counters().snapshot().v_async_reads > 0);
        consistent(&vm);
    });
}

/// A pager wrapper that, for calls after it is armed, blocks until
/// released and then panics (a pager bug, or a device driver that
/// panics).
struct Panicky {
    inner: MemPager,
    armed: AtomicBool,
    gate: Mutex<Option<Arc<Barrier>>>,
}

impl vm_core::Pager for Panicky {
    fn kind(&self) -> PagerKind {
        self.inner.kind()
    }
    fn has_page(&self, pindex: u64) -> Option<Contiguity> {
        self.inner.has_page(pindex)
    }
    fn get_pages(
        &self,
        pages: &mut [vm_core::PageSlot<'_>],
        reqpage: usize,
    ) -> Result<(), vm_core::PagerError> {
        if !self.armed.load(Ordering::SeqCst) {
            return self.inner.get_pages(pages, reqpage);
        }
        let gate = self.gate.lock().unwrap().clone();
        if let Some(g) = gate {
            g.wait();
        }
        panic!("redteam: pager panics in a background read");
    }
}

/// The IoThreads pool is two threads; its code says a job whose pager
/// panics frees its pages and that, once every thread is gone, jobs run
/// inline "rather than strand its busy pages". But a job queued in the
/// channel when the last thread dies is dropped with the receiver,
/// never run: its pages stay busy forever, so a fault on one sleeps
/// forever and the consistency check finds a page left busy.
#[test]
fn pool_threads_killed_by_a_panicking_pager_strand_queued_reads() {
    let vm = Vm::new(RefPmap::new(), cfg(4096)).unwrap();
    let space = Arc::new(vm.new_space().unwrap());
    let gate = Arc::new(Barrier::new(3));
    let mut panicky = Vec::new();
    for i in 0..2u64 {
        let inner = MemPager::with_pattern(PagerKind::FILE, 256);
        inner.set_contiguity(Contiguity {
            behind: 255,
            ahead: 255,
        });
        let p = Arc::new(Panicky {
            inner,
            armed: AtomicBool::new(false),
            gate: Mutex::new(Some(gate.clone())),
        });
        let obj = vm.new_object(256, p.clone());
        let base = BASE + i * 0x1000_0000;
        space
            .map(MapRequest::object(base, 256 * PAGE, obj, 0, Prot::READ))
            .unwrap();
        page_ok_at(&space, base, 0, 0);
        panicky.push((p, base));
    }
    let good = big_pager(PagerKind::FILE, 256);
    let gobj = vm.new_object(256, good.clone());
    let gbase = BASE + 2 * 0x1000_0000;
    space
        .map(MapRequest::object(
            gbase,
            256 * PAGE,
            gobj.clone(),
            0,
            Prot::READ,
        ))
        .unwrap();
    page_ok_at(&space, gbase, 0, 0);
    // Both pool threads take a panicky background read and block in it.
    for (p, base) in &panicky {
        p.armed.store(true, Ordering::SeqCst);
        page_ok_at(&space, *base, 1, 0);
    }
    // Give both threads time to take their job (they then block).
    let t0 = Instant::now();
    while vm.counters().snapshot().v_async_reads < 2 {
        assert!(t0.elapsed() < scaled_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    // A good background read is queued behind them.
    page_ok_at(&space, gbase, 1, 0);
    let queued = gobj.resident_page(20).unwrap();
    assert!(vm.page(queued).is_busy());
    // Release the two: both panic, both threads die.
    gate.wait();
    std::thread::sleep(Duration::from_millis(100));
    // A reader of a page of the queued window must get it.
    let sp = space.clone();
    let reader = std::thread::spawn(move || page_ok_at(&sp, gbase, 20, 0));
    let t0 = Instant::now();
    while !reader.is_finished() && t0.elapsed() < scaled_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let busy = vm.page(queued).is_busy();
    assert!(
        reader.is_finished() && !busy,
        "the read queued behind two panicking jobs never ran: page 20 still busy = {busy}, \
         reader stuck = {}",
        !reader.is_finished()
    );
    reader.join().unwrap();
    for (p, _) in &panicky {
        p.armed.store(false, Ordering::SeqCst);
    }
    consistent(&vm);
}

/// The executor is switched off (None) while a job is pending on the old
/// one; the pending job still runs and settles, later reads are the
/// faults' own.
#[test]
fn executor_removed_with_a_job_pending() {
    bounded(15, || {
        let s = setup(512);
        start_background(&s);
        s.vm.set_io_executor(None);
        let sp = s.space.clone();
        let r = std::thread::spawn(move || page_ok(&sp, 20));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!r.is_finished());
        assert_eq!(s.manual.run_all(), 1);
        join_within(r, 5, "reader");
        let before = s.vm.counters().snapshot().v_async_reads;
        for p in 0..512 {
            page_ok(&s.space, p);
        }
        assert_eq!(s.manual.pending(), 0);
        assert_eq!(s.vm.counters().snapshot().v_async_reads, before);
        consistent(&s.vm);
    });
}

/// A small machine: the background window may take all spare memory; a
/// write fault on the marker in a private mapping (a copy-on-write copy
/// after the marker hit) and faults elsewhere must still complete while
/// the read is held, and the data is right.
#[test]
fn small_memory_marker_write_fault_with_the_read_held() {
    bounded(15, || {
        let s = setup_with(cfg(64), 256, Prot::RW, true);
        page_ok(&s.space, 0);
        s.space.write(BASE + PAGE, &fill(0x42)).unwrap();
        assert_eq!(s.manual.pending(), 1);
        // Other faults while the read is held: anonymous zero-fill.
        let anon = 0x4000_0000;
        s.space.map_anon(anon, 8 * PAGE, Prot::RW).unwrap();
        for i in 0..8 {
            s.space.write_u8(anon + i * PAGE, 7).unwrap();
        }
        s.manual.run_all();
        let mut buf = fill(0);
        for p in 0..256u64 {
            s.space.read(BASE + p * PAGE, &mut buf).unwrap();
            if p == 1 {
                assert!(buf.iter().all(|&b| b == 0x42));
            } else {
                assert!(
                    buf.iter()
                        .enumerate()
                        .all(|(o, &b)| b == pattern_byte(p, o)),
                    "page {p}"
                );
            }
            s.manual.run_all();
        }
        consistent(&s.vm);
    });
}

/// A mapping of the object at an offset shares markers with another
/// mapping: the marker set by one is hit by the other, whose window must
/// stay inside its own entry and the object, and bytes are right in both.
#[test]
fn marker_set_by_one_mapping_hit_by_another_at_an_offset() {
    bounded(15, || {
        let s = setup(256);
        page_ok(&s.space, 0);
        assert_eq!(s.manual.pending(), 0);
        // A second mapping of pages 4..12 only (the marker 8 at its page 4).
        let base2 = 0x3000_0000;
        s.space
            .map(MapRequest::object(
                base2,
                8 * PAGE,
                s.obj.clone(),
                4 * PAGE,
                Prot::READ,
            ))
            .unwrap();
        page_ok_at(&s.space, base2, 4, 4);
        s.manual.run_all();
        assert!(
            s.obj.resident_between(16, u64::MAX).is_empty(),
            "the window of a mapping of 4..12 reads nothing past 12: {:?}",
            s.obj.resident_between(16, u64::MAX)
        );
        for p in 0..8 {
            page_ok_at(&s.space, base2, p, 4);
        }
        for p in 0..256 {
            page_ok(&s.space, p);
            s.manual.run_all();
        }
        consistent(&s.vm);
    });
}

/// MADV_SEQUENTIAL mappings scanned on the default pool under memory
/// pressure (pageout between), bytes checked.
#[test]
fn madv_sequential_scan_under_pressure_on_the_pool() {
    bounded(19, || {
        let vm = Vm::new(RefPmap::new(), cfg(400)).unwrap();
        let space = vm.new_space().unwrap();
        let pages = 2048u64;
        let pager = big_pager(PagerKind::FILE, pages);
        let obj = vm.new_object(pages, pager.clone());
        space
            .map(
                MapRequest::object(BASE, pages * PAGE, obj, 0, Prot::READ)
                    .behavior(vm_core::Behavior::Sequential),
            )
            .unwrap();
        for round in 0..2 {
            for p in 0..pages {
                page_ok(&space, p);
                if p % 300 == 0 {
                    vm.pageout(vm.total_pages());
                }
            }
            let _ = round;
        }
        assert!(vm.counters().snapshot().v_async_reads > 0);
        consistent(&vm);
    });
}

/// terminate_object while scanners run on the default pool: each read
/// gives the file's bytes or an error, never other bytes; afterwards the
/// dead object holds nothing and the machine is consistent.
#[test]
fn terminate_races_scanners_on_the_pool() {
    bounded(19, || {
        for iter in 0..6u64 {
            let vm = Vm::new(RefPmap::new(), cfg(4096)).unwrap();
            let pages = 1024u64;
            let pager = big_pager(PagerKind::FILE, pages);
            pager.set_delay(Some(Duration::from_micros(100)));
            let obj = vm.new_object(pages, pager.clone());
            let mut hs = Vec::new();
            for t in 0..3u64 {
                let (vm, obj) = (vm.clone(), obj.clone());
                hs.push(std::thread::spawn(move || {
                    let space = vm.new_space().unwrap();
                    space
                        .map(MapRequest::object(BASE, pages * PAGE, obj, 0, Prot::READ))
                        .unwrap();
                    let mut buf = vec![0u8; PAGE as usize];
                    for p in (t * 7)..pages {
                        match space.read(BASE + p * PAGE, &mut buf) {
                            Ok(()) => {
                                for (o, &b) in buf.iter().enumerate().step_by(61) {
                                    assert_eq!(b, pattern_byte(p, o), "t{t} page {p}");
                                }
                            }
                            Err(_) => return,
                        }
                    }
                }));
            }
            std::thread::sleep(Duration::from_millis(5 + iter * 7));
            vm.terminate_object(&obj);
            for h in hs {
                join_within(h, 10, "scanner");
            }
            vm.wait_for_background_io();
            assert!(
                obj.resident_between(0, u64::MAX).is_empty(),
                "iteration {iter}: a dead object keeps pages {:?}",
                obj.resident_between(0, u64::MAX)
            );
            consistent(&vm);
        }
    });
}

/// Machines come and go (each starts its pool at its first background
/// read): their I/O threads must exit with them.
#[test]
fn io_threads_exit_with_their_machine() {
    fn threads() -> usize {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
    bounded(19, || {
        let before = threads();
        for _ in 0..40 {
            let vm = Vm::new(RefPmap::new(), cfg(512)).unwrap();
            let space = vm.new_space().unwrap();
            let pager = big_pager(PagerKind::FILE, 128);
            let obj = vm.new_object(128, pager);
            space
                .map(MapRequest::object(BASE, 128 * PAGE, obj, 0, Prot::READ))
                .unwrap();
            for p in 0..128 {
                page_ok(&space, p);
            }
            assert!(vm.counters().snapshot().v_async_reads > 0);
        }
        std::thread::sleep(Duration::from_millis(100));
        let after = threads();
        assert!(
            after < before + 30,
            "80 I/O threads started; {} still alive",
            after.saturating_sub(before)
        );
    });
}
