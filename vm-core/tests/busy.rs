//! Busy pages and the map lock across I/O: seed L352-400, L560-565,
//! L789-842.

mod common;
use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_core::{FaultError, FaultFlags, FaultKind, MapRequest, PageFlags, PagerKind, Prot};

/// Polls `cond` for up to 10 s.
fn eventually(mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "condition never held"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn second_fault_on_a_busy_page_waits_for_the_first() {
    let (vm, space) = machine(32);
    let space = Arc::new(space);
    let (pager, obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    let pause = pager.pause_next();
    let s1 = space.clone();
    let t1 = std::thread::spawn(move || s1.fault(BASE, Prot::READ, FaultFlags::NORMAL));
    assert_eq!(pause.wait_started(), 0);
    let s2 = space.clone();
    let t2 = std::thread::spawn(move || s2.fault(BASE, Prot::READ, FaultFlags::NORMAL));
    // Wait until the second fault sleeps on the busy page.
    let id = obj.resident_page(0).unwrap();
    eventually(|| vm.page(id).flags().contains(PageFlags::WANTED));
    pause.resume();
    let a = t1.join().unwrap().unwrap();
    let b = t2.join().unwrap().unwrap();
    assert_eq!(a.pfn, b.pfn);
    assert_eq!(a.kind, FaultKind::PagedIn);
    assert_eq!(b.kind, FaultKind::Resident);
    assert_eq!(pager.calls().len(), 1, "one read for both faults");
    assert!(vm.counters().snapshot().v_intrans >= 1);
    consistent(&vm);
}

/// A read fault at `BASE` in another thread; `during` runs while the
/// fault sits in the pager's I/O. Returns the fault's result.
fn fault_around_io(
    space: &Arc<vm_core::VmSpace<vm_testkit::RefPmap>>,
    pager: &vm_testkit::MemPager,
    during: impl FnOnce(),
) -> Result<vm_core::FaultOutcome, FaultError> {
    let pause = pager.pause_next();
    let s1 = space.clone();
    let t = std::thread::spawn(move || s1.fault(BASE, Prot::READ, FaultFlags::NORMAL));
    pause.wait_started();
    during();
    pause.resume();
    t.join().unwrap()
}

#[test]
fn the_map_is_unlocked_during_pager_io() {
    let (vm, space) = machine(32);
    let space = Arc::new(space);
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    // A map change needs the write lock: it would block here if the fault
    // held the map across its I/O.
    fault_around_io(&space, &pager, || {
        space.map_anon(BASE + 64 * PAGE, PAGE, Prot::RW).unwrap()
    })
    .unwrap();
    consistent(&vm);
}

#[test]
fn protection_lowered_during_io_is_honoured() {
    let (vm, space) = machine(32);
    let space = Arc::new(space);
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::RW, false);
    let out = fault_around_io(&space, &pager, || {
        space.protect(BASE, 4 * PAGE, Prot::READ).unwrap()
    })
    .unwrap();
    assert_eq!(
        out.prot,
        Prot::READ,
        "entry became read-only while the fault slept"
    );
    assert!(
        !vm.pmap()
            .pte(space.pmap_space(), BASE)
            .unwrap()
            .prot
            .contains(Prot::WRITE)
    );
    consistent(&vm);
}

#[test]
fn unmap_during_io_fails_the_fault_cleanly() {
    let (vm, space) = machine(32);
    let space = Arc::new(space);
    let (pager, obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    let e = fault_around_io(&space, &pager, || space.unmap(BASE, 4 * PAGE).unwrap()).unwrap_err();
    assert_eq!(e, FaultError::InvalidAddress { addr: BASE });
    assert_eq!(space.extract(BASE), None);
    // The page that was read stays cached in the object.
    assert_eq!(obj.resident_count(), 1);
    consistent(&vm);
}

#[test]
fn remap_during_io_retries_against_the_new_object() {
    let (vm, space) = machine(32);
    let space = Arc::new(space);
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    let out = fault_around_io(&space, &pager, || {
        space.unmap(BASE, 4 * PAGE).unwrap();
        space
            .map(MapRequest::anon(BASE, 4 * PAGE, Prot::RW))
            .unwrap();
    })
    .unwrap();
    assert_eq!(
        out.kind,
        FaultKind::ZeroFill,
        "the retry found the new anonymous mapping"
    );
    assert_eq!(space.read_u8(BASE).unwrap(), 0);
    consistent(&vm);
}
