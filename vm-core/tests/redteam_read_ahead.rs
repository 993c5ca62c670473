//! Red team of the adaptive read-ahead (commit a3fc515: per-entry
//! `read_ahead` window, `VmConfig::read_ahead_max`, heap-spilled clusters,
//! vnode contiguity of 255); read-ahead synchronous (the default).
//!
//! Failed on a3fc515, fixed since: `cache_behind_covers_*` (cache-behind
//! looked back a fixed 32 pages, windows are now up to 256),
//! `a_larger_maximum_never_reads_in_smaller_runs_on_a_small_machine` (a
//! window larger than spare memory read one page a fault, for good), and
//! `resize_object_leaves_no_window_past_the_end_*` /
//! `truncation_during_sequential_scans` (`resize_object` removed pages,
//! then set the size, so a fault in between left a readable window past
//! the end; older than a3fc515).
//!
//! Every test is bounded in time (bounded loops, or a deadline for the
//! concurrent ones) and ends with `check_consistency`.
#![allow(clippy::unwrap_used, clippy::needless_range_loop, dead_code)]

mod common;
use common::wide_file;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vm_core::{
    Behavior, FaultError, MapRequest, PageQueue, Pmap, Prot, Vm, VmConfig, VmObject, VmSpace,
};
use vm_testkit::{Injected, MemPager, RefPmap, pattern_byte};

const PAGE: u64 = vm_core::PAGE_SIZE;
const BASE: u64 = 0x1000_0000;

fn consistent<P: Pmap>(vm: &Vm<P>) {
    if let Err(e) = vm.check_consistency() {
        panic!("inconsistent: {e}");
    }
}

fn config(pages: u64, read_ahead_max: u32) -> VmConfig {
    VmConfig {
        read_ahead_max,
        memory_wait_ms: 1,
        memory_retries: 200,
        ..vm_testkit::test_config(pages)
    }
}

fn vm_with(pages: u64, read_ahead_max: u32) -> Arc<Vm<RefPmap>> {
    Vm::new(RefPmap::new(), config(pages, read_ahead_max)).unwrap()
}

fn map_ro<P: Pmap>(space: &VmSpace<P>, obj: &Arc<VmObject>, pages: u64, b: Behavior) {
    space
        .map(MapRequest::object(BASE, pages * PAGE, obj.clone(), 0, Prot::READ).behavior(b))
        .unwrap();
}

/// Reads byte `off` of every page `first..end` (object page = va page +
/// `shift`), checking the pattern.
fn scan_at<P: Pmap>(space: &VmSpace<P>, base: u64, shift: u64, first: u64, end: u64, off: u64) {
    for p in first..end {
        let got = space.read_u8(base + p * PAGE + off).unwrap_or_else(|e| {
            panic!("read of page {p} failed: {e}");
        });
        assert_eq!(got, pattern_byte(p + shift, off as usize), "page {p}");
    }
}

fn scan<P: Pmap>(space: &VmSpace<P>, first: u64, end: u64) {
    scan_at(space, BASE, 0, first, end, 9);
}

fn calls_in(pager: &MemPager) -> Vec<Vec<u64>> {
    pager.calls().into_iter().map(|c| c.pindexes).collect()
}

// ---------------------------------------------------------------------------
// Cache-behind versus the larger windows.
// ---------------------------------------------------------------------------

/// With the seed's 16-page windows (read_ahead_max 15) a sequential scan
/// unmaps and deactivates everything behind it (control for the next test).
#[test]
fn cache_behind_covers_a_scan_with_the_seed_window() {
    let vm = vm_with(4096, 15);
    let space = vm.new_space().unwrap();
    let (_pager, obj) = wide_file(&vm, 1024);
    map_ro(&space, &obj, 1024, Behavior::Normal);
    scan(&space, 0, 1024);
    let left: Vec<u64> = (0..768)
        .filter(|&p| space.extract(BASE + p * PAGE).is_some())
        .collect();
    assert!(left.is_empty(), "still mapped behind the scan: {left:?}");
    consistent(&vm);
}

