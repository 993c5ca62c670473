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
fn sequential_behaviour_reads_ahead_from_the_first_fault() {
    let (vm, space) = machine(256);
    let (pager, obj) = file(&vm, PagerKind::FILE);
    map(&space, &obj, Behavior::Sequential);
    space
        .fault(BASE + 40 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(pager.calls(), vec![call(40, 55, 0)]);
    consistent(&vm);
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
fn short_memory_reads_a_single_page() {
    let (vm, space) = machine(24);
    let (pager, obj) = file(&vm, PagerKind::FILE);
    map(&space, &obj, Behavior::Normal);
    let hog = vm.new_space().unwrap();
    hog.map_anon(BASE, 16 * PAGE, Prot::RW).unwrap();
    for i in 0..16 {
        hog.write_u8(BASE + i * PAGE, 1).unwrap();
    }
    space
        .fault(BASE + 40 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(pager.calls(), vec![call(40, 40, 0)]);
    assert_eq!(vm.counters().snapshot().v_cluster_short, 1);
    consistent(&vm);
}
