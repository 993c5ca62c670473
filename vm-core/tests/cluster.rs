//! Read-ahead/behind clustering: seed L465-558 and
//! `vm_fault_additional_pages` (L1203-1343).

mod common;
use common::*;
use std::sync::Arc;
use vm_core::{
    Behavior, Contiguity, FaultFlags, MapRequest, PageQueue, PagerKind, Prot, Vm, VmObject, VmSpace,
};
use vm_testkit::{GetCall, Injected, MemPager, RefPmap};

/// A 64-page file whose pager can read 16 pages around any page.
fn file(vm: &Arc<Vm<RefPmap>>, kind: PagerKind) -> (Arc<MemPager>, Arc<VmObject>) {
    let pager = Arc::new(MemPager::with_pattern(kind, 64));
    pager.set_contiguity(Contiguity {
        behind: 16,
        ahead: 16,
    });
    let obj = vm.new_object(64, pager.clone());
    (pager, obj)
}

fn map(space: &VmSpace<RefPmap>, obj: &Arc<VmObject>, b: Behavior) {
    space
        .map(MapRequest::object(BASE, 64 * PAGE, obj.clone(), 0, Prot::READ).behavior(b))
        .unwrap();
}

fn call(first: u64, last: u64, reqpage: usize) -> GetCall {
    GetCall {
        pindexes: (first..=last).collect(),
        reqpage,
    }
}