/// The commit says the scan "drops the pages behind the scan
/// (cache-behind)" so "a large scan does not push out everything else".
/// With the default 64-page windows, pages far behind the scan must not
/// stay mapped and active.
#[test]
fn cache_behind_covers_a_scan_with_the_default_window() {
    let vm = vm_with(4096, 63);
    let space = vm.new_space().unwrap();
    let (_pager, obj) = wide_file(&vm, 1024);
    map_ro(&space, &obj, 1024, Behavior::Normal);
    scan(&space, 0, 1024);
    let left: Vec<u64> = (0..768)
        .filter(|&p| space.extract(BASE + p * PAGE).is_some())
        .collect();
    let active = (0..768)
        .filter(|&p| {
            obj.resident_page(p)
                .is_some_and(|id| vm.page(id).queue() == PageQueue::Active)
        })
        .count();
    assert!(
        left.is_empty(),
        "{} of 768 pages behind the scan still mapped ({active} active), e.g. {:?}",
        left.len(),
        &left[..left.len().min(8)]
    );
    consistent(&vm);
}

/// Same with the largest window (MADV_SEQUENTIAL at 255).
#[test]
fn cache_behind_covers_a_madv_sequential_scan_at_255() {
    let vm = vm_with(4096, 255);
    let space = vm.new_space().unwrap();
    let (_pager, obj) = wide_file(&vm, 2048);
    map_ro(&space, &obj, 2048, Behavior::Sequential);
    scan(&space, 0, 2048);
    let left = (0..1536)
        .filter(|&p| space.extract(BASE + p * PAGE).is_some())
        .count();
    assert_eq!(left, 0, "pages behind a MADV_SEQUENTIAL scan still mapped");
    consistent(&vm);
}

// ---------------------------------------------------------------------------
// Memory: a big window on a small machine.
// ---------------------------------------------------------------------------

/// A larger `read_ahead_max` must never make a scan need more pager calls
/// than the default: when free memory cannot hold the whole window the
/// cluster should be cut to what fits, not dropped to one page for the
/// rest of the scan.
#[test]
fn a_larger_maximum_never_reads_in_smaller_runs_on_a_small_machine() {
    let run = |max: u32| {
        // 320 pages of memory, a 1024-page file of which the first 290
        // are read: no pageout needed either way.
        let vm = vm_with(320, max);
        let space = vm.new_space().unwrap();
        let (pager, obj) = wide_file(&vm, 1024);
        map_ro(&space, &obj, 1024, Behavior::Normal);
        scan(&space, 0, 290);
        consistent(&vm);
        let sizes: Vec<usize> = calls_in(&pager).iter().map(Vec::len).collect();
        (sizes.len(), sizes, vm.counters().snapshot().v_cluster_short)
    };
    let (n63, s63, _) = run(63);
    let (n255, s255, short) = run(255);
    assert!(
        n255 <= n63,
        "read_ahead_max 255 made {n255} pager calls ({short} cut to one page) where 63 made {n63}\n\
         63: {s63:?}\n255: {:?}...",
        &s255[..s255.len().min(12)]
    );
}

