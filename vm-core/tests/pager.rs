//! Pager I/O from the fault path: seed L430-453, L465-634.

mod common;
use common::*;
use vm_core::{BusCode, FaultError, FaultFlags, FaultKind, PagerError, PagerKind, Prot, Signal};
use vm_testkit::{Injected, MemPager, pattern_byte};

#[test]
fn page_in_is_a_major_fault_and_fills_the_page() {
    let (vm, space) = machine(32);
    let (pager, obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    let out = space
        .fault(BASE + PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert!(out.major);
    assert_eq!(out.kind, FaultKind::PagedIn);
    assert_eq!(space.rusage(), (0, 1));
    let s = vm.counters().snapshot();
    assert_eq!((s.v_io_faults, s.v_pager_calls, s.v_zfod), (1, 1, 0));
    let mut buf = [0u8; 4096];
    space.read(BASE + PAGE, &mut buf).unwrap();
    assert!(
        buf.iter()
            .enumerate()
            .all(|(o, &b)| b == pattern_byte(1, o))
    );
    assert_eq!(pager.calls().len(), 1);
    assert_eq!(pager.calls()[0].pindexes, vec![1]);
    assert_eq!(obj.resident_count(), 1);
    consistent(&vm);
}

#[test]
fn a_resident_page_needs_no_pager() {
    let (vm, space) = machine(32);
    let (pager, obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    byte(&space, BASE);
    space.unmap(BASE, 4 * PAGE).unwrap();
    space
        .map(vm_core::MapRequest::object(
            BASE,
            4 * PAGE,
            obj,
            0,
            Prot::READ,
        ))
        .unwrap();
    let out = space.fault(BASE, Prot::READ, FaultFlags::NORMAL).unwrap();
    assert_eq!(out.kind, FaultKind::Resident);
    assert!(!out.major);
    assert_eq!(pager.calls().len(), 1);
    consistent(&vm);
}

#[test]
fn pager_without_the_page_falls_through_to_zero_fill() {
    let (vm, space) = machine(32);
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::ANONYMOUS, 4, Prot::RW, false);
    pager.forget(2);
    let out = space
        .fault(BASE + 2 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(out.kind, FaultKind::ZeroFill);
    assert_eq!(byte(&space, BASE + 2 * PAGE), 0);
    assert_eq!(pager.calls().len(), 0, "has_page said no");
    // A pager that says FAIL from get_pages is treated the same.
    pager.inject(Injected::Fail(PagerError::Fail));
    let out = space
        .fault(BASE + 3 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(out.kind, FaultKind::ZeroFill);
    consistent(&vm);
}

#[test]
fn io_error_is_reported_and_leaves_nothing_behind() {
    let (vm, space) = machine(32);
    let (pager, obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    let free = vm.free_pages();
    pager.inject(Injected::Fail(MemPager::io_error()));
    let e = space
        .fault(BASE + 3 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap_err();
    match &e {
        FaultError::Pager {
            addr,
            object,
            pindex,
            error: PagerError::Error(io),
        } => {
            assert_eq!((*addr, *object, *pindex), (BASE + 3 * PAGE, obj.id(), 3));
            assert_eq!(io.code, 5);
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(e.signal(), Signal::Bus(BusCode::ObjErr));
    assert_eq!(obj.resident_count(), 0);
    assert_eq!(vm.free_pages(), free);
    consistent(&vm);
    // The system keeps working: the next try succeeds.
    assert_eq!(byte(&space, BASE + 3 * PAGE), pattern_byte(3, 0));
}

#[test]
fn pager_bad_is_out_of_bounds() {
    let (vm, space) = machine(32);
    let (pager, obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    pager.inject(Injected::Fail(PagerError::Bad));
    let e = space
        .fault(BASE, Prot::READ, FaultFlags::NORMAL)
        .unwrap_err();
    assert!(
        matches!(e, FaultError::OutOfBounds { object, pindex: 0, .. } if object == obj.id()),
        "{e}"
    );
    assert_eq!(e.signal(), Signal::Bus(BusCode::ObjErr));
    assert_eq!(obj.resident_count(), 0);
    consistent(&vm);
}

#[test]
fn fault_beyond_the_object_size_is_out_of_bounds() {
    let (vm, space) = machine(32);
    let (_pager, obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    byte(&space, BASE + 3 * PAGE);
    vm.resize_object(&obj, 2);
    assert_eq!(space.extract(BASE + 3 * PAGE), None, "truncation unmaps");
    let e = space
        .fault(BASE + 3 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap_err();
    assert_eq!(
        e,
        FaultError::OutOfBounds {
            addr: BASE + 3 * PAGE,
            object: obj.id(),
            pindex: 3,
            size: 2
        }
    );
    assert_eq!(byte(&space, BASE + PAGE), pattern_byte(1, 0));
    consistent(&vm);
}

#[test]
fn partially_valid_pages_are_zero_filled_past_the_valid_blocks() {
    let (vm, space) = machine(32);
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    pager.inject(Injected::Partial(0x0f));
    let mut buf = [0u8; 4096];
    space.read(BASE, &mut buf).unwrap();
    assert!(
        buf[..2048]
            .iter()
            .enumerate()
            .all(|(o, &b)| b == pattern_byte(0, o))
    );
    assert!(buf[2048..].iter().all(|&b| b == 0));
    assert_eq!(vm.counters().snapshot().v_pager_partial, 1);
    consistent(&vm);
}

#[test]
fn a_pager_that_fills_nothing_cannot_leak_old_memory() {
    let (vm, space) = machine(4);
    // Dirty every frame, then free them.
    space
        .map_anon(BASE + 64 * PAGE, 4 * PAGE, Prot::RW)
        .unwrap();
    space.write(BASE + 64 * PAGE, &[0xEE; 4 * 4096]).unwrap();
    space.unmap(BASE + 64 * PAGE, 4 * PAGE).unwrap();
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    pager.inject(Injected::Nonsense);
    let mut buf = [1u8; 4096];
    space.read(BASE, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    consistent(&vm);
}

#[test]
fn pager_again_is_retried_then_reported() {
    let (vm, space) = machine(32);
    let (pager, obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    pager.inject(Injected::Fail(PagerError::Again));
    assert_eq!(byte(&space, BASE), pattern_byte(0, 0));
    for _ in 0..10 {
        pager.inject(Injected::Fail(PagerError::Again));
    }
    let e = space
        .fault(BASE + PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap_err();
    assert!(
        matches!(
            e,
            FaultError::Pager {
                error: PagerError::Again,
                pindex: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        obj.resident_page(1).is_none(),
        "nothing left of the failed read"
    );
    consistent(&vm);
}