#[test]
fn normal_behaviour_reads_seven_behind_and_eight_ahead() {
    let (vm, space) = machine(256);
    let (pager, obj) = file(&vm, PagerKind::FILE);
    map(&space, &obj, Behavior::Normal);
    space
        .fault(BASE + 32 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(pager.calls(), vec![call(25, 40, 7)]);
    assert_eq!(obj.resident_count(), 16);
    assert_eq!(space.entries()[0].lastr, 32 + 16 - 7);
    // The neighbours are resident: no more pager calls for them.
    assert_eq!(
        space.read_u8(BASE + 26 * PAGE).unwrap(),
        vm_testkit::pattern_byte(26, 0)
    );
    assert_eq!(pager.calls().len(), 1);
    assert_eq!(vm.counters().snapshot().v_pager_pages, 16);
    consistent(&vm);
}

#[test]
fn a_fault_in_the_lastr_window_reads_ahead_only_and_deactivates_pages_behind() {
    let (vm, space) = machine(256);
    let (pager, obj) = file(&vm, PagerKind::FILE);
    map(&space, &obj, Behavior::Normal);
    space
        .fault(BASE + 32 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    // lastr is 41: a fault at 41 looks sequential.
    space
        .fault(BASE + 41 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(pager.calls()[1], call(41, 56, 0), "ahead = 8 + 7");
    // The pages behind the scan were unmapped and deactivated
    // (cache-behind), but stay resident: faulting one again is soft.
    for p in 25..=40 {
        let id = obj.resident_page(p).expect("still resident");
        assert_eq!(vm.page(id).queue(), PageQueue::Inactive);
    }
    assert_eq!(space.extract(BASE + 32 * PAGE), None, "and unmapped");
    assert_eq!(vm.counters().snapshot().v_cache_behind, 16);
    space
        .fault(BASE + 32 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(pager.calls().len(), 2, "no pager call for a cached page");
    consistent(&vm);
}

#[test]
fn sequential_behaviour_reads_the_largest_window_from_the_first_fault() {
    let (vm, space) = machine(256);
    let (pager, obj) = file(&vm, PagerKind::FILE);
    map(&space, &obj, Behavior::Sequential);
    space
        .fault(BASE + 40 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    // The window is the largest (255 pages ahead); the pager can read 16.
    assert_eq!(pager.calls(), vec![call(40, 56, 0)]);
    assert_eq!(space.entries()[0].read_ahead, 255);
    consistent(&vm);
}

/// A machine with `read_ahead_max` and a `pages`-page file whose pager
/// reads up to 255 pages around any page.
fn big_file(
    read_ahead_max: u32,
    pages: u64,
) -> (Arc<Vm<RefPmap>>, VmSpace<RefPmap>, Arc<MemPager>) {
    // Synchronous: these tests are about the window's size (the
    // background side is tests/async_read_ahead.rs).
    let config = vm_core::VmConfig {
        read_ahead_max,
        async_read_ahead: false,
        ..vm_testkit::test_config(2048)
    };
    let vm = Vm::new(RefPmap::new(), config).unwrap();
    let space = vm.new_space().unwrap();
    let pager = Arc::new(MemPager::with_pattern(PagerKind::FILE, pages));
    pager.set_contiguity(Contiguity {
        behind: 255,
        ahead: 255,
    });
    let obj = vm.new_object(pages, pager.clone());
    space
        .map(MapRequest::object(BASE, pages * PAGE, obj, 0, Prot::READ))
        .unwrap();
    (vm, space, pager)
}

/// Reads every page of `first..end` in order, checking the bytes.
fn scan(space: &VmSpace<RefPmap>, first: u64, end: u64) {
    for p in first..end {
        assert_eq!(
            space.read_u8(BASE + p * PAGE + 9).unwrap(),
            vm_testkit::pattern_byte(p, 9)
        );
    }
}

#[test]
fn a_sequential_scan_doubles_the_window_up_to_the_maximum() {
    let (vm, space, pager) = big_file(63, 1024);
    scan(&space, 0, 1024);
    let sizes: Vec<usize> = pager.calls().iter().map(|c| c.pindexes.len()).collect();
    // A fault at page 0 is in the window after `lastr` = 0, so sequential
    // from the start (as in the seed): 16 pages, then each sequential
    // fault doubles, 32, then 64 pages a call.
    assert_eq!(&sizes[..3], &[16, 32, 64]);
    assert!(
        sizes[3..sizes.len() - 1].iter().all(|&n| n == 64),
        "{sizes:?}"
    );
    assert_eq!(sizes.iter().sum::<usize>(), 1024, "each page read once");
    assert!(
        pager.calls().iter().skip(1).all(|c| c.reqpage == 0),
        "ahead only"
    );
    assert_eq!(space.entries()[0].read_ahead, 63);
    consistent(&vm);
}

#[test]
fn a_stray_fault_halves_the_window_and_the_scan_regrows_it() {
    let (vm, space, pager) = big_file(255, 2048);
    scan(&space, 0, 600);
    assert_eq!(space.entries()[0].read_ahead, 255);
    let before = pager.calls().len();
    // A fault far from the scan reads around itself and halves the window.
    scan(&space, 1500, 1501);
    assert_eq!(pager.calls()[before], call(1493, 1508, 7));
    assert_eq!(space.entries()[0].read_ahead, 127);
    // The scan resumes where its last read ended: not in the window after
    // the stray read, so it is a miss too (the window halves again) ...
    let resume = pager.calls()[before - 1].pindexes.last().unwrap() + 1;
    scan(&space, resume, resume + 1);
    assert_eq!(space.entries()[0].read_ahead, 63);
    // ... and the next sequential fault doubles from there, not from 15.
    let next = pager.calls().last().unwrap().pindexes.last().unwrap() + 1;
    scan(&space, next, next + 1);
    assert_eq!(space.entries()[0].read_ahead, 127);
    assert_eq!(pager.calls().last().unwrap().pindexes.len(), 128);
    consistent(&vm);
}

#[test]
fn a_window_past_the_inline_size_reads_whole_and_right() {
    // 255 pages ahead: the cluster spills from the stack to the heap.
    let (vm, space, pager) = big_file(255, 2048);
    scan(&space, 0, 2048);
    let sizes: Vec<usize> = pager.calls().iter().map(|c| c.pindexes.len()).collect();
    assert!(sizes.contains(&256), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 2048);
    consistent(&vm);
}

#[test]
fn random_access_keeps_the_seed_cluster_and_no_window() {
    let (vm, space, pager) = big_file(63, 1024);
    for p in [500, 100, 900, 300, 700] {
        scan(&space, p, p + 1);
    }
    assert!(pager.calls().iter().all(|c| c.pindexes.len() == 16));
    assert_eq!(space.entries()[0].read_ahead, 0);
    consistent(&vm);
}

#[test]
fn a_read_ahead_maximum_past_255_is_refused() {
    let config = vm_core::VmConfig {
        read_ahead_max: 256,
        ..vm_testkit::test_config(64)
    };
    let err = Vm::new(RefPmap::new(), config).unwrap_err();
    assert!(err.to_string().contains("read_ahead_max"), "{err}");
}

#[test]
fn random_behaviour_and_device_objects_read_one_page() {
    let (vm, space) = machine(256);
    let (pager, obj) = file(&vm, PagerKind::FILE);
    map(&space, &obj, Behavior::Random);
    space
        .fault(BASE + 40 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(pager.calls(), vec![call(40, 40, 0)]);
    let other = vm.new_space().unwrap();
    let (dpager, dobj) = file(&vm, PagerKind::DEVICE);
    map(&other, &dobj, Behavior::Normal);
    other
        .fault(BASE + 40 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(dpager.calls(), vec![call(40, 40, 0)]);
    consistent(&vm);
}

#[test]
fn the_cluster_respects_the_pager_resident_pages_and_the_entry() {
    let (vm, space) = machine(256);
    let (pager, obj) = file(&vm, PagerKind::FILE);
    pager.set_contiguity(Contiguity {
        behind: 2,
        ahead: 3,
    });
    map(&space, &obj, Behavior::Normal);
    space
        .fault(BASE + 40 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(pager.calls()[0], call(38, 43, 2), "what the pager can read");
    pager.set_contiguity(Contiguity {
        behind: 16,
        ahead: 16,
    });
    // Resident 38..=43 bound a cluster around 36 from above (36 is below
    // the lastr window, 44.., so this is not sequential).
    space
        .fault(BASE + 36 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(pager.calls()[1], call(29, 37, 7));
    // An entry that maps pages 20..24 of the object reads nothing outside.
    let small = vm.new_space().unwrap();
    small
        .map(MapRequest::object(
            BASE,
            4 * PAGE,
            obj.clone(),
            20 * PAGE,
            Prot::READ,
        ))
        .unwrap();
    small
        .fault(BASE + PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(
        pager.calls()[2],
        call(20, 23, 1),
        "one behind, two ahead: the entry's ends"
    );
    consistent(&vm);
}

#[test]
fn neighbours_the_pager_leaves_invalid_are_freed() {
    let (vm, space) = machine(256);
    let (pager, obj) = file(&vm, PagerKind::FILE);
    pager.forget(45);
    map(&space, &obj, Behavior::Normal);
    space
        .fault(BASE + 40 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(pager.calls()[0], call(33, 48, 7));
    assert!(obj.resident_page(45).is_none(), "not filled, not kept");
    assert!(obj.resident_page(46).is_some());
    // A failed cluster read leaves nothing behind.
    pager.inject(Injected::Fail(MemPager::io_error()));
    assert!(
        space
            .fault(BASE + 20 * PAGE, Prot::READ, FaultFlags::NORMAL)
            .is_err()
    );
    assert!((13..=28).all(|p| obj.resident_page(p).is_none()));
    consistent(&vm);
}

#[test]
fn short_memory_cuts_the_cluster_to_what_is_spare() {
    let (vm, space) = machine(24);
    let (pager, obj) = file(&vm, PagerKind::FILE);
    map(&space, &obj, Behavior::Normal);
    let hog = vm.new_space().unwrap();
    hog.map_anon(BASE, 16 * PAGE, Prot::RW).unwrap();
    for i in 0..16 {
        hog.write_u8(BASE + i * PAGE, 1).unwrap();
    }
    let spare = vm.free_pages();
    space
        .fault(BASE + 40 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    // The seed read one page when the cluster did not fit; it is cut to
    // the memory above the reserve instead.
    let calls = pager.calls();
    assert_eq!(calls.len(), 1);
    let n = calls[0].pindexes.len() as u64;
    assert!(n > 1 && n < 16 && n <= spare, "{n} pages with {spare} free");
    assert_eq!(calls[0].pindexes[calls[0].reqpage], 40);
    assert_eq!(vm.counters().snapshot().v_cluster_short, 1);
    consistent(&vm);
}

/// A machine of 8192 pages and a 4096-page file mapped with synchronous
/// read-ahead, the pager able to read 16 pages around any page.
fn random_file() -> (Arc<Vm<RefPmap>>, VmSpace<RefPmap>, Arc<MemPager>) {
    let vm = Vm::new(RefPmap::new(), vm_testkit::test_config(8192)).unwrap();
    let space = vm.new_space().unwrap();
    let pager = Arc::new(MemPager::with_pattern(PagerKind::FILE, 4096));
    pager.set_contiguity(Contiguity {
        behind: 16,
        ahead: 16,
    });
    let obj = vm.new_object(4096, pager.clone());
    space
        .map(MapRequest::object(BASE, 4096 * PAGE, obj, 0, Prot::READ))
        .unwrap();
    (vm, space, pager)
}

/// `n` pages 32 apart, in a scrambled order, from page 16 up.
fn scattered(n: u64) -> Vec<u64> {
    (0..n).map(|i| 16 + 32 * ((i * 53) % n)).collect()
}

#[test]
fn past_the_miss_limit_random_faults_read_only_their_page() {
    let (vm, space, pager) = random_file();
    let pages = scattered(120);
    for &p in &pages {
        scan(&space, p, p + 1);
    }
    let sizes: Vec<usize> = pager.calls().iter().map(|c| c.pindexes.len()).collect();
    // Linux's MMAP_LOTSAMISS: 100 read-arounds nobody used, then one page
    // a fault.
    assert!(sizes[..100].iter().all(|&n| n == 16), "{sizes:?}");
    assert!(sizes[100..].iter().all(|&n| n == 1), "{sizes:?}");
    consistent(&vm);
}

#[test]
fn pages_found_resident_take_misses_back() {
    let (vm, space, pager) = random_file();
    let pages = scattered(120);
    for &p in &pages[..100] {
        scan(&space, p, p + 1);
    }
    // The program now uses what was read around: soft faults (and the
    // pages fault-around maps with them) count as hits.
    for &p in &pages[..10] {
        scan(&space, p - 7, p + 9);
    }
    let before = pager.calls().len();
    scan(&space, pages[100], pages[100] + 1);
    assert_eq!(
        pager.calls()[before].pindexes.len(),
        16,
        "read-around again"
    );
    consistent(&vm);
}