/// Many scanners with a 255-page window on a machine smaller than the
/// file, a pageout thread freeing what the scans leave: every read
/// succeeds (the memory waits retry), and the bytes are right.
#[test]
fn big_windows_under_memory_pressure_with_pageout() {
    let vm = vm_with(160, 255);
    let (_pager, obj) = wide_file(&vm, 2048);
    let stop = Arc::new(AtomicBool::new(false));
    let pageout = {
        let (vm, stop) = (vm.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if vm.free_pages() < 64 {
                    vm.pageout(96);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut hs = Vec::new();
    for t in 0..3u64 {
        let (vm, obj) = (vm.clone(), obj.clone());
        hs.push(std::thread::spawn(move || {
            let space = vm.new_space().unwrap();
            let b = if t == 0 {
                Behavior::Sequential
            } else {
                Behavior::Normal
            };
            map_ro(&space, &obj, 2048, b);
            let mut read = 0u64;
            let mut p = t * 500;
            while read == 0 || (Instant::now() < deadline && read < 4096) {
                let got = space.read_u8(BASE + p * PAGE + 3);
                match got {
                    Ok(v) => assert_eq!(v, pattern_byte(p, 3), "page {p}"),
                    Err(e) => panic!("thread {t}: read of page {p} failed: {e}"),
                }
                read += 1;
                p = (p + 1) % 2048;
            }
            read
        }));
    }
    let mut total = 0;
    for h in hs {
        total += h.join().unwrap();
    }
    stop.store(true, Ordering::Release);
    pageout.join().unwrap();
    assert!(total > 0);
    consistent(&vm);
}

// ---------------------------------------------------------------------------
// I/O errors in a big cluster.
// ---------------------------------------------------------------------------

#[test]
fn an_io_error_in_a_255_page_cluster_leaves_nothing_and_a_retry_reads() {
    let vm = vm_with(2048, 255);
    let space = vm.new_space().unwrap();
    let (pager, obj) = wide_file(&vm, 1024);
    map_ro(&space, &obj, 1024, Behavior::Sequential);
    scan(&space, 0, 10);
    let first = calls_in(&pager);
    assert_eq!(first[0].len(), 256, "MADV_SEQUENTIAL: the whole window");
    // The next window fails.
    pager.inject(Injected::Fail(MemPager::io_error()));
    let err = space.read_u8(BASE + 256 * PAGE).unwrap_err();
    assert!(matches!(err, FaultError::Pager { .. }), "{err}");
    let failed = calls_in(&pager).last().unwrap().clone();
    assert!(failed.len() > 64, "a spilled cluster: {}", failed.len());
    for &p in &failed {
        assert!(
            obj.resident_page(p).is_none(),
            "page {p} of the failed cluster left resident"
        );
    }
    consistent(&vm);
    // A later fault reads it all.
    scan(&space, 256, 1024);
    consistent(&vm);
}

/// An error after a stray (non-sequential) fault, and a partial success:
/// the pager leaves some neighbours invalid in the middle of a big run.
#[test]
fn holes_in_a_big_window_are_freed_and_read_later() {
    let vm = vm_with(2048, 255);
    let space = vm.new_space().unwrap();
    let (pager, obj) = wide_file(&vm, 1024);
    // Holes the pager cannot fill, in the middle of the first big window.
    for p in [100u64, 101, 180] {
        pager.forget(p);
    }
    map_ro(&space, &obj, 1024, Behavior::Sequential);
    assert_eq!(space.read_u8(BASE + 9).unwrap(), pattern_byte(0, 9));
    for p in [100u64, 101, 180] {
        assert!(obj.resident_page(p).is_none(), "hole {p} kept");
    }
    assert!(obj.resident_page(99).is_some());
    assert!(obj.resident_page(102).is_some());
    // The holes fault as out of the file (the pager has not got them).
    for p in [100u64, 101, 180] {
        let r = space.read_u8(BASE + p * PAGE);
        // Zero fill or an error are both acceptable for a page the pager
        // lacks; garbage is not.
        if let Ok(v) = r {
            assert_eq!(v, 0, "page {p} not from the pager must read zero");
        }
    }
    for p in (0..1024).filter(|p| ![100, 101, 180].contains(p)) {
        assert_eq!(
            space.read_u8(BASE + p * PAGE + 1).unwrap(),
            pattern_byte(p, 1)
        );
    }
    consistent(&vm);
}

// ---------------------------------------------------------------------------
// Bounds: the mapping's object range, the object's end, resident pages.
// ---------------------------------------------------------------------------

#[test]
fn the_window_never_reads_outside_the_mapped_object_range() {
    let vm = vm_with(4096, 255);
    let (pager, obj) = wide_file(&vm, 2048);
    let space = vm.new_space().unwrap();
    // Object pages 300..400 at BASE, 1000..1010 at BASE + 1 GiB.
    space
        .map(
            MapRequest::object(BASE, 100 * PAGE, obj.clone(), 300 * PAGE, Prot::READ)
                .behavior(Behavior::Sequential),
        )
        .unwrap();
    let base2 = BASE + (1 << 30);
    space
        .map(MapRequest::object(
            base2,
            10 * PAGE,
            obj.clone(),
            1000 * PAGE,
            Prot::READ,
        ))
        .unwrap();
    scan_at(&space, BASE, 300, 0, 100, 5);
    scan_at(&space, base2, 1000, 0, 10, 5);
    scan_at(&space, BASE, 300, 0, 100, 6);
    for c in calls_in(&pager) {
        for p in c {
            assert!(
                (300..400).contains(&p) || (1000..1010).contains(&p),
                "read page {p} outside the mappings"
            );
        }
    }
    assert_eq!(
        obj.resident_count(),
        110,
        "exactly the mapped pages are resident"
    );
    consistent(&vm);
}

#[test]
fn the_window_stops_at_the_objects_end_and_past_it_is_sigbus() {
    let vm = vm_with(4096, 255);
    let (pager, obj) = wide_file(&vm, 2048);
    // The object is shorter than the mapping (a file shorter than mmap).
    vm.resize_object(&obj, 300);
    let space = vm.new_space().unwrap();
    map_ro(&space, &obj, 1024, Behavior::Normal);
    scan(&space, 0, 300);
    let err = space.read_u8(BASE + 300 * PAGE).unwrap_err();
    assert!(matches!(err, FaultError::OutOfBounds { .. }), "{err}");
    let err = space.read_u8(BASE + 700 * PAGE).unwrap_err();
    assert!(matches!(err, FaultError::OutOfBounds { .. }), "{err}");
    for c in calls_in(&pager) {
        assert!(c.iter().all(|&p| p < 300), "read past the end: {c:?}");
    }
    assert!(obj.resident_between(300, 2048).is_empty());
    consistent(&vm);
}

/// A page written through one mapping is never overwritten by a window
/// read for another (the window stops at resident pages), whether it is
/// still mapped or was unmapped by cache-behind.
#[test]
fn a_window_never_overwrites_a_resident_dirty_page() {
    let vm = vm_with(8192, 255);
    let (_pager, obj) = wide_file(&vm, 2048);
    let writer = vm.new_space().unwrap();
    writer
        .map(MapRequest::object(
            BASE,
            2048 * PAGE,
            obj.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
    let marks = [1u64, 17, 40, 200, 511, 512, 700, 1500, 2047];
    for &p in &marks {
        writer.write_u8(BASE + p * PAGE + 9, 0).unwrap();
        writer.write_u8(BASE + p * PAGE + 100, 0xEE).unwrap();
    }
    let reader = vm.new_space().unwrap();
    map_ro(&reader, &obj, 2048, Behavior::Normal);
    let seq = vm.new_space().unwrap();
    map_ro(&seq, &obj, 2048, Behavior::Sequential);
    for (s, name) in [
        (&reader, "normal"),
        (&seq, "sequential"),
        (&writer, "writer"),
    ] {
        for p in 0..2048 {
            let want = if marks.contains(&p) {
                0
            } else {
                pattern_byte(p, 9)
            };
            assert_eq!(
                s.read_u8(BASE + p * PAGE + 9).unwrap(),
                want,
                "{name} page {p}"
            );
        }
        for &p in &marks {
            assert_eq!(
                s.read_u8(BASE + p * PAGE + 100).unwrap(),
                0xEE,
                "{name} {p}"
            );
        }
    }
    // The writer scans its own mapping again by writing: still its bytes.
    for p in 0..2048 {
        let v = writer.read_u8(BASE + p * PAGE + 100).unwrap();
        let want = if marks.contains(&p) {
            0xEE
        } else {
            pattern_byte(p, 100)
        };
        assert_eq!(v, want, "writer page {p}");
    }
    consistent(&vm);
}

// ---------------------------------------------------------------------------
// Map operations during a scan: clip, wire, fork, truncation.
// ---------------------------------------------------------------------------

#[test]
fn clipping_the_entry_mid_scan_bounds_the_window_to_each_half() {
    let vm = vm_with(4096, 255);
    let (pager, obj) = wide_file(&vm, 1024);
    let space = vm.new_space().unwrap();
    space
        .map(
            MapRequest::object(BASE, 1024 * PAGE, obj.clone(), 0, Prot::RW)
                .behavior(Behavior::Normal),
        )
        .unwrap();
    scan(&space, 0, 300);
    let grown = space.entries()[0].read_ahead;
    assert_eq!(grown, 255);
    // Clip at page 512: the upper half read-only.
    space
        .protect(BASE + 512 * PAGE, 512 * PAGE, Prot::READ)
        .unwrap();
    let es = space.entries();
    assert_eq!(es.len(), 2);
    let before = pager.calls().len();
    // The scan goes on into the lower half only; the window must stop at
    // the clip (page 512).
    scan(&space, 300, 512);
    for c in &calls_in(&pager)[before..] {
        assert!(
            c.iter().all(|&p| p < 512),
            "lower-half read crossed the clip: {c:?}"
        );
    }
    // Writes to the lower half work, the upper half refuses them.
    space.write_u8(BASE + 511 * PAGE, 7).unwrap();
    assert!(space.write_u8(BASE + 512 * PAGE, 7).is_err());
    scan(&space, 512, 1024);
    assert_eq!(space.read_u8(BASE + 511 * PAGE).unwrap(), 7);
    consistent(&vm);
}

#[test]
fn wiring_a_range_of_a_sequential_mapping() {
    let vm = vm_with(4096, 255);
    let (_pager, obj) = wide_file(&vm, 1024);
    let space = vm.new_space().unwrap();
    map_ro(&space, &obj, 1024, Behavior::Sequential);
    scan(&space, 0, 50);
    space.wire(BASE + 100 * PAGE, 100 * PAGE, true).unwrap();
    for p in 100..200 {
        let id = obj.resident_page(p).expect("wired page resident");
        assert!(vm.page(id).wire_count() > 0, "page {p} not wired");
        assert!(
            space.extract(BASE + p * PAGE).is_some(),
            "wired {p} unmapped"
        );
    }
    // A sequential scan over (and past) the wired range leaves it mapped.
    scan(&space, 50, 1024);
    for p in 100..200 {
        assert!(
            space.extract(BASE + p * PAGE).is_some(),
            "cache-behind unmapped wired page {p}"
        );
        let id = obj.resident_page(p).unwrap();
        assert!(vm.page(id).wire_count() > 0);
    }
    scan(&space, 0, 1024);
    space.unwire(BASE + 100 * PAGE, 100 * PAGE, true).unwrap();
    consistent(&vm);
}

#[test]
fn fork_during_a_scan_of_a_private_file_mapping() {
    let vm = vm_with(8192, 255);
    let (pager, obj) = wide_file(&vm, 1024);
    let parent = vm.new_space().unwrap();
    parent
        .map(
            MapRequest::object(BASE, 1024 * PAGE, obj.clone(), 0, Prot::RW)
                .private()
                .behavior(Behavior::Normal),
        )
        .unwrap();
    // Parent writes a few pages (COW), then scans partway.
    for p in [10u64, 300, 600] {
        parent.write_u8(BASE + p * PAGE + 9, 0xA1).unwrap();
    }
    for p in 0..400 {
        let want = if [10, 300].contains(&p) {
            0xA1
        } else {
            pattern_byte(p, 9)
        };
        assert_eq!(parent.read_u8(BASE + p * PAGE + 9).unwrap(), want, "{p}");
    }
    let child = parent.fork().unwrap();
    // Both write different bytes after the fork.
    for p in [20u64, 300, 700] {
        parent.write_u8(BASE + p * PAGE + 9, 0xB2).unwrap();
        child.write_u8(BASE + p * PAGE + 9, 0xC3).unwrap();
    }
    let want = |who: u8, p: u64| -> u8 {
        match (who, p) {
            (_, 10) | (_, 600) => 0xA1,
            (b'p', 20 | 300 | 700) => 0xB2,
            (b'c', 20 | 300 | 700) => 0xC3,
            _ => pattern_byte(p, 9),
        }
    };
    // Both scan the whole mapping, interleaved.
    for p in 0..1024 {
        assert_eq!(
            parent.read_u8(BASE + p * PAGE + 9).unwrap(),
            want(b'p', p),
            "parent {p}"
        );
        assert_eq!(
            child.read_u8(BASE + p * PAGE + 9).unwrap(),
            want(b'c', p),
            "child {p}"
        );
    }
    // The file is untouched.
    for p in [10u64, 20, 300, 600, 700] {
        assert_eq!(pager.stored(p).unwrap()[9], pattern_byte(p, 9));
        let id = obj.resident_page(p);
        if let Some(id) = id {
            let _ = vm.page(id);
        }
    }
    let fresh = vm.new_space().unwrap();
    map_ro(&fresh, &obj, 1024, Behavior::Sequential);
    scan(&fresh, 0, 1024);
    drop(child);
    consistent(&vm);
}

/// Concurrent fork while another thread scans the private mapping.
#[test]
fn concurrent_fork_and_sequential_scan() {
    let vm = vm_with(8192, 255);
    let (_pager, obj) = wide_file(&vm, 1024);
    let parent = Arc::new(vm.new_space().unwrap());
    parent
        .map(
            MapRequest::object(BASE, 1024 * PAGE, obj.clone(), 0, Prot::RW)
                .private()
                .behavior(Behavior::Sequential),
        )
        .unwrap();
    parent.write_u8(BASE + 5 * PAGE + 9, 0x55).unwrap();
    let deadline = Instant::now() + Duration::from_secs(4);
    let scanner = {
        let parent = parent.clone();
        std::thread::spawn(move || {
            let mut rounds = 0;
            // At least one round, however slow the machine (valgrind).
            while rounds == 0 || (Instant::now() < deadline && rounds < 6) {
                for p in 0..1024 {
                    let want = if p == 5 { 0x55 } else { pattern_byte(p, 9) };
                    assert_eq!(parent.read_u8(BASE + p * PAGE + 9).unwrap(), want, "{p}");
                }
                rounds += 1;
            }
            rounds
        })
    };
    let mut forks = 0;
    while Instant::now() < deadline && forks < 20 {
        let child = parent.fork().unwrap();
        child.write_u8(BASE + 7 * PAGE + 9, 0x77).unwrap();
        for p in (0..1024).step_by(3) {
            let want = match p {
                5 => 0x55,
                7 => 0x77,
                _ => pattern_byte(p, 9),
            };
            assert_eq!(
                child.read_u8(BASE + p * PAGE + 9).unwrap(),
                want,
                "child {p}"
            );
        }
        forks += 1;
    }
    assert!(scanner.join().unwrap() > 0);
    assert_eq!(
        parent.read_u8(BASE + 7 * PAGE + 9).unwrap(),
        pattern_byte(7, 9)
    );
    consistent(&vm);
}

/// Truncation and regrowth of the object while scanners run: a read
/// either fails out of bounds or returns the pattern, and at rest no page
/// is left past the end (`check_consistency`), and past the end is SIGBUS.
#[test]
fn truncation_during_sequential_scans() {
    let vm = vm_with(8192, 255);
    let (_pager, obj) = wide_file(&vm, 2048);
    let stop = Arc::new(AtomicBool::new(false));
    let oob = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let (vm, obj, stop, oob) = (vm.clone(), obj.clone(), stop.clone(), oob.clone());
        hs.push(std::thread::spawn(move || {
            let space = vm.new_space().unwrap();
            let b = if t == 0 {
                Behavior::Sequential
            } else {
                Behavior::Normal
            };
            map_ro(&space, &obj, 2048, b);
            let mut p = 0u64;
            while !stop.load(Ordering::Acquire) {
                match space.read_u8(BASE + p * PAGE + 11) {
                    Ok(v) => assert_eq!(v, pattern_byte(p, 11), "page {p}"),
                    Err(FaultError::OutOfBounds { .. }) => {
                        oob.fetch_add(1, Ordering::Relaxed);
                        p = 0;
                        continue;
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
                p = (p + 1) % 2048;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut sizes = [1500u64, 300, 2048, 40, 1024, 2048, 700]
        .into_iter()
        .cycle();
    let mut n = 0;
    while Instant::now() < deadline && n < 400 {
        let s = sizes.next().unwrap();
        vm.resize_object(&obj, s);
        std::thread::sleep(Duration::from_micros(300));
        n += 1;
    }
    vm.resize_object(&obj, 100);
    stop.store(true, Ordering::Release);
    for h in hs {
        h.join().unwrap();
    }
    let beyond = obj.resident_between(100, u64::MAX);
    assert!(
        beyond.is_empty(),
        "pages past the end after truncation: {beyond:?}"
    );
    let space = vm.new_space().unwrap();
    map_ro(&space, &obj, 2048, Behavior::Normal);
    scan(&space, 0, 100);
    for p in [100u64, 101, 356, 2047] {
        assert!(
            matches!(
                space.read_u8(BASE + p * PAGE),
                Err(FaultError::OutOfBounds { .. })
            ),
            "page {p} past the end readable"
        );
    }
    consistent(&vm);
}

// ---------------------------------------------------------------------------
// Concurrency: many scanners, one object.
// ---------------------------------------------------------------------------

/// Threads scanning the same mapping and different mappings of one object
/// (with and without MADV_SEQUENTIAL, at different offsets), with a
/// pageout thread: every byte is the pattern, at rest the machine is
/// consistent, and each entry's window stays within the maximum.
#[test]
fn many_scanners_on_one_object() {
    let vm = vm_with(1024, 255);
    let (_pager, obj) = wide_file(&vm, 1536);
    let shared = Arc::new(vm.new_space().unwrap());
    map_ro(&shared, &obj, 1536, Behavior::Normal);
    let stop = Arc::new(AtomicBool::new(false));
    let pageout = {
        let (vm, stop) = (vm.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if vm.free_pages() < 256 {
                    vm.pageout(400);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut hs = Vec::new();
    for t in 0..4u64 {
        let (vm, obj, shared) = (vm.clone(), obj.clone(), shared.clone());
        hs.push(std::thread::spawn(move || {
            let own;
            let (space, shift, len): (&VmSpace<RefPmap>, u64, u64) = if t < 2 {
                (&shared, 0, 1536)
            } else {
                own = vm.new_space().unwrap();
                let off = 100 * t;
                own.map(
                    MapRequest::object(BASE, (1536 - off) * PAGE, obj, off * PAGE, Prot::READ)
                        .behavior(if t == 2 {
                            Behavior::Sequential
                        } else {
                            Behavior::Normal
                        }),
                )
                .unwrap();
                (&own, off, 1536 - off)
            };
            let mut p = (t * 377) % len;
            let mut n = 0u64;
            while n == 0 || (Instant::now() < deadline && n < 6000) {
                let v = space
                    .read_u8(BASE + p * PAGE + t)
                    .unwrap_or_else(|e| panic!("thread {t} page {p}: {e}"));
                assert_eq!(
                    v,
                    pattern_byte(p + shift, t as usize),
                    "thread {t} page {p}"
                );
                n += 1;
                p = (p + 1) % len;
                for e in space.entries() {
                    assert!(e.read_ahead <= 255);
                }
            }
            n
        }));
    }
    for h in hs {
        assert!(h.join().unwrap() > 0);
    }
    stop.store(true, Ordering::Release);
    pageout.join().unwrap();
    consistent(&vm);
}

/// The window follows the entry into a fork's child and a clip, and each
/// copy then evolves on its own (no sharing of the atomic).
#[test]
fn the_window_is_per_entry_after_fork_and_clip() {
    let vm = vm_with(4096, 255);
    let (_pager, obj) = wide_file(&vm, 1024);
    let space = vm.new_space().unwrap();
    map_ro(&space, &obj, 1024, Behavior::Normal);
    scan(&space, 0, 200);
    let w = space.entries()[0].read_ahead;
    assert!(w >= 127, "{w}");
    let child = space.fork().unwrap();
    assert_eq!(child.entries()[0].read_ahead, w);
    // A stray fault in the child halves its window only.
    child.read_u8(BASE + 900 * PAGE).unwrap();
    assert_eq!(child.entries()[0].read_ahead, w / 2);
    assert_eq!(space.entries()[0].read_ahead, w);
    scan(&child, 0, 1024);
    scan(&space, 0, 1024);
    drop(child);
    consistent(&vm);
}

/// A fault reported as sequential far in a big mapping must not read behind
/// (ahead only) and a whole MADV_SEQUENTIAL window must land in one call,
/// even when the fault is at the last page of the entry.
#[test]
fn windows_at_the_entry_edges() {
    let vm = vm_with(4096, 255);
    let (pager, obj) = wide_file(&vm, 600);
    let space = vm.new_space().unwrap();
    map_ro(&space, &obj, 600, Behavior::Sequential);
    assert_eq!(
        space.read_u8(BASE + 599 * PAGE).unwrap(),
        pattern_byte(599, 0)
    );
    assert_eq!(calls_in(&pager)[0], vec![599]);
    assert_eq!(
        space.read_u8(BASE + 400 * PAGE).unwrap(),
        pattern_byte(400, 0)
    );
    assert_eq!(calls_in(&pager)[1], (400..599).collect::<Vec<_>>());
    scan(&space, 0, 600);
    let total: usize = calls_in(&pager).iter().map(Vec::len).sum();
    assert_eq!(total, 600, "each page read once");
    consistent(&vm);
}

/// Minimal form of the truncation failure: right after
/// `resize_object(obj, 100)` returns, no page at or past 100 may be
/// resident (a fault that starts later sees the new size; one that was
/// already reading holds busy pages, which the removal waits for).
fn truncation_race(read_ahead_max: u32) {
    let vm = vm_with(8192, read_ahead_max);
    let (_pager, obj) = wide_file(&vm, 2048);
    let stop = Arc::new(AtomicBool::new(false));
    let scanner = {
        let (vm, obj, stop) = (vm.clone(), obj.clone(), stop.clone());
        std::thread::spawn(move || {
            let space = vm.new_space().unwrap();
            map_ro(&space, &obj, 2048, Behavior::Normal);
            let mut p = 100u64;
            while !stop.load(Ordering::Acquire) {
                match space.read_u8(BASE + p * PAGE) {
                    Ok(v) => assert_eq!(v, pattern_byte(p, 0)),
                    Err(FaultError::OutOfBounds { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
                p = if p + 1 >= 2048 { 100 } else { p + 1 };
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut found = None;
    let mut rounds = 0;
    while Instant::now() < deadline && found.is_none() {
        vm.resize_object(&obj, 2048);
        std::thread::sleep(Duration::from_micros(200));
        vm.resize_object(&obj, 100);
        let beyond = obj.resident_between(100, u64::MAX);
        if !beyond.is_empty() {
            found = Some(beyond);
        }
        rounds += 1;
    }
    stop.store(true, Ordering::Release);
    scanner.join().unwrap();
    if let Some(b) = found {
        // What a process sees: a page past the end reads as data.
        let space = vm.new_space().unwrap();
        map_ro(&space, &obj, 2048, Behavior::Normal);
        let seen = space.read_u8(BASE + b[0] * PAGE);
        assert!(
            matches!(seen, Err(FaultError::OutOfBounds { .. })),
            "page {} past the end (size {}) reads {seen:?}, not SIGBUS",
            b[0],
            obj.size()
        );
        panic!(
            "after {rounds} rounds, resize_object(100) returned with {} pages past the end: {}..={}",
            b.len(),
            b[0],
            b[b.len() - 1]
        );
    }
    consistent(&vm);
}

#[test]
fn resize_object_leaves_no_window_past_the_end_255() {
    truncation_race(255);
}

#[test]
fn resize_object_leaves_no_window_past_the_end_seed_window() {
    truncation_race(15);
}
